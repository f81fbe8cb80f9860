"""A bought list comes in only with a complete, valid lawful-source attestation (invariant 7)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.errors import AttestationError, BadInput
from mailer.models import Attestation, ConsentRecord, Contact, ImportBatch
from mailer.service import Mailer
from tests.conftest import CliResult

VALID = {
    "vendor": '"Leads BV"',
    "vendor_contact": '"privacy@leads.example"',
    "lawful_basis": '"consent"',
    "purposes": '["marketing", "tracking"]',
    "collection_method": '"web form, unticked box"',
    "collected_from": "2026-01-01",
    "collected_to": "2026-06-30",
    "consent_wording": '"Yes, mail me offers."',
    "signed_by": '"J. Jansen"',
    "signed_at": "2026-07-01T09:00:00Z",
    "document_sha256": '"' + "ab" * 32 + '"',
}
LIST = (
    "email,consent_purposes,consent_at,consent_source\n"
    "in@example.net,marketing,2026-03-14T11:00:00Z,vendor-form\n"
    "early@example.net,marketing,2025-12-31T23:00:00Z,vendor-form\n"
    "late@example.net,marketing,2026-07-01T00:00:01Z,vendor-form\n"
    "phone@example.net,sms,2026-03-01T00:00:00Z,vendor-form\n"
    "both@example.net,marketing;tracking,2026-06-30T12:00:00Z,vendor-form\n"
)


def attestation_file(tmp_path: Path, **changes: str | None) -> Path:
    values = {**VALID, **changes}
    lines = [f"{key} = {value}" for key, value in values.items() if value is not None]
    path = tmp_path / "attestation.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def counts(mailer: Mailer) -> tuple[int, int, int, int]:
    with mailer.session() as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(model))
            for model in (Contact, ConsentRecord, ImportBatch, Attestation)
        )


def test_vendor_without_attestation_is_refused_and_writes_nothing(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    with pytest.raises(BadInput, match="needs --attestation"):
        mailer.import_contacts(write_csv(LIST), vendor="Leads BV")
    assert counts(mailer) == (0, 0, 0, 0)


@pytest.mark.parametrize("missing", list(VALID))
def test_each_missing_field_is_named(
    mailer: Mailer, write_csv: Callable[..., Path], tmp_path: Path, missing: str
) -> None:
    path = attestation_file(tmp_path, **{missing: None})
    with pytest.raises(AttestationError, match=f"missing {missing}"):
        mailer.import_contacts(write_csv(LIST), vendor="Leads BV", attestation=path)
    assert counts(mailer) == (0, 0, 0, 0)


def test_every_problem_is_named_in_one_message(
    mailer: Mailer, write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    path = attestation_file(
        tmp_path,
        signed_by=None,
        lawful_basis='"we bought it"',
        document_sha256='"not-a-hash"',
        collected_to="2025-01-01",
        signed_at="2999-01-01T00:00:00Z",
    )
    with pytest.raises(AttestationError) as caught:
        mailer.import_contacts(write_csv(LIST), vendor="Leads BV", attestation=path)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in (
        "missing signed_by",
        "lawful_basis",
        "document_sha256",
        "collected_to",
        "signed_at",
    ):
        assert fragment in message
    assert counts(mailer) == (0, 0, 0, 0)


def test_attestation_must_name_the_same_vendor(
    mailer: Mailer, write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(AttestationError, match="does not match --vendor"):
        mailer.import_contacts(
            write_csv(LIST), vendor="Other BV", attestation=attestation_file(tmp_path)
        )


def test_rows_outside_period_or_purposes_are_rejected_with_row_numbers(
    mailer: Mailer, write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    summary = mailer.import_contacts(
        write_csv(LIST), vendor="Leads BV", attestation=attestation_file(tmp_path)
    )
    assert {(r.row_number, r.reason) for r in summary.rejects} == {
        (3, "outside_attested_period"),
        (4, "outside_attested_period"),
        (5, "outside_attested_purposes"),
    }
    assert summary.new == 2
    assert summary.consent_granted == 3

    view = mailer.show_contact("both@example.net")
    assert {r.purpose for r in view.history} == {"marketing", "tracking"}
    assert {r.attestation_id for r in view.history} == {summary.attestation_id}
    assert {r.method for r in view.history} == {"vendor_attestation"}
    assert all(r.wording == "Yes, mail me offers." for r in view.history)
    assert [(b.vendor, n) for b, n in view.sources] == [("Leads BV", 6)]


def test_a_basis_other_than_consent_grants_no_consent(
    mailer: Mailer, write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    path = attestation_file(tmp_path, lawful_basis='"legitimate_interests"')
    summary = mailer.import_contacts(write_csv(LIST), vendor="Leads BV", attestation=path)
    assert summary.consent_granted == 0
    assert summary.consent_ignored == {"lawful_basis_not_consent": 3}
    assert not mailer.show_contact("in@example.net").mailable_for("marketing")


def test_revoking_an_attestation_withdraws_what_it_granted_only(
    mailer: Mailer, write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    summary = mailer.import_contacts(
        write_csv(LIST), vendor="Leads BV", attestation=attestation_file(tmp_path)
    )
    assert summary.attestation_id is not None
    # "in@" later signs up on our own site: that consent does not rest on the vendor
    own = write_csv(
        "email,consent_purposes,consent_at,consent_source\n"
        "in@example.net,marketing,2026-08-01T00:00:00Z,webform\n"
    )
    assert mailer.import_contacts(own).consent_granted == 1

    withdrawn = mailer.revoke_attestation(summary.attestation_id, "vendor could not show proof")

    assert withdrawn == 2  # both@ marketing and tracking; in@ rests on first-party consent now
    assert mailer.show_contact("in@example.net").mailable_for("marketing")
    both = mailer.show_contact("both@example.net")
    assert not both.mailable_for("marketing")
    assert [r.status for r in both.history][-2:] == ["withdrawn", "withdrawn"]
    assert {r.method for r in both.history if r.status == "withdrawn"} == {"attestation_revoked"}
    # the grants stay in the ledger as evidence of what the vendor claimed
    assert [r.status for r in both.history].count("granted") == 2
    # and a revoked attestation cannot carry a new import
    with pytest.raises(AttestationError, match="revoked"):
        mailer.import_contacts(
            write_csv(LIST), vendor="Leads BV", attestation=attestation_file(tmp_path)
        )


def test_cli_refuses_vendor_list_with_exit_2(
    cli: Callable[..., CliResult], write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    assert cli("init").exit_code == 0
    csv_path = write_csv(LIST)
    refused = cli("contacts", "import", str(csv_path), "--vendor", "Leads BV")
    assert refused.exit_code == 2
    assert "attestation" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout

    incomplete = attestation_file(tmp_path, consent_wording=None, document_sha256=None)
    refused = cli(
        "contacts",
        "import",
        str(csv_path),
        "--vendor",
        "Leads BV",
        "--attestation",
        str(incomplete),
    )
    assert refused.exit_code == 2
    assert "missing consent_wording, document_sha256" in refused.stderr

    ok = cli(
        "contacts",
        "import",
        str(csv_path),
        "--vendor",
        "Leads BV",
        "--attestation",
        str(attestation_file(tmp_path)),
    )
    assert ok.exit_code == 1  # some rows were rejected
    listing = json.loads(cli("vendors", "list", "--json").stdout)
    assert [(v["vendor"], v["imports"], v["consents_in_force"]) for v in listing] == [
        ("Leads BV", 1, 3)
    ]
    revoked = cli("vendors", "revoke", str(listing[0]["id"]), "--reason", "no proof")
    assert revoked.exit_code == 0
    assert "withdrew 3 consents" in revoked.stdout
    listing = json.loads(cli("vendors", "list", "--json").stdout)
    assert listing[0]["consents_in_force"] == 0
    assert listing[0]["revoked_at"]
