"""Bounces in (RFC 3464 delivery status notifications): `mailer inbound process PATH` matches
each to the delivery it is about, by the VERP address or the returned Message-ID; a hard bounce
suppresses, soft bounces count and suppress at the configured limit, and each is an event.
Unknown and malformed mails are reported and moved aside; a re-run changes nothing.

Every test first sends a real campaign through the capture SMTP server and builds its bounces
from the hand-written samples in tests/samples/inbound/ around what arrived there."""

from __future__ import annotations

import asyncio
import json
import mailbox
import os
import re
import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.config import load_settings
from mailer.errors import ConfigError
from mailer.inbound import Action, InboundResult, Outcome, process_message
from mailer.inbound_parse import Kind, classify
from mailer.inbound_smtp import InboundSmtpServer, check_host
from mailer.service import Mailer
from tests.inbound_support import (
    SAMPLES,
    Cli,
    Sent,
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
async def test_hard_bounce_by_verp_suppresses_and_the_next_campaign_skips_the_person(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org", "bert@example.org")
    anna = sent["anna@example.org"]
    box = maildir(tmp_path, sample("dsn-hard-verp.eml", anna))

    run = cli("inbound", "process", str(box))

    assert run.exit_code == 0, run.stderr
    assert f"delivery {anna.delivery_id} (campaign autumn): hard bounce 5.1.1" in run.stdout
    assert "address suppressed" in run.stdout and "1 processed, 0 unmatched" in run.stdout
    assert "anna@example.org" not in run.stdout  # the operator's terminal shows ids
    assert suppression_reasons(cli, "anna@example.org") == ["hard_bounce"]
    assert suppression_reasons(cli, "bert@example.org") == []
    # the mail left new/ for the maildir's .processed folder, byte for byte
    assert mails_in(box) == []
    assert len(mails_in(box / ".processed")) == 1
    (bounced,) = events_of(mailer, "message.bounced")
    assert bounced["delivery_id"] == anna.delivery_id
    assert bounced["email"] == "anna@example.org" and bounced["campaign"] == "autumn"
    assert bounced["kind"] == "hard" and bounced["status"] == "5.1.1"
    assert bounced["diagnostic"].startswith("550 5.1.1 <address>: Recipient address rejected")
    assert "\r" not in bounced["diagnostic"] and "\n" not in bounced["diagnostic"]
    assert "anna@" not in bounced["diagnostic"]
    assert await next_campaign_reaches(mailer, smtp_server, campaign_file, "winter") == {
        "bert@example.org"
    }


@pytest.mark.asyncio
async def test_a_rerun_and_a_second_copy_change_nothing(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    bounce = sample("dsn-hard-verp.eml", sent["anna@example.org"])
    box = maildir(tmp_path, bounce)
    assert cli("inbound", "process", str(box)).exit_code == 0
    before = cli("suppressions", "list", "--json").stdout

    mailbox.Maildir(box).add(bounce)  # the MTA delivers the same bounce again
    again = cli("inbound", "process", str(box))

    assert again.exit_code == 0
    assert "already processed" in again.stdout
    assert cli("suppressions", "list", "--json").stdout == before
    assert len(events_of(mailer, "message.bounced")) == 1
    assert len(mails_in(box / ".processed")) == 2
    # the campaign report counts the bounce once, and still does after the person is erased
    assert json.loads(cli("campaign", "report", "autumn", "--json").stdout)["bounces"] == 1
    assert cli("privacy", "erase", "anna@example.org").exit_code == 0
    assert json.loads(cli("campaign", "report", "autumn", "--json").stdout)["bounces"] == 1


@pytest.mark.asyncio
async def test_bounce_matched_by_the_returned_message_id(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    """A relay that rewrote the envelope sender: only the returned message names the mail."""
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org", "bert@example.org")
    bert = sent["bert@example.org"]
    bounce = sample("dsn-hard-message-id.eml", bert)
    assert bert.verp.encode() not in bounce
    eml = tmp_path / "inbox" / "bounce.eml"
    eml.parent.mkdir()
    eml.write_bytes(bounce)

    run = cli("inbound", "process", str(eml.parent))

    assert run.exit_code == 0, run.stderr
    assert f"delivery {bert.delivery_id}" in run.stdout
    assert suppression_reasons(cli, "bert@example.org") == ["hard_bounce"]
    assert suppression_reasons(cli, "anna@example.org") == []
    assert not eml.exists() and (eml.parent / ".processed" / "bounce.eml").read_bytes() == bounce


# -- soft bounces ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_soft_bounces_suppress_exactly_at_the_limit(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    limit = {"MAILER_SOFT_BOUNCE_LIMIT": "2"}
    first = await send_to(mailer, smtp_server, campaign_file, "anna@example.org", name="autumn")
    box = maildir(tmp_path, sample("dsn-soft-delayed.eml", first["anna@example.org"]))
    one = cli("inbound", "process", str(box), extra_env=limit)
    assert one.exit_code == 0 and "soft bounce 4.2.2 (delayed), 1 of 2" in one.stdout
    assert suppression_reasons(cli, "anna@example.org") == []

    # the same mail's final failure (4.0.0) is the same bounce: still 1 of 2
    mailbox.Maildir(box).add(sample("dsn-failed-4.0.0.eml", first["anna@example.org"]))
    repeat = cli("inbound", "process", str(box), extra_env=limit)
    assert "already counted" in repeat.stdout
    assert suppression_reasons(cli, "anna@example.org") == []

    second = await send_to(
        mailer, smtp_server, campaign_file, "anna@example.org", name="winter", grant_marketing=False
    )
    mailbox.Maildir(box).add(sample("dsn-soft-delayed.eml", second["anna@example.org"]))
    two = cli("inbound", "process", str(box), extra_env=limit)

    assert two.exit_code == 0
    assert "soft bounce 4.2.2, 2 of 2: address suppressed" in two.stdout
    assert suppression_reasons(cli, "anna@example.org") == ["hard_bounce"]
    listed = json.loads(cli("suppressions", "list", "--json").stdout)
    assert [s["source"] for s in listed] == ["soft bounces 2 of 2, last dsn 4.2.2"]
    kinds = [(e["delivery_id"], e["kind"]) for e in events_of(mailer, "message.bounced")]
    first_id, second_id = (
        first["anna@example.org"].delivery_id,
        second["anna@example.org"].delivery_id,
    )
    assert kinds == [(first_id, "soft"), (first_id, "soft"), (second_id, "soft")]
    assert await next_campaign_reaches(mailer, smtp_server, campaign_file, "spring") == set()


def test_the_soft_bounce_limit_is_a_setting(tmp_path: Path) -> None:
    base = {"MAILER_SECRET_KEYS": "k" * 40}
    assert load_settings(base, cwd=tmp_path).soft_bounce_limit == 3
    assert (
        load_settings({**base, "MAILER_SOFT_BOUNCE_LIMIT": "5"}, cwd=tmp_path).soft_bounce_limit
        == 5
    )
    with pytest.raises(ConfigError, match="MAILER_SOFT_BOUNCE_LIMIT must be at least 1"):
        load_settings({**base, "MAILER_SOFT_BOUNCE_LIMIT": "0"}, cwd=tmp_path)


# -- what is not ours -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unknown_forged_and_malformed_mails_are_reported_and_moved_aside(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    anna = sent["anna@example.org"]
    delivery, mac_domain = anna.verp.split("+", 1)[1].split("-", 1)
    forged_verp = f"bounces+{delivery}-{'a' * 16}@{mac_domain.split('@', 1)[1]}"
    forged = sample("dsn-hard-verp.eml", anna, VERP=forged_verp)
    box = maildir(
        tmp_path,
        sample("unrelated.eml"),
        sample("dsn-malformed.eml", anna),
        forged,
        b"\x00\x01 not a mail at all \xff",
    )

    run = cli("inbound", "process", str(box))

    assert run.exit_code == 0, run.stderr
    assert "4 mails: 0 processed, 2 unmatched, 2 failed" in run.stdout
    assert "unknown unmatched: not a delivery report" in run.stdout
    assert "dsn unmatched: no delivery of ours matches" in run.stdout
    assert "malformed failed: malformed: a per-recipient block needs both Action and Status" in (
        run.stdout
    )
    assert "malformed failed: malformed: no mail headers" in run.stdout
    assert len(mails_in(box / ".unmatched")) == 2 and len(mails_in(box / ".failed")) == 2
    assert forged in mails_in(box / ".unmatched")
    assert mails_in(box) == []
    assert suppression_reasons(cli, "anna@example.org") == []
    assert events_of(mailer, "message.bounced") == []


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(p.name for p in SAMPLES.glob("*.eml"))),
    cut=st.integers(min_value=0, max_value=4000),
    noise=st.binary(max_size=64),
)
def test_no_mail_however_broken_stops_the_classifier(name: str, cut: int, noise: bytes) -> None:
    """Cut short anywhere, with junk appended: always a classification, never an exception."""
    other = Sent("a@example.org", "bounces+1-abcdefghijklmnop@x.example", "<m@x>", "u@x", 1)
    raw = sample(name, other)[:cut] + noise
    result = classify(raw)
    assert result.kind in set(Kind)
    assert len(result.message_key) == 64


def test_a_path_that_does_not_exist_is_bad_input(cli: Cli, mailer: Mailer, tmp_path: Path) -> None:
    run = cli("inbound", "process", str(tmp_path / "nowhere"))
    assert run.exit_code == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such file or directory"
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.asyncio
async def test_an_mbox_is_left_as_it_is_and_its_unmatched_mails_are_copied_once(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    path = tmp_path / "bounces.mbox"
    box = mailbox.mbox(path, create=True)
    box.add(sample("dsn-hard-verp.eml", sent["anna@example.org"]))
    box.add(sample("unrelated.eml"))
    box.flush()
    box.close()
    original = path.read_bytes()

    first = cli("inbound", "process", str(path))
    second = cli("inbound", "process", str(path))

    assert first.exit_code == 0 and second.exit_code == 0
    assert "message 1: dsn processed" in first.stdout
    assert (
        "message 2: unknown unmatched" in first.stdout and "bounces.unmatched.mbox" in first.stdout
    )
    assert "message 1: dsn processed: already processed" in second.stdout
    assert path.read_bytes() == original
    aside = mailbox.mbox(tmp_path / "bounces.unmatched.mbox", create=False)
    assert [m["Subject"] for m in aside] == ["Re: Hello - lunch on Friday?"]
    aside.close()
    assert suppression_reasons(cli, "anna@example.org") == ["hard_bounce"]
    assert len(events_of(mailer, "message.bounced")) == 1


@pytest.mark.asyncio
async def test_json_output_for_scripts(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    box = maildir(tmp_path, sample("dsn-hard-verp.eml", sent["anna@example.org"]))
    run = cli("inbound", "process", str(box), "--json")
    assert run.exit_code == 0
    report = json.loads(run.stdout)
    assert report["layout"] == "maildir" and report["counts"] == {"processed": 1}
    (mail,) = report["mails"]
    assert mail["kind"] == "dsn" and mail["action"] == "hard_bounce_suppressed"
    assert mail["delivery_id"] == sent["anna@example.org"].delivery_id
    assert mail["moved_to"] == ".processed/"


# -- over SMTP ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_serve_accepts_bounces_over_smtp_and_keeps_the_unknown_aside(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    anna = sent["anna@example.org"]
    results: list[InboundResult] = []
    aside = tmp_path / "aside"

    def deliver(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("", [anna.verp], sample("dsn-hard-verp.eml", anna))
            client.sendmail(
                "anna@example.org", ["bounces@shop.example.com"], sample("unrelated.eml")
            )

    async with InboundSmtpServer(mailer, port=0, aside=aside, on_result=results.append) as server:
        await asyncio.to_thread(deliver, server.port)

    assert [(r.kind, r.outcome) for r in results] == [
        ("dsn", Outcome.PROCESSED),
        ("unknown", Outcome.UNMATCHED),
    ]
    assert results[0].action is Action.HARD_BOUNCE
    assert suppression_reasons(cli, "anna@example.org") == ["hard_bounce"]
    assert len(mails_in(aside / ".unmatched")) == 1


@pytest.mark.asyncio
async def test_the_serve_command_processes_mail_and_stops_cleanly_on_sigterm(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    cli: Cli,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    sent = await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    anna = sent["anna@example.org"]
    server = subprocess.Popen(
        [sys.executable, "-m", "mailer", "inbound", "serve", "--port", "0", "--aside", "aside"],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        listening = await asyncio.to_thread(server.stdout.readline)
        found = re.search(r"on 127\.0\.0\.1:(\d+);", listening)
        assert found, listening
        port = int(found[1])

        def deliver() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("", [anna.verp], sample("dsn-hard-verp.eml", anna))

        await asyncio.to_thread(deliver)
        processed = await asyncio.to_thread(server.stdout.readline)
        assert "dsn processed: delivery" in processed and "hard bounce 5.1.1" in processed
    finally:
        server.send_signal(signal.SIGTERM)
        rest, errors = server.communicate(timeout=10)
    assert server.returncode == 0, errors
    assert rest.strip() == "Stopped." and errors == ""
    assert suppression_reasons(cli, "anna@example.org") == ["hard_bounce"]


def test_serve_listens_on_loopback_only_unless_asked(cli: Cli, mailer: Mailer) -> None:
    run = cli("inbound", "serve", "--host", "0.0.0.0")
    assert run.exit_code == 2
    assert "not a loopback address" in run.stderr
    check_host("127.0.0.1", allow_remote=False)
    check_host("::1", allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)


@pytest.mark.asyncio
async def test_process_message_reports_a_bounce_it_cannot_match(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    """A bounce of a mail another system sent (a VERP address without our MAC)."""
    await send_to(mailer, smtp_server, campaign_file, "anna@example.org")
    other = Sent("carl@example.org", "bounces+7-abcdefghijklmnop@other.example", "<x@other>", "", 7)
    result = process_message(mailer, sample("dsn-hard-verp.eml", other))
    assert result.outcome is Outcome.UNMATCHED and result.action is Action.NO_DELIVERY
    assert result.delivery_id is None
