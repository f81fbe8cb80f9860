"""The derived consent state always equals what a simple reference model says, for random
sequences of operator grants and withdrawals, suppressions and imports."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer import queries
from mailer.models import ConsentStatus, SuppressionReason
from mailer.service import Mailer

PEOPLE = 3
PURPOSES = ("marketing", "tracking")
START = datetime(2026, 1, 1, tzinfo=UTC)
namespaces = itertools.count()


@dataclass
class Expected:
    status: str | None = None
    consent_at: datetime | None = None
    last_withdrawn_at: datetime | None = None


class ReferenceModel:
    def __init__(self) -> None:
        self.state: dict[tuple[int, str], Expected] = {}
        self.suppressed: set[int] = set()

    def at(self, person: int, purpose: str) -> Expected:
        return self.state.setdefault((person, purpose), Expected())

    def grant(self, person: int, purpose: str, t: datetime) -> None:
        e = self.at(person, purpose)
        e.status, e.consent_at = "granted", t

    def withdraw(self, person: int, purpose: str, t: datetime) -> None:
        e = self.at(person, purpose)
        e.status, e.consent_at, e.last_withdrawn_at = "withdrawn", t, t

    def imported(self, person: int, purpose: str, t: datetime) -> None:
        e = self.at(person, purpose)
        if person in self.suppressed:
            return
        if e.last_withdrawn_at is not None and t <= e.last_withdrawn_at:
            return
        if e.status == "granted" and e.consent_at is not None and e.consent_at >= t:
            return
        e.status, e.consent_at = "granted", t

    def mailable(self, person: int, purpose: str) -> bool:
        return self.at(person, purpose).status == "granted" and person not in self.suppressed


person = st.integers(0, PEOPLE - 1)
purpose = st.sampled_from(PURPOSES)
hours_back = st.integers(0, 6)
operation = st.one_of(
    st.tuples(st.just("grant"), person, purpose),
    st.tuples(st.just("withdraw"), person, purpose),
    st.tuples(st.just("suppress"), person),
    st.tuples(
        st.just("import"), st.lists(st.tuples(person, purpose, hours_back), min_size=1, max_size=4)
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=st.lists(operation, min_size=1, max_size=12))
def test_derived_state_matches_reference_model(
    mailer: Mailer, tmp_path: Path, operations: list[tuple[object, ...]]
) -> None:
    namespace = next(namespaces)

    def email(p: int) -> str:
        return f"n{namespace}-p{p}@example.com"

    model = ReferenceModel()
    clock = START
    for step, op in enumerate(operations):
        clock += timedelta(hours=1)
        kind = op[0]
        if kind == "grant":
            _, p, purp = op
            mailer.record_consent(email(p), purp, ConsentStatus.GRANTED, source="phone", at=clock)  # type: ignore[arg-type]
            model.grant(p, purp, clock)  # type: ignore[arg-type]
        elif kind == "withdraw":
            _, p, purp = op
            mailer.record_consent(
                email(p), purp, ConsentStatus.WITHDRAWN, source="letter", at=clock
            )  # type: ignore[arg-type]
            model.withdraw(p, purp, clock)  # type: ignore[arg-type]
        elif kind == "suppress":
            _, p = op
            mailer.suppress(email(p), SuppressionReason.UNSUBSCRIBED)
            model.suppressed.add(p)  # type: ignore[arg-type]
        else:
            rows = op[1]
            path = tmp_path / f"import-{namespace}-{step}.csv"
            lines = ["email,consent_purposes,consent_at,consent_source"]
            for p, purp, back in rows:  # type: ignore[attr-defined]
                lines.append(
                    f"{email(p)},{purp},{(clock - timedelta(hours=back)).isoformat()},shop"
                )
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            summary = mailer.import_contacts(path)
            assert summary.rejected_total == 0
            # the importer applies one contact's evidence oldest first, as the model does
            for p, purp, back in sorted(rows, key=lambda r: (r[0], -r[2])):  # type: ignore[index]
                model.imported(p, purp, clock - timedelta(hours=back))

    with mailer.session() as session:
        for purp in PURPOSES:
            gate = {
                row.email: row.excluded_reason
                for row in session.connection().execute(queries.eligibility(purp, False))
            }
            for p in range(PEOPLE):
                expected = model.at(p, purp)
                if email(p) not in gate:
                    assert expected.status is None
                    continue
                view = mailer.show_contact(email(p))
                state = view.states.get(purp)
                assert (state.status.value if state else None) == expected.status, (p, purp)
                if state is not None:
                    assert state.consent_at == expected.consent_at
                assert view.mailable_for(purp) == model.mailable(p, purp)
                assert (gate[email(p)] is None) == model.mailable(p, purp)
