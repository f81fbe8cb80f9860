"""`mailer demo`: the quick start on the embedded default, nothing to set up.

A fresh SQLite database in a demo folder, the example contacts in every consent state (first-party
import, an operator withdrawal, a suppression, a vendor list with its attestation), and a table of
who may be mailed for marketing and, for everyone else, why not.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mailer import queries
from mailer.config import load_settings
from mailer.imports import ImportSummary
from mailer.models import ConsentStatus, SuppressionReason
from mailer.service import Mailer

EXAMPLE_FILES = ("contacts.csv", "vendor-list.csv", "vendor-attestation.toml")
DEMO_DB = "demo.db"
REASON_TEXT = {
    "no_consent": "never gave marketing consent",
    "withdrawn": "withdrew marketing consent",
    "unconfirmed": "has not confirmed the double opt-in",
    "suppressed": "address is on the suppression list",
}


def _fresh_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in (DEMO_DB, DEMO_DB + "-wal", DEMO_DB + "-shm", DEMO_DB + ".keys", "rejects.csv"):
        (folder / name).unlink(missing_ok=True)
    examples = resources.files("mailer") / "examples"
    for name in EXAMPLE_FILES:
        with resources.as_file(examples / name) as source:
            shutil.copyfile(source, folder / name)


def _import_line(console: Console, label: str, summary: ImportSummary) -> None:
    ignored = sum(summary.consent_ignored.values())
    console.print(
        f"  {label}: {summary.rows_read} rows, {summary.new} new, {summary.merged} merged, "
        f"{summary.duplicates} repeated, {summary.consent_granted} consents granted, "
        f"{ignored} ignored, {summary.rejected_total} rejected",
        markup=False,
    )
    for reason, count in sorted(summary.consent_ignored.items()):
        console.print(f"    consent ignored ({reason.replace('_', ' ')}): {count}", markup=False)
    for reject in summary.rejects:
        console.print(f"    row {reject.row_number} rejected: {reject.message}", markup=False)


def run_demo(folder: Path, console: Console) -> None:
    folder = folder.resolve()
    _fresh_folder(folder)
    url = f"sqlite:///{folder / DEMO_DB}"
    mailer = Mailer(load_settings({"MAILER_OPERATOR": "demo"}, database_url=url, cwd=folder))
    try:
        console.print(f"[bold]mailer demo[/bold] in {folder}")
        result = mailer.init()
        console.print(f"  created the database {folder / DEMO_DB} (schema {result.revision_after})")

        first_party = mailer.import_contacts(
            folder / "contacts.csv", rejects=folder / "rejects.csv"
        )
        _import_line(console, "contacts.csv (first party)", first_party)

        mailer.suppress(
            "eva@example.com", SuppressionReason.HARD_BOUNCE, "mailbox no longer exists"
        )
        console.print("  eva@example.com suppressed: hard bounce")
        mailer.record_consent(
            "dana@example.com",
            "marketing",
            ConsentStatus.WITHDRAWN,
            source="phone",
            note="called the office: no more newsletters",
        )
        console.print("  dana@example.com withdrew marketing consent by phone")

        vendor = mailer.import_contacts(
            folder / "vendor-list.csv",
            vendor="Leadbureau Midden BV",
            attestation=folder / "vendor-attestation.toml",
        )
        _import_line(console, "vendor-list.csv (bought, with attestation)", vendor)

        table = Table(title="Who may receive a marketing campaign, and why not")
        table.add_column("contact")
        table.add_column("marketing")
        table.add_column("why")
        with mailer.session() as session:
            rows = (
                session.connection()
                .execute(queries.eligibility("marketing", mailer.settings.require_double_opt_in))
                .all()
            )
        for _id, email, reason, _tracking in rows:
            if reason is None:
                table.add_row(email, "[green]yes[/green]", "consent on record")
            else:
                table.add_row(email, "[red]no[/red]", REASON_TEXT.get(reason, reason))
        console.print(table)
        db = f"--db sqlite:///{folder / DEMO_DB}"
        console.print("Look closer:")
        console.print(f"  mailer {db} contacts show dana@example.com", markup=False)
        console.print(f"  mailer {db} vendors list", markup=False)
        console.print(f"  mailer {db} suppressions list", markup=False)
    finally:
        mailer.close()
