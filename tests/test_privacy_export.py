"""Access: one command gives everything held about a person, as JSON or as a zip of CSV files
that a spreadsheet cannot run as formulas."""

from __future__ import annotations

import csv
import io
import json
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from mailer import privacy
from mailer.addresses import address_hash
from mailer.models import Contact, PrivacyRequest
from mailer.service import Mailer
from tests.conftest import CliResult
from tests.privacy_support import EVELINE, PIET, populate
from tests.smtp_server import CaptureServer

FORMULAS = {
    "eq": '=HYPERLINK("http://evil.example","click")',
    "plus": "+31 6 1234 5678",
    "minus": "-2+3",
    "at": "@SUM(A1:A2)",
    "tab": "\tindented",
    "cr": "\rreturn",
    "plain": "fine",
}


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


def test_the_export_holds_every_kind_of_record(
    mailer: Mailer, cli: Callable[..., CliResult], world: Any
) -> None:
    result = cli("privacy", "export", EVELINE.upper())
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # stdout is the document alone
    assert doc["format"] == "mailer.privacy-export/1"
    assert doc["contact"]["email"] == EVELINE
    assert doc["contact"]["name"] == "Eveline Terpstra"
    assert doc["contact"]["locale"] == "nl-NL"
    assert doc["attributes"] == {"city": "Leeuwarden", "shoe_size": "39"}
    assert doc["tags"] == ["nieuwsbrief"]
    assert [(s["vendor"], s["row"]) for s in doc["sources"]] == [("Leads BV", 2), (None, 2)]

    ledger = doc["consent"]
    assert {r["method"] for r in ledger} >= {
        "vendor_attestation",
        "one_click",
        "double_opt_in",
        "operator",
    }
    bought = [r for r in ledger if r["method"] == "vendor_attestation"]
    assert {r["purpose"] for r in bought} == {"marketing", "tracking"}
    assert all(r["attestation_id"] == world.attestation_id for r in bought)
    assert any(r["note"] == "Eveline Terpstra from Leeuwarden" for r in ledger)
    (attestation,) = doc["attestations"]
    assert attestation["vendor"] == "Leads BV"
    assert attestation["consent_wording"] == "Yes, mail me offers."
    assert (attestation["collected_from"], attestation["collected_to"]) == (
        "2026-01-01",
        "2026-06-30",
    )
    assert attestation["signed_by"] == "J. Jansen"
    assert doc["current_consent"]["marketing"]["status"] == "confirmed"
    assert doc["current_consent"]["tracking"]["status"] == "withdrawn"

    (delivery,) = doc["deliveries"]
    assert (delivery["campaign"], delivery["status"]) == ("autumn", "sent")
    assert delivery["queued_at"] and delivery["finished_at"]
    events = doc["engagement"]
    assert len(events) == 4
    assert sorted((e["kind"], e["machine"]) for e in events) == [
        ("click", False),
        ("open", False),
        ("open", False),
        ("open", True),
    ]
    (click,) = [e for e in events if e["kind"] == "click"]
    assert click["link_url"] == "https://shop.example.com/autumn"
    assert click["ip_masked"] == "192.0.2.0"

    hashed = address_hash(EVELINE, mailer.settings.suppression_key)
    suppressions = doc["suppressions"]
    assert {s["address_hash"] for s in suppressions} == {hashed}
    assert sorted((s["reason"], s["lifted_at"] is not None) for s in suppressions) == [
        ("manual", False),
        ("unsubscribed", True),
    ]
    (signup,) = doc["subscriptions"]
    assert (signup["status"], signup["purposes"]) == ("confirmed", ["marketing"])
    (request,) = doc["requests"]
    assert (request["kind"], request["identity_check"]) == ("access", "verified")
    assert {a["action"] for a in doc["audit"]} >= {"privacy.request", "suppression.add"}

    # nothing about anyone else
    assert PIET not in result.stdout and "Piet" not in result.stdout


def test_the_export_answers_verified_access_requests_only(
    mailer: Mailer, cli: Callable[..., CliResult], world: Any, tmp_path: Path
) -> None:
    pending = privacy.record_request(mailer, EVELINE, "access", channel="mail", verified=False)
    target = tmp_path / "eveline.json"
    result = cli("privacy", "export", EVELINE, "--out", str(target))
    assert result.exit_code == 0, result.stderr
    assert f"Answered access request(s) #{world.request_id}" in result.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text(encoding="utf-8"))["contact"]["email"] == EVELINE
    with mailer.session() as session:
        answered = session.get(PrivacyRequest, world.request_id)
        still = session.get(PrivacyRequest, pending.id)
        assert answered is not None and still is not None
        assert answered.completed_at is not None
        assert answered.outcome == "answered: export (json)"
        assert still.completed_at is None  # identity not checked yet


def test_csv_export_is_a_zip_of_formula_safe_files(
    mailer: Mailer, cli: Callable[..., CliResult], world: Any, tmp_path: Path
) -> None:
    with mailer.session() as session:
        contact = session.exec(select(Contact).where(Contact.email == EVELINE)).one()
        contact.attributes = dict(FORMULAS)
        contact.name = "=1+2"
        session.add(contact)
    target = tmp_path / "eveline.zip"
    result = cli("privacy", "export", EVELINE, "--format", "csv", "--out", str(target))
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        files = {
            name: list(csv.reader(io.StringIO(archive.read(name).decode("utf-8-sig"))))
            for name in names
        }
    assert names == {
        "contact.csv",
        "attributes.csv",
        "tags.csv",
        "current_consent.csv",
        "sources.csv",
        "consent.csv",
        "attestations.csv",
        "deliveries.csv",
        "engagement.csv",
        "suppressions.csv",
        "subscriptions.csv",
        "requests.csv",
        "audit.csv",
    }
    attributes = dict(files["attributes.csv"][1:])
    for key, value in FORMULAS.items():
        expected = value if key == "plain" else "'" + value
        assert attributes[key] == expected
    assert dict(files["contact.csv"][1:])["name"] == "'=1+2"
    # no cell of any file starts a formula
    for name, rows in files.items():
        for row in rows:
            for cell in row:
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (name, cell)
    header, *events = files["engagement.csv"]
    assert "machine" in header and len(events) == 4
    attestation_header, attestation = files["attestations.csv"]
    assert attestation[attestation_header.index("signed_by")] == "J. Jansen"


def test_unknown_address_is_a_clear_error_with_exit_1(cli: Callable[..., CliResult]) -> None:
    assert cli("init").exit_code == 0
    result = cli("privacy", "export", "nobody@example.org")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no contact with address nobody@example.org"
    assert result.stdout == ""
    bad = cli("privacy", "export", "nobody@example.org", "--format", "xml")
    assert bad.exit_code == 2
