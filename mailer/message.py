"""One delivery's MIME message: headers, both body parts, the envelope sender, a DKIM signature.

Built for the send loop. Everything that is the same for every message of a campaign (From,
Reply-To, List-Id, Feedback-ID, the MIME skeleton, the DKIM tag list and key) is validated and
encoded once by `build_message_template`; per message only the recipient, Subject, Date,
Message-ID, List-Unsubscribe and the two encoded bodies are produced, straight as bytes. The
standard library's `EmailMessage` composition costs about a millisecond a message, several times
the whole per-message budget, so it is not used here; the tests instead parse every message back
with the standard library's parser and require every header and both parts to come back unchanged.

Wire format choices, and why:

- Header values that are plain printable ASCII go out as they are, folded at spaces within 78
  characters; anything else (non-ASCII, control characters, leading, trailing or doubled spaces,
  a literal "=?", a word too long to fold) is sent as RFC 2047 "B" encoded words of whole
  characters, so that a parser reads back exactly the string that was given.
- Bodies are UTF-8 with CRLF line breaks (a text part's canonical form, RFC 2046), in
  quoted-printable when mostly ASCII (readable, small, not flagged as "text disguised as
  base64") and base64 otherwise; both keep every line within 76 characters. Lines starting with
  "From " are sent as "=46rom" so that an mbox on the way cannot mangle them.
- The multipart boundary starts with "==": quoted-printable never emits "==" and base64 never
  emits "-", so no body can contain the boundary, whatever the template or the contact says.
- `List-Unsubscribe-Post` is a constant line, never encoded or folded (RFC 8058).
- CR, LF and NUL in anything bound for a header raise `HeaderInjection` before a byte is built.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import itertools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import idna

from mailer.errors import BadInput, ConfigError, InvalidAddress

__all__ = [
    "BuiltMessage",
    "DkimConfig",
    "HeaderInjection",
    "MessageTemplate",
    "build_message_template",
    "parse_verp",
    "verp_address",
]

MAX_LINE = 78  # RFC 5322 2.1.1: SHOULD; the hard limit is 998
MAX_TOKEN_LENGTH = 512  # keeps every List-Unsubscribe line far below 998
MAX_BASE_URL_LENGTH = 200
MIN_DKIM_KEY_BITS = 1024  # RFC 8301: verifiers refuse smaller keys; 2048 is what to use

ONE_CLICK = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"  # RFC 8058, byte for byte

# The DKIM h= list. Every header a recipient or a mailbox provider acts on is signed, the
# two list headers as RFC 8058 section 4 requires. The second group is signed once more than it
# occurs ("over-signing", RFC 6376 5.4.2): a relay that adds a second From, Subject or
# List-Unsubscribe, or a Reply-To or Cc where there was none, breaks the signature.
_DKIM_SIGNED = (
    b"from",
    b"reply-to",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
)
_DKIM_OVERSIGNED = (
    b"from",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
)

_FORBIDDEN = re.compile(r"[\r\n\0]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_PART = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*\Z")
_SLUG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*\Z")
# itsdangerous tokens: base64url fields separated by single dots, a leading dot when compressed.
# The same characters are safe in a URL path and in the dot-atom local part of the mailto.
_TOKEN = re.compile(r"\.?[A-Za-z0-9_~-]+(?:\.[A-Za-z0-9_~-]+)*\Z")
_FEEDBACK_ID = re.compile(r"[!-9;-~]+(?::[!-9;-~]+)+\Z")  # visible ASCII fields, colon-separated
_VERP = re.compile(r"bounces\+(0|[1-9][0-9]{0,18})-([a-z2-7]{16})@[^@\s]+\Z", re.IGNORECASE)
_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# An encoded word carries at most 42 bytes: 56 base64 characters, 68 with "=?utf-8?b?" and "?=",
# so even "Subject: " plus one word stays within 78 characters.
_WORD_BYTES = 42
_CTE_QP = b"quoted-printable\r\n\r\n"
_CTE_B64 = b"base64\r\n\r\n"


class HeaderInjection(BadInput):
    """A value bound for a header holds CR, LF or NUL: refused before anything is built or sent."""


@dataclass(frozen=True)
class DkimConfig:
    selector: str
    domain: str
    private_key_pem: bytes = field(repr=False)  # never in a log line or a traceback


@dataclass(frozen=True, slots=True)
class BuiltMessage:
    envelope_from: str  # the VERP address, for MAIL FROM; Return-Path is the receiver's to add
    recipient: str  # for RCPT TO (the domain in its ASCII form)
    data: bytes  # the whole message, CRLF line breaks, ready for DATA
    message_id: str  # as in the header, with the angle brackets


# -- validation ------------------------------------------------------------------------------


def _refuse_injection(value: str, what: str) -> None:
    if _FORBIDDEN.search(value) is not None:
        raise HeaderInjection(
            f"{what} contains a line break (CR or LF) or a NUL character, which could inject "
            "headers into the message: refused"
        )


def _utf8(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from a broken decoder upstream
        raise BadInput(f"{what} is not valid Unicode text: {exc.reason}") from None


def _ascii_domain(domain: str, what: str) -> str:
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidAddress(f"{what}: invalid domain {domain!r}: {exc}") from None
    if len(domain) > 253 or _HOSTNAME.match(domain) is None:
        raise InvalidAddress(f"{what}: invalid domain {domain!r}")
    return domain


def _ascii_address(value: str, what: str) -> str:
    """The address as it goes into a header and the SMTP envelope: a dot-atom local part and an
    ASCII (IDNA) domain. Cheap enough to run per message."""
    _refuse_injection(value, what)
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(f"{what} {value!r} is not an e-mail address")
    if not local.isascii():
        raise InvalidAddress(
            f"{what} {value!r} has a non-ASCII local part, which needs SMTPUTF8: not supported"
        )
    if len(local) > 64 or _LOCAL_PART.match(local) is None:
        raise InvalidAddress(f"{what} {value!r} is not an e-mail address")
    if domain.isascii() and _HOSTNAME.match(domain) is not None and len(domain) <= 253:
        return value
    return f"{local}@{_ascii_domain(domain, what)}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(raw: str) -> str:
    _refuse_injection(raw, "base URL")
    # RFC 2369: the URL sits inside angle brackets in a comma-separated list
    if not raw.isascii() or not raw.isprintable() or any(c in raw for c in ' <>",\\'):
        raise BadInput(f"base URL {raw!r} must be plain ASCII without spaces, quotes or commas")
    if len(raw) > MAX_BASE_URL_LENGTH:
        raise BadInput(f"base URL is longer than {MAX_BASE_URL_LENGTH} characters")
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise BadInput(f"base URL {raw!r} must be an absolute https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise BadInput(f"base URL {raw!r} must not carry a query, fragment or credentials")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        # RFC 8058 3.1: the one-click URI MUST be HTTPS. Plain http is allowed only on loopback,
        # for the demo and tests, where no mailbox provider will ever see it.
        raise BadInput(f"base URL {raw!r} must use https (RFC 8058 one-click unsubscribe)")
    return raw.rstrip("/")


# -- header encoding -------------------------------------------------------------------------


def _plain(value: str) -> bool:
    """True when `value` reads back unchanged from a header exactly as written."""
    return (
        value.isascii()
        and value.isprintable()
        and "=?" not in value
        and "  " not in value
        and value[:1] != " "
        and value[-1:] != " "
    )


def _encoded_words(value: str, max_bytes: int = _WORD_BYTES) -> list[str]:
    """RFC 2047 "B" encoded words of whole characters (a split character would not decode)."""
    data = value.encode("utf-8")
    words = []
    start, end_all = 0, len(data)
    while start < end_all:
        end = min(start + max_bytes, end_all)
        while end < end_all and (data[end] & 0xC0) == 0x80:  # UTF-8 continuation byte
            end -= 1
        encoded = binascii.b2a_base64(data[start:end], newline=False).decode("ascii")
        words.append(f"=?utf-8?b?{encoded}?=")
        start = end
    return words


def _fold(prefix: int, tokens: list[str], sep: str = " ") -> str:
    """Join tokens with single spaces, breaking lines (CRLF SP) to stay within 78 characters.

    `prefix` is the length of "Name: " on the first line. Unfolding (deleting the CRLFs) gives
    back the tokens joined by single spaces, so folding never changes a value. With `sep=""`
    the tokens are joined directly and a break adds the only space (for DKIM's h= list)."""
    out: list[str] = []
    line = prefix
    for token in tokens:
        if not out:
            out.append(token)
            line += len(token)
        elif line + len(sep) + len(token) <= MAX_LINE:
            out.append(sep)
            out.append(token)
            line += len(sep) + len(token)
        else:
            out.append("\r\n ")
            out.append(token)
            line = 1 + len(token)
    return "".join(out)


def _unstructured(value: str, prefix: int) -> str:
    """An unstructured header value (Subject)."""
    if prefix + len(value) <= MAX_LINE and _plain(value):
        return value
    if _plain(value):
        words = value.split(" ")
        if prefix + len(words[0]) <= MAX_LINE and max(len(w) for w in words) < MAX_LINE:
            return _fold(prefix, words)
    return _fold(prefix, _encoded_words(value))


def _quotable(word: str) -> bool:
    return (
        len(word) <= 70
        and word.isascii()
        and word.isprintable()
        and '"' not in word
        and "\\" not in word
        and "=?" not in word
    )


def _phrase(name: str) -> list[str]:
    """An unstructured rendering of a phrase (List-Id): one quoted string when that reads back
    unchanged, otherwise encoded words, which unstructured readers join without spaces."""
    if len(name) <= 60 and _plain(name) and '"' not in name and "\\" not in name:
        return [f'"{name}"']
    return _encoded_words(name)


def _display_name(name: str) -> list[str]:
    """A display name (a phrase, RFC 5322 3.2.5) as header tokens.

    Runs of plain ASCII words become quoted strings and runs of other words one encoded word
    each, the space between two words inside its run. Two encoded words side by side are
    avoided wherever a run fits one word (45 bytes, the RFC 2047 limit of 75 characters): RFC
    2047 6.2 says the space between them is to be dropped, which mail clients do, but Python's
    parser before the fix of CPython gh-128110 keeps it in an address header, and would read a
    space that is not there."""
    if len(name) <= 60 and _quotable(name):
        return [f'"{name}"']
    tokens: list[str] = []
    for quotable, run in itertools.groupby(name.split(" "), key=_quotable):
        if quotable:
            line: list[str] = []
            for word in run:  # quoted strings of at most about 70 characters
                if line and sum(map(len, line)) + len(line) + len(word) > 70:
                    tokens.append('"' + " ".join(line) + '"')
                    line = []
                line.append(word)
            tokens.append('"' + " ".join(line) + '"')
        else:
            tokens.extend(_encoded_words(" ".join(run), 45))
    return tokens


def _clean_name(name: str) -> str:
    """A display name as it is sent: every run of whitespace becomes one space, and surrounding
    whitespace goes. Readers treat a phrase's whitespace so anyway (Python's parser collapses it
    even inside an encoded word), so a tab or a line separator in a name is never what anybody
    sees; sending it normalised keeps what is sent and what is read the same."""
    return " ".join(name.split())


def _mailbox(name: str | None, address: str, prefix: int, what: str) -> str:
    """A From/To value."""
    if name is not None:
        _refuse_injection(name, what)
        _utf8(name, what)
        name = _clean_name(name)
    if not name:
        return address
    return _fold(prefix, [*_display_name(name), f"<{address}>"])


def _rfc5322_date(timestamp: int) -> bytes:
    t = time.gmtime(timestamp)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    ).encode("ascii")


# -- body encoding ---------------------------------------------------------------------------


def _escape_from(encoded: bytes) -> bytes:
    """Rewrite quoted-printable lines starting with "From " as "=46rom=20=" plus a soft break.

    Rare, so the split is paid only when such a line exists; the rest of the line moves to the
    next one, which keeps every line within 76 characters."""
    out = []
    for line in encoded.split(b"\r\n"):
        while line.startswith(b"From "):
            out.append(b"=46rom=20=")
            line = line[5:]
        out.append(line)
    return b"\r\n".join(out)


def _encode_body(text: str, what: str) -> tuple[bytes, bytes]:
    """(transfer encoding header tail, encoded body without a final line break)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    data = _utf8(text, what)
    # quoted-printable triples every non-ASCII byte; base64 adds a third to everything
    if (len(data) - len(text)) * 11 <= len(data):
        encoded = binascii.b2a_qp(data, False, True, False).replace(b"\n", b"\r\n")
        if encoded.startswith(b"From ") or b"\nFrom " in encoded:
            encoded = _escape_from(encoded)
        return _CTE_QP, encoded
    encoded = base64.encodebytes(data.replace(b"\n", b"\r\n"))
    return _CTE_B64, encoded[:-1].replace(b"\n", b"\r\n")


# -- VERP ------------------------------------------------------------------------------------


def _verp_mac(delivery_id: int, key: bytes) -> str:
    digest = hmac.new(key, b"mailer.verp.v1:%d" % delivery_id, hashlib.sha256).digest()
    # 80 bits, lower-case base32: survives MTAs that change the case of local parts
    return base64.b32encode(digest[:10]).decode("ascii").lower()


def verp_address(delivery_id: int, key: bytes, domain: str) -> str:
    """bounces+<delivery id>-<short HMAC>@domain: a bounce to it names its delivery, and the HMAC
    keeps a forged bounce from suppressing somebody else."""
    return f"bounces+{delivery_id}-{_verp_mac(delivery_id, key)}@{domain}"


def parse_verp(address: str, key: bytes) -> int | None:
    """The delivery id of a VERP bounce address, or None when it is not one of ours or forged."""
    candidate = address.strip()
    if candidate.startswith("<") and candidate.endswith(">"):
        candidate = candidate[1:-1]
    match = _VERP.match(candidate)
    if match is None:
        return None
    delivery_id = int(match[1])
    if not hmac.compare_digest(_verp_mac(delivery_id, key), match[2].lower()):
        return None
    return delivery_id


# -- DKIM ------------------------------------------------------------------------------------


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2 relaxed header canonicalisation; `name` is already lower case."""
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name + b":" + value + b"\r\n"


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 relaxed body canonicalisation. Our bodies rarely have whitespace to
    reduce (quoted-printable encodes trailing whitespace, base64 has none), so the regular
    expressions run only when there is something for them to do."""
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _WSP_BEFORE_CRLF.sub(b"\r\n", body)
    if b"  " in body or b"\t" in body:
        body = _WSP_RUN.sub(b" ", body)
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def _rsa_signer(
    pem: bytes, prefer_openssl: bool = True
) -> tuple[Callable[[bytes], bytes], int, str]:
    """(sign(data) -> RSASSA-PKCS1-v1_5 SHA-256 signature, key size in bits, backend name).

    With `cryptography` installed the signature is OpenSSL's (about 0.2 ms for 2048 bits);
    without it, dkimpy's pure-Python RSA (about 5 ms): correct, but it caps one core at about
    two hundred signed messages a second."""
    if prefer_openssl:
        try:
            # optional: mypy must pass with and without it installed
            from cryptography.exceptions import (  # type: ignore[import-not-found, unused-ignore]
                UnsupportedAlgorithm,
            )
            from cryptography.hazmat.primitives import (  # type: ignore[import-not-found, unused-ignore]
                hashes,
                serialization,
            )
            from cryptography.hazmat.primitives.asymmetric import (  # type: ignore[import-not-found, unused-ignore]
                padding,
                rsa,
            )
        except ImportError:
            pass
        else:
            try:
                key = serialization.load_pem_private_key(pem, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"the DKIM private key cannot be read: {exc}") from None
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ConfigError("the DKIM private key is not an RSA key")
            pad, algorithm = padding.PKCS1v15(), hashes.SHA256()

            def openssl_sign(data: bytes) -> bytes:
                signature: bytes = key.sign(data, pad, algorithm)
                return signature

            return openssl_sign, key.key_size, "openssl"

    from dkim.crypto import (  # type: ignore[import-untyped]
        RSASSA_PKCS1_v1_5_sign,
        UnparsableKeyError,
        parse_pem_private_key,
    )

    try:
        private: dict[str, Any] = parse_pem_private_key(pem)
    except (UnparsableKeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"the DKIM private key cannot be read: {exc}") from None

    def python_sign(data: bytes) -> bytes:
        signature: bytes = RSASSA_PKCS1_v1_5_sign(hashlib.sha256(data), private)
        return signature

    return python_sign, int(private["modulus"]).bit_length(), "python"


class _DkimSigner:
    """DKIM-Signature (rsa-sha256, relaxed/relaxed) over headers this module wrote itself.

    dkimpy's `dkim.sign` would parse the message we just assembled, canonicalise it in Python
    and sign with pure-Python RSA: about 5.5 ms a message. We know every header we wrote, so
    the canonical forms of the campaign's constant headers are computed once, and only the
    per-message ones and the body are canonicalised here. The tests verify the result with
    dkimpy's `dkim.verify`."""

    __slots__ = ("_constant", "_h", "_header_names", "_prefix", "_sign", "backend", "bits")

    def __init__(self, config: DkimConfig, constant: dict[bytes, bytes], prefer_openssl: bool):
        selector, domain = config.selector, config.domain
        _refuse_injection(selector, "DKIM selector")
        _refuse_injection(domain, "DKIM domain")
        if _SELECTOR.match(selector) is None:
            raise ConfigError(f"invalid DKIM selector {selector!r}")
        try:
            domain = _ascii_domain(domain, "DKIM domain")
        except InvalidAddress as exc:
            raise ConfigError(str(exc)) from None
        self._sign, self.bits, self.backend = _rsa_signer(config.private_key_pem, prefer_openssl)
        if self.bits < MIN_DKIM_KEY_BITS:
            raise ConfigError(
                f"the DKIM key has {self.bits} bits; verifiers refuse fewer than "
                f"{MIN_DKIM_KEY_BITS} (RFC 8301), use 2048"
            )
        # name -> canonical line, for the headers that are the same in every message
        self._constant = {name: _relaxed_header(name, value) for name, value in constant.items()}
        names = [n for n in _DKIM_SIGNED if n != b"reply-to" or n in constant]
        self._header_names = [*names, *_DKIM_OVERSIGNED]
        h_tokens = [n.decode("ascii") + ":" for n in self._header_names]
        h_tokens[-1] = h_tokens[-1][:-1] + ";"
        # h= may be folded after any colon (RFC 6376 3.5: FWS around ":" in sig-h-tag)
        tags = ["v=1;", "a=rsa-sha256;", "c=relaxed/relaxed;", f"d={domain};", f"s={selector};"]
        self._prefix = (_fold(len("DKIM-Signature: "), tags) + "\r\n t=").encode("ascii")
        self._h = ("\r\n h=" + _fold(3, h_tokens, sep="")).encode("ascii")

    def header(self, headers: dict[bytes, bytes], body: bytes, timestamp: int) -> bytes:
        """The DKIM-Signature line (CRLF-terminated) for a message with these per-message
        header values (raw, after the colon) and this body."""
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())
        value = b"".join(
            (b" ", self._prefix, b"%d;" % timestamp, self._h, b"\r\n bh=", body_hash, b";\r\n b=")
        )
        canonical = []
        seen = set()
        for name in self._header_names:
            if name in seen:
                continue  # over-signed: a second instance does not exist, so it adds nothing
            seen.add(name)
            line = self._constant.get(name)
            if line is None:
                raw = headers.get(name)
                if raw is None:
                    continue
                line = _relaxed_header(name, raw)
            canonical.append(line)
        canonical.append(_relaxed_header(b"dkim-signature", value)[:-2])  # no CRLF, b= empty
        signature = base64.b64encode(self._sign(b"".join(canonical))).decode("ascii")
        # first chunk shares its line with " b=", the rest 76 characters a line
        chunks = [signature[:74]] + [signature[i : i + 76] for i in range(74, len(signature), 76)]
        return b"DKIM-Signature:" + value + "\r\n ".join(chunks).encode("ascii") + b"\r\n"


# -- the template ----------------------------------------------------------------------------


class MessageTemplate:
    """The constant part of a campaign's messages; `build` makes one delivery's message."""

    __slots__ = (
        "_boundary_close",
        "_date",
        "_date_ts",
        "_dkim",
        "_domain",
        "_from_block",
        "_html_head",
        "_mailto_prefix",
        "_middle",
        "_tail",
        "_text_head",
        "_unsubscribe_prefix",
        "_verp_key",
    )

    def __init__(
        self,
        *,
        domain: str,
        verp_key: bytes,
        base_url: str,
        from_block: bytes,
        middle: bytes,
        tail: bytes,
        boundary: bytes,
        dkim_signer: _DkimSigner | None,
    ) -> None:
        self._domain = domain
        self._verp_key = verp_key
        self._unsubscribe_prefix = f"<{base_url}/u/"
        self._mailto_prefix = "<mailto:unsubscribe+"
        self._from_block = from_block
        self._middle = middle
        self._tail = tail
        part = b'\r\nContent-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: '
        self._text_head = b"--" + boundary + part % b"plain"
        self._html_head = b"\r\n--" + boundary + part % b"html"
        self._boundary_close = b"\r\n--" + boundary + b"--\r\n"
        self._dkim = dkim_signer
        self._date_ts = -1
        self._date = b""

    @property
    def dkim_key_bits(self) -> int | None:
        return self._dkim.bits if self._dkim is not None else None

    @property
    def dkim_backend(self) -> str | None:
        """The RSA code that signs: "openssl" (with `cryptography` installed), "python"
        (dkimpy's RSA, about 25 times slower: worth a warning in a send run), or None."""
        return self._dkim.backend if self._dkim is not None else None

    def build(
        self,
        *,
        delivery_id: int,
        to_address: str,
        to_name: str | None,
        subject: str,
        text: str,
        html: str,
        unsubscribe_token: str,
    ) -> BuiltMessage:
        if not 0 <= delivery_id < 10**19:  # the VERP address carries at most 19 digits
            raise BadInput(f"delivery id {delivery_id} is out of range")
        # every header-bound value is checked before anything is encoded
        recipient = _ascii_address(to_address, "recipient address")
        _refuse_injection(subject, "subject")
        _refuse_injection(unsubscribe_token, "unsubscribe token")
        if len(unsubscribe_token) > MAX_TOKEN_LENGTH or _TOKEN.match(unsubscribe_token) is None:
            raise BadInput("unsubscribe token is not a URL-safe token")
        _utf8(subject, "subject")
        to_value = _mailbox(to_name, recipient, 4, "recipient name").encode("ascii")
        subject_value = _unstructured(subject, 9).encode("ascii")

        text_cte, text_body = _encode_body(text, "text body")
        html_cte, html_body = _encode_body(html, "HTML body")
        body = b"".join(
            (
                self._text_head,
                text_cte,
                text_body,
                self._html_head,
                html_cte,
                html_body,
                self._boundary_close,
            )
        )

        now = int(time.time())
        if now != self._date_ts:  # formatting the date costs more than the rest of a header
            self._date, self._date_ts = _rfc5322_date(now), now
        date = self._date
        domain = self._domain
        message_id = f"<{delivery_id}.{os.urandom(8).hex()}@{domain}>"
        unsubscribe = _fold(
            18,
            [
                f"{self._unsubscribe_prefix}{unsubscribe_token}>,",
                f"{self._mailto_prefix}{unsubscribe_token}@{domain}>",
            ],
        ).encode("ascii")
        mid = message_id.encode("ascii")

        head = b"".join(
            (
                b"Date: ",
                date,
                b"\r\n",
                self._from_block,
                b"To: ",
                to_value,
                b"\r\nSubject: ",
                subject_value,
                b"\r\nMessage-ID: ",
                mid,
                b"\r\n",
                self._middle,
                b"List-Unsubscribe: ",
                unsubscribe,
                b"\r\n",
                self._tail,
            )
        )
        if self._dkim is not None:
            signature = self._dkim.header(
                {
                    b"date": b" " + date,
                    b"to": b" " + to_value,
                    b"subject": b" " + subject_value,
                    b"message-id": b" " + mid,
                    b"list-unsubscribe": b" " + unsubscribe,
                },
                body,
                now,
            )
            data = b"".join((signature, head, body))
        else:
            data = head + body
        return BuiltMessage(
            envelope_from=verp_address(delivery_id, self._verp_key, domain),
            recipient=recipient,
            data=data,
            message_id=message_id,
        )


def build_message_template(
    *,
    from_address: str,
    from_name: str | None,
    reply_to: str | None,
    list_id_name: str,
    campaign_slug: str,
    domain: str,
    feedback_id: str,
    verp_key: bytes,
    base_url: str,
    dkim: DkimConfig | None,
) -> MessageTemplate:
    """Validate and encode the parts of a campaign's messages that never change.

    Raises HeaderInjection for CR, LF or NUL in any value, InvalidAddress for a bad From or
    Reply-To, ConfigError for an unusable DKIM key, and BadInput for anything else wrong."""
    for value, what in (
        (from_address, "From address"),
        (from_name or "", "From name"),
        (reply_to or "", "Reply-To address"),
        (list_id_name, "list name"),
        (campaign_slug, "campaign slug"),
        (domain, "sender domain"),
        (feedback_id, "Feedback-ID"),
        (base_url, "base URL"),
    ):
        _refuse_injection(value, what)
    if not verp_key:
        raise ConfigError("the VERP key is empty")
    sender = _ascii_address(from_address, "From address")
    try:
        domain = _ascii_domain(domain, "sender domain")
    except InvalidAddress as exc:
        raise BadInput(str(exc)) from None
    if _SLUG.match(campaign_slug) is None:
        raise BadInput(f"campaign slug {campaign_slug!r} cannot be used in a List-Id")
    list_id = f"{campaign_slug}.list-id.{domain}"
    if len(list_id) > 255:  # RFC 2919
        raise BadInput(f"List-Id {list_id!r} is longer than 255 characters")
    if len(feedback_id) > 200 or _FEEDBACK_ID.match(feedback_id) is None:
        raise BadInput(
            f"Feedback-ID {feedback_id!r} must be colon-separated fields of visible ASCII, "
            "for example campaign:mailer:example.com"
        )
    url = _base_url(base_url)

    from_value = _mailbox(from_name, sender, 6, "From name")
    from_block = f"From: {from_value}\r\n"
    constant: dict[bytes, bytes] = {b"from": f" {from_value}".encode("ascii")}
    if reply_to:
        reply = _ascii_address(reply_to, "Reply-To address")
        from_block += f"Reply-To: {reply}\r\n"
        constant[b"reply-to"] = f" {reply}".encode("ascii")

    _utf8(list_id_name, "list name")
    name = _clean_name(list_id_name)
    list_id_value = _fold(9, [*_phrase(name), f"<{list_id}>"] if name else [f"<{list_id}>"])
    # hex digits after "==": see the module docstring for why no body can contain it
    boundary = f"==mailer_{os.urandom(12).hex()}=="
    content_type = f'multipart/alternative;\r\n boundary="{boundary}"'  # 83 characters unfolded
    middle = f"MIME-Version: 1.0\r\nList-Id: {list_id_value}\r\n"
    tail = f"Feedback-ID: {feedback_id}\r\nContent-Type: {content_type}\r\n\r\n"
    constant.update(
        {
            b"mime-version": b" 1.0",
            b"list-id": f" {list_id_value}".encode("ascii"),
            b"list-unsubscribe-post": b" List-Unsubscribe=One-Click",
            b"feedback-id": f" {feedback_id}".encode("ascii"),
            b"content-type": f" {content_type}".encode("ascii"),
        }
    )
    signer = _DkimSigner(dkim, constant, prefer_openssl=True) if dkim is not None else None
    return MessageTemplate(
        domain=domain,
        verp_key=verp_key,
        base_url=url,
        from_block=from_block.encode("ascii"),
        middle=middle.encode("ascii"),
        tail=ONE_CLICK + tail.encode("ascii"),
        boundary=boundary.encode("ascii"),
        dkim_signer=signer,
    )
