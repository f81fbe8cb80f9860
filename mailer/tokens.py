"""Signed link tokens (DESIGN invariant 5): one salt per kind, key rotation, compact.

A token is `PAYLOAD.SIGNATURE` (`PAYLOAD.TIMESTAMP.SIGNATURE` for timed kinds), where PAYLOAD
is the integers in base 36 separated by dots and SIGNATURE is a truncated HMAC-SHA256 made by
an itsdangerous signer. An open link for delivery 1,234,567 is `qglj.` plus 20 characters.

Every kind has its own salt, so a click token never verifies as an unsubscribe token. Keys are
listed oldest to newest: the newest signs, all verify, so appending a key never breaks mails
already sent and removing one retires its tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, Signer, TimestampSigner
from itsdangerous.encoding import base64_encode, want_bytes
from itsdangerous.signer import HMACAlgorithm

from mailer.errors import BadInput, ConfigError


class TokenKind(StrEnum):
    """The kinds of link token; the value is also the path segment of the tracking app."""

    OPEN = "o"
    CLICK = "c"
    UNSUBSCRIBE = "u"
    CONFIRM = "confirm"
    PREFERENCES = "p"
    # a self-service data-copy request: the identity check mailed to the address, then the
    # timed download of the copy (mailer.data_copy); both name the privacy request
    ACCESS_CONFIRM = "privacy/confirm"
    ACCESS_DOWNLOAD = "privacy/download"


class BadToken(BadInput):
    """A token that is tampered, truncated, malformed, of another kind or signed by no known key."""


class ExpiredToken(BadToken):
    """A correctly signed timed token older than its maximum age."""


# Confirmation links expire: a sign-up nobody confirmed within a week is stale evidence.
CONFIRM_MAX_AGE = 7 * 24 * 3600
# The data-copy links: the identity check is a confirmation link like a sign-up's; the download
# link is offered once the identity is checked, and stops working a week later.
ACCESS_CONFIRM_MAX_AGE = 7 * 24 * 3600
ACCESS_DOWNLOAD_MAX_AGE = 7 * 24 * 3600
MAX_AGES: dict[TokenKind, int] = {
    TokenKind.CONFIRM: CONFIRM_MAX_AGE,
    TokenKind.ACCESS_CONFIRM: ACCESS_CONFIRM_MAX_AGE,
    TokenKind.ACCESS_DOWNLOAD: ACCESS_DOWNLOAD_MAX_AGE,
}
TIMED_KINDS = frozenset(MAX_AGES)
# 15 bytes are 120 bits of MAC, far beyond online guessing, and exactly 20 base64 characters:
# a length that is not a multiple of 3 bytes would leave unused bits in the last character, so
# two different strings would carry the same signature and a changed character could verify.
SIGNATURE_BYTES = 15
MAX_TOKEN_LENGTH = 256  # far above any real token; refuses huge input before any work
MAX_PAYLOAD_VALUE = 2**63 - 1  # database ids are BIGINT
MAX_PAYLOAD_ITEMS = 16
_SALT_PREFIX = "mailer.token."
_PAYLOAD = re.compile(rf"[0-9a-z]{{1,13}}(?:\.[0-9a-z]{{1,13}}){{0,{MAX_PAYLOAD_ITEMS - 1}}}")
# The exact shapes sign() makes. Checked before anything else, because the base64 decoder
# behind itsdangerous is lenient: it reads "/" as "_" and "+" as "-" and skips characters
# outside its alphabet, so a changed or inserted character could otherwise still verify.
_SIGNATURE = rf"\.[A-Za-z0-9_-]{{{SIGNATURE_BYTES * 4 // 3}}}"
_SHAPE = re.compile(rf"{_PAYLOAD.pattern}{_SIGNATURE}")
_TIMED_SHAPE = re.compile(rf"{_PAYLOAD.pattern}\.[A-Za-z0-9_-]{{1,8}}{_SIGNATURE}")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


class _TruncatedHMAC(HMACAlgorithm):
    """HMAC-SHA256 cut to SIGNATURE_BYTES, with the keyed state prepared once per key."""

    def __init__(self) -> None:
        super().__init__(hashlib.sha256)
        self._prepared: dict[bytes, Any] = {}

    def prepare(self, key: bytes) -> None:
        self._prepared[key] = hmac.new(key, digestmod=hashlib.sha256)

    def get_signature(self, key: bytes, value: bytes) -> bytes:
        prepared = self._prepared.get(key)
        mac = prepared.copy() if prepared is not None else hmac.new(key, digestmod=hashlib.sha256)
        mac.update(value)
        return mac.digest()[:SIGNATURE_BYTES]


class _Signer(Signer):
    """A signer that derives its keys once, at construction.

    itsdangerous derives the key from secret and salt on every sign and verify; the tracking
    app verifies thousands of tokens a second, so the derived keys and the HMAC state keyed
    with them are computed here, once per process.
    """

    def __init__(self, secret_keys: Sequence[str], salt: str) -> None:
        algorithm = _TruncatedHMAC()
        super().__init__(
            list(secret_keys),
            salt=salt,
            key_derivation="hmac",
            digest_method=hashlib.sha256,
            algorithm=algorithm,
        )
        derive = super().derive_key
        self._derived = {key: derive(key) for key in self.secret_keys}
        for derived in self._derived.values():
            algorithm.prepare(derived)
        self._algorithm = algorithm
        # newest first, the order itsdangerous tries the keys in
        self._newest_first = [self._derived[key] for key in reversed(self.secret_keys)]

    def verify_signature(self, value: str | bytes, sig: str | bytes) -> bool:
        """Whether `sig` is the signature of `value` under one of the keys.

        itsdangerous decodes the signature and compares bytes, through several layers of
        calls per key; at thousands of tokens a second that was most of a token's cost. Here
        each key's MAC is encoded and compared with the signature as it came: the same answer
        for the canonical encoding that sign() makes (15 bytes are exactly 20 characters, so
        each signature has one spelling, which the token shapes check first), and a refusal
        for any other spelling, which itsdangerous's lenient decoder might accept.
        """
        message, signature = want_bytes(value), want_bytes(sig)
        sign = self._algorithm.get_signature
        for key in self._newest_first:
            if hmac.compare_digest(base64_encode(sign(key, message)), signature):
                return True
        return False

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        key = self.secret_keys[-1] if secret_key is None else want_bytes(secret_key)
        derived = self._derived.get(key)
        return derived if derived is not None else super().derive_key(key)


class _TimedSigner(_Signer, TimestampSigner):
    pass


def _encode(payload: Sequence[int]) -> str:
    if not 1 <= len(payload) <= MAX_PAYLOAD_ITEMS:
        raise ValueError(f"a token payload holds 1 to {MAX_PAYLOAD_ITEMS} integers")
    parts = []
    for value in payload:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"token payload values must be integers, not {type(value).__name__}")
        if not 0 <= value <= MAX_PAYLOAD_VALUE:
            raise ValueError(f"token payload value out of range: {value}")
        digits = []
        while True:
            value, rest = divmod(value, 36)
            digits.append(_DIGITS[rest])
            if not value:
                break
        parts.append("".join(reversed(digits)))
    return ".".join(parts)


def _decode(payload: str | bytes) -> tuple[int, ...]:
    text = payload.decode("ascii") if isinstance(payload, bytes) else payload
    if _PAYLOAD.fullmatch(text) is None:
        raise BadToken("token payload is not a list of integers")
    values = tuple([int(part, 36) for part in text.split(".")])
    if max(values) > MAX_PAYLOAD_VALUE:
        raise BadToken("token payload value out of range")
    return values


class Tokens:
    """Signs and verifies link tokens.

    `secret_keys` lists the keys oldest to newest: the newest signs, every one verifies.
    Build one instance per process and share it: the signers are immutable after construction.
    """

    def __init__(self, secret_keys: Sequence[str]) -> None:
        if isinstance(secret_keys, str):
            raise TypeError("secret_keys is a sequence of keys, not one string")
        keys = list(secret_keys)
        if not keys or not all(isinstance(key, str) and key for key in keys):
            raise ConfigError("link tokens need at least one non-empty secret key")
        self._signers: dict[TokenKind, _Signer] = {
            kind: _Signer(keys, _SALT_PREFIX + kind)
            for kind in TokenKind
            if kind not in TIMED_KINDS
        }
        self._timed_signers: dict[TokenKind, _TimedSigner] = {
            kind: _TimedSigner(keys, _SALT_PREFIX + kind) for kind in TIMED_KINDS
        }

    def sign(self, kind: TokenKind, payload: tuple[int, ...] | list[int]) -> str:
        signer = self._timed_signers.get(kind) or self._signers[kind]
        return signer.sign(_encode(payload)).decode("ascii")

    def verify(self, kind: TokenKind, token: str, max_age: int | None = None) -> tuple[int, ...]:
        """The payload of a valid token of this kind, or BadToken.

        `max_age` (seconds) applies to timed kinds only; None means the kind's default
        (MAX_AGES: CONFIRM_MAX_AGE for confirmation links). Untimed kinds never expire.
        """
        timed = self._timed_signers.get(kind)
        if max_age is not None and timed is None:
            raise ValueError(f"{kind.name} tokens carry no timestamp, so they cannot expire")
        shape = _SHAPE if timed is None else _TIMED_SHAPE
        if (
            not isinstance(token, str)
            or len(token) > MAX_TOKEN_LENGTH
            or not shape.fullmatch(token)
        ):
            raise BadToken("not a token")
        if timed is None:
            # the shape has one last dot, before the signature: Signer.unsign without its layers
            payload, _, signature = token.rpartition(".")
            if not self._signers[kind].verify_signature(payload, signature):
                raise BadToken(f"invalid {kind.name.lower()} token")
            return _decode(payload)
        try:
            value = timed.unsign(token, max_age=MAX_AGES[kind] if max_age is None else max_age)
        except SignatureExpired as exc:
            raise ExpiredToken(f"{kind.name.lower()} link has expired") from exc
        except BadSignature as exc:
            raise BadToken(f"invalid {kind.name.lower()} token") from exc
        return _decode(value)
