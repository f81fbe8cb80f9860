"""Unsubscribing by mail (RFC 2369): a mail to the `mailto:` address of a message's
List-Unsubscribe header unsubscribes the person its signed token names, exactly as the
one-click link does (method `mailto`), once; a forged or tampered token does nothing and is
reported. The mails are sent to the address that arrived in a real campaign."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from mailer.inbound import Action, InboundResult, Outcome
from mailer.inbound_smtp import InboundSmtpServer
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
async def test_a_mail_to_the_unsubscribe_address_unsubscribes_the_person_once(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org", "bert@example.org")
    anna = sent["anna@example.org"]
    assert anna.unsubscribe.startswith("unsubscribe+")
    mail = sample("mailto-unsubscribe.eml", anna)
    box = maildir(tmp_path, mail)

    run = cli("inbound", "process", str(box))

    assert run.exit_code == 0, run.stderr
    assert f"delivery {anna.delivery_id} (campaign autumn): unsubscribed by mail" in run.stdout
    assert "withdrew marketing, address suppressed" in run.stdout
    shown = contact_json(cli, "anna@example.org")
    assert shown["consent"]["marketing"]["status"] == "withdrawn"
    (withdrawal,) = [r for r in shown["history"] if r["status"] == "withdrawn"]
    assert withdrawal["method"] == "mailto"
    assert withdrawal["evidence"].endswith(f":delivery:{anna.delivery_id}")
    assert suppression_reasons(cli, "anna@example.org") == ["unsubscribed"]
    assert suppression_reasons(cli, "bert@example.org") == []
    report = json.loads(cli("campaign", "report", "autumn", "--json").stdout)
    assert report["unsubscribes"] == 1
    (event,) = events_of(mailer, "contact.unsubscribed")
    assert event["method"] == "mailto" and event["delivery_id"] == anna.delivery_id
    assert event["campaign"] == "autumn"
    assert len(mails_in(box / ".processed")) == 1
    assert await next_campaign_reaches(mailer, smtp_server, campaign_file, "winter") == {
        "bert@example.org"
    }

    # the mail client sends it twice, or the run is repeated: nothing happens twice
    mail_again = sample("mailto-unsubscribe.eml", anna)  # another Message-ID, same token
    box_again = maildir(tmp_path / "again", mail, mail_again)
    again = cli("inbound", "process", str(box_again))
    assert again.exit_code == 0, again.stderr
    assert "already processed" in again.stdout
    assert "consent was withdrawn already, address was suppressed already" in again.stdout
    history = contact_json(cli, "anna@example.org")["history"]
    assert len([r for r in history if r["status"] == "withdrawn"]) == 1
    assert len(events_of(mailer, "contact.unsubscribed")) == 1


@pytest.mark.asyncio
async def test_a_forged_token_does_nothing_and_is_reported(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    anna = sent["anna@example.org"]
    local, domain = anna.unsubscribe.rsplit("@", 1)
    tampered = local[:-1] + ("A" if local[-1] != "A" else "B") + "@" + domain
    payload, signature = local[len("unsubscribe+") :].split(".", 1)
    # another delivery id (base 36) under anna's signature: the signature covers the id
    other_delivery = f"unsubscribe+{payload}0.{signature}@{domain}"
    box = maildir(
        tmp_path,
        sample("mailto-unsubscribe.eml", anna, UNSUBSCRIBE=tampered),
        sample("mailto-unsubscribe.eml", anna, UNSUBSCRIBE=other_delivery),
    )
    before = contact_json(cli, "anna@example.org")

    run = cli("inbound", "process", str(box))

    assert run.exit_code == 0
    assert run.stdout.count("invalid or forged token: nothing done") == 2
    assert "2 mails: 0 processed, 2 unmatched" in run.stdout
    assert local not in run.stdout  # the token is a capability: never printed
    assert contact_json(cli, "anna@example.org") == before
    assert events_of(mailer, "contact.unsubscribed") == []
    assert len(mails_in(box / ".unmatched")) == 2


@pytest.mark.asyncio
async def test_over_smtp_the_envelope_recipient_carries_the_token(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
) -> None:
    """The MTA hands the mail on with the unsubscribe address only in RCPT TO (the To header
    names a list alias)."""
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    anna = sent["anna@example.org"]
    mail = sample("mailto-unsubscribe.eml", anna, UNSUBSCRIBE="<news@shop.example.com>")
    results: list[InboundResult] = []

    def deliver(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("anna@example.org", [anna.unsubscribe], mail)

    async with InboundSmtpServer(mailer, port=0, on_result=results.append) as server:
        await asyncio.to_thread(deliver, server.port)

    (result,) = results
    assert (result.outcome, result.action) == (Outcome.PROCESSED, Action.UNSUBSCRIBED)
    assert suppression_reasons(cli, "anna@example.org") == ["unsubscribed"]
