"""indexes for the click rules: a delivery's clicks by kind and time, and the honeypot clicks

The burst rule reads a delivery's link clicks of the last second or two, the honeypot rule its
honeypot clicks of the last minute. With only an index on delivery_id, both read every event
the delivery ever had; under scanner traffic that fell behind the clicks coming in.
ix_engagement_events_delivery_clicks (delivery_id, kind, occurred_at) serves the first and,
by its leading column, everything the old delivery_id index served, which it replaces;
ix_engagement_events_honeypot is partial, on the honeypot clicks only.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# mailer.models.HONEYPOT_POSITION when this migration was written; written out so that the
# migration stays what it was if the constant ever changes
HONEYPOT_CLICK = sa.text("link_position = 46655")


def upgrade() -> None:
    op.create_index(
        "ix_engagement_events_delivery_clicks",
        "engagement_events",
        ["delivery_id", "kind", "occurred_at"],
    )
    op.drop_index("ix_engagement_events_delivery", table_name="engagement_events")
    op.create_index(
        "ix_engagement_events_honeypot",
        "engagement_events",
        ["delivery_id", "occurred_at"],
        sqlite_where=HONEYPOT_CLICK,
        postgresql_where=HONEYPOT_CLICK,
    )


def downgrade() -> None:
    op.drop_index("ix_engagement_events_honeypot", table_name="engagement_events")
    op.create_index("ix_engagement_events_delivery", "engagement_events", ["delivery_id"])
    op.drop_index("ix_engagement_events_delivery_clicks", table_name="engagement_events")
