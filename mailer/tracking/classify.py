"""Human or machine: what one request shows about who made it (DESIGN invariant 6).

Mail security gateways and privacy proxies open every image and follow every link of a mail
before (or instead of) the person: counted as people, they would make every campaign look
read. What a single request shows is decided here, when it arrives: the method, the user agent,
the referrer, the address. What needs the delivery or other events (a click seconds after
delivery, every link of a mail clicked within a second, clicks beside a honeypot click) is
decided when the batch is written, in mailer.engagement. Events are always recorded; the
classification only decides how reports count them.

Many gateways fetch with an ordinary browser's user agent, so only their address gives them
away; their published ranges differ per region and customer and change, so none are built in
(Apple's 17.0.0.0/8 excepted): the operator names them (settings.machine_networks, checked in
mailer.config) and MachineNetworks looks them up.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable
from enum import StrEnum


class MachineReason(StrEnum):
    """Why an event counts as machine traffic (stored in engagement_events.machine_reason)."""

    HEAD_REQUEST = "head_request"
    NO_USER_AGENT = "no_user_agent"
    APPLE_MAIL_PRIVACY = "apple_mail_privacy"
    GOOGLE_IMAGE_PROXY = "google_image_proxy"
    YAHOO_MAIL_PROXY = "yahoo_mail_proxy"
    MICROSOFT_SAFE_LINKS = "microsoft_safe_links"
    MIMECAST = "mimecast"
    PROOFPOINT = "proofpoint"
    BARRACUDA = "barracuda"
    SECURITY_SCANNER = "security_scanner"
    BOT = "bot"
    HONEYPOT = "honeypot"
    CLICK_AFTER_DELIVERY = "click_seconds_after_delivery"
    ALL_LINKS_AT_ONCE = "all_links_within_a_second"
    HONEYPOT_NEIGHBOUR = "clicked_beside_honeypot"


# The reasons an address can show by itself: the gateways, proxies, scanners and bots. The
# others need the method, the user agent, or the delivery and the other clicks of the mail.
NETWORK_REASONS: tuple[MachineReason, ...] = (
    MachineReason.APPLE_MAIL_PRIVACY,
    MachineReason.GOOGLE_IMAGE_PROXY,
    MachineReason.YAHOO_MAIL_PROXY,
    MachineReason.MICROSOFT_SAFE_LINKS,
    MachineReason.MIMECAST,
    MachineReason.PROOFPOINT,
    MachineReason.BARRACUDA,
    MachineReason.SECURITY_SCANNER,
    MachineReason.BOT,
)
# Reasons that are signs for opens only: Apple's relays carry people's own browsing too, so a
# click from them is still a person's (as for the built-in 17.0.0.0/8).
_OPENS_ONLY = frozenset((MachineReason.APPLE_MAIL_PRIVACY,))

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Apple Mail Privacy Protection loads every image through Apple's proxies, whether or not the
# person reads the mail, with exactly this user agent and from Apple's own network (17.0.0.0/8).
APPLE_PROXY_AGENT = "Mozilla/5.0"
APPLE_NETWORK_PREFIX = "17."

# One pattern per reason, tried in this order (the first match names the reason). The
# generic bot patterns come last, so a named gateway gets its own reason.
_AGENT_PATTERNS: tuple[tuple[MachineReason, str], ...] = (
    (MachineReason.GOOGLE_IMAGE_PROXY, r"googleimageproxy|ggpht\.com"),
    (MachineReason.YAHOO_MAIL_PROXY, r"yahoomailproxy"),
    (
        MachineReason.MICROSOFT_SAFE_LINKS,
        r"safelinks|safe links|bingpreview|microsoftpreview|ms-office-preview|"
        r"skypeuripreview|protection\.outlook\.com",
    ),
    (MachineReason.MIMECAST, r"mimecast"),
    (MachineReason.PROOFPOINT, r"proofpoint|urldefense|ppops"),
    (MachineReason.BARRACUDA, r"barracuda"),
    (
        MachineReason.SECURITY_SCANNER,
        r"symantec|messagelabs|trendmicro|trend micro|sophos|fortinet|fortiguard|forcepoint|"
        r"ironport|zscaler|checkpoint|paloalto|kaspersky|\beset\b|virustotal|urlscan",
    ),
    (
        MachineReason.BOT,
        r"bot\b|bot/|crawler|spider|slurp|scanner|preview|headlesschrome|phantomjs|"
        r"curl/|wget/|python-|python/|httpx/|aiohttp|go-http-client|java/|libwww|"
        r"apache-httpclient|node-fetch|axios/|okhttp/|facebookexternalhit|whatsapp|"
        r"linkcheck|link check|validator|monitor",
    ),
)
_AGENT = re.compile(
    "|".join(f"(?P<{reason.name}>{pattern})" for reason, pattern in _AGENT_PATTERNS),
    re.IGNORECASE,
)
_REFERRER = re.compile(r"safelinks\.protection\.outlook\.com|urldefense|mimecast", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def agent_reason(user_agent: str) -> MachineReason | None:
    """The machine reason a user agent shows by itself, or None for what looks like a person."""
    agent = user_agent.strip()
    if not agent:
        return MachineReason.NO_USER_AGENT
    if agent == APPLE_PROXY_AGENT:
        return MachineReason.APPLE_MAIL_PRIVACY
    match = _AGENT.search(agent)
    if match is None or match.lastgroup is None:
        return None
    return MachineReason[match.lastgroup]


# One table per prefix length: {network address as an int: reason}, longest prefix first, so a
# lookup costs one dict probe per distinct prefix length (however many ranges are pasted) and
# the most specific range wins.
_Tables = tuple[tuple[int, dict[int, MachineReason]], ...]


def _tables(entries: Iterable[tuple[MachineReason, Network]], version: int) -> _Tables:
    by_length: dict[int, dict[int, MachineReason]] = {}
    for reason, network in entries:
        if network.version == version:
            table = by_length.setdefault(network.prefixlen, {})
            table.setdefault(int(network.network_address), reason)
    bits = 32 if version == 4 else 128
    return tuple(
        (((1 << length) - 1) << (bits - length), table)
        for length, table in sorted(by_length.items(), reverse=True)
    )


class MachineNetworks:
    """The operator's networks of gateways, proxies and scanners: which reason an address shows.

    Built once per app from settings.machine_networks. Answers are cached per client address:
    a gateway comes back from the same few addresses, and a person's open and clicks from one
    address follow each other, so most hits cost a cache lookup and no address parsing."""

    CACHE_SIZE = 8192

    def __init__(self, entries: Iterable[tuple[MachineReason, Network]] = ()) -> None:
        self.entries = tuple(entries)
        opens = self.entries
        clicks = tuple((r, n) for r, n in self.entries if r not in _OPENS_ONLY)
        self._tables = {
            (True, 4): _tables(opens, 4),
            (True, 6): _tables(opens, 6),
            (False, 4): _tables(clicks, 4),
            (False, 6): _tables(clicks, 6),
        }
        # per instance, so each app's networks keep their own answers
        self.reason = functools.lru_cache(maxsize=self.CACHE_SIZE)(self._reason)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def _reason(self, host: str, is_open: bool) -> MachineReason | None:
        # inet_pton rather than ipaddress.ip_address: a tenth of the cost on a cache miss
        try:
            if ":" in host:
                version, value = 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, host))
                if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d, a dual-stack socket's IPv4 client
                    version, value = 4, value & 0xFFFFFFFF
            else:
                version, value = 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host))
        except (OSError, ValueError):  # a unix socket, a test client's made-up name, a NUL
            return None
        for mask, table in self._tables[is_open, version]:
            reason = table.get(value & mask)
            if reason is not None:
                return reason
        return None


def request_reason(
    method: str,
    user_agent: str,
    client_host: str | None,
    referrer: str | None = None,
    *,
    is_open: bool = False,
    networks: MachineNetworks | None = None,
) -> MachineReason | None:
    """The machine reason one request shows, or None.

    A HEAD request reads headers only: no person's mail client or browser makes one to show an
    image or follow a link. Apple's network is a sign for opens only (a person's own click from
    Apple's network is still a person). The operator's `networks` (see MachineNetworks) come
    after what the request itself says: a gateway's own user agent names it more surely than a
    range that may be out of date.
    """
    if method == "HEAD":
        return MachineReason.HEAD_REQUEST
    reason = agent_reason(user_agent)
    if reason is not None:
        return reason
    if referrer and _REFERRER.search(referrer):
        return (
            MachineReason.MICROSOFT_SAFE_LINKS
            if "safelinks" in referrer.lower()
            else MachineReason.SECURITY_SCANNER
        )
    # the operator's ranges before Apple's /8: they are the more specific
    if networks is not None and client_host is not None:
        reason = networks.reason(client_host, is_open)
        if reason is not None:
            return reason
    if is_open and client_host is not None and client_host.startswith(APPLE_NETWORK_PREFIX):
        return MachineReason.APPLE_MAIL_PRIVACY
    return None
