"""CR, LF or NUL in anything bound for a header is refused before a message exists."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer.errors import BadInput
from mailer.message import DkimConfig, HeaderInjection, MessageTemplate, build_message_template

BREAKERS = ["\r", "\n", "\0", "\r\n", "\n\r"]

TEMPLATE: dict[str, Any] = {
    "from_address": "news@example.com",
    "from_name": "Actief Klussenservice",
    "reply_to": "help@example.com",
    "list_id_name": "Spring offers",
    "campaign_slug": "spring-2024",
    "domain": "example.com",
    "feedback_id": "spring-2024:mailer:example.com",
    "verp_key": b"verp-key-0123456789abcdefghijklmnop",
    "base_url": "https://t.example.com",
    "dkim": None,
}
MESSAGE: dict[str, Any] = {
    "delivery_id": 1,
    "to_address": "ann@example.org",
    "to_name": "Ann",
    "subject": "Spring offers",
    "text": "Hello",
    "html": "<p>Hello</p>",
    "unsubscribe_token": "WzFd.c2ln",
}
TEMPLATE_FIELDS = [k for k, v in TEMPLATE.items() if isinstance(v, str)]
MESSAGE_FIELDS = ["to_address", "to_name", "subject", "unsubscribe_token"]


def template(**overrides: Any) -> MessageTemplate:
    return build_message_template(**{**TEMPLATE, **overrides})


def _injected(value: str, breaker: str) -> list[str]:
    """The classic attack, and the character alone at the start, middle and end."""
    return [
        f"{value}{breaker}Bcc: victim@example.net",
        f"{breaker}{value}",
        f"{value[:2]}{breaker}{value[2:]}",
        f"{value}{breaker}",
    ]


@pytest.mark.parametrize("breaker", BREAKERS, ids=repr)
@pytest.mark.parametrize("field", TEMPLATE_FIELDS)
def test_campaign_values_with_line_breaks_are_refused(field: str, breaker: str) -> None:
    for value in _injected(TEMPLATE[field], breaker):
        with pytest.raises(HeaderInjection) as raised:
            template(**{field: value})
        assert "line break" in str(raised.value)


@pytest.mark.parametrize("breaker", BREAKERS, ids=repr)
@pytest.mark.parametrize("field", MESSAGE_FIELDS)
def test_message_values_with_line_breaks_are_refused(field: str, breaker: str) -> None:
    built = template()
    for value in _injected(MESSAGE[field], breaker):
        with pytest.raises(HeaderInjection) as raised:
            built.build(**{**MESSAGE, field: value})
        assert "line break" in str(raised.value)


@pytest.mark.parametrize("breaker", BREAKERS, ids=repr)
def test_dkim_selector_and_domain_with_line_breaks_are_refused(breaker: str) -> None:
    with pytest.raises(HeaderInjection):
        template(dkim=DkimConfig(f"s1{breaker}x", "example.com", b""))
    with pytest.raises(HeaderInjection):
        template(dkim=DkimConfig("s1", f"example.com{breaker}", b""))


def test_the_error_names_the_value_and_is_bad_input() -> None:
    with pytest.raises(HeaderInjection, match="subject") as raised:
        template().build(**{**MESSAGE, "subject": "Hi\r\nBcc: victim@example.net"})
    assert isinstance(raised.value, BadInput)
    assert raised.value.exit_code == 2  # the CLI's "bad input, nothing written"
    with pytest.raises(HeaderInjection, match="recipient name"):
        template().build(**{**MESSAGE, "to_name": "Ann\nBcc: x@example.net"})
    with pytest.raises(HeaderInjection, match="From name"):
        template(from_name="News\r\nBcc: x@example.net")


@given(
    prefix=st.text(max_size=20),
    breaker=st.sampled_from(["\r", "\n", "\0"]),
    suffix=st.text(max_size=20),
    field=st.sampled_from(["subject", "to_name"]),
)
def test_a_break_anywhere_in_a_subject_or_name_is_refused(
    prefix: str, breaker: str, suffix: str, field: str
) -> None:
    with pytest.raises(HeaderInjection):
        template().build(**{**MESSAGE, field: prefix + breaker + suffix})


def test_other_line_separators_are_encoded_not_sent_raw() -> None:
    """U+2028, U+0085, vertical tab and form feed are no header break in RFC 5322, but some
    software splits lines on them: they go out inside encoded words, never as raw bytes."""
    subject = "Hi\u2028Bcc: a@example.net\x85Cc: b@example.net\x0bX-A: 1\x0cX-B: 2"
    built = template().build(**{**MESSAGE, "subject": subject, "to_name": "Ann\u2029Bcc: x"})
    head = built.data.partition(b"\r\n\r\n")[0]
    assert head.isascii()
    message = BytesParser(policy=email.policy.default).parsebytes(built.data)
    assert message["Subject"] == subject
    for name in ("Bcc", "Cc", "X-A", "X-B"):
        assert name not in message


def test_line_breaks_in_bodies_stay_in_the_body() -> None:
    attack = "Hello\r\n\r\nBcc: victim@example.net\r\n--boundary\r\nContent-Type: text/html\r\n\r\n"
    built = template().build(**{**MESSAGE, "text": attack, "html": attack})
    message = BytesParser(policy=email.policy.default).parsebytes(built.data)
    assert "Bcc" not in message
    assert len(list(message.iter_parts())) == 2
    for part in message.iter_parts():
        assert "Bcc" not in part
        assert part.get_content().replace("\r\n", "\n") == attack.replace("\r\n", "\n")


def test_a_token_that_would_change_the_unsubscribe_urls_is_refused() -> None:
    for token in ("a>,<https://evil.example/", "a b", "a,b", "../x", "a@evil.example", "x.", ""):
        with pytest.raises(BadInput):
            template().build(**{**MESSAGE, "unsubscribe_token": token})


def test_addresses_that_carry_more_than_one_address_are_refused() -> None:
    for bad in (
        "ann@example.org, victim@example.net",
        "Ann <ann@example.org>",
        "ann@example.org>",
        '"ann"@example.org',
        "ann@exa mple.org",
    ):
        with pytest.raises(BadInput):
            template().build(**{**MESSAGE, "to_address": bad})
        with pytest.raises(BadInput):
            template(from_address=bad)
        with pytest.raises(BadInput):
            template(reply_to=bad)
