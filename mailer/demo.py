"""`mailer demo`: the quick start on the embedded default, nothing to set up.

A fresh SQLite database in a demo folder, the example contacts in every consent state (first-party
import, an operator withdrawal, a suppression, a vendor list with its attestation), and a table of
who may be mailed for marketing and, for everyone else, why not.
"""

from __future__ import annotations

import asyncio
import shutil
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from mailer import queries
from mailer.capture import CaptureSmtpServer
from mailer.config import load_settings
from mailer.errors import BadInput
from mailer.imports import ImportSummary
from mailer.models import ConsentStatus, Contact, Delivery, SuppressionReason
from mailer.service import CampaignService, Mailer, SendOutcome
from mailer.transport import SmtpPool

EXAMPLE_FILES = ("contacts.csv", "vendor-list.csv", "vendor-attestation.toml")
DEMO_DB = "demo.db"
EXAMPLE_CAMPAIGN = "autumn-maintenance.toml"
DEMO_ENV = {
    "MAILER_OPERATOR": "demo",
    "MAILER_SENDER_NAME": "Actief Klussenservice",
    "MAILER_POSTAL_ADDRESS": "Voorbeeldstraat 1, 3511 AA Utrecht",
}
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


def _copy_example_campaign(folder: Path) -> Path:
    """The example campaign lives in the checkout's campaigns/ folder; the demo sends a copy."""
    source = Path(__file__).resolve().parent.parent / "campaigns"
    toml = source / EXAMPLE_CAMPAIGN
    if not toml.exists():
        raise BadInput(f"the example campaign {toml} is missing: run the demo from a checkout")
    target = folder / "campaigns"
    target.mkdir(exist_ok=True)
    for file in source.glob(toml.stem + ".*"):
        shutil.copyfile(file, target / file.name)
    return target / EXAMPLE_CAMPAIGN


async def _send_to_capture(mailer: Mailer, campaign: Path, outbox: Path) -> SendOutcome:
    shutil.rmtree(outbox, ignore_errors=True)
    async with CaptureSmtpServer(outbox) as server, SmtpPool(server.url, size=2) as pool:
        return await CampaignService(mailer).send(campaign, transport=pool)


def _who_was_mailed(
    console: Console, mailer: Mailer, campaign_id: int, rejected: list[ImportSummary]
) -> None:
    table = Table(title="Who received the campaign, and why the others did not")
    table.add_column("contact")
    table.add_column("mailed")
    table.add_column("why")
    with mailer.session() as session:
        conn = session.connection()
        gate = {
            row.email: (row.excluded_reason, row.tracking_allowed)
            for row in conn.execute(
                queries.eligibility("marketing", mailer.settings.require_double_opt_in)
            )
        }
        delivered = {
            email: (status, tracking)
            for email, status, tracking in conn.execute(
                select(Contact.email, Delivery.status, Delivery.tracking)  # type: ignore[call-overload]
                .join(Delivery, Delivery.contact_id == Contact.id)
                .where(Delivery.campaign_id == campaign_id)
            )
        }
    for email, (reason, _tracking) in gate.items():
        if email in delivered:
            status, tracking = delivered[email]
            how = "with open and click tracking" if tracking else "clean links: no tracking consent"
            table.add_row(email, f"[green]{status}[/green]", f"marketing consent; {how}")
        else:
            table.add_row(email, "[red]no[/red]", REASON_TEXT.get(reason or "", reason or ""))
    for summary in rejected:
        for reject in summary.rejects:
            if reject.email and reject.email not in gate:
                table.add_row(reject.email, "[red]no[/red]", f"not imported: {reject.message}")
    console.print(table)


def run_demo(folder: Path, console: Console) -> None:
    folder = folder.resolve()
    _fresh_folder(folder)
    url = f"sqlite:///{folder / DEMO_DB}"
    mailer = Mailer(load_settings(DEMO_ENV, database_url=url, cwd=folder))
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

        campaign = _copy_example_campaign(folder)
        outbox = folder / "outbox"
        outcome = asyncio.run(_send_to_capture(mailer, campaign, outbox))
        console.print(
            f"  sent campaign {outcome.prepared.definition.name!r} to a local capture SMTP "
            f"server: {outcome.stats.sent} messages written to {outbox}/",
            markup=False,
        )
        _who_was_mailed(console, mailer, outcome.prepared.campaign_id, [first_party, vendor])
        db = f"--db sqlite:///{folder / DEMO_DB}"
        console.print("Look closer:")
        console.print(f"  ls {outbox}", markup=False)
        console.print(
            f"  mailer {db} campaign report {outcome.prepared.definition.name}", markup=False
        )
        console.print(f"  mailer {db} contacts show dana@example.com", markup=False)
        console.print(f"  mailer {db} vendors list", markup=False)
    finally:
        mailer.close()
