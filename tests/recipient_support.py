"""Helpers for the recipient page tests: real deliveries, the real app, database snapshots.

A person gets a real campaign through the capture SMTP server, and the tests follow the links
that arrived (List-Unsubscribe for /u/, the footer's preference link for /p/), through the app
that `mailer serve` runs (create_app), in-process with httpx's ASGITransport.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import SQLModel, col, select
from starlette.applications import Starlette

from mailer.models import ConsentRecord, ConsentStatus, Contact, Delivery, Subscription, Suppression
from mailer.service import Mailer
from mailer.tokens import TokenKind, Tokens
from mailer.tracking.app import create_app
from mailer.transport import MemoryTransport
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

BASE_URL = "http://127.0.0.1:8000"
TOKEN = r"[A-Za-z0-9_.\-]+"
CONFIRM = re.compile(rf"http://127\.0\.0\.1:8000(/confirm/{TOKEN})")
POLICY = "2026-01"
WORDING = "Yes, Shop BV may e-mail me news and offers. I can unsubscribe at any time."


@dataclass(frozen=True)
class Received:
    """One delivery as it arrived: its links (paths) and ids."""

    email: str
    unsubscribe: str
    preferences: str
    delivery_id: int
    campaign_id: int


def grant(mailer: Mailer, *emails: str, purpose: str = "marketing") -> None:
    for address in emails:
        mailer.record_consent(address, purpose, ConsentStatus.GRANTED, source="webform")


async def deliver(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    *emails: str,
    name: str = "autumn",
    extra: str = "",
    grant_marketing: bool = True,
) -> dict[str, Received]:
    """Send a campaign to `emails` (granting marketing first) and return what arrived."""
    if grant_marketing:
        grant(mailer, *emails)
    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name=name, extra=extra), smtp_server)
    tokens = Tokens(mailer.settings.secret_keys)
    base = re.escape(mailer.settings.base_url)
    unsubscribe_link = re.compile(rf"<{base}(/u/{TOKEN})>")
    preferences_link = re.compile(rf'href="{base}(/p/{TOKEN})"')
    arrived: dict[str, Received] = {}
    for captured in smtp_server.messages:
        message = captured.parse()
        unsubscribe = unsubscribe_link.search(str(message["List-Unsubscribe"]))
        html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
        preferences = preferences_link.search(html)
        assert unsubscribe and preferences
        (delivery_id,) = tokens.verify(TokenKind.UNSUBSCRIBE, unsubscribe[1].rsplit("/", 1)[1])
        with mailer.session() as session:
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            campaign_id = delivery.campaign_id
        recipient = captured.recipients[0]
        arrived[recipient] = Received(
            recipient, unsubscribe[1], preferences[1], delivery_id, campaign_id
        )
    return arrived


def recipients_of(smtp_server: CaptureServer) -> set[str]:
    return {r for m in smtp_server.messages for r in m.recipients}


def app_for(mailer: Mailer, transport: Any | None = None, **options: Any) -> Starlette:
    """The app `mailer serve` runs; `options` go to create_app (e.g. signups_per_ip)."""
    return create_app(
        mailer, transport=transport if transport is not None else MemoryTransport(), **options
    )


@asynccontextmanager
async def client_for(
    app: Starlette, client: tuple[str, int] = ("127.0.0.1", 40000)
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(
        transport=transport, base_url=BASE_URL, follow_redirects=False
    ) as http:
        yield http


def _rows(mailer: Mailer, model: type[SQLModel]) -> list[dict[str, Any]]:
    with mailer.session() as session:
        statement = select(model).order_by(col(model.id))  # type: ignore[attr-defined]
        return [row.model_dump() for row in session.exec(statement).all()]


def ledger(mailer: Mailer) -> list[dict[str, Any]]:
    return _rows(mailer, ConsentRecord)


def suppressions(mailer: Mailer) -> list[dict[str, Any]]:
    return _rows(mailer, Suppression)


def subscriptions(mailer: Mailer) -> list[dict[str, Any]]:
    return _rows(mailer, Subscription)


def contact(mailer: Mailer, address: str) -> Contact:
    return mailer.show_contact(address).contact


def state(mailer: Mailer) -> tuple[Any, ...]:
    """Everything a recipient action may change: compare before and after."""
    return ledger(mailer), suppressions(mailer), subscriptions(mailer), _rows(mailer, Contact)


def parse_mail(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def confirm_path(data: bytes) -> str:
    """The /confirm/TOKEN path in a confirmation mail's text part."""
    text = parse_mail(data).get_body(("plain",)).get_content()  # type: ignore[union-attr]
    found = CONFIRM.search(text)
    assert found, text
    return found[1]


def signup_form(email_address: str, **extra: str | list[str]) -> dict[str, Any]:
    form: dict[str, Any] = {
        "email": email_address,
        "policy_version": POLICY,
        "wording": WORDING,
    }
    form.update(extra)
    return form
