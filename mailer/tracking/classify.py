"""Human or machine: what one request shows about who made it (DESIGN invariant 6).

Mail security gateways and privacy proxies open every image and follow every link of a mail
before (or instead of) the person: counted as people, they would make every campaign look
read. What a single request shows is decided here, when it arrives: the method, the user agent,
the referrer, the address. What needs the delivery or other events (a click seconds after
delivery, every link of a mail clicked within a second, clicks beside a honeypot click) is
decided when the batch is written, in mailer.engagement. Events are always recorded; the
classification only decides how reports count them.
"""

from __future__ import annotations

import functools
import re
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


def request_reason(
    method: str,
    user_agent: str,
    client_host: str | None,
    referrer: str | None = None,
    *,
    is_open: bool = False,
) -> MachineReason | None:
    """The machine reason one request shows, or None.

    A HEAD request reads headers only: no person's mail client or browser makes one to show an
    image or follow a link. Apple's network is a sign for opens only (a person's own click from
    Apple's network is still a person).
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
    if is_open and client_host is not None and client_host.startswith(APPLE_NETWORK_PREFIX):
        return MachineReason.APPLE_MAIL_PRIVACY
    return None
