"""Signed link tokens: one salt per kind, key rotation, tamper-proof, compact (invariant 5)."""

from __future__ import annotations

import hashlib
import itertools
import re
import secrets
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from itsdangerous import BadSignature, Signer

from mailer.errors import ConfigError
from mailer.tokens import (
    _SHAPE,
    CONFIRM_MAX_AGE,
    TIMED_KINDS,
    BadToken,
    ExpiredToken,
    TokenKind,
    Tokens,
    _encode,
    _Signer,
    _TruncatedHMAC,
)

OLD_KEY = "old-key-" + "a" * 40
NEW_KEY = "new-key-" + "b" * 40
URL_SAFE = re.compile(r"[A-Za-z0-9_.-]+")
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

tokens = Tokens([OLD_KEY, NEW_KEY])
payloads = st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=1, max_size=4)


@pytest.mark.parametrize("kind", list(TokenKind))
@pytest.mark.parametrize(
    "payload", [[0], [1_234_567], [1_234_567, 3], [2**63 - 1, 0, 17], list(range(16))]
)
def test_a_token_round_trips(kind: TokenKind, payload: list[int]) -> None:
    token = tokens.sign(kind, payload)
    assert tokens.verify(kind, token) == tuple(payload)
    assert URL_SAFE.fullmatch(token)


def test_tokens_are_short() -> None:
    assert len(tokens.sign(TokenKind.OPEN, [10_000_000])) <= 26
    assert len(tokens.sign(TokenKind.CLICK, [10_000_000, 12])) <= 28
    assert len(tokens.sign(TokenKind.CONFIRM, [10_000_000])) <= 34


@pytest.mark.parametrize(("signed", "checked"), list(itertools.permutations(TokenKind, 2)))
def test_a_token_of_one_kind_is_rejected_as_every_other(
    signed: TokenKind, checked: TokenKind
) -> None:
    token = tokens.sign(signed, [42, 7])
    with pytest.raises(BadToken):
        tokens.verify(checked, token)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(TokenKind),
    payload=payloads,
    position=st.integers(min_value=0),
    replacement=st.sampled_from(BASE64URL + ".~=+/ %\x00é"),
)
def test_changing_any_single_character_is_rejected(
    kind: TokenKind, payload: list[int], position: int, replacement: str
) -> None:
    token = tokens.sign(kind, payload)
    position %= len(token)
    if token[position] == replacement:
        return
    tampered = token[:position] + replacement + token[position + 1 :]
    with pytest.raises(BadToken):
        tokens.verify(kind, tampered)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(TokenKind),
    payload=payloads,
    position=st.integers(min_value=0),
    extra=st.sampled_from(BASE64URL + ".~=+/ %\x00\n"),
)
def test_inserting_any_character_is_rejected(
    kind: TokenKind, payload: list[int], position: int, extra: str
) -> None:
    token = tokens.sign(kind, payload)
    position %= len(token) + 1
    assert not _verifies(kind, token[:position] + extra + token[position:])


def test_the_other_base64_alphabet_is_rejected() -> None:
    # Python's urlsafe decoder also reads "+" and "/": the same signature in other letters.
    for _ in range(200):
        token = tokens.sign(TokenKind.CLICK, [secrets.randbelow(10**9), 1])
        signature = token.rsplit(".", 1)[1]
        if "-" in signature or "_" in signature:
            break
    other = token.replace("-", "+").replace("_", "/")
    assert other != token
    assert not _verifies(TokenKind.CLICK, other)


def test_no_other_last_character_verifies() -> None:
    # Base64 with unused bits in its last character would let several endings decode alike.
    token = tokens.sign(TokenKind.UNSUBSCRIBE, [99])
    endings = [c for c in BASE64URL if _verifies(TokenKind.UNSUBSCRIBE, token[:-1] + c)]
    assert endings == [token[-1]]


@settings(max_examples=50, deadline=None)
@given(kind=st.sampled_from(TokenKind), payload=payloads)
def test_truncated_or_extended_tokens_are_rejected(kind: TokenKind, payload: list[int]) -> None:
    token = tokens.sign(kind, payload)
    for end in range(len(token)):
        assert not _verifies(kind, token[:end])
    assert not _verifies(kind, token + "A")
    assert not _verifies(kind, "A" + token)


@pytest.mark.parametrize(
    "garbage",
    ["", ".", "..", "abc", "a.b", "a.b.c", "WzEsMl0.c2lnbmF0dXJl", "é.é", "x" * 10_000, "1.\x00"],
)
def test_malformed_tokens_are_rejected(garbage: str) -> None:
    for kind in TokenKind:
        with pytest.raises(BadToken):
            tokens.verify(kind, garbage)


def test_a_non_string_is_rejected() -> None:
    with pytest.raises(BadToken):
        tokens.verify(TokenKind.OPEN, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload", ["Hello", "", "1.-2", "1..2", "[1, 2]", "a b", "1." + "1" * 20, "z" * 13]
)
def test_a_correctly_signed_payload_that_is_not_a_list_of_integers_is_rejected(
    payload: str,
) -> None:
    # Signed with the very signer verify() uses: only the payload check can refuse it.
    forged = _Signer([OLD_KEY, NEW_KEY], "mailer.token.o").sign(payload).decode()
    with pytest.raises(BadToken):
        tokens.verify(TokenKind.OPEN, forged)


def _stock_signer(keys: list[str], kind: TokenKind) -> Signer:
    """itsdangerous's own Signer with mailer's settings: its unsign decodes the signature and
    tries every key, the work mailer's signer does its own faster way."""
    return Signer(
        keys,
        salt="mailer.token." + kind,
        key_derivation="hmac",
        digest_method=hashlib.sha256,
        algorithm=_TruncatedHMAC(),
    )


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([k for k in TokenKind if k not in TIMED_KINDS]),
    payload=payloads,
    signing_key=st.sampled_from([OLD_KEY, NEW_KEY, "removed-key-" + "c" * 40]),
    position=st.integers(min_value=0),
    replacement=st.sampled_from(BASE64URL + "."),
)
def test_a_token_verifies_exactly_when_itsdangerous_accepts_it(
    kind: TokenKind, payload: list[int], signing_key: str, position: int, replacement: str
) -> None:
    signed = _stock_signer([signing_key], kind).sign(_encode(payload)).decode()
    position %= len(signed)
    for token in (signed, signed[:position] + replacement + signed[position + 1 :]):
        try:
            stock = _stock_signer([OLD_KEY, NEW_KEY], kind).unsign(token).decode()
        except BadSignature:
            stock = None
        accepted = _verifies(kind, token)
        # a token of sign()'s own shape: the same answer; any other shape is refused first
        assert accepted == (stock is not None and _SHAPE.fullmatch(token) is not None), token
        if accepted:
            assert tokens.verify(kind, token) == tuple(int(v, 36) for v in stock.split("."))


def test_an_old_key_keeps_verifying_after_a_new_one_is_added() -> None:
    before = Tokens([OLD_KEY]).sign(TokenKind.UNSUBSCRIBE, [5])
    rotated = Tokens([OLD_KEY, NEW_KEY])
    assert rotated.verify(TokenKind.UNSUBSCRIBE, before) == (5,)
    # The newest key signs: a process that only knows the new key accepts new tokens.
    after = rotated.sign(TokenKind.UNSUBSCRIBE, [6])
    assert after != Tokens([OLD_KEY]).sign(TokenKind.UNSUBSCRIBE, [6])
    assert Tokens([NEW_KEY]).verify(TokenKind.UNSUBSCRIBE, after) == (6,)


def test_a_token_signed_by_a_removed_key_is_rejected() -> None:
    before = Tokens([OLD_KEY]).sign(TokenKind.CLICK, [5, 1])
    with pytest.raises(BadToken):
        Tokens([NEW_KEY]).verify(TokenKind.CLICK, before)
    with pytest.raises(BadToken):
        Tokens(["unrelated-" + "c" * 40]).verify(TokenKind.CLICK, before)


def test_confirm_tokens_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)
    token = tokens.sign(TokenKind.CONFIRM, [12])
    monkeypatch.setattr(time, "time", lambda: now + 30)
    assert tokens.verify(TokenKind.CONFIRM, token, max_age=60) == (12,)
    monkeypatch.setattr(time, "time", lambda: now + 61)
    with pytest.raises(ExpiredToken):
        tokens.verify(TokenKind.CONFIRM, token, max_age=60)
    assert tokens.verify(TokenKind.CONFIRM, token) == (12,)
    monkeypatch.setattr(time, "time", lambda: now + CONFIRM_MAX_AGE + 1)
    with pytest.raises(ExpiredToken, match="expired"):
        tokens.verify(TokenKind.CONFIRM, token)


def test_an_expired_token_is_a_bad_token() -> None:
    assert issubclass(ExpiredToken, BadToken)


def test_untimed_kinds_refuse_a_max_age() -> None:
    token = tokens.sign(TokenKind.OPEN, [1])
    with pytest.raises(ValueError, match="cannot expire"):
        tokens.verify(TokenKind.OPEN, token, max_age=60)


@pytest.mark.parametrize("payload", [[], [-1], [True], [2**63], [1.5], list(range(17))])
def test_sign_refuses_payloads_that_are_not_ids(payload: list[int]) -> None:
    with pytest.raises((ValueError, TypeError)):
        tokens.sign(TokenKind.OPEN, payload)


@pytest.mark.parametrize("keys", [[], [""], ["ok-key-" + "x" * 40, ""]])
def test_tokens_need_keys(keys: list[str]) -> None:
    with pytest.raises(ConfigError):
        Tokens(keys)


def test_a_single_string_is_not_a_key_list() -> None:
    with pytest.raises(TypeError):
        Tokens(NEW_KEY)


def _verifies(kind: TokenKind, token: str) -> bool:
    try:
        tokens.verify(kind, token)
    except BadToken:
        return False
    return True
