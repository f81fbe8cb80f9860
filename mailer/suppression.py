"""The suppression list: keyed hashes of addresses that must never be mailed (invariant 3).

Only the HMAC of the normalised address is stored, so the list can outlive the person
(erasure) without keeping who they were, and still stop a re-import from mailing them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from mailer import events, queries
from mailer.errors import BadInput
from mailer.events import EventType
from mailer.models import (
    ConsentRecord,
    ConsentStatus,
    Contact,
    Suppression,
    SuppressionReason,
    utcnow,
)


@dataclass(frozen=True)
class SuppressResult:
    suppression: Suppression
    created: bool


def parse_reason(raw: str) -> SuppressionReason:
    try:
        return SuppressionReason(raw.strip().lower())
    except ValueError:
        choices = ", ".join(r.value for r in SuppressionReason)
        raise BadInput(f"invalid suppression reason {raw!r}: choose one of {choices}") from None


def suppress(
    session: Session,
    address_hash: str,
    reason: SuppressionReason,
    source: str,
    note: str | None = None,
    at: datetime | None = None,
    *,
    contact_id: int | None = None,
    email: str | None = None,
) -> SuppressResult:
    """Add a suppression; suppressing again for the same reason is a no-op.

    A new suppression is emitted as `contact.suppressed` in the same transaction. The contact
    is looked up by the hash when the caller does not say who it is; pass `contact_id` without
    `email` for a contact that is being erased (the event must not name them)."""
    existing = session.exec(
        select(Suppression).where(
            Suppression.address_hash == address_hash,
            Suppression.reason == reason.value,
            col(Suppression.lifted_at).is_(None),
        )
    ).first()
    if existing is not None:
        return SuppressResult(existing, created=False)
    row = Suppression(
        address_hash=address_hash,
        reason=reason.value,
        source=source,
        note=note,
        created_at=at or utcnow(),
    )
    session.add(row)
    session.flush()
    if contact_id is None:
        contact = session.exec(select(Contact).where(Contact.email_hash == address_hash)).first()
        if contact is not None:
            contact_id, email = contact.id, contact.email
    data: dict[str, object] = {"reason": reason.value, "address_hash": address_hash}
    if contact_id is not None:
        data["contact_id"] = contact_id
        if email is not None:
            data["email"] = email
    events.emit(
        session, EventType.CONTACT_SUPPRESSED, data, contact_id=contact_id, at=row.created_at
    )
    return SuppressResult(row, created=True)


def active(session: Session, address_hashes: Iterable[str]) -> dict[str, list[str]]:
    """address hash -> reasons in force, for those of the given hashes that are suppressed."""
    hashes = list(address_hashes)
    found: dict[str, list[str]] = {}
    if not hashes:
        return found
    for row in session.connection().execute(queries.active_suppressions(hashes)):
        found.setdefault(row.address_hash, []).append(row.reason)
    return found


def lift_by_double_opt_in(
    session: Session, address_hash: str, evidence: ConsentRecord
) -> list[Suppression]:
    """A confirmed double opt-in is the one thing that lifts an unsubscribe.

    Bounces, complaints, erasures and manual suppressions stay: the person's new yes says
    nothing about a mailbox that bounced or an operator's decision.
    """
    if evidence.status != ConsentStatus.CONFIRMED.value or evidence.id is None:
        raise ValueError("only a confirmed double opt-in ledger row can lift an unsubscribe")
    lifted = list(
        session.exec(
            select(Suppression).where(
                Suppression.address_hash == address_hash,
                Suppression.reason == SuppressionReason.UNSUBSCRIBED.value,
                col(Suppression.lifted_at).is_(None),
            )
        )
    )
    now = utcnow()
    for row in lifted:
        row.lifted_at = now
        row.lifted_by_consent_id = evidence.id
        session.add(row)
    session.flush()
    return lifted


def listing(session: Session, reason: SuppressionReason | None = None) -> list[Suppression]:
    statement = select(Suppression).order_by(col(Suppression.id))
    if reason is not None:
        statement = statement.where(Suppression.reason == reason.value)
    return list(session.exec(statement))
