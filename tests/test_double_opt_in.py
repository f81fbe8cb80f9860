"""Double opt-in: POST /subscribe records pending consent and mails a timed confirmation link;
GET /confirm changes nothing, only the POST confirms; the confirmation lifts an earlier
unsubscribe and nothing else; expired and used links get a clear 4xx; the form is protected by
a honeypot, a per-IP limit (counted in the database: it holds across every worker and machine,
and stores no address) and a per-address mail limit, and never tells whether an address was
known."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from sqlmodel import col, select
from starlette.applications import Starlette

from mailer.addresses import address_hash
from mailer.config import Settings, load_settings
from mailer.message import HeaderInjection
from mailer.models import (
    Campaign,
    ConsentStatus,
    Delivery,
    SignupLimit,
    Subscription,
    SuppressionReason,
    as_utc,
    utcnow,
)
from mailer.recipients import CONFIRMATIONS_PER_DAY, build_confirmation_mail
from mailer.service import Mailer
from mailer.tokens import CONFIRM_MAX_AGE, TokenKind, Tokens
from mailer.tracking.pages import SIGNUP_WINDOW_SECONDS, client_key
from mailer.transport import MemoryTransport, SmtpPool
from tests.recipient_support import (
    POLICY,
    WORDING,
    app_for,
    client_for,
    confirm_path,
    contact,
    deliver,
    ledger,
    parse_mail,
    recipients_of,
    signup_form,
    state,
    subscriptions,
    suppressions,
)
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign

BROWSER = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"}


@pytest.mark.asyncio
async def test_sign_up_mails_a_link_and_only_the_post_confirms(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    async with SmtpPool(smtp_server.url, size=1, timeout=5) as pool:
        app = app_for(mailer, pool)
        async with client_for(app, client=("203.0.113.77", 5000)) as http:
            answer = await http.post(
                "/subscribe",
                data=signup_form(
                    "New.Person@Example.org",
                    name="Nieuw Persoon",
                    purposes=["marketing", "tracking"],
                ),
                headers=BROWSER,
            )
            assert answer.status_code == 200
            assert "Check your inbox" in answer.text
            (pending_sub,) = subscriptions(mailer)
            assert pending_sub["status"] == "pending" and pending_sub["mailed_at"] is not None
            assert pending_sub["purposes"] == ["marketing", "tracking"]
            assert pending_sub["ip_masked"] == "203.0.113.0"
            rows = ledger(mailer)
            assert [(r["purpose"], r["status"], r["method"]) for r in rows] == [
                ("marketing", "pending", "form"),
                ("tracking", "pending", "form"),
            ]
            assert all(
                r["policy_version"] == POLICY
                and r["wording"] == WORDING
                and r["ip_masked"] == "203.0.113.0"
                and r["user_agent"] == BROWSER["user-agent"]
                and r["evidence"] == f"subscription:{pending_sub['id']}"
                for r in rows
            )
            person = contact(mailer, "new.person@example.org")
            assert person.name == "Nieuw Persoon"

            (captured,) = smtp_server.wait_for(1)
            assert captured.recipients == ("new.person@example.org",)
            message = captured.parse()
            assert message["To"] == "new.person@example.org"
            assert message["From"] == "Shop BV <noreply@localhost>"
            assert message["Auto-Submitted"] == "auto-generated"
            assert message["List-Unsubscribe"] is None  # transactional: nothing to leave yet
            assert "confirm" in str(message["Subject"]).lower()
            path = confirm_path(captured.data)
            html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
            assert f"http://127.0.0.1:8000{path}" in html

            # The link is a timed CONFIRM token for this subscription.
            (subscription_id,) = Tokens(mailer.settings.secret_keys).verify(
                TokenKind.CONFIRM, path.rsplit("/", 1)[1]
            )
            assert subscription_id == pending_sub["id"]

            before = state(mailer)
            page = await http.get(path, headers={"user-agent": "SafeLinks scanner"})
            assert page.status_code == 200
            assert '<button type="submit">Confirm</button>' in page.text
            assert "n***@example.org" in page.text and WORDING in page.text
            assert state(mailer) == before  # a scanner opening the link confirms nothing

            confirmed = await http.post(path, headers=BROWSER)
            assert confirmed.status_code == 200
            assert "you are subscribed" in confirmed.text

    rows = [r for r in ledger(mailer) if r["status"] == "confirmed"]
    assert [(r["purpose"], r["method"]) for r in rows] == [
        ("marketing", "double_opt_in"),
        ("tracking", "double_opt_in"),
    ]
    for row in rows:
        assert row["evidence"] == f"subscription:{subscription_id}"
        assert row["policy_version"] == POLICY and row["wording"] == WORDING
        assert row["ip_masked"] == "203.0.113.0"
        assert row["user_agent"] == BROWSER["user-agent"]
    (done,) = subscriptions(mailer)
    assert done["status"] == "confirmed" and done["confirmed_at"] is not None

    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name="welcome"), smtp_server)
    assert recipients_of(smtp_server) == {"new.person@example.org"}


@pytest.mark.asyncio
async def test_a_used_link_gets_a_clear_page_and_changes_nothing(mailer: Mailer) -> None:
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        await http.post("/subscribe", data=signup_form("anna@example.org"))
        path = confirm_path(transport.messages[0].data)
        assert (await http.post(path)).status_code == 200
        after = state(mailer)
        again = await http.post(path)
        page = await http.get(path)
    assert again.status_code == 409 and page.status_code == 409
    assert "Already confirmed" in again.text
    assert state(mailer) == after


@pytest.mark.asyncio
async def test_an_expired_link_gets_a_clear_page_and_changes_nothing(
    mailer: Mailer, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        await http.post("/subscribe", data=signup_form("anna@example.org"))
        (sub,) = subscriptions(mailer)
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - CONFIRM_MAX_AGE - 60)
        stale = Tokens(mailer.settings.secret_keys).sign(TokenKind.CONFIRM, (sub["id"],))
        monkeypatch.setattr(time, "time", real_time)
        before = state(mailer)
        page = await http.get(f"/confirm/{stale}", headers={"accept-language": "nl"})
        post = await http.post(f"/confirm/{stale}")
    assert page.status_code == 410 and post.status_code == 410
    assert "Deze link is verlopen" in page.text
    assert "This link has expired" in post.text
    assert state(mailer) == before


@pytest.mark.asyncio
async def test_bad_confirmation_tokens_are_404(mailer: Mailer) -> None:
    transport = MemoryTransport()
    tokens = Tokens(mailer.settings.secret_keys)
    async with client_for(app_for(mailer, transport)) as http:
        await http.post("/subscribe", data=signup_form("anna@example.org"))
        path = confirm_path(transport.messages[0].data)
        before = state(mailer)
        for bad in (
            path[:-2],
            path + "A",
            "/confirm/" + tokens.sign(TokenKind.CONFIRM, (999_999,)),
            "/confirm/" + tokens.sign(TokenKind.UNSUBSCRIBE, (1,)),
        ):
            for method in ("GET", "POST"):
                answer = await http.request(method, bad)
                assert answer.status_code == 404, (bad, method)
    assert state(mailer) == before


@pytest.mark.asyncio
async def test_confirmation_lifts_an_unsubscribe_and_nothing_else(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    arrived = await deliver(
        mailer, smtp_server, campaign_file, "anna@example.org", "bert@example.org"
    )
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        for person in arrived.values():
            await http.post(person.unsubscribe, content=b"List-Unsubscribe=One-Click")
        mailer.suppress("bert@example.org", SuppressionReason.HARD_BOUNCE)
        for address in arrived:
            await http.post("/subscribe", data=signup_form(address))
        by_recipient = {m.recipient: m for m in transport.messages}
        for address in arrived:
            answer = await http.post(confirm_path(by_recipient[address].data))
            assert answer.status_code == 200
    confirmed = {r["contact_id"]: r["id"] for r in ledger(mailer) if r["status"] == "confirmed"}
    anna_hash = contact(mailer, "anna@example.org").email_hash
    bert_hash = contact(mailer, "bert@example.org").email_hash
    rows = {(s["address_hash"], s["reason"]): s for s in suppressions(mailer)}
    anna_unsub = rows[(anna_hash, "unsubscribed")]
    assert anna_unsub["lifted_at"] is not None
    assert anna_unsub["lifted_by_consent_id"] == confirmed[contact(mailer, "anna@example.org").id]
    assert rows[(bert_hash, "unsubscribed")]["lifted_at"] is not None
    assert rows[(bert_hash, "hard_bounce")]["lifted_at"] is None  # a bounce stays

    smtp_server.clear()
    await send_campaign(mailer, campaign_file(name="winter"), smtp_server)
    assert recipients_of(smtp_server) == {"anna@example.org"}


@pytest.mark.asyncio
async def test_the_answer_never_tells_whether_an_address_is_known(mailer: Mailer) -> None:
    mailer.record_consent("known@example.org", "marketing", ConsentStatus.GRANTED, source="shop")
    mailer.suppress("gone@example.org", SuppressionReason.UNSUBSCRIBED)
    transport = MemoryTransport()
    answers = []
    async with client_for(app_for(mailer, transport)) as http:
        for address in ("known@example.org", "gone@example.org", "new@example.org"):
            for accept in ("text/html", "application/json"):
                answer = await http.post(
                    "/subscribe", data=signup_form(address), headers={"accept": accept}
                )
                answers.append((accept, answer.status_code, answer.text))
        # the same address again at once: no new mail, and still the same answer
        again = await http.post("/subscribe", data=signup_form("new@example.org"))
    html = {a for a in answers if a[0] == "text/html"}
    json = {a for a in answers if a[0] == "application/json"}
    assert len(html) == 1 and len(json) == 1
    assert (again.status_code, again.text) == next(iter(html))[1:]
    assert next(iter(json))[2].startswith('{"status":"pending"')
    assert sorted(m.recipient for m in transport.messages) == [
        "gone@example.org",
        "known@example.org",
        "new@example.org",
    ]


@pytest.mark.asyncio
async def test_a_sign_up_never_takes_away_consent_already_given(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    """A stranger submitting someone's address must not stop their mail until they confirm."""
    mailer.record_consent("anna@example.org", "marketing", ConsentStatus.GRANTED, source="shop")
    async with client_for(app_for(mailer, MemoryTransport())) as http:
        await http.post(
            "/subscribe",
            data=signup_form(
                "anna@example.org", name="Somebody Else", purposes="marketing,tracking"
            ),
        )
    assert [(r["purpose"], r["status"]) for r in ledger(mailer)] == [
        ("marketing", "granted"),
        ("tracking", "pending"),
    ]
    assert contact(mailer, "anna@example.org").name is None  # nobody confirmed that name
    await send_campaign(mailer, campaign_file(), smtp_server)
    assert recipients_of(smtp_server) == {"anna@example.org"}


@pytest.mark.asyncio
async def test_confirmation_mails_are_limited_per_address(mailer: Mailer) -> None:
    transport = MemoryTransport()

    def age_all_mails(by: timedelta) -> None:
        table = Subscription.__table__  # type: ignore[attr-defined]
        with mailer.session() as session:
            for row in subscriptions(mailer):
                session.connection().execute(
                    update(table)
                    .where(table.c.id == row["id"])
                    .values(mailed_at=row["mailed_at"] - by, requested_at=row["requested_at"] - by)
                )

    async with client_for(app_for(mailer, transport)) as http:
        for _ in range(3):  # a bot or an impatient person: one mail per ten minutes
            assert (await http.post("/subscribe", data=signup_form("anna@example.org"))).is_success
        assert len(transport.messages) == 1 and len(subscriptions(mailer)) == 1
        for expected in range(2, CONFIRMATIONS_PER_DAY + 1):
            age_all_mails(timedelta(minutes=11))
            await http.post("/subscribe", data=signup_form("anna@example.org"))
            assert len(transport.messages) == expected
        age_all_mails(timedelta(minutes=11))  # still within a day of the first: held back
        await http.post("/subscribe", data=signup_form("anna@example.org"))
        assert len(transport.messages) == CONFIRMATIONS_PER_DAY
        age_all_mails(timedelta(days=1))
        await http.post("/subscribe", data=signup_form("anna@example.org"))
        assert len(transport.messages) == CONFIRMATIONS_PER_DAY + 1
    held_back_rows = [r for r in ledger(mailer) if r["status"] == "pending"]
    assert len(held_back_rows) == CONFIRMATIONS_PER_DAY + 1  # held-back sign-ups record nothing


@pytest.mark.asyncio
async def test_sign_ups_are_limited_per_ip(mailer: Mailer) -> None:
    transport = MemoryTransport()
    app = app_for(mailer, transport)
    async with client_for(app, client=("198.51.100.7", 1000)) as http:
        answers = [
            (await http.post("/subscribe", data=signup_form(f"p{i}@example.org"))).status_code
            for i in range(12)
        ]
        limited = await http.post(
            "/subscribe",
            data=signup_form("late@example.org"),
            headers={"accept": "application/json"},
        )
    assert answers == [200] * 10 + [429] * 2
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert limited.json()["error"] == "rate_limited"
    assert len(transport.messages) == 10
    async with client_for(app, client=("2001:db8::1", 1000)) as other:
        assert (await other.post("/subscribe", data=signup_form("q@example.org"))).is_success


# -- the per-IP limit, shared by every worker and machine ------------------------------------------


@asynccontextmanager
async def two_workers(mailer: Mailer, **limits: float) -> AsyncIterator[tuple[Starlette, ...]]:
    """The app as two workers (or machines) run it: each its own Mailer, engine and connection
    pool, on the one database."""
    other = Mailer(mailer.settings)
    try:
        yield (
            app_for(mailer, MemoryTransport(), **limits),
            app_for(other, MemoryTransport(), **limits),
        )
    finally:
        other.close()


async def sign_up(app: Starlette, host: str, address: str = "x@example.org") -> httpx.Response:
    async with client_for(app, client=(host, 1000)) as http:
        return await http.post(
            "/subscribe", data=signup_form(address), headers={"accept": "application/json"}
        )


def limit_rows(mailer: Mailer) -> list[SignupLimit]:
    with mailer.session() as session:
        return list(session.exec(select(SignupLimit).order_by(col(SignupLimit.attempts))).all())


def end_windows(mailer: Mailer) -> None:
    """Every stored window ended a second ago."""
    table = SignupLimit.__table__  # type: ignore[attr-defined]
    with mailer.session() as session:
        session.connection().execute(
            update(table).values(window_ends_at=utcnow() - timedelta(seconds=1))
        )


@pytest.mark.asyncio
async def test_the_sign_up_limit_holds_across_workers(mailer: Mailer) -> None:
    async with two_workers(mailer, signups_per_ip=3) as (a, b):
        first = [(await sign_up(w, "198.51.100.7")).status_code for w in (a, a, b)]
        late = [await sign_up(w, "198.51.100.7") for w in (a, b)]
        elsewhere = await sign_up(b, "198.51.100.8")
    assert first == [200, 200, 200]
    for answer in late:
        assert answer.status_code == 429 and answer.json()["error"] == "rate_limited"
        assert 0 < int(answer.headers["retry-after"]) <= SIGNUP_WINDOW_SECONDS
    assert elsewhere.status_code == 200  # another client has a count of its own
    assert sorted(row.attempts for row in limit_rows(mailer)) == [1, 5]


@pytest.mark.asyncio
async def test_an_ipv6_client_is_its_slash_64_and_a_mapped_ipv4_its_address(
    mailer: Mailer,
) -> None:
    tried = [
        ("2001:db8:1:2::1", 200),
        ("2001:db8:1:2::ffff", 200),
        ("2001:db8:1:2:abcd::1", 429),  # the same /64: the third of its window
        ("2001:db8:1:3::1", 200),  # the next /64: another client
        ("192.0.2.1", 200),
        ("192.0.2.1", 200),
        ("::ffff:192.0.2.1", 429),  # that IPv4 address again, as IPv6 writes it
    ]
    async with two_workers(mailer, signups_per_ip=2) as apps:
        answers = [
            (host, (await sign_up(apps[i % 2], host)).status_code)
            for i, (host, _) in enumerate(tried)
        ]
    assert answers == tried


@pytest.mark.asyncio
async def test_a_new_window_starts_when_the_last_one_ended(mailer: Mailer) -> None:
    async with two_workers(mailer, signups_per_ip=2) as (a, b):
        assert [(await sign_up(w, "198.51.100.7")).status_code for w in (a, b, a)] == [
            200,
            200,
            429,
        ]
        end_windows(mailer)
        again = [(await sign_up(w, "198.51.100.7")).status_code for w in (b, a, b)]
    assert again == [200, 200, 429]  # counted from one again, in a window of its own
    (row,) = limit_rows(mailer)
    assert row.attempts == 3
    left = (as_utc(row.window_ends_at) - utcnow()).total_seconds()
    assert SIGNUP_WINDOW_SECONDS - 60 < left <= SIGNUP_WINDOW_SECONDS


@pytest.mark.asyncio
async def test_ended_windows_are_deleted_as_the_app_goes(mailer: Mailer) -> None:
    async with two_workers(mailer, signups_per_ip=2) as (a, _):
        for host in ("198.51.100.7", "198.51.100.8"):
            await sign_up(a, host)
    end_windows(mailer)
    async with two_workers(mailer, signups_per_ip=2) as (fresh, _):  # a worker starting
        assert (await sign_up(fresh, "198.51.100.9")).status_code == 200
    (row,) = limit_rows(mailer)  # only the window still running is left
    assert as_utc(row.window_ends_at) > utcnow()


@pytest.mark.asyncio
async def test_the_limit_stores_no_address(mailer: Mailer) -> None:
    hosts = ("198.51.100.7", "2001:db8:1:2::1")
    async with two_workers(mailer) as (a, _):
        for host in hosts:
            assert (await sign_up(a, host)).status_code == 200
    stored = {row.client for row in limit_rows(mailer)}
    key = mailer.settings.signup_limit_key
    keys = [client_key(host) for host in hosts]  # 198.51.100.7, 2001:db8:1:2::/64
    assert stored == {hmac.new(key, k.encode(), hashlib.sha256).hexdigest() for k in keys}
    for client in stored:
        assert len(client) == 64 and set(client) <= set("0123456789abcdef")
        for text in (*hosts, *keys, "198.51.100", "2001:db8"):
            assert text not in client
    # keyed, and not with the suppression key: not comparable with address hashes
    for k in keys:
        assert hashlib.sha256(k.encode()).hexdigest() not in stored
        assert address_hash(k, mailer.settings.suppression_key) not in stored


@pytest.mark.asyncio
async def test_simultaneous_sign_ups_on_two_workers_let_exactly_the_limit_through(
    mailer: Mailer,
) -> None:
    async def ten_at_once(apps: tuple[Starlette, ...], round_: int) -> list[int]:
        answers = await asyncio.gather(
            *(sign_up(apps[i % 2], "198.51.100.7", f"p{round_}-{i}@example.org") for i in range(10))
        )
        return sorted(a.status_code for a in answers)

    async with two_workers(mailer, signups_per_ip=3) as apps:
        first = await ten_at_once(apps, 1)  # no row yet: they race to insert it
        (row,) = limit_rows(mailer)
        assert row.attempts == 10
        end_windows(mailer)
        second = await ten_at_once(apps, 2)  # an ended window: they race to start the next
    assert first == second == [200] * 3 + [429] * 7
    assert len(subscriptions(mailer)) == 6


@pytest.mark.asyncio
async def test_a_sign_up_while_the_database_is_down_is_a_503(
    mailer: Mailer, tmp_path: Path
) -> None:
    down = Mailer(
        load_settings(
            {
                "MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'no' / 'db.sqlite'}",
                "MAILER_SECRET_KEYS": ",".join(mailer.settings.secret_keys),
            }
        )
    )
    try:
        app = app_for(down, MemoryTransport())
        answer = await sign_up(app, "198.51.100.7")
        async with client_for(app) as http:
            page = await http.post("/subscribe", data=signup_form("x@example.org"))
    finally:
        down.close()
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "30")
    assert answer.json()["error"] == "unavailable"
    assert page.status_code == 503 and "Traceback" not in page.text


@pytest.mark.asyncio
async def test_the_honeypot_catches_bots_quietly(mailer: Mailer) -> None:
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        human = await http.post("/subscribe", data=signup_form("human@example.org"))
        before = state(mailer)
        bot = await http.post(
            "/subscribe", data=signup_form("bot@example.org", website="http://spam.example")
        )
    assert bot.status_code == 200 and bot.text == human.text
    assert state(mailer) == before
    assert [m.recipient for m in transport.messages] == ["human@example.org"]


@pytest.mark.asyncio
async def test_multipart_sign_up_and_dutch(mailer: Mailer) -> None:
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        answer = await http.post(
            "/subscribe",
            files={key: (None, value) for key, value in signup_form("noor@example.nl").items()},
            headers={"accept-language": "nl-NL,nl;q=0.9,en;q=0.5"},
        )
    assert answer.status_code == 200 and "Kijk in uw mailbox" in answer.text
    message = parse_mail(transport.messages[0].data)
    assert message["Content-Language"] == "nl"
    assert str(message["Subject"]).startswith("Bevestig uw aanmelding")
    assert contact(mailer, "noor@example.nl").locale is None  # a guess is not stored


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("form", "why"),
    [
        ({"email": ""}, "email is required"),
        ({"email": "not-an-address"}, "email"),
        ({"email": "a@example.org", "policy_version": ""}, "policy_version"),
        ({"email": "a@example.org", "wording": ""}, "wording"),
        ({"email": "a@example.org", "name": "Eve\r\nBcc: x@example.org"}, "name"),
        ({"email": "a@example.org", "purposes": "Not A Purpose!"}, "purpose"),
        ({"email": "a@example.org", "locale": "de"}, "locale"),
        ({"email": "a@example.org", "wording": "ok\x00"}, "wording"),
    ],
)
async def test_bad_sign_ups_are_refused_and_change_nothing(
    mailer: Mailer, form: dict[str, str], why: str
) -> None:
    transport = MemoryTransport()
    before = state(mailer)
    async with client_for(app_for(mailer, transport)) as http:
        page = await http.post("/subscribe", data={**signup_form("x@example.org"), **form})
        data = await http.post(
            "/subscribe",
            data={**signup_form("x@example.org"), **form},
            headers={"accept": "application/json"},
        )
    assert page.status_code == 400 and "That did not work" in page.text
    assert data.status_code == 400 and why in data.json()["message"]
    assert state(mailer) == before and transport.messages == []


@pytest.mark.asyncio
async def test_wrong_content_types_and_sizes(mailer: Mailer) -> None:
    async with client_for(app_for(mailer, MemoryTransport())) as http:
        json_body = await http.post("/subscribe", json={"email": "a@example.org"})
        huge = await http.post("/subscribe", data={"email": "a@example.org", "x": "y" * 70_000})
        get = await http.get("/subscribe")
    assert json_body.status_code == 415
    assert huge.status_code == 413
    assert get.status_code == 405


def test_the_confirmation_mail_refuses_header_injection() -> None:
    base = Settings(database_url="sqlite://", secret_keys=("k" * 40,), postal_address="Here 1")
    for changed in (
        {"sender_name": "Shop\r\nBcc: victim@example.org"},
        {"mail_from": "Shop <news@example.org>\nBcc: victim@example.org"},
    ):
        with pytest.raises(HeaderInjection):
            build_confirmation_mail(
                Settings(**{**base.__dict__, **changed}),
                to="a@example.org",
                confirm_url="http://127.0.0.1:8000/confirm/x",
                purposes=["marketing"],
                language="en",
                now=utcnow(),
            )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/subscribe", "/u/{u}", "/confirm/{c}", "/p/{p}"]),
    content_type=st.sampled_from(
        [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "multipart/form-data",
            'multipart/form-data; boundary=""',
            "text/plain",
            "",
        ]
    ),
    body=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.builds(
            lambda name, value: (
                f'--xyz\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n--xyz--\r\n"
            ).encode("utf-8", "surrogatepass"),
            st.sampled_from(["email", "action", "purpose", "name", "via", "x\x00"]),
            st.text(max_size=50),
        ),
    ),
)
@pytest.mark.asyncio
async def test_no_body_makes_a_recipient_route_fail(
    mailer: Mailer, path: str, content_type: str, body: bytes
) -> None:
    tokens = Tokens(mailer.settings.secret_keys)
    delivery_id, subscription_id = _a_delivery_and_a_subscription(mailer)
    url = path.format(
        u=tokens.sign(TokenKind.UNSUBSCRIBE, (delivery_id,)),
        c=tokens.sign(TokenKind.CONFIRM, (subscription_id,)),
        p=tokens.sign(TokenKind.PREFERENCES, (delivery_id,)),
    )
    headers = {"content-type": content_type} if content_type else {}
    # no limit: every example is parsed (one database for all of them, and one client)
    async with client_for(app_for(mailer, MemoryTransport(), signups_per_ip=10**6)) as http:
        answer = await http.post(url, content=body, headers=headers)
    assert answer.status_code < 500, (url, content_type, body, answer.text)


def _a_delivery_and_a_subscription(mailer: Mailer) -> tuple[int, int]:
    """Rows for the fuzzed routes to act on, made once per database (hypothesis reuses it)."""
    with mailer.session() as session:
        delivery = session.exec(select(Delivery)).first()
        subscription = session.exec(select(Subscription)).first()
        if delivery is None or subscription is None:
            person, _ = mailer._contact_for(session, "fuzz@example.org")
            now = utcnow()
            campaign = Campaign(
                name="fuzz", purpose="marketing", source_file="fuzz.toml", definition={},
                status="finished", excluded={}, created_at=now,
            )  # fmt: skip
            session.add(campaign)
            session.flush()
            assert campaign.id is not None and person.id is not None
            delivery = Delivery(
                campaign_id=campaign.id, contact_id=person.id, status="sent", tracking=False,
                queued_at=now,
            )  # fmt: skip
            subscription = Subscription(
                contact_id=person.id, purposes=["marketing"], source="fuzz", requested_at=now,
                status="pending",
            )  # fmt: skip
            session.add(delivery)
            session.add(subscription)
            session.flush()
        assert delivery.id is not None and subscription.id is not None
        return delivery.id, subscription.id


@pytest.mark.asyncio
async def test_simultaneous_confirmations_confirm_once(mailer: Mailer) -> None:
    transport = MemoryTransport()
    async with client_for(app_for(mailer, transport)) as http:
        await http.post("/subscribe", data=signup_form("anna@example.org"))
        path = confirm_path(transport.messages[0].data)
        answers = await asyncio.gather(*(http.post(path) for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409, 409]
    assert len([r for r in ledger(mailer) if r["status"] == "confirmed"]) == 1
