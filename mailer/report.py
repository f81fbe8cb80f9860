"""Campaign reports: what was sent, what failed, who was excluded and why, and engagement."""

from __future__ import annotations

from typing import Any

import sqlmodel
from sqlmodel import Session

from mailer import queries, tallies
from mailer.errors import NotFound
from mailer.models import Campaign, DeliveryStatus, as_utc

ENGAGEMENT_KEYS = (
    "opens",
    "unique_opens",
    "clicks",
    "unique_clicks",
    "machine_opens",
    "machine_unique_opens",
    "machine_clicks",
    "machine_unique_clicks",
    "unsubscribes",
)


def campaign_by_name(session: Session, name: str) -> Campaign:
    campaign = session.exec(sqlmodel.select(Campaign).where(Campaign.name == name)).first()
    if campaign is None:
        raise NotFound(f"no campaign named {name!r}")
    return campaign


def engagement(session: Session, campaign_id: int) -> dict[str, int]:
    """Opens, clicks and unsubscribes; zero until the tracking app has recorded any."""
    counts = dict.fromkeys(ENGAGEMENT_KEYS, 0)
    counter = getattr(queries, "engagement_counts", None)
    if counter is not None:  # provided once the tracking app records events
        counts.update(counter(session, campaign_id))
    return counts


def build_report(session: Session, name: str) -> dict[str, Any]:
    campaign = campaign_by_name(session, name)
    assert campaign.id is not None
    conn = session.connection()
    by_status: dict[str, int] = {
        status: count for status, count in conn.execute(queries.delivery_counts(campaign.id))
    }
    excluded: dict[str, int] = dict(campaign.excluded or {})
    for reason, count in conn.execute(queries.recheck_exclusions(campaign.id)):
        excluded[reason or "unknown"] = excluded.get(reason or "unknown", 0) + count
    erased = tallies.for_campaign(conn, campaign.id)  # erased people, purged events: anonymous
    for metric, count in erased.items():
        group, _, key = metric.partition(":")
        if group in ("status", "excluded"):
            counts = by_status if group == "status" else excluded
            counts[key] = counts.get(key, 0) + count
    bounces = conn.execute(queries.bounce_count(campaign.id)).scalar_one()
    report: dict[str, Any] = {
        "campaign": campaign.name,
        "purpose": campaign.purpose,
        "status": campaign.status,
        "status_reason": campaign.status_reason,
        "started_at": as_utc(campaign.started_at).isoformat() if campaign.started_at else None,
        "finished_at": as_utc(campaign.finished_at).isoformat() if campaign.finished_at else None,
        "audience": sum(v for k, v in by_status.items() if k != DeliveryStatus.EXCLUDED.value),
        "queued": by_status.get(DeliveryStatus.QUEUED.value, 0),
        "sending": by_status.get(DeliveryStatus.SENDING.value, 0),
        "sent": by_status.get(DeliveryStatus.SENT.value, 0),
        "failed": by_status.get(DeliveryStatus.FAILED.value, 0),
        "uncertain": by_status.get(DeliveryStatus.UNCERTAIN.value, 0),
        "excluded": dict(sorted(excluded.items())),
        "bounces": int(bounces),
    }
    report.update(engagement(session, campaign.id))
    for metric, count in erased.items():
        if isinstance(report.get(metric), int):
            report[metric] += count
    return report
