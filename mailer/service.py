"""The one layer the CLI and the web app call. Business rules live here and below, never above."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from mailer import attestations, consent, suppression
from mailer.addresses import address_hash, normalise_address
from mailer.config import Settings, generate_key_file, load_settings
from mailer.contacts import get_by_email, tags_of
from mailer.db import check_reachable, check_ready, check_suppression_key, make_engine, migrate
from mailer.db import session_scope as _session_scope
from mailer.errors import BadInput, ConfigError, NotFound
from mailer.imports import ImportSummary, import_contacts
from mailer.models import (
    ConsentMethod,
    ConsentRecord,
    ConsentStatus,
    Contact,
    ContactSource,
    ImportBatch,
    Suppression,
    SuppressionReason,
    utcnow,
)


@dataclass(frozen=True)
class InitResult:
    revision_before: str | None
    revision_after: str | None
    key_file_created: Path | None


@dataclass(frozen=True)
class ConsentChange:
    contact: Contact
    record: ConsentRecord
    contact_created: bool
    suppressed_reasons: list[str]


@dataclass(frozen=True)
class ContactView:
    contact: Contact
    tags: list[str]
    states: dict[str, consent.ConsentState]
    history: list[ConsentRecord]
    suppressions: list[Suppression]
    sources: list[tuple[ImportBatch, int]]

    def mailable_for(self, purpose: str) -> bool:
        state = self.states.get(purpose)
        active = [s for s in self.suppressions if s.lifted_at is None]
        return bool(state and state.allows and not active)


class Mailer:
    """Built once per command or app from the settings; hands out short transactions."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.database_url)

    @classmethod
    def from_env(cls, env: dict[str, str], database_url: str | None = None) -> Mailer:
        return cls(load_settings(env, database_url=database_url))

    def close(self) -> None:
        self.engine.dispose()

    def ready(self) -> Mailer:
        """Check the database and keys before any command that reads or writes data."""
        if not self.settings.secret_keys:
            self.settings.signing_key  # raises the clear "no key" error  # noqa: B018
        check_ready(self.engine, self.settings)
        return self

    def session(self) -> AbstractContextManager[Session]:
        return _session_scope(self.engine)

    # -- schema -----------------------------------------------------------------------------

    def init(self) -> InitResult:
        created: Path | None = None
        settings = self.settings
        if not settings.secret_keys:
            if not settings.is_sqlite or settings.key_file is None:
                raise ConfigError(
                    "no secret key configured for this production database: set "
                    "MAILER_SECRET_KEYS (comma-separated, newest last) before `mailer init`"
                )
            settings.key_file.parent.mkdir(parents=True, exist_ok=True)
            key = generate_key_file(settings.key_file)
            created = settings.key_file
            settings = Settings(**{**settings.__dict__, "secret_keys": (key,)})
            self.settings = settings
        elif settings.is_sqlite and settings.key_file is not None:
            settings.key_file.parent.mkdir(parents=True, exist_ok=True)
        check_reachable(self.engine, settings)
        before, after = migrate(self.engine)
        check_suppression_key(self.engine, settings)
        return InitResult(before, after, created)

    # -- contacts and consent ---------------------------------------------------------------

    def import_contacts(
        self,
        path: Path,
        *,
        vendor: str | None = None,
        attestation: Path | None = None,
        strict: bool = False,
        rejects: Path | None = None,
    ) -> ImportSummary:
        return import_contacts(
            self.engine,
            self.settings,
            path,
            vendor=vendor,
            attestation_path=attestation,
            strict=strict,
            rejects_path=rejects,
        )

    def _contact_for(self, session: Session, email: str) -> tuple[Contact, bool]:
        normalised = normalise_address(email)
        contact = get_by_email(session, normalised)
        if contact is not None:
            return contact, False
        now = utcnow()
        contact = Contact(
            email=normalised,
            email_hash=address_hash(normalised, self.settings.suppression_key),
            attributes={},
            created_at=now,
            updated_at=now,
        )
        session.add(contact)
        session.flush()
        return contact, True

    def record_consent(
        self,
        email: str,
        purpose: str,
        status: ConsentStatus,
        *,
        source: str,
        method: ConsentMethod = ConsentMethod.OPERATOR,
        note: str | None = None,
        at: datetime | None = None,
    ) -> ConsentChange:
        """An operator-recorded grant or withdrawal (phone, letter, mail to the privacy address).

        A grant is recorded as evidence even for a suppressed address, but it does not lift the
        suppression: only the person's own confirmed double opt-in does that.
        """
        purpose = consent.check_purpose(purpose)
        if not source.strip():
            raise BadInput("--source must say how the person told you (phone, letter, ...)")
        with _session_scope(self.engine) as session:
            contact, created = self._contact_for(session, email)
            assert contact.id is not None
            record = consent.record(
                session,
                contact_id=contact.id,
                purpose=purpose,
                status=status,
                method=method.value,
                source=source.strip(),
                consent_at=at,
                note=note,
                operator=self.settings.operator,
                evidence=f"operator {self.settings.operator}",
            )
            reasons = suppression.active(session, [contact.email_hash]).get(contact.email_hash, [])
            return ConsentChange(contact, record, created, reasons)

    def suppress(
        self, email: str, reason: SuppressionReason, note: str | None = None
    ) -> suppression.SuppressResult:
        normalised = normalise_address(email)
        with _session_scope(self.engine) as session:
            return suppression.suppress(
                session,
                address_hash(normalised, self.settings.suppression_key),
                reason,
                source=f"operator {self.settings.operator}",
                note=note,
            )

    def suppressions(self, reason: SuppressionReason | None = None) -> list[Suppression]:
        with _session_scope(self.engine) as session:
            return suppression.listing(session, reason)

    def show_contact(self, email: str) -> ContactView:
        normalised = normalise_address(email)
        with _session_scope(self.engine) as session:
            contact = get_by_email(session, normalised)
            if contact is None:
                raise NotFound(f"no contact with address {normalised}")
            assert contact.id is not None
            suppressions = list(
                session.exec(
                    select(Suppression)
                    .where(Suppression.address_hash == contact.email_hash)
                    .order_by(col(Suppression.id))
                )
            )
            sources = [
                (batch, row_number)
                for batch, row_number in session.exec(
                    select(ImportBatch, ContactSource.row_number)
                    .join(ContactSource, col(ContactSource.import_id) == col(ImportBatch.id))
                    .where(ContactSource.contact_id == contact.id)
                    .order_by(col(ImportBatch.id))
                )
            ]
            return ContactView(
                contact=contact,
                tags=tags_of(session, contact.id),
                states=consent.current_states(session, [contact.id]).get(contact.id, {}),
                history=consent.history(session, contact.id),
                suppressions=suppressions,
                sources=sources,
            )

    # -- vendors ----------------------------------------------------------------------------

    def vendors(self) -> list[attestations.AttestationSummary]:
        with _session_scope(self.engine) as session:
            return attestations.summaries(session)

    def revoke_attestation(self, attestation_id: int, reason: str) -> int:
        if not reason.strip():
            raise BadInput("--reason is required: say why the attestation is revoked")
        with _session_scope(self.engine) as session:
            return attestations.revoke(
                session, attestation_id, reason.strip(), self.settings.operator
            )
