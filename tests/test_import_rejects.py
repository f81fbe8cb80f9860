"""Bad rows are rejected with row number and reason; a bad file changes nothing at all."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailer.errors import CsvFileError
from mailer.models import ConsentRecord, Contact, ImportBatch
from mailer.service import Mailer
from tests.conftest import CliResult

HEADER = "email,first_name,locale,consent_purposes,consent_at,consent_source,consent_ip\n"
MIXED = HEADER + (
    "good@example.com,Good,nl,marketing,2026-01-01T00:00:00Z,webform,192.0.2.77\n"  # row 2
    "not an address,Bad,nl,,,,\n"  # row 3
    "partial@example.com,Part,nl,marketing,2026-01-01T00:00:00Z,,\n"  # row 4
    "date@example.com,Date,nl,marketing,last tuesday,webform,\n"  # row 5
    "locale@example.com,Loc,nl-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd,,,,\n"  # row 6 (too long)
    '"inject@example.com","Eve\r\nBcc: all@example.com",nl,,,,\n'  # row 7
    "ip@example.com,Ip,nl,marketing,2026-01-01T00:00:00Z,webform,999.1.1.1\n"  # row 8
    "short@example.com,Short\n"  # row 9
    "=HYPERLINK(evil),Formula,nl,,,,\n"  # row 10
    "plain@example.com,Plain,en,,,,\n"  # row 11
)


def table_counts(mailer: Mailer) -> list[int]:
    with mailer.session() as session:
        return [
            session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Contact, ConsentRecord, ImportBatch)
        ]


def test_each_bad_row_is_rejected_with_its_row_number_and_reason(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    summary = mailer.import_contacts(write_csv(MIXED))
    assert [(r.row_number, r.field, r.reason) for r in summary.rejects] == [
        (3, "email", "invalid_email"),
        (4, "consent_source", "partial_consent"),
        (5, "consent_at", "invalid_date"),
        (6, "locale", "invalid_locale"),
        (7, "first_name", "line_break"),
        (8, "consent_ip", "invalid_ip"),
        (9, "-", "field_count"),
        (10, "email", "invalid_email"),
    ]
    assert summary.rows_read == 10
    assert summary.new == 2
    assert summary.consent_granted == 1
    assert table_counts(mailer) == [2, 1, 1]
    good = mailer.show_contact("good@example.com")
    assert good.history[0].ip_masked == "192.0.2.0"


def test_rejects_file_lists_every_bad_row_safely(
    mailer: Mailer, write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    rejects = tmp_path / "rejects.csv"
    mailer.import_contacts(write_csv(MIXED), rejects=rejects)
    with rejects.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in rows] == [3, 4, 5, 6, 7, 8, 9, 10]
    formula = rows[-1]
    assert formula["email"] == "'=HYPERLINK(evil)"  # a spreadsheet shows it, never runs it


def test_strict_writes_nothing_when_any_row_is_bad(
    mailer: Mailer, write_csv: Callable[..., Path]
) -> None:
    summary = mailer.import_contacts(write_csv(MIXED), strict=True)
    assert not summary.written
    assert summary.rejected_total == 8
    assert table_counts(mailer) == [0, 0, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("name,first_name\nx,y\n", "no 'email' column"),
        ("email,,name\na@example.com,,x\n", "column 2 has no name"),
        ("email,name,Email\na@example.com,x,y\n", "twice"),
        ('email,name\n"a@example.com,x\n', "malformed CSV"),
    ],
)
def test_file_level_problems_are_one_clear_error(
    mailer: Mailer, write_csv: Callable[..., Path], content: str, message: str
) -> None:
    with pytest.raises(CsvFileError, match=message):
        mailer.import_contacts(write_csv(content))
    assert table_counts(mailer) == [0, 0, 0]


def test_bad_encoding_deep_in_a_large_file_rolls_back_everything(
    mailer: Mailer, tmp_path: Path
) -> None:
    path = tmp_path / "big.csv"
    good = "".join(
        f"user{i}@example.com,marketing,2026-01-01T00:00:00Z,webform\n" for i in range(5000)
    )
    path.write_bytes(
        b"email,consent_purposes,consent_at,consent_source\n"
        + good.encode()
        + "caf\u00e9@example.com,,,\n".encode("latin-1")
    )
    with pytest.raises(CsvFileError, match="not UTF-8"):
        mailer.import_contacts(path)
    assert table_counts(mailer) == [0, 0, 0]


def test_missing_file_is_a_clear_error(mailer: Mailer, tmp_path: Path) -> None:
    with pytest.raises(CsvFileError, match="cannot read file"):
        mailer.import_contacts(tmp_path / "nope.csv")


def test_cli_exit_codes_and_summary(
    cli: Callable[..., CliResult], write_csv: Callable[..., Path], tmp_path: Path
) -> None:
    assert cli("init").exit_code == 0
    clean = write_csv(HEADER + "a@example.com,A,nl,marketing,2026-01-01T00:00:00Z,webform,\n")
    result = cli("contacts", "import", str(clean))
    assert result.exit_code == 0
    assert "new contacts" in result.stdout

    result = cli("contacts", "import", str(write_csv(MIXED)), "--rejects", str(tmp_path / "r.csv"))
    assert result.exit_code == 1
    assert "row 3: email: invalid email" in result.stdout
    assert (tmp_path / "r.csv").exists()

    result = cli("contacts", "import", str(write_csv(MIXED)), "--strict")
    assert result.exit_code == 2
    assert "nothing was written" in result.stdout

    result = cli("contacts", "import", str(write_csv("name\nx\n")))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "no 'email' column" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = cli("contacts", "import", str(tmp_path / "missing.csv"))
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr


def test_commands_refuse_an_uninitialised_database(
    cli: Callable[..., CliResult], write_csv: Callable[..., Path]
) -> None:
    result = cli("contacts", "import", str(write_csv(MIXED)))
    assert result.exit_code == 2
    assert "mailer init" in result.stderr
