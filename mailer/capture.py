"""A local capture SMTP server for the demo: aiosmtpd on a loopback port, writing every message
it receives as an .eml file. Never a relay: nothing it accepts goes anywhere else."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

LOOPBACK = "127.0.0.1"


class _EmlWriter:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self._numbers = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        number = next(self._numbers)
        recipient = envelope.rcpt_tos[0] if envelope.rcpt_tos else "unknown"
        safe = "".join(ch if ch.isalnum() or ch in "@.-_" else "_" for ch in recipient)
        content = envelope.original_content or b""
        (self.folder / f"{number:05d}-{safe}.eml").write_bytes(content)
        self.count += 1
        return "250 2.0.0 Captured"


class CaptureSmtpServer:
    """Run inside an asyncio loop: `async with CaptureSmtpServer(folder) as server: server.url`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.handler = _EmlWriter(folder)
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"smtp://{LOOPBACK}:{self.port}"

    @property
    def count(self) -> int:
        return self.handler.count

    async def __aenter__(self) -> CaptureSmtpServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self.handler, hostname="capture.local", decode_data=False),
            host=LOOPBACK,
            port=0,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
