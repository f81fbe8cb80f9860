"""`mailer inbound serve`: receive bounces, complaints and mailto unsubscribes over SMTP.

An aiosmtpd server, meant to sit behind the real MTA on a loopback port (Postfix's transport
map or a `.forward` pipe to it), that processes each mail as `mailer inbound process` does.
Every mail is answered 250 once it is handled, including those not understood (they are kept
in the aside maildir's `.unmatched` or `.failed` folder): refusing them would only make the MTA
send a bounce of a bounce. A mail that cannot be processed because of the database gets a
451, so the MTA keeps it and retries.

Bounded: mails up to MAX_MESSAGE_BYTES, MAX_RECIPIENTS per mail, MAX_CONCURRENT processed at
once (the others wait), idle sessions closed after IDLE_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import mailbox
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.exc import SQLAlchemyError

from mailer.errors import BadInput, MailerError
from mailer.inbound import InboundProcessor, InboundResult, Outcome
from mailer.inbound_files import ASIDE
from mailer.inbound_parse import MAX_MESSAGE_BYTES
from mailer.service import Mailer

logger = logging.getLogger("mailer.inbound")

DEFAULT_PORT = 2525
MAX_RECIPIENTS = 100
MAX_CONCURRENT = 4
IDLE_TIMEOUT = 60.0
COMMAND_LIMIT = 1000  # commands of one kind per session; a sender reconnects after that
SERVER_NAME = "mailer-inbound"


def check_host(host: str, allow_remote: bool) -> None:
    """Loopback only, unless asked for: this server acts on what anyone sends it."""
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise BadInput(f"--host {host!r}: give an IP address (or localhost)") from None
    if not loopback:
        raise BadInput(
            f"--host {host}: not a loopback address; put the server behind your MTA on "
            "127.0.0.1, or pass --allow-remote to listen there anyway"
        )


class _Handler:
    def __init__(
        self,
        processor: InboundProcessor,
        aside: Path | None,
        on_result: Callable[[InboundResult], None] | None,
    ) -> None:
        self.processor = processor
        self.aside = mailbox.Maildir(aside, create=True) if aside is not None else None
        self.on_result = on_result
        self.slots = asyncio.Semaphore(MAX_CONCURRENT)

    async def handle_RCPT(  # aiosmtpd calls its hooks by these names
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:
            content = envelope.content or b""
            raw = content if isinstance(content, bytes) else content.encode("utf-8", "replace")
        async with self.slots:
            try:
                result = await asyncio.to_thread(
                    self.processor.process, raw, tuple(envelope.rcpt_tos)
                )
                if result.outcome in (Outcome.UNMATCHED, Outcome.FAILED) and not result.seen:
                    await asyncio.to_thread(self._keep, raw, result.outcome)
            except (SQLAlchemyError, MailerError, OSError) as exc:
                logger.warning("inbound mail not processed, asked to retry: %s", type(exc).__name__)
                return "451 4.3.0 Cannot process the message now, try again later"
        if self.on_result is not None:
            self.on_result(result)
        return "250 2.0.0 OK"

    def _keep(self, raw: bytes, outcome: Outcome) -> None:
        if self.aside is None:
            return
        folder = ASIDE[outcome]
        target = (
            self.aside.get_folder(folder)
            if folder in self.aside.list_folders()
            else self.aside.add_folder(folder)
        )
        target.add(raw)


class InboundSmtpServer:
    """The server, as an async context manager: `port` is the bound port (0 picks a free one).

    async with InboundSmtpServer(mailer, port=0) as server:
        ...  # mail to 127.0.0.1:server.port
    """

    def __init__(
        self,
        mailer: Mailer,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        aside: Path | None = None,
        on_result: Callable[[InboundResult], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._handler = _Handler(InboundProcessor(mailer), aside, on_result)
        self._server: asyncio.Server | None = None

    def _protocol(self) -> SMTP:
        return SMTP(
            self._handler,
            data_size_limit=MAX_MESSAGE_BYTES,
            enable_SMTPUTF8=True,
            hostname=SERVER_NAME,
            ident=SERVER_NAME,
            timeout=IDLE_TIMEOUT,
            command_call_limit=COMMAND_LIMIT,
            loop=asyncio.get_running_loop(),
        )

    async def __aenter__(self) -> InboundSmtpServer:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._protocol, self.host, self.port)
        except OSError as exc:
            raise BadInput(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def serve_until(server: InboundSmtpServer, stop: asyncio.Event, ready: Any = None) -> None:
    """Run the server until `stop` is set (the CLI sets it on SIGINT and SIGTERM)."""
    async with server:
        if ready is not None:
            ready(server)
        await stop.wait()
