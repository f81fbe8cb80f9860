"""Table models and the vocabularies (statuses, methods, reasons) stored in them.

The schema itself is created by the Alembic migrations in `mailer/migrations/`; these models
describe the same tables for queries. Times are stored in UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    column,
    false,
    literal_column,
    not_,
)
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything mailer stores is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ConsentStatus(StrEnum):
    GRANTED = "granted"
    WITHDRAWN = "withdrawn"
    PENDING = "pending"  # double opt-in asked, not yet confirmed
    CONFIRMED = "confirmed"  # double opt-in confirmed by the person
    IGNORED = "ignored"  # evidence received and kept, but not allowed to grant (see note)


# Statuses that take part in the current state; IGNORED rows are evidence only.
EFFECTIVE_STATUSES = (
    ConsentStatus.GRANTED,
    ConsentStatus.WITHDRAWN,
    ConsentStatus.PENDING,
    ConsentStatus.CONFIRMED,
)


class ConsentMethod(StrEnum):
    IMPORT = "import"
    VENDOR_ATTESTATION = "vendor_attestation"
    OPERATOR = "operator"
    FORM = "form"
    DOUBLE_OPT_IN = "double_opt_in"
    UNSUBSCRIBE_LINK = "unsubscribe_link"
    ONE_CLICK = "one_click"
    PREFERENCE_CENTRE = "preference_centre"
    ATTESTATION_REVOKED = "attestation_revoked"
    COMPLAINT = "complaint"
    REPERMISSION = "repermission"
    MAILTO = "mailto"  # a mail to the List-Unsubscribe mailto: address (mailer.inbound)


class SuppressionReason(StrEnum):
    UNSUBSCRIBED = "unsubscribed"
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    ERASED = "erased"
    MANUAL = "manual"


class IgnoredReason(StrEnum):
    SUPPRESSED = "suppressed"
    OLDER_THAN_WITHDRAWAL = "older_than_withdrawal"
    LAWFUL_BASIS = "lawful_basis_not_consent"


class Meta(SQLModel, table=True):
    __tablename__ = "meta"
    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=255)


class Contact(SQLModel, table=True):
    __tablename__ = "contacts"
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    email_hash: str = Field(max_length=64, index=True)
    name: str | None = Field(default=None, max_length=255)
    first_name: str | None = Field(default=None, max_length=255)
    last_name: str | None = Field(default=None, max_length=255)
    locale: str | None = Field(default=None, max_length=35)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ContactTag(SQLModel, table=True):
    __tablename__ = "contact_tags"
    contact_id: int = Field(foreign_key="contacts.id", primary_key=True)
    tag: str = Field(max_length=64, primary_key=True, index=True)


class Attestation(SQLModel, table=True):
    __tablename__ = "attestations"
    id: int | None = Field(default=None, primary_key=True)
    vendor: str = Field(max_length=255)
    vendor_contact: str = Field(max_length=255)
    lawful_basis: str = Field(max_length=64)
    purposes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    collection_method: str
    collected_from: date
    collected_to: date
    consent_wording: str
    signed_by: str = Field(max_length=255)
    signed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    document_sha256: str = Field(max_length=64)
    file_sha256: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    revoke_reason: str | None = None


class ImportBatch(SQLModel, table=True):
    __tablename__ = "imports"
    id: int | None = Field(default=None, primary_key=True)
    filename: str = Field(max_length=1024)
    file_sha256: str = Field(max_length=64)
    vendor: str | None = Field(default=None, max_length=255)
    attestation_id: int | None = Field(default=None, foreign_key="attestations.id")
    operator: str = Field(max_length=255)
    started_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ContactSource(SQLModel, table=True):
    """Where a contact came from: one row per import that brought or merged it."""

    __tablename__ = "contact_sources"
    contact_id: int = Field(foreign_key="contacts.id", primary_key=True)
    import_id: int = Field(foreign_key="imports.id", primary_key=True, index=True)
    row_number: int


class ConsentRecord(SQLModel, table=True):
    """One row of the append-only consent ledger (triggers refuse UPDATE and DELETE)."""

    __tablename__ = "consent_records"
    __table_args__ = (Index("ix_consent_records_state", "contact_id", "purpose", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    contact_id: int = Field(foreign_key="contacts.id")
    purpose: str = Field(max_length=64)
    status: str = Field(max_length=16)
    method: str = Field(max_length=32)
    source: str = Field(max_length=255)
    policy_version: str | None = Field(default=None, max_length=64)
    consent_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    recorded_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    ip_masked: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)
    wording: str | None = None
    import_id: int | None = Field(default=None, foreign_key="imports.id")
    attestation_id: int | None = Field(default=None, foreign_key="attestations.id", index=True)
    evidence: str | None = Field(default=None, max_length=255)
    note: str | None = None
    operator: str | None = Field(default=None, max_length=255)


class Suppression(SQLModel, table=True):
    __tablename__ = "suppressions"
    id: int | None = Field(default=None, primary_key=True)
    address_hash: str = Field(max_length=64, index=True)
    reason: str = Field(max_length=32)
    source: str = Field(max_length=255)
    note: str | None = None
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    lifted_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    lifted_by_consent_id: int | None = Field(default=None, foreign_key="consent_records.id")


class CampaignStatus(StrEnum):
    READY = "ready"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    FINISHED = "finished"


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"  # handed to SMTP; the outcome is not yet recorded
    SENT = "sent"
    FAILED = "failed"
    UNCERTAIN = "uncertain"  # was sending when its process died: maybe delivered
    EXCLUDED = "excluded"  # became ineligible between audience build and send


class Campaign(SQLModel, table=True):
    __tablename__ = "campaigns"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    purpose: str = Field(max_length=64)
    source_file: str = Field(max_length=1024)
    definition: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(max_length=16)
    status_reason: str | None = None
    excluded: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    started_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class CampaignLink(SQLModel, table=True):
    """The campaign's own links: a click token resolves only to one of these."""

    __tablename__ = "campaign_links"
    campaign_id: int = Field(foreign_key="campaigns.id", primary_key=True)
    position: int = Field(primary_key=True)
    url: str


class Delivery(SQLModel, table=True):
    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_claim", "campaign_id", "status", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    campaign_id: int = Field(foreign_key="campaigns.id")
    contact_id: int = Field(foreign_key="contacts.id")
    status: str = Field(max_length=16)
    tracking: bool
    excluded_reason: str | None = Field(default=None, max_length=32)
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    attempts: int = 0
    smtp_code: int | None = None
    smtp_response: str | None = Field(default=None, max_length=512)
    message_id: str | None = Field(default=None, max_length=255)
    queued_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    sending_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


_UNANNOUNCED = not_(column("announced", Boolean))
# The click position of the honeypot link: far above any campaign's link count (a campaign
# with this many links is refused when it is composed), and three base-36 digits in a token.
HONEYPOT_POSITION = 36**3 - 1
_HONEYPOT_CLICK = column("link_position", Integer) == literal_column(str(HONEYPOT_POSITION))


class EngagementEvent(SQLModel, table=True):
    """An open or a click, kept with its human/machine classification; nothing is deleted.
    `announced`: its message.opened or message.clicked is in the outbox (written by the webhook
    dispatcher, mailer.engagement_announce, not when the hit is recorded)."""

    __tablename__ = "engagement_events"
    __table_args__ = (
        # the rows still to announce (migration 0007); the announcer's query repeats the
        # condition, as SQLite uses a partial index only then
        Index(
            "ix_engagement_events_unannounced",
            "id",
            sqlite_where=_UNANNOUNCED,
            postgresql_where=_UNANNOUNCED,
        ),
        # a delivery's clicks in a time window, for the burst rule; and, by its leading
        # column, everything asked per delivery (migration 0008)
        Index("ix_engagement_events_delivery_clicks", "delivery_id", "kind", "occurred_at"),
        # the few honeypot clicks, for the honeypot rule's longer window (migration 0008)
        Index(
            "ix_engagement_events_honeypot",
            "delivery_id",
            "occurred_at",
            sqlite_where=_HONEYPOT_CLICK,
            postgresql_where=_HONEYPOT_CLICK,
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    # foreign keys on SQLite; on PostgreSQL recording and erasure lock the table against each
    # other instead (migration 0009, mailer.queries)
    delivery_id: int = Field(foreign_key="deliveries.id")
    campaign_id: int = Field(foreign_key="campaigns.id")
    contact_id: int | None = Field(default=None, foreign_key="contacts.id")
    kind: str = Field(max_length=8)
    link_position: int | None = None
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    ip_masked: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)
    machine: bool
    machine_reason: str | None = Field(default=None, max_length=64)
    announced: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )


class SubscriptionStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    EXPIRED = "expired"


class Subscription(SQLModel, table=True):
    """A sign-up waiting for (or done with) its double opt-in confirmation."""

    __tablename__ = "subscriptions"
    id: int | None = Field(default=None, primary_key=True)
    contact_id: int = Field(foreign_key="contacts.id")
    purposes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    policy_version: str | None = Field(default=None, max_length=64)
    wording: str | None = None
    source: str = Field(max_length=255)
    requested_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    ip_masked: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)
    mailed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    confirmed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    status: str = Field(max_length=16)


class SignupLimit(SQLModel, table=True):
    """Sign-ups counted per client (an IPv4 address or IPv6 /64) for POST /subscribe's limit,
    in the database so that every worker on every machine counts against the same limit.
    `client` is a keyed hash (Settings.signup_limit_key), never the address (migration 0010).
    A row means nothing once its window has ended: the app deletes such rows as it goes, and
    `mailer retention purge` deletes what is left."""

    __tablename__ = "signup_limits"
    __table_args__ = {"sqlite_with_rowid": False}
    client: str = Field(max_length=64, primary_key=True)
    window_ends_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    attempts: int


# -- privacy operations (issue 6) ---------------------------------------------------------------


class PrivacyRequestKind(StrEnum):
    ACCESS = "access"
    CORRECTION = "correction"
    ERASURE = "erasure"


class IdentityCheck(StrEnum):
    PENDING = "pending"
    VERIFIED = "verified"


class PrivacyRequest(SQLModel, table=True):
    """A data-subject request (access, correction, erasure): answered within 30 days.

    Kept after an erasure without the contact link or note: the keyed address hash shows the
    request was answered without saying who asked."""

    __tablename__ = "privacy_requests"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)
    contact_id: int | None = Field(default=None, foreign_key="contacts.id", index=True)
    address_hash: str = Field(max_length=64, index=True)
    channel: str = Field(max_length=64)
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    identity_check: str = Field(max_length=16)
    verified_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    due_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    completed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    outcome: str | None = Field(default=None, max_length=255)
    operator: str = Field(max_length=255)
    note: str | None = None


class Erasure(SQLModel, table=True):
    """That an address was erased, when and by whom; never who it was.

    `contact_id` is set only inside the erasing transaction (the consent ledger's DELETE guard
    lets exactly that contact's rows go) and cleared before it commits."""

    __tablename__ = "erasures"
    id: int | None = Field(default=None, primary_key=True)
    address_hash: str = Field(max_length=64, index=True)
    reason: str = Field(max_length=16)  # request (the person asked) or retention
    erased_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    operator: str = Field(max_length=255)
    contact_id: int | None = Field(default=None, index=True)
    removed: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class CampaignTally(SQLModel, table=True):
    """Anonymous counts a campaign report adds to what its deliveries and events still show:
    what erased people (and purged events) contributed, so reports still add up."""

    __tablename__ = "campaign_tallies"
    campaign_id: int = Field(foreign_key="campaigns.id", primary_key=True)
    metric: str = Field(max_length=64, primary_key=True)
    count: int = 0


class PolicyVersion(SQLModel, table=True):
    """A published version of the privacy statement; versions sort in publication order."""

    __tablename__ = "policy_versions"
    id: int | None = Field(default=None, primary_key=True)
    version: str = Field(max_length=64, unique=True)
    effective_on: date
    published_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    material: bool
    summary: str | None = None
    operator: str = Field(max_length=255)


class AuditEntry(SQLModel, table=True):
    """One operator action that changed consent, suppression, contacts, attestations or
    policy. The subject is a keyed address hash or an id, never an address or a name."""

    __tablename__ = "audit_log"
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    operator: str = Field(max_length=255)
    action: str = Field(max_length=64)
    subject: str | None = Field(default=None, max_length=128, index=True)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


# -- events out and in (issue 5) ----------------------------------------------------------------


class Event(SQLModel, table=True):
    """One domain event, written in the transaction that made the change (the outbox).

    `data` is thin (ids, and the address where a consumer needs it to act); an erased contact's
    events are scrubbed of everything personal, keeping the ids."""

    __tablename__ = "events"
    id: int | None = Field(default=None, primary_key=True)
    uid: str = Field(max_length=40, unique=True)
    type: str = Field(max_length=64)
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    contact_id: int | None = Field(default=None, index=True)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoints"
    id: int | None = Field(default=None, primary_key=True)
    uid: str = Field(max_length=40, unique=True)
    url: str
    description: str | None = Field(default=None, max_length=255)
    enabled: bool
    disabled_reason: str | None = Field(default=None, max_length=255)
    secret: str = Field(max_length=128)
    # after rotate-secret, the old secret signs too until this time (consumers switch over)
    previous_secret: str | None = Field(default=None, max_length=128)
    previous_secret_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class WebhookEndpointEvent(SQLModel, table=True):
    """An event type an endpoint receives; '*' for every type."""

    __tablename__ = "webhook_endpoint_events"
    endpoint_id: int = Field(foreign_key="webhook_endpoints.id", primary_key=True)
    event_type: str = Field(max_length=64, primary_key=True)


class WebhookDeliveryStatus(StrEnum):
    PENDING = "pending"  # due at next_attempt_at (leased while a dispatcher is sending it)
    DELIVERED = "delivered"
    DEAD = "dead"  # dead-lettered after the retry schedule: kept, replayable
    CANCELLED = "cancelled"  # the endpoint was disabled by a 410


class WebhookDelivery(SQLModel, table=True):
    """One event for one endpoint; its webhook-id (the event's uid) never changes."""

    __tablename__ = "webhook_deliveries"
    id: int | None = Field(default=None, primary_key=True)
    event_id: int = Field(foreign_key="events.id")
    endpoint_id: int = Field(foreign_key="webhook_endpoints.id")
    status: str = Field(max_length=16)
    attempts: int = 0
    next_attempt_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=512)
    last_attempt_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    delivered_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    dead_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class WebhookAttempt(SQLModel, table=True):
    __tablename__ = "webhook_attempts"
    id: int | None = Field(default=None, primary_key=True)
    delivery_id: int = Field(foreign_key="webhook_deliveries.id")
    attempted_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    status_code: int | None = None
    response: str | None = Field(default=None, max_length=512)
    error: str | None = Field(default=None, max_length=512)
    duration_ms: int


class BounceCount(SQLModel, table=True):
    """Soft bounces per keyed address hash, until the configured number suppresses."""

    __tablename__ = "bounce_counts"
    address_hash: str = Field(max_length=64, primary_key=True)
    soft_bounces: int = 0
    last_bounce_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class InboundMessage(SQLModel, table=True):
    """One processed inbound mail (bounce, complaint, mailto unsubscribe, or one not understood),
    keyed by a hash of its Message-ID so that processing it again changes nothing."""

    __tablename__ = "inbound_messages"
    id: int | None = Field(default=None, primary_key=True)
    message_key: str = Field(max_length=64, unique=True)
    kind: str = Field(max_length=16)  # dsn, arf, unsubscribe, unknown, malformed
    outcome: str = Field(max_length=16)  # processed, unmatched, failed
    action: str = Field(max_length=32)
    delivery_id: int | None = Field(default=None, index=True)
    processed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
