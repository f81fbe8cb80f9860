"""Sending benchmark: mailer's campaign sender against the SMTP limit and a hand-written loop.

    .venv/bin/python bench/send.py                          # 100,000 messages a run
    .venv/bin/python bench/send.py --quick                  # ~5,000 messages, a smoke run
    .venv/bin/python bench/send.py --messages 1000000 --runs sqlite   # the memory check

In one run, all on loopback:

  * Postfix's `smtp-sink` is started on a free port (and always stopped at the end);
  * `smtp-source` sends messages of the same size as mailer's over the same number of
    persistent connections (`-d`) to that sink: the SMTP limit of this machine;
  * the baseline, the loop a marketer would write by hand: stdlib `smtplib` over one
    connection, a Jinja render and an `EmailMessage` per recipient (no CSS inlining, no
    tracking, no database);
  * mailer: a campaign (campaigns/autumn-maintenance, CSS inlined, click and open tracking for
    the half of the contacts whose consent allows it) sent with `CampaignService.send` over an
    `SmtpPool`, with the options `mailer campaign send --concurrency C --batch-size B` uses:
    one process on SQLite, one on PostgreSQL, and two processes on PostgreSQL sharing the
    same campaign (each with its own pool of C connections).

Contacts are imported with `Mailer.import_contacts` and the campaign's audience is built
(`CampaignService.prepare`) before the clock starts; the clock runs from the runner's start
to its end (the `Progress` callbacks). Every measurement runs in its own child process, so
its CPU time and peak RSS (`ru_maxrss` from `wait4`) belong to that run alone.

Printed: messages/s, the ratio to the smtp-source limit and to the baseline, CPU ms per
message (the sender's user+system time while sending, and the whole child's from `wait4`,
startup included), peak RSS, and the machine's CPU ms per message during the run (PostgreSQL,
smtp-sink and anyone else's work included: on a shared machine, a high figure marks a
disturbed run). Before each measurement the script waits up to 60 s for an idle machine.
`--profile DIR` writes a cProfile file per sender. Contact CSVs are cached under bench/out/send/
(git-ignored). No timing is asserted anywhere: see DESIGN.md. Only loopback PostgreSQL servers
are accepted; each PostgreSQL run gets a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "send"
CAMPAIGN = ROOT / "campaigns" / "autumn-maintenance.toml"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_KEY = "bench-key-0123456789abcdefghijklmnopqrstuvwxyz-not-secret"
SENDER_NAME = "Actief Klussenservice"
POSTAL_ADDRESS = "Voorbeeldstraat 1, 3511 AA Utrecht"
RUNS = ("sqlite", "pg", "pg2")
LABELS = {"sqlite": "mailer SQLite", "pg": "mailer PostgreSQL", "pg2": "mailer PostgreSQL x2"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}

FIRST_NAMES = (
    "Anna", "Bram", "Chloë", "Daan", "Emma", "Finn", "Gijs", "Hanna", "Inés", "Joost",
    "Kees", "Lotte", "Mila", "Noah", "Olivia", "Pieter", "Renée", "Sem", "Tess", "Zoë",
)  # fmt: skip
LAST_NAMES = ("de Jong", "Jansen", "de Vries", "van Dijk", "Bakker", "Visser", "Smit", "Peters")
CITIES = ("Utrecht", "Amersfoort", "Zeist", "Houten", "Nieuwegein", "Den Haag", "Delft")
DOMAINS = ("example.org", "example.net", "mail.example", "post.example", "inbox.example")

# The baseline's footer and text part: what a hand-written loop adds to the same template.
BASELINE_FOOTER = """<hr><p style="font-size:12px;color:#666666">{{ sender }}, {{ address }}<br>
{{ reason }}<br><a href="{{ unsubscribe_url }}">Afmelden</a></p>
</body>"""
BASELINE_TEXT = """Beste {{ contact.first_name or "klant" }},

De herfst komt eraan. Plan een herfstcheck: https://actief-klussenservice.example/herfstcheck
Tips voor de dakgoot: https://actief-klussenservice.example/tips/dakgoot

Met vriendelijke groet,
Actief Klussenservice

{{ sender }}, {{ address }}
{{ reason }}
Afmelden: {{ unsubscribe_url }}
"""


# -- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


PATIENCE = 60.0  # seconds to wait for an idle machine before a measurement (--patience)


def wait_for_quiet(limit: float = 0.15, patience: float | None = None) -> float:
    """Wait (at most `patience` seconds) until the machine is less than `limit` busy over 2 s,
    so that others' work on a shared machine disturbs a measurement less; returns the last
    level seen."""
    deadline = time.monotonic() + (PATIENCE if patience is None else patience)
    while True:
        busy0, total0 = host_cpu_ticks()
        time.sleep(2)
        busy1, total1 = host_cpu_ticks()
        level = (busy1 - busy0) / max(1, total1 - total0)
        if level < limit or time.monotonic() > deadline:
            return level


def source_state() -> str:
    """The commit measured, and whether the work tree differs from it (read-only git)."""
    import mailer

    package = Path(mailer.__file__).resolve().parent
    if package != ROOT / "mailer":
        return f"package at {package}"
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "mailer"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (mailer/ modified)" if dirty else head


def mib(kib: int) -> float:
    return kib / 1024


@dataclass
class Child:
    """A child process, reaped with wait4 so its own resource usage is known."""

    proc: subprocess.Popen[str]
    out_path: Path
    status: int | None = None
    cpu: float = 0.0
    maxrss_kib: int = 0

    def reap(self, block: bool) -> bool:
        if self.status is not None:
            return True
        pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.status = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.status  # keep Popen from waiting on a reaped pid
        self.cpu = usage.ru_utime + usage.ru_stime
        self.maxrss_kib = usage.ru_maxrss
        return True

    def kill(self) -> None:
        if self.status is None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not self.reap(False):
                time.sleep(0.1)
            if self.status is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.reap(True)

    def result(self) -> dict[str, Any]:
        text = self.out_path.read_text() if self.out_path.exists() else ""
        if self.status != 0 or not text:
            raise RuntimeError(f"child {self.proc.args} failed with status {self.status}")
        data: dict[str, Any] = json.loads(text)
        data["cpu"] = self.cpu
        data["maxrss_kib"] = self.maxrss_kib
        return data


def run_children(argvs: list[list[str]], work: Path, timeout: float) -> list[dict[str, Any]]:
    """Start the children together and wait for all of them (at most `timeout` seconds)."""
    children: list[Child] = []
    try:
        for argv in argvs:
            out_path = work / f"child-{uuid.uuid4().hex[:8]}.json"
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *argv, "--out", str(out_path)],
                text=True,
            )
            children.append(Child(proc, out_path))
        deadline = time.monotonic() + timeout
        while not all(child.reap(False) for child in children):
            if time.monotonic() > deadline:
                raise RuntimeError(f"children still running after {timeout:.0f} s: stopped")
            time.sleep(0.2)
        return [child.result() for child in children]
    finally:
        for child in children:
            child.kill()


# -- contacts and campaign ------------------------------------------------------------------


def contacts_csv(count: int) -> Path:
    """email, names, consent evidence and a city; every second contact allows tracking."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"contacts-{count}.csv"
    if path.exists():
        return path
    partial = path.with_suffix(".partial")
    with partial.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                *("email", "first_name", "last_name", "consent_purposes", "consent_at"),
                *("consent_source", "city"),
            ]
        )
        for i in range(count):
            first = FIRST_NAMES[i % len(FIRST_NAMES)]
            last = LAST_NAMES[(i // len(FIRST_NAMES)) % len(LAST_NAMES)]
            local = first.lower().encode("ascii", "ignore").decode()
            writer.writerow(
                [
                    f"{local}.{i}@{DOMAINS[i % len(DOMAINS)]}",
                    first,
                    last,
                    "marketing;tracking" if i % 2 == 0 else "marketing",
                    "2024-09-01T10:00:00+00:00",
                    "signup-form",
                    CITIES[i % len(CITIES)],
                ]
            )
    partial.rename(path)
    return path


def campaign_copy(work: Path) -> Path:
    """The example campaign and its template, in a campaigns/ folder of the run."""
    folder = work / "campaigns"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(CAMPAIGN, folder / CAMPAIGN.name)
    shutil.copy(CAMPAIGN.with_suffix(".html"), folder / CAMPAIGN.with_suffix(".html").name)
    return folder / CAMPAIGN.name


def mailer_env(database_url: str) -> dict[str, str]:
    return {
        "MAILER_DATABASE_URL": database_url,
        "MAILER_SECRET_KEYS": BENCH_KEY,
        "MAILER_OPERATOR": "bench",
        "MAILER_SENDER_NAME": SENDER_NAME,
        "MAILER_POSTAL_ADDRESS": POSTAL_ADDRESS,
    }


def message_sizes(campaign: Path, work: Path) -> tuple[int, int]:
    """Bytes of mailer's message for a contact without and with tracking."""
    from mailer.campaigns import load_campaign
    from mailer.compose import CampaignComposer
    from mailer.config import load_settings
    from mailer.delivery_store import Claimed, Recipient

    settings = load_settings(mailer_env(f"sqlite:///{work / 'size.db'}"), cwd=work)
    composer = CampaignComposer(load_campaign(campaign), 1, settings)
    recipient = Recipient(
        id=1,
        email="anna.1@example.org",
        name=None,
        first_name="Anna",
        last_name="de Jong",
        locale=None,
        attributes={"city": "Utrecht"},
    )
    sizes = [len(composer.compose(Claimed(123456, recipient, track)).data) for track in (0, 1)]
    return sizes[0], sizes[1]


# -- PostgreSQL schemas -----------------------------------------------------------------------


def check_loopback_pg(url: str) -> None:
    host = urlsplit(url).hostname or "localhost"
    if host not in LOOPBACK:
        raise SystemExit(f"refusing a PostgreSQL server that is not on loopback: {host}")


@contextlib.contextmanager
def pg_schema(admin_url: str) -> Any:
    from sqlalchemy import create_engine, text

    from mailer.config import normalise_database_url

    admin = normalise_database_url(admin_url)
    engine = create_engine(admin)
    schema = f"bench_send_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in admin_url else "?"
    try:
        yield f"{admin_url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


# -- the SMTP limit: smtp-source ------------------------------------------------------------


def smtp_source(port: int, connections: int, size: int, count: int) -> dict[str, Any]:
    """Median of three smtp-source runs over persistent connections."""
    rates = []
    for _ in range(3):
        wait_for_quiet(patience=min(20, PATIENCE))
        started = time.perf_counter()
        subprocess.run(
            [
                *(SMTP_SOURCE, "-d", "-s", str(connections), "-l", str(size), "-m", str(count)),
                *("-f", "bench@sender.example", "-t", "sink@example.org", f"127.0.0.1:{port}"),
            ],
            check=True,
            timeout=600,
            stdout=subprocess.DEVNULL,
        )
        rates.append(count / (time.perf_counter() - started))
    return {"connections": connections, "size": size, "count": count, "rates": rates}


# -- children -----------------------------------------------------------------------------------


def child_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The hand-written loop: Jinja, EmailMessage, smtplib over one connection."""
    import smtplib
    from email.message import EmailMessage
    from email.utils import formataddr, formatdate, make_msgid

    import jinja2

    from mailer.campaigns import load_campaign

    definition = load_campaign(Path(args.campaign))
    env = jinja2.Environment(autoescape=True)
    html_t = env.from_string(definition.html_source.replace("</body>", BASELINE_FOOTER))
    text_t = jinja2.Environment().from_string(BASELINE_TEXT)
    subject_t = jinja2.Environment().from_string(definition.subject)
    footer = {
        "sender": SENDER_NAME,
        "address": POSTAL_ADDRESS,
        "reason": definition.reason or "",
    }
    with open(args.contacts, newline="", encoding="utf-8") as fh:
        rows = [row for _, row in zip(range(args.messages), csv.DictReader(fh), strict=False)]
    sizes = 0
    smtp = smtplib.SMTP("127.0.0.1", args.port, timeout=30)
    started = time.perf_counter()
    cpu0 = time.process_time()
    for i, row in enumerate(rows):
        contact = {
            "email": row["email"],
            "first_name": row["first_name"],
            "name": f"{row['first_name']} {row['last_name']}",
            "attributes": {"city": row["city"]},
        }
        unsubscribe = f"https://mailer.example/u/{i}"
        html = html_t.render(contact=contact, unsubscribe_url=unsubscribe, **footer)
        text = text_t.render(contact=contact, unsubscribe_url=unsubscribe, **footer)
        msg = EmailMessage()
        msg["From"] = formataddr((definition.from_name or "", definition.from_address))
        msg["To"] = formataddr((contact["name"], contact["email"]))
        msg["Subject"] = subject_t.render(contact=contact)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=definition.domain)
        msg["List-Unsubscribe"] = f"<{unsubscribe}>"
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
        data = msg.as_bytes()
        sizes += len(data)
        smtp.sendmail(definition.from_address, [contact["email"]], data)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    smtp.quit()
    return {"sent": len(rows), "elapsed": elapsed, "send_cpu": cpu, "mean_size": sizes / len(rows)}


class _Clock:
    """The runner's Progress: the clock starts and stops with the runner; a line every 15 s."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = self.finished = 0.0
        self.cpu_started = self.cpu_finished = 0.0
        self.sent = self.failed = self.excluded = 0
        self.next_line = 0.0

    def start(self, total: int) -> None:
        self.started = time.time()
        self.cpu_started = time.process_time()
        self.next_line = time.monotonic() + 15
        print(f"  [{self.label}] {total} queued", file=sys.stderr, flush=True)

    def advance(self, sent: int, failed: int, excluded: int) -> None:
        self.sent += sent
        self.failed += failed
        self.excluded += excluded
        if time.monotonic() >= self.next_line:
            self.next_line += 15
            rate = self.sent / max(1e-9, time.time() - self.started)
            rss = mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            print(
                f"  [{self.label}] sent {self.sent}, {rate:.0f}/s, peak RSS {rss:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )

    def finish(self) -> None:
        self.finished = time.time()
        self.cpu_finished = time.process_time()


def child_send(args: argparse.Namespace) -> dict[str, Any]:
    """One `mailer campaign send --concurrency C --batch-size B`, through the service."""
    from mailer.config import load_settings
    from mailer.runner import RunOptions
    from mailer.service import CampaignService, Mailer
    from mailer.transport import SmtpPool

    work = Path(args.work)
    mailer = Mailer(load_settings(mailer_env(args.database_url), cwd=work))
    clock = _Clock(args.label)

    async def send() -> Any:
        pool = SmtpPool(f"smtp://127.0.0.1:{args.port}", size=args.concurrency)
        try:
            return await CampaignService(mailer).send(
                Path(args.campaign),
                transport=pool,
                options=RunOptions(
                    purpose="marketing",
                    batch_size=args.batch_size,
                    wave_size=max(8, args.concurrency * 4),  # as the CLI sets it
                ),
                progress=clock,
            )
        finally:
            await pool.close()

    try:
        outcome = asyncio.run(send())
    finally:
        mailer.close()
    stats = outcome.stats
    return {
        "sent": stats.sent,
        "failed": stats.failed,
        "started": clock.started,
        "finished": clock.finished,
        "elapsed": clock.finished - clock.started,
        "send_cpu": clock.cpu_finished - clock.cpu_started,
        "report_sent": outcome.report.get("sent"),
    }


# -- mailer runs ------------------------------------------------------------------------------


@dataclass
class MailerRun:
    name: str
    processes: int
    messages: int
    sent: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    send_cpu: float = 0.0
    maxrss_mib: list[float] = field(default_factory=list)
    host_busy: float = 0.0
    host_cpu: float = 0.0  # CPU seconds of the whole machine while the run sent
    busy_before: float = 0.0
    setup_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def prepare_database(database_url: str, csv_path: Path, campaign: Path, work: Path) -> float:
    """Import the contacts and build the audience, before any clock starts."""
    from mailer.config import load_settings
    from mailer.service import CampaignService, Mailer

    started = time.perf_counter()
    mailer = Mailer(load_settings(mailer_env(database_url), cwd=work))
    try:
        mailer.init()
        mailer.import_contacts(csv_path)
        service = CampaignService(mailer)
        prepared = service.prepare(campaign)
        queued = service.report(prepared.definition.name)["queued"]
    finally:
        mailer.close()
    print(
        f"  prepared: {queued} deliveries queued "
        f"({time.perf_counter() - started:.1f} s for import and audience)",
        file=sys.stderr,
        flush=True,
    )
    return time.perf_counter() - started


def run_mailer(
    name: str,
    database_url: str,
    processes: int,
    args: argparse.Namespace,
    port: int,
    csv_path: Path,
) -> MailerRun:
    work = Path(tempfile.mkdtemp(prefix=f"send-{name}-", dir=OUT))
    try:
        campaign = campaign_copy(work)
        run = MailerRun(name, processes, args.messages)
        run.setup_seconds = prepare_database(database_url, csv_path, campaign, work)
        argv = [
            "_send",
            "--database-url",
            database_url,
            "--campaign",
            str(campaign),
            "--work",
            str(work),
            "--port",
            str(port),
            "--concurrency",
            str(args.concurrency),
            "--batch-size",
            str(args.batch_size),
        ]
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            argv += ["--profile", str(args.profile)]
        run.busy_before = wait_for_quiet()
        busy0, total0 = host_cpu_ticks()
        results = run_children(
            [[*argv, "--label", f"{name}#{i + 1}"] for i in range(processes)],
            work,
            timeout=120 + args.messages / 50,
        )
        busy1, total1 = host_cpu_ticks()
        run.host_busy = (busy1 - busy0) / max(1, total1 - total0)
        run.host_cpu = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
        run.sent = sum(r["sent"] for r in results)
        run.seconds = max(r["finished"] for r in results) - min(r["started"] for r in results)
        run.cpu = sum(r["cpu"] for r in results)
        run.send_cpu = sum(r["send_cpu"] for r in results)
        run.maxrss_mib = [mib(r["maxrss_kib"]) for r in results]
        failed = sum(r["failed"] for r in results)
        if run.sent != args.messages or failed:
            print(
                f"  WARNING: {name}: sent {run.sent} of {args.messages}, failed {failed}",
                file=sys.stderr,
            )
        return run
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def smtp_sink() -> Any:
    port = free_port()
    argv = [SMTP_SINK]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
    argv += [f"127.0.0.1:{port}", "1000"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _stop_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    global PATIENCE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="a smoke run of 5,000 messages")
    parser.add_argument("--baseline-messages", type=int, default=5_000)
    parser.add_argument("--source-messages", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=4, help="SMTP connections a process")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}"
    )
    parser.add_argument("--pg", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="cProfile each mailer child into this folder")
    parser.add_argument(
        "--patience",
        type=float,
        default=PATIENCE,
        help="seconds to wait for an idle machine before each measurement (default 60)",
    )
    args = parser.parse_args(argv)
    PATIENCE = args.patience
    if args.quick:
        args.messages = min(args.messages, 5_000)
        args.baseline_messages = min(args.baseline_messages, 1_000)
        args.source_messages = min(args.source_messages, 10_000)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := set(runs) - set(RUNS):
        parser.error(f"unknown runs {sorted(unknown)}; use {', '.join(RUNS)}")
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not os.access(tool, os.X_OK):
            raise SystemExit(
                f"{tool} is missing: apt-get update && DEBIAN_FRONTEND=noninteractive "
                "apt-get install -y postfix, then `postfix stop` (only the tools are needed)"
            )
    if any(r.startswith("pg") for r in runs):
        check_loopback_pg(args.pg)
    signal.signal(signal.SIGTERM, _stop_on_signal)

    idle_busy = wait_for_quiet(patience=0)
    print(
        f"mailer: {source_state()}; machine busy before the run (others' load): "
        f"{100 * idle_busy:.0f}%",
        flush=True,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    csv_path = contacts_csv(args.messages)
    size_dir = Path(tempfile.mkdtemp(prefix="send-size-", dir=OUT))
    try:
        untracked, tracked = message_sizes(campaign_copy(size_dir), size_dir)
    finally:
        shutil.rmtree(size_dir, ignore_errors=True)
    size = (untracked + tracked) // 2
    print(
        f"mailer message: {untracked} bytes untracked, {tracked} tracked; "
        f"{args.messages} messages, {args.concurrency} connections a process, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs",
        flush=True,
    )

    results: dict[str, Any] = {
        "messages": args.messages,
        "message_size": size,
        "busy_before": idle_busy,
        "source": source_state(),
    }
    mailer_runs: list[MailerRun] = []
    with smtp_sink() as port:
        print(f"smtp-sink on 127.0.0.1:{port}", flush=True)
        limits: dict[int, float] = {}
        for conns in sorted({args.concurrency, 2 * args.concurrency if "pg2" in runs else 0}):
            if not conns:
                continue
            source = smtp_source(port, conns, size, args.source_messages)
            limits[conns] = statistics.median(source["rates"])
            results[f"smtp_source_{conns}"] = source
            rates = ", ".join(f"{r:,.0f}" for r in source["rates"])
            print(
                f"smtp-source -d -s {conns} -l {size}: {limits[conns]:,.0f} msg/s "
                f"(median of {rates})",
                flush=True,
            )

        work = Path(tempfile.mkdtemp(prefix="send-baseline-", dir=OUT))
        try:
            argv = [
                *("_baseline", "--campaign", str(campaign_copy(work))),
                *("--contacts", str(csv_path), "--port", str(port)),
                *("--messages", str(min(args.baseline_messages, args.messages))),
            ]
            rounds = []
            for _ in range(3):  # the median of three: a shared machine is noisy
                wait_for_quiet()
                rounds.append(run_children([argv], work, timeout=600)[0])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rounds.sort(key=lambda r: r["sent"] / r["elapsed"])
        base = rounds[1]
        base["rates"] = [r["sent"] / r["elapsed"] for r in rounds]
        base_rate = base["sent"] / base["elapsed"]
        results["baseline"] = base
        print(
            f"baseline (smtplib, 1 connection, Jinja + EmailMessage): {base['sent']} messages "
            f"of {base['mean_size']:.0f} bytes, {base_rate:,.0f} msg/s (median of "
            f"{', '.join(f'{r:,.0f}' for r in base['rates'])}), "
            f"{1000 * base['send_cpu'] / base['sent']:.2f} CPU ms/msg in the loop, "
            f"peak RSS {mib(base['maxrss_kib']):.0f} MiB",
            flush=True,
        )

        for name in runs:
            processes = 2 if name == "pg2" else 1
            print(f"mailer {name}: {args.messages} messages, {processes} process(es)", flush=True)
            if name == "sqlite":
                db_dir = Path(tempfile.mkdtemp(prefix="send-db-", dir=OUT))
                try:
                    run = run_mailer(
                        name, f"sqlite:///{db_dir / 'mailer.db'}", 1, args, port, csv_path
                    )
                finally:
                    shutil.rmtree(db_dir, ignore_errors=True)
            else:
                with pg_schema(args.pg) as url:
                    run = run_mailer(name, url, processes, args, port, csv_path)
            mailer_runs.append(run)
            limit = limits[args.concurrency * processes]
            print(
                f"  {run.rate:,.0f} msg/s = {run.rate / limit:.3f} of smtp-source, "
                f"{run.rate / base_rate:.2f}x baseline; "
                f"{1000 * run.send_cpu / max(1, run.sent):.2f} CPU ms/msg while sending; "
                f"peak RSS {', '.join(f'{r:.0f}' for r in run.maxrss_mib)} MiB; "
                f"machine {100 * run.host_busy:.0f}% busy ({100 * run.busy_before:.0f}% before), "
                f"{1000 * run.host_cpu / max(1, run.sent):.2f} machine CPU ms/msg",
                flush=True,
            )

    print()
    print(
        f"{'run':<22}{'msg/s':>9}{'/ limit':>9}{'/ base':>8}{'CPU ms/msg':>12}{'(child)':>9}"
        f"{'peak RSS MiB':>14}{'machine':>9}"
    )
    print(f"{'smtp-source (limit)':<22}{limits[args.concurrency]:>9,.0f}{1:>9.3f}")
    print(
        f"{'baseline':<22}{base_rate:>9,.0f}{base_rate / limits[args.concurrency]:>9.3f}"
        f"{1:>8.2f}{1000 * base['send_cpu'] / base['sent']:>12.2f}"
        f"{1000 * base['cpu'] / base['sent']:>9.2f}{mib(base['maxrss_kib']):>14.0f}"
    )
    print(
        "CPU ms/msg: the process's user+system time while sending, per message; (child): the "
        "whole child process, startup included; machine: CPU time of the whole machine while "
        "the run sent (PostgreSQL, smtp-sink and anyone else's work included), per message."
    )
    by_name = {}
    for run in mailer_runs:
        limit = limits[args.concurrency * run.processes]
        rss = "/".join(f"{r:.0f}" for r in run.maxrss_mib)
        sent = max(1, run.sent)
        print(
            f"{LABELS[run.name]:<22}{run.rate:>9,.0f}{run.rate / limit:>9.3f}"
            f"{run.rate / base_rate:>8.2f}{1000 * run.send_cpu / sent:>12.2f}"
            f"{1000 * run.cpu / sent:>9.2f}{rss:>14}{1000 * run.host_cpu / sent:>9.2f}"
        )
        by_name[run.name] = run
        results[run.name] = {
            "sent": run.sent,
            "seconds": run.seconds,
            "rate": run.rate,
            "ratio_limit": run.rate / limit,
            "ratio_baseline": run.rate / base_rate,
            "cpu_ms_per_msg": 1000 * run.cpu / max(1, run.sent),
            "send_cpu_ms_per_msg": 1000 * run.send_cpu / max(1, run.sent),
            "peak_rss_mib": run.maxrss_mib,
            "host_busy": run.host_busy,
            "host_cpu_ms_per_msg": 1000 * run.host_cpu / max(1, run.sent),
            "busy_before": run.busy_before,
            "setup_seconds": run.setup_seconds,
        }
    results["baseline_rate"] = base_rate
    results["limits"] = limits
    print()
    one = by_name.get("pg")
    if one is not None and "pg2" in by_name:
        print(f"two processes on PostgreSQL / one: {by_name['pg2'].rate / one.rate:.2f} (>= 1.8)")
    for run in mailer_runs:
        if run.processes == 1:
            print(
                f"{run.name}: {run.rate:,.0f} msg/s against the target 1,500; "
                f"{run.rate / base_rate:.2f}x baseline against 3x"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["_send", "_baseline"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--campaign", required=True)
    parser.add_argument("--contacts")
    parser.add_argument("--messages", type=int, default=0)
    parser.add_argument("--database-url")
    parser.add_argument("--work")
    parser.add_argument("--label", default="send")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--profile")
    args = parser.parse_args(argv)
    child = child_send if args.mode == "_send" else child_baseline
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        result = profile.runcall(child, args)
        profile.dump_stats(f"{args.profile}/{args.label}-{os.getpid()}.prof")
    else:
        result = child(args)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(main())
