"""The tracking routes: the open pixel, the click redirect and the health check.

Thin: a token is verified (mailer.tokens), a click resolved through the campaign's own link
table (mailer.engagement.LinkCache), and the hit queued for the recorder; nothing here waits
for the database except a link table read once per campaign. Errors are answered in one place
(the exception handlers of mailer.tracking.app): a bad token is a plain 404.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import quote

import anyio
import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from mailer import queries
from mailer.engagement import USER_AGENT_LENGTH, EngagementRecorder, Hit, LinkCache
from mailer.masking import mask_ip
from mailer.models import HONEYPOT_POSITION
from mailer.tokens import BadToken, TokenKind, Tokens
from mailer.tracking.classify import MachineNetworks, MachineReason, request_reason
from mailer.tracking.writer import WriterProcessRecorder

# A 1x1 transparent GIF (43 bytes): what a mail client shows for every open link, valid or not.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
NO_STORE = {"cache-control": "no-store, max-age=0"}
HEALTH_TIMEOUT = 5.0


@functools.lru_cache(maxsize=4096)
def _agent(raw: bytes) -> str:
    # one string per distinct user agent, however many hits wait with it for the writer
    return raw[:USER_AGENT_LENGTH].decode("latin-1").replace("\x00", "")


@functools.lru_cache(maxsize=8192)
def _masked(host: str) -> str | None:
    try:
        return mask_ip(host)
    except ValueError:  # a unix socket, a test client's made-up name
        return None


def _hit(
    scope: Scope,
    kind: str,
    delivery_id: int,
    campaign_id: int | None,
    position: int | None,
    reason: MachineReason | None = None,
    networks: MachineNetworks | None = None,
) -> Hit:
    agent = referrer = b""
    for name, value in scope["headers"]:
        if name == b"user-agent":
            agent = value
        elif name == b"referer":
            referrer = value
    user_agent = _agent(agent)
    client = scope.get("client")
    host = client[0] if client else None
    if reason is None:
        reason = request_reason(
            scope["method"],
            user_agent,
            host,
            referrer.decode("latin-1") if referrer else None,
            is_open=kind == queries.OPEN,
            networks=networks,
        )
    return Hit(
        kind,
        delivery_id,
        campaign_id,
        position,
        datetime.now(UTC),
        _masked(host) if host else None,
        user_agent or None,
        None if reason is None else reason.value,
    )


def not_found() -> Response:
    return PlainTextResponse("Not found", status_code=404, headers=NO_STORE)


# The two hot routes are plain ASGI apps: no Request or Response object per hit, and every
# header (the security headers included, see HotRoutes) built once. Exceptions (a bad click
# token) still reach the app's exception handlers.
_PIXEL_HEADERS = [
    (b"content-type", b"image/gif"),
    (b"content-length", str(len(PIXEL)).encode()),
    *((name.encode(), value.encode()) for name, value in NO_STORE.items()),
]
_PIXEL_BODY = {"type": "http.response.body", "body": PIXEL}
_EMPTY_BODY = {"type": "http.response.body", "body": b""}
Headers = Sequence[tuple[bytes, bytes]]
# in a thread of this process, or in a writer process (what `mailer serve` uses)
Recorder = EngagementRecorder | WriterProcessRecorder


def _redirect_headers(url: str, extra: Headers) -> list[tuple[bytes, bytes]]:
    # quoted as Starlette's RedirectResponse does: a Location header is ASCII
    location = quote(url, safe=":/%#?=@[]!$&'()*+,;")
    return [
        (b"location", location.encode("ascii")),
        (b"content-length", b"0"),
        *((name.encode(), value.encode()) for name, value in NO_STORE.items()),
        *extra,
    ]


class OpenPixel:
    """The pixel for any token (a broken image helps nobody); an open only for a valid one.
    `headers` are added to the pixel's own (the app's security headers).

    The hot routes hold the app's tokens and recorder themselves: reading them from
    `app.state` on every hit costs an AttributeError raised and caught inside Starlette's
    State for each name. `networks`: the operator's machine networks (settings), if any."""

    def __init__(
        self,
        tokens: Tokens,
        recorder: Recorder,
        headers: Headers = (),
        *,
        networks: MachineNetworks | None = None,
    ) -> None:
        self.tokens = tokens
        self.recorder = recorder
        # None when there are none: a hit then costs no lookup at all
        self.networks = networks or None
        self._start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_PIXEL_HEADERS, *headers],
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            payload = self.tokens.verify(TokenKind.OPEN, scope["path_params"]["token"])
        except BadToken:
            payload = ()
        recorder = self.recorder
        if len(payload) == 2:
            recorder.record(
                _hit(scope, queries.OPEN, payload[0], payload[1], None, networks=self.networks)
            )
        elif len(payload) == 1:  # made before open tokens carried the campaign
            recorder.record(
                _hit(scope, queries.OPEN, payload[0], None, None, networks=self.networks)
            )
        if recorder.crowded:  # the writer is far behind: slow down rather than lose hits
            await recorder.room()
        await send(self._start)
        await send(_EMPTY_BODY if scope["method"] == "HEAD" else _PIXEL_BODY)


class Click:
    """A redirect to the campaign's own link at the token's position, and nowhere else.
    `headers` are added to the redirect's own (the app's security headers); `networks`: the
    operator's machine networks (settings), if any."""

    def __init__(
        self,
        tokens: Tokens,
        recorder: Recorder,
        links: LinkCache,
        headers: Headers = (),
        *,
        networks: MachineNetworks | None = None,
    ) -> None:
        self.tokens = tokens
        self.recorder = recorder
        self.links = links
        self.networks = networks or None  # see OpenPixel
        extra = tuple(headers)
        # a campaign's few links, each answered thousands of times: their headers built once
        self._headers = functools.lru_cache(maxsize=4096)(
            functools.partial(_redirect_headers, extra=extra)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        payload = self.tokens.verify(TokenKind.CLICK, scope["path_params"]["token"])
        if len(payload) == 3:
            delivery_id, campaign_id, position = payload
        elif len(payload) == 2:  # made before click tokens carried the campaign
            delivery_id, position = payload
            found = await self.links.campaign_of(delivery_id)
            if found is None:
                raise BadToken("the delivery of this click token is gone")
            campaign_id = found
        else:
            raise BadToken("not a click token")
        if position == HONEYPOT_POSITION:
            # only a link scanner follows the hidden link: record it as such, lead nowhere
            hit = _hit(
                scope, queries.CLICK, delivery_id, campaign_id, position, MachineReason.HONEYPOT
            )
            self.recorder.record(hit)
            raise BadToken("the honeypot leads nowhere")
        url = await self.links.url(campaign_id, position)
        if url is None:
            raise BadToken("the campaign has no link at this position")
        recorder = self.recorder
        recorder.record(
            _hit(scope, queries.CLICK, delivery_id, campaign_id, position, networks=self.networks)
        )
        if recorder.crowded:
            await recorder.room()
        await send({"type": "http.response.start", "status": 302, "headers": self._headers(url)})
        await send(_EMPTY_BODY)


def _database_ok(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(queries.health_check()).all()
    except SQLAlchemyError:
        return False
    return True


async def healthz(request: Request) -> Response:
    """200 when the database answers (and has the tables the app writes), else 503."""
    ok = False
    with anyio.move_on_after(HEALTH_TIMEOUT):
        ok = await anyio.to_thread.run_sync(
            _database_ok, request.app.state.mailer.engine, abandon_on_cancel=True
        )
    if ok:
        return JSONResponse({"status": "ok"}, headers=NO_STORE)
    return JSONResponse({"status": "unavailable"}, status_code=503, headers=NO_STORE)


def tracking_routes(pixel: OpenPixel, click: Click) -> list[BaseRoute]:
    """GET (and so HEAD) /o/{token}, /c/{token} and /healthz."""
    return [
        # any path under /o/ gets the image, even a token a mail client cut or extended
        Route("/o/{token:path}", pixel, methods=["GET"], name="open"),
        Route("/c/{token}", click, methods=["GET"], name="click"),
        Route("/healthz", healthz, methods=["GET"], name="healthz"),
    ]
