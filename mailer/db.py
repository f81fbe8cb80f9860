"""Database engine, sessions and migrations, the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from mailer.config import Settings, redact_url
from mailer.errors import ConfigError, DatabaseError
from mailer.models import Meta

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SUPPRESSION_FINGERPRINT = "suppression_key_fingerprint"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    if database_url.startswith("sqlite"):
        # pooled: opening a connection (PRAGMAs, WAL checkpoint on close) per transaction
        # was a fifth of a sender's time
        engine = create_engine(database_url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        database_url, pool_pre_ping=True, connect_args={"connect_timeout": 10}, **kwargs
    )


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> tuple[str | None, str | None]:
    """Bring the schema to the newest revision. Returns (before, after)."""
    before = current_revision(engine)
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return before, current_revision(engine)


def check_reachable(engine: Engine, settings: Settings) -> None:
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        raise DatabaseError(
            f"cannot reach the database {redact_url(settings.database_url)}: "
            f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}"
        ) from exc


def check_ready(engine: Engine, settings: Settings) -> None:
    """Refuse to work on a database that is unreachable, not migrated, or keyed differently."""
    check_reachable(engine, settings)
    if current_revision(engine) != head_revision():
        raise DatabaseError(
            f"the database {redact_url(settings.database_url)} is not initialised "
            "or not up to date: run `mailer init`"
        )
    check_suppression_key(engine, settings)


def check_suppression_key(engine: Engine, settings: Settings) -> None:
    fingerprint = settings.suppression_key_fingerprint
    with Session(engine) as session:
        stored = session.get(Meta, SUPPRESSION_FINGERPRINT)
        if stored is None:
            session.add(Meta(key=SUPPRESSION_FINGERPRINT, value=fingerprint))
            session.commit()
        elif stored.value != fingerprint:
            raise ConfigError(
                "the oldest secret key differs from the one this database was set up with: "
                "suppression hashes depend on it, so keep it first in MAILER_SECRET_KEYS "
                "(add new keys at the end)"
            )


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back on any error."""
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def meta_value(session: Session, key: str) -> str | None:
    row = session.get(Meta, key)
    return row.value if row else None
