"""`mailer inbound process|serve`: bounces, complaints and mailto unsubscribes in, thin.

Registered in mailer.cli with `app.add_typer(...)`; the shared pieces (error handling, the
Mailer for a command, the consoles) come from mailer.cli_support.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mailer.cli_support import handled, mailer_for, print_line
from mailer.inbound_files import ItemReport, RunReport, process_path
from mailer.inbound_smtp import DEFAULT_PORT, InboundSmtpServer, check_host, serve_until

if TYPE_CHECKING:
    from mailer.inbound import InboundResult


inbound_app = typer.Typer(
    help="Bounces, complaints and mailto unsubscribes: from a mailbox or over SMTP.",
    no_args_is_help=True,
)


def _line(item: ItemReport) -> str:
    result = item.result
    moved = f" -> {item.moved_to}" if item.moved_to else ""
    return f"{item.source}: {result.kind} {result.outcome}: {result.detail}{moved}"


@inbound_app.command("process")
@handled
def process(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="A maildir, an mbox file, a folder of .eml files or one .eml.")
    ],
    limit: Annotated[
        int | None, typer.Option(min=1, help="Process at most this many mails.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Process DSN bounces, ARF complaints and mails to the unsubscribe address.

    Mails not understood are reported and moved aside. Exit 0 when the run completed.
    """
    mailer = mailer_for(ctx)
    report = process_path(
        mailer, path, limit=limit, on_item=None if as_json else lambda i: print_line(_line(i))
    )
    if as_json:
        print_line(json.dumps(_as_json(report), indent=2))
    else:
        print_line(_summary(report))
    if not report.complete:
        raise typer.Exit(1)


def _summary(report: RunReport) -> str:
    counts = report.counts()
    parts = [
        f"{counts.get(outcome, 0)} {outcome}" for outcome in ("processed", "unmatched", "failed")
    ]
    if counts.get("error"):
        parts.append(f"{counts['error']} not processed")
    text = f"{report.path} ({report.layout}): {len(report.items)} mails: {', '.join(parts)}"
    if report.stopped:
        text += f"; stopped: {report.stopped}"
    return text


def _as_json(report: RunReport) -> dict[str, object]:
    return {
        "path": str(report.path),
        "layout": report.layout.value,
        "counts": report.counts(),
        "stopped": report.stopped,
        "mails": [
            {"source": item.source, "moved_to": item.moved_to, **item.result.as_dict()}
            for item in report.items
        ],
    }


@inbound_app.command("serve")
@handled
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    aside: Annotated[
        Path,
        typer.Option(help="Maildir that keeps mails not understood (.unmatched, .failed)."),
    ] = Path("inbound-aside"),
    allow_remote: Annotated[
        bool, typer.Option(help="Allow listening on a non-loopback address.")
    ] = False,
) -> None:
    """Receive bounces, complaints and mailto unsubscribes over SMTP (Ctrl-C stops)."""
    check_host(host, allow_remote)
    mailer = mailer_for(ctx)

    def report(result: InboundResult) -> None:
        print_line(f"{result.kind} {result.outcome}: {result.detail}")

    def ready(server: InboundSmtpServer) -> None:
        print_line(f"Listening for inbound mail on {server.host}:{server.port}; Ctrl-C stops.")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = InboundSmtpServer(mailer, host=host, port=port, aside=aside, on_result=report)
        await serve_until(server, stop, ready)

    asyncio.run(run())
    print_line("Stopped.")
