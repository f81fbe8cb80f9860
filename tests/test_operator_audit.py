"""Every CLI action that changes consent, suppressions, contacts, attestations or policy is in the
audit log with its operator and time; the log names people only by keyed hash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailer.addresses import address_hash
from mailer.service import Mailer
from tests.conftest import CliResult
from tests.test_vendor_attestation import LIST, attestation_file


def entries(cli: Callable[..., CliResult], *args: str) -> list[dict[str, Any]]:
    result = cli("audit", "--json", "--limit", "1000", *args)
    assert result.exit_code == 0, result.stderr
    listed: list[dict[str, Any]] = json.loads(result.stdout)
    return listed


def test_every_changing_command_is_audited(
    mailer: Mailer,
    cli: Callable[..., CliResult],
    write_csv: Callable[..., Path],
    tmp_path: Path,
) -> None:
    ann = "ann.smit@example.org"
    steps = [
        ("consent", "grant", ann, "--purpose", "marketing", "--source", "phone"),
        ("consent", "withdraw", ann, "--purpose", "marketing", "--source", "letter"),
        ("suppress", ann, "--reason", "manual"),
        ("contacts", "import", str(write_csv("email,name\nann.smit@example.org,Ann Smit\n"))),
        (
            "contacts",
            "import",
            str(write_csv(LIST)),
            "--vendor",
            "Leads BV",
            "--attestation",
            str(attestation_file(tmp_path)),
        ),
        ("vendors", "revoke", "1", "--reason", "no proof"),
        ("privacy", "request", ann, "--kind", "correction", "--verified"),
        ("privacy", "correct", ann, "--set", "name=Ann de Smit-Verhoeven"),
        ("privacy", "export", ann, "--out", str(tmp_path / "ann.json")),
        ("policy", "publish", "2026-07", "--effective", "2026-07-01"),
        ("privacy", "erase", ann),
    ]
    for step in steps:
        result = cli(*step)
        assert result.exit_code in (0, 1), (step, result.stdout, result.stderr)
    listed = entries(cli)
    assert [e["action"] for e in reversed(listed)] == [
        "consent.granted",
        "consent.withdrawn",
        "suppression.add",
        "contacts.import",
        "contacts.import",
        "attestation.revoke",
        "privacy.request",
        "privacy.correct",
        "privacy.export",
        "policy.publish",
        "privacy.erase",
    ]
    assert {e["operator"] for e in listed} == {"tester"}
    hashed = address_hash(ann, mailer.settings.suppression_key)
    about_ann = [e for e in listed if e["subject"] == hashed]
    assert len(about_ann) == 7
    correct = next(e for e in listed if e["action"] == "privacy.correct")
    assert correct["details"]["fields"] == ["name"]
    assert next(e for e in listed if e["action"] == "contacts.import")["subject"] == "import:2"
    assert next(e for e in listed if e["action"] == "attestation.revoke")["details"] == {
        "reason": "no proof"
    }
    # the log names nobody: no address, no old or new name, after all of that
    dump = json.dumps(listed).lower()
    for needle in ("ann.smit", "smit-verhoeven", "ann smit", "example.org"):
        assert needle not in dump


def test_listing_filters_and_the_login_name_fallback(
    mailer: Mailer, cli: Callable[..., CliResult]
) -> None:
    for who in ("a@example.org", "b@example.org", "c@example.org"):
        cli("consent", "grant", who, "--purpose", "marketing", "--source", "phone")
    cli(
        "suppress",
        "b@example.org",
        extra_env={"MAILER_OPERATOR": None, "USER": "alice"},  # type: ignore[dict-item]
    )
    newest = entries(cli)[0]
    assert (newest["action"], newest["operator"]) == ("suppression.add", "alice")
    assert len(entries(cli, "--limit", "2")) == 2
    about_b = entries(cli, "--email", "B@Example.org")
    assert [e["action"] for e in about_b] == ["suppression.add", "consent.granted"]
    assert [e["action"] for e in entries(cli, "--action", "consent.")] == ["consent.granted"] * 3
    table = cli("audit")
    assert table.exit_code == 0
    assert "suppression.add" in table.stdout and "alice" in table.stdout
    assert cli("audit", "--limit", "0").exit_code == 2
