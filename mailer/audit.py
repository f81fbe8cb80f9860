"""The operator audit log: who changed consent, suppressions, contacts, attestations or policy,
and when.

Entries name their subject by a keyed address hash (or a row id), and their details hold
field names, purposes, reasons and counts: never an address, a name or another personal value,
so the log outlives an erasure without keeping who was erased.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from mailer.addresses import address_hash
from mailer.models import AuditEntry, ConsentRecord, Contact, SuppressionReason, utcnow

if TYPE_CHECKING:
    from mailer.config import Settings
    from mailer.imports import ImportSummary

MAX_LISTED = 10_000


def record(
    session: Session,
    operator: str,
    action: str,
    subject: str | int | None,
    details: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry in the caller's transaction, so it commits with the change."""
    entry = AuditEntry(
        at=utcnow(),
        operator=operator,
        action=action,
        subject=None if subject is None else str(subject),
        details=dict(details or {}),
    )
    session.add(entry)
    session.flush()
    return entry


def listing(
    session: Session,
    *,
    limit: int = 50,
    subject: str | None = None,
    action: str | None = None,
) -> list[AuditEntry]:
    """The newest entries first."""
    statement = select(AuditEntry).order_by(col(AuditEntry.id).desc())
    if subject is not None:
        statement = statement.where(AuditEntry.subject == subject)
    if action is not None:
        statement = statement.where(col(AuditEntry.action).startswith(action, autoescape=True))
    return list(session.exec(statement.limit(max(1, min(limit, MAX_LISTED)))))


# -- the calls the service layer makes (one line each in mailer/service.py) ------------------------


def consent_recorded(session: Session, operator: str, contact: Contact, row: ConsentRecord) -> None:
    record(
        session,
        operator,
        f"consent.{row.status}",
        contact.email_hash,
        {"purpose": row.purpose, "method": row.method, "source": row.source, "ledger_id": row.id},
    )


def suppressing(
    session: Session, settings: Settings, normalised: str, reason: SuppressionReason
) -> None:
    """Recorded before the suppression is added (a repeat is a no-op, and recorded too)."""
    hashed = address_hash(normalised, settings.suppression_key)
    record(session, settings.operator, "suppression.add", hashed, {"reason": reason.value})


def attestation_revoking(session: Session, operator: str, attestation_id: int, why: str) -> None:
    record(
        session,
        operator,
        "attestation.revoke",
        f"attestation:{attestation_id}",
        {"reason": why.strip()},
    )


def imported(engine: Engine, operator: str, summary: ImportSummary) -> None:
    """An import runs in its own transaction: its entry follows in the next one (the import's
    own row in `imports` also names the operator and the time)."""
    if not summary.written or summary.import_id is None:
        return
    with Session(engine) as session:
        record(
            session,
            operator,
            "contacts.import",
            f"import:{summary.import_id}",
            {
                "vendor": summary.vendor,
                "attestation_id": summary.attestation_id,
                "rows_read": summary.rows_read,
                "new": summary.new,
                "merged": summary.merged,
                "consent_granted": summary.consent_granted,
                "rejected": summary.rejected_total,
            },
        )
        session.commit()
