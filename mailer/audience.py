"""A campaign's audience: built once, set-based, through the consent gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select
from sqlmodel import Session

from mailer import queries
from mailer.campaigns import CampaignDefinition
from mailer.config import Settings
from mailer.models import utcnow


@dataclass(frozen=True)
class Audience:
    queued: int
    excluded: dict[str, int]


def gate_for(
    defn: CampaignDefinition, settings: Settings, contact_ids: list[int] | None = None
) -> Select[Any]:
    return queries.eligibility(
        defn.purpose,
        settings.require_double_opt_in,
        min_policy_version=defn.min_policy_version,
        tags=defn.tags,
        contact_ids=contact_ids,
    )


def build_audience(
    session: Session, campaign_id: int, defn: CampaignDefinition, settings: Settings
) -> Audience:
    """One INSERT ... SELECT of the eligible contacts, and the others counted by reason.
    No contact is loaded into Python."""
    conn = session.connection()
    gate = gate_for(defn, settings)
    track = defn.track_opens or defn.track_clicks
    conn.execute(queries.insert_audience(campaign_id, gate, track, utcnow(), conn.dialect.name))
    excluded = {reason: count for reason, count in conn.execute(queries.exclusion_counts(gate))}
    # counted, not taken from rowcount: drivers report -1 for INSERT ... SELECT ON CONFLICT
    queued = sum(count for _status, count in conn.execute(queries.delivery_counts(campaign_id)))
    return Audience(queued=queued, excluded=excluded)
