"""The privacy officer's side (obligations 7 and 10): access, correction, erasure, requests.

    export            everything held about one person, as one JSON-able document
    write_csv_zip     the same as a zip of CSV files, safe against spreadsheet formulas
    record_export     an export was handed over: audit it, answer open access requests
    record_request    a data-subject request received (access, correction or erasure)
    correct           change a contact's name, locale or attributes, audited
    erase             remove the person from every table in one transaction; their address
                      stays suppressed as a keyed hash, their campaign counts as anonymous tallies

Erasure reduces what a person contributed to campaign reports to per-campaign counts in
`campaign_tallies` (which the report adds back), deletes their deliveries and engagement events,
and deletes their consent ledger rows: the ledger's DELETE guard lets exactly the contact named
by an `erasures` row written in the same transaction through (migration 0004).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from sqlmodel import select as model_select

from mailer import audit, consent, queries, suppression, tallies
from mailer.addresses import address_hash, normalise_address
from mailer.contacts import get_by_email, normalise_locale, tags_of
from mailer.csvsafe import safe_row
from mailer.errors import BadInput, DatabaseError, NotFound
from mailer.events import EventType, emit, scrub_contact, timestamp_text
from mailer.models import (
    Attestation,
    AuditEntry,
    Campaign,
    CampaignLink,
    ConsentRecord,
    Contact,
    ContactSource,
    ContactTag,
    Delivery,
    DeliveryStatus,
    EngagementEvent,
    Erasure,
    IdentityCheck,
    ImportBatch,
    PrivacyRequest,
    PrivacyRequestKind,
    Subscription,
    Suppression,
    SuppressionReason,
    as_utc,
    utcnow,
)
from mailer.queries import UNSUBSCRIBE_METHODS

if TYPE_CHECKING:
    from mailer.service import Mailer

EXPORT_FORMAT = "mailer.privacy-export/1"
ANSWER_WITHIN = timedelta(days=30)
MAX_NAME = 255
MAX_ATTRIBUTE = 2000
MAX_NOTE = 2000
MAX_CHANNEL = 64
CORRECTABLE = ("name", "first_name", "last_name", "locale")
ATTRIBUTE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
EMAIL_NOT_CORRECTABLE = (
    "the address cannot be corrected: it is the contact's identity. Consent, the suppression "
    "list (a keyed hash of the address) and the delivery history all belong to the mailbox "
    "they were given for, and consent for one mailbox is no consent for another. Record the "
    "new address as a new contact with its own consent (sign-up, import with evidence, or "
    "`mailer consent grant`), and withdraw or erase the old one"
)

contacts_t = Contact.__table__  # type: ignore[attr-defined]
tags_t = ContactTag.__table__  # type: ignore[attr-defined]
sources_t = ContactSource.__table__  # type: ignore[attr-defined]
ledger_t = ConsentRecord.__table__  # type: ignore[attr-defined]
suppressions_t = Suppression.__table__  # type: ignore[attr-defined]
deliveries_t = Delivery.__table__  # type: ignore[attr-defined]
events_t = EngagementEvent.__table__  # type: ignore[attr-defined]
subscriptions_t = Subscription.__table__  # type: ignore[attr-defined]
requests_t = PrivacyRequest.__table__  # type: ignore[attr-defined]
erasures_t = Erasure.__table__  # type: ignore[attr-defined]


def _iso(value: datetime | date | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    return value.isoformat()


def _identify(mailer: Mailer, email: str) -> tuple[str, str]:
    normalised = normalise_address(email)
    return normalised, address_hash(normalised, mailer.settings.suppression_key)


def _not_found(session: Session, normalised: str, hashed: str) -> NotFound:
    """No contact: say so, and what (if anything) is still held as a keyed hash."""
    held: list[str] = []
    erased = session.exec(
        model_select(Erasure).where(Erasure.address_hash == hashed).order_by(col(Erasure.id).desc())
    ).first()
    if erased is not None:
        held.append(f"it was erased on {as_utc(erased.erased_at):%Y-%m-%d}")
    reasons = suppression.active(session, [hashed]).get(hashed, [])
    if reasons:
        held.append(f"its keyed hash is on the suppression list ({', '.join(sorted(reasons))})")
    detail = f" ({'; '.join(held)}; no other data is held)" if held else ""
    return NotFound(f"no contact with address {normalised}{detail}")


def _lock(session: Session, contact_id: int) -> None:
    """Serialise with other changes to this person (a row lock on PostgreSQL, the write lock on
    SQLite): a no-op UPDATE, so later reads in the transaction see what others committed."""
    session.connection().execute(
        update(contacts_t)
        .where(contacts_t.c.id == contact_id)
        .values(updated_at=contacts_t.c.updated_at)
    )


# -- access --------------------------------------------------------------------------------------


def export(mailer: Mailer, email: str) -> dict[str, Any]:
    """Everything held about the person, as one JSON-able document. Changes nothing."""
    normalised, hashed = _identify(mailer, email)
    with mailer.session() as session:
        contact = get_by_email(session, normalised)
        if contact is None:
            raise _not_found(session, normalised, hashed)
        assert contact.id is not None
        return _collect(session, contact)


def _collect(session: Session, contact: Contact) -> dict[str, Any]:
    assert contact.id is not None
    cid = contact.id
    conn = session.connection()
    ledger = consent.history(session, cid)
    sources = list(
        session.exec(
            model_select(ImportBatch, ContactSource.row_number)
            .join(ContactSource, col(ContactSource.import_id) == col(ImportBatch.id))
            .where(ContactSource.contact_id == cid)
            .order_by(col(ImportBatch.id))
        )
    )
    attestation_ids = {r.attestation_id for r in ledger if r.attestation_id is not None} | {
        b.attestation_id for b, _ in sources if b.attestation_id is not None
    }
    attestations = list(
        session.exec(
            model_select(Attestation)
            .where(col(Attestation.id).in_(sorted(attestation_ids)))
            .order_by(col(Attestation.id))
        )
    )
    campaigns_t = Campaign.__table__  # type: ignore[attr-defined]
    links_t = CampaignLink.__table__  # type: ignore[attr-defined]
    deliveries = conn.execute(
        select(deliveries_t, campaigns_t.c.name.label("campaign"))
        .join(campaigns_t, campaigns_t.c.id == deliveries_t.c.campaign_id)
        .where(deliveries_t.c.contact_id == cid)
        .order_by(deliveries_t.c.id)
    ).all()
    delivery_ids = [d.id for d in deliveries]
    events = conn.execute(
        select(events_t, campaigns_t.c.name.label("campaign"), links_t.c.url.label("link_url"))
        .join(campaigns_t, campaigns_t.c.id == events_t.c.campaign_id)
        .outerjoin(
            links_t,
            and_(
                links_t.c.campaign_id == events_t.c.campaign_id,
                links_t.c.position == events_t.c.link_position,
            ),
        )
        .where(or_(events_t.c.contact_id == cid, events_t.c.delivery_id.in_(delivery_ids)))
        .order_by(events_t.c.id)
    ).all()
    suppressions = list(
        session.exec(
            model_select(Suppression)
            .where(Suppression.address_hash == contact.email_hash)
            .order_by(col(Suppression.id))
        )
    )
    subscriptions = list(
        session.exec(
            model_select(Subscription)
            .where(Subscription.contact_id == cid)
            .order_by(col(Subscription.id))
        )
    )
    requests = list(
        session.exec(
            model_select(PrivacyRequest)
            .where(
                or_(
                    col(PrivacyRequest.contact_id) == cid,
                    col(PrivacyRequest.address_hash) == contact.email_hash,
                )
            )
            .order_by(col(PrivacyRequest.id))
        )
    )
    audit_entries = list(
        session.exec(
            model_select(AuditEntry)
            .where(AuditEntry.subject == contact.email_hash)
            .order_by(col(AuditEntry.id))
        )
    )
    states = consent.current_states(session, [cid]).get(cid, {})
    return {
        "format": EXPORT_FORMAT,
        "generated_at": _iso(utcnow()),
        "contact": {
            "email": contact.email,
            "name": contact.name,
            "first_name": contact.first_name,
            "last_name": contact.last_name,
            "locale": contact.locale,
            "created_at": _iso(contact.created_at),
            "updated_at": _iso(contact.updated_at),
        },
        "attributes": dict(contact.attributes or {}),
        "tags": tags_of(session, cid),
        "sources": [
            {
                "import_id": batch.id,
                "file": batch.filename,
                "row": row_number,
                "vendor": batch.vendor,
                "attestation_id": batch.attestation_id,
                "imported_at": _iso(batch.started_at),
                "operator": batch.operator,
            }
            for batch, row_number in sources
        ],
        "current_consent": {
            purpose: {
                "status": state.status.value,
                "allows": state.allows,
                "since": _iso(state.consent_at),
                "method": state.method,
                "source": state.source,
                "policy_version": state.policy_version,
                "attestation_id": state.attestation_id,
            }
            for purpose, state in sorted(states.items())
        },
        "consent": [
            {
                "id": r.id,
                "purpose": r.purpose,
                "status": r.status,
                "method": r.method,
                "source": r.source,
                "policy_version": r.policy_version,
                "consent_at": _iso(r.consent_at),
                "recorded_at": _iso(r.recorded_at),
                "ip_masked": r.ip_masked,
                "user_agent": r.user_agent,
                "wording": r.wording,
                "import_id": r.import_id,
                "attestation_id": r.attestation_id,
                "evidence": r.evidence,
                "note": r.note,
                "operator": r.operator,
            }
            for r in ledger
        ],
        "attestations": [
            {
                "id": a.id,
                "vendor": a.vendor,
                "vendor_contact": a.vendor_contact,
                "lawful_basis": a.lawful_basis,
                "purposes": list(a.purposes),
                "collection_method": a.collection_method,
                "collected_from": _iso(a.collected_from),
                "collected_to": _iso(a.collected_to),
                "consent_wording": a.consent_wording,
                "signed_by": a.signed_by,
                "signed_at": _iso(a.signed_at),
                "document_sha256": a.document_sha256,
                "revoked_at": _iso(a.revoked_at),
                "revoke_reason": a.revoke_reason,
            }
            for a in attestations
        ],
        "deliveries": [
            {
                "id": d.id,
                "campaign": d.campaign,
                "status": d.status,
                "tracking": bool(d.tracking),
                "excluded_reason": d.excluded_reason,
                "queued_at": _iso(d.queued_at),
                "sending_at": _iso(d.sending_at),
                "finished_at": _iso(d.finished_at),
                "attempts": d.attempts,
                "smtp_code": d.smtp_code,
                "smtp_response": d.smtp_response,
                "message_id": d.message_id,
            }
            for d in deliveries
        ],
        "engagement": [
            {
                "id": e.id,
                "campaign": e.campaign,
                "delivery_id": e.delivery_id,
                "kind": e.kind,
                "occurred_at": _iso(e.occurred_at),
                "link_position": e.link_position,
                "link_url": e.link_url,
                "machine": bool(e.machine),
                "machine_reason": e.machine_reason,
                "ip_masked": e.ip_masked,
                "user_agent": e.user_agent,
            }
            for e in events
        ],
        "suppressions": [
            {
                "id": s.id,
                "address_hash": s.address_hash,
                "reason": s.reason,
                "source": s.source,
                "note": s.note,
                "created_at": _iso(s.created_at),
                "lifted_at": _iso(s.lifted_at),
                "lifted_by_consent_id": s.lifted_by_consent_id,
            }
            for s in suppressions
        ],
        "subscriptions": [
            {
                "id": s.id,
                "purposes": list(s.purposes),
                "status": s.status,
                "policy_version": s.policy_version,
                "wording": s.wording,
                "source": s.source,
                "requested_at": _iso(s.requested_at),
                "mailed_at": _iso(s.mailed_at),
                "confirmed_at": _iso(s.confirmed_at),
                "ip_masked": s.ip_masked,
                "user_agent": s.user_agent,
            }
            for s in subscriptions
        ],
        "requests": [_request_dict(r) for r in requests],
        "audit": [
            {
                "at": _iso(a.at),
                "operator": a.operator,
                "action": a.action,
                "details": dict(a.details or {}),
            }
            for a in audit_entries
        ],
    }


def _request_dict(r: PrivacyRequest) -> dict[str, Any]:
    return {
        "id": r.id,
        "kind": r.kind,
        "channel": r.channel,
        "received_at": _iso(r.received_at),
        "identity_check": r.identity_check,
        "verified_at": _iso(r.verified_at),
        "due_at": _iso(r.due_at),
        "completed_at": _iso(r.completed_at),
        "outcome": r.outcome,
        "operator": r.operator,
        "note": r.note,
    }


def _cell(value: Any) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ";".join(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow(safe_row(_cell(v) for v in row))
    # with a byte-order mark, so spreadsheets read the UTF-8 as UTF-8
    return buffer.getvalue().encode("utf-8-sig")


def csv_files(document: Mapping[str, Any]) -> dict[str, bytes]:
    """The export as CSV files (name -> bytes); every cell is formula-safe."""
    files: dict[str, bytes] = {
        "contact.csv": _csv_bytes(("field", "value"), document["contact"].items()),
        "attributes.csv": _csv_bytes(("key", "value"), sorted(document["attributes"].items())),
        "tags.csv": _csv_bytes(("tag",), ([t] for t in document["tags"])),
        "current_consent.csv": _csv_bytes(
            ("purpose", "status", "allows", "since", "method", "source", "policy_version"),
            (
                [
                    p,
                    s["status"],
                    s["allows"],
                    s["since"],
                    s["method"],
                    s["source"],
                    s["policy_version"],
                ]
                for p, s in document["current_consent"].items()
            ),
        ),
    }
    for section in (
        "sources",
        "consent",
        "attestations",
        "deliveries",
        "engagement",
        "suppressions",
        "subscriptions",
        "requests",
        "audit",
    ):
        rows: list[Mapping[str, Any]] = document[section]
        header = list(dict.fromkeys(key for row in rows for key in row)) or ["none"]
        files[f"{section}.csv"] = _csv_bytes(
            header, ([row.get(key) for key in header] for row in rows)
        )
    return files


def write_csv_zip(document: Mapping[str, Any], path: Path) -> None:
    """A zip of the CSV files, readable by its owner only (it holds personal data)."""
    buffer = io.BytesIO()
    stamp = datetime.fromisoformat(document["generated_at"]).timetuple()[:6]
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in csv_files(document).items():
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    _write_private(path, buffer.getvalue())


def write_json(document: Mapping[str, Any], path: Path) -> None:
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    _write_private(path, text.encode("utf-8"))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def record_export(mailer: Mailer, email: str, fmt: str) -> list[int]:
    """An export was handed over: audit it, and answer the person's open access requests whose
    identity was verified. Returns the ids of the requests answered."""
    normalised, hashed = _identify(mailer, email)
    now = utcnow()
    with mailer.session() as session:
        contact = get_by_email(session, normalised)
        answered = _complete_open(
            session,
            hashed,
            contact.id if contact else None,
            kinds=(PrivacyRequestKind.ACCESS,),
            outcome=f"answered: export ({fmt})",
            now=now,
            verified_only=True,
        )
        audit.record(
            session,
            mailer.settings.operator,
            "privacy.export",
            hashed,
            {"format": fmt, "requests_answered": answered},
        )
        return answered


# -- the requests register -----------------------------------------------------------------------


def parse_kind(raw: str) -> PrivacyRequestKind:
    try:
        return PrivacyRequestKind(raw.strip().lower())
    except ValueError:
        choices = ", ".join(k.value for k in PrivacyRequestKind)
        raise BadInput(f"invalid request kind {raw!r}: choose one of {choices}") from None


def _single_line(value: str | None, what: str, limit: int) -> str | None:
    if value is None or not value.strip():
        return None
    cleaned = value.strip()
    if _CONTROL.search(cleaned):
        raise BadInput(f"{what}: line breaks and control characters are not allowed")
    if len(cleaned) > limit:
        raise BadInput(f"{what}: at most {limit} characters")
    return cleaned


def record_request(
    mailer: Mailer,
    email: str,
    kind: PrivacyRequestKind | str,
    *,
    channel: str,
    verified: bool,
    note: str | None = None,
    received_at: datetime | None = None,
) -> PrivacyRequest:
    """Register an access, correction or erasure request, due 30 days after it was received.

    The person need not be a contact (a request about an address we do not hold is answered
    too); the request keeps the keyed hash of the address, and a link to the contact while
    there is one. `verified` says the person's identity was checked (by the operator, or by a
    confirmation link the person followed)."""
    normalised, hashed = _identify(mailer, email)
    kind = parse_kind(kind) if isinstance(kind, str) else kind
    cleaned_channel = _single_line(channel, "channel", MAX_CHANNEL)
    if cleaned_channel is None:
        raise BadInput("channel is required: how the request came in (mail, phone, letter, ...)")
    cleaned_note = _single_line(note, "note", MAX_NOTE)
    now = utcnow()
    received = as_utc(received_at) if received_at else now
    if received > now + timedelta(minutes=5):
        raise BadInput("a request cannot have been received in the future")
    with mailer.session() as session:
        contact = get_by_email(session, normalised)
        row = PrivacyRequest(
            kind=kind.value,
            contact_id=contact.id if contact else None,
            address_hash=hashed,
            channel=cleaned_channel,
            received_at=received,
            identity_check=(IdentityCheck.VERIFIED if verified else IdentityCheck.PENDING).value,
            verified_at=now if verified else None,
            due_at=received + ANSWER_WITHIN,
            operator=mailer.settings.operator,
            note=cleaned_note,
        )
        session.add(row)
        session.flush()
        audit.record(
            session,
            mailer.settings.operator,
            "privacy.request",
            hashed,
            {
                "request_id": row.id,
                "kind": kind.value,
                "channel": cleaned_channel,
                "verified": verified,
            },
        )
        return row


def record_request_for_contact(
    mailer: Mailer,
    contact_id: int,
    kind: PrivacyRequestKind | str,
    *,
    channel: str,
    verified: bool,
    note: str | None = None,
) -> PrivacyRequest:
    """record_request for a contact known by id (the preference centre knows the id)."""
    with mailer.session() as session:
        contact = session.get(Contact, contact_id)
        if contact is None:
            raise NotFound(f"no contact {contact_id}")
        email = contact.email
    return record_request(mailer, email, kind, channel=channel, verified=verified, note=note)


def verify_request(mailer: Mailer, request_id: int) -> PrivacyRequest:
    """The person's identity was checked."""
    with mailer.session() as session:
        row = session.get(PrivacyRequest, request_id)
        if row is None:
            raise NotFound(f"no privacy request {request_id}")
        if row.identity_check != IdentityCheck.VERIFIED.value:
            row.identity_check = IdentityCheck.VERIFIED.value
            row.verified_at = utcnow()
            session.add(row)
            audit.record(
                session,
                mailer.settings.operator,
                "privacy.request.verify",
                row.address_hash,
                {"request_id": request_id},
            )
        return row


def complete_request(mailer: Mailer, request_id: int, outcome: str) -> PrivacyRequest:
    """Close a request by hand (for example: answered by letter, or refused with reasons)."""
    cleaned = _single_line(outcome, "outcome", 255)
    if cleaned is None:
        raise BadInput("--outcome is required: say how the request was answered")
    with mailer.session() as session:
        row = session.get(PrivacyRequest, request_id)
        if row is None:
            raise NotFound(f"no privacy request {request_id}")
        if row.completed_at is not None:
            raise BadInput(
                f"privacy request {request_id} was completed on "
                f"{as_utc(row.completed_at):%Y-%m-%d} ({row.outcome})"
            )
        row.completed_at = utcnow()
        row.outcome = cleaned
        session.add(row)
        audit.record(
            session,
            mailer.settings.operator,
            "privacy.request.complete",
            row.address_hash,
            {"request_id": request_id},
        )
        return row


@dataclass(frozen=True)
class RequestView:
    request: PrivacyRequest
    email: str | None  # None once the contact is erased (or for an address never held)

    def overdue(self, now: datetime) -> bool:
        return self.request.completed_at is None and as_utc(self.request.due_at) < now

    @property
    def state(self) -> str:
        return "open" if self.request.completed_at is None else "done"


def list_requests(mailer: Mailer, *, open_only: bool = False) -> list[RequestView]:
    """Open requests first, soonest due first; then the completed ones, newest first."""
    with mailer.session() as session:
        statement = model_select(PrivacyRequest, Contact.email).outerjoin(
            Contact, col(Contact.id) == col(PrivacyRequest.contact_id)
        )
        if open_only:
            statement = statement.where(col(PrivacyRequest.completed_at).is_(None))
        rows = [RequestView(r, email) for r, email in session.exec(statement)]
    open_rows = sorted(
        (v for v in rows if v.request.completed_at is None),
        key=lambda v: (as_utc(v.request.due_at), v.request.id or 0),
    )
    done = sorted(
        (v for v in rows if v.request.completed_at is not None),
        key=lambda v: -(v.request.id or 0),
    )
    return [*open_rows, *done]


def _complete_open(
    session: Session,
    hashed: str,
    contact_id: int | None,
    *,
    kinds: Sequence[PrivacyRequestKind],
    outcome: str,
    now: datetime,
    verified_only: bool,
) -> list[int]:
    person = requests_t.c.address_hash == hashed
    if contact_id is not None:
        person = or_(person, requests_t.c.contact_id == contact_id)
    conditions = [
        requests_t.c.completed_at.is_(None),
        requests_t.c.kind.in_([k.value for k in kinds]),
        person,
    ]
    if verified_only:
        conditions.append(requests_t.c.identity_check == IdentityCheck.VERIFIED.value)
    conn = session.connection()
    ids = [row.id for row in conn.execute(select(requests_t.c.id).where(*conditions))]
    if ids:
        conn.execute(
            update(requests_t)
            .where(requests_t.c.id.in_(ids))
            .values(completed_at=now, outcome=outcome)
        )
    return sorted(ids)


# -- correction ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correction:
    email: str
    changed: list[str]  # field names, e.g. ["name", "attributes.city"]
    unchanged: list[str]
    requests_completed: list[int] = field(default_factory=list)


def parse_assignments(assignments: Sequence[str]) -> dict[str, str]:
    """`field=value` pairs (an empty value clears the field), each field at most once."""
    if not assignments:
        raise BadInput("nothing to correct: give --set FIELD=VALUE (one or more)")
    parsed: dict[str, str] = {}
    for raw in assignments:
        name, sep, value = raw.partition("=")
        name = name.strip()
        if not sep or not name:
            raise BadInput(f"--set {raw!r}: expected FIELD=VALUE")
        if name in parsed:
            raise BadInput(f"--set {name}: given twice")
        if name == "email":
            raise BadInput(EMAIL_NOT_CORRECTABLE)
        if name not in CORRECTABLE and not name.startswith("attributes."):
            allowed = ", ".join((*CORRECTABLE, "attributes.KEY"))
            raise BadInput(f"--set {name}: not a field that can be corrected; use {allowed}")
        parsed[name] = value
    return parsed


def _checked_value(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if _CONTROL.search(value):
        raise BadInput(f"--set {name}: line breaks and control characters are not allowed")
    if name == "locale":
        try:
            return normalise_locale(value)
        except ValueError:
            raise BadInput(
                f"--set locale: {value!r} is not a language tag (for example nl, nl-NL, en)"
            ) from None
    limit = MAX_ATTRIBUTE if name.startswith("attributes.") else MAX_NAME
    if len(value) > limit:
        raise BadInput(f"--set {name}: at most {limit} characters")
    return value


def correct(mailer: Mailer, email: str, assignments: Sequence[str]) -> Correction:
    """Correct a contact's name, first or last name, locale or custom attributes.

    Every change is in the audit log with the operator and the field names (not the values:
    the log outlives an erasure). Open verified correction requests of the person are
    answered."""
    parsed = parse_assignments(assignments)
    values = {name: _checked_value(name, raw) for name, raw in parsed.items()}
    normalised, hashed = _identify(mailer, email)
    with mailer.session() as session:
        contact = get_by_email(session, normalised)
        if contact is None:
            raise _not_found(session, normalised, hashed)
        assert contact.id is not None
        _lock(session, contact.id)
        session.refresh(contact)
        attributes = dict(contact.attributes or {})
        changed: list[str] = []
        unchanged: list[str] = []
        for name, value in values.items():
            if name.startswith("attributes."):
                key = name.removeprefix("attributes.")
                if key not in attributes and not ATTRIBUTE_KEY.match(key):
                    raise BadInput(
                        f"--set {name}: an attribute name is a letter or '_' followed by up to "
                        "63 letters, digits, '_', '.' or '-'"
                    )
                if attributes.get(key) == value or (value is None and key not in attributes):
                    unchanged.append(name)
                    continue
                if value is None:
                    del attributes[key]
                else:
                    attributes[key] = value
                changed.append(name)
            elif getattr(contact, name) == value:
                unchanged.append(name)
            else:
                setattr(contact, name, value)
                changed.append(name)
        completed: list[int] = []
        if changed:
            contact.attributes = attributes
            contact.updated_at = utcnow()
            session.add(contact)
            session.flush()
            completed = _complete_open(
                session,
                hashed,
                contact.id,
                kinds=(PrivacyRequestKind.CORRECTION,),
                outcome="corrected: " + ", ".join(changed),
                now=utcnow(),
                verified_only=True,
            )
            audit.record(
                session,
                mailer.settings.operator,
                "privacy.correct",
                hashed,
                {"fields": changed, "requests_completed": completed},
            )
            emit(
                session,
                EventType.CONTACT_UPDATED,
                {"contact_id": contact.id, "email": contact.email, "changes": changed},
                contact_id=contact.id,
            )
        return Correction(contact.email, changed, unchanged, completed)


# -- erasure -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErasureReport:
    erasure_id: int
    address_hash: str
    removed: dict[str, int]
    suppressed_now: bool  # False when the address was already suppressed as erased


def erase(mailer: Mailer, email: str) -> ErasureReport:
    """Remove everything held about the person, in one transaction, keeping their address
    suppressed (reason `erased`) as a keyed hash so a re-import never mails them again."""
    normalised, hashed = _identify(mailer, email)
    operator = mailer.settings.operator
    try:
        with mailer.session() as session:
            contact = get_by_email(session, normalised)
            if contact is None:
                raise _not_found(session, normalised, hashed)
            assert contact.id is not None
            _lock(session, contact.id)
            contact_id = contact.id  # the instance is gone after erase_contact
            erasure_id, removed = erase_contact(
                session, contact_id, hashed, reason="request", operator=operator
            )
            result = suppression.suppress(
                session,
                hashed,
                SuppressionReason.ERASED,
                source=f"erasure by {operator}",
                contact_id=contact_id,  # and no address: the event must not name them
            )
            audit.record(
                session,
                operator,
                "privacy.erase",
                hashed,
                {"erasure_id": erasure_id, "removed": removed},
            )
            return ErasureReport(erasure_id, hashed, removed, result.created)
    except IntegrityError as exc:
        raise DatabaseError(
            "the erasure was rolled back, nothing changed: a table still refers to the contact "
            f"({str(exc.orig).strip().splitlines()[0] if exc.orig else exc})"
        ) from exc


def erase_contact(
    session: Session, contact_id: int, hashed: str, *, reason: str, operator: str
) -> tuple[int, dict[str, int]]:
    """Delete one contact and everything that refers to it, in the caller's transaction;
    returns the erasure's id and what was removed, by kind. The caller suppresses (or not)."""
    conn = session.connection()
    # first: opens and clicks being recorded for this person are written before we look, and
    # none is written after (queries.py, "recording against erasure")
    queries.lock_engagement_for_erasure(conn)
    now = utcnow()
    erasure_id = int(
        conn.execute(
            insert(erasures_t)
            .values(
                address_hash=hashed,
                reason=reason,
                erased_at=now,
                operator=operator,
                contact_id=contact_id,  # lets the ledger guard pass these rows, cleared below
                removed={},
            )
            .returning(erasures_t.c.id)
        ).scalar_one()
    )
    removed: Counter[str] = Counter()
    contribution = _contribution(conn, contact_id)
    tallies.add(conn, contribution)
    own_deliveries = select(deliveries_t.c.id).where(deliveries_t.c.contact_id == contact_id)
    removed["engagement_events"] = _deleted(
        conn,
        delete(events_t).where(
            or_(events_t.c.contact_id == contact_id, events_t.c.delivery_id.in_(own_deliveries))
        ),
    )
    removed["deliveries"] = _deleted(
        conn, delete(deliveries_t).where(deliveries_t.c.contact_id == contact_id)
    )
    own_ledger = select(ledger_t.c.id).where(ledger_t.c.contact_id == contact_id)
    # an unsubscribe lifted by the person's own double opt-in points at a ledger row: it goes
    # (it was no longer in force); every suppression in force stays
    removed["lifted_suppressions"] = _deleted(
        conn,
        delete(suppressions_t).where(suppressions_t.c.lifted_by_consent_id.in_(own_ledger)),
    )
    removed["suppression_notes"] = _deleted(
        conn,
        update(suppressions_t)
        .where(suppressions_t.c.address_hash == hashed, suppressions_t.c.note.is_not(None))
        .values(note=None),
    )
    removed["consent_records"] = _deleted(
        conn, delete(ledger_t).where(ledger_t.c.contact_id == contact_id)
    )
    removed["subscriptions"] = _deleted(
        conn, delete(subscriptions_t).where(subscriptions_t.c.contact_id == contact_id)
    )
    removed["tags"] = _deleted(conn, delete(tags_t).where(tags_t.c.contact_id == contact_id))
    removed["sources"] = _deleted(
        conn, delete(sources_t).where(sources_t.c.contact_id == contact_id)
    )
    person = or_(requests_t.c.contact_id == contact_id, requests_t.c.address_hash == hashed)
    outcome = "erased" if reason == "request" else "erased (retention)"
    conn.execute(
        update(requests_t)
        .where(person, requests_t.c.completed_at.is_(None))
        .values(completed_at=now, outcome=outcome)
    )
    removed["request_links"] = _deleted(
        conn,
        update(requests_t)
        .where(person, or_(requests_t.c.contact_id.is_not(None), requests_t.c.note.is_not(None)))
        .values(contact_id=None, note=None),
    )
    removed["contact"] = _deleted(conn, delete(contacts_t).where(contacts_t.c.id == contact_id))
    # Their earlier events (and deliveries still waiting, which are built from the event row)
    # lose everything personal; the erasure itself is an event with ids only.
    scrub_contact(conn, contact_id)
    emit(
        conn,
        EventType.CONTACT_ERASED,
        {"contact_id": contact_id, "erased_at": timestamp_text(now), "reason": reason},
        contact_id=contact_id,
        at=now,
    )
    summary = {key: count for key, count in sorted(removed.items()) if count}
    conn.execute(
        update(erasures_t)
        .where(erasures_t.c.id == erasure_id)
        .values(contact_id=None, removed=summary)
    )
    session.expire_all()
    return erasure_id, summary


def _deleted(conn: Connection, statement: Any) -> int:
    return int(conn.execute(statement).rowcount or 0)


def _contribution(conn: Connection, contact_id: int) -> Counter[tuple[int, str]]:
    """What the contact adds to each campaign's report, as (campaign, metric) -> count: the
    metrics `mailer.report` adds back from campaign_tallies."""
    counts: Counter[tuple[int, str]] = Counter()
    deliveries = conn.execute(
        select(
            deliveries_t.c.id,
            deliveries_t.c.campaign_id,
            deliveries_t.c.status,
            deliveries_t.c.excluded_reason,
            deliveries_t.c.smtp_code,
            queries.bounced(deliveries_t).label("bounced"),
        ).where(deliveries_t.c.contact_id == contact_id)
    ).all()
    for d in deliveries:
        status, reason = d.status, d.excluded_reason
        if status == DeliveryStatus.QUEUED.value:
            # never to be sent now: what the send-time re-check would have made of it
            status, reason = DeliveryStatus.EXCLUDED.value, "suppressed"
        elif status == DeliveryStatus.SENDING.value:
            status = DeliveryStatus.UNCERTAIN.value
        counts[(d.campaign_id, f"status:{status}")] += 1
        if status == DeliveryStatus.EXCLUDED.value:
            counts[(d.campaign_id, f"excluded:{reason or 'unknown'}")] += 1
        if d.bounced:
            counts[(d.campaign_id, "bounces")] += 1
    delivery_ids = [d.id for d in deliveries]
    groups = conn.execute(
        select(
            events_t.c.delivery_id,
            events_t.c.campaign_id,
            events_t.c.kind,
            events_t.c.machine,
            func.count(),
        )
        .where(or_(events_t.c.contact_id == contact_id, events_t.c.delivery_id.in_(delivery_ids)))
        .group_by(
            events_t.c.delivery_id, events_t.c.campaign_id, events_t.c.kind, events_t.c.machine
        )
    ).all()
    for _delivery, campaign_id, kind, machine, total in groups:
        for metric, n in tallies.engagement_metrics(kind, bool(machine), int(total), unique=1):
            counts[(campaign_id, metric)] += n
    campaigns_t = Campaign.__table__  # type: ignore[attr-defined]
    known = {row.id for row in conn.execute(select(campaigns_t.c.id))}
    unsubscribed: set[int] = set()
    for (evidence,) in conn.execute(
        select(ledger_t.c.evidence).where(
            ledger_t.c.contact_id == contact_id,
            ledger_t.c.method.in_(UNSUBSCRIBE_METHODS),
            ledger_t.c.evidence.startswith("campaign:", autoescape=True),
        )
    ):
        part = str(evidence).split(":")[1] if evidence else ""
        if part.isdigit() and int(part) in known:
            unsubscribed.add(int(part))
    for campaign_id in unsubscribed:
        counts[(campaign_id, "unsubscribes")] += 1
    return counts
