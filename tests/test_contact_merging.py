"""One contact per address however it is written; imports merge into it and record its source."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mailer.addresses import normalise_address
from mailer.errors import InvalidAddress
from mailer.service import Mailer
from tests.conftest import CliResult


@pytest.mark.parametrize(
    "written",
    ["Frank@Example.com", "FRANK@EXAMPLE.COM", " frank@example.com ", "frank@EXAMPLE.com"],
)
def test_case_and_spacing_variants_are_one_identity(written: str) -> None:
    assert normalise_address(written) == "frank@example.com"


def test_internationalised_domains_are_normalised() -> None:
    assert normalise_address("Jan@Bücher.Example") == "jan@bücher.example"


@pytest.mark.parametrize(
    "bad", ["", "no-at-sign", "a@b", "a@@example.com", "a@example.com\r\nBcc: b@example.com"]
)
def test_invalid_addresses_are_refused(bad: str) -> None:
    with pytest.raises(InvalidAddress):
        normalise_address(bad)


def test_case_variants_in_and_across_imports_merge(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    first = mailer.import_contacts(
        write_csv(
            "email,first_name,last_name,tags,city\n"
            "Frank@Example.com,Frank,,klant,Utrecht\n"
            "frank@example.com,,de Boer,nieuwsbrief,\n"
        )
    )
    assert (first.new, first.duplicates) == (1, 1)

    second = mailer.import_contacts(
        write_csv(
            "email,first_name,locale,tags,city,shoe_size\n"
            "FRANK@EXAMPLE.COM,,nl-nl,klant;vip,Zeist,44\n"
        )
    )
    assert (second.new, second.merged) == (0, 1)

    view = mailer.show_contact("frank@EXAMPLE.com")
    contact = view.contact
    assert contact.email == "frank@example.com"
    assert (contact.first_name, contact.last_name, contact.locale) == ("Frank", "de Boer", "nl-NL")
    assert contact.attributes == {"city": "Zeist", "shoe_size": "44"}
    assert view.tags == ["klant", "nieuwsbrief", "vip"]
    assert [row for _batch, row in view.sources] == [2, 2]


def test_contacts_show_prints_history(
    cli: Callable[..., CliResult], write_csv: Callable[..., Path]
) -> None:
    assert cli("init").exit_code == 0
    path = write_csv(
        "email,first_name,consent_purposes,consent_at,consent_source,consent_policy_version\n"
        "ann@example.com,Ann,marketing;tracking,2026-02-01T10:00:00+01:00,webform,2026-01\n"
    )
    assert cli("contacts", "import", str(path)).exit_code == 0
    assert (
        cli(
            "consent",
            "withdraw",
            "ann@example.com",
            "--purpose",
            "tracking",
            "--source",
            "privacy-mail",
            "--note",
            "asked by mail",
        ).exit_code
        == 0
    )
    shown = cli("contacts", "show", "ANN@example.com")
    assert shown.exit_code == 0
    assert "ann@example.com" in shown.stdout
    assert "withdrawn" in shown.stdout

    data = json.loads(cli("contacts", "show", "ann@example.com", "--json").stdout)
    assert data["consent"]["marketing"]["status"] == "granted"
    assert data["consent"]["tracking"]["status"] == "withdrawn"
    assert [(h["purpose"], h["status"], h["method"]) for h in data["history"]] == [
        ("marketing", "granted", "import"),
        ("tracking", "granted", "import"),
        ("tracking", "withdrawn", "operator"),
    ]
    assert data["history"][0]["consent_at"] == "2026-02-01 09:00:00Z"
    assert data["history"][0]["policy_version"] == "2026-01"
    assert data["history"][2]["note"] == "asked by mail"

    missing = cli("contacts", "show", "nobody@example.com")
    assert missing.exit_code == 1
    assert "no contact" in missing.stderr
