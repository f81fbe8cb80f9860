"""What an inbound mail is: a delivery status notification, a complaint, a mailto unsubscribe,
or something else. Pure: bytes in, facts out, no database and no keys.

    dsn          multipart/report; report-type=delivery-status (RFC 3464)
    arf          multipart/report; report-type=feedback-report (RFC 5965, an abuse report)
    unsubscribe  a mail to unsubscribe+TOKEN@domain, the List-Unsubscribe mailto: address
    unknown      anything else (an auto-reply, a person writing back, spam)
    malformed    a report that lacks what its type requires, or bytes that are not a mail

Which delivery a report is about is decided later (mailer.inbound), from the candidates
gathered here: addresses that may be our VERP bounce address (the envelope recipient, the
Delivered-To, X-Original-To and To headers, an ARF's Original-Mail-From, the returned
message's Return-Path), and the returned message's Message-ID.

Hard or soft (RFC 3463 enhanced status codes), in the words `mailer.transport` uses at send
time: a failed delivery with a permanent address status, 5.1.x except the sender-side 5.1.7
and 5.1.8, is a hard bounce (the mailbox or domain does not exist). Every other failure, and
every delay, is soft: 5.2.2 (mailbox full) and 5.2.1 (mailbox disabled) may pass, 5.7.x is a
policy or spam block rather than a bad address, 4.x.x is temporary by definition. Soft bounces
are counted and suppress only after the configured number. Delivered, relayed and expanded
notifications are reports of success: no bounce.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from enum import StrEnum

from mailer.transport import is_hard_bounce

MAX_MESSAGE_BYTES = 10 * 1024 * 1024  # far above any bounce; refuses a huge file before parsing
MAX_DIAGNOSTIC = 200
MAX_PARTS = 100  # a report has three parts; walking is bounded however the mail is nested
UNSUBSCRIBE_PREFIX = "unsubscribe+"
MAX_TOKEN = 512

# Headers that name the envelope recipient of a mail that arrived here, most specific first.
RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To", "Cc")

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_ADDRESS = re.compile(r"<?[^\s<>@\"]+@[^\s<>@\"]+>?")
_MESSAGE_ID = re.compile(r"<([^<>\s]{1,250})>")
_TOKEN = re.compile(r"\.?[A-Za-z0-9_~-]+(?:\.[A-Za-z0-9_~-]+)*\Z")


class Kind(StrEnum):
    DSN = "dsn"
    ARF = "arf"
    UNSUBSCRIBE = "unsubscribe"
    UNKNOWN = "unknown"
    MALFORMED = "malformed"


class BounceKind(StrEnum):
    HARD = "hard"
    SOFT = "soft"


class Malformed(ValueError):
    """The mail claims to be a report but lacks what its type requires."""


@dataclass(frozen=True)
class DeliveryStatus:
    """One per-recipient block of a DSN: the one about our recipient."""

    action: str  # failed, delayed, delivered, relayed, expanded
    status: str  # the enhanced status code, e.g. 5.1.1
    final_recipient: str | None
    diagnostic: str | None  # one line, bounded, addresses removed

    @property
    def bounce(self) -> BounceKind | None:
        return bounce_kind(self.action, self.status)


@dataclass(frozen=True)
class FeedbackReport:
    feedback_type: str  # abuse, fraud, virus, other, not-spam, ...
    original_rcpt_to: str | None


@dataclass(frozen=True)
class Inbound:
    kind: Kind
    message_key: str  # identifies this inbound mail: reprocessing it must change nothing
    verp_candidates: tuple[str, ...] = ()
    original_message_id: str | None = None  # of the mail the report returns
    status: DeliveryStatus | None = None
    feedback: FeedbackReport | None = None
    unsubscribe_token: str | None = field(default=None, repr=False)  # a capability: not logged
    problem: str | None = None  # why it is malformed


def bounce_kind(action: str, status: str) -> BounceKind | None:
    action = action.lower()
    if action == "delayed":
        return BounceKind.SOFT
    if action != "failed":
        return None  # delivered, relayed, expanded: success reports
    return BounceKind.HARD if is_hard_bounce(status, "rcpt") else BounceKind.SOFT


def classify(raw: bytes, envelope_rcpts: Sequence[str] = ()) -> Inbound:
    """Classify one inbound mail. Never raises for any input: what cannot be read is malformed."""
    key = message_key(raw)
    if len(raw) > MAX_MESSAGE_BYTES:
        return Inbound(Kind.MALFORMED, key, problem=f"larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        if not message.keys():
            raise Malformed("no mail headers")
        return _classify(message, key, envelope_rcpts)
    except Malformed as exc:
        return Inbound(Kind.MALFORMED, key, problem=str(exc))
    except Exception as exc:
        # The standard library's header parsers have raised IndexError, AttributeError and
        # others on hostile input; one unreadable mail must never stop a run.
        return Inbound(Kind.MALFORMED, key, problem=f"unreadable: {type(exc).__name__}")


def message_key(raw: bytes) -> str:
    """SHA-256 of the mail's Message-ID, or of its bytes when it has none.

    The Message-ID is the mail's identity across copies (the same bounce delivered twice, or
    saved with different Received lines), so a second copy is recognised as processed."""
    try:
        headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw[:65536])
        message_id = _message_id(headers.get("Message-ID"))
    except Exception:  # see classify
        message_id = None
    if message_id:
        return hashlib.sha256(b"message-id:" + message_id.encode("utf-8")).hexdigest()
    return hashlib.sha256(b"bytes:" + raw).hexdigest()


def _classify(message: EmailMessage, key: str, envelope_rcpts: Sequence[str]) -> Inbound:
    report = _find_report(message)
    if report is not None:
        report_type = str(report.get_param("report-type", "", header="content-type")).lower()
        if report_type == "delivery-status":
            return _dsn(message, report, key, envelope_rcpts)
        if report_type == "feedback-report":
            return _arf(message, report, key, envelope_rcpts)
    token = _unsubscribe_token(_recipients(message, envelope_rcpts))
    if token is not None:
        return Inbound(Kind.UNSUBSCRIBE, key, unsubscribe_token=token)
    return Inbound(Kind.UNKNOWN, key, verp_candidates=_recipients(message, envelope_rcpts))


def _walk(message: Message) -> Iterable[Message]:
    for count, part in enumerate(message.walk()):
        if count >= MAX_PARTS:
            raise Malformed(f"more than {MAX_PARTS} MIME parts")
        yield part


def _find_report(message: Message) -> Message | None:
    for part in _walk(message):
        if part.get_content_type() == "multipart/report":
            return part
    return None


def _report_parts(report: Message) -> list[Message]:
    payload = report.get_payload()
    if not isinstance(payload, list):
        raise Malformed("a multipart/report without parts")
    return [part for part in payload if isinstance(part, Message)]


def _dsn(message: Message, report: Message, key: str, envelope_rcpts: Sequence[str]) -> Inbound:
    parts = _report_parts(report)
    blocks = next(
        (p.get_payload() for p in parts if p.get_content_type() == "message/delivery-status"),
        None,
    )
    if not isinstance(blocks, list) or len(blocks) < 2:
        raise Malformed("delivery status report without a per-recipient part (RFC 3464)")
    statuses = [
        status
        for status in (_delivery_status(b) for b in blocks[1:] if isinstance(b, Message))
        if status is not None
    ]
    if not statuses:
        raise Malformed("delivery status report without a recipient's Action and Status")
    # our mails have one recipient each: report the worst news the notification carries
    status = min(statuses, key=lambda s: {"failed": 0, "delayed": 1}.get(s.action, 2))
    returned = _returned_headers(parts)
    candidates = list(_recipients(message, envelope_rcpts))
    if returned is not None:
        candidates += _addresses(_values(returned, "Return-Path"))
    return Inbound(
        Kind.DSN,
        key,
        verp_candidates=tuple(dict.fromkeys(candidates)),
        original_message_id=_message_id(_first(returned, "Message-ID")) if returned else None,
        status=status,
    )


def _delivery_status(block: Message) -> DeliveryStatus | None:
    action = _field(block, "Action")
    status_text = _field(block, "Status")
    final = _field(block, "Final-Recipient")
    if action is None and status_text is None and final is None:
        return None  # an empty block, or one of extension fields only
    if action is None or status_text is None:
        raise Malformed("a per-recipient block needs both Action and Status (RFC 3464 2.3)")
    action = action.split("(", 1)[0].strip().lower()
    if action not in {"failed", "delayed", "delivered", "relayed", "expanded"}:
        raise Malformed(f"unknown DSN Action {action[:40]!r}")
    match = _STATUS.match(status_text)
    if match is None:
        raise Malformed("DSN Status is not an enhanced status code such as 5.1.1 (RFC 3463)")
    return DeliveryStatus(
        action=action,
        status=match.group(0),
        final_recipient=_typed_address(final) if final else None,
        diagnostic=diagnostic_excerpt(_field(block, "Diagnostic-Code")),
    )


def _arf(message: Message, report: Message, key: str, envelope_rcpts: Sequence[str]) -> Inbound:
    parts = _report_parts(report)
    feedback_part = next(
        (p for p in parts if p.get_content_type() == "message/feedback-report"), None
    )
    if feedback_part is None:
        raise Malformed("feedback report without a message/feedback-report part (RFC 5965)")
    fields = _feedback_fields(feedback_part)
    feedback_type = _field(fields, "Feedback-Type")
    if not feedback_type:
        raise Malformed("feedback report without a Feedback-Type (RFC 5965 3.1)")
    returned = _returned_headers(parts)
    candidates = _addresses(_values(fields, "Original-Mail-From"))
    if returned is not None:
        candidates += _addresses(_values(returned, "Return-Path"))
    candidates += list(_recipients(message, envelope_rcpts))
    rcpt = _addresses(_values(fields, "Original-Rcpt-To"))
    return Inbound(
        Kind.ARF,
        key,
        verp_candidates=tuple(dict.fromkeys(candidates)),
        original_message_id=_message_id(_first(returned, "Message-ID")) if returned else None,
        feedback=FeedbackReport(
            feedback_type=_CONTROL.sub("", feedback_type).strip().lower()[:32],
            original_rcpt_to=rcpt[0] if rcpt else None,
        ),
    )


def _feedback_fields(part: Message) -> Message:
    """The machine-readable fields; the parser reads message/* parts as a nested message."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    text = part.get_payload(decode=True) or b""
    return BytesHeaderParser(policy=email.policy.default).parsebytes(bytes(text))


def _returned_headers(parts: Sequence[Message]) -> Message | None:
    """The headers of the mail a report returns: a message/rfc822 or text/rfc822-headers part."""
    for part in parts[1:]:
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        elif kind in ("text/rfc822-headers", "text/global-headers"):
            text = part.get_payload(decode=True)
            if isinstance(text, bytes):
                return BytesHeaderParser(policy=email.policy.default).parsebytes(text)
    return None


def _values(message: Message, name: str) -> list[str]:
    """A header's values, or none when the standard library cannot parse them: one unreadable
    header (it raises IndexError on some) must not make the whole report unreadable."""
    try:
        return [str(value) for value in message.get_all(name) or []]
    except Exception:  # see classify
        return []


def _first(message: Message, name: str) -> str | None:
    values = _values(message, name)
    return values[0] if values else None


def _field(block: Message, name: str) -> str | None:
    value = _first(block, name)
    if value is None:
        return None
    text = _CONTROL.sub(" ", str(value)).strip()
    return text or None


def _typed_address(value: str) -> str:
    """`rfc822; anna@example.org` -> the address (RFC 3464 2.3.2)."""
    kind, _, address = value.partition(";")
    return (address if address else kind).strip().strip("<>")


def _addresses(values: Iterable[object]) -> list[str]:
    found = []
    for _name, address in getaddresses([str(v) for v in values]):
        if address and "@" in address:
            found.append(address.strip())
    return found


def _recipients(message: Message, envelope_rcpts: Sequence[str]) -> tuple[str, ...]:
    found = [r.strip().strip("<>") for r in envelope_rcpts if r.strip()]
    for header in RECIPIENT_HEADERS:
        found += _addresses(_values(message, header))
    return tuple(dict.fromkeys(found))


def _unsubscribe_token(addresses: Iterable[str]) -> str | None:
    for address in addresses:
        local, at, _domain = address.rpartition("@")
        if not at or not local.lower().startswith(UNSUBSCRIBE_PREFIX):
            continue
        token = local[len(UNSUBSCRIBE_PREFIX) :].strip('"')
        if 0 < len(token) <= MAX_TOKEN and _TOKEN.match(token):
            return token
    return None


def _message_id(value: object) -> str | None:
    if value is None:
        return None
    match = _MESSAGE_ID.search(str(value))
    return f"<{match[1]}>" if match else None


def diagnostic_excerpt(value: str | None) -> str | None:
    """One line for events and reports: no CR, LF or control characters, no addresses (an
    erased person's address must not survive in an event), at most MAX_DIAGNOSTIC characters."""
    if not value:
        return None
    kind, sep, rest = value.partition(";")
    text = rest if sep and kind.strip().lower() in {"smtp", "x-unix", "x-postfix"} else value
    text = _CONTROL.sub(" ", text)
    text = _ADDRESS.sub("<address>", text)
    text = " ".join(text.split())
    if len(text) > MAX_DIAGNOSTIC:
        text = text[: MAX_DIAGNOSTIC - 1] + "…"
    return text or None
