"""Webhook benchmark: events delivered per second by `mailer webhooks run` to a local consumer.

    flock /tmp/mailer-bench.lock .venv/bin/python bench/webhooks.py            # 20,000 events
    flock /tmp/mailer-bench.lock .venv/bin/python bench/webhooks.py --quick    # 2,000, a smoke run

In one run, all on loopback:

  * the consumer: a minimal ASGI app (reads the body, answers 204) under uvicorn with uvloop
    and httptools, in its own process (`--consumer-workers`, default 1);
  * wrk POSTs a body of the same size to it over the same number of connections: the
    consumer's own limit, to show it is not what limits mailer;
  * the yardstick: a bare httpx.AsyncClient loop POSTing the same body with the same number of
    requests in flight, no database, no signing: the limit of the HTTP client mailer uses;
  * mailer: N `consent.withdrawn` events emitted (emit_many, before the clock starts) for one
    endpoint subscribed to '*', then `mailer webhooks run --once` with `--concurrency C
    --per-endpoint C --batch B`: one dispatcher on SQLite, one on PostgreSQL, and two
    dispatcher processes on PostgreSQL sharing the outbox (SKIP LOCKED claims).

The rate is N / (last delivered_at - first attempted_at) read back from the database, so
process start-up is not counted (it is in the wall time printed beside it); every delivery
must end `delivered`, once. CPU ms per event is the dispatchers' user+system time (wait4).
Printed: events/s, ratio to the httpx yardstick and to wrk, and the load average. No timing
is asserted anywhere (DESIGN.md). Only loopback PostgreSQL servers are accepted; each
PostgreSQL run gets a fresh schema, dropped afterwards. Every child has a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_KEY = "bench-key-0123456789abcdefghijklmnopqrstuvwxyz-not-secret"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
RUNS = ("sqlite", "pg", "pg2")
LABELS = {"sqlite": "mailer SQLite x1", "pg": "mailer PostgreSQL x1", "pg2": "mailer PostgreSQL x2"}
CHILD_TIMEOUT = 900.0


# -- the consumer (imported by uvicorn in its own process) ---------------------------------------


async def consumer_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


# -- helpers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def sample_body() -> bytes:
    """An event body of the size mailer sends for these events."""
    from datetime import UTC, datetime

    from mailer.events import body

    data = {"contact_id": 123456, "email": "p123456@example.org", "purpose": "marketing"}
    return body("consent.withdrawn", datetime.now(UTC), data)


@contextlib.contextmanager
def consumer(workers: int) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(HERE),
            "webhooks:consumer_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wrk_limit(port: int, connections: int, body: bytes, seconds: int) -> float | None:
    if not Path("/usr/bin/wrk").exists():
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body.decode())}\n"
            'wrk.headers["content-type"] = "application/json"\n'
        )
    try:
        out = subprocess.run(
            [
                "/usr/bin/wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}/hook",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


def child_httpx(port: int, count: int, concurrency: int) -> dict[str, Any]:
    """The yardstick: httpx POSTs, `concurrency` in flight, nothing else."""
    import httpx

    body = sample_body()
    url = f"http://127.0.0.1:{port}/hook"

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            counter = iter(range(count))

            async def worker() -> None:
                for _ in counter:
                    response = await client.post(
                        url, content=body, headers={"content-type": "application/json"}
                    )
                    assert response.status_code == 204

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - started

    seconds = asyncio.run(main())
    return {"seconds": seconds, "rate": count / seconds}


def run_child(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return {"process": process, "started": started}


def reap(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wait for children (bounded), with their CPU time from wait4."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    results = []
    for child in children:
        process: subprocess.Popen[bytes] = child["process"]
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"a child ran longer than {CHILD_TIMEOUT:.0f} s: killed")
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
        out = process.stdout.read().decode() if process.stdout else ""
        err = process.stderr.read().decode() if process.stderr else ""
        results.append(
            {
                "wall": time.perf_counter() - child["started"],
                "cpu": usage.ru_utime + usage.ru_stime,
                "code": process.returncode,
                "out": out,
                "err": err,
            }
        )
    return results


def check_loopback_pg(url: str) -> None:
    host = urlsplit(url).hostname or "localhost"
    if host not in LOOPBACK:
        raise SystemExit(f"refusing a PostgreSQL server that is not on loopback: {host}")


@contextlib.contextmanager
def pg_schema(admin_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text

    from mailer.config import normalise_database_url

    engine = create_engine(normalise_database_url(admin_url))
    schema = f"bench_hooks_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in admin_url else "?"
    try:
        yield f"{admin_url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@contextlib.contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as folder:
        yield f"sqlite:///{folder}/mailer.db"


def env_for(database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "MAILER_DATABASE_URL": database_url,
        "MAILER_SECRET_KEYS": BENCH_KEY,
        "MAILER_WEBHOOK_ALLOW_PRIVATE": "true",
    }


def prepare(database_url: str, port: int, count: int) -> float:
    """Schema, one endpoint, `count` events with their pending deliveries; returns emit s."""
    from mailer import events, webhook_endpoints
    from mailer.config import load_settings
    from mailer.events import EventType, NewEvent
    from mailer.service import Mailer

    mailer = Mailer(load_settings(env_for(database_url)))
    try:
        mailer.init()
        webhook_endpoints.add(
            mailer.engine, f"http://127.0.0.1:{port}/hook", ["*"], allow_private=True
        )
        started = time.perf_counter()
        for start in range(0, count, 5000):
            with mailer.engine.begin() as conn:
                events.emit_many(
                    conn,
                    [
                        NewEvent(
                            EventType.CONSENT_WITHDRAWN,
                            {"contact_id": i, "email": f"p{i}@example.org", "purpose": "marketing"},
                            contact_id=i,
                        )
                        for i in range(start, min(count, start + 5000))
                    ],
                )
        return time.perf_counter() - started
    finally:
        mailer.close()


def outcome(database_url: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from mailer.config import normalise_database_url
    from mailer.db import make_engine
    from mailer.models import WebhookAttempt, WebhookDelivery, as_utc

    deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
    attempts = WebhookAttempt.__table__  # type: ignore[attr-defined]
    engine = make_engine(normalise_database_url(database_url))
    try:
        with engine.connect() as conn:
            statuses = dict(
                conn.execute(
                    select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
                ).all()
            )
            tried = conn.execute(select(func.count()).select_from(attempts)).scalar_one()
            first = conn.execute(select(func.min(attempts.c.attempted_at))).scalar()
            last = conn.execute(select(func.max(deliveries.c.delivered_at))).scalar()
    finally:
        engine.dispose()
    span = (as_utc(last) - as_utc(first)).total_seconds() if first and last else float("nan")
    return {"statuses": statuses, "attempts": tried, "span": span}


def run_mailer(kind: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    processes = 2 if kind == "pg2" else 1
    database = sqlite_url() if kind == "sqlite" else pg_schema(args.pg)
    with database as url:
        emit_seconds = prepare(url, port, args.events)
        argv = [
            sys.executable, "-m", "mailer", "webhooks", "run", "--once",
            "--batch", str(args.batch), "--concurrency", str(args.concurrency),
            "--per-endpoint", str(args.concurrency),
        ]  # fmt: skip
        children = [run_child(argv, env_for(url)) for _ in range(processes)]
        results = reap(children)
        for result in results:
            if result["code"] != 0:
                raise SystemExit(f"{kind}: dispatcher failed:\n{result['out']}{result['err']}")
        found = outcome(url)
    if found["statuses"] != {"delivered": args.events} or found["attempts"] != args.events:
        raise SystemExit(f"{kind}: not every event delivered exactly once: {found}")
    return {
        "label": LABELS[kind],
        "rate": args.events / found["span"],
        "span": found["span"],
        "wall": max(r["wall"] for r in results),
        "cpu_ms": 1000 * sum(r["cpu"] for r in results) / args.events,
        "emit_rate": args.events / emit_seconds,
        "load": load(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 events")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--consumer-workers", type=int, default=1)
    parser.add_argument("--runs", default=",".join(RUNS), help="sqlite,pg,pg2")
    parser.add_argument("--pg", default=DEFAULT_PG)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.events = 2_000
    if not 1 <= args.events <= 1_000_000:
        raise SystemExit("--events must be 1..1,000,000")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := set(runs) - set(RUNS):
        raise SystemExit(f"unknown runs: {', '.join(sorted(unknown))}")
    if any(r.startswith("pg") for r in runs):
        check_loopback_pg(args.pg)

    body = sample_body()
    rows: list[dict[str, Any]] = []
    with consumer(args.consumer_workers) as port:
        print(f"consumer: uvicorn x{args.consumer_workers} on 127.0.0.1:{port}; load {load()}")
        wrk = wrk_limit(port, args.concurrency, body, 5 if args.quick else 10)
        print(f"wrk limit ({args.concurrency} connections): {wrk or float('nan'):,.0f} req/s")
        yard = reap(
            [
                run_child(
                    [
                        sys.executable,
                        __file__,
                        "--child-httpx",
                        str(port),
                        str(args.events),
                        str(args.concurrency),
                    ],
                )
            ]
        )[0]
        httpx_rate = json.loads(yard["out"])["rate"]
        print(
            f"httpx yardstick ({args.concurrency} in flight): {httpx_rate:,.0f} req/s, "
            f"{1000 * yard['cpu'] / args.events:.2f} CPU ms/request"
        )
        for kind in runs:
            row = run_mailer(kind, args, port)
            rows.append(row)
            versus_wrk = f", {row['rate'] / wrk:.2f} of wrk" if wrk else ""
            print(
                f"{row['label']}: {row['rate']:,.0f} events/s "
                f"({row['rate'] / httpx_rate:.2f} of httpx{versus_wrk}) "
                f"[{args.events:,} events in {row['span']:.2f} s, wall {row['wall']:.2f} s, "
                f"{row['cpu_ms']:.2f} CPU ms/event, emit {row['emit_rate']:,.0f} events/s, "
                f"load {row['load']}]"
            )
    if args.json:
        print(json.dumps({"wrk": wrk, "httpx": httpx_rate, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) == 5 and sys.argv[1] == "--child-httpx":
        print(json.dumps(child_httpx(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
