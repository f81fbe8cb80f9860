"""inbound mail (bounces, complaints, mailto unsubscribes): what was processed, and an index to
match a returned message to its delivery by Message-ID

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("id", BigId, primary_key=True),
        # SHA-256 of the inbound Message-ID (else of the bytes): processing is idempotent
        sa.Column("message_key", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        # no foreign key: the record of a bounce outlives an erased contact's deliveries
        sa.Column("delivery_id", BigId, nullable=True),
        sa.Column("processed_at", TS, nullable=False),
    )
    op.create_index("ix_inbound_messages_delivery", "inbound_messages", ["delivery_id"])
    op.create_index("ix_deliveries_message_id", "deliveries", ["message_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_message_id", table_name="deliveries")
    op.drop_table("inbound_messages")
