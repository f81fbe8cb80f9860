"""Webhook endpoints: where events go, which types each one wants, and the secret that signs them.

A secret is shown once, when it is made (`add`, `rotate_secret`), and never again: listings and
errors name an endpoint by its id (`ep_...`) and URL only. After a rotation the previous secret
keeps signing, beside the new one, until its grace period ends, so a consumer can switch over
without losing a delivery.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import ColumnElement, Connection, Engine, delete, func, insert, select, update

from mailer import events
from mailer.errors import BadInput, NotFound
from mailer.models import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    WebhookEndpointEvent,
    as_utc,
    utcnow,
)
from mailer.webhook_http import METADATA_HOSTS, is_public
from mailer.webhooks import new_secret

DEFAULT_GRACE = timedelta(hours=24)
MAX_URL_LENGTH = 2000
MAX_DESCRIPTION = 255

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
subscriptions = WebhookEndpointEvent.__table__  # type: ignore[attr-defined]
deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
attempts = WebhookAttempt.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EndpointView:
    id: int
    uid: str
    url: str
    description: str | None
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    previous_secret_until: datetime | None  # set while a rotated-out secret still signs
    pending: int = 0
    delivered: int = 0
    dead: int = 0


def new_uid() -> str:
    return "ep_" + secrets.token_hex(8)


def secrets_in_use(
    secret: str, previous: str | None, previous_until: datetime | None, now: datetime
) -> list[str]:
    """The secrets that sign a delivery now: the current one, and the rotated-out one during
    its grace period."""
    if previous and previous_until is not None and as_utc(previous_until) > now:
        return [secret, previous]
    return [secret]


def check_url(raw: str, *, allow_private: bool) -> str:
    """An endpoint URL as stored: https, a host, no credentials. Private and loopback targets
    are refused here when they are literal (a friendlier, earlier error); the check that
    counts is made again on every connection, after DNS (mailer.webhook_http)."""
    text = raw.strip()
    if not text:
        raise BadInput("webhook URL: empty")
    if len(text) > MAX_URL_LENGTH:
        raise BadInput(f"webhook URL: longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise BadInput("webhook URL: contains whitespace or control characters")
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise BadInput(f"webhook URL {text!r}: {exc}") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if url.scheme not in allowed:
        hint = "" if allow_private else " (plain http only with MAILER_WEBHOOK_ALLOW_PRIVATE=true)"
        raise BadInput(f"webhook URL {text!r}: must start with https://{hint}")
    if not url.host:
        raise BadInput(f"webhook URL {text!r}: no host")
    if url.userinfo:
        raise BadInput(
            "webhook URL: user name or password in the URL is not allowed (it would be shown "
            "in listings); the signature authenticates mailer to the consumer"
        )
    if url.fragment:
        raise BadInput(f"webhook URL {text!r}: a #fragment is never sent; remove it")
    if not allow_private:
        _refuse_private_host(url.host, text)
    return str(url)


def _refuse_private_host(host: str, text: str) -> None:
    name = host.lower().rstrip(".")
    if name in METADATA_HOSTS or name == "localhost" or name.endswith(".localhost"):
        raise BadInput(
            f"webhook URL {text!r}: {host} is not a public host "
            "(allowed only with MAILER_WEBHOOK_ALLOW_PRIVATE=true)"
        )
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return  # a name: resolved and checked when the dispatcher connects
    if not is_public(name.strip("[]")):
        raise BadInput(
            f"webhook URL {text!r}: {host} is not a public address "
            "(allowed only with MAILER_WEBHOOK_ALLOW_PRIVATE=true)"
        )


def _check_description(description: str | None) -> str | None:
    if description is None or not description.strip():
        return None
    text = description.strip()
    if len(text) > MAX_DESCRIPTION:
        raise BadInput(f"--description: longer than {MAX_DESCRIPTION} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise BadInput("--description: contains control characters")
    return text


def add(
    engine: Engine,
    url: str,
    event_types: Iterable[str],
    *,
    allow_private: bool,
    description: str | None = None,
) -> tuple[EndpointView, str]:
    """Create an enabled endpoint; returns it and its secret (the only time it is shown).
    Events emitted from now on are delivered to it; older ones with `replay --since`."""
    checked = check_url(url, allow_private=allow_private)
    wanted = events.check_types(event_types)
    if events.ALL_TYPES in wanted:
        wanted = [events.ALL_TYPES]
    note = _check_description(description)
    secret = new_secret()
    now = utcnow()
    with engine.begin() as conn:
        existing = conn.execute(select(endpoints.c.uid).where(endpoints.c.url == checked)).scalar()
        if existing is not None:
            raise BadInput(f"an endpoint for {checked} exists already: {existing}")
        uid = new_uid()
        endpoint_id = conn.execute(
            insert(endpoints)
            .values(
                uid=uid,
                url=checked,
                description=note,
                enabled=True,
                secret=secret,
                created_at=now,
                updated_at=now,
            )
            .returning(endpoints.c.id)
        ).scalar_one()
        conn.execute(
            insert(subscriptions),
            [{"endpoint_id": endpoint_id, "event_type": name} for name in wanted],
        )
    return get(engine, uid), secret


def _views(conn: Connection, where: Sequence[ColumnElement[bool]] = ()) -> list[EndpointView]:
    rows = conn.execute(select(endpoints).where(*where).order_by(endpoints.c.id)).all()
    if not rows:
        return []
    ids = [row.id for row in rows]
    types: dict[int, list[str]] = {}
    for endpoint_id, name in conn.execute(
        select(subscriptions.c.endpoint_id, subscriptions.c.event_type)
        .where(subscriptions.c.endpoint_id.in_(ids))
        .order_by(subscriptions.c.event_type)
    ):
        types.setdefault(endpoint_id, []).append(name)
    counts: dict[tuple[int, str], int] = {
        (endpoint_id, status): count
        for endpoint_id, status, count in conn.execute(
            select(deliveries.c.endpoint_id, deliveries.c.status, func.count())
            .where(deliveries.c.endpoint_id.in_(ids))
            .group_by(deliveries.c.endpoint_id, deliveries.c.status)
        )
    }
    return [
        EndpointView(
            id=row.id,
            uid=row.uid,
            url=row.url,
            description=row.description,
            events=types.get(row.id, []),
            enabled=bool(row.enabled),
            disabled_reason=row.disabled_reason,
            created_at=as_utc(row.created_at),
            previous_secret_until=(
                as_utc(row.previous_secret_until)
                if row.previous_secret and row.previous_secret_until is not None
                else None
            ),
            pending=counts.get((row.id, WebhookDeliveryStatus.PENDING.value), 0),
            delivered=counts.get((row.id, WebhookDeliveryStatus.DELIVERED.value), 0),
            dead=counts.get((row.id, WebhookDeliveryStatus.DEAD.value), 0),
        )
        for row in rows
    ]


def list_endpoints(engine: Engine) -> list[EndpointView]:
    with engine.connect() as conn:
        return _views(conn)


def get(engine: Engine, uid: str) -> EndpointView:
    with engine.connect() as conn:
        found = _views(conn, [endpoints.c.uid == uid.strip()])
    if not found:
        raise NotFound(f"no webhook endpoint {uid!r} (see `mailer webhooks list`)")
    return found[0]


def endpoint_id(conn: Connection, uid: str) -> int:
    found = conn.execute(select(endpoints.c.id).where(endpoints.c.uid == uid.strip())).scalar()
    if found is None:
        raise NotFound(f"no webhook endpoint {uid!r} (see `mailer webhooks list`)")
    return int(found)


def set_enabled(engine: Engine, uid: str, enabled: bool, reason: str | None = None) -> EndpointView:
    """Disabling pauses deliveries (pending ones wait, new events are not queued for it);
    enabling resumes the waiting ones. Events from the pause come back with `replay --since`."""
    with engine.begin() as conn:
        found = endpoint_id(conn, uid)
        conn.execute(
            update(endpoints)
            .where(endpoints.c.id == found)
            .values(
                enabled=enabled,
                disabled_reason=None if enabled else (reason or "disabled by an operator"),
                updated_at=utcnow(),
            )
        )
    return get(engine, uid)


def disable_gone(conn: Connection, endpoint_ids: Sequence[int], reason: str) -> None:
    """The consumer answered 410 Gone: stop for good (until enabled again) and cancel what was
    waiting, in the dispatcher's recording transaction."""
    if not endpoint_ids:
        return
    now = utcnow()
    conn.execute(
        update(endpoints)
        .where(endpoints.c.id.in_(list(endpoint_ids)), endpoints.c.enabled)
        .values(enabled=False, disabled_reason=reason[:MAX_DESCRIPTION], updated_at=now)
    )
    conn.execute(
        update(deliveries)
        .where(
            deliveries.c.endpoint_id.in_(list(endpoint_ids)),
            deliveries.c.status == WebhookDeliveryStatus.PENDING.value,
        )
        .values(
            status=WebhookDeliveryStatus.CANCELLED.value,
            next_attempt_at=None,
            lease_owner=None,
            lease_until=None,
        )
    )


def remove(engine: Engine, uid: str) -> EndpointView:
    """Delete an endpoint with its subscriptions, deliveries and attempts (not the events)."""
    view = get(engine, uid)
    with engine.begin() as conn:
        mine = select(deliveries.c.id).where(deliveries.c.endpoint_id == view.id)
        conn.execute(delete(attempts).where(attempts.c.delivery_id.in_(mine)))
        conn.execute(delete(deliveries).where(deliveries.c.endpoint_id == view.id))
        conn.execute(delete(subscriptions).where(subscriptions.c.endpoint_id == view.id))
        conn.execute(delete(endpoints).where(endpoints.c.id == view.id))
    return view


def rotate_secret(
    engine: Engine, uid: str, grace: timedelta = DEFAULT_GRACE
) -> tuple[EndpointView, str]:
    """A new signing secret (returned, shown once). The current one keeps signing beside it
    for `grace`; a zero grace drops it at once."""
    if grace < timedelta(0):
        raise BadInput("--grace: must not be negative")
    secret = new_secret()
    now = utcnow()
    with engine.begin() as conn:
        found = endpoint_id(conn, uid)
        current = conn.execute(
            select(endpoints.c.secret).where(endpoints.c.id == found)
        ).scalar_one()
        conn.execute(
            update(endpoints)
            .where(endpoints.c.id == found)
            .values(
                secret=secret,
                previous_secret=current if grace > timedelta(0) else None,
                previous_secret_until=now + grace if grace > timedelta(0) else None,
                updated_at=now,
            )
        )
    return get(engine, uid), secret
