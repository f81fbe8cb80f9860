"""Signed webhooks (Standard Webhooks v1): signing for the dispatcher, `verify` for consumers.

A consumer in Python verifies a delivery with:

    from mailer.webhooks import verify, WebhookVerificationError
    event = verify(request_body_bytes, request_headers, "whsec_...")

The signature is HMAC-SHA256 over `webhook-id.webhook-timestamp.body` with the base64-decoded
secret, sent as `webhook-signature: v1,<base64>` (several, space-separated, while a secret is
being rotated).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from mailer.errors import MailerError

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
SECRET_BYTES = 32
TOLERANCE_SECONDS = 5 * 60
SIGNATURE_VERSION = "v1"


class WebhookVerificationError(MailerError):
    """The delivery is not authentic, or too old or too new to trust: answer 401."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookVerificationError("the webhook secret is not whsec_ + base64") from exc
    if not key:
        raise WebhookVerificationError("the webhook secret is empty")
    return key


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` entry for the webhook-signature header."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signed_headers(
    secrets_in_use: Iterable[str], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers; every secret in use signs (rotation grace period)."""
    entries = [signature(secret, message_id, timestamp, body) for secret in secrets_in_use]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(entries),
        "content-type": "application/json",
    }


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    *,
    tolerance: int = TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """Check a delivery's signature and timestamp; return the parsed JSON event.

    Raises WebhookVerificationError when a header is missing, the timestamp is more than
    `tolerance` seconds away from now (replay protection), or no signature matches.
    """
    data = body.encode() if isinstance(body, str) else body
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id")
    timestamp_text = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (message_id and timestamp_text and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a Unix time") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far from now")
    expected = signature(secret, message_id, timestamp, data).partition(",")[2]
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(expected, value):
            try:
                return json.loads(data)
            except ValueError:
                raise WebhookVerificationError("the body is not JSON") from None
    raise WebhookVerificationError("no matching signature")
