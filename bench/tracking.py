"""Tracking benchmark: the pixel and the click redirect under wrk, against yardsticks.

    .venv/bin/python bench/tracking.py                  # 10 s per run, SQLite and PostgreSQL
    .venv/bin/python bench/tracking.py --quick          # 3 s per run, a smoke run
    .venv/bin/python bench/tracking.py --db pg --duration 20

In one run, all on loopback, every server under the same uvicorn settings (`mailer serve`'s:
uvloop, httptools, the shared listening socket, no access log) and measured by the same wrk
command (`wrk -t2 -c64 --latency`, a Lua script choosing a random token per request):

  * mailer: `mailer serve --workers 1` and `--workers 2`, on the embedded SQLite database and
    on PostgreSQL (a fresh schema, dropped afterwards). `/o/TOKEN` and `/c/TOKEN` with valid
    tokens taken from the mails of a real campaign (20,000 recipients, three links), each
    verified and each recorded as an event;
  * the bare Starlette app (`bare_app` below): the same routes returning the same GIF and a
    302 to a fixed URL, without token, recording or middleware; 1 and 2 workers, measured
    right before each mailer run it is compared with (on a shared machine the load moves
    within minutes: a yardstick measured minutes apart says little);
  * nginx (Debian package) serving the same GIF and redirect from a config written into a
    temporary folder, in the foreground, on another loopback port (stopped at the end).

Printed: requests/s, p99 latency, wrk's errors, the ratios to the bare app and to nginx, the
load average, and events written against hits received (nothing may be lost: every hit a
worker received, by the account each worker logs as it shuts down, must have its engagement
event once the server has shut down, and its message.opened or message.clicked in the outbox
once they are announced, as the webhook dispatcher does, right after; and every request wrk
saw answered must be among the hits received). Announcing is timed too: the outbox's cost,
moved from the server to the dispatcher, in rows a second. Nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import email
import email.policy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "tracking"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_KEY = "bench-key-0123456789abcdefghijklmnopqrstuvwxyz-not-secret"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
RECIPIENTS = 20_000
CONNECTIONS = 64
WRK_THREADS = 2
REDIRECT_TO = "https://shop.example.com/autumn"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CAMPAIGN_HTML = """<p>Hallo {{ contact.first_name or "klant" }},</p>
<p>Onze <a href="https://shop.example.com/autumn">herfstaanbieding</a>,
<a href="https://shop.example.com/tips?x=1&amp;y=2">tips</a> en
<a href="https://shop.example.com/contact">contact</a>.</p>
"""
WRK_SCRIPT = """
local paths = {}

function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "errors": %d, "non_2xx_3xx": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""
NGINX_CONF = """
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location /o/ {{
      root {tmp};
      default_type image/gif;
      add_header Cache-Control "no-store, max-age=0";
      try_files /pixel.gif =404;
    }}
    location /c/ {{
      add_header Cache-Control "no-store, max-age=0";
      return 302 {redirect};
    }}
  }}
}}
"""


# -- the bare Starlette yardstick ---------------------------------------------------------------


def bare_app() -> Any:
    """The same two answers with nothing behind them: the ceiling for a Starlette app."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import Route

    from mailer.tracking.routes import NO_STORE, PIXEL

    async def pixel(request: Request) -> Response:
        return Response(PIXEL, media_type="image/gif", headers=NO_STORE)

    async def click(request: Request) -> Response:
        return RedirectResponse(REDIRECT_TO, status_code=302, headers=NO_STORE)

    return Starlette(
        routes=[
            Route("/o/{token:path}", pixel, methods=["GET"]),
            Route("/c/{token}", click, methods=["GET"]),
        ]
    )


def serve_bare(port: int, workers: int) -> None:
    """Runs in a child process: the bare app under mailer's own uvicorn settings."""
    from mailer.tracking.app import serve

    serve("tracking:bare_app", port=port, workers=workers, log_level="warning")


# -- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"no answer from {url} within {timeout} s")


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Run:
    server: str
    workers: int
    route: str
    group: str = ""  # the database run a bare-app yardstick was measured beside
    load: float = 0.0  # the machine's 1-minute load average when the run ended
    requests: int = 0
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: int = 0
    non_2xx_3xx: int = 0


def wrk(port: int, paths_file: Path, script: Path, seconds: float) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
        "-H",
        f"User-Agent: {USER_AGENT}",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}",
        "--",
        str(paths_file),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    match = re.search(r"^WRK_JSON (.*)$", done.stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


def measure(
    server: str,
    workers: int,
    port: int,
    paths: dict[str, Path],
    script: Path,
    seconds: float,
    warmup: float,
) -> tuple[list[Run], int]:
    """One wrk run per route (after a warm-up run); returns the runs and the number of
    requests the warm-ups had answered."""
    runs = []
    warmed = 0
    for route, paths_file in paths.items():
        if warmup:
            warmed += wrk(port, paths_file, script, warmup)["requests"]
        raw = wrk(port, paths_file, script, seconds)
        run = Run(
            server,
            workers,
            route,
            requests=raw["requests"],
            rate=raw["requests"] / (raw["duration_us"] / 1e6),
            p50_ms=raw["p50_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000,
            max_ms=raw["max_us"] / 1000,
            errors=raw["errors"],
            non_2xx_3xx=raw["non_2xx_3xx"],
            load=os.getloadavg()[0],
        )
        runs.append(run)
        print(
            f"  {server:<18} workers={workers} {route:<6} {run.rate:>9,.0f} req/s  "
            f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  errors {run.errors}  "
            f"load {run.load:.1f}"
            f"{f'  non-2xx/3xx {run.non_2xx_3xx}' if run.non_2xx_3xx else ''}",
            flush=True,
        )
    return runs, warmed


# -- the database and the tokens ------------------------------------------------------------------


def check_loopback_pg(url: str) -> None:
    host = urlsplit(url).hostname or "localhost"
    if host not in LOOPBACK:
        raise SystemExit(f"refusing a PostgreSQL server that is not on loopback: {host}")


@contextlib.contextmanager
def pg_schema(admin_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text

    from mailer.config import normalise_database_url

    engine = create_engine(normalise_database_url(admin_url))
    schema = f"bench_tracking_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in admin_url else "?"
    try:
        yield f"{admin_url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def environment(database_url: str) -> dict[str, str]:
    return {
        "MAILER_DATABASE_URL": database_url,
        "MAILER_SECRET_KEYS": BENCH_KEY,
        "MAILER_SENDER_NAME": "Actief Klussenservice",
        "MAILER_POSTAL_ADDRESS": "Voorbeeldstraat 1, 3511 AA Utrecht",
        "MAILER_OPERATOR": "bench",
    }


def prepare(database_url: str, folder: Path) -> dict[str, list[str]]:
    """A campaign really sent (to an in-memory transport) to RECIPIENTS contacts who allow
    tracking; returns the pixel and click paths found in the mails."""
    import asyncio

    from sqlalchemy import update

    from mailer.config import load_settings
    from mailer.models import Delivery
    from mailer.service import CampaignService, Mailer
    from mailer.transport import MemoryTransport

    mailer = Mailer(load_settings(environment(database_url), cwd=folder))
    mailer.init()
    contacts = folder / "contacts.csv"
    with contacts.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "first_name", "consent_purposes", "consent_at", "consent_source"])
        for i in range(RECIPIENTS):
            writer.writerow(
                [f"reader{i}@example.org", f"Lezer{i}", "marketing;tracking", "2026-01-05", "web"]
            )
    mailer.import_contacts(contacts)
    (folder / "bench.html").write_text(CAMPAIGN_HTML, encoding="utf-8")
    campaign = folder / "bench.toml"
    campaign.write_text(
        'name = "bench"\nsubject = "Herfst"\nfrom = "Shop <news@shop.example.com>"\n'
        'template = "bench.html"\n',
        encoding="utf-8",
    )
    transport = MemoryTransport()
    asyncio.run(CampaignService(mailer).send(campaign, transport=transport))
    deliveries = Delivery.__table__  # type: ignore[attr-defined]
    with mailer.engine.begin() as conn:  # delivered an hour ago: clicks now are a person's
        conn.execute(update(deliveries).values(finished_at=datetime.now(UTC) - timedelta(hours=1)))
    mailer.close()
    found: dict[str, list[str]] = {"pixel": [], "click": []}
    for message in transport.messages:
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        html = parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
        found["pixel"] += re.findall(r'src="http://127\.0\.0\.1:8000(/o/[^"]+)"', html)
        clicks = re.findall(r'href="http://127\.0\.0\.1:8000(/c/[^"]+)"', html)
        found["click"] += clicks[:-1]  # the last one is the honeypot
    assert len(found["pixel"]) == RECIPIENTS and len(found["click"]) == RECIPIENTS * 3
    return found


def announce_recorded(database_url: str, folder: Path) -> float:
    """Announce every open and click recorded (as `mailer webhooks run` does, without the settle
    delay: the server has stopped); returns the seconds it took."""
    from mailer.config import load_settings
    from mailer.engagement_announce import announce_engagement
    from mailer.service import Mailer

    mailer = Mailer(load_settings(environment(database_url), cwd=folder))
    try:
        started = time.perf_counter()
        announce_engagement(mailer.engine, settle=timedelta(0))
        return time.perf_counter() - started
    finally:
        mailer.close()


def event_count(database_url: str, folder: Path) -> tuple[int, int]:
    """Engagement events, and the outbox events announcing opens and clicks."""
    from sqlalchemy import func, select

    from mailer.config import load_settings
    from mailer.models import EngagementEvent, Event
    from mailer.service import Mailer

    mailer = Mailer(load_settings(environment(database_url), cwd=folder))
    try:
        with mailer.engine.connect() as conn:
            table = EngagementEvent.__table__  # type: ignore[attr-defined]
            written = conn.execute(select(func.count()).select_from(table)).scalar_one()
            outbox = Event.__table__  # type: ignore[attr-defined]
            announced = conn.execute(
                select(func.count())
                .select_from(outbox)
                .where(outbox.c.type.in_(("message.opened", "message.clicked")))
            ).scalar_one()
            return int(written), int(announced)
    finally:
        mailer.close()


_ACCOUNT = re.compile(r"opens and clicks: (\d+) received, (\d+) written")


def received_hits(log: str, workers: int) -> int:
    """The hits `mailer serve`'s workers received, from the line each logs as it shuts down
    (mailer.engagement.RecorderStats.account); the server's log is echoed if one is missing."""
    found = [int(match[1]) for match in _ACCOUNT.finditer(log)]
    if len(found) != workers:
        print(log, file=sys.stderr)
        raise SystemExit(f"{len(found)} of {workers} workers gave their account at shutdown")
    return sum(found)


# -- the runs --------------------------------------------------------------------------------------


@dataclass
class EventCheck:
    server: str
    workers: int
    requests: int  # answered, as wrk counted them
    events: int
    announced: int  # outbox events (message.opened / message.clicked)
    # hits the workers received, by their own account at shutdown (wrk does not count the
    # requests still in flight when it stops, which the server answered and recorded)
    received: int = 0
    announce_seconds: float = 0.0  # announcing them after shutdown (the dispatcher's work)
    # engagement events written when the last wrk run ended, before the server was stopped,
    # and that run's rate: how far recording lagged behind the load
    written_by_end: int = 0
    last_rate: float = 0.0

    @property
    def behind_seconds(self) -> float:
        """Seconds of the last run's traffic not yet written when the load stopped (the writer
        flushes once a second, so up to about 1 is expected)."""
        behind = max(self.requests - self.written_by_end, 0)
        return behind / self.last_rate if self.last_rate else 0.0

    @property
    def lost(self) -> int:
        """Hits the workers received that are not in the database, or not in the outbox
        once announced; and requests wrk saw answered beyond what the workers received (a
        hit answered without being recorded)."""
        stored = min(self.events, self.announced)
        return max(self.received - stored, 0) + max(self.requests - self.received, 0)

    @property
    def announce_rate(self) -> float:
        """Rows announced a second: the outbox's cost, now the dispatcher's."""
        return self.announced / self.announce_seconds if self.announce_seconds else 0.0


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    events: list[EventCheck] = field(default_factory=list)


def run_mailer(
    label: str,
    database_url: str,
    folder: Path,
    paths: dict[str, Path],
    script: Path,
    args: argparse.Namespace,
    results: Results,
) -> None:
    for workers in (1, 2):
        # the yardstick right before, so that both see the same load of a shared machine
        run_bare(paths, script, args, results, label, (workers,))
        before = event_count(database_url, folder)
        port = free_port()
        command = [sys.executable, "-m", "mailer", "serve", "--port", str(port)]
        command += ["--workers", str(workers), "--log-level", "info"]
        env = {**os.environ, **environment(database_url)}
        log = folder / f"serve-{workers}.log"
        with log.open("wb") as log_file:
            server = subprocess.Popen(command, cwd=folder, env=env, stderr=log_file)
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz", server)
            runs, warmed = measure(label, workers, port, paths, script, args.duration, args.warmup)
            written_by_end = event_count(database_url, folder)[0] - before[0]
        finally:
            stop(server)  # SIGTERM: each worker writes what it still holds, then exits
        received = received_hits(log.read_text(), workers)
        seconds = announce_recorded(database_url, folder)
        after = event_count(database_url, folder)
        written, announced = after[0] - before[0], after[1] - before[1]
        answered = sum(r.requests for r in runs) + warmed
        for run in runs:
            run.group = label
        results.runs += runs
        check = EventCheck(
            label,
            workers,
            answered,
            written,
            announced,
            received,
            seconds,
            written_by_end,
            runs[-1].rate,
        )
        results.events.append(check)
        print(
            f"  {label:<18} workers={workers} events written {written:,} (outbox {announced:,}) "
            f"for {received:,} hits received ({answered:,} answered as wrk counted, warm-ups "
            f"included): lost {check.lost}; "
            f"written when the load stopped {written_by_end:,} "
            f"({check.behind_seconds:.1f} s of traffic behind); "
            f"announced in {seconds:.2f} s, {check.announce_rate:,.0f} rows/s",
            flush=True,
        )


def run_bare(
    paths: dict[str, Path],
    script: Path,
    args: argparse.Namespace,
    results: Results,
    group: str,
    workers_counts: tuple[int, ...] = (1, 2),
) -> None:
    for workers in workers_counts:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--serve-bare", str(port), str(workers)],
            cwd=ROOT,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/o/x", server)
            runs, _ = measure(
                "bare Starlette", workers, port, paths, script, args.duration, args.warmup
            )
            for run in runs:
                run.group = group
            results.runs += runs
        finally:
            stop(server)


def run_nginx(
    paths: dict[str, Path], script: Path, args: argparse.Namespace, results: Results
) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        print("  nginx: not installed (apt-get install nginx-light); skipped")
        return
    from mailer.tracking.routes import PIXEL

    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as raw:
        tmp = Path(raw)
        tmp.chmod(0o755)  # nginx's workers run as nobody
        (tmp / "pixel.gif").write_bytes(PIXEL)
        (tmp / "pixel.gif").chmod(0o644)
        for workers in (1, 2):
            port = free_port()
            conf = tmp / "nginx.conf"
            config = NGINX_CONF.format(workers=workers, tmp=tmp, port=port, redirect=REDIRECT_TO)
            conf.write_text(config)
            server = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"])
            try:
                wait_for(f"http://127.0.0.1:{port}/o/x", server)
                runs, _ = measure("nginx", workers, port, paths, script, args.duration, args.warmup)
                results.runs += runs
            finally:
                stop(server)


def report(results: Results) -> list[str]:
    def find(server: str, workers: int, route: str, group: str | None = None) -> Run | None:
        for run in results.runs:
            if (run.server, run.workers, run.route) == (server, workers, route) and (
                group is None or run.group == group
            ):
                return run
        return None

    lines = [
        f"{'server':<20}{'workers':>8}{'route':>7}{'req/s':>11}{'p99 ms':>9}"
        f"{'vs bare':>9}{'vs nginx':>10}{'errors':>8}{'load':>6}"
    ]
    for run in results.runs:
        bare = find("bare Starlette", run.workers, run.route, run.group or None)
        nginx = find("nginx", run.workers, run.route)
        name = run.server
        if name == "bare Starlette" and run.group:
            name = f"bare, by {run.group.split()[-1]}"
        lines.append(
            f"{name:<20}{run.workers:>8}{run.route:>7}{run.rate:>11,.0f}{run.p99_ms:>9.2f}"
            f"{run.rate / bare.rate if bare else float('nan'):>9.2f}"
            f"{run.rate / nginx.rate if nginx else float('nan'):>10.3f}"
            f"{run.errors + run.non_2xx_3xx:>8}{run.load:>6.1f}"
        )
    lines.append("")
    for check in results.events:
        lines.append(
            f"{check.server} x{check.workers}: {check.events:,} events written "
            f"({check.announced:,} in the outbox) for {check.received:,} hits received "
            f"({check.requests:,} answered as wrk counted, warm-ups included), lost "
            f"{check.lost}; {check.written_by_end:,} written when "
            f"the load stopped ({check.behind_seconds:.1f} s of traffic behind); announcing "
            f"(the dispatcher's work) {check.announce_rate:,.0f} rows/s"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "pg", "both"), default="both")
    parser.add_argument("--pg", default=DEFAULT_PG, help="admin URL of a loopback PostgreSQL")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up")
    parser.add_argument("--serve-bare", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(*args.serve_bare)
        return
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if args.db in ("pg", "both"):
        check_loopback_pg(args.pg)

    results = Results()
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as raw:
        tmp = Path(raw)
        script = tmp / "tokens.lua"
        script.write_text(WRK_SCRIPT, encoding="utf-8")
        backends: list[tuple[str, Any]] = []
        if args.db in ("sqlite", "both"):
            backends.append(
                ("mailer SQLite", contextlib.nullcontext(f"sqlite:///{tmp / 'mailer.db'}"))
            )
        if args.db in ("pg", "both"):
            backends.append(("mailer PostgreSQL", pg_schema(args.pg)))
        paths: dict[str, Path] = {}
        for label, database in backends:
            with database as database_url:
                folder = tmp / label.split()[-1].lower()
                folder.mkdir()
                print(f"{label}: sending the campaign to {RECIPIENTS:,} recipients ...", flush=True)
                found = prepare(database_url, folder)
                paths = {}
                for route, items in (("/o/", found["pixel"]), ("/c/", found["click"])):
                    paths_file = folder / f"{route.strip('/')}.txt"
                    paths_file.write_text("\n".join(items) + "\n", encoding="utf-8")
                    paths[route] = paths_file
                run_mailer(label, database_url, folder, paths, script, args, results)
        run_nginx(paths, script, args, results)

    lines = report(results)
    print()
    print("\n".join(lines))
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {
        "when": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(),
        "connections": CONNECTIONS,
        "duration": args.duration,
        "runs": [asdict(r) for r in results.runs],
        "events": [
            {
                **asdict(c),
                "lost": c.lost,
                "announce_rate": c.announce_rate,
                "behind_seconds": c.behind_seconds,
            }
            for c in results.events
        ],
        "table": lines,
    }
    (OUT / f"tracking-{stamp}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
