"""The SQL that matters, in one place.

`current_consent` is the only definition of "what does this person currently allow": every
other module (imports, the operator commands, `contacts show`, and later the campaign gate)
asks this query rather than re-deriving state from the ledger itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, and_, case, exists, func, literal, select

from mailer.models import ConsentRecord, ConsentStatus, Contact, Suppression

ledger = ConsentRecord.__table__  # type: ignore[attr-defined]
suppressions = Suppression.__table__  # type: ignore[attr-defined]


def current_consent(
    contact_ids: Iterable[int] | None = None, purpose: str | None = None
) -> Select[Any]:
    """One row per (contact, purpose): the latest effective ledger row, plus the time of the
    latest withdrawal for that purpose.

    "Latest" is ledger order (id), not the evidence's own timestamp: evidence older than a
    withdrawal is never appended as a grant in the first place (it is kept as `ignored`), so the
    newest row is always the one that decides. `ignored` rows are evidence only and never decide.
    """
    partition = (ledger.c.contact_id, ledger.c.purpose)
    ranked = select(
        ledger.c.id,
        ledger.c.contact_id,
        ledger.c.purpose,
        ledger.c.status,
        ledger.c.method,
        ledger.c.source,
        ledger.c.consent_at,
        ledger.c.policy_version,
        ledger.c.attestation_id,
        func.row_number()
        .over(partition_by=partition, order_by=ledger.c.id.desc())
        .label("recency"),
        func.max(case((ledger.c.status == ConsentStatus.WITHDRAWN.value, ledger.c.consent_at)))
        .over(partition_by=partition)
        .label("last_withdrawn_at"),
    ).where(ledger.c.status != ConsentStatus.IGNORED.value)
    if contact_ids is not None:
        ranked = ranked.where(ledger.c.contact_id.in_(list(contact_ids)))
    if purpose is not None:
        ranked = ranked.where(ledger.c.purpose == purpose)
    latest = ranked.subquery("ranked")
    return select(
        latest.c.id,
        latest.c.contact_id,
        latest.c.purpose,
        latest.c.status,
        latest.c.method,
        latest.c.source,
        latest.c.consent_at,
        latest.c.policy_version,
        latest.c.attestation_id,
        latest.c.last_withdrawn_at,
    ).where(latest.c.recency == 1)


def active_suppressions(address_hashes: Iterable[str]) -> Select[Any]:
    """Suppressions in force (not lifted) for the given keyed hashes."""
    return select(
        suppressions.c.address_hash, suppressions.c.reason, suppressions.c.created_at
    ).where(
        and_(
            suppressions.c.address_hash.in_(list(address_hashes)),
            suppressions.c.lifted_at.is_(None),
        )
    )


def consent_granted_by_attestation(attestation_id: int) -> Select[Any]:
    """(contact, purpose) pairs whose current consent is a grant that came from the attestation:
    exactly what revoking it must withdraw. Later consent from another source is left alone."""
    current = current_consent().subquery("current")
    return select(current.c.contact_id, current.c.purpose).where(
        and_(
            current.c.attestation_id == attestation_id,
            current.c.status.in_([ConsentStatus.GRANTED.value, ConsentStatus.CONFIRMED.value]),
        )
    )


def eligibility(purpose: str, require_double_opt_in: bool) -> Select[Any]:
    """Every contact with the reason the consent gate would exclude them for `purpose`,
    or NULL when they may be mailed. Order of the checks is the order of precedence: a
    suppression beats everything, then the ledger's current state for the purpose.
    """
    contacts = Contact.__table__  # type: ignore[attr-defined]
    current = current_consent(purpose=purpose).subquery("current")
    suppressed = exists().where(
        and_(
            suppressions.c.address_hash == contacts.c.email_hash,
            suppressions.c.lifted_at.is_(None),
        )
    )
    reason = case(
        (suppressed, "suppressed"),
        (current.c.status.is_(None), "no_consent"),
        (current.c.status == ConsentStatus.WITHDRAWN.value, "withdrawn"),
        (current.c.status == ConsentStatus.PENDING.value, "unconfirmed"),
        (
            and_(
                literal(require_double_opt_in),
                current.c.status != ConsentStatus.CONFIRMED.value,
            ),
            "unconfirmed",
        ),
        else_=None,
    )
    return (
        select(contacts.c.id, contacts.c.email, reason.label("excluded_reason"))
        .select_from(contacts.outerjoin(current, current.c.contact_id == contacts.c.id))
        .order_by(contacts.c.id)
    )
