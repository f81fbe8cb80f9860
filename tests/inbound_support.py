"""What the inbound-mail tests share: a campaign sent through the capture server, the
hand-written samples in tests/samples/inbound/ filled in around what arrived there, maildirs,
and what the CLI shows afterwards."""

from __future__ import annotations

import json
import mailbox
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from mailer.message import parse_verp
from mailer.models import Event
from mailer.service import Mailer
from tests.conftest import CliResult
from tests.recipient_support import grant, recipients_of
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

SAMPLES = Path(__file__).parent / "samples" / "inbound"
Cli = Callable[..., CliResult]


@dataclass(frozen=True)
class Sent:
    """One delivery as it arrived at the capture server."""

    recipient: str
    verp: str  # the envelope sender
    message_id: str
    unsubscribe: str  # the List-Unsubscribe mailto: address
    delivery_id: int


async def send_to(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    *emails: str,
    name: str = "autumn",
    grant_marketing: bool = True,
) -> dict[str, Sent]:
    if grant_marketing:
        grant(mailer, *emails)
    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name=name), smtp_server)
    arrived = {}
    for captured in smtp_server.messages:
        message = captured.parse()
        mailto = re.search(r"<mailto:([^>]+)>", str(message["List-Unsubscribe"]))
        delivery_id = parse_verp(captured.envelope_from, mailer.settings.verp_key)
        assert mailto and delivery_id
        arrived[captured.recipients[0]] = Sent(
            captured.recipients[0],
            captured.envelope_from,
            str(message["Message-ID"]),
            mailto[1],
            delivery_id,
        )
    assert set(arrived) == set(emails)
    return arrived


def sample(name: str, sent: Sent | None = None, **values: str) -> bytes:
    """A sample with a delivery's values filled in; each call is a distinct mail."""
    text = (SAMPLES / name).read_text(encoding="utf-8").replace("@@ID@@", uuid.uuid4().hex)
    if sent is not None:
        values = {
            "VERP": sent.verp,
            "RECIPIENT": sent.recipient,
            "MESSAGE_ID": sent.message_id,
            "UNSUBSCRIBE": sent.unsubscribe,
            **values,
        }
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    assert "@@" not in text, "a placeholder was left unfilled"
    return text.replace("\n", "\r\n").encode("utf-8")


def maildir(root: Path, *mails: bytes) -> Path:
    path = root / "Maildir"
    path.parent.mkdir(parents=True, exist_ok=True)
    box = mailbox.Maildir(path, create=True)
    for raw in mails:
        box.add(raw)
    return path


def mails_in(path: Path) -> list[bytes]:
    box = mailbox.Maildir(path, create=False)
    return [box.get_bytes(key) for key in box.iterkeys()]


def contact_json(cli: Cli, address: str) -> dict[str, Any]:
    shown = cli("contacts", "show", address, "--json")
    assert shown.exit_code == 0, shown.stderr
    data: dict[str, Any] = json.loads(shown.stdout)
    return data


def suppression_reasons(cli: Cli, address: str) -> list[str]:
    data = contact_json(cli, address)
    return [s["reason"] for s in data["suppressions"] if not s["lifted_at"]]


def events_of(mailer: Mailer, kind: str) -> list[dict[str, Any]]:
    with mailer.session() as session:
        rows = session.exec(select(Event).where(Event.type == kind).order_by(col(Event.id)))
        return [dict(row.data) for row in rows]


async def next_campaign_reaches(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path], name: str
) -> set[str]:
    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name=name), smtp_server)
    return recipients_of(smtp_server)


# -- hard bounces ---------------------------------------------------------------------------------
