"""The consent ledger: append-only rows, and the current state derived from them.

Rows are only ever inserted here (the database refuses UPDATE and DELETE on the table).
The current state comes from `queries.current_consent`, never from Python bookkeeping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session

from mailer import queries
from mailer.errors import BadInput
from mailer.models import ConsentRecord, ConsentStatus, IgnoredReason, as_utc, utcnow

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


def append(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Append ledger rows (dicts of ConsentRecord columns); recorded_at defaults to now."""
    if not rows:
        return
    now = utcnow()
    session.connection().execute(
        insert(ConsentRecord.__table__),  # type: ignore[attr-defined]
        [{"recorded_at": now, **row} for row in rows],
    )


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
    return row


def history(session: Session, contact_id: int) -> list[ConsentRecord]:
    from sqlmodel import select

    statement = (
        select(ConsentRecord)
        .where(ConsentRecord.contact_id == contact_id)
        .order_by(ConsentRecord.id)  # type: ignore[arg-type]
    )
    return list(session.exec(statement))
