"""`mailer`: a thin typer shell over the service layer.

The environment is read here, once, and turned into Settings; errors a user caused are printed
as one line and mapped to exit codes (0 ok, 1 finished with failures, 2 bad input).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mailer.cli_support import JsonOption, err, handled, mailer_for, out
from mailer.config import load_settings, parse_bool, parse_keys, redact_url
from mailer.errors import ConfigError
from mailer.imports import ImportSummary
from mailer.models import ConsentStatus, as_utc
from mailer.repermission import RepermissionResult
from mailer.runner import RunOptions
from mailer.service import CampaignService, Mailer, SendOutcome
from mailer.suppression import parse_reason

app = typer.Typer(
    help="Email marketing with consent as a gate: contacts, consent, suppression, campaigns.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
contacts_app = typer.Typer(help="Import and inspect contacts.", no_args_is_help=True)
consent_app = typer.Typer(
    help="Record consent given or withdrawn outside mailer.", no_args_is_help=True
)
suppressions_app = typer.Typer(help="The suppression list.", no_args_is_help=True)
vendors_app = typer.Typer(help="Vendor attestations for bought lists.", no_args_is_help=True)
campaign_app = typer.Typer(help="Preview, send and report campaigns.", no_args_is_help=True)
app.add_typer(contacts_app, name="contacts")
app.add_typer(consent_app, name="consent")
app.add_typer(suppressions_app, name="suppressions")
app.add_typer(vendors_app, name="vendors")
app.add_typer(campaign_app, name="campaign")

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Database URL (default: MAILER_DATABASE_URL, else ./mailer.db)."),
]


@app.callback()
def root(ctx: typer.Context, db: DbOption = None) -> None:
    state = ctx.ensure_object(dict)
    state["db"] = db
    state["environ"] = dict(os.environ)


@app.command()
@handled
def init(ctx: typer.Context) -> None:
    """Create the database schema, or upgrade it; safe to run again."""
    mailer = mailer_for(ctx, ready=False)
    result = mailer.init()
    where = redact_url(mailer.settings.database_url)
    if result.revision_before == result.revision_after:
        out.print(f"Database {where} is up to date (schema {result.revision_after}).")
    elif result.revision_before is None:
        out.print(f"Created the database schema in {where} (schema {result.revision_after}).")
    else:
        out.print(
            f"Upgraded {where} from schema {result.revision_before} to {result.revision_after}."
        )
    if result.key_file_created is not None:
        out.print(
            f"Generated a secret key in {result.key_file_created} (readable by you only); "
            "mailer finds it there next time. Back it up: suppression hashes depend on it."
        )


# -- contacts ------------------------------------------------------------------------------------


def _print_import_summary(summary: ImportSummary, rejects: Path | None) -> None:
    table = Table(title=f"Import of {summary.path}", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows read", str(summary.rows_read))
    table.add_row("new contacts", str(summary.new))
    table.add_row("merged into existing contacts", str(summary.merged))
    if summary.duplicates:
        table.add_row("repeated addresses in the file", str(summary.duplicates))
    table.add_row("consent granted", str(summary.consent_granted))
    if summary.consent_unchanged:
        table.add_row("consent already on record", str(summary.consent_unchanged))
    for reason, count in sorted(summary.consent_ignored.items()):
        table.add_row(f"consent ignored: {reason.replace('_', ' ')}", str(count))
    table.add_row("suppressed addresses", str(summary.suppressed))
    table.add_row("rejected rows", str(summary.rejected_total))
    for reason, count in sorted(summary.rejected.items()):
        table.add_row(f"  rejected: {reason.replace('_', ' ')}", str(count))
    out.print(table)
    for reject in summary.rejects:
        out.print(f"row {reject.row_number}: {reject.field}: {reject.message}", markup=False)
    if summary.rejected_total > len(summary.rejects):
        more = summary.rejected_total - len(summary.rejects)
        hint = f"; all are in {rejects}" if rejects else "; use --rejects FILE.csv for all"
        out.print(f"... and {more} more rejected rows{hint}", markup=False)
    if not summary.written:
        out.print("--strict: some rows were bad, so nothing was written.")


@contacts_app.command("import")
@handled
def contacts_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Contacts CSV (UTF-8, header row, `email` column).")],
    vendor: Annotated[
        str | None, typer.Option(help="The list was bought from this vendor (needs --attestation).")
    ] = None,
    attestation: Annotated[
        Path | None, typer.Option(help="The vendor's lawful-source attestation (TOML).")
    ] = None,
    strict: Annotated[bool, typer.Option(help="Write nothing if any row is bad.")] = False,
    rejects: Annotated[
        Path | None, typer.Option(help="Write every rejected row, with reason, to this CSV.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Import contacts; consent only where a row carries complete evidence."""
    mailer = mailer_for(ctx)
    summary = mailer.import_contacts(
        file, vendor=vendor, attestation=attestation, strict=strict, rejects=rejects
    )
    if as_json:
        out.print(json.dumps(summary.as_dict(), indent=2), markup=False)
    else:
        _print_import_summary(summary, rejects)
    if not summary.written:
        raise typer.Exit(2)
    if summary.rejected_total:
        raise typer.Exit(1)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "isoformat") and hasattr(value, "tzinfo"):
        return as_utc(value).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


@contacts_app.command("show")
@handled
def contacts_show(
    ctx: typer.Context,
    email: Annotated[str, typer.Argument(help="The contact's address, in any capitalisation.")],
    as_json: JsonOption = False,
) -> None:
    """Show a contact, its current consent per purpose and its full consent history."""
    view = mailer_for(ctx).show_contact(email)
    contact = view.contact
    if as_json:
        payload = {
            "email": contact.email,
            "name": contact.name,
            "first_name": contact.first_name,
            "last_name": contact.last_name,
            "locale": contact.locale,
            "tags": view.tags,
            "attributes": contact.attributes,
            "created_at": _fmt(contact.created_at),
            "consent": {
                p: {"status": s.status.value, "since": _fmt(s.consent_at), "source": s.source}
                for p, s in sorted(view.states.items())
            },
            "suppressions": [
                {"reason": s.reason, "since": _fmt(s.created_at), "lifted_at": _fmt(s.lifted_at)}
                for s in view.suppressions
            ],
            "history": [
                {
                    "id": r.id,
                    "purpose": r.purpose,
                    "status": r.status,
                    "method": r.method,
                    "source": r.source,
                    "consent_at": _fmt(r.consent_at),
                    "recorded_at": _fmt(r.recorded_at),
                    "policy_version": r.policy_version,
                    "ip_masked": r.ip_masked,
                    "attestation_id": r.attestation_id,
                    "import_id": r.import_id,
                    "evidence": r.evidence,
                    "note": r.note,
                }
                for r in view.history
            ],
            "sources": [
                {"import_id": b.id, "file": b.filename, "vendor": b.vendor, "row": n}
                for b, n in view.sources
            ],
        }
        out.print(json.dumps(payload, indent=2, ensure_ascii=False), markup=False)
        return
    out.print(f"[bold]{contact.email}[/bold]")
    for label, value in (
        ("name", contact.name),
        ("first name", contact.first_name),
        ("last name", contact.last_name),
        ("locale", contact.locale),
        ("tags", ", ".join(view.tags)),
        ("attributes", ", ".join(f"{k}={v}" for k, v in sorted(contact.attributes.items()))),
        ("added", _fmt(contact.created_at)),
    ):
        if value:
            out.print(f"  {label}: {value}", markup=False)
    for batch, row_number in view.sources:
        origin = f"vendor {batch.vendor}, " if batch.vendor else ""
        out.print(
            f"  source: import {batch.id} ({origin}{batch.filename}, row {row_number})",
            markup=False,
        )
    active = [s for s in view.suppressions if s.lifted_at is None]
    for s in view.suppressions:
        lifted = f", lifted {_fmt(s.lifted_at)}" if s.lifted_at else ""
        out.print(f"  suppressed: {s.reason} since {_fmt(s.created_at)}{lifted}", markup=False)

    state_table = Table(title="Current consent")
    for column in ("purpose", "status", "since", "method", "source", "mailable"):
        state_table.add_column(column)
    for purpose, state in sorted(view.states.items()):
        state_table.add_row(
            purpose,
            state.status.value,
            _fmt(state.consent_at),
            state.method,
            state.source,
            "yes" if state.allows and not active else "no",
        )
    out.print(state_table)

    ledger = Table(title="Consent history (append-only ledger)")
    for column in ("#", "purpose", "status", "method", "source", "consent at", "evidence"):
        ledger.add_column(column)
    for r in view.history:
        evidence = ", ".join(
            part
            for part in (
                r.evidence,
                f"attestation {r.attestation_id}" if r.attestation_id else None,
                f"policy {r.policy_version}" if r.policy_version else None,
                f"ip {r.ip_masked}" if r.ip_masked else None,
                f"note: {r.note}" if r.note else None,
            )
            if part
        )
        ledger.add_row(
            str(r.id), r.purpose, r.status, r.method, r.source, _fmt(r.consent_at), evidence
        )
    out.print(ledger)


# -- consent and suppression ---------------------------------------------------------------------

PurposeOption = Annotated[str, typer.Option("--purpose", help="marketing, tracking, ...")]
SourceOption = Annotated[
    str, typer.Option("--source", help="How the person told you: phone, letter, privacy-mail, ...")
]
NoteOption = Annotated[str | None, typer.Option("--note", help="Free text kept with the record.")]


def _consent_command(
    ctx: typer.Context,
    email: str,
    purpose: str,
    source: str,
    note: str | None,
    status: ConsentStatus,
) -> None:
    change = mailer_for(ctx).record_consent(email, purpose, status, source=source, note=note)
    verb = "granted" if status is ConsentStatus.GRANTED else "withdrawn"
    created = " (new contact)" if change.contact_created else ""
    out.print(
        f"Recorded: {change.record.purpose} consent {verb} for {change.contact.email}{created} "
        f"(ledger row {change.record.id}).",
        markup=False,
    )
    if status is ConsentStatus.GRANTED and change.suppressed_reasons:
        out.print(
            f"Note: the address stays suppressed ({', '.join(change.suppressed_reasons)}); "
            "only the person's own confirmed double opt-in lifts an unsubscribe.",
            markup=False,
        )


@consent_app.command("grant")
@handled
def consent_grant(
    ctx: typer.Context,
    email: str,
    purpose: PurposeOption,
    source: SourceOption,
    note: NoteOption = None,
) -> None:
    """Record consent a person gave by phone, letter or mail."""
    _consent_command(ctx, email, purpose, source, note, ConsentStatus.GRANTED)


@consent_app.command("withdraw")
@handled
def consent_withdraw(
    ctx: typer.Context,
    email: str,
    purpose: PurposeOption,
    source: SourceOption,
    note: NoteOption = None,
) -> None:
    """Record a withdrawal a person made by phone, letter or mail (takes effect at once)."""
    _consent_command(ctx, email, purpose, source, note, ConsentStatus.WITHDRAWN)


@app.command()
@handled
def suppress(
    ctx: typer.Context,
    email: str,
    reason: Annotated[
        str, typer.Option(help="unsubscribed, hard_bounce, complaint, erased or manual")
    ] = "manual",
    note: NoteOption = None,
) -> None:
    """Put an address on the suppression list: it is never mailed again."""
    parsed = parse_reason(reason)
    result = mailer_for(ctx).suppress(email, parsed, note)
    if result.created:
        out.print(f"Suppressed ({parsed.value}).")
    else:
        out.print(
            f"Already suppressed ({parsed.value}) since {_fmt(result.suppression.created_at)}."
        )


@suppressions_app.command("list")
@handled
def suppressions_list(
    ctx: typer.Context,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List suppressions. Addresses are kept only as keyed hashes, so hashes are shown."""
    rows = mailer_for(ctx).suppressions(parse_reason(reason) if reason else None)
    if as_json:
        payload = [
            {
                "id": s.id,
                "address_hash": s.address_hash,
                "reason": s.reason,
                "source": s.source,
                "created_at": _fmt(s.created_at),
                "lifted_at": _fmt(s.lifted_at) or None,
            }
            for s in rows
        ]
        out.print(json.dumps(payload, indent=2), markup=False)
        return
    table = Table(title=f"Suppression list ({len(rows)})")
    for column in ("id", "address hash", "reason", "since", "source", "lifted"):
        table.add_column(column)
    for s in rows:
        table.add_row(
            str(s.id),
            s.address_hash[:16] + "…",
            s.reason,
            _fmt(s.created_at),
            s.source,
            _fmt(s.lifted_at),
        )
    out.print(table)


# -- vendors -------------------------------------------------------------------------------------


@vendors_app.command("list")
@handled
def vendors_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Attestations with the imports, contacts and consents that rest on them."""
    rows = mailer_for(ctx).vendors()
    if as_json:
        payload = [
            {
                "id": r.attestation.id,
                "vendor": r.attestation.vendor,
                "lawful_basis": r.attestation.lawful_basis,
                "purposes": r.attestation.purposes,
                "collected_from": r.attestation.collected_from.isoformat(),
                "collected_to": r.attestation.collected_to.isoformat(),
                "signed_by": r.attestation.signed_by,
                "document_sha256": r.attestation.document_sha256,
                "imports": r.imports,
                "contacts": r.contacts,
                "consents_granted": r.consents_granted,
                "consents_in_force": r.consents_current,
                "revoked_at": _fmt(r.attestation.revoked_at) or None,
            }
            for r in rows
        ]
        out.print(json.dumps(payload, indent=2), markup=False)
        return
    table = Table(title="Vendor attestations")
    for column in (
        "id",
        "vendor",
        "basis",
        "purposes",
        "period",
        "signed by",
        "imports",
        "contacts",
        "granted",
        "in force",
        "revoked",
    ):
        table.add_column(column)
    for r in rows:
        a = r.attestation
        table.add_row(
            str(a.id),
            a.vendor,
            a.lawful_basis,
            ", ".join(a.purposes),
            f"{a.collected_from} to {a.collected_to}",
            a.signed_by,
            str(r.imports),
            str(r.contacts),
            str(r.consents_granted),
            str(r.consents_current),
            _fmt(a.revoked_at) + (f" ({a.revoke_reason})" if a.revoke_reason else ""),
        )
    out.print(table)


@vendors_app.command("revoke")
@handled
def vendors_revoke(
    ctx: typer.Context,
    attestation_id: Annotated[int, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option(help="Why the attestation no longer holds.")],
) -> None:
    """Withdraw every consent an attestation granted (new ledger rows; nothing is deleted)."""
    count = mailer_for(ctx).revoke_attestation(attestation_id, reason)
    out.print(f"Revoked attestation {attestation_id}: withdrew {count} consents it had granted.")


# -- campaigns -----------------------------------------------------------------------------------


class _RichProgress:
    """A progress bar on a terminal, plain log lines every few seconds otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.sent = self.failed = self.excluded = 0
        self.total = 0
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self._started = 0.0

    def start(self, total: int) -> None:
        import time

        self.total = total
        self._started = self._last_line = time.monotonic()
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]sending"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>7.0f}/s"),
                TextColumn("failed {task.fields[failed]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("send", total=total or None, rate=0.0, failed=0)

    def advance(self, sent: int, failed: int, excluded: int) -> None:
        import time

        self.sent += sent
        self.failed += failed
        self.excluded += excluded
        now = time.monotonic()
        rate = self.sent / max(now - self._started, 1e-6)
        if self._bar is not None:
            self._bar.update(
                self._task, advance=sent + failed + excluded, rate=rate, failed=self.failed
            )
        elif now - self._last_line >= 2.0:
            self._last_line = now
            self.console.print(
                f"sent {self.sent} of {self.total}, failed {self.failed}, "
                f"excluded {self.excluded}, {rate:.0f}/s",
                markup=False,
            )

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_report(report: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    for key in ("status", "audience", "sent", "failed", "uncertain", "queued", "bounces"):
        table.add_row(key, str(report[key]))
    for reason, count in report["excluded"].items():
        table.add_row(f"excluded: {reason.replace('_', ' ')}", str(count))
    for key in ("opens", "unique_opens", "clicks", "unique_clicks", "unsubscribes"):
        table.add_row(key.replace("_", " "), str(report[key]))
    for key in ("machine_opens", "machine_clicks"):
        table.add_row(key.replace("_", " ") + " (scanners)", str(report[key]))
    out.print(table)
    if report.get("status_reason"):
        out.print(f"status: {report['status']}: {report['status_reason']}", markup=False)


@campaign_app.command("send")
@handled
def campaign_send(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The campaign TOML file under campaigns/.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Render every message, send nothing, change nothing.")
    ] = False,
    smtp: Annotated[
        str | None,
        typer.Option(help="smtp://[user:pass@]host:port or smtps://... (default MAILER_SMTP_URL)."),
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Messages per second, at most.")] = None,
    per_domain_rate: Annotated[
        float | None, typer.Option(help="Messages per second per recipient domain, at most.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="SMTP connections.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, max=10000, help="Deliveries per claim.")] = 500,
    resend_uncertain: Annotated[
        bool,
        typer.Option(
            "--resend-uncertain",
            help="Send again the messages whose outcome is unknown after a crash.",
        ),
    ] = False,
    repermission: Annotated[
        bool,
        typer.Option(
            "--repermission",
            help="Instead of the campaign, ask the contacts it excludes as policy_outdated "
            "to confirm their consent under min_policy_version.",
        ),
    ] = False,
) -> None:
    """Send a campaign to everyone the consent gate lets through, exactly once each."""
    mailer = mailer_for(ctx)
    campaigns = CampaignService(mailer)
    if repermission:
        asked = asyncio.run(_repermission(mailer, file, smtp or mailer.settings.smtp_url))
        out.print(
            f"Re-permission for {asked.campaign} (policy {asked.policy_version}): asked "
            f"{asked.asked} contacts to confirm; {asked.held_back} were asked recently "
            f"(their earlier link still works); {asked.not_accepted} mails were not accepted "
            "by the SMTP server.",
            markup=False,
        )
        if asked.not_accepted:
            raise typer.Exit(1)
        return
    if dry_run:
        result = campaigns.dry_run(file)
        table = Table(
            title=f"Dry run of {result.definition.name} (nothing sent)", show_header=False
        )
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("would be sent", str(result.would_send))
        table.add_row("  of which with tracking", str(result.with_tracking))
        for reason, count in sorted(result.excluded.items()):
            table.add_row(f"excluded: {reason.replace('_', ' ')}", str(count))
        table.add_row("could not be composed", str(len(result.failures)))
        out.print(table)
        for email, problem in result.failures[:20]:
            out.print(f"{email}: {problem}", markup=False)
        if result.failures:
            raise typer.Exit(1)
        return
    outcome = asyncio.run(
        _send(
            campaigns,
            file,
            smtp or mailer.settings.smtp_url,
            rate,
            per_domain_rate,
            concurrency,
            batch_size,
            resend_uncertain,
        )
    )
    stats = outcome.stats
    if stats.uncertain_found:
        out.print(
            f"{stats.uncertain_found} messages were being sent when a sender stopped: their "
            "outcome is unknown, so they are reported as uncertain and not sent again "
            "(use --resend-uncertain to send them anyway).",
            markup=False,
        )
    _print_report(outcome.report, f"Campaign {outcome.prepared.definition.name}")
    out.print(
        f"This run: sent {stats.sent}, failed {stats.failed}, retrying {stats.retried} later, "
        f"excluded at send time {sum(stats.excluded.values())}, in {stats.elapsed:.1f} s.",
        markup=False,
    )
    if stats.stopped and not stats.paused_reason:
        out.print("Stopped before the end; run the same command again to continue.")
    report = outcome.report
    if stats.paused_reason or report["failed"] or report["uncertain"] or stats.stopped:
        raise typer.Exit(1)


async def _repermission(mailer: Mailer, file: Path, smtp_url: str) -> RepermissionResult:
    from mailer.repermission import ask_outdated
    from mailer.transport import SmtpPool

    async with SmtpPool(smtp_url, size=2) as pool:
        return await ask_outdated(mailer, file, pool)


async def _send(
    campaigns: CampaignService,
    file: Path,
    smtp_url: str,
    rate: float | None,
    per_domain_rate: float | None,
    concurrency: int,
    batch_size: int,
    resend_uncertain: bool,
) -> SendOutcome:
    import signal

    from mailer.transport import SmtpPool

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Ctrl-C finishes the messages in flight and stops cleanly (not possible off the main
        # thread, where tests run it)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    pool = SmtpPool(smtp_url, size=concurrency, rate=rate, per_domain_rate=per_domain_rate)
    try:
        return await campaigns.send(
            file,
            transport=pool,
            options=RunOptions(
                purpose="marketing", batch_size=batch_size, wave_size=max(8, concurrency * 4)
            ),
            progress=_RichProgress(out),
            stop=stop,
            resend_uncertain=resend_uncertain,
        )
    finally:
        await pool.close()


@campaign_app.command("preview")
@handled
def campaign_preview(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The campaign TOML file.")],
    to: Annotated[str, typer.Option("--to", help="The contact to preview for.")],
    output: Annotated[
        Path | None, typer.Option("--out", help="Where to write the .eml (default NAME-EMAIL.eml).")
    ] = None,
) -> None:
    """Render the message one contact would get, as an .eml file, or say why they get none."""
    preview = CampaignService(mailer_for(ctx)).preview(file, to)
    if preview.message is None:
        out.print(
            f"{preview.email} would not receive this campaign: {preview.excluded_reason}",
            markup=False,
        )
        raise typer.Exit(1)
    target = output or Path(f"{file.stem}-{preview.email.replace('@', '_at_')}.eml")
    target.write_bytes(preview.message)
    out.print(f"Wrote the message for {preview.email} to {target}.", markup=False)


@campaign_app.command("report")
@handled
def campaign_report(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The campaign's name (its slug).")],
    as_json: JsonOption = False,
) -> None:
    """Sent, failed, uncertain, excluded by reason, and engagement (humans and machines apart)."""
    report = CampaignService(mailer_for(ctx)).report(name)
    if as_json:
        out.print(json.dumps(report, indent=2), markup=False)
    else:
        _print_report(report, f"Campaign {name}")


def _status_command(ctx: typer.Context, name: str, action: str) -> None:
    before, after = CampaignService(mailer_for(ctx)).set_status(name, action)
    out.print(f"Campaign {name}: {before.value} -> {after.value}.", markup=False)
    if action == "resume":
        out.print("Run `mailer campaign send FILE` to continue sending.")


@campaign_app.command("pause")
@handled
def campaign_pause(ctx: typer.Context, name: str) -> None:
    """Pause a campaign: running senders stop after the messages in flight."""
    _status_command(ctx, name, "pause")


@campaign_app.command("resume")
@handled
def campaign_resume(ctx: typer.Context, name: str) -> None:
    """Allow a paused campaign to be sent again."""
    _status_command(ctx, name, "resume")


@campaign_app.command("cancel")
@handled
def campaign_cancel(ctx: typer.Context, name: str) -> None:
    """Cancel a campaign for good: nothing more is sent."""
    _status_command(ctx, name, "cancel")


@app.command()
@handled
def demo(
    folder: Annotated[
        Path, typer.Option("--dir", help="Folder for the demo database and files.")
    ] = Path("mailer-demo"),
) -> None:
    """The quick start: a fresh SQLite database with contacts in every consent state."""
    from mailer.demo import run_demo

    run_demo(folder, out)


# -- the tracking app and signing keys (issue 4) --------------------------------------------------

keys_app = typer.Typer(help="The keys that sign links.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

SERVE_APP_FACTORY = "mailer.cli:serve_app"
WRITER_ENV = "MAILER_TRACKING_WRITER"  # how `serve` tells its workers where hits are written
NICENESS_ENV = "MAILER_TRACKING_WRITER_NICENESS"  # ... and at which CPU priority
IDLE_ENV = "MAILER_TRACKING_WRITER_IDLE"  # ... and whether under SCHED_IDLE


class Writer(StrEnum):
    process = "process"
    thread = "thread"


def serve_app() -> Any:
    """The app factory `mailer serve` hands to uvicorn: every worker builds its own app.

    Workers are processes started by `serve` and inherit its environment, into which `serve`
    has written its --db option: so each worker builds, with load_settings, exactly the
    settings `serve` checked before starting them, and this module stays the only reader of
    the environment.
    """
    from mailer.tracking.app import create_app, prepare_worker

    in_thread = os.environ.get(WRITER_ENV) == Writer.thread
    tracking_app = create_app(
        Mailer(load_settings(dict(os.environ))).ready(),
        writer="thread" if in_thread else "process",
        writer_niceness=_niceness(os.environ.get(NICENESS_ENV)),
        writer_idle=_idle(os.environ.get(IDLE_ENV)),
    )
    prepare_worker()
    return tracking_app


@app.command()
@handled
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=256, help="Worker processes sharing the port.")
    ] = 1,
    trusted_proxies: Annotated[
        str | None,
        typer.Option(
            help="Proxies whose X-Forwarded-For gives the client address (comma-separated "
            "addresses, or *; default MAILER_TRUSTED_PROXIES, else 127.0.0.1)."
        ),
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    writer: Annotated[
        Writer | None,
        typer.Option(
            help="Where opens and clicks are written: a writer process per worker (default), "
            "or a thread of the worker (default MAILER_TRACKING_WRITER, else process)."
        ),
    ] = None,
    writer_niceness: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=19,
            help="How much lower the writer processes' CPU priority is than the workers' "
            "(0 to 19; default MAILER_TRACKING_WRITER_NICENESS, else 19): recording yields "
            "the CPU to requests and catches up when they leave it idle.",
        ),
    ] = None,
    writer_idle: Annotated[
        bool | None,
        typer.Option(
            "--writer-idle/--no-writer-idle",
            help="Run the writer processes under Linux's SCHED_IDLE policy, on CPU time "
            "nothing else wants (default MAILER_TRACKING_WRITER_IDLE, else on).",
        ),
    ] = None,
) -> None:
    """Serve the tracking app (pixel, click, unsubscribe, confirm, preferences) under uvicorn."""
    from mailer.tracking.app import log_level_number
    from mailer.tracking.app import serve as run_server

    log_level_number(log_level)  # a bad option is refused before anything else is looked at

    chosen = writer.value if writer is not None else os.environ.get(WRITER_ENV) or "process"
    if chosen not in {w.value for w in Writer}:
        raise ConfigError(f"{WRITER_ENV} must be process or thread, not {chosen!r}")
    niceness = (
        writer_niceness if writer_niceness is not None else _niceness(os.environ.get(NICENESS_ENV))
    )
    idle = writer_idle if writer_idle is not None else _idle(os.environ.get(IDLE_ENV))
    mailer_for(ctx).close()  # the database and keys are checked before any worker starts
    db = ctx.ensure_object(dict).get("db")
    if db:
        os.environ["MAILER_DATABASE_URL"] = db  # what the workers' settings are built from
    os.environ[WRITER_ENV] = chosen
    os.environ[NICENESS_ENV] = str(niceness)
    os.environ[IDLE_ENV] = "1" if idle else "0"
    run_server(
        SERVE_APP_FACTORY,
        host=host,
        port=port,
        workers=workers,
        trusted_proxies=trusted_proxies or os.environ.get("MAILER_TRUSTED_PROXIES") or "127.0.0.1",
        log_level=log_level,
        access_log=access_log,
    )


def _niceness(value: str | None) -> int:
    from mailer.tracking.writer import WRITER_NICENESS

    if value is None or not value.strip():
        return WRITER_NICENESS
    try:
        niceness = int(value)
    except ValueError:
        niceness = -1
    if not 0 <= niceness <= 19:
        raise ConfigError(f"{NICENESS_ENV} must be a whole number from 0 to 19, not {value!r}")
    return niceness


def _idle(value: str | None) -> bool:
    from mailer.tracking.writer import WRITER_IDLE

    if value is None or not value.strip():
        return WRITER_IDLE
    return parse_bool(value, IDLE_ENV)


def _append_key(path: Path, key: str) -> None:
    """Append a key to an embedded database's key file: a new file (mode 0600) replaces the
    old one in one step, so a crash leaves either the old list or the new one."""
    import tempfile

    current = path.read_text(encoding="utf-8")
    if current and not current.endswith("\n"):
        current += "\n"
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:  # mkstemp makes it 0600
            fh.write(current + key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@keys_app.command("rotate")
@handled
def keys_rotate(ctx: typer.Context) -> None:
    """Add a new signing key: links are signed with it from now on, and links signed with the
    older keys keep working. No key is ever removed here (the oldest keys the suppression
    hashes)."""
    import secrets

    settings = mailer_for(ctx).settings
    key = secrets.token_urlsafe(48)
    keys = [*settings.secret_keys, key]
    key_file = settings.key_file
    from_key_file = (
        not os.environ.get("MAILER_SECRET_KEYS")
        and key_file is not None
        and key_file.exists()
        and parse_keys(key_file.read_text(encoding="utf-8").replace("\n", ","), str(key_file))
        == settings.secret_keys
    )
    if from_key_file:
        assert key_file is not None
        _append_key(key_file, key)
        out.print(
            f"Added a signing key to {key_file}: {len(keys)} keys, the newest signs new links, "
            "all of them verify. Restart `mailer serve` and running senders to sign with it.",
            markup=False,
        )
        return
    out.print("New signing key (add it at the END of the list; keep every older key):")
    out.print(key, markup=False)
    out.print("Set, wherever mailer runs (tracking app, senders, CLI):", markup=False)
    out.print(f"MAILER_SECRET_KEYS={','.join(keys)}", markup=False)
    if not os.environ.get("MAILER_SECRET_KEYS") and settings.config_file is not None:
        listed = ", ".join(json.dumps(k) for k in keys)
        out.print(f"or, in {settings.config_file}: secret_keys = [{listed}]", markup=False)
    out.print(
        "Then restart `mailer serve` and running senders. Links signed with the older keys keep "
        "working; the oldest key must stay first (it keys the suppression hashes).",
        markup=False,
    )


# -- privacy operations (issue 6): mailer/cli_privacy.py ------------------------------------------

from mailer.cli_privacy import audit_app, policy_app, privacy_app, retention_app  # noqa: E402

app.add_typer(privacy_app, name="privacy")
app.add_typer(retention_app, name="retention")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")

# -- webhooks (issue 5): mailer/cli_webhooks.py --------------------------------------------------

from mailer.cli_webhooks import webhooks_app  # noqa: E402

app.add_typer(webhooks_app, name="webhooks")

# -- bounces, complaints and mailto unsubscribes in (issue 5): mailer/cli_inbound.py -------------

from mailer.cli_inbound import inbound_app  # noqa: E402

app.add_typer(inbound_app, name="inbound")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
