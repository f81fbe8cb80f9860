"""Security headers on every response of the tracking app.

A pure ASGI middleware: it adds the headers to `http.response.start` and touches nothing
else (BaseHTTPMiddleware would cost a task and a stream per request). A header a route set
itself is left as the route set it.

Tokens are in URLs, so no page may leak them as a Referer; no page may be framed; nothing but
the app's own styles and images (and the brand's logo) may load; forms post only to the app.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailer.errors import ConfigError

_SAFE_ORIGIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]")


def logo_origin(logo_url: str | None) -> str | None:
    """The origin (scheme://host[:port]) of the brand's logo, for the img-src directive."""
    if not logo_url:
        return None
    try:
        parts = urlsplit(logo_url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(f"logo_url {logo_url!r} is not a valid URL") from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host or not set(host) <= _SAFE_ORIGIN:
        raise ConfigError(f"logo_url {logo_url!r} must be an http:// or https:// URL")
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def content_security_policy(logo_url: str | None = None) -> str:
    images = " ".join(filter(None, ("'self'", "data:", logo_origin(logo_url))))
    return (
        "default-src 'none'; style-src 'self'; "
        f"img-src {images}; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def security_headers(logo_url: str | None = None) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", content_security_policy(logo_url).encode("latin-1")),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
    ]


class SecurityHeadersMiddleware:
    """Adds `headers` (default: security_headers()) to every HTTP response."""

    def __init__(self, app: ASGIApp, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.app = app
        self.headers = list(headers if headers is not None else security_headers())
        self._names = frozenset(name for name, _ in self.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.headers
        names = self._names

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                for name, _ in headers:
                    if name.lower() in names:  # the route set one itself: add the others
                        present = {name.lower() for name, _ in headers}
                        added = [h for h in extra if h[0] not in present]
                        break
                else:
                    added = extra
                # a new message: routes may send the same header list for every response
                message = {**message, "headers": [*headers, *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
