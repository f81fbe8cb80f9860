"""A real SMTP server for tests: aiosmtpd on a free loopback port, in a background thread.

    with CaptureServer() as server:
        pool = SmtpPool(server.url, ...)
        ...
        assert server.messages[0].data == raw

It records every message that arrived (envelope sender, recipients and the raw bytes, as
received after dot-unstuffing), every connection and every command, and can be told to
misbehave at a stage of the SMTP dialogue:

    server.reply("451 4.3.0 Try again later", stage="rcpt", times=2)  # the next two RCPTs
    server.reply("550 5.1.1 No such user", recipients={"nobody@example.org"})  # always
    server.drop(stage="end_of_data")         # after the content, before the final reply
    server.delay(0.5, stage="end_of_data")   # be slow

Stages, in dialogue order: `connect` (the greeting), `mail`, `rcpt`, `data` (the DATA command,
before 354), `end_of_data` (after the content, before the final reply). A rule with
`recipients` applies at `rcpt` to those addresses, and at `data` and `end_of_data` to
transactions that include one of them. `times` bounds how often a rule fires (None: always).
A reply starting with 421 closes the connection after it is sent, as real servers do.
Everything is thread-safe: the test thread scripts, the server thread obeys.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, syntax

Stage = Literal["connect", "mail", "rcpt", "data", "end_of_data"]
STAGES: tuple[Stage, ...] = ("connect", "mail", "rcpt", "data", "end_of_data")
HOST = "127.0.0.1"
SERVER_NAME = "capture.test"
DROP_WAIT = 10.0  # a dropped session waits this long, at most, to be cancelled
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class CapturedMessage:
    envelope_from: str
    recipients: tuple[str, ...]
    data: bytes
    connection: int
    login: str | None = None
    mail_options: tuple[str, ...] = ()
    tls: bool = False

    def parse(self) -> EmailMessage:
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class _Rule:
    stage: Stage
    action: Literal["reply", "drop", "delay"]
    reply: str = ""
    seconds: float = 0.0
    recipients: frozenset[str] | None = None
    remaining: int | None = None
    record: bool = False

    def matches(self, stage: Stage, recipients: Iterable[str]) -> bool:
        if self.stage != stage or self.remaining == 0:
            return False
        return self.recipients is None or any(r.lower() in self.recipients for r in recipients)


@dataclass
class _Verdict:
    delay: float = 0.0
    rule: _Rule | None = None


@dataclass
class _State:
    lock: threading.Condition = field(default_factory=threading.Condition)
    messages: list[CapturedMessage] = field(default_factory=list)
    commands: list[tuple[int, str]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    rules: list[_Rule] = field(default_factory=list)
    connections: int = 0
    open: set[int] = field(default_factory=set)


class CaptureServer:
    """aiosmtpd on 127.0.0.1 and a free port, recording and scriptable (see module docstring).

    credentials: {user: password}; when given, MAIL without AUTH gets 530 (AUTH is offered
    over plain TCP too, as on a loopback relay). tls_context: offer STARTTLS with it, or,
    with implicit_tls, speak TLS from the first byte (smtps).
    """

    def __init__(
        self,
        *,
        credentials: dict[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self.credentials = dict(credentials or {})
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.port = 0
        self._state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[_CaptureSMTP] = set()
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> CaptureServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("CaptureServer already started")
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="capture-smtp", daemon=True
        )
        self._thread.start()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError("the capture SMTP server did not start")
        if self._error is not None:
            self._thread.join(START_TIMEOUT)
            raise RuntimeError("the capture SMTP server did not start") from self._error

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT)
        self._thread = None
        self._loop = None

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                loop.create_server(
                    self._factory,
                    host=HOST,
                    port=0,
                    ssl=self.tls_context if self.implicit_tls else None,
                )
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for session in list(self._sessions):
                _close(session.transport, abort=True)
            loop.run_until_complete(asyncio.sleep(0))
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _factory(self) -> _CaptureSMTP:
        state = self._state
        with state.lock:
            state.connections += 1
            number = state.connections
            state.open.add(number)
        session = _CaptureSMTP(
            _Handler(self),
            capture=self,
            number=number,
            hostname=SERVER_NAME,
            loop=self._loop,
            enable_SMTPUTF8=True,
            auth_require_tls=False,
            authenticator=self._authenticate if self.credentials else None,
            tls_context=None if self.implicit_tls else self.tls_context,
            timeout=60,
        )
        self._sessions.add(session)
        return session

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if mechanism not in ("LOGIN", "PLAIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if self.credentials.get(login) != password:
            return AuthResult(success=False, handled=False)
        with self._state.lock:
            self._state.logins.append(login)
        return AuthResult(success=True, auth_data=login)

    # -- what arrived ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        return f"{scheme}://{HOST}:{self.port}"

    def url_for(self, user: str, password: str, query: str = "") -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{auth}@{HOST}:{self.port}" + (f"?{query}" if query else "")

    @property
    def messages(self) -> list[CapturedMessage]:
        with self._state.lock:
            return list(self._state.messages)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._state.lock:
            return self._state.connections

    @property
    def open_connections(self) -> int:
        with self._state.lock:
            return len(self._state.open)

    @property
    def commands(self) -> list[tuple[int, str]]:
        """(connection number, verb) for every command received, in order."""
        with self._state.lock:
            return list(self._state.commands)

    @property
    def logins(self) -> list[str]:
        with self._state.lock:
            return list(self._state.logins)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[CapturedMessage]:
        """Block until at least `count` messages arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._state.lock:
            while len(self._state.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(self._state.messages)} of {count} messages arrived in {timeout}s"
                    )
                self._state.lock.wait(left)
            return list(self._state.messages)

    def wait_closed(self, timeout: float = 5.0) -> None:
        """Block until no connection is open (the client said QUIT or hung up)."""
        deadline = time.monotonic() + timeout
        with self._state.lock:
            while self._state.open:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._state.open)} connections still open")
                self._state.lock.wait(left)

    def clear(self) -> None:
        """Forget messages, commands and logins (not the rules or the connection count)."""
        with self._state.lock:
            self._state.messages.clear()
            self._state.commands.clear()
            self._state.logins.clear()

    # -- misbehaving -------------------------------------------------------------------------

    def reply(
        self,
        reply: str,
        *,
        stage: Stage = "rcpt",
        recipients: Iterable[str] | None = None,
        times: int | None = None,
    ) -> None:
        """Answer `reply` (e.g. "550 5.1.1 No such user") instead of going on."""
        if not (len(reply) >= 3 and reply[:3].isdigit()):
            raise ValueError(f"an SMTP reply starts with a three-digit code, not {reply!r}")
        self._add(_Rule(stage, "reply", reply=reply), recipients, times)

    def drop(
        self,
        *,
        stage: Stage = "end_of_data",
        recipients: Iterable[str] | None = None,
        times: int | None = 1,
        record: bool = False,
    ) -> None:
        """Cut the connection without answering. At `end_of_data`, `record=True` keeps the
        message first (delivered, but the client never hears so)."""
        self._add(_Rule(stage, "drop", record=record), recipients, times)

    def delay(
        self,
        seconds: float,
        *,
        stage: Stage = "end_of_data",
        recipients: Iterable[str] | None = None,
        times: int | None = None,
    ) -> None:
        """Wait before answering (on top of any reply or drop rule)."""
        self._add(_Rule(stage, "delay", seconds=seconds), recipients, times)

    def clear_faults(self) -> None:
        with self._state.lock:
            self._state.rules.clear()

    def _add(self, rule: _Rule, recipients: Iterable[str] | None, times: int | None) -> None:
        if rule.stage not in STAGES:
            raise ValueError(f"unknown stage {rule.stage!r}: choose one of {', '.join(STAGES)}")
        if recipients is not None:
            if rule.stage in ("connect", "mail"):
                raise ValueError(f"recipients are not known yet at the {rule.stage} stage")
            rule.recipients = frozenset(r.lower() for r in recipients)
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for always)")
        rule.remaining = times
        with self._state.lock:
            self._state.rules.append(rule)

    def _verdict(self, stage: Stage, recipients: Iterable[str]) -> _Verdict:
        recipients = tuple(recipients)
        verdict = _Verdict()
        with self._state.lock:
            for rule in self._state.rules:
                if not rule.matches(stage, recipients):
                    continue
                if rule.action == "delay":
                    verdict.delay += rule.seconds
                elif verdict.rule is None:
                    verdict.rule = rule
                else:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
        return verdict

    def _record_command(self, number: int, verb: str) -> None:
        with self._state.lock:
            self._state.commands.append((number, verb))

    def _record_message(self, message: CapturedMessage) -> None:
        with self._state.lock:
            self._state.messages.append(message)
            self._state.lock.notify_all()

    def _closed(self, session: _CaptureSMTP) -> None:
        self._sessions.discard(session)
        with self._state.lock:
            self._state.open.discard(session.number)
            self._state.lock.notify_all()


class _CaptureSMTP(SMTP):
    """One session. Hooks the greeting, the DATA command and connection loss."""

    def __init__(self, handler: Any, *, capture: CaptureServer, number: int, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.capture = capture
        self.number = number
        # Log every command, whatever its outcome (aiosmtpd dispatches through this table).
        self._smtp_methods = {
            verb: self._logged(verb, method) for verb, method in self._smtp_methods.items()
        }

    def _logged(self, verb: str, method: Any) -> Any:
        async def logged(arg: str | None) -> None:
            self.capture._record_command(self.number, verb)
            await method(arg)

        return logged

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.capture._closed(self)

    async def _handle_client(self) -> None:
        verdict = self.capture._verdict("connect", ())
        if verdict.delay:
            await asyncio.sleep(verdict.delay)
        rule = verdict.rule
        if rule is not None:
            if rule.action == "drop":
                await self.hang_up()
            await self.push(rule.reply)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if envelope is not None and envelope.mail_from and envelope.rcpt_tos and not arg:
            reply = await self.misbehave("data", envelope.rcpt_tos)
            if reply is not None:
                await self.push(reply)
                return
        await super().smtp_DATA(arg)

    async def misbehave(self, stage: Stage, recipients: Iterable[str]) -> str | None:
        """Apply the rules for this stage: the reply to send instead, or None to go on."""
        verdict = self.capture._verdict(stage, recipients)
        if verdict.delay:
            await asyncio.sleep(verdict.delay)
        rule = verdict.rule
        if rule is None:
            return None
        if rule.action == "drop":
            await self.hang_up()
        if rule.reply.startswith("421"):
            await self.push(rule.reply)
            await self.hang_up(abort=False)
        return rule.reply

    async def hang_up(self, *, abort: bool = True) -> None:
        """Close the connection and wait to be cancelled by connection_lost."""
        _close(self.transport, abort=abort)
        await asyncio.sleep(DROP_WAIT)
        raise ConnectionResetError("the capture server hung up")


class _Handler:
    """aiosmtpd hooks: authentication gate, scripted faults, recording."""

    def __init__(self, capture: CaptureServer) -> None:
        self.capture = capture

    async def handle_MAIL(
        self, server: _CaptureSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.capture.credentials and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = await server.misbehave("mail", ())
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: _CaptureSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = await server.misbehave("rcpt", (address,))
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _CaptureSMTP, session: Any, envelope: Any) -> str:
        capture = self.capture
        message = CapturedMessage(
            envelope_from=envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content),
            connection=server.number,
            login=session.auth_data if isinstance(session.auth_data, str) else None,
            mail_options=tuple(envelope.mail_options),
            tls=session.ssl is not None or capture.implicit_tls,
        )
        verdict = capture._verdict("end_of_data", envelope.rcpt_tos)
        if verdict.delay:
            await asyncio.sleep(verdict.delay)
        rule = verdict.rule
        if rule is not None:
            if rule.action == "drop":
                if rule.record:
                    capture._record_message(message)
                await server.hang_up()
            if rule.reply.startswith("421"):
                await server.push(rule.reply)
                await server.hang_up(abort=False)
            return rule.reply
        capture._record_message(message)
        return f"250 2.0.0 OK: queued as {len(capture.messages)}"


def _close(transport: asyncio.BaseTransport | None, *, abort: bool) -> None:
    """Abort (no goodbye, unsent data discarded) or close (flush, then FIN)."""
    if transport is None:
        return
    if abort and isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


def self_signed_tls(folder: Path, host: str = HOST) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throw-away certificate for `host`: (server context, client context trusting it).

    Made with the openssl command line tool (skip the test when it is missing).
    """
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client
