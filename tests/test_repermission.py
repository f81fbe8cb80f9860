"""Re-permission reaches exactly the contacts whose consent predates the campaign's policy
version; their confirmation (a POST, as a double opt-in) lets the campaign reach them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from mailer.service import Mailer
from tests.conftest import CliResult
from tests.recipient_support import app_for, client_for, confirm_path
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

HEADER = "email,consent_purposes,consent_at,consent_source,consent_policy_version\n"


def test_repermission_reaches_exactly_the_outdated_and_their_yes_counts(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    write_csv: Callable[..., Path],
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
) -> None:
    mailer.import_contacts(
        write_csv(
            HEADER
            + "old@example.org,marketing,2025-03-01T00:00:00Z,webform,2025-01\n"
            + "older@example.org,marketing,2024-03-01T00:00:00Z,webform,\n"
            + "current@example.org,marketing,2026-03-01T00:00:00Z,webform,2026-01\n"
            + "gone@example.org,marketing,2025-03-01T00:00:00Z,webform,2025-01\n"
            + "never@example.org,,,,\n"
        )
    )
    cli("suppress", "gone@example.org", "--reason", "unsubscribed")
    path = campaign_file(extra='min_policy_version = "2026-01"\n')

    asked = cli("campaign", "send", str(path), "--repermission", "--smtp", smtp_server.url)
    assert asked.exit_code == 0, asked.stdout + asked.stderr
    assert "asked 2 contacts" in asked.stdout
    assert sorted(r for m in smtp_server.messages for r in m.recipients) == [
        "old@example.org",
        "older@example.org",
    ]
    # asking again within the interval sends nothing new
    again = cli("campaign", "send", str(path), "--repermission", "--smtp", smtp_server.url)
    assert "asked 0 contacts" in again.stdout and "2 were asked recently" in again.stdout

    old_mail = next(m for m in smtp_server.messages if m.recipients == ("old@example.org",))

    async def follow_link() -> None:
        async with client_for(app_for(mailer)) as http:
            link = confirm_path(old_mail.data)
            assert (await http.get(link)).status_code == 200  # a scanner's GET changes nothing
            assert mailer.show_contact("old@example.org").states["marketing"].status == "granted"
            confirmed = await http.post(link)
            assert confirmed.status_code == 200

    asyncio.run(follow_link())
    smtp_server.clear()
    outcome = asyncio.run(send_campaign(mailer, path, smtp_server))
    assert sorted(r for m in smtp_server.messages for r in m.recipients) == [
        "current@example.org",
        "old@example.org",
    ]
    assert outcome.report["excluded"] == {
        "policy_outdated": 1,
        "suppressed": 1,
        "no_consent": 1,
    }
