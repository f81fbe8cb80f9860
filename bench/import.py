"""Import benchmark: mailer's contact import against PostgreSQL's own COPY of the same file.

    .venv/bin/python bench/import.py                 # 100,000 and 1,000,000 rows
    .venv/bin/python bench/import.py --quick         # 20,000 rows, a smoke run
    .venv/bin/python bench/import.py --rows 250000   # any sizes (repeat --rows)

For each size it generates a contacts CSV with consent evidence (cached under bench/out/,
which is git-ignored), then, each in its own child process so that the child's peak RSS
belongs to that run alone:

  * imports it with mailer's real import path (`Mailer.import_contacts`) into a fresh SQLite
    database and into a fresh PostgreSQL schema;
  * loads it with PostgreSQL's `COPY ... FROM STDIN (FORMAT csv)` into a plain all-text table,
    streamed through psycopg 3: the limit an import can be compared against.

It prints rows/s, peak RSS, and the ratio import/COPY. Only loopback PostgreSQL servers are
accepted; every child has a timeout; schemas and databases are dropped afterwards.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_KEY = "bench-key-0123456789abcdefghijklmnopqrstuvwxyz-not-secret"
COLUMNS = (
    "email",
    "first_name",
    "last_name",
    "locale",
    "tags",
    "consent_purposes",
    "consent_at",
    "consent_source",
    "consent_policy_version",
    "consent_ip",
    "loyalty_tier",
)
SEED = 20261125
DEFAULT_ROWS = (100_000, 1_000_000)
QUICK_ROWS = (20_000,)
LOOPBACK_HOSTS = {"localhost", ""}

FIRST = [
    "Anna",
    "Bram",
    "Chloé",
    "Daan",
    "Emma",
    "Finn",
    "Greta",
    "Hugo",
    "Iris",
    "Jens",
    "Katja",
    "Lars",
    "Mila",
    "Noah",
    "Olga",
    "Piet",
    "Quinn",
    "Roos",
    "Sven",
    "Tess",
    "Ugo",
    "Vera",
    "Wout",
    "Xena",
    "Yara",
    "Zoë",
]
LAST = [
    "de Vries",
    "Jansen",
    "Bakker",
    "Visser",
    "Smit",
    "Meijer",
    "Mulder",
    "de Boer",
    "Bos",
    "Vos",
    "Peters",
    "Hendriks",
    "van Dijk",
    "Dekker",
    "Brouwer",
    "Müller",
    "Schmidt",
    "Dubois",
    "García",
    "O'Neill",
]
DOMAINS = [
    "example.com",
    "example.net",
    "example.org",
    "mail.example",
    "shop.example",
    "post.example",
    "inbox.example",
    "webmail.example",
    "provider.example",
    "test.example",
]
LOCALES = ("en", "nl-NL", "de-DE", "fr", "en-GB", "nl_be", "")
TAGS = ("newsletter", "vip", "shop", "event-2025", "beta", "b2b")
SOURCES = ("signup-form", "checkout", "event-stand", "preference-centre")
POLICIES = ("2024-01", "2025-03", "")
TIERS = ("gold", "silver", "bronze", "")


# ---------------------------------------------------------------------------------------------
# The file


def generate(path: Path, rows: int, seed: int = SEED) -> None:
    """A realistic contacts file: ~80% of rows with consent evidence, ~1% repeating an earlier
    address in capitals (the same contact), ~0.2% invalid addresses (rejected)."""
    rng = random.Random(seed)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    tmp = path.with_suffix(".partial")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(COLUMNS)
        emitted: list[str] = []
        for i in range(rows):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            roll = rng.random()
            if roll < 0.01 and emitted:
                email = rng.choice(emitted).upper()
            elif roll < 0.012:
                email = f"not-an-address-{i}"
            else:
                local = f"{first}.{last}".lower().replace(" ", "").replace("'", "")
                local = local.encode("ascii", "ignore").decode() or "x"
                email = f"{local}.{i}@{rng.choice(DOMAINS)}"
                if len(emitted) < 5000:
                    emitted.append(email)
                elif rng.random() < 0.01:
                    emitted[rng.randrange(len(emitted))] = email
            tags = ";".join(rng.sample(TAGS, rng.randint(0, 3)))
            if rng.random() < 0.8:
                purposes = "marketing;tracking" if rng.random() < 0.5 else "marketing"
                at = now - timedelta(seconds=rng.randrange(3 * 365 * 86400))
                consent = [
                    purposes,
                    at.isoformat(timespec="seconds"),
                    rng.choice(SOURCES),
                    rng.choice(POLICIES),
                    _random_ip(rng) if rng.random() < 0.7 else "",
                ]
            else:
                consent = ["", "", "", "", ""]
            out.writerow(
                [email, first, last, rng.choice(LOCALES), tags, *consent, rng.choice(TIERS)]
            )
    tmp.replace(path)


def _random_ip(rng: random.Random) -> str:
    if rng.random() < 0.85:
        return str(ipaddress.IPv4Address(rng.randrange(0x0B000000, 0xDF000000)))
    return str(ipaddress.IPv6Address((0x2001_0DB8 << 96) | rng.getrandbits(96)))


def data_file(out_dir: Path, rows: int) -> Path:
    path = out_dir / f"contacts-{rows}-{SEED}.csv"
    if not path.exists():
        started = time.perf_counter()
        generate(path, rows)
        print(f"  generated {path} in {time.perf_counter() - started:.1f}s", flush=True)
    return path


# ---------------------------------------------------------------------------------------------
# Children: each measured run is one process


def child_import(url: str, csv_path: Path, workdir: Path) -> dict[str, Any]:
    from sqlalchemy import event

    from mailer.config import load_settings
    from mailer.service import Mailer

    mailer = Mailer(
        load_settings(
            {
                "MAILER_DATABASE_URL": url,
                "MAILER_SECRET_KEYS": BENCH_KEY,
                "MAILER_OPERATOR": "bench",
            },
            cwd=workdir,
        )
    )
    mailer.init()
    # Watch the PostgreSQL backends the import uses, to tell client from server CPU time.
    backends: dict[int, float | None] = {}
    if url.startswith("postgresql"):
        mailer.engine.dispose()

        @event.listens_for(mailer.engine, "connect")
        def _remember(dbapi_connection: Any, _record: Any) -> None:
            pid = dbapi_connection.info.backend_pid
            backends[pid] = _process_cpu(pid)

    rss_before = _maxrss_mib()
    cpu_started = time.process_time()
    started = time.perf_counter()
    summary = mailer.import_contacts(csv_path)
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - cpu_started
    server_cpu = _cpu_since(backends) if backends else None
    mailer.close()
    return {
        "seconds": elapsed,
        "client_cpu": client_cpu,
        "server_cpu": server_cpu,
        "rows": summary.rows_read,
        "new": summary.new,
        "merged": summary.merged,
        "duplicates": summary.duplicates,
        "consent_granted": summary.consent_granted,
        "consent_unchanged": summary.consent_unchanged,
        "rejected": summary.rejected_total,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _maxrss_mib(),
    }


def child_copy(pg_url: str, schema: str, csv_path: Path) -> dict[str, Any]:
    import psycopg
    from psycopg import sql

    columns = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in COLUMNS)
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        table = sql.Identifier(schema, "copy_limit")
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, columns))
        conn.commit()
        backends = {conn.info.backend_pid: _process_cpu(conn.info.backend_pid)}
        cpu_started = time.process_time()
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(
                sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv, HEADER true)").format(table)
            ) as copy,
            csv_path.open("rb") as fh,
        ):
            while block := fh.read(1 << 20):
                copy.write(block)
        conn.commit()
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
        server_cpu = _cpu_since(backends)
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
        conn.execute(sql.SQL("DROP TABLE {}").format(table))
        conn.commit()
    return {
        "seconds": elapsed,
        "client_cpu": client_cpu,
        "server_cpu": server_cpu,
        "rows": row[0] if row else 0,
        "peak_rss_mib": _maxrss_mib(),
    }


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a local process (the PostgreSQL backend), if readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_since(backends: dict[int, float | None]) -> float | None:
    total = 0.0
    for pid, started in backends.items():
        now = _process_cpu(pid)
        if started is None or now is None:
            return None
        total += now - started
    return total


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------------------------
# PostgreSQL schemas


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host in LOOPBACK_HOSTS:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"refusing a non-loopback PostgreSQL server: {host!r}")


def schema_url(pg_url: str, schema: str) -> str:
    separator = "&" if "?" in pg_url else "?"
    return f"{pg_url}{separator}options={quote(f'-csearch_path={schema}', safe='')}"


def create_schema(pg_url: str) -> str:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, connect_timeout=10, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def drop_schema(pg_url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, connect_timeout=10, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# ---------------------------------------------------------------------------------------------
# The benchmark


def bench_size(
    rows: int, out_dir: Path, pg_url: str, backends: list[str], timeout: float, copy_runs: int
) -> dict[str, Any]:
    print(f"\n== {rows:,} rows", flush=True)
    csv_path = data_file(out_dir, rows)
    results: dict[str, Any] = {"rows": rows, "bytes": csv_path.stat().st_size}
    print(f"  file {csv_path.stat().st_size / 2**20:.0f} MiB, load average {_load()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailer-bench-", dir=out_dir))
    try:
        if "sqlite" in backends:
            url = f"sqlite:///{workdir / 'bench.db'}"
            results["sqlite"] = run_child(["import", url, str(csv_path), str(workdir)], timeout)
            _report("sqlite import", results["sqlite"])
        if "postgresql" in backends:
            schema = create_schema(pg_url)
            try:
                copies = [
                    run_child(["copy", pg_url, schema, str(csv_path)], timeout)
                    for _ in range(copy_runs)
                ]
                results["copy"] = min(copies, key=lambda r: float(r["seconds"]))
                _report(f"postgresql COPY (best of {copy_runs})", results["copy"])
                url = schema_url(pg_url, schema)
                results["postgresql"] = run_child(
                    ["import", url, str(csv_path), str(workdir)], timeout
                )
                _report("postgresql import", results["postgresql"])
            finally:
                drop_schema(pg_url, schema)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _rate(result: dict[str, Any]) -> float:
    return float(result["rows"]) / float(result["seconds"])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _report(label: str, result: dict[str, Any]) -> None:
    print(
        f"  {label:<28} {result['rows']:>10,} rows in {result['seconds']:7.2f}s "
        f"= {_rate(result):>9,.0f} rows/s, peak RSS {result['peak_rss_mib']:5.0f} MiB",
        flush=True,
    )
    server = result.get("server_cpu")
    cpu = f"client CPU {result['client_cpu']:.2f}s" + (
        f", server CPU {server:.2f}s" if server is not None else ""
    )
    if "new" in result:
        print(
            f"  {'':<28} {cpu}; new {result['new']:,}, duplicates {result['duplicates']:,}, "
            f"consent granted {result['consent_granted']:,}, rejected {result['rejected']:,}; "
            f"RSS before the import {result['rss_before_mib']:.0f} MiB; load {_load()}",
            flush=True,
        )
    else:
        print(f"  {'':<28} {cpu}", flush=True)


def print_table(all_results: list[dict[str, Any]]) -> None:
    print("\n== summary")
    header = (
        f"{'rows':>10} {'sqlite rows/s':>14} {'pg rows/s':>10} {'COPY rows/s':>12} "
        f"{'pg/COPY':>8} {'RSS sqlite':>11} {'RSS pg':>8}"
    )
    print(header)
    for r in all_results:
        sqlite_rate = f"{_rate(r['sqlite']):,.0f}" if "sqlite" in r else "-"
        pg_rate = f"{_rate(r['postgresql']):,.0f}" if "postgresql" in r else "-"
        copy_rate = f"{_rate(r['copy']):,.0f}" if "copy" in r else "-"
        ratio = (
            f"{_rate(r['postgresql']) / _rate(r['copy']):.2%}"
            if "postgresql" in r and "copy" in r
            else "-"
        )
        rss_sqlite = f"{r['sqlite']['peak_rss_mib']:.0f} MiB" if "sqlite" in r else "-"
        rss_pg = f"{r['postgresql']['peak_rss_mib']:.0f} MiB" if "postgresql" in r else "-"
        print(
            f"{r['rows']:>10,} {sqlite_rate:>14} {pg_rate:>10} {copy_rate:>12} {ratio:>8} "
            f"{rss_sqlite:>11} {rss_pg:>8}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        kind, rest = argv[1], argv[2:]
        if kind == "import":
            result = child_import(rest[0], Path(rest[1]), Path(rest[2]))
        else:
            result = child_copy(rest[0], rest[1], Path(rest[2]))
        print(json.dumps(result))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, action="append", help="rows per file (repeatable)")
    parser.add_argument("--quick", action="store_true", help="one small run (20,000 rows)")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="loopback PostgreSQL (admin) URL")
    parser.add_argument(
        "--backend", choices=("sqlite", "postgresql"), action="append", help="default: both"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where files are written")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    parser.add_argument("--copy-runs", type=int, default=3, help="COPY runs (best is kept)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    sizes = args.rows or list(QUICK_ROWS if args.quick else DEFAULT_ROWS)
    if any(n <= 0 for n in sizes):
        parser.error("--rows must be positive")
    backends = args.backend or ["sqlite", "postgresql"]
    check_loopback(args.pg_url)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"mailer import benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"sizes {', '.join(f'{n:,}' for n in sizes)}, backends {', '.join(backends)}",
        flush=True,
    )
    results = [
        bench_size(n, args.out, args.pg_url, backends, args.timeout, max(1, args.copy_runs))
        for n in sizes
    ]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
