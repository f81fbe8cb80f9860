"""Re-permission (obligation 9): a change of purpose or a newer privacy statement needs fresh
permission. The contacts a campaign excludes as `policy_outdated` are asked to confirm, exactly
like a double opt-in: a link, a page, and only a POST confirms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from mailer.audience import gate_for
from mailer.campaigns import load_campaign
from mailer.errors import BadInput
from mailer.i18n import negotiate
from mailer.models import ConsentMethod, Contact
from mailer.recipients import Requester, open_subscription, send_confirmation
from mailer.service import Mailer
from mailer.tokens import Tokens
from mailer.transport import Transport

BATCH = 200
SOURCE = "re-permission"


@dataclass(frozen=True)
class RepermissionResult:
    campaign: str
    policy_version: str
    asked: int
    held_back: int
    not_accepted: int


def wording(policy_version: str, purpose: str) -> str:
    return (
        f"I confirm that I still want to receive {purpose} e-mail under privacy statement "
        f"version {policy_version}."
    )


async def ask_outdated(mailer: Mailer, path: Path, transport: Transport) -> RepermissionResult:
    """Send a re-permission mail to exactly the contacts the campaign's gate excludes as
    policy_outdated; nothing else changes until one of them confirms."""
    definition = load_campaign(path)
    version = definition.min_policy_version
    if version is None:
        raise BadInput(
            f"{path}: min_policy_version: missing; re-permission asks for consent under that "
            "version"
        )
    tokens = Tokens(mailer.settings.secret_keys)
    asked = held_back = not_accepted = 0
    last_id = 0
    while True:
        with mailer.engine.connect() as conn:
            gate = gate_for(definition, mailer.settings).subquery("gate")
            ids = [
                row.id
                for row in conn.execute(
                    select(gate.c.id)
                    .where(gate.c.excluded_reason == "policy_outdated", gate.c.id > last_id)
                    .order_by(gate.c.id)
                    .limit(BATCH)
                )
            ]
        if not ids:
            break
        last_id = ids[-1]
        for contact_id in ids:
            with mailer.session() as session:
                contact = session.get(Contact, contact_id)
                if contact is None:
                    continue
                mail = open_subscription(
                    session,
                    mailer.settings,
                    tokens,
                    contact,
                    purposes=(definition.purpose,),
                    policy_version=version,
                    wording=wording(version, definition.purpose),
                    source=SOURCE,
                    method=ConsentMethod.REPERMISSION,
                    requester=Requester(),
                    language=negotiate(contact.locale),
                )
            if mail is None:
                held_back += 1
            elif await send_confirmation(transport, mail):
                asked += 1
            else:
                not_accepted += 1
    return RepermissionResult(definition.name, version, asked, held_back, not_accepted)
