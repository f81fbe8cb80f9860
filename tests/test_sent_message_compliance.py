"""What arrives at the SMTP server: RFC 8058 / RFC 2369 unsubscribe headers, signed links,
tracking only for contacts who allowed it, and a bounce address that maps back."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from mailer.message import parse_verp
from mailer.models import HONEYPOT_POSITION, CampaignLink, ConsentStatus, Delivery
from mailer.service import Mailer
from mailer.tokens import TokenKind, Tokens
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

LIST_UNSUBSCRIBE = re.compile(
    r"^<(?P<https>http://127\.0\.0\.1:8000/u/[A-Za-z0-9_.\-]+)>, "
    r"<(?P<mailto>mailto:[^>]+@shop\.example\.com)>$"
)


@pytest.mark.asyncio
async def test_headers_links_and_tracking_as_they_arrive(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    mailer.record_consent("tracked@example.org", "marketing", ConsentStatus.GRANTED, source="web")
    mailer.record_consent("tracked@example.org", "tracking", ConsentStatus.GRANTED, source="web")
    mailer.record_consent("plain@example.org", "marketing", ConsentStatus.GRANTED, source="web")
    await send_campaign(mailer, campaign_file(), smtp_server)

    tokens = Tokens(mailer.settings.secret_keys)
    with mailer.session() as session:
        deliveries = {
            d.contact_id: d
            for d in session.exec(select(Delivery)).scalars()  # type: ignore[call-overload]
        }
        links = [
            link.url
            for link in session.exec(  # type: ignore[call-overload]
                select(CampaignLink).order_by(CampaignLink.position)  # type: ignore[arg-type]
            ).scalars()
        ]
    assert links == ["https://shop.example.com/autumn", "https://shop.example.com/tips?x=1&y=2"]
    tracked_id = mailer.show_contact("tracked@example.org").contact.id
    plain_id = mailer.show_contact("plain@example.org").contact.id
    assert (deliveries[tracked_id].tracking, deliveries[plain_id].tracking) == (True, False)
    by_recipient = {m.recipients[0]: m for m in smtp_server.messages}
    assert set(by_recipient) == {"tracked@example.org", "plain@example.org"}

    for recipient, captured in by_recipient.items():
        message = captured.parse()
        raw_headers = captured.data.split(b"\r\n\r\n", 1)[0].decode("ascii")
        # RFC 8058: exactly this header, never encoded
        assert "\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in raw_headers + "\r\n"
        unsubscribe = LIST_UNSUBSCRIBE.match(str(message["List-Unsubscribe"]))
        assert unsubscribe, message["List-Unsubscribe"]
        token = unsubscribe["https"].rsplit("/", 1)[1]
        (delivery_id,) = tokens.verify(TokenKind.UNSUBSCRIBE, token)
        assert parse_verp(captured.envelope_from, mailer.settings.verp_key) == delivery_id
        assert str(message["Message-ID"]).endswith("@shop.example.com>")
        assert message["List-Id"] and "autumn" in str(message["List-Id"])
        assert message["Feedback-ID"]

        html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert unsubscribe["https"] in html and unsubscribe["https"] in text
        assert "tel:+31301234567" in html and "mailto:info@shop.example.com" in html

        if recipient == "tracked@example.org":
            campaign_id = deliveries[tracked_id].campaign_id
            clicks = re.findall(r'href="http://127\.0\.0\.1:8000/c/([^"]+)"', html)
            assert len(clicks) == 3  # the campaign's two links, then the hidden honeypot
            for position, click in enumerate(clicks[:2]):
                assert tokens.verify(TokenKind.CLICK, click) == (delivery_id, campaign_id, position)
            honeypot = (delivery_id, campaign_id, HONEYPOT_POSITION)
            assert tokens.verify(TokenKind.CLICK, clicks[2]) == honeypot
            assert "https://shop.example.com/autumn" not in html
            pixel = re.search(r'<img[^>]+src="http://127\.0\.0\.1:8000/o/([^"]+)"', html)
            assert pixel
            assert tokens.verify(TokenKind.OPEN, pixel[1]) == (delivery_id, campaign_id)
            assert clicks[2] not in text  # the honeypot is hidden in the HTML only
        else:
            assert "/c/" not in html and "/o/" not in html
            assert 'href="https://shop.example.com/autumn"' in html


@pytest.mark.asyncio
async def test_dkim_from_settings_signs_what_arrives(
    env: dict[str, str],
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
) -> None:
    import dkim

    from mailer.config import load_settings
    from tests.test_message_headers import rsa_key_pair

    pem, record = rsa_key_pair(1024)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(pem)
    settings = load_settings(
        {**env, "MAILER_DKIM_SELECTOR": "mail", "MAILER_DKIM_KEY_FILE": str(key_file)},
        cwd=tmp_path,
    )
    signing = Mailer(settings)
    signing.init()
    try:
        signing.record_consent("d@example.org", "marketing", ConsentStatus.GRANTED, source="x")
        await send_campaign(signing, campaign_file(), smtp_server)
    finally:
        signing.close()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"mail._domainkey.shop.example.com."
        return record

    (message,) = smtp_server.messages
    assert dkim.verify(message.data, dnsfunc=dns)
    header = message.data.replace(b"\r\n ", b"").replace(b" ", b"")
    found = re.search(rb"\bh=([^;]+);", header)
    assert found is not None
    signed = {name.strip() for name in found.group(1).lower().split(b":")}
    assert {b"list-unsubscribe", b"list-unsubscribe-post"} <= signed
