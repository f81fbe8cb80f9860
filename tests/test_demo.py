"""The quick start works on a fresh machine: `mailer demo` needs no server and shows every case."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from typer.testing import CliRunner

from mailer.cli import app


def test_demo_sends_to_the_consenting_and_explains_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    for _run in range(2):  # a second run starts afresh
        result = CliRunner().invoke(app, ["demo", "--dir", str(folder)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    out = result.stdout
    outbox = sorted((folder / "outbox").glob("*.eml"))
    recipients = sorted(p.name.split("-", 1)[1].removesuffix(".eml") for p in outbox)
    assert recipients == [
        "anna@example.com",
        "bram@example.com",
        "frank@example.com",
        "gert@example.net",
        "joost@example.net",
    ]
    for reason in (
        "never gave marketing consent",
        "withdrew marketing consent",
        "address is on the suppression list",
        "lies outside the attested period",
        "with open and click tracking",
        "clean links: no tracking consent",
    ):
        assert reason in out, reason
    anna = email.message_from_bytes(
        next(p for p in outbox if "anna" in p.name).read_bytes(), policy=email.policy.default
    )
    assert anna["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Voorbeeldstraat 1" in anna.get_body(("plain",)).get_content()  # type: ignore[union-attr]
