"""What the SMTP server answers decides each delivery: retries, failures, hard-bounce suppression,
uncertainty after a dropped connection, and a campaign that pauses itself when too much fails."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from mailer.errors import BadInput
from mailer.models import ConsentStatus
from mailer.service import CampaignService, Mailer
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign


def granted(mailer: Mailer, *emails: str) -> None:
    for email in emails:
        mailer.record_consent(email, "marketing", ConsentStatus.GRANTED, source="webform")


@pytest.mark.asyncio
async def test_smtp_answers_lead_to_retries_failures_and_suppressions(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    granted(
        mailer,
        "ok@example.org",
        "busy@example.org",
        "throttled@example.org",
        "gone@example.org",
        "full@example.org",
    )
    smtp_server.reply("451 4.3.0 Try again later", recipients={"busy@example.org"}, times=1)
    smtp_server.reply("421 4.7.0 Slow down", stage="mail", times=1)
    smtp_server.reply("550 5.1.1 No such user", recipients={"gone@example.org"})
    smtp_server.reply("552 5.2.2 Mailbox full", recipients={"full@example.org"})

    outcome = await send_campaign(mailer, campaign_file(), smtp_server)

    arrived = Counter(r for m in smtp_server.messages for r in m.recipients)
    assert arrived == Counter(
        {"ok@example.org": 1, "busy@example.org": 1, "throttled@example.org": 1}
    )
    report = outcome.report
    assert (report["sent"], report["failed"], report["uncertain"]) == (3, 2, 0)
    assert report["bounces"] == 2
    # only the 5.1.1 mailbox error suppresses the address
    assert not mailer.show_contact("gone@example.org").mailable_for("marketing")
    assert [s.reason for s in mailer.show_contact("gone@example.org").suppressions] == [
        "hard_bounce"
    ]
    assert mailer.show_contact("full@example.org").mailable_for("marketing")


@pytest.mark.asyncio
async def test_a_dropped_connection_after_data_is_uncertain_and_not_resent(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    granted(mailer, "a@example.org", "b@example.org", "c@example.org")
    smtp_server.drop(stage="end_of_data", recipients={"b@example.org"}, record=True)
    path = campaign_file()

    first = await send_campaign(mailer, path, smtp_server)
    assert (first.report["sent"], first.report["uncertain"]) == (2, 1)

    again = await send_campaign(mailer, path, smtp_server)
    assert again.stats.sent == 0
    assert Counter(r for m in smtp_server.messages for r in m.recipients)["b@example.org"] == 1

    # the marketer may decide to send it again anyway
    forced = await send_campaign(mailer, path, smtp_server, resend_uncertain=True)
    assert forced.stats.sent == 1
    assert forced.report["uncertain"] == 0
    assert Counter(r for m in smtp_server.messages for r in m.recipients)["b@example.org"] == 2


@pytest.mark.asyncio
async def test_a_campaign_pauses_itself_when_too_much_fails(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = [f"x{i:02d}@example.org" for i in range(40)]
    granted(mailer, *emails)
    smtp_server.reply("554 5.7.1 Rejected by policy", stage="rcpt")
    path = campaign_file()

    outcome = await send_campaign(
        mailer, path, smtp_server, batch_size=10, wave_size=10, error_min_sample=10
    )

    assert outcome.stats.paused_reason is not None
    assert "paused itself" in outcome.report["status_reason"]
    assert "554" in outcome.report["status_reason"]
    assert outcome.report["status"] == "paused"
    assert outcome.report["failed"] < 40
    assert outcome.report["queued"] == 40 - outcome.report["failed"]
    with pytest.raises(BadInput, match="is paused"):
        await send_campaign(mailer, path, smtp_server)

    smtp_server.clear_faults()
    CampaignService(mailer).set_status("autumn", "resume")
    resumed = await send_campaign(mailer, path, smtp_server)
    assert resumed.report["status"] == "finished"
    assert resumed.report["sent"] == 40 - outcome.report["failed"]
