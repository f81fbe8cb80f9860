"""Complaints in (RFC 5965 abuse feedback reports): a complaint about a delivery withdraws the
person's marketing consent and suppresses them, once, with a `message.complained` event; a
`not-spam` report changes nothing. Built around a real campaign sent through the capture
SMTP server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import select

from mailer.models import Campaign
from mailer.service import Mailer
from tests.inbound_support import (
    Cli,
    contact_json,
    events_of,
    maildir,
    mails_in,
    next_campaign_reaches,
    sample,
    send_to,
    suppression_reasons,
)
from tests.smtp_server import CaptureServer


@pytest.mark.asyncio
async def test_an_abuse_report_withdraws_consent_and_suppresses_the_person(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org", "bert@example.org")
    anna = sent["anna@example.org"]
    report = sample("arf-abuse.eml", anna)
    box = maildir(tmp_path, report)

    run = cli("inbound", "process", str(box))

    assert run.exit_code == 0, run.stderr
    assert f"delivery {anna.delivery_id} (campaign autumn): abuse complaint" in run.stdout
    assert "withdrew marketing, address suppressed" in run.stdout
    shown = contact_json(cli, "anna@example.org")
    assert shown["consent"]["marketing"]["status"] == "withdrawn"
    (withdrawal,) = [r for r in shown["history"] if r["status"] == "withdrawn"]
    assert withdrawal["method"] == "complaint"
    assert withdrawal["evidence"] == f"campaign:{_campaign_id(mailer)}:delivery:{anna.delivery_id}"
    assert suppression_reasons(cli, "anna@example.org") == ["complaint"]
    assert contact_json(cli, "bert@example.org")["consent"]["marketing"]["status"] == "granted"
    (complained,) = events_of(mailer, "message.complained")
    assert complained == {
        "delivery_id": anna.delivery_id,
        "campaign_id": _campaign_id(mailer),
        "campaign": "autumn",
        "contact_id": shown_id(mailer, "anna@example.org"),
        "email": "anna@example.org",
        "feedback_type": "abuse",
    }
    assert len(mails_in(box / ".processed")) == 1
    assert await next_campaign_reaches(mailer, smtp_server, campaign_file, "winter") == {
        "bert@example.org"
    }

    # the same report again (a second copy from the feedback loop): nothing twice
    box_again = maildir(tmp_path / "again", report)
    again = cli("inbound", "process", str(box_again))
    assert again.exit_code == 0 and "already processed" in again.stdout
    history = contact_json(cli, "anna@example.org")["history"]
    assert [r["method"] for r in history if r["status"] == "withdrawn"] == ["complaint"]
    assert len(events_of(mailer, "message.complained")) == 1


@pytest.mark.asyncio
async def test_a_complaint_is_matched_by_message_id_when_the_return_path_was_rewritten(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org", "bert@example.org")
    bert = sent["bert@example.org"]
    report = sample("arf-message-id.eml", bert)
    assert bert.verp.encode() not in report
    path = tmp_path / "complaint.eml"
    path.write_bytes(report)

    run = cli("inbound", "process", str(path))

    assert run.exit_code == 0, run.stderr
    assert f"delivery {bert.delivery_id}" in run.stdout
    assert suppression_reasons(cli, "bert@example.org") == ["complaint"]
    assert suppression_reasons(cli, "anna@example.org") == []
    assert (tmp_path / ".processed" / "complaint.eml").read_bytes() == report


@pytest.mark.asyncio
async def test_a_not_spam_report_changes_nothing(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    before = contact_json(cli, "anna@example.org")
    box = maildir(tmp_path, sample("arf-not-spam.eml", sent["anna@example.org"]))

    run = cli("inbound", "process", str(box))

    assert run.exit_code == 0
    assert "not-spam report: no action" in run.stdout
    assert contact_json(cli, "anna@example.org") == before
    assert events_of(mailer, "message.complained") == []


@pytest.mark.asyncio
async def test_a_complaint_about_someone_elses_mail_is_set_aside(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    """RFC 5965's own example: spam from somebody else, nothing of ours in it."""
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    anna = sent["anna@example.org"]
    report = sample(
        "arf-abuse.eml",
        anna,
        VERP="somespammer@example.net",
        MESSAGE_ID="<8787KJKJ3K4J3K4J3K4J3.mail@example.net>",
    )
    box = maildir(tmp_path, report)

    run = cli("inbound", "process", str(box), "--json")

    assert run.exit_code == 0
    (mail,) = json.loads(run.stdout)["mails"]
    assert (mail["kind"], mail["outcome"], mail["action"]) == ("arf", "unmatched", "no_delivery")
    assert mails_in(box / ".unmatched") == [report]
    assert suppression_reasons(cli, "anna@example.org") == []


def _campaign_id(mailer: Mailer) -> int:
    with mailer.session() as session:
        campaign = session.exec(select(Campaign).where(Campaign.name == "autumn")).one()
        assert campaign.id is not None
        return campaign.id


def shown_id(mailer: Mailer, address: str) -> int:
    contact_id = mailer.show_contact(address).contact.id
    assert contact_id is not None
    return contact_id
