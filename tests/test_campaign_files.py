"""Campaign files are checked before anything is queued; preview and dry run change nothing;
template injection and header injection send nothing."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.errors import BadInput
from mailer.models import Campaign, ConsentStatus, Delivery
from mailer.service import CampaignService, Mailer
from tests.conftest import CliResult
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign


def nothing_queued(mailer: Mailer) -> bool:
    with mailer.session() as session:
        counts = [
            session.scalar(select(func.count()).select_from(model))
            for model in (Campaign, Delivery)
        ]
    return counts == [0, 0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"extra": 'colour = "red"\n'}, "colour: unknown key"),
        ({"sender": "not an address"}, "from: invalid address"),
        ({"html": "<p>{% if contact.first_name %}unclosed</p>"}, "line 1"),
        ({"extra": 'purpose = "Marketing Mail"\n'}, "purpose"),
        (
            {"extra": 'text_template = "missing.txt"\n'},
            "text_template: template 'missing.txt' not found",
        ),
        ({"name": "Not A Slug"}, "name: must be a slug"),
    ],
)
def test_bad_campaign_files_are_refused_before_anything_is_queued(
    mailer: Mailer, campaign_file: Callable[..., Path], changes: dict[str, str], message: str
) -> None:
    path = campaign_file(**changes)
    with pytest.raises(BadInput, match=message):
        CampaignService(mailer).prepare(path)
    assert nothing_queued(mailer)


def test_missing_template_and_unknown_file(
    mailer: Mailer, campaign_file: Callable[..., Path]
) -> None:
    path = campaign_file()
    path.with_name("autumn.html").unlink()
    with pytest.raises(BadInput, match=r"template: template 'autumn\.html' not found"):
        CampaignService(mailer).prepare(path)
    with pytest.raises(BadInput, match="campaign file not found"):
        CampaignService(mailer).prepare(path.with_name("nope.toml"))


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ contact|attr('__class__') }}",
        "{{ contact.__dict__ }}",
    ],
)
@pytest.mark.asyncio
async def test_template_injection_sends_nothing(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    payload: str,
) -> None:
    mailer.record_consent("a@example.org", "marketing", ConsentStatus.GRANTED, source="webform")
    path = campaign_file(html=f"<p>Hi {payload}</p>")
    with pytest.raises(BadInput):
        await send_campaign(mailer, path, smtp_server)
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    "changes",
    [
        {"subject": "Hi\\r\\nBcc: everyone@example.org"},
        {"sender": "Shop\\r\\nBcc: x@example.org <news@shop.example.com>"},
        {"extra": 'reply_to = "a@example.org\\nBcc: b@example.org"\n'},
    ],
)
@pytest.mark.asyncio
async def test_header_injection_in_the_campaign_sends_nothing(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    changes: dict[str, str],
) -> None:
    mailer.record_consent("a@example.org", "marketing", ConsentStatus.GRANTED, source="webform")
    with pytest.raises(BadInput, match=r"line break|injection"):
        await send_campaign(mailer, campaign_file(**changes), smtp_server)
    assert smtp_server.messages == []
    assert nothing_queued(mailer)


@pytest.mark.asyncio
async def test_injection_through_contact_data_in_the_subject_fails_that_message_only(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    mailer.record_consent("a@example.org", "marketing", ConsentStatus.GRANTED, source="webform")
    mailer.record_consent("b@example.org", "marketing", ConsentStatus.GRANTED, source="webform")
    with mailer.session() as session:
        from mailer.contacts import get_by_email

        contact = get_by_email(session, "b@example.org")
        assert contact is not None
        contact.attributes = {"code": "X\r\nBcc: all@example.org"}
        session.add(contact)
    path = campaign_file(subject="Your code {{ contact.attributes.code | default('none') }}")
    outcome = await send_campaign(mailer, path, smtp_server)
    assert [m.recipients for m in smtp_server.messages] == [("a@example.org",)]
    assert outcome.report["failed"] == 1
    assert b"Bcc" not in smtp_server.messages[0].data


def test_preview_writes_the_message_or_says_why_none(
    cli: Callable[..., CliResult], campaign_file: Callable[..., Path], tmp_path: Path
) -> None:
    assert cli("init").exit_code == 0
    path = campaign_file()
    cli("consent", "grant", "ann@example.org", "--purpose", "marketing", "--source", "phone")
    cli("consent", "grant", "bob@example.org", "--purpose", "marketing", "--source", "phone")
    cli("consent", "withdraw", "bob@example.org", "--purpose", "marketing", "--source", "phone")

    out = tmp_path / "ann.eml"
    result = cli("campaign", "preview", str(path), "--to", "Ann@example.org", "--out", str(out))
    assert result.exit_code == 0, result.stdout + result.stderr
    message = email.message_from_bytes(out.read_bytes(), policy=email.policy.default)
    assert message["To"] == "ann@example.org"
    assert message["Subject"] == "Hello friend"
    assert "List-Unsubscribe" in message

    result = cli("campaign", "preview", str(path), "--to", "bob@example.org")
    assert result.exit_code == 1
    assert "would not receive this campaign: withdrawn" in result.stdout

    result = cli("campaign", "preview", str(path), "--to", "nobody@example.org")
    assert result.exit_code == 1
    assert "no contact" in result.stderr


def test_dry_run_renders_everything_and_changes_nothing(
    cli: Callable[..., CliResult], mailer: Mailer, campaign_file: Callable[..., Path]
) -> None:
    for i in range(7):
        mailer.record_consent(f"u{i}@example.org", "marketing", ConsentStatus.GRANTED, source="x")
    mailer.record_consent("u1@example.org", "tracking", ConsentStatus.GRANTED, source="x")
    mailer.record_consent("u2@example.org", "marketing", ConsentStatus.WITHDRAWN, source="x")
    result = cli("campaign", "send", str(campaign_file()), "--dry-run")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "would be sent" in result.stdout
    lines = {
        line.strip("│ ").split("│")[0].strip(): line.rsplit("│", 2)[-2].strip()
        for line in result.stdout.splitlines()
        if line.count("│") >= 3
    }
    assert lines["would be sent"] == "6"
    assert lines["of which with tracking"] == "1"
    assert lines["excluded: withdrawn"] == "1"
    assert nothing_queued(mailer)
