"""Bounces, complaints and mailto unsubscribes in: match each inbound mail to its delivery, act,
and record an event, one transaction per mail.

    process_message(mailer, raw, envelope_rcpt)   one mail -> InboundResult
    InboundProcessor                              the same, keeping the link tokens for a run
    process_path(mailer, path)                    a maildir, an mbox, a folder of .eml files or
                                                  one .eml file (mailer.inbound_files)

What each kind of mail does (classified by mailer.inbound_parse):

    hard bounce     the address is suppressed (hard_bounce); `message.bounced`
    soft bounce     counted per address, once per delivery (a delay warning and the final
                    failure of one mail are one bounce); at `soft_bounce_limit` the address is
                    suppressed as hard_bounce, with the count in its source; `message.bounced`
    complaint       the campaign's purpose and marketing are withdrawn (method complaint) and
                    the address is suppressed (complaint); `message.complained`. A `not-spam`
                    report changes nothing.
    mailto          the same unsubscribe as the one-click link (mailer.recipients.unsubscribe,
                    method mailto), for the delivery the signed token names
    not understood  nothing changes; reported, and moved aside by the caller

A delivery is found by the VERP bounce address (its MAC stops forged bounces) or, failing that,
by the Message-ID of the returned mail. Every processed mail is remembered by a hash of its
Message-ID (`inbound_messages`), written first in the same transaction as its effects, so a
second copy, a re-run or two processes racing change nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from mailer import consent, events, suppression
from mailer.consent import MARKETING
from mailer.errors import NotFound
from mailer.events import EventType
from mailer.inbound_parse import BounceKind, Inbound, Kind, classify
from mailer.message import parse_verp
from mailer.models import (
    Campaign,
    ConsentMethod,
    ConsentStatus,
    Contact,
    Delivery,
    InboundMessage,
    SuppressionReason,
    utcnow,
)
from mailer.service import Mailer
from mailer.tokens import BadToken, TokenKind, Tokens

logger = logging.getLogger("mailer.inbound")

NOT_A_COMPLAINT = frozenset({"not-spam"})  # RFC 6430: the person says it is wanted mail
COMPLAINT_SOURCE = "feedback loop"

_inbound = InboundMessage.__table__  # type: ignore[attr-defined]
_deliveries = Delivery.__table__  # type: ignore[attr-defined]
_campaigns = Campaign.__table__  # type: ignore[attr-defined]
_contacts = Contact.__table__  # type: ignore[attr-defined]

# One statement on both databases: SQLite (3.35+) and PostgreSQL share this upsert syntax.
_COUNT_SOFT_BOUNCE = text(
    """
    INSERT INTO bounce_counts (address_hash, soft_bounces, last_bounce_at)
    VALUES (:address_hash, 1, :now)
    ON CONFLICT (address_hash)
    DO UPDATE SET soft_bounces = bounce_counts.soft_bounces + 1, last_bounce_at = :now
    RETURNING soft_bounces
    """
)


class Outcome(StrEnum):
    PROCESSED = "processed"  # matched and acted on (or nothing to do)
    UNMATCHED = "unmatched"  # understood, but about no delivery of ours: moved aside
    FAILED = "failed"  # malformed: moved aside
    ERROR = "error"  # could not be processed now (the database): left in place, retried


class Action(StrEnum):
    HARD_BOUNCE = "hard_bounce_suppressed"
    SOFT_BOUNCE = "soft_bounce_counted"
    SOFT_BOUNCE_LIMIT = "soft_bounce_suppressed"
    SOFT_BOUNCE_AGAIN = "soft_bounce_repeated"  # the delivery's bounce was counted already
    SUCCESS_REPORT = "delivery_report"  # delivered / relayed / expanded
    COMPLAINT = "complaint_suppressed"
    NOT_SPAM = "not_spam_ignored"
    UNSUBSCRIBED = "unsubscribed"
    CONTACT_GONE = "contact_erased"
    ALREADY_PROCESSED = "already_processed"
    NO_DELIVERY = "no_delivery"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 (an outcome, not a secret)
    NOT_A_REPORT = "not_a_report"
    MALFORMED = "malformed"
    DATABASE = "database_error"
    UNREADABLE = "unreadable"


_COUNTED = (Action.SOFT_BOUNCE.value, Action.SOFT_BOUNCE_LIMIT.value)


@dataclass(frozen=True)
class InboundResult:
    kind: Kind
    outcome: Outcome
    action: Action
    detail: str  # one line for the operator: never an address, a token or a secret
    delivery_id: int | None = None
    campaign: str | None = None
    seen: bool = False  # this mail was processed or set aside before

    def as_dict(self) -> dict[str, Any]:
        return {
            key: value.value if isinstance(value, StrEnum) else value
            for key, value in asdict(self).items()
        }


@dataclass(frozen=True)
class _Match:
    delivery_id: int
    campaign_id: int
    campaign: str
    purpose: str
    contact_id: int | None  # None once the person was erased
    email: str | None
    address_hash: str | None


class _AlreadyProcessed(Exception):
    pass


class InboundProcessor:
    """Processes inbound mails for one Mailer; build one per run (it holds the link tokens)."""

    def __init__(self, mailer: Mailer) -> None:
        self.mailer = mailer
        self.settings = mailer.settings
        self.tokens = Tokens(mailer.settings.secret_keys)

    def process(self, raw: bytes, envelope_rcpts: Sequence[str] = ()) -> InboundResult:
        """Process one mail. Database errors propagate (the mail stays where it is)."""
        inbound = classify(raw, envelope_rcpts)
        if inbound.kind is Kind.MALFORMED:
            return self._set_aside(
                inbound, Outcome.FAILED, Action.MALFORMED, f"malformed: {inbound.problem}"
            )
        if self._acted_on(inbound.message_key):
            return _already(inbound)
        if inbound.kind is Kind.UNSUBSCRIBE:
            return self._unsubscribe(inbound)
        if inbound.kind is Kind.UNKNOWN:
            return self._set_aside(
                inbound,
                Outcome.UNMATCHED,
                Action.NOT_A_REPORT,
                "not a delivery report, a complaint or an unsubscribe",
            )
        try:
            with self.mailer.session() as session:
                seen = _claim(session, inbound)
                match = self._match(session, inbound)
                if match is None:
                    result = InboundResult(
                        inbound.kind,
                        Outcome.UNMATCHED,
                        Action.NO_DELIVERY,
                        "no delivery of ours matches its bounce address or Message-ID",
                        seen=seen,
                    )
                else:
                    action, detail = self._act(session, inbound, match)
                    result = InboundResult(
                        inbound.kind,
                        Outcome.PROCESSED,
                        action,
                        f"delivery {match.delivery_id} (campaign {match.campaign}): {detail}",
                        match.delivery_id,
                        match.campaign,
                        seen=seen,
                    )
                _settle(session, inbound, result)
        except (_AlreadyProcessed, IntegrityError):
            # IntegrityError: another process recorded the same mail first
            return _already(inbound)
        logger.info(
            "inbound %s: %s (%s), delivery %s",
            result.kind,
            result.action,
            result.outcome,
            result.delivery_id,
        )
        return result

    # -- bookkeeping ------------------------------------------------------------------------

    def _acted_on(self, key: str) -> bool:
        with self.mailer.session() as session:
            outcome = (
                session.connection()
                .execute(select(_inbound.c.outcome).where(_inbound.c.message_key == key))
                .scalar_one_or_none()
            )
        return outcome == Outcome.PROCESSED.value

    def _set_aside(
        self, inbound: Inbound, outcome: Outcome, action: Action, detail: str
    ) -> InboundResult:
        return self._remember(inbound, InboundResult(inbound.kind, outcome, action, detail))

    def _remember(self, inbound: Inbound, result: InboundResult) -> InboundResult:
        try:
            with self.mailer.session() as session:
                seen = _claim(session, inbound)
                _settle(session, inbound, result)
        except (_AlreadyProcessed, IntegrityError):
            return _already(inbound)
        return replace(result, seen=seen)

    # -- matching ---------------------------------------------------------------------------

    def _match(self, session: Session, inbound: Inbound) -> _Match | None:
        key = self.settings.verp_key
        delivery_id = next(
            (d for d in (parse_verp(a, key) for a in inbound.verp_candidates) if d is not None),
            None,
        )
        if delivery_id is not None:
            found = _delivery(session, _deliveries.c.id == delivery_id)
            if found is not None:
                return found
        if inbound.original_message_id:
            return _delivery(session, _deliveries.c.message_id == inbound.original_message_id)
        return None

    # -- actions ----------------------------------------------------------------------------

    def _act(self, session: Session, inbound: Inbound, match: _Match) -> tuple[Action, str]:
        if match.contact_id is None or match.address_hash is None:
            return Action.CONTACT_GONE, "the person was erased; their address stays suppressed"
        _lock_contact(session, match.contact_id)
        if inbound.kind is Kind.DSN:
            return self._bounce(session, inbound, match)
        return self._complaint(session, inbound, match)

    def _bounce(self, session: Session, inbound: Inbound, match: _Match) -> tuple[Action, str]:
        status = inbound.status
        assert status is not None and match.address_hash is not None
        kind = status.bounce
        if kind is None:
            return Action.SUCCESS_REPORT, f"{status.action} ({status.status}): no action"
        if kind is BounceKind.HARD:
            created = self._suppress(
                session,
                match,
                SuppressionReason.HARD_BOUNCE,
                source=f"dsn {status.status} delivery:{match.delivery_id}",
                note=status.diagnostic,
            )
            action = Action.HARD_BOUNCE
            detail = f"hard bounce {status.status}, {_suppressed(created)}"
        elif _counted_before(session, match.delivery_id):
            action = Action.SOFT_BOUNCE_AGAIN
            detail = f"soft bounce {status.status} ({status.action}), already counted for it"
        else:
            count = int(
                session.connection()
                .execute(_COUNT_SOFT_BOUNCE, {"address_hash": match.address_hash, "now": utcnow()})
                .scalar_one()
            )
            limit = self.settings.soft_bounce_limit
            if count >= limit:
                created = self._suppress(
                    session,
                    match,
                    SuppressionReason.HARD_BOUNCE,
                    source=f"soft bounces {count} of {limit}, last dsn {status.status}",
                    note=status.diagnostic,
                )
                action = Action.SOFT_BOUNCE_LIMIT
                detail = f"soft bounce {status.status}, {count} of {limit}: {_suppressed(created)}"
            else:
                action = Action.SOFT_BOUNCE
                detail = f"soft bounce {status.status} ({status.action}), {count} of {limit}"
        events.emit(
            session,
            EventType.MESSAGE_BOUNCED,
            {
                **_ids(match),
                "kind": kind.value,
                "action": status.action,
                "status": status.status,
                "diagnostic": status.diagnostic,
            },
            contact_id=match.contact_id,
        )
        return action, detail

    def _complaint(self, session: Session, inbound: Inbound, match: _Match) -> tuple[Action, str]:
        feedback = inbound.feedback
        assert feedback is not None and match.contact_id is not None
        if feedback.feedback_type in NOT_A_COMPLAINT:
            return Action.NOT_SPAM, f"{feedback.feedback_type} report: no action"
        states = consent.current_states(session, [match.contact_id]).get(match.contact_id, {})
        withdrawn = []
        for purpose in dict.fromkeys((match.purpose, MARKETING)):
            state = states.get(purpose)
            if state is not None and state.status is ConsentStatus.WITHDRAWN:
                continue
            consent.record(
                session,
                contact_id=match.contact_id,
                purpose=purpose,
                status=ConsentStatus.WITHDRAWN,
                method=ConsentMethod.COMPLAINT.value,
                source=f"{COMPLAINT_SOURCE} ({feedback.feedback_type} report)",
                evidence=f"campaign:{match.campaign_id}:delivery:{match.delivery_id}",
            )
            withdrawn.append(purpose)
        created = self._suppress(
            session,
            match,
            SuppressionReason.COMPLAINT,
            source=f"{COMPLAINT_SOURCE} {feedback.feedback_type} delivery:{match.delivery_id}",
            note=None,
        )
        events.emit(
            session,
            EventType.MESSAGE_COMPLAINED,
            {**_ids(match), "feedback_type": feedback.feedback_type},
            contact_id=match.contact_id,
        )
        return Action.COMPLAINT, (
            f"{feedback.feedback_type} complaint: {_withdrew(withdrawn)}, {_suppressed(created)}"
        )

    def _suppress(
        self,
        session: Session,
        match: _Match,
        reason: SuppressionReason,
        *,
        source: str,
        note: str | None,
    ) -> bool:
        assert match.address_hash is not None
        return suppression.suppress(
            session,
            match.address_hash,
            reason,
            source=source,
            note=note,
            contact_id=match.contact_id,
            email=match.email,
        ).created

    def _unsubscribe(self, inbound: Inbound) -> InboundResult:
        from mailer import recipients

        token = inbound.unsubscribe_token
        assert token is not None
        try:
            self.tokens.verify(TokenKind.UNSUBSCRIBE, token)
            done = recipients.unsubscribe(
                self.mailer,
                self.tokens,
                token,
                method=ConsentMethod.MAILTO,
                requester=recipients.Requester(),
            )
        except BadToken:
            result = InboundResult(
                inbound.kind,
                Outcome.UNMATCHED,
                Action.INVALID_TOKEN,
                "mail to the unsubscribe address with an invalid or forged token: nothing done",
            )
            return self._remember(inbound, result)
        except NotFound:
            result = InboundResult(
                inbound.kind,
                Outcome.UNMATCHED,
                Action.NO_DELIVERY,
                "the unsubscribe token names no delivery (any more): nothing done",
            )
            return self._remember(inbound, result)
        context = done.context
        result = InboundResult(
            inbound.kind,
            Outcome.PROCESSED,
            Action.UNSUBSCRIBED,
            f"delivery {context.delivery_id} (campaign {context.campaign_title}): unsubscribed "
            f"by mail: {_withdrew(done.withdrawn)}, {_suppressed(done.suppressed_now)}",
            context.delivery_id,
            context.campaign_title,
        )
        # The unsubscribe committed on its own (it is idempotent: a crash before this line
        # and a re-run withdraw and suppress nothing twice); this only remembers the mail.
        return self._remember(inbound, result)


def process_message(mailer: Mailer, raw: bytes, envelope_rcpt: str | None = None) -> InboundResult:
    """Process one inbound mail (its bytes, and the SMTP envelope recipient when known)."""
    return InboundProcessor(mailer).process(raw, (envelope_rcpt,) if envelope_rcpt else ())


# -- helpers ------------------------------------------------------------------------------------


def _claim(session: Session, inbound: Inbound) -> bool:
    """Remember the mail, first thing in its transaction: the unique key makes a duplicate (or
    a concurrent process with the same mail) fail before anything is written twice. A mail set
    aside before may be tried again. Returns whether it was seen (and set aside) before."""
    conn = session.connection()
    previous = conn.execute(
        select(_inbound.c.outcome).where(_inbound.c.message_key == inbound.message_key)
    ).scalar_one_or_none()
    if previous == Outcome.PROCESSED.value:
        raise _AlreadyProcessed
    if previous is not None:
        conn.execute(delete(_inbound).where(_inbound.c.message_key == inbound.message_key))
    conn.execute(
        insert(_inbound).values(
            message_key=inbound.message_key,
            kind=inbound.kind.value,
            outcome=Outcome.PROCESSED.value,
            action=Action.ALREADY_PROCESSED.value,
            processed_at=utcnow(),
        )
    )
    return previous is not None


def _settle(session: Session, inbound: Inbound, result: InboundResult) -> None:
    session.connection().execute(
        update(_inbound)
        .where(_inbound.c.message_key == inbound.message_key)
        .values(
            outcome=result.outcome.value,
            action=result.action.value,
            delivery_id=result.delivery_id,
        )
    )


def _already(inbound: Inbound) -> InboundResult:
    return InboundResult(
        inbound.kind, Outcome.PROCESSED, Action.ALREADY_PROCESSED, "already processed", seen=True
    )


def _suppressed(created: bool) -> str:
    return "address suppressed" if created else "address was suppressed already"


def _withdrew(purposes: Sequence[str]) -> str:
    return f"withdrew {', '.join(purposes)}" if purposes else "consent was withdrawn already"


def _delivery(session: Session, condition: Any) -> _Match | None:
    row = (
        session.connection()
        .execute(
            select(
                _deliveries.c.id,
                _deliveries.c.campaign_id,
                _deliveries.c.contact_id,
                _campaigns.c.name,
                _campaigns.c.purpose,
                _contacts.c.email,
                _contacts.c.email_hash,
            )
            .select_from(_deliveries)
            .join(_campaigns, _campaigns.c.id == _deliveries.c.campaign_id)
            .outerjoin(_contacts, _contacts.c.id == _deliveries.c.contact_id)
            .where(condition)
            .limit(1)
        )
        .first()
    )
    if row is None:
        return None
    present = row.email is not None
    return _Match(
        delivery_id=row.id,
        campaign_id=row.campaign_id,
        campaign=row.name,
        purpose=row.purpose,
        contact_id=row.contact_id if present else None,
        email=row.email,
        address_hash=row.email_hash,
    )


def _counted_before(session: Session, delivery_id: int) -> bool:
    return (
        session.connection()
        .execute(
            select(_inbound.c.id)
            .where(_inbound.c.delivery_id == delivery_id, _inbound.c.action.in_(_COUNTED))
            .limit(1)
        )
        .first()
        is not None
    )


def _lock_contact(session: Session, contact_id: int) -> None:
    """Serialise with an unsubscribe or another report for the same person (a row lock on
    PostgreSQL, the write lock on SQLite), as mailer.recipients does."""
    session.connection().execute(
        update(_contacts)
        .where(_contacts.c.id == contact_id)
        .values(updated_at=_contacts.c.updated_at)
    )


def _ids(match: _Match) -> dict[str, Any]:
    return {
        "delivery_id": match.delivery_id,
        "campaign_id": match.campaign_id,
        "campaign": match.campaign,
        "contact_id": match.contact_id,
        "email": match.email,
    }
