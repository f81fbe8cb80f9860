"""Sending: the small interface the campaign runner depends on, the SMTP pool behind it, and an
in-memory double for tests.

    Transport (Protocol)     send(envelope_from, recipient, data) -> SendResult; close()
    ├── SmtpPool             persistent aiosmtplib connections, rate caps, retries, back-off
    └── MemoryTransport      records what it is given; outcomes scripted by a function

Every SMTP answer, timeout and dropped connection comes back as a SendResult, whose status
says what the runner may do next:

    sent        the server took responsibility for the message (250 after the content)
    temporary   not delivered and safe to send again later: 4xx, throttling, a connection that
                could not be made or was lost before the message content was sent, still so
                after `max_retries` retries with exponential back-off and jitter
    permanent   refused (5xx); `hard_bounce` when the recipient's mailbox or domain does not
                exist (enhanced status 5.1.x at RCPT or after the content, see `is_hard_bounce`)
    unknown     the connection failed after the content was sent and before the final reply:
                the message may have been delivered, so it must not be resent automatically

`send` raises only ConfigError, for what no retry can fix: rejected credentials, a password
that would travel unencrypted, TLS that is required but missing or fails verification.

URLs: `smtp://[user:password@]host[:port][?starttls=auto|true|false]` and
`smtps://[user:password@]host[:port]` (implicit TLS, port 465 by default). User and password
are percent-decoded. On `smtp://`, STARTTLS is used whenever the server offers it
(`auto`, the default; certificates are verified), `true` refuses a server that does not offer
it, `false` never upgrades. A password is only ever sent over TLS, or in the clear to a
loopback address. The password never appears in a message, a repr or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, Self
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPResponse,
    SMTPResponseException,
)

from mailer.errors import ConfigError
from mailer.ratelimit import RateLimiter

logger = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 4
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_MAX = 60.0
CLOSE_TIMEOUT = 2.0
SMTP_PORT = 25
SMTPS_PORT = 465

Stage = Literal["connect", "mail", "rcpt", "data"]
"""Where a transaction ended: `connect` covers the greeting, EHLO, STARTTLS and AUTH."""

# Throttling: the server asks us to slow down. The connection that heard it is paused.
THROTTLE_CODES = frozenset({421, 451, 454})

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# X.1.7 and X.1.8 are about the sender's address, not the recipient's mailbox.
_SENDER_ADDRESS_DETAILS = frozenset({"7", "8"})
_HOSTNAME = re.compile(r"[\x21-\x7e]{1,255}")
_BAD_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_DISCONNECTED = (SMTPException, OSError)


class SendStatus(StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one send. `code` and `enhanced` are None when no server reply applies."""

    status: SendStatus
    code: int | None = None
    enhanced: str | None = None
    message: str = ""
    stage: Stage = "data"
    attempts: int = 1
    hard_bounce: bool = False

    @classmethod
    def from_reply(
        cls, code: int, message: str = "", *, stage: Stage = "data", attempts: int = 1
    ) -> SendResult:
        """Classify a server reply: 2xx sent, 4xx temporary, 5xx permanent."""
        match = _ENHANCED.match(message)
        enhanced = match.group(0) if match else None
        if 200 <= code < 300:
            status = SendStatus.SENT
        elif 500 <= code < 600:
            status = SendStatus.PERMANENT
        else:
            status = SendStatus.TEMPORARY
        hard = status is SendStatus.PERMANENT and is_hard_bounce(enhanced, stage)
        return cls(status, code, enhanced, message, stage, attempts, hard)

    @classmethod
    def sent(cls, message: str = "2.0.0 Ok: queued") -> SendResult:
        return cls.from_reply(250, message)

    @classmethod
    def unknown(cls, message: str, *, attempts: int = 1) -> SendResult:
        return cls(SendStatus.UNKNOWN, message=message, stage="data", attempts=attempts)

    @classmethod
    def temporary(cls, message: str, *, stage: Stage, attempts: int = 1) -> SendResult:
        """A temporary failure without a server reply (a refused or lost connection)."""
        return cls(SendStatus.TEMPORARY, message=message, stage=stage, attempts=attempts)

    @property
    def throttled(self) -> bool:
        return self.code in THROTTLE_CODES or (
            self.status is SendStatus.TEMPORARY
            and self.enhanced is not None
            and self.enhanced.startswith("4.7.")
        )

    def describe(self) -> str:
        reply = " ".join(str(part) for part in (self.code, self.message) if part)
        return f"{self.status} at {self.stage}: {reply or 'no reply'}"


def is_hard_bounce(enhanced: str | None, stage: Stage) -> bool:
    """A permanent failure that says the recipient's address is bad (RFC 3463 X.1.x).

    Only enhanced status codes count: a bare `550 user unknown` is too ambiguous (policy
    blocks and spam rejections use 550 too), so it fails the delivery without suppressing.
    Failures at MAIL FROM and before it are about the sender or the session, never a bounce.
    """
    if enhanced is None or stage not in ("rcpt", "data"):
        return False
    parts = enhanced.split(".")
    return (
        len(parts) == 3
        and parts[0] == "5"
        and parts[1] == "1"
        and parts[2] not in _SENDER_ADDRESS_DETAILS
    )


class Transport(Protocol):
    """What the campaign runner needs from a way of sending mail (listmonk's Messenger)."""

    async def send(self, envelope_from: str, recipient: str, data: bytes) -> SendResult: ...

    async def close(self) -> None: ...


# -- URL ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpUrl:
    scheme: Literal["smtp", "smtps"]
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: Literal["auto", "true", "false"] = "auto"

    @classmethod
    def parse(cls, url: str) -> SmtpUrl:
        try:
            parts = urlsplit(url)
            port = parts.port
            host = parts.hostname
        except ValueError as exc:
            raise ConfigError(f"invalid SMTP URL {redact_smtp_url(url)!r}: {exc}") from None
        scheme = parts.scheme.lower()
        shown = redact_smtp_url(url)
        if scheme not in ("smtp", "smtps"):
            raise ConfigError(
                f"invalid SMTP URL {shown!r}: use smtp://host:port or smtps://host:port"
            )
        if not host:
            raise ConfigError(f"invalid SMTP URL {shown!r}: no host")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"invalid SMTP URL {shown!r}: unexpected path or fragment")
        starttls = "auto"
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key != "starttls":
                raise ConfigError(f"invalid SMTP URL {shown!r}: unknown option {key!r}")
            value = value.lower()
            if value not in ("auto", "true", "false"):
                raise ConfigError(
                    f"invalid SMTP URL {shown!r}: starttls must be auto, true or false"
                )
            if scheme == "smtps":
                raise ConfigError(
                    f"invalid SMTP URL {shown!r}: smtps:// is TLS from the start; "
                    "starttls applies to smtp:// only"
                )
            starttls = value
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            scheme="smtps" if scheme == "smtps" else "smtp",
            host=host,
            port=port or (SMTPS_PORT if scheme == "smtps" else SMTP_PORT),
            username=username or None,
            password=password,
            starttls="true" if starttls == "true" else "false" if starttls == "false" else "auto",
        )

    @property
    def display(self) -> str:
        """The URL without the password, for messages and logs."""
        user = f"{quote(self.username, safe='')}:***@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "" if self.starttls == "auto" else f"?starttls={self.starttls}"
        return f"{self.scheme}://{user}{host}:{self.port}{query}"

    @property
    def is_loopback(self) -> bool:
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def redact_smtp_url(url: str) -> str:
    """Hide the password in a URL that may not even parse."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<unparseable URL>"
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostpart}" if user else f"{scheme}://***@{hostpart}"


# -- the pool -------------------------------------------------------------------------------


@dataclass
class PoolStats:
    """Counters, cheap enough to keep on the per-message path."""

    connects: int = 0
    sent: int = 0
    temporary: int = 0
    permanent: int = 0
    unknown: int = 0
    retries: int = 0
    throttled: int = 0


class _Connection:
    __slots__ = ("busy", "eightbit", "size", "smtp", "strikes", "utf8")

    def __init__(self) -> None:
        self.smtp: aiosmtplib.SMTP | None = None
        self.busy = False
        self.strikes = 0  # throttling replies in a row
        self.size = False
        self.eightbit = False
        self.utf8 = False

    @property
    def connected(self) -> bool:
        return self.smtp is not None and self.smtp.is_connected

    def drop(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None


class _Refused(Exception):
    """Internal: a connection could not be made; carries the result to report."""

    def __init__(self, result: SendResult) -> None:
        super().__init__(result.message)
        self.result = result


class SmtpPool:
    """A pool of persistent SMTP connections behind the Transport interface.

    Parameters:
        url: `smtp://` or `smtps://`, see the module docstring.
        size: the most connections open at once; `send` may be called by more tasks than
            that, they wait for a free connection. Connections are opened on demand and kept.
        timeout: seconds to wait for each reply (and for connecting).
        rate: a global cap in messages per second, or None.
        per_domain_rate: a cap per recipient domain in messages per second, or None.
        max_retries: how often a temporary failure is retried inside `send` before it is
            reported as temporary. Retries wait `backoff_base * 2**n` seconds (at most
            `backoff_max`) with jitter, and pass the rate caps again.
        backoff_base, backoff_max: see max_retries; a connection that is told to slow down
            (421, 451, 454, 4.7.x) is also taken out of the pool for such a pause, growing with
            consecutive throttling replies, so concurrency drops while the server pushes back.
        local_hostname: the name sent in EHLO; by default the machine's FQDN, looked up once.
        tls_context: for smtps:// and STARTTLS; by default the system's trusted CAs.
        limiter: a RateLimiter to use instead of one built from rate and per_domain_rate.
    """

    def __init__(
        self,
        url: str,
        *,
        size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        rate: float | None = None,
        per_domain_rate: float | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        if size < 1:
            raise ConfigError(f"the SMTP pool needs at least one connection, not {size}")
        if max_retries < 0:
            raise ConfigError(f"max_retries cannot be negative ({max_retries})")
        if not timeout > 0:
            raise ConfigError(f"the SMTP timeout must be positive, not {timeout}")
        for name, value in (("rate", rate), ("per-domain rate", per_domain_rate)):
            if value is not None and not value > 0:
                raise ConfigError(f"the {name} must be a positive number per second")
        if local_hostname is not None and not _HOSTNAME.fullmatch(local_hostname):
            raise ConfigError(f"invalid local hostname for EHLO: {local_hostname!r}")
        self.url = SmtpUrl.parse(url)
        self.size = size
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stats = PoolStats()
        self._local_hostname = local_hostname
        self._tls_context = tls_context
        limiter = limiter or RateLimiter(rate, per_domain_rate)
        self._limiter = limiter if limiter.active else None
        self._connections = [_Connection() for _ in range(size)]
        self._idle: asyncio.LifoQueue[_Connection] | None = None
        self._paused: dict[_Connection, asyncio.TimerHandle] = {}
        self._random = random.Random()  # noqa: S311 (jitter, not secrets)
        self._closed = False

    def __repr__(self) -> str:
        return f"SmtpPool({self.url.display!r}, size={self.size})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def open_connections(self) -> int:
        return sum(1 for conn in self._connections if conn.connected)

    async def send(self, envelope_from: str, recipient: str, data: bytes) -> SendResult:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        sender_arg = _address_arg(envelope_from, allow_null=True)
        recipient_arg = _address_arg(recipient, allow_null=False)
        if sender_arg is None or recipient_arg is None:
            which = "sender" if sender_arg is None else "recipient"
            stage: Stage = "mail" if sender_arg is None else "rcpt"
            self.stats.permanent += 1
            return SendResult(SendStatus.PERMANENT, message=f"invalid {which} address", stage=stage)
        payload, size = _dot_stuffed(data)
        eight_bit = not data.isascii()
        attempt = 1
        while True:
            if self._limiter is not None:
                await self._limiter.acquire(recipient)
            result = await self._attempt(
                sender_arg, recipient_arg, payload, size, eight_bit, attempt
            )
            if result.status is not SendStatus.TEMPORARY or attempt > self.max_retries:
                break
            self.stats.retries += 1
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
        stats = self.stats
        status = result.status
        if status is SendStatus.SENT:
            stats.sent += 1
        elif status is SendStatus.PERMANENT:
            stats.permanent += 1
        elif status is SendStatus.TEMPORARY:
            stats.temporary += 1
        else:
            stats.unknown += 1
        return result

    async def close(self) -> None:
        """Say QUIT on idle connections and close them all; `send` refuses afterwards.

        Call it once the sends are done: a transaction still in flight is cut, and its send
        reports that (temporary before the content went out, unknown after).
        """
        self._closed = True
        for conn, handle in self._paused.items():
            handle.cancel()
            if self._idle is not None:
                self._idle.put_nowait(conn)  # wakes a waiting send, which then refuses
        self._paused.clear()
        quits = [self._quit(conn) for conn in self._connections if conn.connected]
        await asyncio.gather(*quits)

    # -- internals ---------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        return delay * (0.5 + 0.5 * self._random.random())

    async def _quit(self, conn: _Connection) -> None:
        smtp = conn.smtp
        if smtp is None:
            return
        if not conn.busy:
            with contextlib.suppress(*_DISCONNECTED):
                await smtp.quit(timeout=min(self.timeout, CLOSE_TIMEOUT))
        conn.drop()

    async def _checkout(self) -> _Connection:
        idle = self._idle
        if idle is None:
            idle = self._idle = asyncio.LifoQueue()
            for conn in reversed(self._connections):
                idle.put_nowait(conn)
        conn = await idle.get()
        if self._closed:
            idle.put_nowait(conn)
            raise RuntimeError(f"{self!r} is closed")
        conn.busy = True
        return conn

    def _checkin(self, conn: _Connection, result: SendResult | None) -> None:
        conn.busy = False
        idle = self._idle
        assert idle is not None
        if self._closed:
            conn.drop()
        elif result is not None and result.throttled:
            # Take the connection out of the pool for a while: the server asked us to slow down.
            conn.strikes += 1
            self.stats.throttled += 1
            if result.code == 421:  # the server closes the connection after a 421
                conn.drop()
            pause = self._backoff(conn.strikes)
            logger.info(
                "SMTP server %s asks to slow down (%s): one connection pauses for %.1f s",
                self.url.display,
                result.describe(),
                pause,
            )
            self._paused[conn] = asyncio.get_running_loop().call_later(pause, self._resume, conn)
            return
        elif result is not None and result.status is SendStatus.SENT:
            conn.strikes = 0
        idle.put_nowait(conn)

    def _resume(self, conn: _Connection) -> None:
        if self._paused.pop(conn, None) is not None and self._idle is not None:
            self._idle.put_nowait(conn)

    async def _attempt(
        self,
        sender: bytes,
        recipient: bytes,
        payload: bytes,
        size: int,
        eight_bit: bool,
        attempt: int,
    ) -> SendResult:
        conn = await self._checkout()
        result: SendResult | None = None
        try:
            result = await self._transaction(
                conn, sender, recipient, payload, size, eight_bit, attempt
            )
            return result
        except BaseException:
            # Cancelled (or a bug) mid-transaction: the session state is unknown.
            conn.drop()
            raise
        finally:
            self._checkin(conn, result)

    async def _transaction(
        self,
        conn: _Connection,
        sender: bytes,
        recipient: bytes,
        payload: bytes,
        size: int,
        eight_bit: bool,
        attempt: int,
    ) -> SendResult:
        fresh = False
        if not conn.connected:
            conn.drop()
            try:
                await self._connect(conn)
            except _Refused as refused:
                return _with_attempts(refused.result, attempt)
            fresh = True
        smtp = conn.smtp
        assert smtp is not None

        # MAIL FROM. A reused connection that turns out to be dead (an idle timeout on the
        # server side) is replaced once, without counting an attempt.
        mail_args = [b"FROM:" + sender]
        if conn.size:
            mail_args.append(b"SIZE=%d" % size)
        if eight_bit and conn.eightbit:
            mail_args.append(b"BODY=8BITMIME")
        if not (sender.isascii() and recipient.isascii()):
            if not conn.utf8:
                return SendResult(
                    SendStatus.PERMANENT,
                    message="the server does not support SMTPUTF8 (internationalised address)",
                    stage="mail",
                    attempts=attempt,
                )
            mail_args.append(b"SMTPUTF8")
        try:
            reply = await smtp.execute_command(b"MAIL", *mail_args)
        except _DISCONNECTED as exc:
            conn.drop()
            if fresh:
                return self._lost("mail", exc, attempt)
            try:
                await self._connect(conn)
            except _Refused as refused:
                return _with_attempts(refused.result, attempt)
            smtp = conn.smtp
            assert smtp is not None
            try:
                reply = await smtp.execute_command(b"MAIL", *mail_args)
            except _DISCONNECTED as exc2:
                conn.drop()
                return self._lost("mail", exc2, attempt)
        if reply.code != 250:
            return self._refused(conn, reply, "mail", attempt)

        try:
            reply = await smtp.execute_command(b"RCPT", b"TO:" + recipient)
        except _DISCONNECTED as exc:
            conn.drop()
            return self._lost("rcpt", exc, attempt)
        if reply.code not in (250, 251):
            return await self._refused_reset(conn, reply, "rcpt", attempt)

        try:
            reply = await smtp.execute_command(b"DATA")
        except _DISCONNECTED as exc:
            conn.drop()
            return self._lost("data", exc, attempt)
        if reply.code != 354:
            return await self._refused_reset(conn, reply, "data", attempt)

        protocol = smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            protocol.write(payload)
        except _DISCONNECTED as exc:
            conn.drop()
            return self._lost("data", exc, attempt)
        # From here on the message may have been delivered, whatever happens to the connection.
        try:
            reply = await protocol.read_response(timeout=self.timeout)
        except (SMTPException, OSError) as exc:
            conn.drop()
            return SendResult.unknown(
                "no reply after the message content was sent "
                f"({_explain(exc)}); it may have been delivered",
                attempts=attempt,
            )
        if 200 <= reply.code < 300:
            return SendResult.from_reply(reply.code, reply.message, attempts=attempt)
        if reply.code < 200 or reply.code >= 600:
            conn.drop()
            return SendResult.unknown(
                f"malformed reply after the message content: {reply.message}", attempts=attempt
            )
        return self._refused(conn, reply, "data", attempt)

    def _refused(
        self, conn: _Connection, reply: SMTPResponse, stage: Stage, attempt: int
    ) -> SendResult:
        if reply.code == 421 or reply.code < 200:  # closing, or a reply we could not parse
            conn.drop()
        return SendResult.from_reply(reply.code, reply.message, stage=stage, attempts=attempt)

    async def _refused_reset(
        self, conn: _Connection, reply: SMTPResponse, stage: Stage, attempt: int
    ) -> SendResult:
        """A refusal inside a transaction: RSET, so the connection can carry the next one."""
        result = self._refused(conn, reply, stage, attempt)
        smtp = conn.smtp
        if smtp is not None and smtp.is_connected:
            try:
                rset = await smtp.execute_command(b"RSET")
            except _DISCONNECTED:
                conn.drop()
            else:
                if rset.code != 250:
                    conn.drop()
        return result

    def _lost(self, stage: Stage, exc: BaseException, attempt: int) -> SendResult:
        return SendResult.temporary(
            f"connection to {self.url.display} lost before the message was sent: {_explain(exc)}",
            stage=stage,
            attempts=attempt,
        )

    async def _connect(self, conn: _Connection) -> None:
        """Open, greet, upgrade and authenticate; raise _Refused or ConfigError."""
        url = self.url
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        smtp = aiosmtplib.SMTP(
            hostname=url.host,
            port=url.port,
            timeout=self.timeout,
            use_tls=url.scheme == "smtps",
            start_tls=False,
            local_hostname=self._local_hostname,
            tls_context=self._tls_context,
        )
        try:
            await self._open(smtp)
        except BaseException:
            smtp.close()
            raise
        conn.smtp = smtp
        conn.size = smtp.supports_extension("size")
        conn.eightbit = smtp.supports_extension("8bitmime")
        conn.utf8 = smtp.supports_extension("smtputf8")
        self.stats.connects += 1
        logger.debug("connected to SMTP server %s", url.display)

    async def _open(self, smtp: aiosmtplib.SMTP) -> None:
        url = self.url
        try:
            await smtp.connect()
            await self._hello(smtp)
            if url.scheme == "smtp" and url.starttls != "false":
                if smtp.supports_extension("starttls"):
                    await smtp.starttls()
                    await self._hello(smtp)
                elif url.starttls == "true":
                    raise ConfigError(
                        f"SMTP server {url.display} does not offer STARTTLS (starttls=true)"
                    )
            if url.username is not None:
                encrypted = smtp.get_transport_info("sslcontext") is not None
                if not encrypted and not url.is_loopback:
                    raise ConfigError(
                        f"refusing to send the SMTP password to {url.display} unencrypted: "
                        "use smtps:// or a server that offers STARTTLS"
                    )
                await self._login(smtp)
        except ssl.SSLError as exc:
            raise self._tls_error(exc) from None
        except SMTPConnectResponseError as exc:
            raise _Refused(SendResult.from_reply(exc.code, exc.message, stage="connect")) from None
        except SMTPResponseException as exc:
            raise _Refused(SendResult.from_reply(exc.code, exc.message, stage="connect")) from None
        except SMTPConnectError as exc:
            if isinstance(exc.__cause__, ssl.SSLError):
                raise self._tls_error(exc.__cause__) from None
            raise _Refused(self._unreachable(exc)) from None
        except _DISCONNECTED as exc:
            raise _Refused(self._unreachable(exc)) from None

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            if exc.code >= 500 and smtp.is_connected:
                await smtp.helo()  # an SMTP server without ESMTP
            else:
                raise

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        url = self.url
        assert url.username is not None
        try:
            await smtp.login(url.username, url.password or "")
        except SMTPAuthenticationError as exc:
            if 400 <= exc.code < 500:
                raise
            raise ConfigError(
                f"SMTP server {url.display} rejected the credentials: {exc.code} {exc.message}"
            ) from None
        except SMTPResponseException:
            raise
        except SMTPException as exc:
            if not smtp.is_connected:
                raise
            raise ConfigError(
                f"cannot log in to SMTP server {url.display}: {exc.message}"
            ) from None

    def _tls_error(self, exc: ssl.SSLError) -> ConfigError:
        return ConfigError(f"TLS with SMTP server {self.url.display} failed: {exc}")

    def _unreachable(self, exc: BaseException) -> SendResult:
        return SendResult.temporary(
            f"cannot connect to SMTP server {self.url.display}: {_explain(exc)}", stage="connect"
        )


def _with_attempts(result: SendResult, attempt: int) -> SendResult:
    if result.attempts == attempt:
        return result
    return SendResult(
        result.status,
        result.code,
        result.enhanced,
        result.message,
        result.stage,
        attempt,
        result.hard_bounce,
    )


def _explain(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _address_arg(address: str, *, allow_null: bool) -> bytes | None:
    """`<address>` for MAIL FROM / RCPT TO, or None when it cannot be sent safely."""
    if not address:
        return b"<>" if allow_null else None
    if _BAD_ADDRESS.search(address) or "@" not in address:
        return None
    try:
        return b"<" + address.encode("ascii") + b">"
    except UnicodeEncodeError:
        return b"<" + address.encode("utf-8") + b">"


def _dot_stuffed(data: bytes) -> tuple[bytes, int]:
    """The DATA payload (CRLF line endings, a final CRLF, leading dots doubled, the end
    marker) and the message size as RFC 1870 counts it (without the stuffing and the marker)."""
    crlf = data.count(b"\r\n")
    if crlf != data.count(b"\n") or crlf != data.count(b"\r"):
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    size = len(data)
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n", size


# -- the in-memory double -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    envelope_from: str
    recipient: str
    data: bytes


Handler = Callable[[OutgoingMessage], "SendResult | Awaitable[SendResult]"]


class MemoryTransport:
    """A Transport that sends nothing: it records every call and answers with `handler`.

    Like httpx's MockTransport: `handler` gets the OutgoingMessage and returns (or awaits to)
    a SendResult; it may raise to simulate a crash. Without a handler every message is sent.
    `messages` holds what a server would have accepted; `calls` every call with its result.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self.calls: list[tuple[OutgoingMessage, SendResult]] = []
        self.closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def messages(self) -> list[OutgoingMessage]:
        return [message for message, result in self.calls if result.status is SendStatus.SENT]

    async def send(self, envelope_from: str, recipient: str, data: bytes) -> SendResult:
        if self.closed:
            raise RuntimeError("MemoryTransport is closed")
        message = OutgoingMessage(envelope_from, recipient, data)
        if self.handler is None:
            result = SendResult.sent()
        else:
            outcome = self.handler(message)
            result = outcome if isinstance(outcome, SendResult) else await outcome
        self.calls.append((message, result))
        return result

    async def close(self) -> None:
        self.closed = True
