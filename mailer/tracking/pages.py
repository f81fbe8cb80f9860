"""The recipient pages: unsubscribe (RFC 8058), double opt-in and the preference centre.

    GET  /u/{token}          the unsubscribe page: masked address, campaign, a button; changes
                             nothing (link scanners and prefetchers fetch GETs)
    POST /u/{token}          unsubscribes at once: a mail client's one-click POST (RFC 8058,
                             urlencoded or multipart `List-Unsubscribe=One-Click`, or any or no
                             body) or the page's button; 200, never a redirect, no cookies
    POST /subscribe          the company's sign-up form: pending consent and a confirmation
                             mail; the same answer whether or not the address was known
                             (HTML, or JSON for `Accept: application/json`)
    GET  /confirm/{token}    the confirmation page with a button; changes nothing
    POST /confirm/{token}    the confirmed double opt-in
    GET  /p/{token}          the preference centre
    POST /p/{token}          save choices, unsubscribe from everything, ask for a copy of one's data
                             (mails a confirmation link to the address: the identity check)
    GET  /privacy/confirm/{token}   the data-copy confirmation page with a button; changes nothing
    POST /privacy/confirm/{token}   identity verified: a page with a timed download link
    GET  /privacy/download/{token}  the copy (JSON, an attachment, no-store), made from the live
                                    data; the first download answers the request
    GET  /assets/pages.css   the pages' stylesheet, in the brand's colours

Thin handlers over `mailer.recipients` and `mailer.data_copy`: read the request, call it (in a
worker thread: the database calls block), render a Jinja template from mailer/templates/pages.
No cookies: every form's authority is the signed token in its own URL, which a cross-site forger
cannot make, so it is its own CSRF protection. No inline style or script anywhere (the CSP
forbids both).

Domain errors become answers in one place, `RecipientPages.error_response`: a bad or unknown
token is a 404 page (with its own words for a data-copy link whose request or person is gone),
an expired confirmation or data-copy link 410, a used one 409, bad input 400, a form
that is too large 413 or of another type 415, too many sign-ups 429, a database that does not
answer 503. Nothing a person or a scanner can send makes these handlers answer 500.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from ipaddress import ip_address, ip_network
from typing import Any
from urllib.parse import parse_qsl

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from mailer import data_copy, queries, recipients
from mailer.branding import Palette
from mailer.errors import BadInput, MailerError, NotFound
from mailer.i18n import LANGUAGE_NAMES, LANGUAGES, Language, Translator, language_or_none, negotiate
from mailer.models import ConsentMethod, as_utc, utcnow
from mailer.service import Mailer
from mailer.tokens import BadToken, ExpiredToken, TokenKind, Tokens

logger = logging.getLogger("mailer.tracking.pages")

MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 64
SIGNUPS_PER_IP = 10  # per SIGNUP_WINDOW_SECONDS, per IPv4 address or IPv6 /64
SIGNUP_WINDOW_SECONDS = 600.0
HONEYPOT_FIELD = "website"  # the sign-up form's hidden field: people leave it empty, bots not
STYLESHEET_PATH = "/assets/pages.css"
NO_STORE = {"cache-control": "no-store"}
STYLESHEET_CACHE = {"cache-control": "public, max-age=3600"}

Form = dict[str, list[str]]
Notice = Callable[[Language], str | None]
Handler = Callable[[Request], Awaitable[Response]]


class FormError(MailerError):
    """A request body that is too large, of a type the route does not take, or no form."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class RateLimited(MailerError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many attempts: retry in {retry_after} s")
        self.retry_after = retry_after


# -- request bodies ----------------------------------------------------------------------------


async def read_body(request: Request, limit: int = MAX_FORM_BYTES) -> bytes:
    """The whole body, refusing (413) more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise FormError(400, "invalid Content-Length")
        if int(declared) > limit:
            raise FormError(413, "request body too large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise FormError(413, "request body too large")
    return bytes(body)


def parse_form(content_type: str | None, body: bytes) -> Form:
    """An urlencoded or multipart/form-data body as name -> values (files are ignored).

    The standard library does the parsing: no extra dependency for the few small forms here.
    """
    if not body.strip():
        return {}
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(
                body.decode("utf-8"),
                keep_blank_values=True,
                errors="strict",
                max_num_fields=MAX_FORM_FIELDS,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormError(400, "malformed form") from exc
    elif media == "multipart/form-data":
        pairs = _multipart(content_type or "", body)
    else:
        raise FormError(415, f"unsupported content type {media or 'none'}")
    form: Form = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    if any(ch in content_type for ch in "\r\n\0") or not content_type.isascii():
        raise FormError(400, "malformed content type")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("ascii")
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not message.is_multipart():
            raise FormError(400, "malformed multipart form")
        pairs: list[tuple[str, str]] = []
        for part in message.walk():
            if part is message or part.get_content_disposition() != "form-data":
                continue
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, tuple):
                name = email.utils.collapse_rfc2231_value(name)
            if not isinstance(name, str) or part.get_filename() is not None:
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            pairs.append((name, payload.decode("utf-8")))
            if len(pairs) > MAX_FORM_FIELDS:
                raise FormError(400, "too many form fields")
        return pairs
    except FormError:
        raise
    except Exception as exc:  # the stdlib parser on untrusted bytes: any failure is a bad form
        raise FormError(400, "malformed multipart form") from exc


def _first(form: Form, name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


# -- per-client limits -------------------------------------------------------------------------


def client_key(host: str | None) -> str:
    """The unit a per-IP limit counts: an IPv4 address, or an IPv6 /64 (one subscriber)."""
    if not host:
        return "unknown"
    try:
        address = ip_address(host)
    except ValueError:
        return host[:64]
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ip_network(f"{address}/64", strict=False))
    return str(address)


def client_hash(key: bytes, client: str) -> str:
    """What signup_limits stores for a client_key: an HMAC, never the address."""
    return hmac.new(key, client.encode("utf-8"), hashlib.sha256).hexdigest()


class SignupLimiter:
    """At most `limit` attempts per client in each window of `window` seconds, counted in the
    database (signup_limits, one atomic statement per attempt: mailer.queries.count_signup), so
    that the limit holds for the client across every worker on every machine.

    Rows whose window has ended are deleted at most once per window per process, by whichever
    attempt comes first after that; `mailer retention purge` deletes what is left.
    """

    def __init__(
        self,
        limit: int = SIGNUPS_PER_IP,
        window: float = SIGNUP_WINDOW_SECONDS,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit and window must be positive")
        self.limit = limit
        self.window = timedelta(seconds=window)
        self._clock = clock
        self._next_clean_up = datetime.min.replace(tzinfo=UTC)

    def hit(self, mailer: Mailer, host: str | None) -> int | None:
        """Count an attempt: None if it is allowed, else the seconds until the next one is.
        Committed before it returns. Blocks on the database: call it in a worker thread."""
        now = self._clock()
        client = client_hash(mailer.settings.signup_limit_key, client_key(host))
        with mailer.engine.begin() as conn:
            attempts, window_ends_at = conn.execute(
                queries.count_signup(client, now, now + self.window, conn.dialect.name)
            ).one()
        if now >= self._next_clean_up:
            # Threads of this process may both get here: a second DELETE finds nothing to do.
            self._next_clean_up = now + self.window
            self._clean_up(mailer, now)
        if attempts <= self.limit:
            return None
        return max(1, math.ceil((as_utc(window_ends_at) - now).total_seconds()))

    def _clean_up(self, mailer: Mailer, now: datetime) -> None:
        # Its own transaction, after the attempt's: no row locks held across both. Housekeeping
        # only, so a failure is logged and the answer stands (retention purge deletes the rest).
        try:
            with mailer.engine.begin() as conn:
                conn.execute(queries.ended_signup_limits(now))
        except SQLAlchemyError as exc:
            logger.warning("could not delete ended sign-up limits: %s", exc)


# -- the pages ---------------------------------------------------------------------------------


def _state(request: Request) -> tuple[Mailer, Tokens]:
    state = request.app.state
    return state.mailer, state.tokens


def _requester(request: Request) -> recipients.Requester:
    return recipients.Requester.from_raw(
        request.client.host if request.client else None, request.headers.get("user-agent")
    )


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "text/html" not in accept


def _path(request: Request, path: str) -> str:
    return str(request.scope.get("root_path", "")) + path


class RecipientPages:
    """The handlers, their templates, and the sign-up limiter they share."""

    def __init__(
        self,
        *,
        signups_per_ip: int = SIGNUPS_PER_IP,
        signup_window: float = SIGNUP_WINDOW_SECONDS,
        notice: Notice | None = None,
    ) -> None:
        self.templates = Environment(
            loader=PackageLoader("mailer", "templates/pages"),
            autoescape=select_autoescape(["html"], default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.limiter = SignupLimiter(signups_per_ip, signup_window)
        self.notice = notice
        self._stylesheets: dict[str, bytes] = {}

    def routes(self) -> list[BaseRoute]:
        guard = self._guard
        return [
            Route("/u/{token}", guard(self.unsubscribe), methods=["GET", "POST"]),
            Route("/confirm/{token}", guard(self.confirm), methods=["GET", "POST"]),
            Route("/p/{token}", guard(self.preferences), methods=["GET", "POST"]),
            Route(
                f"/{TokenKind.ACCESS_CONFIRM.value}/{{token}}",
                guard(self.data_copy_confirm),
                methods=["GET", "POST"],
            ),
            Route(
                f"/{TokenKind.ACCESS_DOWNLOAD.value}/{{token}}",
                guard(self.data_copy_download),
                methods=["GET"],
            ),
            Route("/subscribe", guard(self.subscribe), methods=["POST"]),
            Route(STYLESHEET_PATH, self.stylesheet, methods=["GET"]),
        ]

    def _guard(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except (MailerError, OperationalError) as exc:
                return self.error_response(request, exc)

        endpoint.__name__ = handler.__name__
        return endpoint

    # -- rendering -------------------------------------------------------------------------

    def render(
        self,
        request: Request,
        template: str,
        lang: Language,
        *,
        title: str,
        status: int = 200,
        messages: list[str] | None = None,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        settings = request.app.state.mailer.settings
        t = Translator(lang)
        html = self.templates.get_template(template).render(
            lang=lang,
            t=t,
            title=title,
            messages=messages or [],
            brand={
                "name": settings.sender_name,
                "logo_url": settings.logo_url,
                "company_url": settings.company_url,
                "postal_address": settings.postal_address,
            },
            stylesheet=_path(request, STYLESHEET_PATH),
            privacy_notice=self.notice(lang) if self.notice is not None else None,
            privacy_notice_label=t("notice.label"),
            **context,
        )
        return HTMLResponse(html, status_code=status, headers={**NO_STORE, **(headers or {})})

    def error_response(self, request: Request, exc: Exception) -> Response:
        """Every domain error of these routes becomes its answer here."""
        t = Translator(negotiate(None, request.headers.get("accept-language")))
        headers: dict[str, str] = {}
        if isinstance(exc, data_copy.LinkExpired):
            status, code = 410, "expired"
            title, body = t("data_copy.expired.title"), t("data_copy.expired.body")
        elif isinstance(exc, data_copy.RequestClosed):
            status, code = 410, "closed"
            title, body = t("data_copy.closed.title"), t("data_copy.closed.body")
        elif isinstance(exc, data_copy.NoSuchRequest):
            status, code = 404, "not_found"
            title, body = t("data_copy.gone.title"), t("data_copy.gone.body")
        elif isinstance(exc, ExpiredToken):
            status, code = 410, "expired"
            title, body = t("confirm.expired.title"), t("confirm.expired.body")
        elif isinstance(exc, recipients.AlreadyConfirmed):
            status, code = 409, "already_confirmed"
            title, body = t("confirm.used.title"), t("confirm.used.body")
        elif isinstance(exc, (BadToken, NotFound)):
            status, code = 404, "not_found"
            title, body = t("page.not_found.title"), t("page.not_found.body")
        elif isinstance(exc, RateLimited):
            status, code = 429, "rate_limited"
            title, body = t("page.rate_limited.title"), t("page.rate_limited.body")
            headers["retry-after"] = str(exc.retry_after)
        elif isinstance(exc, FormError):
            status, code = exc.status, "bad_request"
            title = t("page.bad_request.title")
            body = {413: t("page.too_large.body"), 415: t("page.unsupported.body")}.get(
                exc.status, t("page.bad_request.body", reason=str(exc))
            )
        elif isinstance(exc, BadInput):
            status, code = 400, "bad_request"
            title, body = t("page.bad_request.title"), t("page.bad_request.body", reason=str(exc))
        else:  # DatabaseError, OperationalError: nothing was changed
            logger.warning("recipient page %s unavailable: %s", request.url.path, exc)
            status, code = 503, "unavailable"
            title, body = t("page.unavailable.title"), t("page.unavailable.body")
            headers["retry-after"] = "30"
        if _wants_json(request):
            return JSONResponse(
                {"error": code, "message": body},
                status_code=status,
                headers={**NO_STORE, **headers},
            )
        return self.render(
            request, "message.html", t.language, title=title, status=status,
            paragraphs=[body], link=None, headers=headers,
        )  # fmt: skip

    async def stylesheet(self, request: Request) -> Response:
        colour = request.app.state.mailer.settings.brand_color
        css = self._stylesheets.get(colour)
        if css is None:
            palette = Palette.from_brand(colour)
            source = resources.files("mailer").joinpath("templates/pages/pages.css").read_text()
            root = (
                f":root {{\n  --brand: {palette.brand};\n  --on-brand: {palette.on_brand};\n"
                f"  --link: {palette.link};\n}}\n\n"
            )
            css = self._stylesheets[colour] = (root + source).encode("utf-8")
        return Response(css, media_type="text/css; charset=utf-8", headers=STYLESHEET_CACHE)

    # -- unsubscribe -----------------------------------------------------------------------

    async def unsubscribe(self, request: Request) -> Response:
        mailer, tokens = _state(request)
        token = request.path_params["token"]
        accept = request.headers.get("accept-language")
        if request.method == "POST":
            # Any POST unsubscribes: RFC 8058's body, another body, or none. The body only
            # tells the page's button (via=page) from a mail client.
            try:
                form = parse_form(request.headers.get("content-type"), await read_body(request))
            except FormError as exc:
                if exc.status == 413:
                    raise
                form = {}
            method = (
                ConsentMethod.UNSUBSCRIBE_LINK
                if _first(form, "via") == "page"
                else ConsentMethod.ONE_CLICK
            )
            done = await run_in_threadpool(
                recipients.unsubscribe,
                mailer,
                tokens,
                token,
                method=method,
                requester=_requester(request),
            )
            lang = negotiate(done.context.locale, accept)
            return self.render(
                request,
                "unsubscribed.html",
                lang,
                title=Translator(lang)("unsubscribed.title"),
                address=done.context.masked_address,
                preferences_url=self._preferences_url(request, tokens, done.context),
            )
        context = await run_in_threadpool(
            recipients.delivery_for, mailer, tokens, TokenKind.UNSUBSCRIBE, token
        )
        lang = negotiate(context.locale, accept)
        return self.render(
            request,
            "unsubscribe.html",
            lang,
            title=Translator(lang)("unsubscribe.title"),
            address=context.masked_address,
            campaign=context.campaign_title,
            already=context.unsubscribed,
            preferences_url=self._preferences_url(request, tokens, context),
        )

    def _preferences_url(
        self, request: Request, tokens: Tokens, context: recipients.DeliveryContext
    ) -> str:
        return _path(request, f"/p/{tokens.sign(TokenKind.PREFERENCES, (context.delivery_id,))}")

    # -- double opt-in ---------------------------------------------------------------------

    async def subscribe(self, request: Request) -> Response:
        mailer, tokens = _state(request)
        retry_after = await run_in_threadpool(
            self.limiter.hit, mailer, request.client.host if request.client else None
        )
        if retry_after is not None:
            raise RateLimited(retry_after)
        form = parse_form(request.headers.get("content-type"), await read_body(request))
        accept = request.headers.get("accept-language")
        if _first(form, HONEYPOT_FIELD):
            logger.info("sign-up with the honeypot field filled in: ignored")
            return self._subscribed(
                request, language_or_none(_first(form, "locale")) or negotiate(None, accept)
            )
        signup = recipients.SignUp.validated(
            email=_first(form, "email"),
            purposes=[*form.get("purposes", []), *form.get("purpose", [])],
            policy_version=_first(form, "policy_version"),
            wording=_first(form, "wording"),
            name=_first(form, "name"),
            locale=_first(form, "locale"),
        )
        lang = signup.locale or negotiate(None, accept)
        mail = await run_in_threadpool(
            recipients.start_subscription,
            mailer,
            tokens,
            signup,
            _requester(request),
            language=lang,
        )
        if mail is not None:
            transport = getattr(request.app.state, "transport", None)
            if transport is None:
                logger.error(
                    "no transport for confirmation mails: subscription %s not mailed",
                    mail.subscription_id,
                )
            else:
                await recipients.send_confirmation(transport, mail)
        return self._subscribed(request, lang)

    def _subscribed(self, request: Request, lang: Language) -> Response:
        """The one answer to every accepted sign-up, known address or not."""
        t = Translator(lang)
        if _wants_json(request):
            return JSONResponse(
                {"status": "pending", "message": t("subscribed.body")}, headers=NO_STORE
            )
        return self.render(
            request,
            "message.html",
            lang,
            title=t("subscribed.title"),
            paragraphs=[t("subscribed.body"), t("subscribed.not_received")],
            link=None,
        )

    async def confirm(self, request: Request) -> Response:
        mailer, tokens = _state(request)
        token = request.path_params["token"]
        accept = request.headers.get("accept-language")
        if request.method == "POST":
            await read_body(request)  # the button sends nothing; only the size is checked
            done = await run_in_threadpool(
                recipients.confirm, mailer, tokens, token, _requester(request)
            )
            lang = negotiate(done.locale, accept)
            t = Translator(lang)
            return self.render(
                request,
                "message.html",
                lang,
                title=t("confirmed.title"),
                paragraphs=[t("confirmed.body", address=done.masked_address)],
                link=None,
            )
        pending = await run_in_threadpool(recipients.confirmation_for, mailer, tokens, token)
        lang = negotiate(pending.locale, accept)
        t = Translator(lang)
        return self.render(
            request,
            "confirm.html",
            lang,
            title=t("confirm.title"),
            address=pending.masked_address,
            purposes=[t.purpose(p) for p in pending.purposes],
            wording=pending.wording,
        )

    # -- preference centre -----------------------------------------------------------------

    async def preferences(self, request: Request) -> Response:
        mailer, tokens = _state(request)
        token = request.path_params["token"]
        accept = request.headers.get("accept-language")
        if request.method != "POST":
            shown = await run_in_threadpool(recipients.preferences_for, mailer, tokens, token)
            return self._preferences_page(request, shown, negotiate(shown.context.locale, accept))
        form = parse_form(request.headers.get("content-type"), await read_body(request))
        action = _first(form, "action") or "save"
        requester = _requester(request)
        if action == "unsubscribe_all":
            done = await run_in_threadpool(
                recipients.unsubscribe_all, mailer, tokens, token, requester
            )
            lang = negotiate(done.context.locale, accept)
            return self.render(
                request,
                "unsubscribed.html",
                lang,
                title=Translator(lang)("unsubscribed.title"),
                address=done.context.masked_address,
                preferences_url=_path(request, request.url.path),
            )
        if action == "data_copy":
            return await self._request_data_copy(request, token, requester)
        if action != "save":
            raise BadInput(f"unknown action {action[:40]!r}")
        shown_in = language_or_none(_first(form, "shown_in")) or negotiate(None, accept)
        try:
            choices = recipients.PreferenceChoices.validated(
                shown=form.get("shown", []),
                wanted=form.get("purpose", []),
                name=_first(form, "name"),
                language=_first(form, "language"),
                shown_in=shown_in,
            )
        except BadInput as exc:
            shown = await run_in_threadpool(recipients.preferences_for, mailer, tokens, token)
            t = Translator(shown_in)
            return self._preferences_page(
                request, shown, shown_in, [t("page.bad_request.body", reason=str(exc))], status=400
            )
        outcome = await run_in_threadpool(
            recipients.update_preferences, mailer, tokens, token, choices, requester
        )
        sent = False
        if outcome.confirmation is not None:
            transport = getattr(request.app.state, "transport", None)
            if transport is not None:
                sent = await recipients.send_confirmation(transport, outcome.confirmation)
        after = outcome.preferences
        lang = negotiate(after.context.locale, accept)
        t = Translator(lang)
        messages = []
        if outcome.unsubscribed:
            messages.append(t("unsubscribed.body", address=after.context.masked_address))
        elif outcome.granted or outcome.withdrawn or outcome.profile_changed:
            messages.append(t("preferences.saved"))
        if outcome.awaiting_confirmation:
            key = "preferences.confirmation_sent" if sent else "preferences.confirmation_recent"
            messages.append(t(key, address=after.context.masked_address))
        if not outcome.changed:
            messages.append(t("preferences.nothing_changed"))
        return self._preferences_page(request, after, lang, messages)

    async def _request_data_copy(
        self, request: Request, token: str, requester: recipients.Requester
    ) -> Response:
        mailer, tokens = _state(request)
        shown = await run_in_threadpool(recipients.preferences_for, mailer, tokens, token)
        context = shown.context
        lang = negotiate(context.locale, request.headers.get("accept-language"))
        mail = await run_in_threadpool(
            data_copy.request_copy, mailer, tokens, context, requester, language=lang
        )
        if mail is None:
            key = "preferences.data_copy_recent"
        else:
            transport = getattr(request.app.state, "transport", None)
            sent = transport is not None and await data_copy.send_identity_mail(transport, mail)
            key = "preferences.data_copy_sent" if sent else "preferences.data_copy_not_sent"
        message = Translator(lang)(key, address=context.masked_address)
        return self._preferences_page(request, shown, lang, [message])

    # -- a copy of one's data --------------------------------------------------------------

    async def data_copy_confirm(self, request: Request) -> Response:
        mailer, tokens = _state(request)
        token = request.path_params["token"]
        accept = request.headers.get("accept-language")
        if request.method != "POST":
            pending = await run_in_threadpool(data_copy.pending_for, mailer, tokens, token)
            lang = negotiate(pending.locale, accept)
            return self.render(
                request,
                "data-copy-confirm.html",
                lang,
                title=Translator(lang)("data_copy.confirm.title"),
                address=pending.masked_address,
            )
        await read_body(request)  # the button sends nothing; only the size is checked
        ready = await run_in_threadpool(data_copy.confirm_identity, mailer, tokens, token)
        lang = negotiate(ready.request.locale, accept)
        return self.render(
            request,
            "data-copy-ready.html",
            lang,
            title=Translator(lang)("data_copy.ready.title"),
            size_kb=max(1, round(ready.size / 1024)),
            download_url=_path(
                request, f"/{TokenKind.ACCESS_DOWNLOAD.value}/{ready.download_token}"
            ),
            until=f"{ready.expires_at:%Y-%m-%d %H:%M} UTC",
        )

    async def data_copy_download(self, request: Request) -> Response:
        mailer, tokens = _state(request)
        token = request.path_params["token"]
        if request.method == "HEAD":  # says whether the link works; hands over nothing
            await run_in_threadpool(data_copy.check_download, mailer, tokens, token)
            return Response(media_type="application/json", headers=NO_STORE)
        copy = await run_in_threadpool(data_copy.download, mailer, tokens, token)
        return Response(
            copy.body,
            media_type="application/json",
            headers={
                **NO_STORE,
                "content-disposition": f'attachment; filename="{copy.filename}"',
            },
        )

    def _preferences_page(
        self,
        request: Request,
        shown: recipients.Preferences,
        lang: Language,
        messages: list[str] | None = None,
        *,
        status: int = 200,
    ) -> HTMLResponse:
        context = shown.context
        return self.render(
            request,
            "preferences.html",
            lang,
            title=Translator(lang)("preferences.title"),
            status=status,
            messages=messages,
            address=context.masked_address,
            choices=shown.choices,
            name=context.name,
            suppressed=bool(context.suppressed),
            languages=[(code, LANGUAGE_NAMES[code]) for code in LANGUAGES],
        )


def recipient_routes(
    *,
    signups_per_ip: int = SIGNUPS_PER_IP,
    signup_window: float = SIGNUP_WINDOW_SECONDS,
    notice: Notice | None = None,
) -> list[BaseRoute]:
    """The recipient pages' routes, for create_app to mount. They read `app.state.mailer`,
    `app.state.tokens` and `app.state.transport` (for confirmation mails). `notice(language)`
    may return the privacy statement's material-change notice, shown atop every page."""
    pages = RecipientPages(
        signups_per_ip=signups_per_ip, signup_window=signup_window, notice=notice
    )
    return pages.routes()
