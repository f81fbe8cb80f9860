"""A person's own request for a copy of their data (obligation 10), from the preference centre.

    request_copy        register the access request (identity check pending) and build the mail
                        with the confirmation link to the address; None when recently mailed
    send_identity_mail  hand that mail to a transport
    pending_for         what the confirmation page shows; changes nothing (link scanners GET it)
    confirm_identity    the person followed the link and pressed the button: identity verified,
                        and a timed download link for the copy
    download            the copy, made now from the live data; the first download answers the
                        request in the register
    check_download      whether a download link works, changing nothing (for HEAD)

The identity check is the mailbox: the confirmation link goes to the address the data belongs
to, and only a person who can read that mailbox can follow it. The copy is then offered as a
download on the page the person is looking at, never mailed: a copy in a mail sits in mailboxes,
backups and forwards for ever, while a link works for ACCESS_DOWNLOAD_MAX_AGE only and is
never in a mail itself. Nothing is written to disk: the document is made at download time, so
it shows the data as it is then (and nothing once the person is erased).

Both links are signed, timed tokens of their own kinds (mailer.tokens) naming the request and
its contact, so a link for one request never opens another, and an erasure (which unlinks the
request from the contact) turns every link of the person into a 404.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from mailer import privacy
from mailer.addresses import mask_address
from mailer.config import Settings
from mailer.errors import BadInput, MailerError, NotFound
from mailer.i18n import Language, Translator
from mailer.models import (
    Contact,
    IdentityCheck,
    PrivacyRequest,
    PrivacyRequestKind,
    as_utc,
    utcnow,
)
from mailer.recipients import DeliveryContext, Requester, build_transactional_mail
from mailer.service import Mailer
from mailer.tokens import (
    ACCESS_DOWNLOAD_MAX_AGE,
    BadToken,
    ExpiredToken,
    TokenKind,
    Tokens,
)
from mailer.transport import Transport

logger = logging.getLogger("mailer.data_copy")
privacy_log = logging.getLogger("mailer.privacy")

CHANNEL = "preference centre"
# Like the double opt-in mail: the button must not become a way to flood a mailbox. A request
# held back is not registered again; the link in the earlier mail still works.
IDENTITY_MAIL_INTERVAL = timedelta(minutes=10)
IDENTITY_MAILS_PER_DAY = 3
DOWNLOAD_OUTCOME = "answered: export (json) via download link"
EXPORT_FORMAT = "json, download link"  # as the audit log records the hand-over



class NoSuchRequest(NotFound):
    """The link names no request of a contact we still hold (unknown, or erased since)."""


class RequestClosed(NotFound):
    """The request was closed another way (answered by the operator, refused, erased)."""


class LinkExpired(ExpiredToken):
    """A data-copy link older than its kind's maximum age."""


# -- asking -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityMail:
    """The confirmation mail of a data-copy request, built, ready to hand to a Transport."""

    request_id: int
    envelope_from: str
    recipient: str
    data: bytes


def request_copy(
    mailer: Mailer,
    tokens: Tokens,
    context: DeliveryContext,
    requester: Requester,
    *,
    language: Language,
) -> IdentityMail | None:
    """The preference centre's "send me a copy of my data" for the person of `context`.

    Registers an access request (due in 30 days, identity check pending; `mailer privacy
    requests` shows it, and a warning on `mailer.privacy` tells the operator at once, with the
    contact id, never the address) and builds the mail with the confirmation link. Returns None,
    registering nothing, when this address was sent such a mail within IDENTITY_MAIL_INTERVAL or
    IDENTITY_MAILS_PER_DAY times in the last day. Transactional mail: not gated by marketing
    consent (the person asked for it), so it also reaches an unsubscribed address.
    """
    now = utcnow()
    with mailer.session() as session:
        contact = session.get(Contact, context.contact_id)
        if contact is None:
            raise NoSuchRequest("no such contact")
        address, hashed = contact.email, contact.email_hash
        if _held_back(session, hashed, now):
            logger.info("data-copy mail for contact %s held back: mailed recently", contact.id)
            return None
    row = privacy.record_request_for_contact(
        mailer,
        context.contact_id,
        PrivacyRequestKind.ACCESS,
        channel=f"{CHANNEL}, delivery {context.delivery_id}",
        verified=False,
        note=f"asked in the preference centre (ip {requester.ip_masked or 'unknown'})",
    )
    assert row.id is not None
    privacy_log.warning(
        "data copy requested: contact %s via %s at %s (request %s); answer within 30 days",
        context.contact_id,
        row.channel,
        as_utc(row.received_at).isoformat(),
        row.id,
    )
    token = tokens.sign(TokenKind.ACCESS_CONFIRM, (row.id, context.contact_id))
    envelope_from, recipient, data = build_identity_mail(
        mailer.settings,
        to=address,
        confirm_url=f"{mailer.settings.base_url}/{TokenKind.ACCESS_CONFIRM.value}/{token}",
        language=language,
        now=now,
    )
    return IdentityMail(row.id, envelope_from, recipient, data)


def _held_back(session: Session, address_hash: str, now: datetime) -> bool:
    count, last = session.exec(
        select(func.count(), func.max(PrivacyRequest.received_at)).where(
            PrivacyRequest.address_hash == address_hash,
            PrivacyRequest.kind == PrivacyRequestKind.ACCESS.value,
            col(PrivacyRequest.channel).startswith(CHANNEL, autoescape=True),
            col(PrivacyRequest.received_at) >= now - timedelta(days=1),
        )
    ).one()
    if count >= IDENTITY_MAILS_PER_DAY:
        return True
    return last is not None and as_utc(last) > now - IDENTITY_MAIL_INTERVAL


async def send_identity_mail(transport: Transport, mail: IdentityMail) -> bool:
    """Hand the mail over; False (and a log line) when it was not accepted. The request stays
    registered either way: the operator answers it within 30 days all the same."""
    try:
        result = await transport.send(mail.envelope_from, mail.recipient, mail.data)
    except (MailerError, OSError) as exc:
        logger.warning("data-copy mail for request %s not sent: %s", mail.request_id, exc)
        return False
    if result.status != "sent":
        logger.warning(
            "data-copy mail for request %s not sent: %s %s",
            mail.request_id,
            result.status,
            result.message,
        )
        return False
    return True


def build_identity_mail(
    settings: Settings, *, to: str, confirm_url: str, language: Language, now: datetime
) -> tuple[str, str, bytes]:
    """The data-copy confirmation mail: the double opt-in mail's sender and rules (no
    List-Unsubscribe, it is no marketing; CR, LF or NUL in a header refused)."""
    t = Translator(language)
    return build_transactional_mail(
        settings,
        to=to,
        subject=t("data_copy.mail.subject", sender=settings.sender_name),
        template="data-copy-mail",
        context={"t": t, "confirm_url": confirm_url},
        language=language,
        now=now,
        what="data-copy mail",
    )


# -- the links ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRequest:
    """A data-copy request as its links see it."""

    request_id: int
    contact_id: int
    email: str
    masked_address: str
    locale: str | None
    received_at: datetime
    due_at: datetime
    verified: bool
    answered: bool  # by an earlier download


def _load(mailer: Mailer, tokens: Tokens, kind: TokenKind, token: str) -> AccessRequest:
    try:
        payload = tokens.verify(kind, token)
    except ExpiredToken as exc:
        raise LinkExpired(str(exc)) from exc
    if len(payload) != 2:
        raise BadToken(f"unexpected {kind.name.lower()} token payload")
    request_id, contact_id = payload
    with mailer.session() as session:
        row = session.get(PrivacyRequest, request_id)
        # an erasure unlinks its requests from the contact: the person's links then lead nowhere
        if (
            row is None
            or row.kind != PrivacyRequestKind.ACCESS.value
            or row.contact_id != contact_id
        ):
            raise NoSuchRequest("no such data-copy request")
        contact = session.get(Contact, contact_id)
        if contact is None:
            raise NoSuchRequest("no such data-copy request")
        if row.completed_at is not None and row.outcome != DOWNLOAD_OUTCOME:
            raise RequestClosed(f"data-copy request {request_id} is closed")
        assert row.id is not None
        return AccessRequest(
            request_id=row.id,
            contact_id=contact_id,
            email=contact.email,
            masked_address=mask_address(contact.email),
            locale=contact.locale,
            received_at=as_utc(row.received_at),
            due_at=as_utc(row.due_at),
            verified=row.identity_check == IdentityCheck.VERIFIED.value,
            answered=row.completed_at is not None,
        )


def pending_for(mailer: Mailer, tokens: Tokens, token: str) -> AccessRequest:
    """Read-only: what the confirmation page shows. BadToken, LinkExpired, NoSuchRequest or
    RequestClosed when the link leads nowhere."""
    return _load(mailer, tokens, TokenKind.ACCESS_CONFIRM, token)


@dataclass(frozen=True)
class CopyReady:
    request: AccessRequest
    download_token: str
    expires_at: datetime
    size: int  # bytes of the document as it is now


def confirm_identity(mailer: Mailer, tokens: Tokens, token: str) -> CopyReady:
    """The person confirmed from their mailbox: the request's identity check is verified (and
    audited), the copy is made once to be sure it can be (its size is shown; it is not kept),
    and a download link valid for ACCESS_DOWNLOAD_MAX_AGE is signed. Confirming again is
    harmless: the check stays verified and a fresh link is made."""
    found = _load(mailer, tokens, TokenKind.ACCESS_CONFIRM, token)
    privacy.verify_request(mailer, found.request_id)
    size = len(_document(mailer, found))
    download = tokens.sign(TokenKind.ACCESS_DOWNLOAD, (found.request_id, found.contact_id))
    logger.info("data-copy request %s: identity confirmed by the mailbox", found.request_id)
    return CopyReady(
        request=found,
        download_token=download,
        expires_at=utcnow() + timedelta(seconds=ACCESS_DOWNLOAD_MAX_AGE),
        size=size,
    )


@dataclass(frozen=True)
class Download:
    request_id: int
    filename: str
    body: bytes  # the JSON document, UTF-8


def download(mailer: Mailer, tokens: Tokens, token: str) -> Download:
    """The copy, as `mailer privacy export` makes it (JSON), from the data as it is now.

    Every download is in the audit log (record_export, which also answers any other verified
    access request of the person); the first one answers this request with DOWNLOAD_OUTCOME,
    so the register shows it completed. The document is returned only once that is recorded.
    """
    found = check_download(mailer, tokens, token)
    body = _document(mailer, found)
    if not found.answered:
        # BadInput: a concurrent download answered it a moment ago
        with contextlib.suppress(BadInput):
            privacy.complete_request(mailer, found.request_id, DOWNLOAD_OUTCOME)
    privacy.record_export(mailer, found.email, EXPORT_FORMAT)
    privacy_log.info("data-copy request %s: copy downloaded", found.request_id)
    stamp = utcnow().strftime("%Y-%m-%d")
    return Download(found.request_id, f"my-data-{stamp}.json", body)


def check_download(mailer: Mailer, tokens: Tokens, token: str) -> AccessRequest:
    """Read-only: the request a download link is for, if the link works."""
    found = _load(mailer, tokens, TokenKind.ACCESS_DOWNLOAD, token)
    if not found.verified:  # only confirm_identity signs download links, after verifying
        raise NoSuchRequest("the identity check of this request is not done")
    return found


def _document(mailer: Mailer, found: AccessRequest) -> bytes:
    try:
        document = privacy.export(mailer, found.email)
    except NotFound as exc:  # erased between the link's check and now
        raise NoSuchRequest("no such data-copy request") from exc
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
