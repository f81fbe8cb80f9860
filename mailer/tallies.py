"""Anonymous per-campaign counts: what erased people (and events purged by retention) added to
a campaign's report, kept after the rows themselves are gone so that reports still add up.

Metrics are the report's own keys: `status:<delivery status>`, `excluded:<reason>`, and plain
keys such as `bounces`, `opens`, `unique_opens`, `machine_clicks`, `unsubscribes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from mailer.models import CampaignTally

tallies = CampaignTally.__table__  # type: ignore[attr-defined]


def engagement_metrics(kind: str, machine: bool, total: int, unique: int) -> list[tuple[str, int]]:
    """The report keys a group of opens or clicks counts towards (humans and machines apart,
    as queries.engagement_counts counts them)."""
    prefix = "machine_" if machine else ""
    noun = "opens" if kind == "open" else "clicks"
    metrics = [(f"{prefix}{noun}", total)]
    if unique:
        metrics.append((f"{prefix}unique_{noun}", unique))
    return metrics


def add(conn: Connection, counts: Mapping[tuple[int, str], int]) -> None:
    """Add (campaign, metric) -> count: an upsert, safe beside other erasures and purges."""
    rows = [
        {"campaign_id": campaign_id, "metric": metric, "count": count}
        for (campaign_id, metric), count in sorted(counts.items())
        if count
    ]
    if not rows:
        return
    module: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = module.insert(tallies)
    statement = statement.on_conflict_do_update(
        index_elements=[tallies.c.campaign_id, tallies.c.metric],
        set_={"count": tallies.c.count + statement.excluded.count},
    )
    conn.execute(statement, rows)


def for_campaign(conn: Connection, campaign_id: int) -> dict[str, int]:
    return {
        metric: int(count)
        for metric, count in conn.execute(
            select(tallies.c.metric, tallies.c.count).where(tallies.c.campaign_id == campaign_id)
        )
    }
