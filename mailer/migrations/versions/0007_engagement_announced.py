"""opens and clicks announced by the webhook dispatcher: engagement_events.announced, and an
index of the rows not yet announced

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEX = "ix_engagement_events_unannounced"
# As SQLAlchemy renders the announcer's condition (`announced = 0` on SQLite, `NOT announced` on
# PostgreSQL): SQLite uses a partial index only for a query that repeats its WHERE term.
UNANNOUNCED = sa.not_(sa.column("announced", sa.Boolean()))


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        # Every row written so far was announced by the recorder that wrote it. A column added
        # with a constant default is not written into each row (PostgreSQL 11 and later), so
        # the existing rows get `true` without rewriting the table; new rows get `false`.
        op.add_column(
            "engagement_events",
            sa.Column("announced", sa.Boolean(), nullable=False, server_default=sa.true()),
        )
        op.alter_column("engagement_events", "announced", server_default=sa.false())
    else:
        # SQLite cannot change a column's default without rebuilding the table: add it with
        # the default new rows need, then mark the rows written so far.
        op.add_column(
            "engagement_events",
            sa.Column("announced", sa.Boolean(), nullable=False, server_default=sa.false()),
        )
        table = sa.table("engagement_events", sa.column("announced", sa.Boolean()))
        op.execute(table.update().values(announced=True))
    # the dispatcher's look for rows to announce: only those, however large the table grows
    op.create_index(
        INDEX,
        "engagement_events",
        ["id"],
        sqlite_where=UNANNOUNCED,
        postgresql_where=UNANNOUNCED,
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="engagement_events")
    op.drop_column("engagement_events", "announced")
