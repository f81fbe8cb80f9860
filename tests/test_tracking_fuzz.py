"""Bad input never makes the app fail: every route of create_app (tracking and recipient pages)
answers malformed, oversized, percent-encoded or NUL-laden input with a 4xx, or the pixel's
200, and never a 5xx. A hypothesis run over all routes, through the real ASGI app."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from mailer.service import Mailer
from mailer.tracking.app import create_app
from mailer.transport import MemoryTransport
from tests.smtp_server import CaptureServer
from tests.test_tracking_pixel_and_click import BASE, path_of, send_tracked

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
CONTENT_TYPES = (
    None,
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "multipart/form-data; boundary=" + "b" * 300,
    "application/json",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded; charset=klingon",
    "\x00",
)
FORM_FIELDS = ["email", "purposes", "policy_version", "wording", "website", "name", "language",
               "tracking", "marketing", "action", "List-Unsubscribe"]  # fmt: skip
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=600,
)


def mutations(tokens: list[str]) -> st.SearchStrategy[str]:
    """Real tokens, damaged in the ways a mail client, a person or an attacker damages them."""
    token = st.sampled_from(tokens)
    return st.one_of(
        token,
        st.tuples(token, st.integers(0, 60), st.sampled_from([*string.printable, "\x00"])).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
        ),
        st.tuples(token, st.integers(0, 60)).map(lambda t: t[0][: t[1]]),
        token.map(str.upper),
        token.map(lambda t: t + "." + t),
        token.map(lambda t: quote(t, safe="")),
        token.map(lambda t: t.replace(".", "%2E")),
    )


def segments(own: list[str], every: list[str]) -> st.SearchStrategy[str]:
    """A path segment as it goes on the wire (already percent-encoded where needed)."""
    return st.one_of(
        mutations(own).map(lambda s: quote(s, safe=".-_~%")),
        mutations(every).map(lambda s: quote(s, safe=".-_~%")),
        st.text(max_size=300).map(lambda s: quote(s, safe="")),  # any Unicode, NULs included
        st.binary(max_size=300).map(lambda b: quote(b, safe="")),  # not even UTF-8
        st.integers(257, 20_000).map(lambda n: "A" * n),  # oversized
        st.sampled_from(["%00", "%2F", "%25", "%", "%zz", "%C0%AF", "..", "%2e%2e", "%FF%FE"]),
        st.lists(st.sampled_from(["%00", "a", ".", "%2F", "~"]), max_size=40).map("".join),
    )


def bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=2000),
        st.just(b"List-Unsubscribe=One-Click"),
        st.dictionaries(
            st.sampled_from(FORM_FIELDS),
            st.text(max_size=200),
            max_size=6,
        ).map(lambda d: "&".join(f"{quote(k)}={quote(v)}" for k, v in d.items()).encode()),
        st.integers(70_000, 1_500_000).map(lambda n: b"a=" + b"x" * n),  # oversized
        st.just(b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\x00\r\n--xyz--"),
    )  # fmt: skip


@st.composite
def requests(draw: st.DrawFn, routes: list[Route], tokens: dict[str, list[str]]) -> dict[str, Any]:
    route = draw(st.sampled_from(routes))
    path = route.path
    own = tokens.get(path.split("/")[1], [])  # real tokens of the route's own kind, mostly
    every = [token for kind in tokens.values() for token in kind]
    for name in route.param_convertors:
        path = path.replace("{" + name + "}", draw(segments(own or every, every)))
    method = draw(
        st.one_of(st.sampled_from(sorted(route.methods or {"GET"})), st.sampled_from(METHODS))
    )
    query = draw(
        st.one_of(st.just(""), st.text(max_size=200).map(lambda q: "?" + quote(q, safe="=&")))
    )
    headers = {"user-agent": draw(HEADER_TEXT)}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["content-type"] = content_type
    if draw(st.booleans()):
        headers["accept-language"] = draw(HEADER_TEXT)
    if draw(st.booleans()):
        headers["cookie"] = draw(HEADER_TEXT)
    if draw(st.booleans()):
        headers["accept"] = draw(st.sampled_from(["application/json", "text/html", "*/*", "x"]))
    body = draw(bodies()) if method not in ("GET", "HEAD") else b""
    url = BASE + path + query
    raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    return {"method": method, "url": url, "headers": raw_headers, "content": body}


def test_no_route_answers_bad_input_with_a_server_error(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    loop = asyncio.new_event_loop()
    try:
        sent = loop.run_until_complete(send_tracked(mailer, smtp_server, campaign_file))
        mail = sent["tracked@example.org"]
        urls = (*mail.opens, *mail.clicks, mail.honeypot, mail.unsubscribe, mail.preferences)
        tokens: dict[str, list[str]] = {}
        for url in urls:
            kind, token = path_of(url).split("/")[1:]
            tokens.setdefault(kind, []).append(token)
        app = create_app(mailer, transport=MemoryTransport())
        routes = [route for route in app.routes if isinstance(route, Route)]
        paths = {route.path for route in routes}
        assert {"/o/{token:path}", "/c/{token}", "/healthz"} <= paths
        assert {"/u/{token}", "/p/{token}", "/confirm/{token}", "/subscribe"} <= paths
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app, client=("198.51.100.7", 1234)), base_url=BASE
        )

        @settings(
            max_examples=400,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large],
        )  # fmt: skip
        @given(request=requests(routes, tokens))
        def check(request: dict[str, Any]) -> None:
            response = loop.run_until_complete(client.request(**request))
            status = response.status_code
            assert status < 500, (request["method"], request["url"][:300], status, response.text)
            if request["method"] == "GET" and request["url"].startswith(BASE + "/o/"):
                assert status == 200 and response.headers["content-type"] == "image/gif"
            assert status in (200, 204, 302, 303) or 400 <= status < 500

        check()
        loop.run_until_complete(app.state.recorder.flush())
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()


@pytest.mark.asyncio
async def test_a_huge_token_is_refused_before_any_work(mailer: Mailer) -> None:
    app = create_app(mailer, transport=MemoryTransport())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE) as http:
        for prefix in ("o", "c", "u", "p", "confirm"):
            response = await http.get(f"/{prefix}/" + "A" * 60_000)
            assert response.status_code in (200, 404, 414, 400), prefix
            assert app.state.recorder.pending == 0
