"""`mailer privacy|retention|policy|audit`: the privacy officer's commands, thin as the rest.

Registered in mailer.cli with `app.add_typer(...)`; the shared pieces (error handling, the
Mailer for a command, the consoles) come from mailer.cli_support.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from mailer import audit as audit_log
from mailer import policy, privacy, retention
from mailer.addresses import address_hash, normalise_address
from mailer.cli_support import JsonOption, handled, mailer_for, out, print_line, when_text
from mailer.errors import BadInput
from mailer.models import as_utc, utcnow

if TYPE_CHECKING:

    pass


privacy_app = typer.Typer(
    help="Access, correction and erasure requests (answer within 30 days).", no_args_is_help=True
)
retention_app = typer.Typer(help="Delete what is kept longer than needed.", no_args_is_help=True)
policy_app = typer.Typer(help="Versions of the privacy statement.", no_args_is_help=True)
audit_app = typer.Typer(help="Who changed consent, suppressions, contacts and attestations.")













def _day(value: datetime | None) -> str:
    return "" if value is None else as_utc(value).strftime("%Y-%m-%d")


def _parse_date(raw: str, option: str) -> date:
    try:
        return date.fromisoformat(raw.strip())
    except ValueError:
        raise BadInput(f"{option} {raw!r}: expected a date like 2026-12-01") from None


# -- privacy -------------------------------------------------------------------------------------


@privacy_app.command("export")
@handled
def privacy_export(
    ctx: typer.Context,
    email: Annotated[str, typer.Argument(help="The person's address.")],
    fmt: Annotated[
        str, typer.Option("--format", help="json (one document) or csv (a zip of CSV files).")
    ] = "json",
    output: Annotated[
        Path | None,
        typer.Option("--out", help="Write to this file (mode 0600); JSON goes to stdout without."),
    ] = None,
) -> None:
    """Everything held about one person: contact, consent with evidence, deliveries, opens and
    clicks, suppressions, sign-ups and requests. Answers their open verified access requests."""
    fmt = fmt.strip().lower()
    if fmt not in ("json", "csv"):
        raise BadInput(f"--format {fmt!r}: choose json or csv")
    mailer = mailer_for(ctx)
    document = privacy.export(mailer, email)
    target = output
    if fmt == "csv":
        if target is None:
            hashed = address_hash(document["contact"]["email"], mailer.settings.suppression_key)
            target = Path(f"privacy-export-{hashed[:8]}-{document['generated_at'][:10]}.zip")
        privacy.write_csv_zip(document, target)
    elif target is not None:
        privacy.write_json(document, target)
    else:
        print_line(json.dumps(document, indent=2, ensure_ascii=False))
    answered = privacy.record_export(mailer, email, fmt)
    message = f"Exported the data held about {document['contact']['email']}"
    message += f" to {target}." if target is not None else "."
    if answered:
        message += f" Answered access request(s) {', '.join(f'#{i}' for i in answered)}."
    if target is not None:
        print_line(message)
    else:
        typer.echo(message, err=True)  # stdout holds the JSON document only


@privacy_app.command("erase")
@handled
def privacy_erase(
    ctx: typer.Context,
    email: Annotated[str, typer.Argument(help="The person's address.")],
    as_json: JsonOption = False,
) -> None:
    """Erase the person from every table in one transaction; the address stays suppressed (as a
    keyed hash, reason `erased`) so a re-import never mails them. Cannot be undone."""
    report = privacy.erase(mailer_for(ctx), email)
    if as_json:
        payload = {
            "erasure_id": report.erasure_id,
            "address_hash": report.address_hash,
            "removed": report.removed,
            "suppressed_now": report.suppressed_now,
        }
        print_line(json.dumps(payload, indent=2))
        return
    table = Table(title=f"Erased (erasure {report.erasure_id})", show_header=False)
    table.add_column("what")
    table.add_column("removed", justify="right")
    for what, count in report.removed.items():
        table.add_row(what.replace("_", " "), str(count))
    out.print(table)
    kept = "is now suppressed" if report.suppressed_now else "was already suppressed as erased"
    print_line(
        f"The address {kept} (keyed hash {report.address_hash[:16]}...): it is never mailed "
        "again, also not after a re-import. Campaign reports keep its counts anonymously."
    )


@privacy_app.command("correct")
@handled
def privacy_correct(
    ctx: typer.Context,
    email: Annotated[str, typer.Argument(help="The person's address.")],
    assignments: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="FIELD=VALUE: name, first_name, last_name, locale or attributes.KEY; "
            "an empty value clears it. Repeat for several.",
        ),
    ],
) -> None:
    """Correct a contact's name, locale or attributes (recorded in the audit log)."""
    result = privacy.correct(mailer_for(ctx), email, assignments)
    if result.changed:
        print_line(f"Corrected {', '.join(result.changed)} of {result.email}.")
    if result.unchanged:
        print_line(f"Already so: {', '.join(result.unchanged)}.")
    if result.requests_completed:
        done = ", ".join(f"#{i}" for i in result.requests_completed)
        print_line(f"Answered correction request(s) {done}.")


@privacy_app.command("request")
@handled
def privacy_request(
    ctx: typer.Context,
    email: Annotated[str, typer.Argument(help="The address the request is about.")],
    kind: Annotated[str, typer.Option("--kind", help="access, correction or erasure.")],
    channel: Annotated[
        str, typer.Option(help="How it came in: mail, phone, letter, privacy-mail, ...")
    ] = "mail",
    verified: Annotated[
        bool, typer.Option("--verified", help="You checked the person's identity.")
    ] = False,
    received: Annotated[
        str | None, typer.Option(help="Date received (default today): the 30 days count from it.")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Free text kept with the request.")] = None,
) -> None:
    """Register a request received by mail, phone or letter (due 30 days after receipt)."""
    received_at = (
        datetime.combine(_parse_date(received, "--received"), datetime.min.time(), UTC)
        if received
        else None
    )
    row = privacy.record_request(
        mailer_for(ctx),
        email,
        kind,
        channel=channel,
        verified=verified,
        note=note,
        received_at=received_at,
    )
    check = "identity verified" if verified else "identity check pending (`mailer privacy verify`)"
    print_line(f"Registered {row.kind} request #{row.id}, due {_day(row.due_at)}; {check}.")


@privacy_app.command("requests")
@handled
def privacy_requests(
    ctx: typer.Context,
    open_only: Annotated[bool, typer.Option("--open", help="Only requests not yet answered.")] = (
        False
    ),
    as_json: JsonOption = False,
) -> None:
    """The requests register: received, identity check, due date; overdue ones stand out."""
    views = privacy.list_requests(mailer_for(ctx), open_only=open_only)
    now = utcnow()
    if as_json:
        payload = [
            {
                **privacy._request_dict(v.request),
                "email": v.email,
                "address_hash": v.request.address_hash,
                "state": v.state,
                "overdue": v.overdue(now),
            }
            for v in views
        ]
        print_line(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    if not views:
        print_line("No open requests." if open_only else "No requests registered.")
        return
    table = Table(title="Privacy requests")
    for column in ("#", "kind", "who", "received", "identity", "due", "state", "channel"):
        table.add_column(column, overflow="fold")
    overdue = 0
    for v in views:
        r = v.request
        late = v.overdue(now)
        overdue += late
        state = "OVERDUE" if late else v.state
        if r.completed_at is not None:
            state = f"done {_day(r.completed_at)}: {r.outcome or ''}".strip()
        who = v.email or f"(hash {r.address_hash[:12]}...)"
        table.add_row(
            str(r.id),
            r.kind,
            who,
            _day(r.received_at),
            r.identity_check,
            _day(r.due_at),
            state,
            r.channel,
            style="bold red" if late else None,
        )
    out.print(table)
    if overdue:
        print_line(f"{overdue} request(s) overdue: the answer is late (30 days from receipt).")


@privacy_app.command("verify")
@handled
def privacy_verify(ctx: typer.Context, request_id: int) -> None:
    """Record that the requester's identity was checked."""
    row = privacy.verify_request(mailer_for(ctx), request_id)
    print_line(f"Request #{row.id}: identity verified; due {_day(row.due_at)}.")


@privacy_app.command("complete")
@handled
def privacy_complete(
    ctx: typer.Context,
    request_id: int,
    outcome: Annotated[str, typer.Option(help="How it was answered (kept with the request).")],
) -> None:
    """Close a request answered outside mailer (export, correct and erase close their own)."""
    row = privacy.complete_request(mailer_for(ctx), request_id, outcome)
    print_line(f"Request #{row.id} completed: {row.outcome}.")


# -- retention -----------------------------------------------------------------------------------


@retention_app.command("purge")
@handled
def retention_purge(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what is due, change nothing.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option(help="Rows per transaction.")
    ] = retention.DEFAULT_BATCH_SIZE,
    as_json: JsonOption = False,
) -> None:
    """Delete what is past its retention period (safe to run from cron)."""
    report = retention.purge(mailer_for(ctx), dry_run=dry_run, batch_size=batch_size)
    if as_json:
        print_line(json.dumps(report.as_dict(), indent=2))
        return
    periods, cutoffs = report.periods, report.cutoffs
    verb = "due" if dry_run else "done"
    table = Table(title="Retention purge" + (" (dry run: nothing changed)" if dry_run else ""))
    for column in ("what", "kept for", "before", verb):
        table.add_column(column)
    table.add_row(
        "engagement events (counts kept)",
        f"{periods.events_months} months",
        _day(cutoffs.events),
        str(report.engagement_events),
    )
    table.add_row(
        "contacts without consent (erased)",
        f"{periods.unconsented_months} months",
        _day(cutoffs.unconsented),
        str(report.contacts_without_consent),
    )
    table.add_row(
        "unconfirmed sign-ups (expired)",
        f"{periods.unconfirmed_days} days",
        _day(cutoffs.unconfirmed),
        str(report.subscriptions_expired),
    )
    table.add_row(
        "  contacts held by nothing else (erased)",
        "",
        "",
        str(report.unconfirmed_contacts),
    )
    table.add_row(
        "webhook outbox events (none pending)",
        f"{periods.events_months} months",
        _day(cutoffs.events),
        str(report.outbox_events),
    )
    table.add_row(
        "dead-lettered webhook deliveries",
        f"{periods.dead_letters_days} days",
        _day(cutoffs.dead_letters),
        str(report.dead_letters),
    )
    table.add_row(
        "sign-up limits whose window ended",
        "their window",
        _day(cutoffs.signup_limits),
        str(report.signup_limits),
    )
    out.print(table)
    for note in report.notes:
        print_line(f"note: {note}")


# -- policy --------------------------------------------------------------------------------------


@policy_app.command("publish")
@handled
def policy_publish(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Sorts after every earlier version: 2026-07.")],
    effective: Annotated[str, typer.Option(help="The date it takes effect (YYYY-MM-DD).")],
    material: Annotated[
        bool, typer.Option("--material", help="A material change: announce it for 30 days.")
    ] = False,
    summary: Annotated[
        str | None, typer.Option(help="What changed, in one line (shown in the notice).")
    ] = None,
) -> None:
    """Publish a version of the privacy statement."""
    mailer = mailer_for(ctx)
    effective_on = _parse_date(effective, "--effective")
    with mailer.session() as session:
        row = policy.publish(
            session,
            version,
            effective_on,
            material=material,
            summary=summary,
            operator=mailer.settings.operator,
        )
    print_line(f"Published policy version {row.version}, effective {row.effective_on.isoformat()}.")
    if row.material:
        until = as_utc(row.published_at) + policy.NOTICE_WINDOW
        print_line(f"Recipient pages show the notice of this material change until {_day(until)}.")
    print_line(
        f'Campaigns with min_policy_version = "{row.version}" leave out consent given under '
        "older versions (policy_outdated)."
    )


@policy_app.command("list")
@handled
def policy_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Published versions, oldest first, and the notice shown now (if any)."""
    with mailer_for(ctx).session() as session:
        rows = policy.versions(session)
        notice = policy.current_notice(session)
    if as_json:
        payload = {
            "versions": [
                {
                    "version": r.version,
                    "effective_on": r.effective_on.isoformat(),
                    "published_at": as_utc(r.published_at).isoformat(),
                    "material": r.material,
                    "summary": r.summary,
                    "operator": r.operator,
                }
                for r in rows
            ],
            "notice": None
            if notice is None
            else {
                "version": notice.version,
                "until": notice.until.isoformat(),
                "en": policy.notice_text(notice, "en"),
                "nl": policy.notice_text(notice, "nl"),
            },
        }
        print_line(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    if not rows:
        print_line("No policy versions published.")
        return
    table = Table(title="Privacy statement versions")
    for column in ("version", "effective", "published", "material", "summary", "by"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.version,
            r.effective_on.isoformat(),
            _day(r.published_at),
            "yes" if r.material else "no",
            r.summary or "",
            r.operator,
        )
    out.print(table)
    if notice is not None:
        print_line(f"Notice shown until {_day(notice.until)}: {policy.notice_text(notice, 'en')}")


# -- audit ---------------------------------------------------------------------------------------


def _details(details: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}={show(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list):
            return ",".join(show(v) for v in value)
        return str(value)

    return " ".join(f"{key}={show(value)}" for key, value in details.items())


@audit_app.callback(invoke_without_command=True)
@handled
def audit(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=audit_log.MAX_LISTED, help="Entries.")] = 50,
    email: Annotated[
        str | None, typer.Option(help="Only entries about this address (by its keyed hash).")
    ] = None,
    action: Annotated[
        str | None, typer.Option(help="Only actions starting with this (privacy., consent.).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The operator audit log, newest first."""
    mailer = mailer_for(ctx)
    subject = (
        address_hash(normalise_address(email), mailer.settings.suppression_key) if email else None
    )
    with mailer.session() as session:
        entries = audit_log.listing(session, limit=limit, subject=subject, action=action)
    if as_json:
        payload: list[dict[str, Any]] = [
            {
                "id": e.id,
                "at": as_utc(e.at).isoformat(),
                "operator": e.operator,
                "action": e.action,
                "subject": e.subject,
                "details": e.details,
            }
            for e in entries
        ]
        print_line(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    if not entries:
        print_line("No audit entries.")
        return
    for e in entries:  # one line each: readable in a narrow terminal, and greppable
        subject_text = e.subject or "-"
        if len(subject_text) == 64:
            subject_text = f"hash:{subject_text[:12]}"
        print_line(
            f"#{e.id} {when_text(e.at)} {e.operator} {e.action} {subject_text} "
            f"{_details(e.details)}".rstrip()
        )
