"""campaigns, their link tables and deliveries (one row per campaign and contact)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
CAMPAIGN_STATUSES = "('ready', 'running', 'paused', 'cancelled', 'finished')"
DELIVERY_STATUSES = "('queued', 'sending', 'sent', 'failed', 'uncertain', 'excluded')"


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("source_file", sa.String(1024), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("excluded", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint(f"status IN {CAMPAIGN_STATUSES}", name="ck_campaigns_status"),
    )
    op.create_table(
        "campaign_links",
        sa.Column("campaign_id", sa.Integer(), sa.ForeignKey("campaigns.id"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("url", sa.Text(), nullable=False),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("campaign_id", sa.Integer(), sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("contact_id", sa.Integer(), sa.ForeignKey("contacts.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tracking", sa.Boolean(), nullable=False),
        sa.Column("excluded_reason", sa.String(32), nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("smtp_code", sa.Integer(), nullable=True),
        sa.Column("smtp_response", sa.String(512), nullable=True),
        sa.Column("message_id", sa.String(255), nullable=True),
        sa.Column("queued_at", TS, nullable=False),
        sa.Column("sending_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        # Invariant 8: a contact receives a campaign at most once, whatever happens.
        sa.UniqueConstraint("campaign_id", "contact_id", name="uq_deliveries_once_per_campaign"),
        sa.CheckConstraint(f"status IN {DELIVERY_STATUSES}", name="ck_deliveries_status"),
    )
    op.create_index("ix_deliveries_claim", "deliveries", ["campaign_id", "status", "id"])
    op.create_index("ix_deliveries_contact", "deliveries", ["contact_id"])


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("campaign_links")
    op.drop_table("campaigns")
