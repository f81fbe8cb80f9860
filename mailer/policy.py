"""Versions of the privacy statement, and the notice of a material change (obligation 9).

A material change is announced on every recipient page for NOTICE_DAYS from its publication.
Versions must sort, as text, after every version published before them: the consent gate
compares a consent's policy version with a campaign's `min_policy_version` as text, so
refusing a version that would sort out of publication order keeps the two orders the same.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import Engine, func
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from mailer import audit
from mailer.errors import BadInput
from mailer.models import PolicyVersion, as_utc, utcnow

NOTICE_DAYS = 30
NOTICE_WINDOW = timedelta(days=NOTICE_DAYS)
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_SUMMARY = 500
NOTICE_CACHE_SECONDS = 60.0

logger = logging.getLogger("mailer.policy")

_MONTHS = {
    "en": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
    "nl": (
        "januari",
        "februari",
        "maart",
        "april",
        "mei",
        "juni",
        "juli",
        "augustus",
        "september",
        "oktober",
        "november",
        "december",
    ),
}


@dataclass(frozen=True)
class Notice:
    """A material change to announce: from its publication until `until`."""

    version: str
    effective_on: date
    published_at: datetime
    until: datetime
    summary: str | None


def check_version(raw: str) -> str:
    version = raw.strip()
    if not VERSION_PATTERN.match(version):
        raise BadInput(
            f"invalid policy version {raw!r}: use letters, digits, '.', '-' or '_', "
            "at most 64 characters, sortable in publication order (for example 2026-07)"
        )
    return version


def _check_summary(raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return None
    summary = raw.strip()
    if any(ch in summary for ch in "\r\n\0"):
        raise BadInput("--summary must be one line (no line breaks)")
    if len(summary) > MAX_SUMMARY:
        raise BadInput(f"--summary is longer than {MAX_SUMMARY} characters")
    return summary


def publish(
    session: Session,
    version: str,
    effective_on: date,
    *,
    material: bool,
    summary: str | None,
    operator: str,
    now: datetime | None = None,
) -> PolicyVersion:
    version = check_version(version)
    summary = _check_summary(summary)
    if material and summary is None:
        raise BadInput("a material change needs --summary: the notice tells people what changed")
    existing = session.exec(select(PolicyVersion).where(PolicyVersion.version == version)).first()
    if existing is not None:
        raise BadInput(f"policy version {version} was published already")
    newest = latest(session)
    # as Python compares, and as the database (whose collation the gate uses) compares
    not_after = session.exec(
        select(func.count()).where(col(PolicyVersion.version) >= version)
    ).one()
    if newest is not None and (version <= newest.version or not_after):
        raise BadInput(
            f"policy version {version} does not sort after {newest.version}, the newest "
            "published: campaigns compare versions as text (min_policy_version), so publish "
            "versions that sort in publication order (for example 2026-01, 2026-07)"
        )
    row = PolicyVersion(
        version=version,
        effective_on=effective_on,
        published_at=now or utcnow(),
        material=material,
        summary=summary,
        operator=operator,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        operator,
        "policy.publish",
        f"policy:{version}",
        {"effective_on": effective_on.isoformat(), "material": material},
    )
    return row


def latest(session: Session) -> PolicyVersion | None:
    found = versions(session)
    return found[-1] if found else None


def versions(session: Session) -> list[PolicyVersion]:
    """Every published version, in publication (= sort) order."""
    return sorted(session.exec(select(PolicyVersion)), key=lambda row: row.version)


def current_notice(session: Session, now: datetime | None = None) -> Notice | None:
    """The newest material change published within the last NOTICE_DAYS, if any."""
    moment = now or utcnow()
    row = session.exec(
        select(PolicyVersion)
        .where(
            col(PolicyVersion.material).is_(True),
            col(PolicyVersion.published_at) > moment - NOTICE_WINDOW,
            col(PolicyVersion.published_at) <= moment,
        )
        .order_by(col(PolicyVersion.published_at).desc(), col(PolicyVersion.id).desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    published = as_utc(row.published_at)
    return Notice(row.version, row.effective_on, published, published + NOTICE_WINDOW, row.summary)


def _day(value: date, lang: str) -> str:
    months = _MONTHS.get(lang, _MONTHS["en"])
    return f"{value.day} {months[value.month - 1]} {value.year}"


def notice_text(notice: Notice, lang: str, today: date | None = None) -> str:
    """The notice in the page's language (Dutch or English)."""
    day = _day(notice.effective_on, lang)
    upcoming = notice.effective_on > (today or utcnow().date())
    if lang == "nl":
        head = (
            f"Onze privacyverklaring wijzigt op {day} (versie {notice.version})."
            if upcoming
            else f"Onze privacyverklaring is gewijzigd per {day} (versie {notice.version})."
        )
    else:
        head = (
            f"Our privacy statement changes on {day} (version {notice.version})."
            if upcoming
            else f"Our privacy statement changed as of {day} (version {notice.version})."
        )
    return f"{head} {notice.summary}" if notice.summary else head


def page_notice(
    engine: Engine,
    *,
    cache_seconds: float = NOTICE_CACHE_SECONDS,
    clock: Callable[[], datetime] = utcnow,
) -> Callable[[str], str | None]:
    """The recipient pages' notice hook: `notice(language) -> text or None`.

    The notice is read at most once per `cache_seconds` per process; a database error shows
    no notice (and is logged) rather than breaking an unsubscribe page.
    """
    lock = threading.Lock()
    cached: list[tuple[float, Notice | None]] = []

    def current() -> Notice | None:
        with lock:
            if cached and cached[0][0] > time.monotonic():
                return cached[0][1]
        try:
            with Session(engine) as session:
                found = current_notice(session, clock())
        except SQLAlchemyError:
            logger.exception("could not read the privacy statement notice")
            return None
        with lock:
            cached[:] = [(time.monotonic() + cache_seconds, found)]
        return found

    def notice(lang: str) -> str | None:
        found = current()
        return None if found is None else notice_text(found, lang, clock().date())

    return notice
