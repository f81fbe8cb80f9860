"""Versions of the privacy statement: published in order, a material change announced on the
recipient pages for 30 days, and campaigns leave out consent given under older versions."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pytest

from mailer import policy
from mailer.db import make_engine
from mailer.errors import BadInput
from mailer.models import utcnow
from mailer.service import CampaignService, Mailer
from tests.conftest import CliResult
from tests.smtp_server import CaptureServer


def test_publish_and_list(mailer: Mailer, cli: Callable[..., CliResult]) -> None:
    first = cli("policy", "publish", "2026-01", "--effective", "2026-01-01")
    assert first.exit_code == 0, first.stderr
    assert "Published policy version 2026-01, effective 2026-01-01." in first.stdout
    second = cli(
        "policy",
        "publish",
        "2026-07",
        "--effective",
        "2026-08-01",
        "--material",
        "--summary",
        "We now also measure which links are clicked.",
    )
    assert second.exit_code == 0, second.stderr
    assert "notice of this material change until" in second.stdout

    listed = json.loads(cli("policy", "list", "--json").stdout)
    assert [v["version"] for v in listed["versions"]] == ["2026-01", "2026-07"]
    assert [v["material"] for v in listed["versions"]] == [False, True]
    assert listed["versions"][1]["operator"] == "tester"
    assert listed["notice"]["version"] == "2026-07"
    assert "clicked" in listed["notice"]["nl"]
    table = cli("policy", "list")
    assert "2026-07" in table.stdout and "Notice shown until" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("2025-12", "--effective", "2026-01-01"), "does not sort after 2026-01"),
        (("2026-01", "--effective", "2026-01-01"), "was published already"),
        (("2026 02", "--effective", "2026-02-01"), "invalid policy version"),
        (("2026-02", "--effective", "1 Feb"), "expected a date"),
        (("2026-02", "--effective", "2026-02-01", "--material"), "needs --summary"),
        (("2026-02", "--effective", "2026-02-01", "--summary", "a\nb"), "one line"),
    ],
)
def test_bad_versions_are_refused(
    mailer: Mailer, cli: Callable[..., CliResult], args: tuple[str, ...], message: str
) -> None:
    assert cli("policy", "publish", "2026-01", "--effective", "2026-01-01").exit_code == 0
    refused = cli("policy", "publish", *args)
    assert refused.exit_code == 2
    assert message in refused.stderr
    with mailer.session() as session:
        assert [v.version for v in policy.versions(session)] == ["2026-01"]


def test_a_material_change_is_announced_for_30_days(mailer: Mailer) -> None:
    now = utcnow()
    with mailer.session() as session:
        assert policy.current_notice(session, now) is None
        policy.publish(
            session, "2026-01", date(2026, 1, 1), material=False, summary=None, operator="x"
        )
        assert policy.current_notice(session, now) is None  # not material: no notice
        published = policy.publish(
            session,
            "2026-07",
            date(2026, 8, 1),
            material=True,
            summary="Clicks are measured per link.",
            operator="x",
            now=now,
        )
    with mailer.session() as session:
        notice = policy.current_notice(session, now + timedelta(days=29))
        assert notice is not None
        assert notice.version == "2026-07"
        assert notice.until == published.published_at + timedelta(days=30)
        assert policy.current_notice(session, now + timedelta(days=30, seconds=1)) is None
        assert policy.current_notice(session, now - timedelta(seconds=1)) is None
    text_en = policy.notice_text(notice, "en", today=date(2026, 7, 20))
    assert text_en == (
        "Our privacy statement changes on 1 August 2026 (version 2026-07). "
        "Clicks are measured per link."
    )
    assert policy.notice_text(notice, "nl", today=date(2026, 8, 2)).startswith(
        "Onze privacyverklaring is gewijzigd per 1 augustus 2026 (versie 2026-07)."
    )


def test_the_page_hook_gives_the_notice_per_language(mailer: Mailer) -> None:
    notice = policy.page_notice(mailer.engine, cache_seconds=0)
    assert notice("nl") is None
    with mailer.session() as session:
        policy.publish(
            session, "2026-07", date(2026, 8, 1), material=True, summary="Nieuw.", operator="x"
        )
    shown = notice("nl")
    assert shown is not None and shown.startswith("Onze privacyverklaring") and "Nieuw." in shown
    assert (notice("en") or "").startswith("Our privacy statement")
    cached = policy.page_notice(mailer.engine, cache_seconds=3600)
    assert cached("en") is not None


def test_a_database_error_shows_no_notice_rather_than_breaking_the_page(tmp_path: Path) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'missing' / 'nothing.db'}")
    try:
        assert policy.page_notice(broken)("en") is None
    finally:
        broken.dispose()


def test_campaigns_leave_out_consent_under_older_versions(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    write_csv: Callable[..., Path],
    campaign_file: Callable[..., Path],
) -> None:
    for version, effective in (("2026-01", "2026-01-01"), ("2026-07", "2026-07-01")):
        assert cli("policy", "publish", version, "--effective", effective).exit_code == 0
    mailer.import_contacts(
        write_csv(
            "email,consent_purposes,consent_at,consent_source,consent_policy_version\n"
            "old@example.org,marketing,2026-02-01T10:00:00Z,webform,2026-01\n"
            "new@example.org,marketing,2026-07-02T10:00:00Z,webform,2026-07\n"
        )
    )
    path = campaign_file(extra='min_policy_version = "2026-07"\n')
    result = CampaignService(mailer).dry_run(path)
    assert result.would_send == 1
    assert result.excluded == {"policy_outdated": 1}


def test_publish_is_a_service_function_too(mailer: Mailer) -> None:
    with mailer.session() as session, pytest.raises(BadInput, match="invalid policy version"):
        policy.publish(session, "", date(2026, 1, 1), material=False, summary=None, operator="x")


@pytest.mark.asyncio
async def test_a_material_change_is_announced_on_every_recipient_page(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    from tests.recipient_support import app_for, client_for, deliver

    arrived = await deliver(mailer, smtp_server, campaign_file, "ann@example.org")
    with mailer.session() as session:
        policy.publish(
            session,
            "2027-01",
            date(2027, 1, 1),
            material=True,
            summary="We now also measure clicks on our website.",
            operator="tester",
        )
    async with client_for(app_for(mailer)) as http:
        page = await http.get(arrived["ann@example.org"].unsubscribe)
    assert page.status_code == 200
    assert "We now also measure clicks on our website." in page.text
