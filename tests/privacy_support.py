"""A person with every kind of record mailer keeps, for the export and erasure tests.

Eveline arrives from a bought list (with its attestation) and from the shop's own list, gets a
campaign (a delivery), opens and clicks it (a human open, a scanner's open, a click with a
masked IP and browser), unsubscribes through its one-click link, signs up again and confirms
(which lifts that unsubscribe), is suppressed by hand with a note, asks for her data, and has
consent recorded by phone. Piet gets the same campaign; Bram's mailbox bounces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlmodel import select

from mailer import consent, privacy, suppression
from mailer.addresses import address_hash
from mailer.models import (
    ConsentMethod,
    ConsentStatus,
    Contact,
    Delivery,
    EngagementEvent,
    Subscription,
    SubscriptionStatus,
    SuppressionReason,
    utcnow,
)
from mailer.service import CampaignService, Mailer
from tests.conftest import CliResult
from tests.smtp_server import CaptureServer
from tests.test_vendor_attestation import attestation_file

EVELINE = "eveline.terpstra@example.org"
PIET = "piet.bakker@example.org"
BRAM = "bram.bounce@example.org"
NEEDLES = ("eveline", "terpstra", "leeuwarden")  # her address's parts, her name, her city

VENDOR_LIST = (
    "email,name,first_name,last_name,tags,city,consent_purposes,consent_at,consent_source\n"
    f"{EVELINE},Eveline Terpstra,Eveline,Terpstra,nieuwsbrief,Leeuwarden,"
    "marketing;tracking,2026-03-14T11:00:00Z,vendor-form\n"
    f"{PIET},Piet Bakker,Piet,Bakker,nieuwsbrief,Utrecht,"
    "marketing;tracking,2026-03-15T11:00:00Z,vendor-form\n"
    f"{BRAM},Bram,Bram,,nieuwsbrief,Delft,marketing,2026-03-16T11:00:00Z,vendor-form\n"
)
SHOP_LIST = "email,locale,shoe_size\n" + f"{EVELINE},nl-NL,39\n"


@dataclass(frozen=True)
class World:
    campaign_id: int
    eveline_id: int
    eveline_delivery: int
    piet_delivery: int
    attestation_id: int
    request_id: int


def populate(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    tmp_path: Path,
    write_csv: Callable[..., Path],
    campaign_file: Callable[..., Path],
    smtp_server: CaptureServer,
) -> World:
    bought = mailer.import_contacts(
        write_csv(VENDOR_LIST), vendor="Leads BV", attestation=attestation_file(tmp_path)
    )
    assert bought.rejected_total == 0 and bought.attestation_id is not None
    assert mailer.import_contacts(write_csv(SHOP_LIST)).rejected_total == 0
    smtp_server.reply("550 5.1.1 No such user", recipients={BRAM})
    sent = cli("campaign", "send", str(campaign_file()), "--smtp", smtp_server.url)
    assert sent.exit_code == 1, sent.stdout + sent.stderr  # Bram's mail failed
    smtp_server.clear()

    now = utcnow()
    with mailer.session() as session:
        contacts = {c.email: c for c in session.exec(select(Contact))}
        deliveries = {d.contact_id: d for d in session.exec(select(Delivery))}
        eveline, piet = contacts[EVELINE], contacts[PIET]
        assert eveline.id is not None and piet.id is not None
        mine, his = deliveries[eveline.id], deliveries[piet.id]
        assert mine.id is not None and his.id is not None
        campaign_id = mine.campaign_id

        def event(delivery: Delivery, kind: str, machine: bool, **extra: Any) -> dict[str, Any]:
            return {
                "delivery_id": delivery.id,
                "campaign_id": campaign_id,
                "contact_id": delivery.contact_id,
                "kind": kind,
                "link_position": None,
                "occurred_at": now - timedelta(minutes=5),
                "ip_masked": "192.0.2.0",
                "user_agent": "Mozilla/5.0 (Eveline's laptop)",
                "machine": machine,
                "machine_reason": "scanner" if machine else None,
                **extra,
            }

        session.connection().execute(
            insert(EngagementEvent.__table__),  # type: ignore[attr-defined]
            [
                event(mine, "open", False),
                event(mine, "open", False),
                event(mine, "open", True),
                event(mine, "click", False, link_position=0),
                event(his, "open", False, user_agent="Piet's phone"),
                event(his, "click", True, link_position=1, user_agent="Piet's scanner"),
            ],
        )
        # unsubscribed through the campaign's one-click link
        consent.record(
            session,
            contact_id=eveline.id,
            purpose="marketing",
            status=ConsentStatus.WITHDRAWN,
            method=ConsentMethod.ONE_CLICK.value,
            source="one-click",
            evidence=f"campaign:{campaign_id}:delivery:{mine.id}",
            user_agent="Mozilla/5.0 (Eveline's laptop)",
        )
        hashed = eveline.email_hash
        suppression.suppress(session, hashed, SuppressionReason.UNSUBSCRIBED, source="one-click")
        # ... then signed up again and confirmed, which lifts that unsubscribe
        signup = Subscription(
            contact_id=eveline.id,
            purposes=["marketing"],
            policy_version="2026-01",
            wording="Yes, mail me news, Eveline.",
            source="signup-form",
            requested_at=now - timedelta(minutes=3),
            ip_masked="192.0.2.0",
            user_agent="Mozilla/5.0 (Eveline's laptop)",
            mailed_at=now - timedelta(minutes=3),
            confirmed_at=now - timedelta(minutes=2),
            status=SubscriptionStatus.CONFIRMED.value,
        )
        session.add(signup)
        session.flush()
        confirmed = consent.record(
            session,
            contact_id=eveline.id,
            purpose="marketing",
            status=ConsentStatus.CONFIRMED,
            method=ConsentMethod.DOUBLE_OPT_IN.value,
            source="signup-form",
            policy_version="2026-01",
            evidence=f"subscription:{signup.id}",
        )
        assert suppression.lift_by_double_opt_in(session, hashed, confirmed)
    assert mailer.suppress(EVELINE, SuppressionReason.MANUAL, note="Eveline Terpstra phoned us")
    mailer.record_consent(
        EVELINE,
        "tracking",
        ConsentStatus.WITHDRAWN,
        source="phone",
        note="Eveline Terpstra from Leeuwarden",
    )
    request = privacy.record_request(
        mailer, EVELINE, "access", channel="phone", verified=True, note="Eveline Terpstra asked"
    )
    assert request.id is not None
    assert address_hash(EVELINE, mailer.settings.suppression_key) == hashed
    return World(
        campaign_id=campaign_id,
        eveline_id=eveline.id,
        eveline_delivery=mine.id,
        piet_delivery=his.id,
        attestation_id=bought.attestation_id,
        request_id=request.id,
    )


def report(mailer: Mailer, name: str = "autumn") -> dict[str, Any]:
    return CampaignService(mailer).report(name)
