"""Message-building micro-benchmark: mailer's per-campaign template against stdlib composition.

    .venv/bin/python bench/message.py            # 5,000 messages a run (DKIM runs fewer)
    .venv/bin/python bench/message.py --quick    # a smoke run
    .venv/bin/python bench/message.py -n 20000

A realistic campaign mail (inlined-CSS HTML of about 12 kB, a derived text part of about 3 kB,
a Dutch subject with one accented word, a display name per recipient) is built for rotating
recipients:

  * mailer: `build_message_template` once, then `MessageTemplate.build` per message, without
    DKIM and with it (RSA-2048; OpenSSL through `cryptography` when installed, and dkimpy's
    pure-Python RSA, the fallback without it);
  * baseline: what one writes by hand with the standard library: an `EmailMessage` with the
    same headers, `set_content(text)`, `add_alternative(html)` and `as_bytes()`, and the same
    plus `dkim.sign` (dkimpy) for the DKIM comparison.

It prints microseconds per message (the median of several runs), messages per second on one
core, and the ratio to the baseline. No timing is asserted anywhere: see DESIGN.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dkim  # type: ignore[import-untyped]  # noqa: E402

from mailer.message import DkimConfig, MessageTemplate, build_message_template  # noqa: E402

VERP_KEY = b"bench-verp-key-0123456789abcdefghij"
RECIPIENTS = [
    (
        f"{first.lower().encode('ascii', 'ignore').decode()}.{i}@example.org",
        f"{first} {last}",
        f"WzEyMzQ1LCJ1Il0.{i:08d}c2lnbmF0dXJl",
    )
    for i, (first, last) in enumerate(
        (f, lst)
        for f in ("Anna", "Bram", "Chloé", "Daan", "Emma", "Zoë", "Jens", "Roos")
        for lst in ("de Vries", "Jansen", "Müller", "O'Neill", "Bakker")
    )
]
SUBJECT = "Voorjaarsactie: 20% korting op al uw klussen in huis en tuin, ook voor café's"
PARAGRAPH = (
    '<p style="margin:0 0 16px 0;font-family:Helvetica,Arial,sans-serif;font-size:16px;'
    'line-height:24px;color:#333333">Beste klant, dit voorjaar helpen wij u graag met '
    "schilderwerk, tuinonderhoud en kleine reparaties. Plan uw klus v\u00f3\u00f3r 1 mei en "
    'ontvang 20% korting. <a href="https://www.example.com/acties/voorjaar?utm_source=mail&amp;'
    'utm_campaign=spring" style="color:#0b6e4f;text-decoration:underline">Bekijk de actie</a>.'
    "</p>\n"
)
HTML = (
    '<!DOCTYPE html>\n<html lang="nl"><head><meta charset="utf-8"><title>Voorjaarsactie</title>'
    '</head>\n<body style="margin:0;padding:0;background:#f4f4f4">\n<table role="presentation" '
    'width="100%" cellpadding="0" cellspacing="0" style="background:#f4f4f4">\n'
    + PARAGRAPH
    * 22
    + '<p style="font-size:12px;color:#777777">U ontvangt deze mail omdat u zich heeft '
    'aangemeld. <a href="https://t.example.com/u/TOKEN">Afmelden</a></p>\n</table></body></html>\n'
)
TEXT = (
    "Beste klant,\n\n"
    + (
        "Dit voorjaar helpen wij u graag met schilderwerk, tuinonderhoud en kleine reparaties.\n"
        "Plan uw klus v\u00f3\u00f3r 1 mei en ontvang 20% korting: "
        "https://www.example.com/acties/voorjaar\n\n"
    )
    * 14
    + "Afmelden: https://t.example.com/u/TOKEN\n"
)


def rsa_key() -> bytes:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        from tests.test_message_headers import rsa_key_pair

        return rsa_key_pair(2048)[0]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def template(dkim_config: DkimConfig | None) -> MessageTemplate:
    return build_message_template(
        from_address="nieuws@example.com",
        from_name="Actief Klussenservice",
        reply_to="klantenservice@example.com",
        list_id_name="Voorjaarsactie 2026",
        campaign_slug="voorjaar-2026",
        domain="example.com",
        feedback_id="voorjaar-2026:mailer:example.com",
        verp_key=VERP_KEY,
        base_url="https://t.example.com",
        dkim=dkim_config,
    )


def mailer_builder(tpl: MessageTemplate) -> Callable[[int], bytes]:
    def build_one(i: int) -> bytes:
        address, name, token = RECIPIENTS[i % len(RECIPIENTS)]
        return tpl.build(
            delivery_id=1_000_000 + i,
            to_address=address,
            to_name=name,
            subject=SUBJECT,
            text=TEXT,
            html=HTML,
            unsubscribe_token=token,
        ).data

    return build_one


def stdlib_builder(pem: bytes | None) -> Callable[[int], bytes]:
    def build_one(i: int) -> bytes:
        address, name, token = RECIPIENTS[i % len(RECIPIENTS)]
        msg = EmailMessage()
        msg["From"] = "Actief Klussenservice <nieuws@example.com>"
        msg["Reply-To"] = "klantenservice@example.com"
        msg["To"] = f"{name} <{address}>"
        msg["Subject"] = SUBJECT
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = make_msgid(domain="example.com")
        msg["List-Id"] = '"Voorjaarsactie 2026" <voorjaar-2026.list-id.example.com>'
        msg["List-Unsubscribe"] = (
            f"<https://t.example.com/u/{token}>, <mailto:unsubscribe+{token}@example.com>"
        )
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["Feedback-ID"] = "voorjaar-2026:mailer:example.com"
        msg.set_content(TEXT)
        msg.add_alternative(HTML, subtype="html")
        data = msg.as_bytes()
        if pem is not None:
            signature: bytes = dkim.sign(
                data,
                b"bench",
                b"example.com",
                pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[
                    b"from",
                    b"to",
                    b"subject",
                    b"date",
                    b"message-id",
                    b"list-unsubscribe",
                    b"list-unsubscribe-post",
                ],
            )
            data = signature + data
        return data

    return build_one


def measure(build_one: Callable[[int], bytes], n: int, repeats: int) -> tuple[float, int]:
    """(median microseconds per message, size of one message in bytes)."""
    size = len(build_one(0))
    for i in range(min(n, 200)):  # warm caches and the allocator
        build_one(i)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(n):
            build_one(i)
        runs.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(runs), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="messages per run without DKIM")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    n = 300 if args.quick else args.n
    repeats = 2 if args.quick else args.repeats
    n_dkim = max(50, n // 10)
    n_slow = max(20, n // 100)

    print(f"Python {sys.version.split()[0]}; RSA-2048 key generation ...", flush=True)
    pem = rsa_key()
    config = DkimConfig("bench", "example.com", pem)
    try:
        import cryptography  # noqa: F401

        openssl = True
    except ImportError:
        openssl = False

    from mailer import message as message_module

    real_signer = message_module._rsa_signer

    def python_rsa_template() -> MessageTemplate:
        def pure_python(key: bytes, prefer_openssl: bool = True) -> Any:
            return real_signer(key, prefer_openssl=False)

        with mock.patch.object(message_module, "_rsa_signer", pure_python):
            return template(config)

    cases: list[tuple[str, Callable[[int], bytes], int]] = [
        ("stdlib EmailMessage (baseline)", stdlib_builder(None), n // 5),
        ("mailer MessageTemplate.build", mailer_builder(template(None)), n),
        ("stdlib EmailMessage + dkimpy dkim.sign", stdlib_builder(pem), n_slow),
    ]
    if openssl:
        cases.append(("mailer + DKIM (OpenSSL RSA)", mailer_builder(template(config)), n_dkim))
    else:
        print("  cryptography is not installed: DKIM signs with dkimpy's pure-Python RSA")
    cases.append(("mailer + DKIM (pure-Python RSA)", mailer_builder(python_rsa_template()), n_slow))

    results: dict[str, tuple[float, int]] = {}
    print(f"\n{'':42} {'µs/message':>11} {'messages/s':>11} {'bytes':>7} {'vs baseline':>12}")
    for label, build_one, count in cases:
        micro, size = measure(build_one, count, repeats)
        results[label] = (micro, size)
        base = results["stdlib EmailMessage (baseline)"][0]
        dkim_base = results.get("stdlib EmailMessage + dkimpy dkim.sign", (base, 0))[0]
        reference = dkim_base if "DKIM" in label or "dkim" in label else base
        print(
            f"{label:42} {micro:11.1f} {1e6 / micro:11.0f} {size:7d} {reference / micro:11.1f}x",
            flush=True,
        )
    print(
        "\n'vs baseline': how many times faster than stdlib composition (DKIM rows: than stdlib"
        " composition plus dkim.sign)."
    )


if __name__ == "__main__":
    main()
