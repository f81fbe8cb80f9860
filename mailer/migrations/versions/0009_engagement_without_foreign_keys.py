"""PostgreSQL: engagement_events without foreign keys; recording and erasure lock instead

Every row written to engagement_events made PostgreSQL check three foreign keys, each a query
and a row lock (FOR KEY SHARE) on the delivery, campaign or contact it names: COPY of 200,000
events cost 23.5 to 27.5 µs a row with the keys and 5.6 µs without. That is server work at
normal priority while the tracking app's workers need the CPU. The guarantee the keys gave, no
event left behind by an erasure, is now kept by recording and erasure locking the table
against each other and recording asking which deliveries still exist (mailer.queries,
"recording against erasure"). Campaigns are never deleted, and contacts and deliveries only by
an erasure, which deletes their events first.

SQLite keeps its keys: one writer at a time, and a cheap check.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TABLE = "engagement_events"
# column -> the table it refers to (its id)
KEYS = {"delivery_id": "deliveries", "campaign_id": "campaigns", "contact_id": "contacts"}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for key in sa.inspect(bind).get_foreign_keys(TABLE):
        if key["name"] and key["referred_table"] in KEYS.values():
            op.drop_constraint(key["name"], TABLE, type_="foreignkey")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for column, referred in KEYS.items():
        # the names PostgreSQL gave them in migration 0003
        op.create_foreign_key(f"{TABLE}_{column}_fkey", TABLE, referred, [column], ["id"])
