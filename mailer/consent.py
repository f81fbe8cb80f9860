"""The consent ledger: append-only rows, and the current state derived from them.

Rows are only ever inserted here (the database refuses UPDATE and DELETE on the table).
The current state comes from `queries.current_consent`, never from Python bookkeeping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlmodel import Session

from mailer import events, queries
from mailer.errors import BadInput
from mailer.events import EventType, NewEvent
from mailer.models import ConsentRecord, ConsentStatus, Contact, IgnoredReason, as_utc, utcnow

PURPOSE_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MARKETING = "marketing"
TRACKING = "tracking"
ALLOWING = frozenset({ConsentStatus.GRANTED, ConsentStatus.CONFIRMED})


def check_purpose(purpose: str) -> str:
    cleaned = purpose.strip().lower()
    if not PURPOSE_PATTERN.match(cleaned):
        raise BadInput(
            f"invalid purpose {purpose!r}: use lower-case letters, digits, '-' or '_' "
            "(for example marketing, tracking)"
        )
    return cleaned


@dataclass(frozen=True)
class ConsentState:
    purpose: str
    status: ConsentStatus
    method: str
    source: str
    consent_at: datetime
    policy_version: str | None
    attestation_id: int | None
    last_withdrawn_at: datetime | None

    @property
    def allows(self) -> bool:
        return self.status in ALLOWING


class Unchanged:
    """The evidence adds nothing: the current grant is as fresh or fresher."""


UNCHANGED = Unchanged()


def judge_imported_grant(
    state: ConsentState | None, suppressed: bool, consent_at: datetime
) -> IgnoredReason | Unchanged | None:
    """May imported evidence of consent grant? None means yes.

    An import never undoes what the person said: a suppressed address stays suppressed, and
    evidence that predates their latest withdrawal is history, not consent.
    """
    if suppressed:
        return IgnoredReason.SUPPRESSED
    if state is None:
        return None
    if state.last_withdrawn_at is not None and consent_at <= state.last_withdrawn_at:
        return IgnoredReason.OLDER_THAN_WITHDRAWAL
    if state.allows and state.consent_at >= consent_at:
        return UNCHANGED
    return None


def current_states(
    session: Session, contact_ids: Iterable[int] | None = None
) -> dict[int, dict[str, ConsentState]]:
    ids = None if contact_ids is None else list(contact_ids)
    states: dict[int, dict[str, ConsentState]] = {}
    if ids is not None and not ids:
        return states
    for row in session.connection().execute(queries.current_consent(ids)):
        states.setdefault(row.contact_id, {})[row.purpose] = ConsentState(
            purpose=row.purpose,
            status=ConsentStatus(row.status),
            method=row.method,
            source=row.source,
            consent_at=as_utc(row.consent_at),
            policy_version=row.policy_version,
            attestation_id=row.attestation_id,
            last_withdrawn_at=as_utc(row.last_withdrawn_at) if row.last_withdrawn_at else None,
        )
    return states


_LOOKUP_CHUNK = 5000

# The ledger statuses a webhook consumer hears about; pending and ignored rows change nothing a
# consumer can act on (a pending sign-up is `contact.subscribed`, emitted where it is opened).
_EVENT_OF_STATUS: dict[str, EventType] = {
    ConsentStatus.GRANTED.value: EventType.CONSENT_GRANTED,
    ConsentStatus.CONFIRMED.value: EventType.CONSENT_GRANTED,
    ConsentStatus.WITHDRAWN.value: EventType.CONSENT_WITHDRAWN,
}


def ledger_event(row: Mapping[str, Any], email: str) -> NewEvent | None:
    """The consent.granted / consent.withdrawn event of a ledger row (a dict of its columns),
    or None for a status no consumer hears about."""
    status = str(row["status"])
    kind = _EVENT_OF_STATUS.get(status)
    if kind is None:
        return None
    return NewEvent(
        kind,
        {
            "contact_id": row["contact_id"],
            "email": email,
            "purpose": row["purpose"],
            "status": status,
            "method": row["method"],
            "policy_version": row.get("policy_version"),
        },
        contact_id=row["contact_id"],
    )


def _emails(session: Session, contact_ids: Iterable[int]) -> dict[int, str]:
    ids = sorted(set(contact_ids))
    contacts = Contact.__table__  # type: ignore[attr-defined]
    found: dict[int, str] = {}
    for start in range(0, len(ids), _LOOKUP_CHUNK):  # bounded IN lists (SQLite's limit)
        chunk = ids[start : start + _LOOKUP_CHUNK]
        rows = session.connection().execute(
            select(contacts.c.id, contacts.c.email).where(contacts.c.id.in_(chunk))
        )
        found.update({row.id: row.email for row in rows})
    return found


def append(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Append ledger rows (dicts of ConsentRecord columns); recorded_at defaults to now.
    Grants and withdrawals are emitted as events in the same transaction."""
    if not rows:
        return
    now = utcnow()
    session.connection().execute(
        insert(ConsentRecord.__table__),  # type: ignore[attr-defined]
        [{"recorded_at": now, **row} for row in rows],
    )
    heard = [row for row in rows if str(row["status"]) in _EVENT_OF_STATUS]
    emails = _emails(session, (row["contact_id"] for row in heard))
    found = (ledger_event(row, emails.get(row["contact_id"], "")) for row in heard)
    events.emit_many(session, [event for event in found if event is not None])


def record(
    session: Session,
    *,
    contact_id: int,
    purpose: str,
    status: ConsentStatus,
    method: str,
    source: str,
    consent_at: datetime | None = None,
    **evidence: Any,
) -> ConsentRecord:
    """Append one ledger row and return it (with its id)."""
    row = ConsentRecord(
        contact_id=contact_id,
        purpose=check_purpose(purpose),
        status=status.value,
        method=method,
        source=source,
        consent_at=consent_at or utcnow(),
        recorded_at=utcnow(),
        **evidence,
    )
    session.add(row)
    session.flush()
    contact = session.get(Contact, contact_id)  # usually already in the session
    event = ledger_event(row.model_dump(), contact.email if contact else "")
    if event is not None:
        events.emit_many(session, [event])
    return row


def history(session: Session, contact_id: int) -> list[ConsentRecord]:
    from sqlmodel import select

    statement = (
        select(ConsentRecord)
        .where(ConsentRecord.contact_id == contact_id)
        .order_by(ConsentRecord.id)  # type: ignore[arg-type]
    )
    return list(session.exec(statement))
