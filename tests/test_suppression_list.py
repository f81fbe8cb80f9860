"""The suppression list keeps keyed hashes, outlives the person, and only a confirmed double
opt-in lifts an unsubscribe."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy import text

from mailer import consent, suppression
from mailer.addresses import address_hash, normalise_address
from mailer.models import ConsentMethod, ConsentStatus, SuppressionReason
from mailer.service import Mailer
from tests.conftest import CliResult


def test_only_the_keyed_hash_is_stored(mailer: Mailer) -> None:
    mailer.suppress("Secret.Person@example.com", SuppressionReason.COMPLAINT)
    with mailer.engine.connect() as conn:
        stored = conn.execute(text("SELECT address_hash, reason FROM suppressions")).all()
    expected = address_hash("secret.person@example.com", mailer.settings.suppression_key)
    assert stored == [(expected, "complaint")]
    assert "secret" not in expected


def test_suppressing_twice_is_harmless(mailer: Mailer) -> None:
    assert mailer.suppress("a@example.com", SuppressionReason.MANUAL).created
    assert not mailer.suppress("A@example.com", SuppressionReason.MANUAL).created
    assert mailer.suppress("a@example.com", SuppressionReason.HARD_BOUNCE).created
    assert [s.reason for s in mailer.suppressions()] == ["manual", "hard_bounce"]


def _confirmed_double_opt_in(mailer: Mailer, email: str) -> consent.ConsentRecord:
    with mailer.session() as session:
        contact = mailer._contact_for(session, email)[0]
        assert contact.id is not None
        return consent.record(
            session,
            contact_id=contact.id,
            purpose="marketing",
            status=ConsentStatus.CONFIRMED,
            method=ConsentMethod.DOUBLE_OPT_IN.value,
            source="confirmation link",
        )


def test_a_confirmed_double_opt_in_lifts_only_an_unsubscribe(mailer: Mailer) -> None:
    mailer.suppress("u@example.com", SuppressionReason.UNSUBSCRIBED)
    mailer.suppress("u@example.com", SuppressionReason.HARD_BOUNCE)
    evidence = _confirmed_double_opt_in(mailer, "u@example.com")
    digest = address_hash(normalise_address("u@example.com"), mailer.settings.suppression_key)
    with mailer.session() as session:
        lifted = suppression.lift_by_double_opt_in(session, digest, evidence)
        assert [s.reason for s in lifted] == ["unsubscribed"]
        assert suppression.active(session, [digest]) == {digest: ["hard_bounce"]}


def test_nothing_but_a_confirmed_opt_in_can_lift(mailer: Mailer) -> None:
    mailer.suppress("v@example.com", SuppressionReason.UNSUBSCRIBED)
    grant = mailer.record_consent(
        "v@example.com", "marketing", ConsentStatus.GRANTED, source="phone"
    )
    digest = address_hash("v@example.com", mailer.settings.suppression_key)
    with mailer.session() as session, pytest.raises(ValueError, match="confirmed double opt-in"):
        suppression.lift_by_double_opt_in(session, digest, grant.record)
    assert not mailer.show_contact("v@example.com").mailable_for("marketing")


def test_cli_suppress_and_list(cli: Callable[..., CliResult]) -> None:
    assert cli("init").exit_code == 0
    done = cli("suppress", "X@example.com", "--reason", "hard_bounce")
    assert done.exit_code == 0
    assert "Suppressed" in done.stdout
    assert (
        "Already suppressed" in cli("suppress", "x@example.com", "--reason", "hard_bounce").stdout
    )
    bad = cli("suppress", "x@example.com", "--reason", "because")
    assert bad.exit_code == 2
    assert "invalid suppression reason" in bad.stderr
    bad = cli("suppress", "not-an-address", "--reason", "manual")
    assert bad.exit_code == 2
    listed = json.loads(cli("suppressions", "list", "--json").stdout)
    assert [(s["reason"], len(s["address_hash"])) for s in listed] == [("hard_bounce", 64)]
    assert "example.com" not in cli("suppressions", "list").stdout
