"""E-mail addresses: syntax validation (no DNS), the identity form, and the keyed hash."""

from __future__ import annotations

import hashlib
import hmac

from email_validator import EmailNotValidError, validate_email

from mailer.errors import InvalidAddress

MAX_ADDRESS_LENGTH = 320


def normalise_address(raw: str) -> str:
    """The identity of an address: validated, IDNA-normalised, lower-cased.

    Local parts are case-sensitive in theory and never in practice; one person writing their
    address with capitals in one shop and without in another is one contact, not two.
    """
    candidate = raw.strip()
    if not candidate:
        raise InvalidAddress("empty address")
    if any(ch in candidate for ch in "\r\n\0"):
        raise InvalidAddress("address contains a line break or NUL")
    if len(candidate) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress("address is longer than 320 characters")
    try:
        result = validate_email(candidate, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from exc
    return result.normalized.lower()


def address_hash(normalised: str, key: bytes) -> str:
    """HMAC-SHA256 of the normalised address: the suppression list keeps only this."""
    return hmac.new(key, normalised.encode("utf-8"), hashlib.sha256).hexdigest()


def mask_address(normalised: str) -> str:
    """j***@example.com: enough for a person to recognise their own address on a page."""
    local, _, domain = normalised.partition("@")
    return f"{local[:1]}***@{domain}"
