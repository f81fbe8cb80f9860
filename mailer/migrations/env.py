"""Alembic environment: mailer runs migrations in-process with a connection it passes in."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import mailer.models  # noqa: F401  (registers the tables on the metadata)

config = context.config
target_metadata = SQLModel.metadata

connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("mailer migrations run through `mailer init`, which passes a connection")

context.configure(
    connection=connection,
    target_metadata=target_metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
