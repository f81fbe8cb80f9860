"""HTTP for webhook deliveries, refusing to be turned against the inside of the network (SSRF).

The check happens where it cannot be bypassed: when the connection is made. The host name is
resolved once, every address it resolves to must be public, and the connection goes to the
address that was checked (so a DNS answer that changes between check and use cannot sneak in a
private one). Redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore
import httpx

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class PrivateAddressRefused(httpcore.ConnectError):
    pass


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global is False for private, loopback, link-local (incl. 169.254.169.254 metadata),
    # shared (100.64/10), multicast, reserved and unspecified ranges
    return ip.is_global and not ip.is_multicast


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, allow_private: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host.lower().rstrip(".") in METADATA_HOSTS and not self._allow_private:
            raise PrivateAddressRefused(f"refused: {host} is a cloud metadata service")
        try:
            with anyio.fail_after(timeout):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        if not self._allow_private:
            for address in addresses:
                if not is_public(address):
                    raise PrivateAddressRefused(
                        f"refused: {host} resolves to {address}, which is not a public address"
                    )
        return await self._inner.connect_tcp(
            addresses[0], port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with the connection pool's network backend swapped for the
    guarded one: request and response mapping stay httpx's."""

    def __init__(self, *, allow_private: bool = False, max_connections: int = 20) -> None:
        super().__init__(retries=0)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=_GuardedBackend(allow_private),
        )


def webhook_client(
    *, allow_private: bool = False, timeout: float = 10.0, max_connections: int = 20
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=GuardedTransport(allow_private=allow_private, max_connections=max_connections),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers={"user-agent": "mailer-webhooks/1"},
    )
