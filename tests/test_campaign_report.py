"""The report a marketer reads, and the pause/resume/cancel controls."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mailer.service import CampaignService, Mailer
from tests.conftest import CliResult
from tests.smtp_server import CaptureServer

DESIGN_KEYS = {
    "sent",
    "failed",
    "uncertain",
    "excluded",
    "opens",
    "unique_opens",
    "clicks",
    "unique_clicks",
    "unsubscribes",
    "bounces",
    "machine_opens",
    "machine_unique_opens",
    "machine_clicks",
    "machine_unique_clicks",
}


def test_report_json_has_the_contract_keys(
    cli: Callable[..., CliResult],
    campaign_file: Callable[..., Path],
    smtp_server: CaptureServer,
) -> None:
    assert cli("init").exit_code == 0
    cli("consent", "grant", "a@example.org", "--purpose", "marketing", "--source", "phone")
    cli("consent", "grant", "b@example.org", "--purpose", "tracking", "--source", "phone")
    sent = cli("campaign", "send", str(campaign_file()), "--smtp", smtp_server.url)
    assert sent.exit_code == 0, sent.stdout + sent.stderr
    assert "sent" in sent.stdout

    report = json.loads(cli("campaign", "report", "autumn", "--json").stdout)
    assert set(report) >= DESIGN_KEYS
    assert (report["sent"], report["failed"], report["uncertain"]) == (1, 0, 0)
    assert report["excluded"] == {"no_consent": 1}
    assert report["status"] == "finished"
    human = cli("campaign", "report", "autumn")
    assert "excluded: no consent" in human.stdout

    missing = cli("campaign", "report", "nope")
    assert missing.exit_code == 1
    assert "no campaign named 'nope'" in missing.stderr


def test_pause_resume_and_cancel(
    cli: Callable[..., CliResult],
    mailer: Mailer,
    campaign_file: Callable[..., Path],
    smtp_server: CaptureServer,
) -> None:
    for i in range(3):
        cli("consent", "grant", f"p{i}@example.org", "--purpose", "marketing", "--source", "x")
    path = campaign_file()
    # a dry run does not create the campaign
    assert cli("campaign", "send", str(path), "--dry-run").exit_code == 0
    assert cli("campaign", "pause", "autumn").exit_code == 1

    prepared = CampaignService(mailer).prepare(path)  # audience built, nothing sent yet
    assert prepared.queued_now == 3
    paused = cli("campaign", "pause", "autumn")
    assert paused.exit_code == 0
    assert "running -> paused" in paused.stdout
    refused = cli("campaign", "send", str(path), "--smtp", smtp_server.url)
    assert refused.exit_code == 2
    assert "is paused" in refused.stderr

    assert "paused -> running" in cli("campaign", "resume", "autumn").stdout
    assert cli("campaign", "cancel", "autumn").exit_code == 0
    refused = cli("campaign", "send", str(path), "--smtp", smtp_server.url)
    assert refused.exit_code == 2
    assert "was cancelled" in refused.stderr
    again = cli("campaign", "resume", "autumn")
    assert again.exit_code == 2
    assert "cannot be resumed" in again.stderr
