"""Contact imports: a CSV streamed in chunks, validated row by row, merged set-wise per chunk.

One import is one transaction. A problem with the file as a whole (unreadable, no `email`
column, bad encoding, broken CSV quoting, an invalid attestation) rolls everything back; a bad
row is rejected with its row number and reason and the rest goes in (`strict` rolls back if any
row is bad). Memory is bounded by the chunk size, never by the file size.

Row numbers are what a spreadsheet shows: the header is row 1, the first contact row 2.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg import sql
from sqlalchemy import Connection, Engine, Table, any_, bindparam, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import String
from sqlmodel import Session

from mailer import attestations, consent, events, suppression
from mailer.addresses import address_hash, normalise_address
from mailer.attestations import AttestationData
from mailer.config import Settings
from mailer.contacts import ContactData, merge_changes, normalise_locale, split_tags
from mailer.csvsafe import safe_row
from mailer.db import session_scope
from mailer.errors import BadInput, CsvFileError, InvalidAddress
from mailer.events import EventType, NewEvent
from mailer.masking import mask_ip
from mailer.models import (
    ConsentMethod,
    ConsentRecord,
    ConsentStatus,
    Contact,
    ContactSource,
    ContactTag,
    IgnoredReason,
    ImportBatch,
    utcnow,
)

CHUNK_SIZE = 2000
MAX_REJECTS_SHOWN = 50
MAX_TEXT = 255
MAX_ATTRIBUTE = 2000
FUTURE_TOLERANCE = timedelta(minutes=5)
MEMO_SIZE = 4096  # distinct locale, tag and purpose strings remembered per import

CONTACT_COLUMNS = ("email", "name", "first_name", "last_name", "locale", "tags")
EVIDENCE_REQUIRED = ("consent_purposes", "consent_at", "consent_source")
EVIDENCE_OPTIONAL = ("consent_policy_version", "consent_ip")
KNOWN_COLUMNS = frozenset(CONTACT_COLUMNS + EVIDENCE_REQUIRED + EVIDENCE_OPTIONAL)

contacts_table = Contact.__table__  # type: ignore[attr-defined]
tags_table = ContactTag.__table__  # type: ignore[attr-defined]
sources_table = ContactSource.__table__  # type: ignore[attr-defined]
ledger_table = ConsentRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Evidence:
    purposes: tuple[str, ...]
    consent_at: datetime
    source: str
    policy_version: str | None
    ip_masked: str | None


@dataclass(frozen=True)
class ParsedRow:
    row_number: int
    data: ContactData
    evidence: Evidence | None


@dataclass(frozen=True)
class Reject:
    row_number: int
    email: str
    field: str
    reason: str
    message: str


class RowError(Exception):
    def __init__(self, field: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message


@dataclass
class ImportSummary:
    path: str
    import_id: int | None = None
    vendor: str | None = None
    attestation_id: int | None = None
    rows_read: int = 0
    new: int = 0
    merged: int = 0
    duplicates: int = 0
    consent_granted: int = 0
    consent_unchanged: int = 0
    consent_ignored: Counter[str] = field(default_factory=Counter)
    suppressed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejects: list[Reject] = field(default_factory=list)
    written: bool = True

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "import_id": self.import_id,
            "vendor": self.vendor,
            "attestation_id": self.attestation_id,
            "rows_read": self.rows_read,
            "new": self.new,
            "merged": self.merged,
            "duplicates": self.duplicates,
            "consent_granted": self.consent_granted,
            "consent_unchanged": self.consent_unchanged,
            "consent_ignored": dict(self.consent_ignored),
            "suppressed": self.suppressed,
            "rejected": dict(self.rejected),
            "rejected_total": self.rejected_total,
            "written": self.written,
            "rejects": [
                {"row": r.row_number, "field": r.field, "reason": r.reason, "message": r.message}
                for r in self.rejects
            ],
        }


SUMMARY_COUNTS = (
    "rows_read",
    "new",
    "merged",
    "duplicates",
    "consent_granted",
    "consent_unchanged",
    "consent_ignored",
    "suppressed",
    "rejected",
    "rejected_total",
)


class StrictAbort(Exception):
    """Raised inside the transaction to roll it back when --strict meets a bad row."""


# ---------------------------------------------------------------------------------------------
# Reading and validating rows


def _parse_time(raw: str, column: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise RowError(
            column, "invalid_date", f"{column} {raw!r} is not an ISO 8601 date"
        ) from None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if parsed > utcnow() + FUTURE_TOLERANCE:
        raise RowError(column, "future_date", f"{column} {raw!r} lies in the future")
    return parsed.astimezone(UTC)


def _clean_text(raw: str, column: str, limit: int = MAX_TEXT) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if "\n" in value or "\r" in value or "\0" in value:
        raise RowError(column, "line_break", f"{column} contains a line break or NUL")
    if len(value) > limit:
        raise RowError(column, "too_long", f"{column} is longer than {limit} characters")
    return value


def _check_purposes(raw_purposes: str) -> list[str]:
    purposes: list[str] = []
    for raw in raw_purposes.split(";"):
        if raw.strip():
            try:
                purposes.append(consent.check_purpose(raw))
            except BadInput:
                raise RowError(
                    "consent_purposes", "invalid_purpose", f"invalid purpose {raw.strip()!r}"
                ) from None
    return purposes


class RowParser:
    def __init__(self, header: Sequence[str], attestation: AttestationData | None) -> None:
        self.header = list(header)
        self.attestation = attestation
        self.index = {name: i for i, name in enumerate(self.header)}
        self.extra = [(name, i) for name, i in self.index.items() if name not in KNOWN_COLUMNS]
        # Locales, tag lists and purpose lists repeat from row to row: validate each distinct
        # string once (a bounded memo; invalid values are not remembered and raise every time).
        self._locales: dict[str, str] = {}
        self._tags: dict[str, tuple[str, ...]] = {}
        self._purposes: dict[str, tuple[str, ...]] = {}

    @staticmethod
    def _remember(memo: dict[str, Any], raw: str, value: Any) -> Any:
        if len(memo) < MEMO_SIZE:
            memo[raw] = value
        return value

    def parse(self, row_number: int, values: Sequence[str]) -> ParsedRow:
        if len(values) != len(self.header):
            raise RowError(
                "-",
                "field_count",
                f"has {len(values)} fields where the header has {len(self.header)}",
            )
        get = {name: values[i] for name, i in self.index.items()}
        try:
            email = normalise_address(get["email"])
        except InvalidAddress as exc:
            raise RowError("email", "invalid_email", f"invalid email: {exc}") from None

        data = ContactData(email=email)
        for column in ("name", "first_name", "last_name"):
            if column in get:
                setattr(data, column, _clean_text(get[column], column))
        raw_locale = get.get("locale", "")
        if raw_locale.strip():
            locale = self._locales.get(raw_locale)
            if locale is None:
                try:
                    locale = normalise_locale(raw_locale)
                except ValueError:
                    raise RowError(
                        "locale", "invalid_locale", f"locale {raw_locale!r} is not a language tag"
                    ) from None
                self._remember(self._locales, raw_locale, locale)
            data.locale = locale
        if "tags" in get:
            raw_tags = get["tags"]
            tags = self._tags.get(raw_tags)
            if tags is None:
                try:
                    tags = self._remember(self._tags, raw_tags, tuple(split_tags(raw_tags)))
                except ValueError as exc:
                    raise RowError("tags", "invalid_tags", str(exc)) from None
            data.tags = list(tags)
        for column, i in self.extra:
            value = _clean_text(values[i], column, MAX_ATTRIBUTE)
            if value is not None:
                data.attributes[column] = value
        return ParsedRow(row_number, data, self._evidence(get))

    def _evidence(self, get: dict[str, str]) -> Evidence | None:
        present = [c for c in EVIDENCE_REQUIRED if get.get(c, "").strip()]
        if not present:
            extra = [c for c in EVIDENCE_OPTIONAL if get.get(c, "").strip()]
            if extra:
                raise RowError(
                    extra[0],
                    "partial_consent",
                    f"partial consent evidence: {extra[0]} without " + ", ".join(EVIDENCE_REQUIRED),
                )
            return None
        missing = [c for c in EVIDENCE_REQUIRED if c not in present]
        if missing:
            raise RowError(
                missing[0],
                "partial_consent",
                "partial consent evidence: missing " + ", ".join(missing),
            )
        purposes = self._purposes.get(get["consent_purposes"])
        if purposes is None:
            purposes = self._remember(
                self._purposes,
                get["consent_purposes"],
                tuple(_check_purposes(get["consent_purposes"])),
            )
        consent_at = _parse_time(get["consent_at"], "consent_at")
        source = _clean_text(get["consent_source"], "consent_source") or ""
        policy = _clean_text(get.get("consent_policy_version", ""), "consent_policy_version", 64)
        ip_masked = None
        if get.get("consent_ip", "").strip():
            try:
                ip_masked = mask_ip(get["consent_ip"])
            except ValueError:
                raise RowError(
                    "consent_ip",
                    "invalid_ip",
                    f"consent_ip {get['consent_ip']!r} is not an IP address",
                ) from None
        if self.attestation is not None:
            outside = [p for p in purposes if p not in self.attestation.purposes]
            if outside:
                raise RowError(
                    "consent_purposes",
                    "outside_attested_purposes",
                    f"purpose {outside[0]!r} is not among the attested purposes "
                    f"({', '.join(self.attestation.purposes)})",
                )
            if not self.attestation.covers(consent_at):
                raise RowError(
                    "consent_at",
                    "outside_attested_period",
                    f"consent_at {consent_at:%Y-%m-%d} lies outside the attested period "
                    f"{self.attestation.collected_from} to {self.attestation.collected_to}",
                )
        return Evidence(tuple(dict.fromkeys(purposes)), consent_at, source, policy, ip_masked)


def _open_csv(path: Path) -> TextIO:
    try:
        return path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise CsvFileError(f"{path}: cannot read file: {exc.strerror}") from exc


def _read_header(path: Path, reader: Iterator[list[str]]) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise CsvFileError(f"{path}: the file is empty (expected a header row)") from None
    names = [h.strip().lower() for h in header]
    for position, name in enumerate(names, start=1):
        if not name:
            raise CsvFileError(f"{path}: header column {position} has no name")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CsvFileError(f"{path}: header names column {name!r} twice")
        seen.add(name)
    if "email" not in names:
        raise CsvFileError(f"{path}: no 'email' column in the header row")
    return names


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise CsvFileError(f"{path}: cannot read file: {exc.strerror}") from exc
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing one chunk

NEW_CONTACT_COLUMNS = (
    "email",
    "email_hash",
    "name",
    "first_name",
    "last_name",
    "locale",
    "attributes",
    "created_at",
    "updated_at",
)
LEDGER_COLUMNS = (
    "contact_id",
    "purpose",
    "status",
    "method",
    "source",
    "policy_version",
    "consent_at",
    "recorded_at",
    "ip_masked",
    "wording",
    "import_id",
    "attestation_id",
    "evidence",
    "note",
    "operator",
)




@dataclass(frozen=True)
class _InsertPlan:
    statement: Any  # COPY (psycopg.sql.Composed) or INSERT (str)
    converters: list[tuple[int, Any]]  # (position, the dialect's bind processor)
    types: list[int]  # PostgreSQL type oids of the columns, for COPY


class _BulkInserter:
    """Plain INSERTs of many rows at once, without SQLAlchemy's per-row parameter handling.

    PostgreSQL gets `COPY ... FROM STDIN` on the session's own connection (so it is part of the
    import's one transaction, and rolls back with it); SQLite gets one `executemany`. Values
    pass through the dialect's own bind processors, so what is stored is exactly what
    `insert(table)` stores. COPY has no ON CONFLICT: use this only for rows that cannot collide
    (contacts created in this chunk and what hangs off them, ledger rows).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.dialect = conn.dialect
        self.postgresql = self.dialect.name == "postgresql"
        self._plans: dict[tuple[str, tuple[str, ...]], _InsertPlan] = {}
        self._sequences: dict[str, str] = {}

    def _plan(self, table: Table, columns: tuple[str, ...]) -> _InsertPlan:
        plan = self._plans.get((table.name, columns))
        if plan is not None:
            return plan
        converters = []
        for position, name in enumerate(columns):
            processor = table.c[name].type.dialect_impl(self.dialect).bind_processor(self.dialect)
            if processor is not None:
                converters.append((position, processor))
        if self.postgresql:
            # The columns' own types, so that psycopg picks each column's dumper once.
            oids = {
                name: oid
                for name, oid in self.conn.execute(
                    text(
                        "SELECT attname, atttypid FROM pg_attribute "
                        "WHERE attrelid = CAST(:table AS regclass) AND attnum > 0 "
                        "AND NOT attisdropped"
                    ),
                    {"table": table.name},
                )
            }
            plan = _InsertPlan(
                sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
                ),
                converters,
                [int(oids[name]) for name in columns],
            )
        else:
            quote = self.dialect.identifier_preparer.quote
            plan = _InsertPlan(
                f"INSERT INTO {quote(table.name)} ({', '.join(map(quote, columns))}) "
                f"VALUES ({', '.join('?' for _ in columns)})",
                converters,
                [],
            )
        self._plans[(table.name, columns)] = plan
        return plan

    def insert(self, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        plan = self._plan(table, columns)
        if plan.converters:
            converted = []
            for row in rows:
                values = list(row)
                for position, processor in plan.converters:
                    values[position] = processor(values[position])
                converted.append(tuple(values))
            rows = converted
        if not self.postgresql:
            self.conn.exec_driver_sql(plan.statement, rows)
            return
        driver = self.conn.connection.driver_connection
        assert driver is not None
        try:
            with driver.cursor() as cursor, cursor.copy(plan.statement) as copy:
                copy.set_types(plan.types)
                for row in rows:
                    copy.write_row(row)
        except psycopg.Error as exc:
            # The same exception classes as every other statement (OperationalError, ...).
            raise DBAPIError.instance(
                plan.statement.as_string(driver), None, exc, psycopg.Error
            ) from exc

    def allocate_ids(self, table: Table, count: int) -> list[int]:
        """`count` new ids from the table's own sequence, for COPY to write (PostgreSQL)."""
        sequence = self._sequences.get(table.name)
        if sequence is None:
            sequence = self.conn.execute(
                text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table.name}
            ).scalar_one()
            self._sequences[table.name] = sequence
        result = self.conn.execute(
            text("SELECT nextval(CAST(:sequence AS regclass)) FROM generate_series(1, :count)"),
            {"sequence": sequence, "count": count},
        )
        return [int(value) for value in result.scalars()]


def _changed(stored: Any, changes: dict[str, Any]) -> list[str]:
    """The names of the fields a merge changes, attributes key by key (never their values)."""
    names = [name for name in changes if name != "attributes"]
    if "attributes" in changes:
        before = dict(stored.attributes or {})
        after = changes["attributes"]
        names += [f"attributes.{key}" for key in after if before.get(key) != after[key]]
    return names


@dataclass
class _Pending:
    data: ContactData
    first_row: int
    evidence: list[tuple[int, Evidence]]


class _ChunkWriter:
    def __init__(
        self,
        session: Session,
        settings: Settings,
        batch: ImportBatch,
        attestation: AttestationData | None,
        attestation_id: int | None,
        summary: ImportSummary,
    ) -> None:
        self.session = session
        self.settings = settings
        self.batch = batch
        self.attestation = attestation
        self.attestation_id = attestation_id
        self.summary = summary
        self.dialect = session.connection().dialect.name
        self.key = settings.suppression_key
        self.bulk = _BulkInserter(session.connection())

    def _insert_ignore(self, table: Any) -> Any:
        module = postgresql if self.dialect == "postgresql" else sqlite
        return module.insert(table).on_conflict_do_nothing()

    def _emails_in(self, emails: list[str]) -> Any:
        if self.dialect == "postgresql":
            # One array parameter instead of thousands of expanded ones.
            array = bindparam("emails", emails, type_=postgresql.ARRAY(String))
            return contacts_table.c.email == any_(array)
        return contacts_table.c.email.in_(emails)

    def write(self, rows: list[ParsedRow]) -> None:
        conn = self.session.connection()
        pending: dict[str, _Pending] = {}
        for row in rows:
            entry = pending.get(row.data.email)
            if entry is None:
                pending[row.data.email] = _Pending(row.data, row.row_number, [])
                entry = pending[row.data.email]
            else:
                self.summary.duplicates += 1
                entry.data.absorb(row.data)
            if row.evidence is not None:
                entry.evidence.append((row.row_number, row.evidence))

        emails = list(pending)
        existing = {
            r.email: r
            for r in conn.execute(
                select(
                    contacts_table.c.id,
                    contacts_table.c.email,
                    contacts_table.c.name,
                    contacts_table.c.first_name,
                    contacts_table.c.last_name,
                    contacts_table.c.locale,
                    contacts_table.c.attributes,
                    sources_table.c.import_id.label("seen_in_this_import"),
                )
                .outerjoin(
                    sources_table,
                    (sources_table.c.contact_id == contacts_table.c.id)
                    & (sources_table.c.import_id == self.batch.id),
                )
                .where(self._emails_in(emails))
            )
        }
        now = utcnow()
        hashes = {email: address_hash(email, self.key) for email in emails}

        ids: dict[str, int] = {email: row.id for email, row in existing.items()}
        fresh = [email for email in emails if email not in existing]
        if fresh:
            ids.update(self._insert_new(pending, fresh, hashes, now))
            self.summary.new += len(fresh)

        # The chunk's events go out with it, in the import's transaction, in one write.
        outbox = [
            NewEvent(
                EventType.CONTACT_CREATED,
                {"contact_id": ids[email], "email": email},
                contact_id=ids[email],
                occurred_at=now,
            )
            for email in fresh
        ]
        updates = []
        for email, match in existing.items():
            if match.seen_in_this_import is not None:
                self.summary.duplicates += 1
            else:
                self.summary.merged += 1
            changes = merge_changes(match._mapping, pending[email].data)
            if changes:
                merged = {
                    name: changes.get(name, match._mapping[name])
                    for name in ("name", "first_name", "last_name", "locale", "attributes")
                }
                updates.append({"b_id": match.id, "updated_at": now, **merged})
                outbox.append(
                    NewEvent(
                        EventType.CONTACT_UPDATED,
                        {
                            "contact_id": match.id,
                            "email": email,
                            "changes": _changed(match, changes),
                        },
                        contact_id=match.id,
                        occurred_at=now,
                    )
                )
        if updates:
            conn.execute(
                update(contacts_table)
                .where(contacts_table.c.id == bindparam("b_id"))
                .values(
                    name=bindparam("name"),
                    first_name=bindparam("first_name"),
                    last_name=bindparam("last_name"),
                    locale=bindparam("locale"),
                    attributes=bindparam("attributes"),
                    updated_at=bindparam("updated_at"),
                ),
                updates,
            )

        # Contacts that existed before this chunk may have these tags and this import's source
        # row already; the new ones got theirs in _insert_new.
        tag_rows = [
            {"contact_id": ids[email], "tag": tag}
            for email in existing
            for tag in pending[email].data.tags
        ]
        if tag_rows:
            conn.execute(self._insert_ignore(tags_table), tag_rows)
        source_rows = [
            {"contact_id": ids[email], "import_id": self.batch.id, "row_number": p.first_row}
            for email, p in pending.items()
            if email in existing
        ]
        if source_rows:
            conn.execute(self._insert_ignore(sources_table), source_rows)

        active = suppression.active(self.session, hashes.values())
        self.summary.suppressed += sum(1 for email in emails if hashes[email] in active)
        self._record_consent(pending, ids, hashes, active, existing, outbox)
        self._emit(outbox)

    def _emit(self, outbox: list[NewEvent]) -> None:
        """The chunk's events and their webhook deliveries, in the import's transaction
        (emit_many COPYs them on PostgreSQL, like the ledger)."""
        events.emit_many(self.session.connection(), outbox)

    def _insert_new(
        self,
        pending: dict[str, _Pending],
        fresh: list[str],
        hashes: dict[str, str],
        now: datetime,
    ) -> dict[str, int]:
        """Insert the contacts that do not exist yet, with their tags and source rows."""

        def values(email: str) -> tuple[Any, ...]:
            data = pending[email].data
            return (
                email,
                hashes[email],
                data.name,
                data.first_name,
                data.last_name,
                data.locale,
                data.attributes,
                now,
                now,
            )

        ids: dict[str, int]
        if self.bulk.postgresql:
            ids = dict(zip(fresh, self.bulk.allocate_ids(contacts_table, len(fresh)), strict=True))
            self.bulk.insert(
                contacts_table,
                ("id", *NEW_CONTACT_COLUMNS),
                [(ids[email], *values(email)) for email in fresh],
            )
        else:
            self.bulk.insert(contacts_table, NEW_CONTACT_COLUMNS, [values(e) for e in fresh])
            inserted = self.session.connection().execute(
                select(contacts_table.c.email, contacts_table.c.id).where(
                    contacts_table.c.email.in_(fresh)
                )
            )
            ids = {email: contact_id for email, contact_id in inserted}
        self.bulk.insert(
            tags_table,
            ("contact_id", "tag"),
            [
                (ids[email], tag)
                for email in fresh
                for tag in dict.fromkeys(pending[email].data.tags)
            ],
        )
        self.bulk.insert(
            sources_table,
            ("contact_id", "import_id", "row_number"),
            [(ids[email], self.batch.id, pending[email].first_row) for email in fresh],
        )
        return ids

    def _record_consent(
        self,
        pending: dict[str, _Pending],
        ids: dict[str, int],
        hashes: dict[str, str],
        active: dict[str, list[str]],
        existing: Container[str],
        outbox: list[NewEvent],
    ) -> None:
        with_evidence = {email: p for email, p in pending.items() if p.evidence}
        if not with_evidence:
            return
        # A contact created by this chunk has no ledger rows yet: only ask about the others.
        states = consent.current_states(
            self.session, [ids[e] for e in with_evidence if e in existing]
        )
        method = (
            ConsentMethod.VENDOR_ATTESTATION if self.attestation else ConsentMethod.IMPORT
        ).value
        wording = self.attestation.consent_wording if self.attestation else None
        recorded_at = utcnow()
        ledger_rows: list[tuple[Any, ...]] = []
        for email, p in with_evidence.items():
            contact_id = ids[email]
            contact_states = states.get(contact_id, {})
            suppressed = hashes[email] in active
            for row_number, evidence in sorted(p.evidence, key=lambda item: item[1].consent_at):
                for purpose in evidence.purposes:
                    verdict: IgnoredReason | consent.Unchanged | None
                    if self.attestation is not None and not self.attestation.grants_consent:
                        verdict = IgnoredReason.LAWFUL_BASIS
                    else:
                        verdict = consent.judge_imported_grant(
                            contact_states.get(purpose), suppressed, evidence.consent_at
                        )
                    if isinstance(verdict, consent.Unchanged):
                        self.summary.consent_unchanged += 1
                        continue
                    status = ConsentStatus.GRANTED if verdict is None else ConsentStatus.IGNORED
                    ledger_rows.append(
                        (
                            contact_id,
                            purpose,
                            status.value,
                            method,
                            evidence.source,
                            evidence.policy_version,
                            evidence.consent_at,
                            recorded_at,
                            evidence.ip_masked,
                            wording,
                            self.batch.id,
                            self.attestation_id,
                            f"import {self.batch.id} row {row_number}",
                            None if verdict is None else verdict.value,
                            self.batch.operator,
                        )
                    )
                    if verdict is None:
                        self.summary.consent_granted += 1
                        granted = consent.ledger_event(
                            {
                                "contact_id": contact_id,
                                "purpose": purpose,
                                "status": ConsentStatus.GRANTED.value,
                                "method": method,
                                "policy_version": evidence.policy_version,
                            },
                            email,
                        )
                        assert granted is not None
                        outbox.append(granted)
                        previous = contact_states.get(purpose)
                        contact_states[purpose] = consent.ConsentState(
                            purpose=purpose,
                            status=ConsentStatus.GRANTED,
                            method=method,
                            source=evidence.source,
                            consent_at=evidence.consent_at,
                            policy_version=evidence.policy_version,
                            attestation_id=self.attestation_id,
                            last_withdrawn_at=previous.last_withdrawn_at if previous else None,
                        )
                    else:
                        self.summary.consent_ignored[verdict.value] += 1
        # The ledger is append-only: plain inserts, as consent.append makes, in bulk.
        self.bulk.insert(ledger_table, LEDGER_COLUMNS, ledger_rows)


# ---------------------------------------------------------------------------------------------
# The import as a whole


class _RejectSink:
    """Collects rejects: counts, the first few for the summary, and all of them in a file."""

    COLUMNS = ("row", "field", "reason", "message", "email")

    def __init__(self, summary: ImportSummary, path: Path | None) -> None:
        self.summary = summary
        self.path = path
        self.fh: TextIO | None = None
        self.writer: Any = None
        if path is not None:
            try:
                self.fh = path.open("w", encoding="utf-8", newline="")
            except OSError as exc:
                raise BadInput(f"{path}: cannot write rejects file: {exc.strerror}") from exc
            self.writer = csv.writer(self.fh)
            self.writer.writerow(self.COLUMNS)

    def add(self, reject: Reject) -> None:
        self.summary.rejected[reject.reason] += 1
        if len(self.summary.rejects) < MAX_REJECTS_SHOWN:
            self.summary.rejects.append(reject)
        if self.writer is not None:
            self.writer.writerow(
                safe_row(
                    [reject.row_number, reject.field, reject.reason, reject.message, reject.email]
                )
            )

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def import_contacts(
    engine: Engine,
    settings: Settings,
    path: Path,
    *,
    vendor: str | None = None,
    attestation_path: Path | None = None,
    strict: bool = False,
    rejects_path: Path | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> ImportSummary:
    if vendor is not None and not vendor.strip():
        raise BadInput("--vendor needs the vendor's name")
    if vendor is not None and attestation_path is None:
        raise BadInput(
            f"--vendor {vendor!r} needs --attestation FILE.toml: a bought list is only imported "
            "with the vendor's lawful-source attestation"
        )
    if attestation_path is not None and vendor is None:
        raise BadInput("--attestation goes with --vendor NAME")
    attestation = attestations.load(attestation_path, vendor) if attestation_path else None

    fh = _open_csv(path)
    summary = ImportSummary(path=str(path), vendor=vendor)
    sink = _RejectSink(summary, rejects_path)
    try:
        reader = csv.reader(fh, strict=True)
        header = _read_header(path, _checked(path, reader))
        parser = RowParser(header, attestation)
        digest = file_sha256(path)
        with session_scope(engine) as session:
            attestation_row = attestations.store(session, attestation) if attestation else None
            batch = ImportBatch(
                filename=path.name,
                file_sha256=digest,
                vendor=vendor,
                attestation_id=attestation_row.id if attestation_row else None,
                operator=settings.operator,
                started_at=utcnow(),
            )
            session.add(batch)
            session.flush()
            summary.import_id = batch.id
            summary.attestation_id = batch.attestation_id
            writer = _ChunkWriter(
                session, settings, batch, attestation, batch.attestation_id, summary
            )
            chunk: list[ParsedRow] = []
            for row_number, values in _numbered(path, reader):
                if not any(v.strip() for v in values):
                    continue
                summary.rows_read += 1
                try:
                    chunk.append(parser.parse(row_number, values))
                except RowError as exc:
                    email_index = parser.index["email"]
                    email = values[email_index] if email_index < len(values) else ""
                    sink.add(Reject(row_number, email.strip(), exc.field, exc.reason, exc.message))
                    continue
                if len(chunk) >= chunk_size:
                    writer.write(chunk)
                    chunk = []
            if chunk:
                writer.write(chunk)
            if strict and summary.rejected_total:
                raise StrictAbort
            batch.finished_at = utcnow()
            events.emit(session, EventType.IMPORT_COMPLETED, _completed(summary, path))
            batch.summary = summary.as_dict()
            session.add(batch)
    except StrictAbort:
        summary.written = False
        summary.import_id = None
        summary.new = summary.merged = summary.duplicates = 0
        summary.consent_granted = summary.consent_unchanged = summary.suppressed = 0
        summary.consent_ignored.clear()
    finally:
        sink.close()
        fh.close()
    return summary


def _completed(summary: ImportSummary, path: Path) -> dict[str, Any]:
    """import.completed: the counts, never a row (rejects name addresses)."""
    document = summary.as_dict()
    counts = {key: document[key] for key in SUMMARY_COUNTS}
    return {
        "import_id": summary.import_id,
        "filename": path.name,
        "vendor": summary.vendor,
        "attestation_id": summary.attestation_id,
        **counts,
    }


def _checked(path: Path, reader: Iterator[list[str]]) -> Iterator[list[str]]:
    """Turn decoding and CSV structure errors into one clear file-level error."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            line = getattr(reader, "line_num", 0) + 1
            raise CsvFileError(
                f"{path}: not UTF-8 text near line {line} (byte {exc.start} of that block): "
                "save the file as UTF-8"
            ) from None
        except csv.Error as exc:
            line = getattr(reader, "line_num", 0)
            raise CsvFileError(f"{path}: malformed CSV at line {line}: {exc}") from None


def _numbered(path: Path, reader: Any) -> Iterator[tuple[int, list[str]]]:
    row_number = 1
    for values in _checked(path, reader):
        row_number += 1
        yield row_number, values
