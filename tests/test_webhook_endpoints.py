"""`mailer webhooks add|list|disable|enable|remove|rotate-secret`: https only, no private targets
unless development allows them, the secret shown once and never again, and a rotation during
which the old and the new secret both sign."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import standardwebhooks

from mailer.service import Mailer
from tests.conftest import CliResult
from tests.test_webhook_delivery import Clock, deliver, emit_withdrawals, statuses
from tests.webhook_consumer import Consumer

DEV = {"MAILER_WEBHOOK_ALLOW_PRIVATE": "true"}


@pytest.fixture(autouse=True)
def _migrated(mailer: Mailer) -> None:
    """Every test here runs against a migrated database."""


def added(result: CliResult) -> tuple[str, str]:
    """The endpoint id and secret printed by `webhooks add` / `rotate-secret`."""
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    uid = next((w for line in lines for w in line.split() if w.startswith("ep_")), "")
    secret = next(line.split()[-1] for line in lines if line.startswith("secret:"))
    assert secret.startswith("whsec_")
    return uid, secret


def listing(cli: Callable[..., CliResult]) -> list[dict[str, object]]:
    result = cli("webhooks", "list", "--json")
    assert result.exit_code == 0, result.stderr
    document: list[dict[str, object]] = json.loads(result.stdout)
    return document


def test_add_prints_the_id_and_secret_once_and_list_never_shows_it(
    cli: Callable[..., CliResult],
) -> None:
    uid, secret = added(
        cli(
            "webhooks",
            "add",
            "https://crm.example.com/hooks/mailer",
            "--events",
            "consent.withdrawn, contact.unsubscribed",
            "--description",
            "CRM",
        )
    )
    assert uid.startswith("ep_")
    (endpoint,) = listing(cli)
    assert endpoint["id"] == uid
    assert endpoint["url"] == "https://crm.example.com/hooks/mailer"
    assert endpoint["events"] == ["consent.withdrawn", "contact.unsubscribed"]
    assert endpoint["enabled"] is True
    assert (endpoint["pending"], endpoint["dead"]) == (0, 0)
    for args in (("list",), ("list", "--json"), ("deliveries",), ("deliveries", "--json")):
        shown = cli("webhooks", *args)
        assert secret not in shown.stdout + shown.stderr
        assert secret.removeprefix("whsec_") not in shown.stdout
    table = cli("webhooks", "list").stdout
    assert uid in table


def test_all_events_by_default(cli: Callable[..., CliResult]) -> None:
    added(cli("webhooks", "add", "https://dwh.example.com/in"))
    (endpoint,) = listing(cli)
    assert endpoint["events"] == ["*"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://crm.example.com/hook", "must start with https://"),
        ("ftp://crm.example.com/hook", "must start with https://"),
        ("https://user:pw@crm.example.com/hook", "password in the URL"),
        ("https:///hook", "no host"),
        ("https://crm.example.com/hook#top", "fragment"),
        ("https://localhost/hook", "not a public host"),
        ("https://127.0.0.1:8443/hook", "not a public address"),
        ("https://10.1.2.3/hook", "not a public address"),
        ("https://[::1]/hook", "not a public address"),
        ("https://169.254.169.254/latest/meta-data/", "not a public address"),
        ("https://metadata.google.internal/", "not a public host"),
        ("https://crm.example.com/a\r\nb", "control characters"),
        ("", "empty"),
    ],
)
def test_bad_urls_are_refused_with_one_line_and_nothing_written(
    cli: Callable[..., CliResult], url: str, message: str
) -> None:
    result = cli("webhooks", "add", url)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert listing(cli) == []


def test_unknown_event_types_are_refused(cli: Callable[..., CliResult]) -> None:
    result = cli("webhooks", "add", "https://crm.example.com/h", "--events", "consent.withdrawm")
    assert result.exit_code == 2
    assert "unknown event type 'consent.withdrawm'" in result.stderr
    assert listing(cli) == []


def test_development_allows_loopback_and_plain_http(cli: Callable[..., CliResult]) -> None:
    added(cli("webhooks", "add", "http://127.0.0.1:9999/hook", extra_env=DEV))
    assert listing(cli)[0]["url"] == "http://127.0.0.1:9999/hook"
    result = cli("webhooks", "list", extra_env={"MAILER_WEBHOOK_ALLOW_PRIVATE": "maybe"})
    assert result.exit_code == 2
    assert "MAILER_WEBHOOK_ALLOW_PRIVATE" in result.stderr


def test_the_same_url_twice_is_refused(cli: Callable[..., CliResult]) -> None:
    uid, _ = added(cli("webhooks", "add", "https://crm.example.com/h"))
    again = cli("webhooks", "add", "https://crm.example.com/h", "--events", "contact.created")
    assert again.exit_code == 2
    assert f"exists already: {uid}" in again.stderr


def test_unknown_endpoint_ids_are_named(cli: Callable[..., CliResult]) -> None:
    for command in ("disable", "enable", "remove", "rotate-secret"):
        result = cli("webhooks", command, "ep_nope")
        assert result.exit_code == 1
        assert "no webhook endpoint 'ep_nope'" in result.stderr


def test_disable_pauses_and_enable_resumes(mailer: Mailer, cli: Callable[..., CliResult]) -> None:
    with Consumer() as consumer:
        uid, _ = added(cli("webhooks", "add", consumer.url, extra_env=DEV))
        waiting = emit_withdrawals(mailer, 2)
        disabled = cli("webhooks", "disable", uid, "--reason", "CRM migration")
        assert disabled.exit_code == 0, disabled.stderr
        during = emit_withdrawals(mailer, 1, start=5)  # not queued for a disabled endpoint
        assert deliver(mailer, Clock()).attempts == 0
        (endpoint,) = listing(cli)
        assert (endpoint["enabled"], endpoint["disabled_reason"]) == (False, "CRM migration")
        assert endpoint["pending"] == 2

        assert cli("webhooks", "enable", uid).exit_code == 0
        assert deliver(mailer, Clock()).delivered == 2
        assert set(consumer.accepted()) == set(waiting)
        # what happened while it was off comes back on request
        assert "Queued 3 deliveries" in cli("webhooks", "replay", "--since", "1h").stdout
        deliver(mailer, Clock())
    assert set(consumer.accepted()) == set(waiting + during)


def test_remove_deletes_the_endpoint_and_its_deliveries(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    uid, _ = added(cli("webhooks", "add", "http://127.0.0.1:9/hook", extra_env=DEV))
    emit_withdrawals(mailer, 3)
    deliver(mailer, Clock(), timeout=0.5)  # nobody listens: attempts are recorded
    result = cli("webhooks", "remove", uid)
    assert result.exit_code == 0, result.stderr
    assert "its 3 deliveries" in result.stdout
    assert listing(cli) == []
    assert statuses(mailer) == {}


def test_rotation_signs_with_both_secrets_during_the_grace_period(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    with Consumer() as consumer:
        uid, old = added(cli("webhooks", "add", consumer.url, extra_env=DEV))
        _, new = added(cli("webhooks", "rotate-secret", uid, "--grace", "2h"))
        assert new != old
        emit_withdrawals(mailer, 1)
        deliver(mailer, Clock())
        assert len(consumer.verified(old)) == len(consumer.verified(new)) == 1
        assert listing(cli)[0]["previous_secret_until"] is not None

        emit_withdrawals(mailer, 1, start=1)
        clock = Clock()
        clock.advance(hours=3)  # grace over: only the new secret signs
        deliver(mailer, clock)
        latest = consumer.requests()[-1]
        standardwebhooks.Webhook(new).verify(latest.body, latest.headers)
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(old).verify(latest.body, latest.headers)


def test_rotation_without_grace_drops_the_old_secret_at_once(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    with Consumer() as consumer:
        uid, old = added(cli("webhooks", "add", consumer.url, extra_env=DEV))
        rotated = cli("webhooks", "rotate-secret", uid, "--grace", "0")
        _, new = added(rotated)
        assert "no longer signs" in rotated.stdout
        emit_withdrawals(mailer, 1)
        deliver(mailer, Clock())
    (request,) = consumer.requests()
    assert len(request.headers["webhook-signature"].split()) == 1
    standardwebhooks.Webhook(new).verify(request.body, request.headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(old).verify(request.body, request.headers)
    bad = cli("webhooks", "rotate-secret", uid, "--grace", "soon")
    assert bad.exit_code == 2
    assert "--grace 'soon'" in bad.stderr
