"""What recipients do through the links in their mail and the company's sign-up form.

    unsubscribe           the page's button or a mail client's RFC 8058 one-click POST
    start_subscription    a sign-up: pending consent, a Subscription, the confirmation mail
    confirm               the person's confirmed double opt-in (lifts an earlier unsubscribe)
    preferences_for       what the preference centre shows
    update_preferences    per-purpose choices, name and language
    unsubscribe_all       the preference centre's "unsubscribe from everything"

A request for a copy of one's data is `mailer.data_copy`.

No HTTP here: the web app (`mailer.tracking.pages`) reads requests and renders pages, these
functions decide and write. Every change is committed before they return (invariant 9), and
every consent change is a ledger row with the request's masked IP and user agent.

Evidence on ledger rows: rows by which a person ended up unsubscribed through a mail's links
carry `campaign:C:delivery:D` (the campaign report counts unsubscribes by that prefix); other
preference-centre rows carry `preferences:campaign:C:delivery:D`; double opt-in rows carry
`subscription:S`.
"""

from __future__ import annotations

import email.policy
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from functools import cache
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from mailer import audit, consent, events, suppression
from mailer.addresses import mask_address, normalise_address
from mailer.branding import Palette
from mailer.config import Settings
from mailer.consent import MARKETING, TRACKING
from mailer.errors import (
    BadInput,
    ConfigError,
    DatabaseError,
    InvalidAddress,
    MailerError,
    NotFound,
)
from mailer.events import EventType
from mailer.i18n import LANGUAGES, Language, Translator, language_or_none
from mailer.masking import mask_ip
from mailer.message import HeaderInjection
from mailer.models import (
    Campaign,
    ConsentMethod,
    ConsentRecord,
    ConsentStatus,
    Contact,
    Delivery,
    Subscription,
    SubscriptionStatus,
    SuppressionReason,
    as_utc,
    utcnow,
)
from mailer.service import Mailer
from mailer.tokens import BadToken, ExpiredToken, TokenKind, Tokens
from mailer.transport import Transport

logger = logging.getLogger("mailer.recipients")

# A confirmation mail goes to one address at most once per interval and this often per day,
# however often the form is submitted for it: the sign-up form must not become a way to
# flood someone's mailbox.
CONFIRMATION_INTERVAL = timedelta(minutes=10)
CONFIRMATIONS_PER_DAY = 5
MAX_PURPOSES = 10
MAX_NAME = 255
MAX_POLICY_VERSION = 64
MAX_WORDING = 4000
MAX_USER_AGENT = 512
SIGNUP_SOURCE = "signup form"
PREFERENCE_SOURCE = "preference centre"
ONE_CLICK_SOURCE = "list-unsubscribe-post"
PAGE_SOURCE = "unsubscribe page"
MAILTO_SOURCE = "list-unsubscribe mailto"
# The audit log's operator for changes the person made themself: no operator acted.
PREFERENCE_OPERATOR = f"recipient ({PREFERENCE_SOURCE})"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_UNSAFE = re.compile(r"[\r\n\0]")
_CONTROL_EXCEPT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class AlreadyConfirmed(BadInput):
    """The confirmation link was used before: the subscription is confirmed already."""


# -- who acted ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requester:
    """What a ledger row keeps about the request that changed consent (obligation 5)."""

    ip_masked: str | None = None
    user_agent: str | None = None

    @classmethod
    def from_raw(cls, ip: str | None, user_agent: str | None) -> Requester:
        """Mask the IP (IPv4 /24, IPv6 /48); keep a printable, bounded user agent."""
        masked = None
        if ip:
            try:
                masked = mask_ip(ip)
            except ValueError:
                masked = None
        agent = None
        if user_agent:
            agent = _CONTROL.sub(" ", user_agent)[:MAX_USER_AGENT].strip() or None
        return cls(masked, agent)


# -- a delivery's links ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryContext:
    """The delivery an unsubscribe or preference link belongs to, and its recipient."""

    delivery_id: int
    campaign_id: int
    campaign_title: str
    purpose: str
    contact_id: int
    masked_address: str
    name: str | None
    locale: str | None
    suppressed: tuple[str, ...]  # suppression reasons in force for the address

    @property
    def unsubscribed(self) -> bool:
        return SuppressionReason.UNSUBSCRIBED.value in self.suppressed

    @property
    def evidence(self) -> str:
        """The evidence of an unsubscribe through this delivery's links."""
        return f"campaign:{self.campaign_id}:delivery:{self.delivery_id}"

    @property
    def preference_evidence(self) -> str:
        return f"preferences:{self.evidence}"


def _load_delivery(
    session: Session, tokens: Tokens, kind: TokenKind, token: str
) -> tuple[Delivery, Campaign, Contact]:
    payload = tokens.verify(kind, token)
    # (delivery_id,) today; (delivery_id, campaign_id) is accepted too, and then must match.
    if len(payload) > 2:
        raise BadToken(f"unexpected {kind.name.lower()} token payload")
    delivery = session.get(Delivery, payload[0])
    if delivery is None or (len(payload) == 2 and payload[1] != delivery.campaign_id):
        raise NotFound("no such delivery")
    campaign = session.get(Campaign, delivery.campaign_id)
    contact = session.get(Contact, delivery.contact_id)
    if campaign is None or contact is None:
        raise NotFound("no such delivery")
    return delivery, campaign, contact


def _context(
    session: Session, delivery: Delivery, campaign: Campaign, contact: Contact
) -> DeliveryContext:
    assert delivery.id is not None and campaign.id is not None and contact.id is not None
    title = (campaign.definition or {}).get("list_name") or campaign.name
    reasons = suppression.active(session, [contact.email_hash]).get(contact.email_hash, [])
    return DeliveryContext(
        delivery_id=delivery.id,
        campaign_id=campaign.id,
        campaign_title=str(title),
        purpose=campaign.purpose,
        contact_id=contact.id,
        masked_address=mask_address(contact.email),
        name=contact.name,
        locale=contact.locale,
        suppressed=tuple(sorted(set(reasons))),
    )


def _lock_contact(session: Session, contact_id: int) -> None:
    """Serialise changes for one person: a row lock on PostgreSQL, the write lock on SQLite.

    A no-op UPDATE rather than SELECT ... FOR UPDATE, because SQLite has no row locks and only
    takes its write lock on the first write: this way every later read in the transaction sees
    what a concurrent request for the same person committed before it.
    """
    contacts = Contact.__table__  # type: ignore[attr-defined]
    session.connection().execute(
        update(contacts).where(contacts.c.id == contact_id).values(updated_at=contacts.c.updated_at)
    )


def delivery_for(mailer: Mailer, tokens: Tokens, kind: TokenKind, token: str) -> DeliveryContext:
    """Read-only: what an unsubscribe or preference link shows. BadToken or NotFound otherwise."""
    with mailer.session() as session:
        return _context(session, *_load_delivery(session, tokens, kind, token))


# -- unsubscribe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unsubscribed:
    context: DeliveryContext
    withdrawn: tuple[str, ...]  # purposes withdrawn now (empty when repeated)
    suppressed_now: bool  # False when the address already had an unsubscribe suppression


def unsubscribe(
    mailer: Mailer,
    tokens: Tokens,
    token: str,
    *,
    method: ConsentMethod,
    requester: Requester,
) -> Unsubscribed:
    """Withdraw the campaign's purpose and `marketing`, and suppress the address (invariant 4).

    Idempotent: a purpose whose latest ledger row is already a withdrawal gets no second row,
    and suppressing again is a no-op. Committed before this returns.
    """
    sources = {
        ConsentMethod.ONE_CLICK: ONE_CLICK_SOURCE,
        ConsentMethod.UNSUBSCRIBE_LINK: PAGE_SOURCE,
        ConsentMethod.MAILTO: MAILTO_SOURCE,  # mailer.inbound, a mail to the mailto: address
    }
    if method not in sources:
        raise ValueError(f"not an unsubscribe method: {method}")
    source = sources[method]
    with mailer.session() as session:
        delivery, campaign, contact = _load_delivery(session, tokens, TokenKind.UNSUBSCRIBE, token)
        assert contact.id is not None
        _lock_contact(session, contact.id)
        context = _context(session, delivery, campaign, contact)
        withdrawn = _withdraw(
            session,
            context,
            purposes=(campaign.purpose, MARKETING),
            explicit={campaign.purpose, MARKETING},
            method=method,
            source=source,
            requester=requester,
            evidence=context.evidence,
        )
        result = suppression.suppress(
            session,
            contact.email_hash,
            SuppressionReason.UNSUBSCRIBED,
            source=f"{method.value} {context.evidence}",
            contact_id=contact.id,
            email=contact.email,
        )
        _emit_unsubscribed(session, context, campaign, contact, method, withdrawn, result.created)
    logger.info(
        "delivery %s unsubscribed by %s (withdrawn: %s)",
        context.delivery_id,
        method.value,
        ", ".join(withdrawn) or "nothing new",
    )
    return Unsubscribed(context, withdrawn, result.created)


def _emit_unsubscribed(
    session: Session,
    context: DeliveryContext,
    campaign: Campaign,
    contact: Contact,
    method: ConsentMethod,
    withdrawn: Sequence[str],
    suppressed_now: bool,
) -> None:
    """`contact.unsubscribed`, in the unsubscribing transaction; a repeated unsubscribe that
    changed nothing is no new event."""
    if not withdrawn and not suppressed_now:
        return
    events.emit(
        session,
        EventType.CONTACT_UNSUBSCRIBED,
        {
            "contact_id": context.contact_id,
            "email": contact.email,
            "campaign_id": context.campaign_id,
            "campaign": campaign.name,
            "delivery_id": context.delivery_id,
            "method": method.value,
            "purposes": list(withdrawn),
        },
        contact_id=context.contact_id,
    )


def _withdraw(
    session: Session,
    context: DeliveryContext,
    *,
    purposes: Iterable[str],
    explicit: set[str],
    method: ConsentMethod,
    source: str,
    requester: Requester,
    evidence: str,
) -> tuple[str, ...]:
    """Append a withdrawal for each purpose not already withdrawn. Purposes in `explicit` get
    one even when the person never had a row for them (the withdrawal is evidence too)."""
    states = consent.current_states(session, [context.contact_id]).get(context.contact_id, {})
    done: list[str] = []
    for purpose in dict.fromkeys(purposes):
        state = states.get(purpose)
        if state is None and purpose not in explicit:
            continue
        if state is not None and state.status is ConsentStatus.WITHDRAWN:
            continue
        consent.record(
            session,
            contact_id=context.contact_id,
            purpose=purpose,
            status=ConsentStatus.WITHDRAWN,
            method=method.value,
            source=source,
            ip_masked=requester.ip_masked,
            user_agent=requester.user_agent,
            evidence=evidence,
        )
        done.append(purpose)
    return tuple(done)


# -- double opt-in -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SignUp:
    """A validated sign-up from the company's form."""

    email: str  # normalised
    purposes: tuple[str, ...]
    policy_version: str
    wording: str
    name: str | None = None
    locale: Language | None = None  # only when the form says so explicitly

    @classmethod
    def validated(
        cls,
        *,
        email: str | None,
        purposes: Sequence[str] = (),
        policy_version: str | None,
        wording: str | None,
        name: str | None = None,
        locale: str | None = None,
    ) -> SignUp:
        """Check every field (BadInput naming the field); nothing about the address's history
        is looked at, so an error never reveals whether an address is known."""
        if not email or not email.strip():
            raise InvalidAddress("email is required")
        address = normalise_address(email)
        if not _ascii_address(address):
            raise InvalidAddress(
                "email: addresses with non-ASCII characters before the @ are not supported"
            )
        cleaned = _purposes([p for raw in purposes for p in raw.split(",") if p.strip()])
        if not policy_version or not policy_version.strip():
            raise BadInput("policy_version is required: the version of the privacy statement shown")
        version = _single_line(policy_version, "policy_version", MAX_POLICY_VERSION)
        if not wording or not wording.strip():
            raise BadInput("wording is required: the consent text the person agreed to")
        text = _text(wording, "wording", MAX_WORDING)
        given_name = _single_line(name, "name", MAX_NAME) if name and name.strip() else None
        language = None
        if locale and locale.strip():
            language = language_or_none(locale)
            if language is None:
                raise BadInput(f"locale: choose one of {', '.join(LANGUAGES)}")
        return cls(address, cleaned, version, text, given_name, language)


def _purposes(raw: Sequence[str]) -> tuple[str, ...]:
    if not raw:
        return (MARKETING,)
    if len(raw) > MAX_PURPOSES:
        raise BadInput(f"purposes: at most {MAX_PURPOSES}")
    return tuple(dict.fromkeys(consent.check_purpose(p) for p in raw))


def _single_line(value: str, field: str, limit: int) -> str:
    cleaned = value.strip()
    if _CONTROL.search(cleaned):
        raise BadInput(f"{field}: line breaks and control characters are not allowed")
    if len(cleaned) > limit:
        raise BadInput(f"{field}: at most {limit} characters")
    return cleaned


def _text(value: str, field: str, limit: int) -> str:
    cleaned = value.strip()
    if _CONTROL_EXCEPT_LINES.search(cleaned):
        raise BadInput(f"{field}: control characters are not allowed")
    if len(cleaned) > limit:
        raise BadInput(f"{field}: at most {limit} characters")
    return cleaned


def _ascii_address(address: str) -> str | None:
    """The address with an ASCII (IDNA) domain, or None when its local part is not ASCII."""
    try:
        result = validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return None
    return result.ascii_email


@dataclass(frozen=True)
class ConfirmationMail:
    """A confirmation mail, built and recorded, ready to hand to a Transport."""

    subscription_id: int
    envelope_from: str
    recipient: str
    data: bytes


def start_subscription(
    mailer: Mailer,
    tokens: Tokens,
    signup: SignUp,
    requester: Requester,
    *,
    language: Language,
) -> ConfirmationMail | None:
    """Record a sign-up and build its confirmation mail (send it with `send_confirmation`).

    Pending ledger rows (method `form`) are appended only for purposes the person does not
    already allow: a sign-up nobody confirmed must never take away consent already given (or
    let a stranger do that). A new contact gets the form's name and language; a known one keeps
    its own, since nobody has confirmed the form yet.

    Returns None, recording nothing, when this address was mailed a confirmation within
    CONFIRMATION_INTERVAL or CONFIRMATIONS_PER_DAY times in the last day: the earlier mail's
    link still works. The caller answers the same either way.
    """
    for _attempt in range(2):
        try:
            with mailer.session() as session:
                contact, created = mailer._contact_for(session, signup.email)
                assert contact.id is not None
                if created:
                    contact.name = signup.name
                    contact.locale = signup.locale
                    session.add(contact)
                    session.flush()
                else:
                    _lock_contact(session, contact.id)
                return open_subscription(
                    session,
                    mailer.settings,
                    tokens,
                    contact,
                    purposes=signup.purposes,
                    policy_version=signup.policy_version,
                    wording=signup.wording,
                    source=SIGNUP_SOURCE,
                    method=ConsentMethod.FORM,
                    requester=requester,
                    language=language,
                )
        except IntegrityError:
            continue  # the same new address signed up twice at once: the other one created it
    raise DatabaseError("could not record the sign-up")


def _mail_held_back(session: Session, contact_id: int, now: datetime) -> bool:
    count, last = session.exec(
        select(func.count(), func.max(Subscription.mailed_at)).where(
            Subscription.contact_id == contact_id,
            col(Subscription.mailed_at) >= now - timedelta(days=1),
        )
    ).one()
    if count >= CONFIRMATIONS_PER_DAY:
        return True
    return last is not None and as_utc(last) > now - CONFIRMATION_INTERVAL


def open_subscription(
    session: Session,
    settings: Settings,
    tokens: Tokens,
    contact: Contact,
    *,
    purposes: Sequence[str],
    policy_version: str | None,
    wording: str | None,
    source: str,
    method: ConsentMethod,
    requester: Requester,
    language: Language,
) -> ConfirmationMail | None:
    """Start a double opt-in for a contact inside the caller's transaction (a sign-up, a
    preference change, or a re-permission); None when the per-address limit holds it back."""
    assert contact.id is not None
    now = utcnow()
    if _mail_held_back(session, contact.id, now):
        logger.info("confirmation mail for contact %s held back: mailed recently", contact.id)
        return None
    subscription = Subscription(
        contact_id=contact.id,
        purposes=list(purposes),
        policy_version=policy_version,
        wording=wording,
        source=source,
        requested_at=now,
        ip_masked=requester.ip_masked,
        user_agent=requester.user_agent,
        mailed_at=now,  # when the mail was handed over: the per-address limit counts these
        status=SubscriptionStatus.PENDING.value,
    )
    session.add(subscription)
    session.flush()
    assert subscription.id is not None
    states = consent.current_states(session, [contact.id]).get(contact.id, {})
    for purpose in purposes:
        state = states.get(purpose)
        if state is not None and state.allows:
            continue
        consent.record(
            session,
            contact_id=contact.id,
            purpose=purpose,
            status=ConsentStatus.PENDING,
            method=method.value,
            source=source,
            consent_at=now,
            policy_version=policy_version,
            wording=wording,
            ip_masked=requester.ip_masked,
            user_agent=requester.user_agent,
            evidence=f"subscription:{subscription.id}",
        )
    events.emit(
        session,
        EventType.CONTACT_SUBSCRIBED,
        {
            "contact_id": contact.id,
            "email": contact.email,
            "subscription_id": subscription.id,
            "purposes": list(purposes),
            "policy_version": policy_version,
            "source": source,
            "method": method.value,
        },
        contact_id=contact.id,
    )
    token = tokens.sign(TokenKind.CONFIRM, (subscription.id,))
    envelope_from, recipient, data = build_confirmation_mail(
        settings,
        to=contact.email,
        confirm_url=f"{settings.base_url}/confirm/{token}",
        purposes=purposes,
        language=language,
        now=now,
    )
    return ConfirmationMail(subscription.id, envelope_from, recipient, data)


async def send_confirmation(transport: Transport, mail: ConfirmationMail) -> bool:
    """Hand the mail to the transport; False (and a log line) when it was not accepted.

    The sign-up stays recorded either way: the person can submit the form again once the
    per-address interval has passed.
    """
    try:
        result = await transport.send(mail.envelope_from, mail.recipient, mail.data)
    except (MailerError, OSError) as exc:
        logger.warning(
            "confirmation mail for subscription %s not sent: %s", mail.subscription_id, exc
        )
        return False
    if result.status != "sent":
        logger.warning(
            "confirmation mail for subscription %s not sent: %s %s",
            mail.subscription_id,
            result.status,
            result.message,
        )
        return False
    return True


@dataclass(frozen=True)
class PendingConfirmation:
    """What the confirmation page shows."""

    subscription_id: int
    masked_address: str
    purposes: tuple[str, ...]
    wording: str | None
    policy_version: str | None
    locale: str | None


def _subscription_id(tokens: Tokens, token: str) -> int:
    payload = tokens.verify(TokenKind.CONFIRM, token)
    if len(payload) != 1:
        raise BadToken("unexpected confirmation token payload")
    return payload[0]


def confirmation_for(mailer: Mailer, tokens: Tokens, token: str) -> PendingConfirmation:
    """Read-only. BadToken, ExpiredToken, NotFound or AlreadyConfirmed when there is nothing
    left to confirm."""
    subscription_id = _subscription_id(tokens, token)
    with mailer.session() as session:
        subscription = session.get(Subscription, subscription_id)
        if subscription is None:
            raise NotFound("no such subscription")
        _check_open(subscription.status)
        contact = session.get(Contact, subscription.contact_id)
        if contact is None:
            raise NotFound("no such subscription")
        return PendingConfirmation(
            subscription_id=subscription_id,
            masked_address=mask_address(contact.email),
            purposes=tuple(subscription.purposes),
            wording=subscription.wording,
            policy_version=subscription.policy_version,
            locale=contact.locale,
        )


def _check_open(status: str) -> None:
    if status == SubscriptionStatus.CONFIRMED.value:
        raise AlreadyConfirmed("this subscription is already confirmed")
    if status == SubscriptionStatus.EXPIRED.value:
        raise ExpiredToken("this subscription has expired")


@dataclass(frozen=True)
class Confirmed:
    subscription_id: int
    masked_address: str
    locale: str | None
    purposes: tuple[str, ...]
    lifted: tuple[str, ...]  # suppression reasons lifted (only ever `unsubscribed`)


def confirm(mailer: Mailer, tokens: Tokens, token: str, requester: Requester) -> Confirmed:
    """The person's confirmed double opt-in: `confirmed` ledger rows (method double_opt_in)
    with this request's masked IP and user agent, the policy version and wording of the
    sign-up, and `subscription:ID` as evidence. It lifts an unsubscribe suppression (and no
    other kind) when a mail purpose is confirmed. A second confirmation is AlreadyConfirmed."""
    subscription_id = _subscription_id(tokens, token)
    subscriptions = Subscription.__table__  # type: ignore[attr-defined]
    with mailer.session() as session:
        subscription = session.get(Subscription, subscription_id)
        if subscription is None:
            raise NotFound("no such subscription")
        _check_open(subscription.status)
        now = utcnow()
        # Claim the confirmation atomically: of two concurrent POSTs exactly one gets here.
        claimed = session.connection().execute(
            update(subscriptions)
            .where(
                subscriptions.c.id == subscription_id,
                subscriptions.c.status == SubscriptionStatus.PENDING.value,
            )
            .values(status=SubscriptionStatus.CONFIRMED.value, confirmed_at=now)
        )
        if claimed.rowcount != 1:
            raise AlreadyConfirmed("this subscription is already confirmed")
        contact = session.get(Contact, subscription.contact_id)
        if contact is None or contact.id is None:
            raise NotFound("no such subscription")
        _lock_contact(session, contact.id)
        records: list[ConsentRecord] = [
            consent.record(
                session,
                contact_id=contact.id,
                purpose=purpose,
                status=ConsentStatus.CONFIRMED,
                method=ConsentMethod.DOUBLE_OPT_IN.value,
                source=subscription.source,
                consent_at=now,
                policy_version=subscription.policy_version,
                wording=subscription.wording,
                ip_masked=requester.ip_masked,
                user_agent=requester.user_agent,
                evidence=f"subscription:{subscription_id}",
            )
            for purpose in subscription.purposes
        ]
        mail_record = next((r for r in records if r.purpose != TRACKING), None)
        lifted = (
            suppression.lift_by_double_opt_in(session, contact.email_hash, mail_record)
            if mail_record is not None
            else []
        )
        events.emit(
            session,
            EventType.CONTACT_CONFIRMED,
            {
                "contact_id": contact.id,
                "email": contact.email,
                "subscription_id": subscription_id,
                "purposes": list(subscription.purposes),
                "policy_version": subscription.policy_version,
                "source": subscription.source,  # "re-permission" for a re-permission
                "method": ConsentMethod.DOUBLE_OPT_IN.value,
            },
            contact_id=contact.id,
        )
        result = Confirmed(
            subscription_id=subscription_id,
            masked_address=mask_address(contact.email),
            locale=contact.locale,
            purposes=tuple(subscription.purposes),
            lifted=tuple(row.reason for row in lifted),
        )
    logger.info("subscription %s confirmed", subscription_id)
    return result


# -- the confirmation mail ---------------------------------------------------------------------


@cache
def _mail_templates() -> Environment:
    return Environment(
        loader=PackageLoader("mailer", "templates/pages"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def confirmation_sender(settings: Settings) -> tuple[str, str]:
    """(display name, address) of the confirmation mail: `mail_from`, else noreply@ the base
    URL's host name."""
    name, address = settings.sender_name, ""
    if settings.mail_from:
        if _HEADER_UNSAFE.search(settings.mail_from):
            raise HeaderInjection("mail_from contains a line break or NUL: refused")
        parsed_name, address = parseaddr(settings.mail_from)
        name = parsed_name or name
        if not address:
            raise ConfigError(f"mail_from {settings.mail_from!r} is not an e-mail address")
    else:
        host = urlsplit(settings.base_url).hostname or "localhost"
        try:
            ip_address(host)
        except ValueError:
            pass
        else:
            host = "localhost"  # an IP literal is no mail domain
        address = f"noreply@{host}"
    return name, address


def build_transactional_mail(
    settings: Settings,
    *,
    to: str,
    subject: str,
    template: str,
    context: dict[str, Any],
    language: Language,
    now: datetime,
    what: str,
) -> tuple[str, str, bytes]:
    """(envelope sender, recipient, message bytes) of a mail the person's own action asked for
    (a double opt-in or data-copy confirmation), rendered from `template`.txt and .html.

    Transactional: no List-Unsubscribe (there is nothing to unsubscribe from) and
    `Auto-Submitted: auto-generated` (RFC 3834). Built with the standard library's
    EmailMessage; CR, LF or NUL in any header value is refused (HeaderInjection).
    """
    name, sender = confirmation_sender(settings)
    recipient = _ascii_address(to)
    if recipient is None:
        raise InvalidAddress("the address has a non-ASCII local part: not supported")
    for field, value in (
        ("sender name", name),
        ("sender address", sender),
        ("recipient", recipient),
        ("subject", subject),
    ):
        if _HEADER_UNSAFE.search(value):
            raise HeaderInjection(f"{field} contains a line break or NUL: refused")
    try:
        from_header = Address(display_name=name, addr_spec=sender)
        to_header = Address(addr_spec=recipient)
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"cannot address the {what}: {exc}") from None
    context = {
        "lang": language,
        "sender": settings.sender_name,
        "postal_address": settings.postal_address,
        "palette": Palette.from_brand(settings.brand_color),
        **context,
    }
    templates = _mail_templates()
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = from_header
    message["To"] = to_header
    message["Subject"] = subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = make_msgid(domain=from_header.domain or "localhost")
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(templates.get_template(f"{template}.txt").render(context))
    html = templates.get_template(f"{template}.html").render(context)
    message.add_alternative(html, subtype="html")
    message["Content-Language"] = language  # after the content: set_content clears Content-*
    return sender, recipient, message.as_bytes()


def build_confirmation_mail(
    settings: Settings,
    *,
    to: str,
    confirm_url: str,
    purposes: Sequence[str],
    language: Language,
    now: datetime,
) -> tuple[str, str, bytes]:
    """The double opt-in confirmation mail (see build_transactional_mail)."""
    t = Translator(language)
    return build_transactional_mail(
        settings,
        to=to,
        subject=t("mail.subject", sender=settings.sender_name),
        template="confirmation-mail",
        context={"t": t, "confirm_url": confirm_url, "purposes": [t.purpose(p) for p in purposes]},
        language=language,
        now=now,
        what="confirmation mail",
    )


# -- the preference centre ---------------------------------------------------------------------


@dataclass(frozen=True)
class PurposeChoice:
    purpose: str
    status: ConsentStatus | None

    @property
    def allowed(self) -> bool:
        return self.status in consent.ALLOWING

    @property
    def pending(self) -> bool:
        return self.status is ConsentStatus.PENDING


@dataclass(frozen=True)
class Preferences:
    context: DeliveryContext
    choices: tuple[PurposeChoice, ...]


def _listed_purposes(session: Session, contact_id: int, campaign_purpose: str) -> list[str]:
    """`marketing`, the campaign's purpose and every other purpose of the person's ledger,
    then `tracking` last."""
    rows = session.exec(
        select(ConsentRecord.purpose).where(ConsentRecord.contact_id == contact_id).distinct()
    )
    found = {MARKETING, campaign_purpose, *rows} - {TRACKING}
    return [MARKETING, *sorted(found - {MARKETING}), TRACKING]


def _preferences(session: Session, context: DeliveryContext, campaign_purpose: str) -> Preferences:
    states = consent.current_states(session, [context.contact_id]).get(context.contact_id, {})
    listed = _listed_purposes(session, context.contact_id, campaign_purpose)
    choices = tuple(PurposeChoice(p, states[p].status if p in states else None) for p in listed)
    return Preferences(context, choices)


def preferences_for(mailer: Mailer, tokens: Tokens, token: str) -> Preferences:
    """Read-only: what the preference centre shows."""
    with mailer.session() as session:
        delivery, campaign, contact = _load_delivery(session, tokens, TokenKind.PREFERENCES, token)
        return _preferences(
            session, _context(session, delivery, campaign, contact), campaign.purpose
        )


@dataclass(frozen=True)
class PreferenceChoices:
    """What the person submitted: the purposes shown and which of them are ticked."""

    shown: frozenset[str]
    wanted: frozenset[str]
    name: str | None  # None: not submitted; "" clears the name
    language: Language | None
    shown_in: Language  # the language of the page: the wording of each choice is recorded

    @classmethod
    def validated(
        cls,
        *,
        shown: Iterable[str],
        wanted: Iterable[str],
        name: str | None,
        language: str | None,
        shown_in: Language,
    ) -> PreferenceChoices:
        shown_set = frozenset(consent.check_purpose(p) for p in list(shown)[:64])
        wanted_set = frozenset(consent.check_purpose(p) for p in list(wanted)[:64]) & shown_set
        cleaned_name = None if name is None else _single_line(name, "name", MAX_NAME)
        chosen = None
        if language:
            chosen = language_or_none(language)
            if chosen is None:
                raise BadInput(f"language: choose one of {', '.join(LANGUAGES)}")
        return cls(shown_set, wanted_set, cleaned_name, chosen, shown_in)


@dataclass(frozen=True)
class PreferenceOutcome:
    preferences: Preferences  # as they are now
    granted: tuple[str, ...]
    withdrawn: tuple[str, ...]
    awaiting_confirmation: tuple[str, ...]  # asked for while suppressed: a double opt-in runs
    confirmation: ConfirmationMail | None  # to send; None when held back or not needed
    profile_changed: bool
    unsubscribed: bool  # everything withdrawn now: the address is suppressed

    @property
    def changed(self) -> bool:
        return bool(
            self.granted or self.withdrawn or self.awaiting_confirmation or self.profile_changed
        )


def update_preferences(
    mailer: Mailer,
    tokens: Tokens,
    token: str,
    choices: PreferenceChoices,
    requester: Requester,
) -> PreferenceOutcome:
    """Apply the preference centre's form. Every consent change is a ledger row (method
    preference_centre, the choice's wording as shown). Withdrawing every mail purpose adds the
    unsubscribe suppression. Asking for a mail purpose while the address is suppressed does not
    grant or lift anything: it starts a double opt-in (only its confirmation lifts an
    unsubscribe). Name and language changes update the contact (they are not consent, so they
    are audited, not put in the ledger)."""
    t = Translator(choices.shown_in)
    with mailer.session() as session:
        delivery, campaign, contact = _load_delivery(session, tokens, TokenKind.PREFERENCES, token)
        assert contact.id is not None
        _lock_contact(session, contact.id)
        context = _context(session, delivery, campaign, contact)
        before = _preferences(session, context, campaign.purpose)
        grants: list[str] = []
        withdrawals: list[str] = []
        via_opt_in: list[str] = []
        for choice in before.choices:
            if choice.purpose not in choices.shown:
                continue
            wanted = choice.purpose in choices.wanted
            if wanted and not choice.allowed:
                if context.suppressed and choice.purpose != TRACKING:
                    via_opt_in.append(choice.purpose)
                else:
                    grants.append(choice.purpose)
            elif not wanted and choice.allowed:
                withdrawals.append(choice.purpose)
        mail_purposes = {c.purpose for c in before.choices} - {TRACKING}
        allowed_after = ({c.purpose for c in before.choices if c.allowed} | set(grants)) - set(
            withdrawals
        )
        everything = bool(withdrawals) and not (allowed_after & mail_purposes)
        evidence = context.evidence if everything else context.preference_evidence
        for purpose in grants + withdrawals:
            consent.record(
                session,
                contact_id=contact.id,
                purpose=purpose,
                status=ConsentStatus.GRANTED if purpose in grants else ConsentStatus.WITHDRAWN,
                method=ConsentMethod.PREFERENCE_CENTRE.value,
                source=PREFERENCE_SOURCE,
                wording=t.purpose(purpose),
                ip_masked=requester.ip_masked,
                user_agent=requester.user_agent,
                evidence=evidence,
            )
        suppressed_now = False
        if everything:
            suppressed_now = suppression.suppress(
                session,
                contact.email_hash,
                SuppressionReason.UNSUBSCRIBED,
                source=f"{ConsentMethod.PREFERENCE_CENTRE.value} {context.evidence}",
                contact_id=contact.id,
                email=contact.email,
            ).created
            _emit_unsubscribed(
                session,
                context,
                campaign,
                contact,
                ConsentMethod.PREFERENCE_CENTRE,
                withdrawals,
                suppressed_now,
            )
        mail = None
        if via_opt_in:
            mail = open_subscription(
                session,
                mailer.settings,
                tokens,
                contact,
                purposes=via_opt_in,
                policy_version=None,
                wording="; ".join(t.purpose(p) for p in via_opt_in),
                source=PREFERENCE_SOURCE,
                method=ConsentMethod.PREFERENCE_CENTRE,
                requester=requester,
                language=choices.language or choices.shown_in,
            )
        profile_changes = _update_profile(session, contact, choices)
        profile_changed = bool(profile_changes)
        if profile_changes:
            # Field names only, never the values: the audit log outlives an erasure.
            audit.record(
                session,
                PREFERENCE_OPERATOR,
                "preferences.profile",
                contact.email_hash,
                {"fields": profile_changes, "delivery_id": context.delivery_id},
            )
            events.emit(
                session,
                EventType.CONTACT_UPDATED,
                {"contact_id": contact.id, "email": contact.email, "changes": profile_changes},
                contact_id=contact.id,
            )
        context = _context(session, delivery, campaign, contact)
        after = _preferences(session, context, campaign.purpose)
    if grants or withdrawals or via_opt_in or profile_changed:
        logger.info(
            "preferences of contact %s changed via delivery %s: granted %s, withdrawn %s, "
            "double opt-in for %s, profile %s",
            context.contact_id,
            context.delivery_id,
            grants,
            withdrawals,
            via_opt_in,
            "changed" if profile_changed else "unchanged",
        )
    return PreferenceOutcome(
        preferences=after,
        granted=tuple(grants),
        withdrawn=tuple(withdrawals),
        awaiting_confirmation=tuple(via_opt_in),
        confirmation=mail,
        profile_changed=profile_changed,
        unsubscribed=everything or suppressed_now,
    )


def _update_profile(session: Session, contact: Contact, choices: PreferenceChoices) -> list[str]:
    """Apply the name and language choices; returns the names of the fields changed."""
    changed: list[str] = []
    if choices.name is not None and (choices.name or None) != contact.name:
        contact.name = choices.name or None
        changed.append("name")
    if choices.language is not None and language_or_none(contact.locale) != choices.language:
        contact.locale = choices.language
        changed.append("locale")
    if changed:
        contact.updated_at = utcnow()
        session.add(contact)
        session.flush()
    return changed


def unsubscribe_all(
    mailer: Mailer, tokens: Tokens, token: str, requester: Requester
) -> Unsubscribed:
    """The preference centre's "unsubscribe from everything": every purpose the person allows
    (or has pending), `marketing` and the campaign's purpose are withdrawn, and the address is
    suppressed."""
    with mailer.session() as session:
        delivery, campaign, contact = _load_delivery(session, tokens, TokenKind.PREFERENCES, token)
        assert contact.id is not None
        _lock_contact(session, contact.id)
        context = _context(session, delivery, campaign, contact)
        listed = _listed_purposes(session, contact.id, campaign.purpose)
        withdrawn = _withdraw(
            session,
            context,
            purposes=listed,
            explicit={MARKETING, campaign.purpose},
            method=ConsentMethod.PREFERENCE_CENTRE,
            source=PREFERENCE_SOURCE,
            requester=requester,
            evidence=context.evidence,
        )
        result = suppression.suppress(
            session,
            contact.email_hash,
            SuppressionReason.UNSUBSCRIBED,
            source=f"{ConsentMethod.PREFERENCE_CENTRE.value} {context.evidence}",
            contact_id=contact.id,
            email=contact.email,
        )
        _emit_unsubscribed(
            session,
            context,
            campaign,
            contact,
            ConsentMethod.PREFERENCE_CENTRE,
            withdrawn,
            result.created,
        )
    logger.info(
        "contact %s unsubscribed from everything via delivery %s",
        context.contact_id,
        context.delivery_id,
    )
    return Unsubscribed(context, withdrawn, result.created)

