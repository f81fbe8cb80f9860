"""A withdrawal or a suppression is never undone by importing old evidence again."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from mailer.models import ConsentStatus, SuppressionReason
from mailer.service import Mailer
from tests.conftest import CliResult

HEADER = "email,consent_purposes,consent_at,consent_source\n"


def test_reimport_of_old_evidence_does_not_revive_a_withdrawal(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    shop = write_csv(HEADER + "ann@example.com,marketing,2026-01-10T10:00:00Z,shop\n")
    assert mailer.import_contacts(shop).consent_granted == 1
    mailer.record_consent("ann@example.com", "marketing", ConsentStatus.WITHDRAWN, source="phone")

    again = mailer.import_contacts(shop)

    assert again.consent_granted == 0
    assert dict(again.consent_ignored) == {"older_than_withdrawal": 1}
    view = mailer.show_contact("ann@example.com")
    assert view.states["marketing"].status is ConsentStatus.WITHDRAWN
    assert not view.mailable_for("marketing")
    assert [r.status for r in view.history] == ["granted", "withdrawn", "ignored"]
    assert view.history[-1].note == "older_than_withdrawal"


def test_fresh_evidence_after_a_withdrawal_is_new_consent(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    mailer.record_consent("ann@example.com", "marketing", ConsentStatus.WITHDRAWN, source="phone")
    withdrawn_at = mailer.show_contact("ann@example.com").states["marketing"].consent_at

    same_time = write_csv(HEADER + f"ann@example.com,marketing,{withdrawn_at.isoformat()},shop\n")
    assert mailer.import_contacts(same_time).consent_ignored == {"older_than_withdrawal": 1}

    newer = (withdrawn_at + timedelta(seconds=30)).isoformat()
    summary = mailer.import_contacts(
        write_csv(HEADER + f"ann@example.com,marketing,{newer},shop\n")
    )
    assert summary.consent_granted == 1
    assert mailer.show_contact("ann@example.com").mailable_for("marketing")


def test_consent_dated_in_the_future_is_rejected(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    summary = mailer.import_contacts(
        write_csv(HEADER + "ann@example.com,marketing,2099-01-01T00:00:00Z,shop\n")
    )
    assert summary.rejected == {"future_date": 1}
    assert summary.rejects[0].row_number == 2


def test_import_never_revives_a_suppressed_address(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    mailer.suppress("Bob@Example.com", SuppressionReason.UNSUBSCRIBED)
    summary = mailer.import_contacts(
        write_csv(HEADER + "bob@example.com,marketing;tracking,2026-03-01T00:00:00Z,webform\n")
    )
    assert summary.new == 1
    assert summary.suppressed == 1
    assert summary.consent_granted == 0
    assert dict(summary.consent_ignored) == {"suppressed": 2}
    view = mailer.show_contact("bob@example.com")
    assert view.states == {}
    assert not view.mailable_for("marketing")
    assert {r.status for r in view.history} == {"ignored"}


def test_operator_grant_does_not_lift_a_suppression(mailer: Mailer) -> None:
    mailer.suppress("cas@example.com", SuppressionReason.UNSUBSCRIBED)
    change = mailer.record_consent(
        "cas@example.com", "marketing", ConsentStatus.GRANTED, source="phone"
    )
    assert change.suppressed_reasons == ["unsubscribed"]
    view = mailer.show_contact("cas@example.com")
    assert view.states["marketing"].allows
    assert not view.mailable_for("marketing")


def test_cli_reimport_reports_ignored_consent(
    cli: Callable[..., CliResult], write_csv: Callable[..., Path]
) -> None:
    assert cli("init").exit_code == 0
    path = write_csv(HEADER + "dee@example.com,marketing,2026-01-10T10:00:00Z,shop\n")
    assert cli("contacts", "import", str(path)).exit_code == 0
    withdraw = cli(
        "consent", "withdraw", "DEE@example.com", "--purpose", "marketing", "--source", "letter"
    )
    assert withdraw.exit_code == 0
    result = cli("contacts", "import", str(path), "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["consent_granted"] == 0
    assert summary["consent_ignored"] == {"older_than_withdrawal": 1}
