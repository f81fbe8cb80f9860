"""privacy operations: requests register, erasures, anonymous campaign tallies, policy
versions, the operator audit log, and the consent ledger's one exception (erasure)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

# Erasure must remove a person's ledger rows, and nothing else may. A DELETE is let through
# only for a contact named in `erasures` with its contact_id set, which the erasing transaction
# writes first and clears before it commits: so no other transaction ever sees it set. UPDATE
# (and on PostgreSQL TRUNCATE) stay refused, always.
SQLITE_GUARD_DOWN = "DROP TRIGGER consent_records_no_delete"
SQLITE_GUARD_ERASURE = """CREATE TRIGGER consent_records_no_delete BEFORE DELETE ON consent_records
   WHEN NOT EXISTS (SELECT 1 FROM erasures WHERE erasures.contact_id = OLD.contact_id)
   BEGIN SELECT RAISE(ABORT, 'the consent ledger is append-only: rows cannot be deleted (only an erasure removes them)'); END"""
SQLITE_GUARD_ORIGINAL = """CREATE TRIGGER consent_records_no_delete BEFORE DELETE ON consent_records
   BEGIN SELECT RAISE(ABORT, 'the consent ledger is append-only: rows cannot be deleted'); END"""

POSTGRES_GUARD_ERASURE = """CREATE OR REPLACE FUNCTION consent_records_append_only() RETURNS trigger
   LANGUAGE plpgsql AS $$
   BEGIN
     IF TG_OP = 'DELETE' AND EXISTS (
       SELECT 1 FROM erasures WHERE erasures.contact_id = OLD.contact_id
     ) THEN
       RETURN OLD;
     END IF;
     RAISE EXCEPTION 'the consent ledger is append-only: rows cannot be %', lower(TG_OP) || 'd'
       USING ERRCODE = 'integrity_constraint_violation';
   END $$"""
POSTGRES_GUARD_ORIGINAL = """CREATE OR REPLACE FUNCTION consent_records_append_only() RETURNS trigger
   LANGUAGE plpgsql AS $$
   BEGIN
     RAISE EXCEPTION 'the consent ledger is append-only: rows cannot be %', lower(TG_OP) || 'd'
       USING ERRCODE = 'integrity_constraint_violation';
   END $$"""


def upgrade() -> None:
    op.create_table(
        "privacy_requests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("contact_id", sa.Integer(), sa.ForeignKey("contacts.id"), nullable=True),
        sa.Column("address_hash", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("identity_check", sa.String(16), nullable=False),
        sa.Column("verified_at", TS, nullable=True),
        sa.Column("due_at", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("outcome", sa.String(255), nullable=True),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "kind IN ('access', 'correction', 'erasure')", name="ck_privacy_requests_kind"
        ),
        sa.CheckConstraint(
            "identity_check IN ('pending', 'verified')", name="ck_privacy_requests_identity"
        ),
    )
    op.create_index("ix_privacy_requests_contact_id", "privacy_requests", ["contact_id"])
    op.create_index("ix_privacy_requests_address_hash", "privacy_requests", ["address_hash"])
    op.create_table(
        "erasures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("address_hash", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("erased_at", TS, nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        # no foreign key: the contact is gone when the transaction commits (and so is this id)
        sa.Column("contact_id", sa.Integer(), nullable=True),
        sa.Column("removed", sa.JSON(), nullable=False),
        sa.CheckConstraint("reason IN ('request', 'retention')", name="ck_erasures_reason"),
    )
    op.create_index("ix_erasures_address_hash", "erasures", ["address_hash"])
    op.create_index("ix_erasures_contact_id", "erasures", ["contact_id"])
    op.create_table(
        "campaign_tallies",
        sa.Column("campaign_id", sa.Integer(), sa.ForeignKey("campaigns.id"), primary_key=True),
        sa.Column("metric", sa.String(64), primary_key=True),
        sa.Column("count", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.String(64), nullable=False, unique=True),
        sa.Column("effective_on", sa.Date(), nullable=False),
        sa.Column("published_at", TS, nullable=False),
        sa.Column("material", sa.Boolean(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("operator", sa.String(255), nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(128), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_subject", "audit_log", ["subject"])
    # retention works through these in bounded batches, oldest first
    op.create_index("ix_engagement_events_occurred_at", "engagement_events", ["occurred_at"])
    op.create_index(
        "ix_subscriptions_status_requested", "subscriptions", ["status", "requested_at"]
    )

    if op.get_bind().dialect.name == "sqlite":
        op.execute(SQLITE_GUARD_DOWN)
        op.execute(SQLITE_GUARD_ERASURE)
    else:
        op.execute(POSTGRES_GUARD_ERASURE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(SQLITE_GUARD_DOWN)
        op.execute(SQLITE_GUARD_ORIGINAL)
    else:
        op.execute(POSTGRES_GUARD_ORIGINAL)
    op.drop_index("ix_subscriptions_status_requested", "subscriptions")
    op.drop_index("ix_engagement_events_occurred_at", "engagement_events")
    for table in (
        "audit_log",
        "policy_versions",
        "campaign_tallies",
        "erasures",
        "privacy_requests",
    ):
        op.drop_table(table)
