"""the sign-up limit in the database: signup_limits, sign-ups counted per client and window

POST /subscribe allows a client (an IPv4 address or IPv6 /64) a number of sign-ups per window.
Counted in each process's memory, N workers on M machines allowed N times M times that; counted
here, every worker counts against the same row. `client` is an HMAC of the client under a key
of its own, never the address. A row stores when its window ends rather than when it began, so
that `mailer retention purge` can tell an ended window without knowing how long the tracking
app's windows are. One row per client seen in the last window: no index beyond the key, as
every write would pay for one and only the occasional clean-up would use it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "signup_limits",
        sa.Column("client", sa.String(64), primary_key=True),
        sa.Column("window_ends_at", TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        # SQLite: the table is its key's B-tree, not a rowid table plus an index on the key
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("signup_limits")
