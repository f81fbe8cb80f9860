"""Messages as a receiver sees them: parsed back with the standard library, checked against
RFC 2369, 2919, 5322, 2047, 8058 and DKIM (verified by dkimpy), and the VERP return path."""

from __future__ import annotations

import base64
import email.policy
import re
import secrets
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import dkim  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.errors import BadInput, ConfigError, InvalidAddress
from mailer.message import (
    BuiltMessage,
    DkimConfig,
    MessageTemplate,
    _rsa_signer,
    build_message_template,
    parse_verp,
    verp_address,
)

VERP_KEY = b"verp-key-0123456789abcdefghijklmnop"
TOKEN = "WzQyXQ.c2lnbmF0dXJl"
DOMAIN = "news.example.com"
ONE_CLICK_LINE = b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"


# -- an RSA key without any dependency but the standard library -----------------------------
# (cryptography is optional for mailer: it only makes signing faster)


def _probable_prime(bits: int) -> int:
    small = [p for p in range(3, 2000, 2) if all(p % d for d in range(3, int(p**0.5) + 1, 2))]
    while True:
        n = secrets.randbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if any(n % p == 0 for p in small):
            continue
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(24):  # Miller-Rabin
            x = pow(secrets.randbelow(n - 3) + 2, d, n)
            if x in (1, n - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                break
        else:
            return n


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def rsa_key_pair(bits: int = 2048) -> tuple[bytes, bytes]:
    """(PKCS#1 private key PEM, DKIM DNS record "v=DKIM1; k=rsa; p=...")."""
    e = 65537
    while True:
        p, q = _probable_prime(bits // 2), _probable_prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e and (p * q).bit_length() == bits:
            break
    n, d = p * q, pow(e, -1, phi)
    fields = [0, n, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p)]
    der = _der(0x30, b"".join(_der_int(v) for v in fields))
    body = base64.encodebytes(der).decode("ascii")
    pem = f"-----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----\n"
    rsa_oid = _der(0x30, bytes.fromhex("06092a864886f70d0101010500"))
    public = _der(0x30, _der_int(n) + _der_int(e))
    spki = _der(0x30, rsa_oid + _der(0x03, b"\0" + public))
    return pem.encode("ascii"), b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    return rsa_key_pair(2048)


# -- helpers ---------------------------------------------------------------------------------


def make_template(**overrides: Any) -> MessageTemplate:
    options: dict[str, Any] = {
        "from_address": "news@example.com",
        "from_name": "Actief Klussenservice",
        "reply_to": "help@example.com",
        "list_id_name": "Spring offers",
        "campaign_slug": "spring-2024",
        "domain": DOMAIN,
        "feedback_id": "spring-2024:mailer:example.com",
        "verp_key": VERP_KEY,
        "base_url": "https://t.example.com/",
        "dkim": None,
    }
    options.update(overrides)
    return build_message_template(**options)


def build(template: MessageTemplate, **overrides: Any) -> BuiltMessage:
    options: dict[str, Any] = {
        "delivery_id": 42,
        "to_address": "ann@example.org",
        "to_name": "Ann de Vries",
        "subject": "Spring offers",
        "text": "Hello Ann,\n\nOur spring offers.\n",
        "html": "<p>Hello Ann,</p>\n<p>Our spring offers.</p>\n",
        "unsubscribe_token": TOKEN,
    }
    options.update(overrides)
    return template.build(**options)


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def body_text(message: EmailMessage, subtype: str) -> str:
    part = message.get_body((subtype,))
    assert part is not None
    assert part.get_content_type() == f"text/{subtype}"
    assert part.get_content_charset() == "utf-8"
    assert part["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")  # CRLF on the wire; compare with wire_text()


def wire_text(value: str) -> str:
    """Text as a message carries it: CRLF line breaks (RFC 2046), read back as \\n."""
    return value.replace("\r\n", "\n").replace("\r", "\n")


def sent_name(name: str) -> str:
    """Display names go out with every run of whitespace collapsed to one space and outer
    whitespace removed, as readers show a phrase anyway."""
    return " ".join(name.split())


_PHRASE_PART = re.compile(r'"([^"\\]*)"|=\?utf-8\?b\?([A-Za-z0-9+/=]*)\?=|( +)')


def raw_header(data: bytes, name: str) -> str:
    """A header's value as sent, unfolded."""
    head = data.partition(b"\r\n\r\n")[0].decode("ascii")
    for field in re.split(r"\r\n(?![ \t])", head):
        key, _, value = field.partition(":")
        if key.lower() == name.lower():
            return value.replace("\r\n", "").strip()
    raise KeyError(name)


def rfc2047_display_name(data: bytes, header: str) -> tuple[str, bool]:
    """(the display name as RFC 5322 and RFC 2047 6.2 define it, decoded without Python's
    parser; whether two encoded words stand side by side in it)."""
    value = raw_header(data, header)
    phrase = value.rpartition(" <")[0] if value.endswith(">") else ""
    out: list[str] = []
    previous_ew = space = adjacent = False
    position = 0
    for match in _PHRASE_PART.finditer(phrase):
        assert match.start() == position, phrase
        position = match.end()
        if match[3]:
            space = True
            continue
        ew = match[2] is not None
        text = base64.b64decode(match[2]).decode("utf-8") if ew else match[1]
        if out and space and not (previous_ew and ew):  # 6.2: no space between two words
            out.append(" ")
        adjacent = adjacent or (previous_ew and ew)
        out.append(text)
        previous_ew, space = ew, False
    assert position == len(phrase), phrase
    return "".join(out), adjacent


def assert_display_name(data: bytes, header: str, name: str | None) -> None:
    expected = sent_name(name or "")
    decoded, adjacent = rfc2047_display_name(data, header)
    assert decoded == expected
    (address,) = parse(data)[header].addresses
    if not adjacent:
        assert address.display_name == expected
    # else: Python before the fix of CPython gh-128110 keeps the space between two encoded
    # words of an address header that RFC 2047 6.2 drops; only names with a run of over 45
    # bytes of non-ASCII text without a space need two words side by side.


def header_lines(data: bytes) -> list[bytes]:
    head, _, _ = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")


def dkim_tags(data: bytes) -> dict[str, str]:
    message = parse(data)
    raw = re.sub(r"\s+", "", str(message["DKIM-Signature"]))
    return dict(tag.split("=", 1) for tag in raw.split(";") if tag)


# -- headers ---------------------------------------------------------------------------------


def test_every_header_parses_back() -> None:
    before = time.time()
    built = build(make_template())
    message = parse(built.data)

    assert not message.defects
    assert message["Subject"] == "Spring offers"
    (sender,) = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Actief Klussenservice", "news@example.com")
    assert message["Reply-To"].addresses[0].addr_spec == "help@example.com"
    (to,) = message["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Ann de Vries", "ann@example.org")
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["Date"].datetime.utcoffset().total_seconds() == 0
    assert before - 1 <= parsedate_to_datetime(str(message["Date"])).timestamp() <= time.time()
    assert message["Feedback-ID"] == "spring-2024:mailer:example.com"
    assert "Return-Path" not in message  # the receiving MTA adds it from MAIL FROM
    assert body_text(message, "plain") == "Hello Ann,\n\nOur spring offers.\n"
    assert body_text(message, "html") == "<p>Hello Ann,</p>\n<p>Our spring offers.</p>\n"
    assert built.recipient == "ann@example.org"
    assert built.data.endswith(b"--\r\n")
    assert b"\n" not in built.data.replace(b"\r\n", b"")  # CRLF only, no bare LF or CR
    assert b"\r" not in built.data.replace(b"\r\n", b"")


def test_message_id_is_unique_and_on_the_sender_domain() -> None:
    template = make_template()
    ids = [build(template, delivery_id=7).message_id for _ in range(200)]
    assert len(set(ids)) == 200
    for message_id in ids[:3]:
        assert re.fullmatch(r"<7\.[0-9a-f]{16}@news\.example\.com>", message_id)
    message = parse(build(template).data)
    assert message["Message-ID"].startswith("<42.")
    assert message["Message-ID"].endswith("@news.example.com>")


def test_list_unsubscribe_follows_rfc_2369_and_8058() -> None:
    built = build(make_template())
    message = parse(built.data)
    value = str(message["List-Unsubscribe"])
    # RFC 2369: angle-bracket enclosed URLs, comma separated, in order of preference
    match = re.fullmatch(r"<([^<>\s]+)>\s*,\s*<([^<>\s]+)>", value)
    assert match, value
    https, mailto = urlsplit(match[1]), urlsplit(match[2])
    # RFC 8058 3.1: one HTTPS URI, carrying an opaque identifier
    assert (https.scheme, https.netloc, https.path) == ("https", "t.example.com", f"/u/{TOKEN}")
    assert not https.query
    assert (mailto.scheme, mailto.path) == ("mailto", f"unsubscribe+{TOKEN}@{DOMAIN}")
    # RFC 8058: exactly this text, never encoded, never folded, exactly once
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert built.data.count(ONE_CLICK_LINE) == 1
    assert built.data.lower().count(b"list-unsubscribe-post:") == 1


def test_list_unsubscribe_for_a_loopback_demo_server() -> None:
    message = parse(build(make_template(base_url="http://127.0.0.1:8000")).data)
    assert str(message["List-Unsubscribe"]).startswith(f"<http://127.0.0.1:8000/u/{TOKEN}>, ")


def test_plain_http_is_refused_for_a_public_host() -> None:
    with pytest.raises(BadInput, match="https"):
        make_template(base_url="http://t.example.com")
    for bad in ("ftp://t.example.com", "https://t.example.com/?a=b", "https://a,b.example.com"):
        with pytest.raises(BadInput):
            make_template(base_url=bad)


def test_list_id_follows_rfc_2919() -> None:
    message = parse(build(make_template()).data)
    assert message["List-Id"] == '"Spring offers" <spring-2024.list-id.news.example.com>'
    accented = parse(build(make_template(list_id_name="Aanbiedingen één")).data)
    assert accented["List-Id"] == "Aanbiedingen één <spring-2024.list-id.news.example.com>"
    bare = parse(build(make_template(list_id_name="")).data)
    assert bare["List-Id"] == "<spring-2024.list-id.news.example.com>"
    with pytest.raises(BadInput, match="List-Id"):
        make_template(campaign_slug="spring 2024")


def test_feedback_id_must_be_colon_separated_fields() -> None:
    for bad in ("campaign", "a::b", "a b:c", "a:b:"):
        with pytest.raises(BadInput, match="Feedback-ID"):
            make_template(feedback_id=bad)


def test_non_ascii_subject_and_names_are_encoded_and_read_back() -> None:
    template = make_template(from_name="Klussenservice Zoë & Zonen")
    subject = "Voorjaarsactie: 20% korting op uw café 🛠️ — alleen deze week!"
    built = build(template, subject=subject, to_name="Ägnes Ø'Brien, Jr.")
    for line in header_lines(built.data):
        assert line.isascii()
        assert len(line) <= 78
    assert b"Subject: =?utf-8?b?" in built.data
    assert b"To: =?utf-8?b?" in built.data
    message = parse(built.data)
    assert message["Subject"] == subject
    assert message["From"].addresses[0].display_name == "Klussenservice Zoë & Zonen"
    assert message["To"].addresses[0].display_name == "Ägnes Ø'Brien, Jr."
    assert message["To"].addresses[0].addr_spec == "ann@example.org"


def test_long_non_ascii_names_are_split_into_legal_encoded_words() -> None:
    name = "株式会社アクティブ・クルッセンサービス 東京支店"
    built = build(make_template(from_name="Zoë " * 30), to_name=name)
    for line in header_lines(built.data):
        assert len(line) <= 78
    for word in re.findall(rb"=\?utf-8\?b\?[^?]*\?=", built.data):
        assert len(word) <= 75  # RFC 2047 2
    assert_display_name(built.data, "To", name)
    assert_display_name(built.data, "From", "Zoë " * 30)


def test_long_ascii_subject_is_folded_not_encoded() -> None:
    subject = " ".join(["Spring"] * 40)
    built = build(make_template(), subject=subject)
    assert b"=?" not in built.data.partition(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in header_lines(built.data))
    assert parse(built.data)["Subject"] == subject


def test_no_display_name_gives_a_bare_address() -> None:
    built = build(make_template(from_name=None, reply_to=None), to_name=None)
    message = parse(built.data)
    assert message["To"] == "ann@example.org"
    assert message["From"] == "news@example.com"
    assert "Reply-To" not in message
    assert parse(build(make_template(), to_name="   ").data)["To"] == "ann@example.org"


def test_international_domain_goes_out_as_idna() -> None:
    built = build(make_template(), to_address="jan@bücher.example")
    assert built.recipient == "jan@xn--bcher-kva.example"
    assert parse(built.data)["To"].addresses[0].domain == "xn--bcher-kva.example"
    with pytest.raises(InvalidAddress, match="SMTPUTF8"):
        build(make_template(), to_address="jürgen@example.org")
    for bad in ("ann", "ann@", "@example.org", "a b@example.org", "<ann@example.org>", "a@b@c"):
        with pytest.raises(InvalidAddress):
            build(make_template(), to_address=bad)


def test_bodies_keep_lines_short_and_never_contain_the_boundary() -> None:
    boundary_like = "--==mailer_0123==\n" * 3
    text = "From the start\n.\n..\nx" * 3 + "=" * 500 + "\n" + "ä" * 3000 + "\n" + boundary_like
    built = build(make_template(), text=text, html="<p>" + "w" * 5000 + "</p>")
    for line in built.data.split(b"\r\n"):
        assert len(line) <= 78
        assert not line.startswith(b"From ")
    message = parse(built.data)
    assert len(list(message.iter_parts())) == 2
    assert body_text(message, "plain") == wire_text(text)
    assert body_text(message, "html") == "<p>" + "w" * 5000 + "</p>"


def test_mostly_ascii_bodies_are_quoted_printable_others_base64() -> None:
    message = parse(build(make_template(), text="Hallo café", html="Привет мир " * 50).data)
    parts = list(message.iter_parts())
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
    assert body_text(message, "html") == "Привет мир " * 50


# -- round trip, whatever goes in --------------------------------------------------------------

_NASTY_LINES = st.sampled_from(
    [
        "From here on",
        "From ",
        ".",
        "..",
        ". ",
        "=",
        "==",
        "=?utf-8?b?SGk=?=",
        "=41",
        "x" * 1200,
        "tab\tend\t",
        "trailing   ",
        " ",
        "\U0001f600 non-BMP \U00010348",
        "--==mailer_x==",
        "\x0b\x0c\x1c\x85\u2028",
    ]
)
_BODY = st.one_of(
    st.text(),
    st.lists(st.one_of(_NASTY_LINES, st.text()), max_size=12).map("\n".join),
    st.lists(st.one_of(_NASTY_LINES, st.text()), max_size=12).map("\r\n".join),
)
_HEADER_TEXT = st.one_of(
    st.text(max_size=300).filter(lambda s: not any(c in s for c in "\r\n\0")),
    st.lists(_NASTY_LINES, max_size=5).map(" ".join),
)


def _roundtrip(built: BuiltMessage, subject: str, name: str, text: str, html: str) -> None:
    for line in built.data.split(b"\r\n"):
        assert len(line) <= 78, line
    assert built.data.isascii()
    message = parse(built.data)
    assert not message.defects
    assert message["Subject"] == subject
    assert_display_name(built.data, "To", name)
    assert message["To"].addresses[0].addr_spec == "ann@example.org"
    assert body_text(message, "plain") == wire_text(text)
    assert body_text(message, "html") == wire_text(html)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=_HEADER_TEXT, name=_HEADER_TEXT, text=_BODY, html=_BODY)
def test_any_subject_name_and_body_read_back_unchanged(
    subject: str, name: str, text: str, html: str
) -> None:
    built = build(make_template(), subject=subject, to_name=name, text=text, html=html)
    _roundtrip(built, subject, name, text, html)


@settings(max_examples=100, deadline=None)
@given(from_name=_HEADER_TEXT, list_name=_HEADER_TEXT)
def test_any_sender_and_list_name_read_back_unchanged(from_name: str, list_name: str) -> None:
    data = build(make_template(from_name=from_name, list_id_name=list_name)).data
    assert_display_name(data, "From", from_name)
    message = parse(data)
    list_id = str(message["List-Id"])
    assert list_id.endswith("<spring-2024.list-id.news.example.com>")
    phrase = list_id.removesuffix("<spring-2024.list-id.news.example.com>").removesuffix(" ")
    if raw_header(data, "List-Id").startswith('"'):  # a quoted string: unstructured keeps quotes
        phrase = phrase[1:-1]
    assert phrase == sent_name(list_name)


# -- VERP --------------------------------------------------------------------------------------


def test_verp_maps_a_bounce_back_to_its_delivery() -> None:
    built = build(make_template(), delivery_id=123456789)
    local, _, domain = built.envelope_from.partition("@")
    assert domain == DOMAIN
    assert re.fullmatch(r"bounces\+123456789-[a-z2-7]{16}", local)
    assert len(local) <= 64  # RFC 5321 4.5.3.1.1
    assert parse_verp(built.envelope_from, VERP_KEY) == 123456789
    assert parse_verp(f"<{built.envelope_from.upper()}>", VERP_KEY) == 123456789
    assert verp_address(0, VERP_KEY, DOMAIN).startswith("bounces+0-")
    assert parse_verp(verp_address(0, VERP_KEY, DOMAIN), VERP_KEY) == 0


def test_a_tampered_or_foreign_verp_address_is_refused() -> None:
    address = verp_address(1001, VERP_KEY, DOMAIN)
    local, _, domain = address.partition("@")
    prefix, mac = local.rsplit("-", 1)
    flipped = mac[:-1] + ("a" if mac[-1] != "a" else "b")
    for bad in (
        f"{prefix}-{flipped}@{domain}",  # changed MAC
        address.replace("+1001-", "+1002-"),  # another delivery's id
        address.replace("+1001-", "+01001-"),  # not the canonical id
        f"{prefix}-{mac[:-1]}@{domain}",  # truncated
        f"{local}",  # no domain
        f"someone+1001-{mac}@{domain}",
        "ann@example.org",
        "",
    ):
        assert parse_verp(bad, VERP_KEY) is None, bad
    assert parse_verp(address, b"another key") is None


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_verp_round_trips_every_id(delivery_id: int) -> None:
    assert parse_verp(verp_address(delivery_id, VERP_KEY, DOMAIN), VERP_KEY) == delivery_id


# -- DKIM --------------------------------------------------------------------------------------


def _dns(record: bytes) -> Callable[..., bytes]:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s2024._domainkey.example.com."
        return record

    return lookup


def _dkim_template(pem: bytes, **overrides: Any) -> MessageTemplate:
    return make_template(dkim=DkimConfig("s2024", "example.com", pem), **overrides)


def test_dkim_signature_verifies_and_covers_the_list_headers(
    rsa_key: tuple[bytes, bytes],
) -> None:
    pem, record = rsa_key
    built = build(_dkim_template(pem), subject="Voorjaar ☀ aanbiedingen", to_name="Zoë")
    assert built.data.startswith(b"DKIM-Signature: ")
    assert all(len(line) <= 78 for line in header_lines(built.data))
    assert dkim.verify(built.data, dnsfunc=_dns(record))
    tags = dkim_tags(built.data)
    assert tags["v"] == "1"
    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert (tags["d"], tags["s"]) == ("example.com", "s2024")
    signed = tags["h"].lower().split(":")
    for name in ("from", "to", "subject", "date", "message-id"):
        assert name in signed
    # RFC 8058 section 4, and over-signed so that a second copy cannot be added
    assert signed.count("list-unsubscribe") == 2
    assert signed.count("list-unsubscribe-post") == 2


def test_dkim_fails_when_a_list_header_is_changed_or_added(rsa_key: tuple[bytes, bytes]) -> None:
    pem, record = rsa_key
    data = build(_dkim_template(pem)).data
    changed = data.replace(f"/u/{TOKEN}>".encode(), b"/u/other>")
    assert changed != data
    assert not dkim.verify(changed, dnsfunc=_dns(record))
    head, _, body = data.partition(b"\r\n\r\n")
    added = head + b"\r\nList-Unsubscribe: <https://evil.example/u/x>\r\n\r\n" + body
    assert not dkim.verify(added, dnsfunc=_dns(record))
    post_removed = data.replace(ONE_CLICK_LINE, b"\r\n")
    assert not dkim.verify(post_removed, dnsfunc=_dns(record))
    body_changed = data.replace(b"spring offers", b"summer offers")
    assert not dkim.verify(body_changed, dnsfunc=_dns(record))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=_HEADER_TEXT, name=_HEADER_TEXT, text=_BODY, html=_BODY)
def test_dkim_verifies_whatever_the_content(
    rsa_key: tuple[bytes, bytes], subject: str, name: str, text: str, html: str
) -> None:
    pem, record = rsa_key
    template = _dkim_template(pem, reply_to=None)
    built = build(template, subject=subject, to_name=name, text=text, html=html)
    assert dkim.verify(built.data, dnsfunc=_dns(record))
    _roundtrip(built, subject, name, text, html)


def test_openssl_and_pure_python_rsa_sign_alike(rsa_key: tuple[bytes, bytes]) -> None:
    pytest.importorskip("cryptography")
    pem, _ = rsa_key
    fast, bits, backend = _rsa_signer(pem, prefer_openssl=True)
    slow, slow_bits, slow_backend = _rsa_signer(pem, prefer_openssl=False)
    assert (backend, slow_backend) == ("openssl", "python")
    assert bits == slow_bits == 2048
    assert fast(b"data to sign") == slow(b"data to sign")  # PKCS#1 v1.5 is deterministic


def test_pure_python_rsa_signature_verifies(
    rsa_key: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailer.message as message_module

    pem, record = rsa_key
    real = message_module._rsa_signer
    monkeypatch.setattr(
        message_module, "_rsa_signer", lambda key, prefer_openssl=True: real(key, False)
    )
    template = _dkim_template(pem)
    assert template.dkim_backend == "python"
    assert template.dkim_key_bits == 2048
    assert dkim.verify(build(template).data, dnsfunc=_dns(record))


def test_unusable_dkim_keys_are_refused() -> None:
    small, _ = rsa_key_pair(768)
    with pytest.raises(ConfigError, match="2048"):
        _dkim_template(small)
    with pytest.raises(ConfigError, match="cannot be read"):
        _dkim_template(b"-----BEGIN RSA PRIVATE KEY-----\nnonsense\n-----END RSA PRIVATE KEY-----")
    with pytest.raises(ConfigError, match="selector"):
        make_template(dkim=DkimConfig("bad selector", "example.com", b""))


def test_text_that_is_not_unicode_is_refused() -> None:
    for field in ("subject", "to_name", "text", "html"):
        with pytest.raises(BadInput, match="not valid Unicode"):
            build(make_template(), **{field: "broken \udc80 surrogate"})
    with pytest.raises(BadInput, match="out of range"):
        build(make_template(), delivery_id=-1)


def test_dkim_config_never_shows_its_key() -> None:
    assert "PRIVATE" not in repr(DkimConfig("s", "example.com", b"-----BEGIN PRIVATE KEY-----"))
