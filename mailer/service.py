"""The one layer the CLI and the web app call. Business rules live here and below, never above."""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import select as sql_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from mailer import attestations, audit, consent, events, queries, suppression
from mailer.addresses import address_hash, normalise_address
from mailer.audience import build_audience, gate_for
from mailer.campaigns import CampaignDefinition, load_campaign
from mailer.compose import CampaignComposer, compile_definition
from mailer.config import Settings, generate_key_file, load_settings
from mailer.contacts import get_by_email, tags_of
from mailer.db import check_reachable, check_ready, check_suppression_key, make_engine, migrate
from mailer.db import session_scope as _session_scope
from mailer.delivery_store import Claimed, DeliveryStore, Recipient
from mailer.errors import BadInput, ConfigError, DatabaseError, MailerError, NotFound
from mailer.events import EventType
from mailer.imports import ImportSummary, import_contacts
from mailer.leases import make_owner
from mailer.models import (
    Campaign,
    CampaignLink,
    CampaignStatus,
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
from mailer.render import TemplateError
from mailer.report import build_report, campaign_by_name
from mailer.runner import CampaignRunner, Progress, RunOptions, RunStats, Sender


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
        summary = import_contacts(
            self.engine,
            self.settings,
            path,
            vendor=vendor,
            attestation_path=attestation,
            strict=strict,
            rejects_path=rejects,
        )
        audit.imported(self.engine, self.settings.operator, summary)
        return summary

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
        events.emit(
            session,
            EventType.CONTACT_CREATED,
            {"contact_id": contact.id, "email": contact.email},
            contact_id=contact.id,
        )
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
            audit.consent_recorded(session, self.settings.operator, contact, record)
            reasons = suppression.active(session, [contact.email_hash]).get(contact.email_hash, [])
            return ConsentChange(contact, record, created, reasons)

    def suppress(
        self, email: str, reason: SuppressionReason, note: str | None = None
    ) -> suppression.SuppressResult:
        normalised = normalise_address(email)
        with _session_scope(self.engine) as session:
            audit.suppressing(session, self.settings, normalised, reason)
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
            audit.attestation_revoking(session, self.settings.operator, attestation_id, reason)
            return attestations.revoke(
                session, attestation_id, reason.strip(), self.settings.operator
            )


# -- campaigns ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedCampaign:
    definition: CampaignDefinition
    campaign_id: int
    created: bool
    status: CampaignStatus
    excluded: dict[str, int]
    queued_now: int


@dataclass(frozen=True)
class SendOutcome:
    prepared: PreparedCampaign
    stats: RunStats
    report: dict[str, Any]


@dataclass(frozen=True)
class DryRun:
    definition: CampaignDefinition
    would_send: int
    with_tracking: int
    excluded: dict[str, int]
    failures: list[tuple[str, str]]


@dataclass(frozen=True)
class Preview:
    email: str
    excluded_reason: str | None
    message: bytes | None


class CampaignService:
    """Campaign operations, on top of a Mailer's settings and engine."""

    def __init__(self, mailer: Mailer) -> None:
        self.mailer = mailer
        self.settings = mailer.settings
        self.engine = mailer.engine

    def load(self, path: Path) -> CampaignDefinition:
        definition = load_campaign(path)
        compile_definition(definition, self.settings)  # template errors surface before queueing
        return definition

    def prepare(self, path: Path, *, resend_uncertain: bool = False) -> PreparedCampaign:
        """The campaign row, its link table and its audience, created once in one transaction;
        a later run (or another sender process) finds them and continues."""
        definition = self.load(path)
        compiled = compile_definition(definition, self.settings)
        self._preflight(definition)
        for _attempt in range(2):
            try:
                with _session_scope(self.engine) as session:
                    return self._prepare_in(session, definition, compiled.links, resend_uncertain)
            except IntegrityError:
                continue  # another sender created it at the same moment: use theirs
        raise DatabaseError(f"could not create or find campaign {definition.name!r}")

    def _preflight(self, definition: CampaignDefinition, sample: int = 20) -> None:
        """Compose the message for the first contacts of the audience before anything is
        queued. Unsafe template code, or a template that fails for every one of them, stops the
        campaign here; a message that fails for one contact's data fails at send time, for that
        contact only (and the error-rate pause guards against many such)."""
        composer = self.composer(definition, 0)
        problems: list[str] = []
        with self.engine.connect() as conn:
            rows = conn.execute(gate_for(definition, self.settings).limit(sample * 5)).all()
            eligible = [r.id for r in rows if r.excluded_reason is None][:sample]
            recipients = _recipients(conn, eligible)
        for recipient in recipients:
            try:
                composer.compose(Claimed(0, recipient, True))
            except TemplateError as exc:
                if exc.reason.startswith("unsafe template code"):
                    raise BadInput(f"{definition.path}: {exc}") from None
                problems.append(f"the message for {recipient.email} cannot be composed: {exc}")
            except MailerError as exc:
                problems.append(f"the message for {recipient.email} cannot be composed: {exc}")
        if recipients and len(problems) == len(recipients):
            raise BadInput(f"{definition.path}: {problems[0]}")

    def _prepare_in(
        self,
        session: Session,
        definition: CampaignDefinition,
        links: list[str],
        resend_uncertain: bool,
    ) -> PreparedCampaign:
        existing = session.exec(select(Campaign).where(Campaign.name == definition.name)).first()
        if existing is not None:
            assert existing.id is not None
            if existing.definition.get("file_sha256") != definition.file_sha256:
                raise BadInput(
                    f"campaign {definition.name!r} was started from a different version of "
                    f"{definition.path}: give the changed campaign a new name"
                )
            status = CampaignStatus(existing.status)
            if status is CampaignStatus.PAUSED:
                why = f" ({existing.status_reason})" if existing.status_reason else ""
                raise BadInput(
                    f"campaign {definition.name!r} is paused{why}: "
                    f"run `mailer campaign resume {definition.name}` first"
                )
            if status is CampaignStatus.CANCELLED:
                raise BadInput(f"campaign {definition.name!r} was cancelled")
            if status is CampaignStatus.FINISHED and resend_uncertain:
                existing.status = CampaignStatus.RUNNING.value
                session.add(existing)
            return PreparedCampaign(
                definition,
                existing.id,
                False,
                CampaignStatus(existing.status),
                dict(existing.excluded),
                0,
            )
        now = utcnow()
        campaign = Campaign(
            name=definition.name,
            purpose=definition.purpose,
            source_file=str(definition.path),
            definition=definition.as_json(),
            status=CampaignStatus.RUNNING.value,
            excluded={},
            created_at=now,
            started_at=now,
        )
        session.add(campaign)
        session.flush()
        assert campaign.id is not None
        for position, url in enumerate(links):
            session.add(CampaignLink(campaign_id=campaign.id, position=position, url=url))
        session.flush()
        audience = build_audience(session, campaign.id, definition, self.settings)
        campaign.excluded = audience.excluded
        session.add(campaign)
        # created running: the one time its status becomes running (resume and
        # --resend-uncertain continue a started campaign)
        events.emit(
            session,
            EventType.CAMPAIGN_STARTED,
            {
                "campaign_id": campaign.id,
                "campaign": campaign.name,
                "queued": audience.queued,
                "excluded": dict(sorted(audience.excluded.items())),
            },
            at=now,
        )
        return PreparedCampaign(
            definition,
            campaign.id,
            True,
            CampaignStatus.RUNNING,
            audience.excluded,
            audience.queued,
        )

    def composer(self, definition: CampaignDefinition, campaign_id: int) -> CampaignComposer:
        return CampaignComposer(definition, campaign_id, self.settings)

    async def send(
        self,
        path: Path,
        *,
        transport: Sender,
        options: RunOptions | None = None,
        progress: Progress | None = None,
        stop: asyncio.Event | None = None,
        resend_uncertain: bool = False,
        lease_seconds: float = 120.0,
    ) -> SendOutcome:
        options = options or RunOptions(purpose="marketing")
        resend_uncertain = resend_uncertain or options.resend_uncertain
        prepared = self.prepare(path, resend_uncertain=resend_uncertain)
        definition = prepared.definition
        options = replace(
            options,
            purpose=definition.purpose,
            min_policy_version=definition.min_policy_version,
            tags=definition.tags,
            resend_uncertain=resend_uncertain,
            error_threshold=self.settings.error_threshold,
        )
        store = DeliveryStore(
            self.engine, self.settings, prepared.campaign_id, make_owner(), lease_seconds
        )
        runner = CampaignRunner(
            store,
            self.composer(definition, prepared.campaign_id),
            transport,
            options,
            progress,
            stop,
        )
        stats = await runner.run()
        return SendOutcome(prepared, stats, self.report(definition.name))

    def dry_run(self, path: Path, batch_size: int = 1000) -> DryRun:
        """Render and build every message the campaign would send, changing nothing."""
        definition = self.load(path)
        composer = self.composer(definition, 0)
        gate = gate_for(definition, self.settings)
        would_send = with_tracking = 0
        failures: list[tuple[str, str]] = []
        contacts = Contact.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            excluded = {r: n for r, n in conn.execute(queries.exclusion_counts(gate))}
            last_id = 0
            while True:
                rows = conn.execute(gate.where(contacts.c.id > last_id).limit(batch_size)).all()
                if not rows:
                    break
                last_id = rows[-1].id
                eligible = {r.id: r for r in rows if r.excluded_reason is None}
                for recipient in _recipients(conn, list(eligible)):
                    track = bool(eligible[recipient.id].tracking_allowed) and (
                        definition.track_opens or definition.track_clicks
                    )
                    try:
                        composer.compose(Claimed(0, recipient, track))
                    except MailerError as exc:
                        failures.append((recipient.email, str(exc)))
                        continue
                    would_send += 1
                    with_tracking += track
        return DryRun(definition, would_send, with_tracking, excluded, failures)

    def preview(self, path: Path, email: str) -> Preview:
        definition = self.load(path)
        normalised = normalise_address(email)
        contacts = Contact.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            contact_id = conn.execute(
                sql_select(contacts.c.id).where(contacts.c.email == normalised)
            ).scalar()
            if contact_id is None:
                raise NotFound(f"no contact with address {normalised}")
            verdict = conn.execute(gate_for(definition, self.settings, [contact_id])).first()
            if verdict is None:
                return Preview(normalised, "not_in_audience", None)
            if verdict.excluded_reason is not None:
                return Preview(normalised, verdict.excluded_reason, None)
            recipient = _recipients(conn, [contact_id])[0]
        track = bool(verdict.tracking_allowed) and (
            definition.track_opens or definition.track_clicks
        )
        composed = self.composer(definition, 0).compose(Claimed(0, recipient, track))
        return Preview(normalised, None, composed.data)

    def report(self, name: str) -> dict[str, Any]:
        with _session_scope(self.engine) as session:
            return build_report(session, name)

    def set_status(self, name: str, action: str) -> tuple[CampaignStatus, CampaignStatus]:
        """pause, resume or cancel; returns (before, after)."""
        with _session_scope(self.engine) as session:
            campaign = campaign_by_name(session, name)
            before = CampaignStatus(campaign.status)
            allowed = {
                "pause": ({CampaignStatus.RUNNING}, CampaignStatus.PAUSED),
                "resume": ({CampaignStatus.PAUSED}, CampaignStatus.RUNNING),
                "cancel": (
                    {CampaignStatus.RUNNING, CampaignStatus.PAUSED, CampaignStatus.READY},
                    CampaignStatus.CANCELLED,
                ),
            }
            sources, after = allowed[action]
            if before not in sources:
                raise BadInput(f"campaign {name!r} is {before.value}: it cannot be {action}d")
            campaign.status = after.value
            campaign.status_reason = f"{action}d by {self.settings.operator}"
            session.add(campaign)
            return before, after


def _recipients(conn: Any, contact_ids: list[int]) -> list[Recipient]:
    if not contact_ids:
        return []
    contacts = Contact.__table__  # type: ignore[attr-defined]
    rows = conn.execute(
        sql_select(
            contacts.c.id,
            contacts.c.email,
            contacts.c.name,
            contacts.c.first_name,
            contacts.c.last_name,
            contacts.c.locale,
            contacts.c.attributes,
        )
        .where(contacts.c.id.in_(contact_ids))
        .order_by(contacts.c.id)
    )
    return [
        Recipient(
            id=r.id,
            email=r.email,
            name=r.name,
            first_name=r.first_name,
            last_name=r.last_name,
            locale=r.locale,
            attributes=dict(r.attributes or {}),
        )
        for r in rows
    ]
