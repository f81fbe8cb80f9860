"""Every change a webhook consumer can see is written to the event outbox in the transaction
that made it (invariant 9): imports, operator consent and suppression, unsubscribes, sign-up
and confirmation, the preference centre, corrections and erasure. A change that rolls back
leaves no event, every event gets one pending delivery per subscribed endpoint, and after an
erasure no event still names the person."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import col, select

from mailer import audit, recipients, suppression
from mailer.addresses import address_hash
from mailer.models import (
    ConsentMethod,
    ConsentRecord,
    ConsentStatus,
    Contact,
    Event,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointEvent,
    utcnow,
)
from mailer.service import Mailer
from mailer.tokens import Tokens
from mailer.transport import MemoryTransport
from tests.conftest import CliResult
from tests.privacy_support import EVELINE, NEEDLES, populate
from tests.recipient_support import (
    app_for,
    client_for,
    confirm_path,
    deliver,
    signup_form,
)
from tests.smtp_server import CaptureServer
from tests.test_vendor_attestation import attestation_file

# the types this suite is about; campaign and message events come from the sending path
OWN = frozenset(
    {
        "contact.created",
        "contact.updated",
        "contact.erased",
        "consent.granted",
        "consent.withdrawn",
        "contact.subscribed",
        "contact.confirmed",
        "contact.unsubscribed",
        "contact.suppressed",
        "import.completed",
    }
)
ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}


def outbox(mailer: Mailer, after: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(type, data) of the events with ids above `after`, oldest first, of the types above."""
    with mailer.session() as session:
        rows = session.exec(
            select(Event).where(col(Event.id) > after).order_by(col(Event.id))
        ).all()
        return [(e.type, dict(e.data)) for e in rows if e.type in OWN]


def last_event_id(mailer: Mailer) -> int:
    with mailer.session() as session:
        return session.exec(select(func.max(Event.id))).one() or 0


def types(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [kind for kind, _ in events]


def add_endpoint(mailer: Mailer, *wanted: str) -> int:
    """A consumer's endpoint, enabled, subscribed to `wanted` ('*' for everything)."""
    now = utcnow()
    with mailer.session() as session:
        endpoint = WebhookEndpoint(
            uid="ep_test",
            url="http://127.0.0.1:9/hook",
            enabled=True,
            secret="whsec_" + "A" * 43,
            created_at=now,
            updated_at=now,
        )
        session.add(endpoint)
        session.flush()
        assert endpoint.id is not None
        for kind in wanted:
            session.add(WebhookEndpointEvent(endpoint_id=endpoint.id, event_type=kind))
        return endpoint.id


def contact_id(mailer: Mailer, email: str) -> int:
    found = mailer.show_contact(email).contact.id
    assert found is not None
    return found


def test_imports_emit_created_updated_granted_and_completed(
    mailer: Mailer, cli: Callable[..., CliResult], write_csv: Callable[..., Path]
) -> None:
    first = write_csv(
        "email,name,city,consent_purposes,consent_at,consent_source,consent_policy_version\n"
        "ann@example.org,Ann,Delft,marketing;tracking,2026-01-10T10:00:00Z,webform,2026-01\n"
        "bob@example.org,Bob,Gouda,,,,\n",
        name="first.csv",
    )
    endpoint = add_endpoint(mailer, "*")
    assert cli("contacts", "import", str(first)).exit_code == 0
    ann, bob = contact_id(mailer, "ann@example.org"), contact_id(mailer, "bob@example.org")
    events = outbox(mailer)
    with mailer.session() as session:
        fanned = session.exec(
            select(WebhookDelivery.endpoint_id, WebhookDelivery.status, Event.type).join(
                Event, col(Event.id) == WebhookDelivery.event_id
            )
        ).all()
    assert sorted(fanned) == sorted((endpoint, "pending", kind) for kind in types(events))
    assert types(events) == [
        "contact.created",
        "contact.created",
        "consent.granted",
        "consent.granted",
        "import.completed",
    ]
    assert sorted((e["contact_id"], e["email"]) for _, e in events[:2]) == [
        (ann, "ann@example.org"),
        (bob, "bob@example.org"),
    ]
    assert [e for _, e in events[2:4]] == [
        {
            "contact_id": ann,
            "email": "ann@example.org",
            "purpose": purpose,
            "status": "granted",
            "method": "import",
            "policy_version": "2026-01",
        }
        for purpose in ("marketing", "tracking")
    ]
    completed = events[4][1]
    assert completed["filename"] == "first.csv" and completed["vendor"] is None
    assert (completed["new"], completed["merged"], completed["consent_granted"]) == (2, 0, 2)
    assert "@" not in json.dumps(completed)  # counts, never rows

    # a merge that changes fields says which, not what to; an unchanged row says nothing
    mark = last_event_id(mailer)
    again = write_csv(
        "email,name,city\nann@example.org,Ann Smit,Leiden\nbob@example.org,Bob,Gouda\n"
    )
    assert cli("contacts", "import", str(again)).exit_code == 0
    events = outbox(mailer, after=mark)
    assert types(events) == ["contact.updated", "import.completed"]
    assert events[0][1] == {
        "contact_id": ann,
        "email": "ann@example.org",
        "changes": ["name", "attributes.city"],
    }
    assert "Leiden" not in json.dumps(events[0][1])
    assert events[1][1]["merged"] == 2


def test_a_strict_import_that_rolls_back_leaves_no_event(
    mailer: Mailer, cli: Callable[..., CliResult], write_csv: Callable[..., Path]
) -> None:
    path = write_csv("email,name\ngood@example.org,Good\nnot-an-address,Bad\n")
    result = cli("contacts", "import", str(path), "--strict")
    assert "nothing was written" in result.stdout
    assert outbox(mailer) == []
    assert cli("contacts", "import", str(path)).exit_code == 1  # without: the good row goes in
    assert types(outbox(mailer)) == ["contact.created", "import.completed"]


def test_vendor_imports_and_revoked_attestations(
    mailer: Mailer, cli: Callable[..., CliResult], write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    bought = write_csv(
        "email,consent_purposes,consent_at,consent_source\n"
        "lead@example.org,marketing,2026-03-14T11:00:00Z,vendor-form\n"
    )
    summary = mailer.import_contacts(
        bought, vendor="Leads BV", attestation=attestation_file(tmp_path)
    )
    lead = contact_id(mailer, "lead@example.org")
    events = outbox(mailer)
    assert types(events) == ["contact.created", "consent.granted", "import.completed"]
    assert events[1][1]["method"] == "vendor_attestation"
    assert events[2][1]["vendor"] == "Leads BV"
    assert events[2][1]["attestation_id"] == summary.attestation_id

    mark = last_event_id(mailer)
    revoked = cli("vendors", "revoke", str(summary.attestation_id), "--reason", "no proof")
    assert revoked.exit_code == 0, revoked.stderr
    assert outbox(mailer, after=mark) == [
        (
            "consent.withdrawn",
            {
                "contact_id": lead,
                "email": "lead@example.org",
                "purpose": "marketing",
                "status": "withdrawn",
                "method": "attestation_revoked",
                "policy_version": None,
            },
        )
    ]


def test_operator_consent_and_suppression(mailer: Mailer, cli: Callable[..., CliResult]) -> None:
    endpoint = add_endpoint(mailer, "*")
    grant = ("consent", "grant", "Cor@Example.org", "--purpose", "marketing", "--source", "phone")
    assert cli(*grant).exit_code == 0
    assert (
        cli(
            "consent", "withdraw", "cor@example.org", "--purpose", "marketing", "--source", "letter"
        ).exit_code
        == 0
    )
    assert cli("suppress", "cor@example.org", "--reason", "manual").exit_code == 0
    assert cli("suppress", "cor@example.org", "--reason", "manual").exit_code == 0  # no-op
    assert cli("suppress", "stranger@example.org", "--reason", "manual").exit_code == 0
    cor = contact_id(mailer, "cor@example.org")
    key = mailer.settings.suppression_key
    events = outbox(mailer)
    assert events == [
        ("contact.created", {"contact_id": cor, "email": "cor@example.org"}),
        (
            "consent.granted",
            {
                "contact_id": cor,
                "email": "cor@example.org",
                "purpose": "marketing",
                "status": "granted",
                "method": "operator",
                "policy_version": None,
            },
        ),
        (
            "consent.withdrawn",
            {
                "contact_id": cor,
                "email": "cor@example.org",
                "purpose": "marketing",
                "status": "withdrawn",
                "method": "operator",
                "policy_version": None,
            },
        ),
        (
            "contact.suppressed",
            {
                "reason": "manual",
                "address_hash": address_hash("cor@example.org", key),
                "contact_id": cor,
                "email": "cor@example.org",
            },
        ),
        # an address nobody holds as a contact: the hash only, never the address
        (
            "contact.suppressed",
            {"reason": "manual", "address_hash": address_hash("stranger@example.org", key)},
        ),
    ]
    # one pending delivery per event for the endpoint that wants everything
    with mailer.session() as session:
        deliveries = session.exec(select(WebhookDelivery)).all()
        assert len(session.exec(select(Event)).all()) == len(events)
    assert len(deliveries) == len(events)
    assert len({d.event_id for d in deliveries}) == len(events)
    assert {(d.endpoint_id, d.status) for d in deliveries} == {(endpoint, "pending")}


def test_only_the_subscribed_types_are_fanned_out(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    add_endpoint(mailer, "consent.withdrawn")
    mailer.record_consent("dee@example.org", "marketing", ConsentStatus.GRANTED, source="phone")
    mailer.record_consent("dee@example.org", "marketing", ConsentStatus.WITHDRAWN, source="mail")
    with mailer.session() as session:
        fanned = session.exec(
            select(Event.type).join(WebhookDelivery, col(WebhookDelivery.event_id) == Event.id)
        ).all()
    assert fanned == ["consent.withdrawn"]


def test_a_change_that_fails_leaves_no_event(
    mailer: Mailer, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_endpoint(mailer, "*")

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the audit log is unavailable")

    # the ledger row and its event are written, then the transaction fails after them
    monkeypatch.setattr(audit, "consent_recorded", broken)
    with pytest.raises(RuntimeError):
        mailer.record_consent("eve@example.org", "marketing", ConsentStatus.GRANTED, source="x")
    with mailer.session() as session:
        assert session.exec(select(func.count()).select_from(Event)).one() == 0
        assert session.exec(select(func.count()).select_from(WebhookDelivery)).one() == 0
        assert session.exec(select(func.count()).select_from(ConsentRecord)).one() == 0
        assert session.exec(select(func.count()).select_from(Contact)).one() == 0
    monkeypatch.undo()
    mailer.record_consent("eve@example.org", "marketing", ConsentStatus.GRANTED, source="x")
    assert types(outbox(mailer)) == ["contact.created", "consent.granted"]


@pytest.mark.asyncio
async def test_an_unsubscribe_that_fails_leaves_no_event(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arrived = await deliver(mailer, smtp_server, campaign_file, "fay@example.org")
    token = arrived["fay@example.org"].unsubscribe.rsplit("/", 1)[1]
    mark = last_event_id(mailer)

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("disk full")

    # the withdrawal (and its consent.withdrawn) is written before the suppression fails
    monkeypatch.setattr(suppression, "suppress", broken)
    with pytest.raises(RuntimeError):
        recipients.unsubscribe(
            mailer,
            Tokens(mailer.settings.secret_keys),
            token,
            method=ConsentMethod.ONE_CLICK,
            requester=recipients.Requester(),
        )
    assert outbox(mailer, after=mark) == []


@pytest.mark.asyncio
async def test_one_click_unsubscribe(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    arrived = await deliver(mailer, smtp_server, campaign_file, "gus@example.org")
    gus = arrived["gus@example.org"]
    gus_id = contact_id(mailer, "gus@example.org")
    mark = last_event_id(mailer)
    async with client_for(app_for(mailer)) as http:
        assert (await http.get(gus.unsubscribe)).status_code == 200
        assert outbox(mailer, after=mark) == []  # GET changes nothing, so says nothing
        answer = await http.post(
            gus.unsubscribe, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
        )
        assert answer.status_code == 200
        events = outbox(mailer, after=mark)
        repeat = await http.post(
            gus.unsubscribe, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
        )
        assert repeat.status_code == 200
    assert types(events) == ["consent.withdrawn", "contact.suppressed", "contact.unsubscribed"]
    assert events[0][1]["method"] == "one_click" and events[0][1]["purpose"] == "marketing"
    assert events[2][1] == {
        "contact_id": gus_id,
        "email": "gus@example.org",
        "campaign_id": gus.campaign_id,
        "campaign": "autumn",
        "delivery_id": gus.delivery_id,
        "method": "one_click",
        "purposes": ["marketing"],
    }
    assert events[1][1]["reason"] == "unsubscribed"
    assert events[1][1]["contact_id"] == gus_id
    assert outbox(mailer, after=mark) == events  # the repeated POST changed nothing


@pytest.mark.asyncio
async def test_sign_up_then_confirm(mailer: Mailer) -> None:
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        answer = await http.post(
            "/subscribe", data=signup_form("Hal@Example.org", purposes=["marketing"])
        )
        assert answer.status_code == 200
        hal = contact_id(mailer, "hal@example.org")
        events = outbox(mailer)
        assert types(events) == ["contact.created", "contact.subscribed"]
        assert events[1][1] == {
            "contact_id": hal,
            "email": "hal@example.org",
            "subscription_id": events[1][1]["subscription_id"],
            "purposes": ["marketing"],
            "policy_version": "2026-01",
            "source": "signup form",
            "method": "form",
        }
        link = confirm_path(transport.messages[0].data)
        mark = last_event_id(mailer)
        assert (await http.get(link)).status_code == 200
        assert outbox(mailer, after=mark) == []
        assert (await http.post(link)).status_code == 200
    events = outbox(mailer, after=mark)
    assert types(events) == ["consent.granted", "contact.confirmed"]
    assert (events[0][1]["status"], events[0][1]["method"]) == ("confirmed", "double_opt_in")
    assert events[1][1]["subscription_id"] == outbox(mailer)[1][1]["subscription_id"]
    assert (events[1][1]["contact_id"], events[1][1]["source"]) == (hal, "signup form")


@pytest.mark.asyncio
async def test_preference_centre_changes(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    mailer.record_consent("ida@example.org", "tracking", ConsentStatus.GRANTED, source="web")
    arrived = await deliver(mailer, smtp_server, campaign_file, "ida@example.org")
    ida = arrived["ida@example.org"]
    mark = last_event_id(mailer)
    form = {
        "action": "save",
        "shown_in": "en",
        "shown": ["marketing", "tracking"],
        "purpose": ["marketing"],
        "name": "Ida de Wit",
        "language": "nl",
    }
    async with client_for(app_for(mailer)) as http:
        assert (await http.post(ida.preferences, data=form)).status_code == 200
        events = outbox(mailer, after=mark)
        mark = last_event_id(mailer)
        answer = await http.post(ida.preferences, data={"action": "unsubscribe_all"})
        assert answer.status_code == 200
    assert types(events) == ["consent.withdrawn", "contact.updated"]
    assert events[0][1]["purpose"] == "tracking"
    assert events[0][1]["method"] == "preference_centre"
    assert events[1][1]["changes"] == ["name", "locale"]
    assert "Ida" not in json.dumps(events)
    events = outbox(mailer, after=mark)
    assert types(events) == ["consent.withdrawn", "contact.suppressed", "contact.unsubscribed"]
    assert events[2][1]["method"] == "preference_centre"
    assert events[2][1]["purposes"] == ["marketing"]


def test_privacy_correct(mailer: Mailer, cli: Callable[..., CliResult]) -> None:
    mailer.record_consent("jan@example.org", "marketing", ConsentStatus.GRANTED, source="web")
    mark = last_event_id(mailer)
    result = cli(
        "privacy",
        "correct",
        "jan@example.org",
        "--set",
        "name=Jan Smit",
        "--set",
        "attributes.city=Utrecht",
    )
    assert result.exit_code == 0, result.stderr
    assert outbox(mailer, after=mark) == [
        (
            "contact.updated",
            {
                "contact_id": contact_id(mailer, "jan@example.org"),
                "email": "jan@example.org",
                "changes": ["name", "attributes.city"],
            },
        )
    ]
    mark = last_event_id(mailer)
    again = cli("privacy", "correct", "jan@example.org", "--set", "name=Jan Smit")
    assert again.exit_code == 0
    assert outbox(mailer, after=mark) == []  # nothing changed, nothing to tell


def test_after_erasure_no_event_names_the_person(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    tmp_path: Path,
    write_csv: Callable[..., Path],
    campaign_file: Callable[..., Path],
    smtp_server: CaptureServer,
) -> None:
    add_endpoint(mailer, "*")
    world = populate(mailer, cli, tmp_path, write_csv, campaign_file, smtp_server)
    correct = cli("privacy", "correct", EVELINE, "--set", "attributes.city=Leeuwarden-Oost")
    assert correct.exit_code == 0, correct.stderr
    hers = [e for _, e in outbox(mailer) if e.get("contact_id") == world.eveline_id]
    assert len(hers) >= 8 and all(e.get("email") == EVELINE for e in hers)

    with mailer.session() as session:
        pending_before = session.exec(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
        ).one()
    erased = cli("privacy", "erase", EVELINE)
    assert erased.exit_code == 0, erased.stderr

    with mailer.session() as session:
        rows = session.exec(select(Event).order_by(col(Event.id))).all()
        pending_after = session.exec(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
        ).all()
    for row in rows:
        text = json.dumps(row.data).lower()
        assert not any(needle in text for needle in NEEDLES), (row.type, row.data)
    # her events stay (with their ids) and will still be delivered, scrubbed
    still = [r for r in rows if r.contact_id == world.eveline_id]
    assert {r.type for r in still} >= {"contact.created", "consent.granted", "contact.updated"}
    assert pending_after == [pending_before + 2]  # + contact.erased and contact.suppressed
    erased_event, suppressed_event = (r for r in rows[-2:])
    assert erased_event.type == "contact.erased"
    assert set(erased_event.data) == {"contact_id", "erased_at", "reason"}
    assert (erased_event.data["contact_id"], erased_event.data["reason"]) == (
        world.eveline_id,
        "request",
    )
    assert suppressed_event.type == "contact.suppressed"
    assert suppressed_event.data["reason"] == "erased"
    assert "email" not in suppressed_event.data
    # Piet's events are untouched
    assert any(e.get("email") == "piet.bakker@example.org" for _, e in outbox(mailer))


def test_repermission_asks_and_confirms(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    write_csv: Callable[..., Path],
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
) -> None:
    mailer.import_contacts(
        write_csv(
            "email,consent_purposes,consent_at,consent_source,consent_policy_version\n"
            "kim@example.org,marketing,2025-03-01T00:00:00Z,webform,2025-01\n"
        )
    )
    kim = contact_id(mailer, "kim@example.org")
    path = campaign_file(extra='min_policy_version = "2026-01"\n')
    mark = last_event_id(mailer)
    asked = cli("campaign", "send", str(path), "--repermission", "--smtp", smtp_server.url)
    assert asked.exit_code == 0, asked.stdout + asked.stderr
    events = outbox(mailer, after=mark)
    assert types(events) == ["contact.subscribed"]  # her grant stands until she confirms
    assert (events[0][1]["contact_id"], events[0][1]["source"]) == (kim, "re-permission")
    assert (events[0][1]["method"], events[0][1]["policy_version"]) == ("repermission", "2026-01")

    async def confirm() -> None:
        async with client_for(app_for(mailer)) as http:
            assert (await http.post(confirm_path(smtp_server.messages[0].data))).status_code == 200

    mark = last_event_id(mailer)
    asyncio.run(confirm())
    events = outbox(mailer, after=mark)
    assert types(events) == ["consent.granted", "contact.confirmed"]
    assert events[0][1]["policy_version"] == "2026-01"
    assert events[1][1]["source"] == "re-permission"
