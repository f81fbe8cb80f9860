"""Erasure: every table forgets the person in one transaction, the address stays suppressed as a
keyed hash (so a re-import never mails them), and campaign reports still add up."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from mailer import privacy, suppression
from mailer.addresses import address_hash
from mailer.errors import NotFound
from mailer.models import Contact, Erasure, PrivacyRequest, Suppression
from mailer.service import CampaignService, Mailer
from tests.conftest import CliResult
from tests.privacy_support import BRAM, EVELINE, NEEDLES, PIET, VENDOR_LIST, populate, report
from tests.smtp_server import CaptureServer
from tests.test_vendor_attestation import attestation_file


def every_value(mailer: Mailer) -> list[tuple[str, str, str]]:
    """(table, column, value as text) for every non-empty value of every table."""
    found: list[tuple[str, str, str]] = []
    with mailer.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            result = conn.execute(text(f'SELECT * FROM "{table}"'))
            columns = list(result.keys())
            for row in result:
                for column, value in zip(columns, row, strict=True):
                    if value is not None:
                        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
                        found.append((table, column, shown.lower()))
    return found


def holding(mailer: Mailer, *needles: str) -> list[tuple[str, str, str]]:
    return [hit for hit in every_value(mailer) if any(n in hit[2] for n in needles)]


@pytest.fixture
def world(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    tmp_path: Path,
    write_csv: Callable[..., Path],
    campaign_file: Callable[..., Path],
    smtp_server: CaptureServer,
) -> Any:
    return populate(mailer, cli, tmp_path, write_csv, campaign_file, smtp_server)


def test_erasure_leaves_no_trace_of_the_person_in_any_table(
    mailer: Mailer, cli: Callable[..., CliResult], world: Any
) -> None:
    before = holding(mailer, *NEEDLES)
    tables = {table for table, _, _ in before}
    # the fixture really spreads her over the database (so the search below means something)
    assert {
        "contacts",
        "consent_records",
        "engagement_events",
        "subscriptions",
        "suppressions",
        "privacy_requests",
    } <= tables

    erased = cli("privacy", "erase", EVELINE, "--json")
    assert erased.exit_code == 0, erased.stdout + erased.stderr
    removed = json.loads(erased.stdout)["removed"]
    assert removed["contact"] == 1
    assert removed["consent_records"] >= 5
    assert removed["deliveries"] == 1
    assert removed["engagement_events"] == 4
    assert removed["subscriptions"] == 1
    assert removed["tags"] == 1
    assert removed["sources"] == 2
    assert removed["lifted_suppressions"] == 1
    assert removed["suppression_notes"] == 1

    assert holding(mailer, *NEEDLES) == []
    # Piet is untouched
    assert holding(mailer, "piet.bakker")
    assert mailer.show_contact(PIET).contact.name == "Piet Bakker"


def test_the_address_stays_suppressed_and_only_its_hash_is_kept(
    mailer: Mailer, cli: Callable[..., CliResult], world: Any
) -> None:
    assert cli("privacy", "erase", EVELINE).exit_code == 0
    hashed = address_hash(EVELINE, mailer.settings.suppression_key)
    with mailer.session() as session:
        assert "erased" in suppression.active(session, [hashed])[hashed]
        (erasure,) = session.exec(select(Erasure)).all()
        assert erasure.address_hash == hashed
        assert erasure.operator == "tester"
        assert erasure.reason == "request"
        assert erasure.contact_id is None  # only set while the erasing transaction runs
        assert erasure.removed["contact"] == 1
        (request,) = session.exec(select(PrivacyRequest)).all()
        assert request.id == world.request_id
        assert (request.contact_id, request.note) == (None, None)
        assert request.completed_at is not None and request.outcome == "erased"
        notes = [s.note for s in session.exec(select(Suppression))]
        assert not any(n and "eveline" in n.lower() for n in notes)

    again = cli("privacy", "erase", EVELINE)
    assert again.exit_code == 1
    assert "was erased on" in again.stderr
    assert "suppression list" in again.stderr


def test_campaign_reports_still_add_up(
    mailer: Mailer, cli: Callable[..., CliResult], world: Any
) -> None:
    before = report(mailer)
    assert before["sent"] == 2 and before["failed"] == 1 and before["bounces"] == 1
    assert before["unique_opens"] == 2 and before["opens"] == 3
    assert before["machine_opens"] == 1 and before["machine_clicks"] == 1
    assert before["clicks"] == 1 and before["unsubscribes"] == 1
    for address in (EVELINE, BRAM):
        assert cli("privacy", "erase", address).exit_code == 0
        assert report(mailer) == before
    cli_report = json.loads(cli("campaign", "report", "autumn", "--json").stdout)
    assert cli_report == before


def test_a_reimport_of_the_same_row_is_not_mailed(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    tmp_path: Path,
    write_csv: Callable[..., Path],
    campaign_file: Callable[..., Path],
    smtp_server: CaptureServer,
    world: Any,
) -> None:
    assert cli("privacy", "erase", EVELINE).exit_code == 0
    again = mailer.import_contacts(
        write_csv(VENDOR_LIST), vendor="Leads BV", attestation=attestation_file(tmp_path)
    )
    assert again.new == 1  # she is a stranger again: only her keyed hash was kept
    # her marketing and tracking evidence, and Bram's (his mailbox bounced)
    assert again.consent_ignored["suppressed"] == 3
    assert again.suppressed == 2
    view = mailer.show_contact(EVELINE)
    assert not view.mailable_for("marketing")
    assert {r.status for r in view.history} == {"ignored"}

    smtp_server.clear()
    sent = cli("campaign", "send", str(campaign_file(name="winter")), "--smtp", smtp_server.url)
    assert sent.exit_code == 0, sent.stdout + sent.stderr
    recipients = {r for m in smtp_server.messages for r in m.recipients}
    assert recipients == {PIET}
    winter = CampaignService(mailer).report("winter")
    assert winter["excluded"]["suppressed"] == 2  # Eveline (erased) and Bram (erased, bounced)


def test_erasure_is_one_transaction(
    mailer: Mailer, world: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = every_value(mailer)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(suppression, "suppress", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        privacy.erase(mailer, EVELINE)
    assert sorted(every_value(mailer)) == sorted(snapshot)  # the same rows; heap order may differ
    assert mailer.show_contact(EVELINE).contact.name == "Eveline Terpstra"


def test_the_ledger_still_refuses_every_other_delete_and_any_update(
    mailer: Mailer, world: Any
) -> None:
    privacy.erase(mailer, EVELINE)
    with mailer.session() as session:
        piet = session.exec(select(Contact).where(Contact.email == PIET)).one()
    with pytest.raises(DBAPIError, match="append-only"), mailer.engine.begin() as conn:
        conn.execute(text("DELETE FROM consent_records WHERE contact_id = :c"), {"c": piet.id})
    with pytest.raises(DBAPIError, match="append-only"), mailer.engine.begin() as conn:
        conn.execute(
            text("UPDATE consent_records SET note = 'x' WHERE contact_id = :c"), {"c": piet.id}
        )
    # an erasure row alone (without contact_id set) opens nothing either
    with pytest.raises(DBAPIError, match="append-only"), mailer.engine.begin() as conn:
        conn.execute(text("DELETE FROM consent_records"))
    assert len(mailer.show_contact(PIET).history) >= 1


def test_unknown_address_is_a_clear_error(mailer: Mailer, cli: Callable[..., CliResult]) -> None:
    result = cli("privacy", "erase", "nobody@example.org")
    assert result.exit_code == 1
    assert "no contact with address nobody@example.org" in result.stderr
    with pytest.raises(NotFound):
        privacy.erase(mailer, "nobody@example.org")
    assert cli("privacy", "erase", "not an address").exit_code == 2
