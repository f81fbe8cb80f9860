"""The consent ledger is evidence: the database itself refuses to change or remove a row."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from mailer.models import ConsentStatus
from mailer.service import Mailer


def _one_row(mailer: Mailer) -> int:
    change = mailer.record_consent(
        "ann@example.com", "marketing", ConsentStatus.GRANTED, source="phone"
    )
    assert change.record.id is not None
    return change.record.id


def test_a_ledger_row_cannot_be_updated(mailer: Mailer) -> None:
    row_id = _one_row(mailer)
    with pytest.raises(DBAPIError, match="append-only"), mailer.engine.begin() as conn:
        conn.execute(
            text("UPDATE consent_records SET status = 'withdrawn' WHERE id = :id"), {"id": row_id}
        )
    view = mailer.show_contact("ann@example.com")
    assert [r.status for r in view.history] == ["granted"]


def test_a_ledger_row_cannot_be_deleted(mailer: Mailer) -> None:
    row_id = _one_row(mailer)
    with pytest.raises(DBAPIError, match="append-only"), mailer.engine.begin() as conn:
        conn.execute(text("DELETE FROM consent_records WHERE id = :id"), {"id": row_id})
    assert len(mailer.show_contact("ann@example.com").history) == 1


def test_withdrawal_appends_instead_of_changing_the_grant(mailer: Mailer) -> None:
    _one_row(mailer)
    mailer.record_consent("ann@example.com", "marketing", ConsentStatus.WITHDRAWN, source="letter")
    view = mailer.show_contact("ann@example.com")
    assert [(r.status, r.source) for r in view.history] == [
        ("granted", "phone"),
        ("withdrawn", "letter"),
    ]
    assert view.states["marketing"].status is ConsentStatus.WITHDRAWN
    assert not view.mailable_for("marketing")
