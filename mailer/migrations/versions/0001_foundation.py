"""foundation: contacts, consent ledger, suppression list, attestations, imports

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

CONSENT_STATUSES = "('granted', 'withdrawn', 'pending', 'confirmed', 'ignored')"
SUPPRESSION_REASONS = "('unsubscribed', 'hard_bounce', 'complaint', 'erased', 'manual')"

# The consent ledger is evidence: no statement may change or remove a row. (Erasure, which
# must remove personal data, gets its own narrowly scoped exception in its own migration.)
SQLITE_LEDGER_GUARDS = [
    """CREATE TRIGGER consent_records_no_update BEFORE UPDATE ON consent_records
       BEGIN SELECT RAISE(ABORT, 'the consent ledger is append-only: rows cannot be updated'); END""",
    """CREATE TRIGGER consent_records_no_delete BEFORE DELETE ON consent_records
       BEGIN SELECT RAISE(ABORT, 'the consent ledger is append-only: rows cannot be deleted'); END""",
]
POSTGRES_LEDGER_GUARDS = [
    """CREATE FUNCTION consent_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         RAISE EXCEPTION 'the consent ledger is append-only: rows cannot be %', lower(TG_OP) || 'd'
           USING ERRCODE = 'integrity_constraint_violation';
       END $$""",
    """CREATE TRIGGER consent_records_append_only BEFORE UPDATE OR DELETE ON consent_records
       FOR EACH ROW EXECUTE FUNCTION consent_records_append_only()""",
    """CREATE TRIGGER consent_records_no_truncate BEFORE TRUNCATE ON consent_records
       FOR EACH STATEMENT EXECUTE FUNCTION consent_records_append_only()""",
]


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.create_table(
        "attestations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("vendor", sa.String(255), nullable=False),
        sa.Column("vendor_contact", sa.String(255), nullable=False),
        sa.Column("lawful_basis", sa.String(64), nullable=False),
        sa.Column("purposes", sa.JSON(), nullable=False),
        sa.Column("collection_method", sa.Text(), nullable=False),
        sa.Column("collected_from", sa.Date(), nullable=False),
        sa.Column("collected_to", sa.Date(), nullable=False),
        sa.Column("consent_wording", sa.Text(), nullable=False),
        sa.Column("signed_by", sa.String(255), nullable=False),
        sa.Column("signed_at", TS, nullable=False),
        sa.Column("document_sha256", sa.String(64), nullable=False),
        sa.Column("file_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.CheckConstraint("collected_from <= collected_to", name="ck_attestations_period"),
    )
    op.create_table(
        "contacts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False, unique=True),
        sa.Column("email_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("first_name", sa.String(255), nullable=True),
        sa.Column("last_name", sa.String(255), nullable=True),
        sa.Column("locale", sa.String(35), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_contacts_email_hash", "contacts", ["email_hash"])
    op.create_table(
        "contact_tags",
        sa.Column("contact_id", sa.Integer(), sa.ForeignKey("contacts.id"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_contact_tags_tag", "contact_tags", ["tag"])
    op.create_table(
        "imports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("filename", sa.String(1024), nullable=False),
        sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("vendor", sa.String(255), nullable=True),
        sa.Column("attestation_id", sa.Integer(), sa.ForeignKey("attestations.id"), nullable=True),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("summary", sa.JSON(), nullable=False),
    )
    op.create_table(
        "contact_sources",
        sa.Column("contact_id", sa.Integer(), sa.ForeignKey("contacts.id"), primary_key=True),
        sa.Column("import_id", sa.Integer(), sa.ForeignKey("imports.id"), primary_key=True),
        sa.Column("row_number", sa.Integer(), nullable=False),
    )
    op.create_index("ix_contact_sources_import_id", "contact_sources", ["import_id"])
    op.create_table(
        "consent_records",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("contact_id", sa.Integer(), sa.ForeignKey("contacts.id"), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=True),
        sa.Column("consent_at", TS, nullable=False),
        sa.Column("recorded_at", TS, nullable=False),
        sa.Column("ip_masked", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(512), nullable=True),
        sa.Column("wording", sa.Text(), nullable=True),
        sa.Column("import_id", sa.Integer(), sa.ForeignKey("imports.id"), nullable=True),
        sa.Column("attestation_id", sa.Integer(), sa.ForeignKey("attestations.id"), nullable=True),
        sa.Column("evidence", sa.String(255), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("operator", sa.String(255), nullable=True),
        sa.CheckConstraint(f"status IN {CONSENT_STATUSES}", name="ck_consent_records_status"),
    )
    # The consent gate reads the latest row per (contact, purpose): this index serves it.
    op.create_index("ix_consent_records_state", "consent_records", ["contact_id", "purpose", "id"])
    op.create_index("ix_consent_records_attestation_id", "consent_records", ["attestation_id"])
    op.create_table(
        "suppressions",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("address_hash", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("lifted_at", TS, nullable=True),
        sa.Column(
            "lifted_by_consent_id", BigId, sa.ForeignKey("consent_records.id"), nullable=True
        ),
        sa.CheckConstraint(f"reason IN {SUPPRESSION_REASONS}", name="ck_suppressions_reason"),
        sa.CheckConstraint(
            "lifted_at IS NULL OR (reason = 'unsubscribed' AND lifted_by_consent_id IS NOT NULL)",
            name="ck_suppressions_only_unsubscribe_lifted_by_evidence",
        ),
    )
    op.create_index("ix_suppressions_address_hash", "suppressions", ["address_hash"])

    guards = (
        SQLITE_LEDGER_GUARDS if op.get_bind().dialect.name == "sqlite" else POSTGRES_LEDGER_GUARDS
    )
    for statement in guards:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS consent_records_no_update")
        op.execute("DROP TRIGGER IF EXISTS consent_records_no_delete")
    else:
        op.execute("DROP TRIGGER IF EXISTS consent_records_append_only ON consent_records")
        op.execute("DROP TRIGGER IF EXISTS consent_records_no_truncate ON consent_records")
        op.execute("DROP FUNCTION IF EXISTS consent_records_append_only()")
    for table in (
        "suppressions",
        "consent_records",
        "contact_sources",
        "imports",
        "contact_tags",
        "contacts",
        "attestations",
        "meta",
    ):
        op.drop_table(table)
