"""Vendor attestations: the lawful-source guarantee a bought list must come with (invariant 7)."""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from mailer import consent, queries
from mailer.errors import AttestationError, NotFound
from mailer.models import (
    Attestation,
    ConsentMethod,
    ConsentRecord,
    ConsentStatus,
    ImportBatch,
    utcnow,
)

REQUIRED_KEYS = (
    "vendor",
    "vendor_contact",
    "lawful_basis",
    "purposes",
    "collection_method",
    "collected_from",
    "collected_to",
    "consent_wording",
    "signed_by",
    "signed_at",
    "document_sha256",
)
# GDPR article 6(1); only `consent` lets a bought list carry consent to mail.
LAWFUL_BASES = (
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
)
GRANTING_BASIS = "consent"
SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class AttestationData:
    vendor: str
    vendor_contact: str
    lawful_basis: str
    purposes: tuple[str, ...]
    collection_method: str
    collected_from: date
    collected_to: date
    consent_wording: str
    signed_by: str
    signed_at: datetime
    document_sha256: str
    file_sha256: str

    @property
    def grants_consent(self) -> bool:
        return self.lawful_basis == GRANTING_BASIS

    def covers(self, consent_at: datetime) -> bool:
        day = consent_at.astimezone(UTC).date()
        return self.collected_from <= day <= self.collected_to


def _as_date(value: Any) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            return None
    return None


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def load(path: Path, expected_vendor: str | None = None) -> AttestationData:
    """Read and check an attestation file; every problem is named in one message."""
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise AttestationError(f"{path}: cannot read attestation: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AttestationError(f"{path}: attestation is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise AttestationError(f"{path}: attestation is not valid TOML: {exc}") from exc

    missing = [key for key in REQUIRED_KEYS if key not in data or data[key] in ("", [], None)]
    invalid: list[str] = []
    unknown = sorted(set(data) - set(REQUIRED_KEYS))
    invalid += [f"{key} (unknown key)" for key in unknown]

    texts = {
        key: _text(data.get(key))
        for key in (
            "vendor",
            "vendor_contact",
            "collection_method",
            "consent_wording",
            "signed_by",
            "lawful_basis",
        )
    }
    for key, value in texts.items():
        if key not in missing and value is None:
            invalid.append(f"{key} (must be text)")

    lawful_basis = (texts["lawful_basis"] or "").lower()
    if "lawful_basis" not in missing and texts["lawful_basis"] and lawful_basis not in LAWFUL_BASES:
        invalid.append(f"lawful_basis (one of {', '.join(LAWFUL_BASES)})")

    purposes: list[str] = []
    raw_purposes = data.get("purposes")
    if "purposes" not in missing:
        if not isinstance(raw_purposes, list) or not all(isinstance(p, str) for p in raw_purposes):
            invalid.append("purposes (must be a list of purpose names)")
        else:
            purposes = [p.strip().lower() for p in raw_purposes]
            bad = [p for p in purposes if not consent.PURPOSE_PATTERN.match(p)]
            if bad:
                invalid.append(f"purposes ({bad[0]!r} is not a purpose name)")

    collected_from = _as_date(data.get("collected_from"))
    collected_to = _as_date(data.get("collected_to"))
    for key, parsed in (("collected_from", collected_from), ("collected_to", collected_to)):
        if key not in missing and parsed is None:
            invalid.append(f"{key} (must be a date, YYYY-MM-DD)")
    if collected_from and collected_to and collected_from > collected_to:
        invalid.append("collected_to (before collected_from)")

    signed_at = _as_datetime(data.get("signed_at"))
    if "signed_at" not in missing:
        if signed_at is None:
            invalid.append("signed_at (must be a date or date-time)")
        elif signed_at > utcnow():
            invalid.append("signed_at (in the future)")

    document_sha256 = data.get("document_sha256")
    if "document_sha256" not in missing and not (
        isinstance(document_sha256, str) and SHA256_HEX.match(document_sha256.strip())
    ):
        invalid.append("document_sha256 (must be 64 hexadecimal characters)")

    if expected_vendor is not None and texts["vendor"] and texts["vendor"] != expected_vendor:
        invalid.append(f"vendor ({texts['vendor']!r} does not match --vendor {expected_vendor!r})")

    if missing or invalid:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if invalid:
            parts.append("invalid " + "; ".join(invalid))
        raise AttestationError(f"{path}: incomplete attestation: {'; '.join(parts)}")

    assert collected_from and collected_to and signed_at and isinstance(document_sha256, str)
    return AttestationData(
        vendor=texts["vendor"] or "",
        vendor_contact=texts["vendor_contact"] or "",
        lawful_basis=lawful_basis,
        purposes=tuple(dict.fromkeys(purposes)),
        collection_method=texts["collection_method"] or "",
        collected_from=collected_from,
        collected_to=collected_to,
        consent_wording=texts["consent_wording"] or "",
        signed_by=texts["signed_by"] or "",
        signed_at=signed_at,
        document_sha256=document_sha256.strip().lower(),
        file_sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )


def store(session: Session, data: AttestationData) -> Attestation:
    """The stored attestation for this exact file, created on first use."""
    existing = session.exec(
        select(Attestation).where(Attestation.file_sha256 == data.file_sha256)
    ).first()
    if existing is not None:
        if existing.revoked_at is not None:
            raise AttestationError(
                f"attestation {existing.id} ({existing.vendor}) was revoked on "
                f"{existing.revoked_at:%Y-%m-%d}: it cannot be used for new imports"
            )
        return existing
    row = Attestation(
        vendor=data.vendor,
        vendor_contact=data.vendor_contact,
        lawful_basis=data.lawful_basis,
        purposes=list(data.purposes),
        collection_method=data.collection_method,
        collected_from=data.collected_from,
        collected_to=data.collected_to,
        consent_wording=data.consent_wording,
        signed_by=data.signed_by,
        signed_at=data.signed_at,
        document_sha256=data.document_sha256,
        file_sha256=data.file_sha256,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class AttestationSummary:
    attestation: Attestation
    imports: int
    contacts: int
    consents_granted: int
    consents_current: int


def summaries(session: Session) -> list[AttestationSummary]:
    out = []
    current = queries.current_consent().subquery("current")
    for attestation in session.exec(select(Attestation).order_by(col(Attestation.id))):
        imports = session.exec(
            select(func.count())
            .select_from(ImportBatch)
            .where(ImportBatch.attestation_id == attestation.id)
        ).one()
        granted_rows = session.exec(
            select(func.count())
            .select_from(ConsentRecord)
            .where(
                ConsentRecord.attestation_id == attestation.id,
                ConsentRecord.status == ConsentStatus.GRANTED.value,
            )
        ).one()
        contacts = session.exec(
            select(func.count(func.distinct(ConsentRecord.contact_id))).where(
                ConsentRecord.attestation_id == attestation.id
            )
        ).one()
        in_force = session.exec(
            select(func.count())
            .select_from(current)
            .where(
                current.c.attestation_id == attestation.id,
                current.c.status == ConsentStatus.GRANTED.value,
            )
        ).one()
        out.append(AttestationSummary(attestation, imports, contacts, granted_rows, in_force))
    return out


def revoke(session: Session, attestation_id: int, reason: str, operator: str) -> int:
    """Withdraw every consent the attestation granted that is still in force; returns how many.

    Withdrawals are new ledger rows: the grants stay as evidence of what was once claimed.
    """
    attestation = session.get(Attestation, attestation_id)
    if attestation is None:
        raise NotFound(f"no attestation with id {attestation_id}")
    now = utcnow()
    pairs = (
        session.connection().execute(queries.consent_granted_by_attestation(attestation_id)).all()
    )
    consent.append(
        session,
        [
            {
                "contact_id": contact_id,
                "purpose": purpose,
                "status": ConsentStatus.WITHDRAWN.value,
                "method": ConsentMethod.ATTESTATION_REVOKED.value,
                "source": f"attestation {attestation_id} revoked",
                "consent_at": now,
                "attestation_id": attestation_id,
                "note": reason,
                "operator": operator,
            }
            for contact_id, purpose in pairs
        ],
    )
    if attestation.revoked_at is None:
        attestation.revoked_at = now
        attestation.revoke_reason = reason
        session.add(attestation)
    session.flush()
    return len(pairs)
