"""Human or machine (invariant 6): scanners and privacy proxies are recorded but flagged, and
reports count people apart. By user agent, HEAD, the operator's gateway networks, a click
seconds after delivery, every link of a mail clicked within a second, and the hidden honeypot
link."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from mailer.config import MACHINE_NETWORKS_ENV, load_settings, parse_machine_networks
from mailer.engagement import (
    BURST_WINDOW,
    CLICK_GRACE,
    HONEYPOT_POSITION,
    HONEYPOT_WINDOW,
    EngagementRecorder,
    Hit,
)
from mailer.errors import ConfigError
from mailer.models import ConsentStatus, utcnow
from mailer.service import CampaignService, Mailer
from mailer.tokens import TokenKind, Tokens
from mailer.tracking.classify import MachineNetworks, MachineReason, agent_reason, request_reason
from tests.conftest import CliResult
from tests.smtp_server import CaptureServer
from tests.test_consent_gate import send_campaign
from tests.test_tracking_pixel_and_click import (
    HUMAN,
    SentMail,
    client_for,
    events,
    make_app,
    path_of,
    send_tracked,
)

PEOPLE = [
    HUMAN,
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17726; Pro)",
    "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.12.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.6478.71 Mobile Safari/537.36",
]
MACHINES = [
    ("Mozilla/5.0", MachineReason.APPLE_MAIL_PRIVACY),
    (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
        MachineReason.GOOGLE_IMAGE_PROXY,
    ),
    ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "yahoo"),
    ("Mozilla/5.0 (compatible; BingPreview/1.0b)", MachineReason.MICROSOFT_SAFE_LINKS),
    ("Microsoft SafeLinks Scanner", MachineReason.MICROSOFT_SAFE_LINKS),
    ("Mimecast-Link-Checker/1.0", MachineReason.MIMECAST),
    ("Mozilla/5.0 Proofpoint URL Defense", MachineReason.PROOFPOINT),
    ("Barracuda Sentinel (EE)", MachineReason.BARRACUDA),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
    ("python-requests/2.32.3", MachineReason.BOT),
    ("curl/8.5.0", MachineReason.BOT),
    ("Go-http-client/1.1", MachineReason.BOT),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/126.0", "bot"),
    ("", MachineReason.NO_USER_AGENT),
]


@pytest.mark.parametrize("agent", PEOPLE)
def test_browsers_and_mail_clients_are_people(agent: str) -> None:
    assert agent_reason(agent) is None
    assert request_reason("GET", agent, "192.0.2.7", None, is_open=True) is None


@pytest.mark.parametrize(("agent", "reason"), MACHINES)
def test_proxies_scanners_and_bots_are_machines(agent: str, reason: str) -> None:
    found = agent_reason(agent)
    assert found is not None
    if reason in ("yahoo", "bot"):
        assert found in (MachineReason.YAHOO_MAIL_PROXY, MachineReason.BOT)
    else:
        assert found is reason


def test_what_one_request_shows() -> None:
    assert request_reason("HEAD", HUMAN, "192.0.2.7") is MachineReason.HEAD_REQUEST
    # Apple's network: a proxied open, but a person's click from an Apple address is a person's
    assert request_reason("GET", HUMAN, "17.58.0.1", is_open=True) is (
        MachineReason.APPLE_MAIL_PRIVACY
    )
    assert request_reason("GET", HUMAN, "17.58.0.1", is_open=False) is None
    safelinks = "https://eur01.safelinks.protection.outlook.com/?url=https%3A%2F%2Fx"
    assert request_reason("GET", HUMAN, "192.0.2.7", safelinks) is (
        MachineReason.MICROSOFT_SAFE_LINKS
    )


# -- through the app ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_proxied_and_scanned_opens_are_flagged_and_counted_apart(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    pixel = path_of(sent.opens[0])
    async with client_for(app) as http:
        await http.get(pixel)  # the person
        await http.get(pixel, headers={"user-agent": "Mozilla/5.0"})  # Apple MPP
        await http.get(pixel, headers={"user-agent": MACHINES[1][0]})  # Gmail's proxy
        await http.get(pixel, headers={"user-agent": "Mimecast-Link-Checker/1.0"})
        await http.get(pixel, headers={"user-agent": ""})
    async with client_for(app, client=("17.58.0.1", 443)) as http:
        await http.get(pixel)  # from Apple's network
    await app.state.recorder.flush()
    assert [(e.machine, e.machine_reason) for e in events(mailer)] == [
        (False, None),
        (True, "apple_mail_privacy"),
        (True, "google_image_proxy"),
        (True, "mimecast"),
        (True, "no_user_agent"),
        (True, "apple_mail_privacy"),
    ]
    report = CampaignService(mailer).report("autumn")
    assert (report["opens"], report["unique_opens"]) == (1, 1)
    assert (report["machine_opens"], report["machine_unique_opens"]) == (5, 1)


@pytest.mark.asyncio
async def test_a_click_seconds_after_delivery_is_a_scanners(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    # delivered just now: a gateway scanning the mail on arrival clicks at once
    sent = await send_tracked(mailer, smtp_server, campaign_file, age=None)
    mail = sent["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        response = await http.get(path_of(mail.clicks[0]))
        assert response.status_code == 302  # the redirect works all the same
        await http.get(path_of(mail.opens[0]))  # an open is not judged by this rule
    await app.state.recorder.flush()
    assert [(e.kind, e.machine_reason) for e in events(mailer)] == [
        ("click", "click_seconds_after_delivery"),
        ("open", None),
    ]


@pytest.mark.asyncio
async def test_a_click_after_the_grace_period_is_a_persons(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    sent = await send_tracked(mailer, smtp_server, campaign_file, age=CLICK_GRACE * 2)
    mail = sent["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app) as http:
        await http.get(path_of(mail.clicks[1]))
    await app.state.recorder.flush()
    assert [(e.kind, e.machine) for e in events(mailer)] == [("click", False)]


def click(mail: SentMail, position: int, seconds: float, agent: str = HUMAN) -> Hit:
    """A click at a chosen moment (seconds from ten minutes ago; the mail was delivered an
    hour ago), as the app would queue it."""
    reason = MachineReason.HONEYPOT.value if position == HONEYPOT_POSITION else None
    at = utcnow() - timedelta(minutes=10) + timedelta(seconds=seconds)
    return Hit("click", mail.delivery_id, mail.campaign_id, position, at, None, agent, reason)


async def record(mailer: Mailer, *batches: list[Hit]) -> None:
    """Write each batch in its own flush, as separate workers would."""
    recorder = EngagementRecorder(mailer.engine)
    for batch in batches:
        for hit in batch:
            recorder.record(hit)
        assert await recorder.flush() == len(batch)


@pytest.mark.asyncio
async def test_every_link_of_a_mail_clicked_within_a_second_is_a_scanner(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = ("fast@example.org", "slow@example.org", "split@example.org", "one@example.org")
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    fast, slow, split, one = (sent[e] for e in emails)
    window = BURST_WINDOW.total_seconds()
    await record(
        mailer,
        [
            click(fast, 0, 0),
            click(fast, 1, window * 0.6),  # both links within the window: a scanner
            click(slow, 0, 0),
            click(slow, 1, window * 5),  # a person reading on
            click(one, 1, 0),
            click(one, 1, 0.1),  # the same link twice: a double click
            click(split, 0, 100),
        ],
        [click(split, 1, 100.5)],  # written by another flush (another worker): still seen
    )
    flagged = {
        (e.delivery_id, e.link_position): e.machine_reason
        for e in events(mailer)
        if e.machine_reason
    }
    assert flagged == {
        (fast.delivery_id, 0): "all_links_within_a_second",
        (fast.delivery_id, 1): "all_links_within_a_second",
        (split.delivery_id, 0): "all_links_within_a_second",
        (split.delivery_id, 1): "all_links_within_a_second",
    }
    report = CampaignService(mailer).report("autumn")
    assert (report["clicks"], report["unique_clicks"]) == (4, 2)
    assert (report["machine_clicks"], report["machine_unique_clicks"]) == (4, 2)


@pytest.mark.asyncio
async def test_clicks_beside_a_honeypot_click_are_a_scanners(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = ("scanned@example.org", "later@example.org", "person@example.org")
    sent = await send_tracked(mailer, smtp_server, campaign_file, emails)
    scanned, later, person = (sent[e] for e in emails)
    wide = HONEYPOT_WINDOW.total_seconds()
    await record(
        mailer,
        [click(scanned, 0, 0)],  # before the honeypot, written first
        [click(scanned, HONEYPOT_POSITION, 5), click(later, HONEYPOT_POSITION, 0)],
        [click(scanned, 1, 10), click(later, 0, wide * 4), click(person, 0, 7)],
    )
    reasons = {(e.delivery_id, e.link_position): e.machine_reason for e in events(mailer)}
    assert reasons == {
        (scanned.delivery_id, 0): "clicked_beside_honeypot",
        (scanned.delivery_id, HONEYPOT_POSITION): "honeypot",
        (scanned.delivery_id, 1): "clicked_beside_honeypot",
        (later.delivery_id, HONEYPOT_POSITION): "honeypot",
        (later.delivery_id, 0): None,  # minutes later: the person, after the scanner
        (person.delivery_id, 0): None,
    }


HONEYPOT_LINK = re.compile(
    r'<div style="display:none;[^"]*" aria-hidden="true">'
    r'<a href="http://127\.0\.0\.1:8000/c/([^"]+)" tabindex="-1"'
)


@pytest.mark.asyncio
@pytest.mark.parametrize("fragment", [True, False], ids=["in-the-layout", "own-document"])
async def test_the_honeypot_is_hidden_in_click_tracked_mail_only(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    fragment: bool,
) -> None:
    html = '<p>Read <a href="https://shop.example.com/a">this</a>.</p>'
    if not fragment:
        html = f"<html><body>{html}</body></html>"
    for email in ("a@example.org", "b@example.org", "plain@example.org"):
        mailer.record_consent(email, "marketing", ConsentStatus.GRANTED, source="web")
    for email in ("a@example.org", "b@example.org"):
        mailer.record_consent(email, "tracking", ConsentStatus.GRANTED, source="web")
    await send_campaign(mailer, campaign_file("clicks", html=html), smtp_server)
    sent_with_clicks = len(smtp_server.messages)
    await send_campaign(
        mailer, campaign_file("no-clicks", html=html, extra="track_clicks = false\n"), smtp_server
    )
    tokens = Tokens(mailer.settings.secret_keys)
    seen = set()
    for number, captured in enumerate(smtp_server.messages):
        message = captured.parse()
        body = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        honeypots = HONEYPOT_LINK.findall(body)
        tracked = captured.recipients[0] != "plain@example.org"
        if tracked and number < sent_with_clicks:
            (token,) = honeypots
            assert tokens.verify(TokenKind.CLICK, token)[2] == HONEYPOT_POSITION
            assert token not in text
            seen.add(captured.recipients[0])
        else:
            assert honeypots == [] and "tabindex" not in body
    assert len(smtp_server.messages) == 6
    assert seen == {"a@example.org", "b@example.org"}


# -- the operator's gateway networks ------------------------------------------------------------

# Documentation ranges standing in for a gateway's published ones (none are built in).
GATEWAYS = """
[mailer.machine_networks]
mimecast = ["198.51.100.0/24"]
microsoft_safe_links = ["2001:db8:40::/48", "203.0.113.128/25"]
"""
MIMECAST_HOST = "198.51.100.20"
SAFE_LINKS_HOST = "2001:db8:40::7"
OUTSIDE = ("203.0.113.9", "2001:db8:41::7", "198.51.101.20")


def with_gateways(mailer: Mailer, env: dict[str, str], tmp_path: Path) -> Mailer:
    """The same database, with settings whose mailer.toml names the gateways' networks."""
    config = tmp_path / "gateways.toml"
    config.write_text(GATEWAYS, encoding="utf-8")
    return Mailer(load_settings({**env, "MAILER_CONFIG": str(config)}, cwd=tmp_path), mailer.engine)


def networks(raw: str) -> MachineNetworks:
    return MachineNetworks(parse_machine_networks(raw, MACHINE_NETWORKS_ENV))


@pytest.mark.asyncio
async def test_opens_and_clicks_from_a_gateways_network_are_flagged_with_its_reason(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    pixel, link = path_of(sent.opens[0]), path_of(sent.clicks[0])
    app = make_app(with_gateways(mailer, env, tmp_path))
    # an ordinary browser's user agent (client_for's default) from each address
    for host in (MIMECAST_HOST, SAFE_LINKS_HOST, *OUTSIDE):
        async with client_for(app, client=(host, 443)) as http:
            assert (await http.get(pixel)).status_code == 200
            assert (await http.get(link)).status_code == 302
    await app.state.recorder.flush()
    assert [(e.kind, e.machine, e.machine_reason) for e in events(mailer)] == [
        ("open", True, "mimecast"),
        ("click", True, "mimecast"),
        ("open", True, "microsoft_safe_links"),
        ("click", True, "microsoft_safe_links"),
        *[("open", False, None), ("click", False, None)] * len(OUTSIDE),
    ]
    # the address is classified whole, and stored masked all the same
    assert {e.ip_masked for e in events(mailer)[:4]} == {"198.51.100.0", "2001:db8:40::"}
    report = CampaignService(mailer).report("autumn")
    assert (report["opens"], report["clicks"]) == (len(OUTSIDE), len(OUTSIDE))
    assert (report["machine_opens"], report["machine_clicks"]) == (2, 2)


@pytest.mark.asyncio
async def test_without_configured_networks_a_gateways_address_is_a_person(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    # no ranges ship with mailer: the operator names them
    assert mailer.settings.machine_networks == ()
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(mailer)
    async with client_for(app, client=(MIMECAST_HOST, 443)) as http:
        await http.get(path_of(sent.opens[0]))
        await http.get(path_of(sent.clicks[0]))
    await app.state.recorder.flush()
    assert [(e.kind, e.machine_reason) for e in events(mailer)] == [("open", None), ("click", None)]


@pytest.mark.asyncio
async def test_a_user_agent_that_names_a_gateway_wins_over_the_network(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    sent = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    app = make_app(with_gateways(mailer, env, tmp_path))
    async with client_for(
        app, client=(MIMECAST_HOST, 443), user_agent="Barracuda Sentinel"
    ) as http:
        await http.get(path_of(sent.opens[0]))
        await http.get(path_of(sent.clicks[0]))
    async with client_for(app, client=(SAFE_LINKS_HOST, 443), user_agent="curl/8.5.0") as http:
        await http.get(path_of(sent.clicks[1]))
        await http.head(path_of(sent.opens[0]))
    await app.state.recorder.flush()
    assert [(e.kind, e.machine_reason) for e in events(mailer)] == [
        ("open", "barracuda"),
        ("click", "barracuda"),
        ("click", "bot"),
        ("open", "head_request"),
    ]


def test_what_an_address_in_the_operators_networks_shows() -> None:
    found = networks(
        "mimecast=198.51.100.0/24;proofpoint=198.51.100.64/26;bot=2001:db8::/32;"
        "apple_mail_privacy=192.0.2.0/24"
    )

    def reason(host: str | None, *, is_open: bool = False, **kw: str) -> MachineReason | None:
        return request_reason("GET", HUMAN, host, is_open=is_open, networks=found, **kw)

    assert reason("198.51.100.1") is MachineReason.MIMECAST
    assert reason("198.51.100.70") is MachineReason.PROOFPOINT  # the most specific range
    assert reason("198.51.100.70", is_open=True) is MachineReason.PROOFPOINT
    assert reason("2001:db8:ffff::1", is_open=True) is MachineReason.BOT
    assert reason("::ffff:198.51.100.1") is MachineReason.MIMECAST  # a dual-stack socket's view
    for person in ("198.51.99.255", "198.51.101.0", "2001:db9::1", "::1", "testclient", None):
        assert reason(person) is None and reason(person, is_open=True) is None
    # Apple's relays: opens only, as for its built-in network
    assert reason("192.0.2.9", is_open=True) is MachineReason.APPLE_MAIL_PRIVACY
    assert reason("192.0.2.9") is None
    assert reason("17.58.0.1", is_open=True) is MachineReason.APPLE_MAIL_PRIVACY
    # what the request itself says comes first
    safelinks = "https://eur01.safelinks.protection.outlook.com/?url=x"
    assert reason("198.51.100.1", referrer=safelinks) is MachineReason.MICROSOFT_SAFE_LINKS
    assert request_reason("GET", "Mimecast", "2001:db8::1", networks=found) is (
        MachineReason.MIMECAST
    )
    assert request_reason("HEAD", HUMAN, "198.51.100.1", networks=found) is (
        MachineReason.HEAD_REQUEST
    )
    assert not MachineNetworks() and found


# -- the setting --------------------------------------------------------------------------------


def test_machine_networks_are_read_from_the_file_and_the_environment(tmp_path: Path) -> None:
    (tmp_path / "mailer.toml").write_text(GATEWAYS, encoding="utf-8")
    v4, v6 = ipaddress.IPv4Network, ipaddress.IPv6Network
    assert load_settings({}, cwd=tmp_path).machine_networks == (
        (MachineReason.MIMECAST, v4("198.51.100.0/24")),
        (MachineReason.MICROSOFT_SAFE_LINKS, v6("2001:db8:40::/48")),
        (MachineReason.MICROSOFT_SAFE_LINKS, v4("203.0.113.128/25")),
    )
    # the environment replaces the file's table; host bits are cleared, a bare address is one
    raw = " Proofpoint = 192.0.2.77/24, 2001:DB8:0:1::5/64  ;bot=203.0.113.5;; "
    assert load_settings({MACHINE_NETWORKS_ENV: raw}, cwd=tmp_path).machine_networks == (
        (MachineReason.PROOFPOINT, v4("192.0.2.0/24")),
        (MachineReason.PROOFPOINT, v6("2001:db8:0:1::/64")),
        (MachineReason.BOT, v4("203.0.113.5/32")),
    )
    spaced = "mimecast=192.0.2.0/25 192.0.2.128/25"
    assert len(load_settings({MACHINE_NETWORKS_ENV: spaced}, cwd=tmp_path).machine_networks) == 2


BAD_NETWORKS = [
    ("mimecat=192.0.2.0/24", "'mimecat' is not a machine reason"),
    ("honeypot=192.0.2.0/24", "'honeypot' is not a machine reason"),
    ("head_request=192.0.2.0/24", "'head_request' is not a machine reason"),
    ("click_seconds_after_delivery=192.0.2.0/24", "'click_seconds_after_delivery' is not"),
    ("mimecast=192.0.2.0/33", "mimecast: '192.0.2.0/33' is not an IPv4 or IPv6 network"),
    ("mimecast=192.0.2.0/24,mimecast.com", "mimecast: 'mimecast.com' is not an IPv4 or IPv6"),
    ("bot=2001:db8::g/32", "bot: '2001:db8::g/32' is not an IPv4 or IPv6 network"),
    ("mimecast", "expected REASON=CIDR[,CIDR...], each separated by ';', got 'mimecast'"),
    (
        "mimecast=192.0.2.0/24;proofpoint=192.0.2.9/24",
        "192.0.2.0/24 is listed for both mimecast and proofpoint",
    ),
]


@pytest.mark.parametrize(("raw", "problem"), BAD_NETWORKS)
def test_bad_machine_networks_are_refused_with_the_bad_item(
    tmp_path: Path, raw: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({MACHINE_NETWORKS_ENV: raw}, cwd=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{MACHINE_NETWORKS_ENV}: ") and "\n" not in message
    assert problem in message


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('mimecast = ["192.0.2.0/24"]\nhoneypot = ["192.0.2.0/25"]', "'honeypot' is not"),
        ('mimecast = ["192.0.2.0/24", "not-a-network"]', "mimecast: 'not-a-network' is not"),
        ("mimecast = [3221225984]", "mimecast: 3221225984 is not an IPv4 or IPv6 network"),
        ("mimecast = 3221225984", "mimecast: expected a list of CIDRs"),
    ],
)
def test_a_bad_machine_networks_table_is_refused_with_the_bad_item(
    tmp_path: Path, table: str, problem: str
) -> None:
    (tmp_path / "mailer.toml").write_text(f"[mailer.machine_networks]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({}, cwd=tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'mailer.toml'}: machine_networks: ")
    assert problem in str(caught.value)
    (tmp_path / "mailer.toml").write_text('[mailer]\nmachine_network = ["192.0.2.0/24"]\n')
    with pytest.raises(ConfigError, match="unknown key 'machine_network'"):
        load_settings({}, cwd=tmp_path)


def test_the_cli_refuses_bad_machine_networks_with_one_line_and_exit_2(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    assert cli("init").exit_code == 0
    good = {MACHINE_NETWORKS_ENV: "mimecast=198.51.100.0/24"}
    assert cli("suppress", "a@example.com", extra_env=good).exit_code == 0
    bad = {MACHINE_NETWORKS_ENV: "mimecast=198.51.100.0/24;proofpont=203.0.113.0/24"}
    result = cli("suppress", "b@example.com", extra_env=bad)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {MACHINE_NETWORKS_ENV}: 'proofpont' is not a")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    (tmp_path / "mailer.toml").write_text('[mailer.machine_networks]\nbot = ["192.0.2.0/40"]\n')
    result = cli("suppress", "c@example.com")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {tmp_path / 'mailer.toml'}: machine_networks: bot: '192.0.2.0/40' is not an "
        "IPv4 or IPv6 network (such as 192.0.2.0/24 or 2001:db8::/32)\n"
    )
