"""Webhook targets that resolve to private, loopback, link-local or metadata addresses are
refused when the connection is made; allowed only when development explicitly says so."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from mailer.webhook_http import is_public, webhook_client


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self) -> None:
        _Recorder.hits.append(self.path)
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_private_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)


def test_public_addresses_are(address: str = "93.184.216.34") -> None:
    assert is_public(address)
    assert is_public("2606:4700:4700::1111")


def test_loopback_target_is_refused_at_connect_time(local_server: int) -> None:
    async def post() -> None:
        async with webhook_client() as client:
            await client.post(f"http://localhost:{local_server}/hook", content=b"{}")

    with pytest.raises(httpx.ConnectError, match="not a public address"):
        asyncio.run(post())
    assert _Recorder.hits == []


def test_allowed_for_development_and_redirects_are_not_followed(local_server: int) -> None:
    async def post() -> httpx.Response:
        async with webhook_client(allow_private=True) as client:
            return await client.post(f"http://127.0.0.1:{local_server}/hook", content=b"{}")

    response = asyncio.run(post())
    assert response.status_code == 302
    assert _Recorder.hits == ["/hook"]
