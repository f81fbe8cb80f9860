"""The SQL that matters, in one place.

`current_consent` is the only definition of "what does this person currently allow": every
other module (imports, the operator commands, `contacts show`, and later the campaign gate)
asks this query rather than re-deriving state from the ledger itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Select,
    and_,
    any_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from mailer.models import (
    CampaignLink,
    ConsentMethod,
    ConsentRecord,
    ConsentStatus,
    Contact,
    ContactTag,
    Delivery,
    DeliveryStatus,
    EngagementEvent,
    InboundMessage,
    SignupLimit,
    Suppression,
)

TRACKING = "tracking"

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


def eligibility(
    purpose: str,
    require_double_opt_in: bool,
    *,
    min_policy_version: str | None = None,
    tags: Sequence[str] = (),
    contact_ids: Iterable[int] | None = None,
) -> Select[Any]:
    """THE CONSENT GATE (invariant 1): every contact of the audience with the reason the gate
    excludes them for `purpose`, or NULL when they may be mailed, and whether they allow
    tracking.

    The order of the checks is their precedence: a suppression beats everything, then the
    ledger's current state for the purpose, then its confirmation, then its policy version.
    `tags` narrows the audience (contacts with any of them); it is not an exclusion reason.
    Policy versions compare as text, so publish sortable ones (2026-01, 2026-07, ...).
    """
    contacts = Contact.__table__  # type: ignore[attr-defined]
    tags_table = ContactTag.__table__  # type: ignore[attr-defined]
    ids = None if contact_ids is None else list(contact_ids)
    current = current_consent(ids, purpose=purpose).subquery("current")
    tracking = current_consent(ids, purpose=TRACKING).subquery("tracking")
    suppressed = exists().where(
        and_(
            suppressions.c.address_hash == contacts.c.email_hash,
            suppressions.c.lifted_at.is_(None),
        )
    )
    allowing = [ConsentStatus.GRANTED.value, ConsentStatus.CONFIRMED.value]
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
        (
            and_(
                literal(min_policy_version is not None),
                or_(
                    current.c.policy_version.is_(None),
                    current.c.policy_version < (min_policy_version or ""),
                ),
            ),
            "policy_outdated",
        ),
        else_=None,
    )
    statement = select(
        contacts.c.id,
        contacts.c.email,
        reason.label("excluded_reason"),
        tracking.c.status.in_(allowing).label("tracking_allowed"),
    ).select_from(
        contacts.outerjoin(current, current.c.contact_id == contacts.c.id).outerjoin(
            tracking, tracking.c.contact_id == contacts.c.id
        )
    )
    if tags:
        statement = statement.where(
            exists().where(
                and_(tags_table.c.contact_id == contacts.c.id, tags_table.c.tag.in_(list(tags)))
            )
        )
    if ids is not None:
        statement = statement.where(contacts.c.id.in_(ids))
    return statement.order_by(contacts.c.id)


# ---------------------------------------------------------------------------------------------
# Deliveries: building the audience and claiming batches (invariant 8)

deliveries = Delivery.__table__  # type: ignore[attr-defined]


def insert_audience(
    campaign_id: int, gate: Select[Any], track: bool, now: datetime, dialect: str
) -> Any:
    """The audience as ONE set-based statement: a queued delivery for every contact the gate
    lets through. The unique (campaign, contact) key makes it idempotent."""
    eligible = gate.subquery("gate")
    rows = select(
        literal(campaign_id),
        eligible.c.id,
        literal(DeliveryStatus.QUEUED.value),
        and_(literal(track), func.coalesce(eligible.c.tracking_allowed, False)),
        literal(0),
        literal(now, type_=deliveries.c.queued_at.type),
    ).where(eligible.c.excluded_reason.is_(None))
    module = postgresql if dialect == "postgresql" else sqlite
    return (
        module.insert(deliveries)
        .from_select(
            ["campaign_id", "contact_id", "status", "tracking", "attempts", "queued_at"], rows
        )
        .on_conflict_do_nothing()
    )


def exclusion_counts(gate: Select[Any]) -> Select[Any]:
    excluded = gate.subquery("gate")
    return (
        select(excluded.c.excluded_reason, func.count())
        .where(excluded.c.excluded_reason.is_not(None))
        .group_by(excluded.c.excluded_reason)
    )


def claim_batch(
    campaign_id: int, owner: str, now: datetime, lease_until: datetime, limit: int
) -> Any:
    """Lease up to `limit` queued deliveries to `owner`.

    On PostgreSQL, FOR UPDATE SKIP LOCKED lets several senders claim side by side without
    waiting for or stealing from each other; SQLite serialises writers anyway. A lease that ran
    out (its process died) makes the rows claimable again.
    """
    claimable = (
        select(deliveries.c.id)
        .where(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.status == DeliveryStatus.QUEUED.value,
            or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now),
        )
        .order_by(deliveries.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (
        update(deliveries)
        .where(deliveries.c.id.in_(claimable.scalar_subquery()))
        .values(lease_owner=owner, lease_until=lease_until)
        .returning(deliveries.c.id, deliveries.c.contact_id, deliveries.c.tracking)
    )


def mark_sending(ids: Sequence[int], owner: str, now: datetime, lease_until: datetime) -> Any:
    """Only rows still queued and still leased to us go to SMTP: if our lease ran out and
    another sender took them, they are theirs now."""
    return (
        update(deliveries)
        .where(
            deliveries.c.id.in_(list(ids)),
            deliveries.c.status == DeliveryStatus.QUEUED.value,
            deliveries.c.lease_owner == owner,
        )
        .values(
            status=DeliveryStatus.SENDING.value,
            sending_at=now,
            lease_until=lease_until,
            attempts=deliveries.c.attempts + 1,
        )
        .returning(deliveries.c.id, deliveries.c.attempts)
    )


def mark_uncertain(campaign_id: int, now: datetime, dead_owners: Sequence[str] = ()) -> Any:
    """Deliveries left `sending` by a process that died (its lease ran out, or it is known to be
    gone): maybe delivered, maybe not."""
    gone = or_(deliveries.c.lease_until < now, deliveries.c.lease_owner.in_(list(dead_owners)))
    return (
        update(deliveries)
        .where(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.status == DeliveryStatus.SENDING.value,
            gone,
        )
        .values(status=DeliveryStatus.UNCERTAIN.value, lease_owner=None)
    )


def lease_owners(campaign_id: int) -> Select[Any]:
    return (
        select(deliveries.c.lease_owner)
        .where(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.lease_owner.is_not(None),
            deliveries.c.status.in_([DeliveryStatus.QUEUED.value, DeliveryStatus.SENDING.value]),
        )
        .distinct()
    )


def requeue_uncertain(campaign_id: int) -> Any:
    return (
        update(deliveries)
        .where(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.status == DeliveryStatus.UNCERTAIN.value,
        )
        .values(status=DeliveryStatus.QUEUED.value, lease_owner=None, lease_until=None)
    )


def release_claims(campaign_id: int, owners: Sequence[str]) -> Any:
    return (
        update(deliveries)
        .where(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.status == DeliveryStatus.QUEUED.value,
            deliveries.c.lease_owner.in_(list(owners)),
        )
        .values(lease_owner=None, lease_until=None)
    )


def delivery_counts(campaign_id: int) -> Select[Any]:
    return (
        select(deliveries.c.status, func.count())
        .where(deliveries.c.campaign_id == campaign_id)
        .group_by(deliveries.c.status)
    )


inbound_messages = InboundMessage.__table__  # type: ignore[attr-defined]
# inbound.Action values of a DSN that counted as a bounce of its delivery
BOUNCE_ACTIONS = (
    "hard_bounce_suppressed",
    "soft_bounce_counted",
    "soft_bounce_suppressed",
    "soft_bounce_repeated",
)


def bounced(deliveries_table: Any = None) -> Any:
    """A delivery bounced: refused with 5xx at send time, or a bounce (DSN) came back for it
    later. One rule for the campaign report and for what an erasure adds to its tallies."""
    d = deliveries if deliveries_table is None else deliveries_table
    later = exists().where(
        inbound_messages.c.delivery_id == d.c.id,
        inbound_messages.c.kind == "dsn",
        inbound_messages.c.action.in_(BOUNCE_ACTIONS),
    )
    return or_(and_(d.c.status == DeliveryStatus.FAILED.value, d.c.smtp_code >= 500), later)


def bounce_count(campaign_id: int) -> Select[Any]:
    return select(func.count()).where(deliveries.c.campaign_id == campaign_id, bounced())


def recheck_exclusions(campaign_id: int) -> Select[Any]:
    return (
        select(deliveries.c.excluded_reason, func.count())
        .where(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.status == DeliveryStatus.EXCLUDED.value,
        )
        .group_by(deliveries.c.excluded_reason)
    )


def fail_unsent(ids: Sequence[int], owner: str, reason: str, now: datetime) -> Any:
    """A message that could not even be composed never reaches SMTP: it fails from the queue."""
    return (
        update(deliveries)
        .where(
            deliveries.c.id.in_(list(ids)),
            deliveries.c.status == DeliveryStatus.QUEUED.value,
            deliveries.c.lease_owner == owner,
        )
        .values(
            status=DeliveryStatus.FAILED.value,
            smtp_response=reason[:500],
            lease_owner=None,
            finished_at=now,
        )
    )


# ---------------------------------------------------------------------------------------------
# Engagement: click targets, recording opens and clicks, and the report's counts (invariant 6)

engagement_events = EngagementEvent.__table__  # type: ignore[attr-defined]
campaign_links = CampaignLink.__table__  # type: ignore[attr-defined]
CLICK = "click"
OPEN = "open"
UNSUBSCRIBE_METHODS = (
    ConsentMethod.ONE_CLICK.value,
    ConsentMethod.UNSUBSCRIBE_LINK.value,
    ConsentMethod.MAILTO.value,
)


def health_check() -> Select[Any]:
    """Answers when the database is up and has the tables the tracking app writes."""
    return select(literal(1)).select_from(engagement_events).limit(1)


def link_urls(campaign_id: int) -> Select[Any]:
    """The campaign's own links, in position order: the only places a click may lead to."""
    return (
        select(campaign_links.c.position, campaign_links.c.url)
        .where(campaign_links.c.campaign_id == campaign_id)
        .order_by(campaign_links.c.position)
    )


def delivery_facts(delivery_ids: Iterable[int]) -> Select[Any]:
    """What recording an event needs to know about its deliveries."""
    return select(
        deliveries.c.id,
        deliveries.c.campaign_id,
        deliveries.c.contact_id,
        deliveries.c.sending_at,
        deliveries.c.finished_at,
    ).where(deliveries.c.id.in_(list(delivery_ids)))


# -- recording against erasure (PostgreSQL) ------------------------------------------------------
# On PostgreSQL engagement_events has no foreign keys (migration 0009): a key's check costs the
# server a row lock on the delivery for every row written, three quarters of its work for a
# hit, at normal priority while the tracking app's workers need the CPU. What the keys
# guaranteed, that no event outlives its delivery's erasure, holds by these two locks:
#
#   recording   ROW EXCLUSIVE on engagement_events first (what its COPY takes anyway), then
#               asks which of its deliveries still exist, then writes, then commits;
#   erasure     SHARE ROW EXCLUSIVE on engagement_events before it reads or deletes anything.
#
# The two conflict. An erasure waits for every recording transaction in progress, so its
# DELETE sees their rows and removes them; a recording that starts while an erasure runs waits
# for it to commit, and under READ COMMITTED its question (a statement after the lock) then no
# longer finds the erased deliveries. SHARE ROW EXCLUSIVE conflicts with itself, so two
# erasures queue rather than deadlock on their own DELETEs. Readers (reports, exports) take
# ACCESS SHARE and wait for nothing. SQLite keeps its foreign keys: it has one writer at a
# time, and checking a key there costs little.


def guards_engagement_by_lock(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def lock_engagement_for_recording(conn: Connection) -> None:
    if guards_engagement_by_lock(conn):
        conn.execute(text(f"LOCK TABLE {engagement_events.name} IN ROW EXCLUSIVE MODE"))


def lock_engagement_for_erasure(conn: Connection) -> None:
    if guards_engagement_by_lock(conn):
        conn.execute(text(f"LOCK TABLE {engagement_events.name} IN SHARE ROW EXCLUSIVE MODE"))


def missing_deliveries(conn: Connection, delivery_ids: Iterable[int]) -> set[int]:
    """Which of these deliveries no longer exist (PostgreSQL, after
    lock_engagement_for_recording). One index probe per delivery, and the answer is a count
    unless some are gone, which is almost never. (`= ANY(array)` keeps the probes: an anti-join
    of the ids against deliveries was planned as a scan of the whole table.)"""
    ids = sorted(set(delivery_ids))
    if not ids:
        return set()
    wanted = deliveries.c.id == any_(bindparam("ids", ids, type_=postgresql.ARRAY(BigInteger)))
    found = conn.execute(select(func.count()).select_from(deliveries).where(wanted)).scalar_one()
    if found == len(ids):
        return set()
    return set(ids).difference(conn.execute(select(deliveries.c.id).where(wanted)).scalars())


def engagement_counts(session: Any, campaign_id: int) -> dict[str, int]:
    """Opens and clicks, humans and machines apart (unique: distinct deliveries), and
    unsubscribes (distinct contacts who unsubscribed through this campaign's links)."""
    e = engagement_events
    conn = session.connection()
    counts = dict.fromkeys(
        (
            "opens",
            "unique_opens",
            "clicks",
            "unique_clicks",
            "machine_opens",
            "machine_unique_opens",
            "machine_clicks",
            "machine_unique_clicks",
        ),
        0,
    )
    rows = conn.execute(
        select(e.c.kind, e.c.machine, func.count(), func.count(e.c.delivery_id.distinct()))
        .where(e.c.campaign_id == campaign_id)
        .group_by(e.c.kind, e.c.machine)
    )
    for kind, machine, total, unique in rows:
        prefix = "machine_" if machine else ""
        noun = "opens" if kind == OPEN else "clicks"
        counts[f"{prefix}{noun}"] += int(total)
        counts[f"{prefix}unique_{noun}"] += int(unique)
    counts["unsubscribes"] = int(
        conn.execute(
            select(func.count(ledger.c.contact_id.distinct())).where(
                ledger.c.method.in_(UNSUBSCRIBE_METHODS),
                ledger.c.evidence.startswith(f"campaign:{campaign_id}:", autoescape=True),
            )
        ).scalar_one()
    )
    return counts


# ---------------------------------------------------------------------------------------------
# The sign-up limit: POST /subscribe's attempts per client, shared by every worker and machine

signup_limits = SignupLimit.__table__  # type: ignore[attr-defined]


def count_signup(client: str, now: datetime, window_ends_at: datetime, dialect: str) -> Any:
    """Count one sign-up attempt of `client` (a keyed hash) and return the row after it:
    (attempts, window_ends_at). The first attempt, and the first after the stored window ended,
    start a new window ending at `window_ends_at`; any other adds one to the count.

    ONE statement, so that the read and the write cannot be split by another worker's attempt:
    on PostgreSQL, concurrent attempts of one client queue on the row (or on its insertion) and
    each counts on the row the previous one committed; on SQLite the write lock serialises them.
    However many workers ask at once, each attempt in a window gets a count of its own, so no
    more than the limit get through. (SET's expressions read the row as it was, on both.)
    """
    module = postgresql if dialect == "postgresql" else sqlite
    insert = module.insert(signup_limits).values(
        client=client, window_ends_at=window_ends_at, attempts=1
    )
    ended = signup_limits.c.window_ends_at <= now
    return insert.on_conflict_do_update(
        index_elements=[signup_limits.c.client],
        set_={
            "window_ends_at": case(
                (ended, insert.excluded.window_ends_at), else_=signup_limits.c.window_ends_at
            ),
            "attempts": case((ended, 1), else_=signup_limits.c.attempts + 1),
        },
    ).returning(signup_limits.c.attempts, signup_limits.c.window_ends_at)


def ended_signup_limits(now: datetime) -> Any:
    """The rows whose window has ended: they no longer limit anyone."""
    return delete(signup_limits).where(signup_limits.c.window_ends_at <= now)
