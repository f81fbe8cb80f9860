"""Fixtures shared by the suite: a fresh database per test on the backend under test.

SQLite by default; PostgreSQL when MAILER_TEST_DATABASE_URL is set (each test gets its own
schema, dropped afterwards). Without a reachable server the PostgreSQL run skips with the
reason, except in CI, where it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from mailer.cli import app
from mailer.config import load_settings, normalise_database_url
from mailer.service import Mailer
from tests.smtp_server import CaptureServer

TEST_KEY = "test-key-0123456789abcdefghijklmnopqrstuvwxyz"
PG_ENV = "MAILER_TEST_DATABASE_URL"


def postgres_admin_url() -> str | None:
    raw = os.environ.get(PG_ENV)
    return normalise_database_url(raw) if raw else None


def _postgres_schema_url(admin_url: str) -> Iterator[str]:
    engine = create_engine(admin_url)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        engine.dispose()
        message = (
            f"PostgreSQL at {make_url(admin_url).render_as_string()} is unreachable: {exc.orig}"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema yet) on the backend under test."""
    admin = postgres_admin_url()
    if admin:
        yield from _postgres_schema_url(admin)
    else:
        yield f"sqlite:///{tmp_path / 'mailer.db'}"


@pytest.fixture
def backend() -> str:
    return "postgresql" if postgres_admin_url() else "sqlite"


@pytest.fixture
def env(database_url: str) -> dict[str, str]:
    return {
        "MAILER_DATABASE_URL": database_url,
        "MAILER_SECRET_KEYS": TEST_KEY,
        "MAILER_OPERATOR": "tester",
        "MAILER_SENDER_NAME": "Shop BV",
        "MAILER_POSTAL_ADDRESS": "Voorbeeldstraat 1, 3511 AA Utrecht",
    }


@pytest.fixture
def mailer(env: dict[str, str], tmp_path: Path) -> Iterator[Mailer]:
    """A Mailer on a freshly migrated database."""
    instance = Mailer(load_settings(env, cwd=tmp_path))
    instance.init()
    try:
        yield instance
    finally:
        instance.close()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CliResult]:
    """Run `mailer ARGS` in-process against the test database, from an empty folder."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str, extra_env: dict[str, str] | None = None) -> CliResult:
        result = runner.invoke(
            app, list(args), env={**env, **(extra_env or {})}, catch_exceptions=True
        )
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1_000_000))

    def write(content: str, name: str | None = None, encoding: str = "utf-8") -> Path:
        path = tmp_path / (name or f"contacts-{next(counter)}.csv")
        path.write_bytes(content.encode(encoding))
        return path

    return write


@pytest.fixture
def smtp_server() -> Iterator[CaptureServer]:
    """A real SMTP server (aiosmtpd) on a free loopback port, recording what arrives."""
    with CaptureServer() as server:
        yield server


CAMPAIGN_HTML = """<html><body>
<h1>Hello {{ contact.first_name or "friend" }}</h1>
<p>Our <a href="https://shop.example.com/autumn">autumn offer</a> and
<a href="https://shop.example.com/tips?x=1&amp;y=2">tips</a>.
Call <a href="tel:+31301234567">us</a> or <a href="mailto:info@shop.example.com">mail</a>.</p>
</body></html>
"""


@pytest.fixture
def campaign_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a campaign TOML (and its template) and return its path."""

    def write(
        name: str = "autumn",
        html: str = CAMPAIGN_HTML,
        extra: str = "",
        subject: str = "Hello {{ contact.first_name or 'friend' }}",
        sender: str = "Shop <news@shop.example.com>",
    ) -> Path:
        folder = tmp_path / "campaigns"
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.html").write_text(html, encoding="utf-8")
        toml = (
            f'name = "{name}"\nsubject = "{subject}"\nfrom = "{sender}"\n'
            f'template = "{name}.html"\n{extra}'
        )
        path = folder / f"{name}.toml"
        path.write_text(toml, encoding="utf-8")
        return path

    return write
