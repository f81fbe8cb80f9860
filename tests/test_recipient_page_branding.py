"""Recipient pages carry the sender's branding from the settings (sender name, postal address,
logo, colour, website), escaped as HTML, and the Content-Security-Policy lets the logo load from
its own origin and nothing else from a third party."""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mailer.service import Mailer
from tests.recipient_support import app_for, client_for, deliver
from tests.smtp_server import CaptureServer

# `&` and `<` prove the values are escaped, in text and in attributes alike.
SENDER = "Klus & Co <Actief>"
POSTAL = "Industrieweg 48 & 50, 5145 PW Waalwijk"
LOGO = "https://cdn.klus.example/brand/logo.png?v=2&size=80"
LOGO_ORIGIN = "https://cdn.klus.example"
COMPANY = "https://www.klus.example/?ref=mail&lang=nl"
BRAND_COLOUR = "#0b6e4f"
CSP_KEYWORDS = {"'self'", "'none'", "data:"}


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The branding comes in as `mailer serve` reads it: MAILER_* variables, through
    load_settings."""
    return {
        **env,
        "MAILER_SENDER_NAME": SENDER,
        "MAILER_POSTAL_ADDRESS": POSTAL,
        "MAILER_LOGO_URL": LOGO,
        "MAILER_COMPANY_URL": COMPANY,
        "MAILER_BRAND_COLOR": BRAND_COLOUR.upper(),
    }


class _Tags(HTMLParser):
    """The attributes of every <img>, <a> and <link>, unescaped as a browser reads them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("img", "a", "link"):
            self.tags.append((tag, dict(attrs)))


def _tags(html: str, tag: str) -> list[dict[str, str | None]]:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return [attrs for name, attrs in parser.tags if name == tag]


def _section(html: str, element: str) -> str:
    found = re.search(rf"<{element}\b[^>]*>(.*?)</{element}>", html, re.DOTALL)
    assert found, f"no <{element}> on the page"
    return found[1]


def _csp(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *sources = part.split()
        directives[name] = sources
    return directives


@pytest.mark.asyncio
async def test_pages_show_the_configured_branding(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    assert (mailer.settings.sender_name, mailer.settings.logo_url) == (SENDER, LOGO)
    anna = (await deliver(mailer, smtp_server, campaign_file, "anna@example.org"))[
        "anna@example.org"
    ]
    async with client_for(app_for(mailer)) as http:
        pages = {
            "unsubscribe": await http.get(anna.unsubscribe),
            "preferences": await http.get(anna.preferences),
        }
        stylesheets = {
            link["href"]
            for page in pages.values()
            for link in _tags(page.text, "link")
            if link.get("rel") == "stylesheet" and link["href"]
        }
        assert len(stylesheets) == 1
        css = await http.get(stylesheets.pop())

    escaped_sender = "Klus &amp; Co &lt;Actief&gt;"
    for which, page in pages.items():
        assert page.status_code == 200, which
        html = page.text
        # Escaped wherever it is shown, and never raw (a `<` would open a tag).
        assert SENDER not in html and "<Actief>" not in html, which
        assert POSTAL not in html, which
        header, footer = _section(html, "header"), _section(html, "footer")
        assert re.search(rf"<title>[^<]* · {re.escape(escaped_sender)}</title>", html), which
        assert escaped_sender in header and escaped_sender in footer, which
        assert "Industrieweg 48 &amp; 50, 5145 PW Waalwijk" in footer, which

        (logo,) = _tags(header, "img")
        assert logo["src"] == LOGO, which
        # An alt attribute is required; it may be empty because the name is the text beside
        # the logo (a screen reader would otherwise read the name twice).
        assert logo.get("alt") is not None, which
        assert "logo.png?v=2&amp;size=80" in header, which  # the attribute is escaped too
        assert [a["href"] for a in _tags(footer, "a")] == [COMPANY], which

        policy = _csp(page.headers["content-security-policy"])
        assert policy["default-src"] == ["'none'"], which
        assert set(policy["img-src"]) == {"'self'", "data:", LOGO_ORIGIN}, which
        # The logo's origin is the one outside source, and only for images.
        outside = {
            (name, source)
            for name, sources in policy.items()
            for source in sources
            if source not in CSP_KEYWORDS
        }
        assert outside == {("img-src", LOGO_ORIGIN)}, which

    assert css.status_code == 200 and f"--brand: {BRAND_COLOUR};" in css.text
