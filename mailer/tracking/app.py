"""The tracking app: `create_app()` builds it from a Mailer; `serve()` runs it under uvicorn.

What the app holds, on `app.state`, for its routes (and the recipient pages):

    mailer     the Mailer: settings and database engine
    tokens     Tokens(settings.secret_keys), built once (key derivation is done here)
    recorder   the EngagementRecorder (in a thread of this process) or WriterProcessRecorder
               (in a child process: what `mailer serve` uses): opens and clicks, written in batches
    links      the LinkCache: each campaign's link table
    transport  where the app's own mails go (double opt-in confirmations): the one given,
               or an SmtpPool to settings.smtp_url made on first use

Errors are answered in one place (`EXCEPTION_HANDLERS`): a bad token is a plain 404, a
database that does not answer a 503, any other MailerError a 400. Business code raises
MailerErrors, never HTTP errors.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from mailer.engagement import DEFAULT_FLUSH_INTERVAL, EngagementRecorder, LinkCache
from mailer.errors import ConfigError, DatabaseError, MailerError
from mailer.policy import page_notice
from mailer.service import Mailer
from mailer.tokens import BadToken, Tokens
from mailer.tracking.classify import MachineNetworks
from mailer.tracking.pages import SIGNUP_WINDOW_SECONDS, SIGNUPS_PER_IP, recipient_routes
from mailer.tracking.routes import (
    NO_STORE,
    Click,
    OpenPixel,
    Recorder,
    not_found,
    tracking_routes,
)
from mailer.tracking.security import SecurityHeadersMiddleware, security_headers
from mailer.tracking.writer import WRITER_IDLE, WRITER_NICENESS, WriterProcessRecorder
from mailer.transport import SendResult, SmtpPool, Transport

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("mailer.tracking")

CONFIRMATION_POOL_SIZE = 2
GRACEFUL_SHUTDOWN_SECONDS = 10
LISTEN_BACKLOG = 2048


class LazySmtpPool:
    """An SmtpPool made on first use, so the app starts (and serves pixels) whatever the
    state of the mail server, and opens no connection until it has mail to send."""

    def __init__(self, url: str, *, size: int = CONFIRMATION_POOL_SIZE) -> None:
        self.url = url
        self.size = size
        self._pool: SmtpPool | None = None

    async def send(self, envelope_from: str, recipient: str, data: bytes) -> SendResult:
        if self._pool is None:
            self._pool = SmtpPool(self.url, size=self.size)
        return await self._pool.send(envelope_from, recipient, data)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


async def _bad_token(request: Request, exc: Exception) -> Response:
    return not_found()


async def _database_down(request: Request, exc: Exception) -> Response:
    logger.warning("database unavailable: %s", exc)
    return PlainTextResponse(
        "Service temporarily unavailable", status_code=503, headers={**NO_STORE, "retry-after": "5"}
    )


async def _bad_input(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(str(exc) or "Bad request", status_code=400, headers=NO_STORE)


EXCEPTION_HANDLERS: Mapping[Any, Callable[[Request, Exception], Any]] = {
    BadToken: _bad_token,
    DatabaseError: _database_down,
    MailerError: _bad_input,
}
_HOT_METHODS = frozenset(("GET", "HEAD"))


class TrackingApp(Starlette):
    """Starlette, with the open pixel and the click redirect answered before its stack.

    Those two routes are nearly every request the app gets, and the stack (error middleware,
    security-header middleware, exception middleware, router, route) cost about as much CPU as
    verifying the token and recording the hit. Here `__call__` hands a GET or HEAD of
    /o/TOKEN or /c/TOKEN straight to the route's handler, whose precomputed headers already
    carry the security headers; an exception it raises is answered by the same handler the
    stack would use (EXCEPTION_HANDLERS), with the security headers added. Everything else,
    other methods on those paths included (405), goes through the stack as usual.
    """

    def __init__(
        self,
        *,
        pixel: OpenPixel,
        click: Click,
        security: list[tuple[bytes, bytes]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._pixel = pixel
        self._click = click
        self._security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in _HOT_METHODS
            and not scope.get("root_path")
        ):
            path: str = scope["path"]
            token = path[3:]
            handler: OpenPixel | Click | None = None
            if path.startswith("/o/"):
                handler = self._pixel
            elif path.startswith("/c/") and token and "/" not in token:
                handler = self._click
            if handler is not None:
                scope["app"] = self
                scope["path_params"] = {"token": token}
                try:
                    await handler(scope, receive, send)
                except Exception as exc:
                    answer = _handler_for(exc)
                    if answer is None:
                        raise  # uvicorn logs it and answers 500
                    response = await answer(Request(scope, receive), exc)
                    secured = SecurityHeadersMiddleware(response, headers=self._security)
                    await secured(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _handler_for(exc: Exception) -> Callable[[Request, Exception], Any] | None:
    for kind in type(exc).__mro__:
        if kind in EXCEPTION_HANDLERS:
            return EXCEPTION_HANDLERS[kind]
    return None


def create_app(
    mailer: Mailer,
    *,
    transport: Transport | None = None,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    writer: Literal["thread", "process"] = "thread",
    writer_niceness: int = WRITER_NICENESS,
    writer_idle: bool = WRITER_IDLE,
    signups_per_ip: int = SIGNUPS_PER_IP,
    signup_window: float = SIGNUP_WINDOW_SECONDS,
) -> TrackingApp:
    """The tracking and recipient app for `mailer` (its settings and database).

    `transport` sends the app's own mails (default: a lazily made SmtpPool to
    settings.smtp_url); it is closed on shutdown. `flush_interval` is the longest time, in
    seconds, an open or click waits in memory before it is written. The lifespan starts the
    recorder's flush loop and, on shutdown, writes what is queued and closes the transport;
    without a lifespan (tests), await `app.state.recorder.flush()`. `writer`: where the
    batches are written, a thread of this process or a child process of its own (see
    mailer.tracking.writer; an in-memory SQLite database, which no other process can see,
    always uses the thread); `writer_niceness`, how much lower that process's CPU priority is;
    `writer_idle`, whether it runs under SCHED_IDLE (only on CPU time nothing else wants).
    `signups_per_ip` and `signup_window` (seconds): POST /subscribe's limit per client,
    counted in the database for every app on it (mailer.tracking.pages.SignupLimiter).
    """
    settings = mailer.settings
    tokens = Tokens(settings.secret_keys)
    recorder: Recorder
    if writer == "process" and not _in_memory(settings.database_url):
        recorder = WriterProcessRecorder(
            mailer.engine,
            settings.database_url,
            flush_interval=flush_interval,
            niceness=writer_niceness,
            idle=writer_idle,
        )
    else:
        recorder = EngagementRecorder(mailer.engine, flush_interval=flush_interval)
    mail: Transport = transport if transport is not None else LazySmtpPool(settings.smtp_url)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await recorder.start()
        try:
            yield
        finally:
            try:
                await recorder.stop()
                stats = recorder.stats
                lost = stats.dropped or stats.unaccounted
                logger.log(logging.WARNING if lost else logging.INFO, "%s", stats.account())
            finally:
                await mail.close()

    security = security_headers(settings.logo_url)
    links = LinkCache(mailer.engine)
    networks = MachineNetworks(settings.machine_networks)
    pixel = OpenPixel(tokens, recorder, security, networks=networks)
    click = Click(tokens, recorder, links, security, networks=networks)
    app = TrackingApp(
        pixel=pixel,
        click=click,
        security=security,
        routes=[
            *tracking_routes(pixel, click),
            *recipient_routes(
                signups_per_ip=signups_per_ip,
                signup_window=signup_window,
                notice=page_notice(mailer.engine),
            ),
        ],
        middleware=[Middleware(SecurityHeadersMiddleware, headers=security)],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    # no "helpful" 307 from /c/TOKEN/ to /c/TOKEN: the app redirects to campaign links only
    app.router.redirect_slashes = False
    app.state.mailer = mailer
    app.state.tokens = tokens
    app.state.recorder = recorder
    app.state.links = links
    app.state.transport = mail
    return app


def _in_memory(database_url: str) -> bool:
    return database_url.startswith("sqlite") and (
        database_url.rstrip("/") in ("sqlite:", "sqlite:/", "sqlite:")
        or ":memory:" in database_url
        or "mode=memory" in database_url
    )


# -- serving ----------------------------------------------------------------------------------

# How long a thread may hold the GIL before another may run (CPython's default is 5 ms). With
# `--writer thread`, and when a worker has taken over from a writer process that died, the
# recorder's flush thread competes with the event loop; a shorter slice bounds how long it can
# hold up requests. (Other threads are rare: a campaign's link table read once.)
SWITCH_INTERVAL = 0.0005


def prepare_worker() -> None:
    """Tune a serving process once its app is built.

    gc.freeze() moves everything made at start-up (modules, SQLAlchemy's metadata, templates)
    out of the collector's reach: a full collection then scans only what requests and
    the recorder create, a few milliseconds instead of tens, and that pause is what a
    request waiting behind it sees. The switch interval: see SWITCH_INTERVAL.
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for the workers to share.

    Made with proto=IPPROTO_TCP: accepted connections inherit the listener's proto, and
    asyncio sets TCP_NODELAY only on sockets that report IPPROTO_TCP. uvicorn's own
    `--workers` binds with proto 0, so on the plain asyncio loop every small response on a
    kept-alive connection waits ~40 ms for a delayed ACK (uvicorn issue 3149). uvloop sets
    TCP_NODELAY regardless; this keeps both loops right.
    """
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def log_level_number(log_level: str) -> int:
    """The logging level a `--log-level` name stands for (uvicorn's names)."""
    from uvicorn.config import LOG_LEVELS

    level = LOG_LEVELS.get(log_level.lower())
    if level is None:
        choices = ", ".join(LOG_LEVELS)
        raise ConfigError(f"--log-level must be one of {choices}, not {log_level!r}")
    return level


def log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's logging, with mailer's own loggers on its handler at the same level: without
    a handler of their own, their warnings would come bare and their information not at all."""
    from uvicorn.config import LOGGING_CONFIG

    level = log_level_number(log_level)
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["mailer"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


def uvicorn_config(
    app_factory: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    trusted_proxies: str = "127.0.0.1",
    log_level: str = "info",
    access_log: bool = False,
) -> uvicorn.Config:
    """uvicorn's Config for `serve` (also what bench/request_cost.py drives in-process)."""
    import uvicorn

    return uvicorn.Config(
        app_factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools",
        lifespan="on",
        proxy_headers=True,
        forwarded_allow_ips=trusted_proxies,
        server_header=False,
        access_log=access_log,
        log_level=log_level,
        log_config=log_config(log_level),
        backlog=LISTEN_BACKLOG,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def serve(
    app_factory: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    trusted_proxies: str = "127.0.0.1",
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Run the app under uvicorn (uvloop and httptools) until SIGINT or SIGTERM.

    `app_factory` is an import string ("module:function") that each worker calls to build its
    own app. With `workers > 1`, uvicorn's supervisor runs that many processes on one shared
    socket (see listening_socket) and restarts any that die. `trusted_proxies`: the
    addresses (comma-separated, or "*") whose X-Forwarded-For is believed for the client
    address. Shutdown is graceful: each worker writes its queued events before it exits.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    config = uvicorn_config(
        app_factory,
        host=host,
        port=port,
        workers=workers,
        trusted_proxies=trusted_proxies,
        log_level=log_level,
        access_log=access_log,
    )
    sock = listening_socket(host, port)
    try:
        if workers == 1:
            server = uvicorn.Server(config)
            server.run(sockets=[sock])
            if not server.started:
                raise MailerError("the tracking app did not start (see the log above)")
        else:
            Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
