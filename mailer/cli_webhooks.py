"""`mailer webhooks ...`: endpoints, the dispatcher, deliveries and replay; thin as the rest.

Registered in mailer.cli with `app.add_typer(...)`; the shared pieces (error handling, the
Mailer for a command, the consoles) come from mailer.cli_support.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from mailer import webhook_endpoints, webhook_store
from mailer.cli_support import JsonOption, handled, iso_text, mailer_for, out, print_line, when_text
from mailer.engagement_announce import ENGAGEMENT_TYPES, announce_engagement
from mailer.errors import BadInput, NotFound
from mailer.models import utcnow
from mailer.webhook_dispatch import (
    MAX_BATCH,
    MAX_CONCURRENCY,
    Dispatcher,
    DispatchOptions,
    DispatchStats,
)

if TYPE_CHECKING:
    pass


webhooks_app = typer.Typer(
    help="Signed event webhooks: endpoints, the dispatcher, deliveries and replay.",
    no_args_is_help=True,
)

EndpointArg = Annotated[str, typer.Argument(help="The endpoint id (ep_...).")]

_DURATION = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(raw: str, option: str) -> timedelta:
    """`90s`, `30m`, `24h`, `2d`, `1d12h`, or `0`."""
    text = raw.strip().lower()
    if text == "0":
        return timedelta(0)
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise BadInput(f"{option} {raw!r}: expected a duration like 30m, 24h or 2d")
    total = timedelta(0)
    for amount, unit in parts:
        total += timedelta(**{_UNITS[unit]: int(amount)})
    return total


def parse_time(raw: str, option: str, now: datetime) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a duration ago (`6h`)."""
    text = raw.strip()
    if _DURATION.fullmatch(text.lower()):
        return now - parse_duration(text, option)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(
            f"{option} {raw!r}: expected a time like 2026-11-25T10:00 or 2026-11-25 (UTC), "
            "or a duration ago like 6h or 2d"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# -- endpoints -----------------------------------------------------------------------------------


@webhooks_app.command("add")
@handled
def add(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="https:// URL that receives the events.")],
    events: Annotated[
        str,
        typer.Option("--events", help="Comma-separated event types, or * for all (default)."),
    ] = "*",
    description: Annotated[
        str | None, typer.Option("--description", help="What this endpoint is for.")
    ] = None,
) -> None:
    """Add an endpoint. Prints its id and its signing secret: the secret is shown only now."""
    mailer = mailer_for(ctx)
    view, secret = webhook_endpoints.add(
        mailer.engine,
        url,
        events.split(","),
        allow_private=mailer.settings.webhook_allow_private,
        description=description,
    )
    print_line(f"Added webhook endpoint {view.uid} for {view.url}")
    print_line(f"events: {', '.join(view.events)}")
    print_line(f"secret: {secret}")
    print_line(
        "Keep the secret where the consumer verifies signatures; it is not shown again "
        "(`mailer webhooks rotate-secret` makes a new one). Events from now on are delivered; "
        "earlier ones with `mailer webhooks replay --since TIME`."
    )


def _endpoint_dict(view: webhook_endpoints.EndpointView) -> dict[str, Any]:
    return {
        "id": view.uid,
        "url": view.url,
        "description": view.description,
        "events": view.events,
        "enabled": view.enabled,
        "disabled_reason": view.disabled_reason,
        "created_at": iso_text(view.created_at),
        "previous_secret_until": iso_text(view.previous_secret_until),
        "pending": view.pending,
        "delivered": view.delivered,
        "dead": view.dead,
    }


@webhooks_app.command("list")
@handled
def list_endpoints(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Endpoints with their events, state and delivery counts (never their secrets)."""
    views = webhook_endpoints.list_endpoints(mailer_for(ctx).engine)
    if as_json:
        print_line(json.dumps([_endpoint_dict(v) for v in views], indent=2, ensure_ascii=False))
        return
    if not views:
        print_line("No webhook endpoints (`mailer webhooks add URL --events ...`).")
        return
    table = Table(title="Webhook endpoints")
    table.add_column("id", no_wrap=True)
    for column in ("url", "events", "state"):
        table.add_column(column, overflow="fold")
    for column in ("pending", "delivered", "dead"):
        table.add_column(column, justify="right", no_wrap=True)
    for v in views:
        state = "enabled" if v.enabled else f"disabled: {v.disabled_reason or ''}"
        if v.previous_secret_until is not None and v.previous_secret_until > utcnow():
            state += f" (old secret signs until {when_text(v.previous_secret_until)})"
        table.add_row(
            v.uid,
            v.url,
            ", ".join(v.events),
            state,
            str(v.pending),
            str(v.delivered),
            str(v.dead),
        )
    out.print(table)


@webhooks_app.command("disable")
@handled
def disable(
    ctx: typer.Context,
    endpoint: EndpointArg,
    reason: Annotated[str | None, typer.Option("--reason", help="Kept with the endpoint.")] = None,
) -> None:
    """Pause an endpoint: nothing is sent to it and new events are not queued for it."""
    view = webhook_endpoints.set_enabled(mailer_for(ctx).engine, endpoint, False, reason)
    print_line(
        f"Disabled {view.uid} ({view.url}); {view.pending} deliveries wait. Events from now "
        "until it is enabled again come back with `mailer webhooks replay --since TIME`."
    )


@webhooks_app.command("enable")
@handled
def enable(ctx: typer.Context, endpoint: EndpointArg) -> None:
    """Resume an endpoint: waiting deliveries go out, new events are queued for it again."""
    view = webhook_endpoints.set_enabled(mailer_for(ctx).engine, endpoint, True)
    print_line(f"Enabled {view.uid} ({view.url}); {view.pending} deliveries waiting to go out.")


@webhooks_app.command("remove")
@handled
def remove(ctx: typer.Context, endpoint: EndpointArg) -> None:
    """Delete an endpoint with its deliveries and their attempts (the events stay)."""
    view = webhook_endpoints.remove(mailer_for(ctx).engine, endpoint)
    total = view.pending + view.delivered + view.dead
    print_line(f"Removed {view.uid} ({view.url}) and its {total} deliveries.")


@webhooks_app.command("rotate-secret")
@handled
def rotate_secret(
    ctx: typer.Context,
    endpoint: EndpointArg,
    grace: Annotated[
        str,
        typer.Option(
            "--grace", help="How long the old secret keeps signing too, e.g. 24h, 2d or 0."
        ),
    ] = "24h",
) -> None:
    """A new signing secret, printed once; the old one signs beside it during the grace period."""
    period = parse_duration(grace, "--grace")
    view, secret = webhook_endpoints.rotate_secret(mailer_for(ctx).engine, endpoint, period)
    print_line(f"New secret for {view.uid} ({view.url}):")
    print_line(f"secret: {secret}")
    if view.previous_secret_until is not None:
        print_line(
            "Deliveries carry signatures with the old and the new secret until "
            f"{when_text(view.previous_secret_until)}: switch the consumer over before then."
        )
    else:
        print_line("The old secret no longer signs.")


# -- deliveries ----------------------------------------------------------------------------------


def _delivery_dict(d: webhook_store.DeliveryView) -> dict[str, Any]:
    return {
        "id": d.id,
        "event_id": d.event_uid,
        "event_type": d.event_type,
        "occurred_at": iso_text(d.occurred_at),
        "endpoint": d.endpoint_uid,
        "status": d.status,
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "last_attempt_at": iso_text(d.last_attempt_at),
        "next_attempt_at": iso_text(d.next_attempt_at),
        "delivered_at": iso_text(d.delivered_at),
        "dead_at": iso_text(d.dead_at),
    }


def _attempt_dict(a: webhook_store.AttemptView) -> dict[str, Any]:
    return {
        "attempted_at": iso_text(a.attempted_at),
        "status_code": a.status_code,
        "response": a.response,
        "error": a.error,
        "duration_ms": a.duration_ms,
    }


def _one_line(text: str | None, limit: int = 120) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@webhooks_app.command("deliveries")
@handled
def deliveries(
    ctx: typer.Context,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="Endpoint id.")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="pending, delivered, dead or cancelled.")
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--event-type", help="e.g. consent.withdrawn")
    ] = (None),
    delivery: Annotated[
        str | None,
        typer.Option(
            "--id", help="A delivery number, or an event id (evt_...): show every attempt."
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
    as_json: JsonOption = False,
) -> None:
    """Deliveries, newest first: event, endpoint, status, attempts, last answer, next attempt.
    With --id, each attempt with the start of the consumer's response."""
    engine = mailer_for(ctx).engine
    delivery_id: int | None = None
    event_uid: str | None = None
    if delivery is not None:
        text = delivery.strip()
        if text.isdigit():
            delivery_id = int(text)
        elif text.startswith("evt_"):
            event_uid = text
        else:
            raise BadInput(f"--id {delivery!r}: a delivery number or an event id (evt_...)")
    views = webhook_store.list_deliveries(
        engine,
        endpoint_uid=endpoint,
        status=status,
        event_type=event_type,
        event_uid=event_uid,
        delivery_id=delivery_id,
        limit=limit,
    )
    if delivery is not None and not views:
        raise NotFound(f"no webhook delivery {delivery}")
    detailed = {v.id: webhook_store.attempts_of(engine, v.id) for v in views} if delivery else {}
    if as_json:
        payload = [
            {**_delivery_dict(v), **({"tries": [_attempt_dict(a) for a in detailed[v.id]]})}
            if delivery
            else _delivery_dict(v)
            for v in views
        ]
        print_line(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    if not views:
        print_line("No webhook deliveries match.")
        return
    table = Table(title="Webhook deliveries (newest first)")
    for column in ("#", "event", "type", "endpoint", "status", "tries", "last answer", "next"):
        table.add_column(column, overflow="fold")
    for v in views:
        answer = str(v.last_status_code) if v.last_status_code is not None else ""
        if v.last_error:
            answer = f"{answer} {_one_line(v.last_error, 60)}".strip()
        table.add_row(
            str(v.id),
            v.event_uid,
            v.event_type,
            v.endpoint_uid,
            v.status,
            str(v.attempts),
            answer,
            when_text(v.next_attempt_at) if v.status == "pending" else "",
        )
    out.print(table)
    for v in views if delivery else []:
        print_line(
            f"Delivery {v.id}: {v.event_uid} ({v.event_type}) to {v.endpoint_uid}, {v.status}"
        )
        for number, a in enumerate(detailed[v.id], start=1):
            outcome = str(a.status_code) if a.status_code is not None else (a.error or "")
            print_line(f"  {number}. {when_text(a.attempted_at)}  {outcome}  {a.duration_ms} ms")
            if a.response:
                print_line(f"     response: {_one_line(a.response, 200)}")


@webhooks_app.command("replay")
@handled
def replay(
    ctx: typer.Context,
    dead: Annotated[bool, typer.Option("--dead", help="Re-send dead-lettered deliveries.")] = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Re-send events from this time (ISO 8601, UTC) or 6h/2d ago."),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="... up to this time (default now).")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Only this endpoint (default all enabled).")
    ] = None,
    event_type: Annotated[str | None, typer.Option("--event-type", help="Only this type.")] = None,
) -> None:
    """Queue events again, with their original webhook-id: dead letters (--dead), or every
    event in a time range, also ones from before an endpoint existed or while it was off
    (opens and clicks not yet announced are announced first)."""
    if dead == (since is not None):
        raise BadInput("replay: give either --dead or --since TIME")
    if until is not None and since is None:
        raise BadInput("replay: --until needs --since")
    engine = mailer_for(ctx).engine
    now = utcnow()
    if dead:
        count = webhook_store.replay_dead(engine, now, endpoint_uid=endpoint, event_type=event_type)
        print_line(
            f"Queued {count} dead-lettered deliveries again; `mailer webhooks run` sends them."
        )
        return
    assert since is not None
    start = parse_time(since, "--since", now)
    end = parse_time(until, "--until", now) if until is not None else None
    if event_type is None or event_type.strip() in ENGAGEMENT_TYPES:
        # opens and clicks the dispatcher has not announced yet belong in the range too
        announced = announce_engagement(engine, settle=timedelta(0), now=now)
        if announced:
            print_line(
                f"Announced {announced} opens and clicks first: they are new events, queued "
                "for every endpoint subscribed to them."
            )
    count = webhook_store.replay_range(
        engine, now, start, end, endpoint_uid=endpoint, event_type=event_type
    )
    print_line(
        f"Queued {count} deliveries of events from {when_text(start)} to {when_text(end or now)}; "
        "`mailer webhooks run` sends them."
    )


# -- the dispatcher ------------------------------------------------------------------------------


def _summary(stats: DispatchStats) -> str:
    text = (
        f"{stats.delivered} delivered, {stats.retrying} to retry later, "
        f"{stats.dead} dead-lettered ({stats.attempts} attempts)"
    )
    if stats.disabled:
        text += f"; disabled after 410 Gone: {', '.join(sorted(stats.disabled))}"
    if stats.released:
        text += f"; {stats.released} claimed but not sent, released"
    if stats.announced:
        text += f"; {stats.announced} opens and clicks announced"
    if stats.announce_failures:
        text += f"; announcing opens and clicks failed {stats.announce_failures} times (logged)"
    return text


@webhooks_app.command("run")
@handled
def run(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="Deliver what is due now, then exit.")
    ] = False,
    batch: Annotated[
        int, typer.Option("--batch", min=1, max=MAX_BATCH, help="Deliveries claimed at a time.")
    ] = 200,
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", min=1, max=MAX_CONCURRENCY, help="Requests in flight."),
    ] = 32,
    per_endpoint: Annotated[
        int,
        typer.Option("--per-endpoint", min=1, max=MAX_CONCURRENCY, help="... to one endpoint."),
    ] = 16,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=300, help="Seconds per request.")
    ] = 10.0,
    poll: Annotated[
        float,
        typer.Option("--poll", min=0.05, max=60, help="Seconds between looks when idle."),
    ] = 1.0,
) -> None:
    """The dispatcher: announces recorded opens and clicks, sends due deliveries, retries with
    backoff, until Ctrl-C or SIGTERM (what is in flight finishes; the rest is released). Run
    several on PostgreSQL to share the work. Exit code 1 when an attempt failed
    (`mailer webhooks deliveries` says why)."""
    mailer = mailer_for(ctx)
    options = DispatchOptions(
        batch=batch,
        concurrency=concurrency,
        per_endpoint=per_endpoint,
        timeout=timeout,
        poll=poll,
        allow_private=mailer.settings.webhook_allow_private,
    )
    dispatcher = Dispatcher(mailer.engine, options)
    if not once:
        typer.echo(f"Dispatcher {dispatcher.owner} running; Ctrl-C to stop.", err=True)
    stats = asyncio.run(dispatcher.run(once=once, handle_signals=True))
    print_line(("Done: " if once else "Stopped: ") + _summary(stats) + ".")
    if stats.failed:
        raise typer.Exit(1)
