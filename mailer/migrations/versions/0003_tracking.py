"""engagement events (opens, clicks) and double opt-in subscriptions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "engagement_events",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("delivery_id", BigId, sa.ForeignKey("deliveries.id"), nullable=False),
        sa.Column("campaign_id", sa.Integer(), sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("contact_id", sa.Integer(), sa.ForeignKey("contacts.id"), nullable=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("link_position", sa.Integer(), nullable=True),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("ip_masked", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.Column("machine", sa.Boolean(), nullable=False),
        sa.Column("machine_reason", sa.String(64), nullable=True),
        sa.CheckConstraint("kind IN ('open', 'click')", name="ck_engagement_events_kind"),
    )
    op.create_index("ix_engagement_events_campaign", "engagement_events", ["campaign_id", "kind"])
    op.create_index("ix_engagement_events_delivery", "engagement_events", ["delivery_id"])
    op.create_table(
        "subscriptions",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("contact_id", sa.Integer(), sa.ForeignKey("contacts.id"), nullable=False),
        sa.Column("purposes", sa.JSON(), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=True),
        sa.Column("wording", sa.Text(), nullable=True),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("ip_masked", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.Column("mailed_at", TS, nullable=True),
        sa.Column("confirmed_at", TS, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'confirmed', 'expired')", name="ck_subscriptions_status"
        ),
    )
    op.create_index("ix_subscriptions_contact", "subscriptions", ["contact_id"])


def downgrade() -> None:
    op.drop_table("subscriptions")
    op.drop_table("engagement_events")
