"""Invariant 1, checked at a real SMTP server: exactly the contacts the gate lets through get
the campaign, and a withdrawal or suppression recorded mid-campaign stops that contact's mail."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer import consent
from mailer.models import ConsentMethod, ConsentStatus, SuppressionReason
from mailer.runner import RunOptions, SendResultLike
from mailer.service import CampaignService, Mailer, SendOutcome
from mailer.transport import SmtpPool
from tests.smtp_server import CaptureServer

namespaces = itertools.count()

MARKETING_STATES = ("none", "granted", "withdrawn", "pending", "confirmed", "regranted")


async def send_campaign(
    mailer: Mailer,
    path: Path,
    server: CaptureServer,
    *,
    wrap: Callable[[Any], Any] | None = None,
    **options: Any,
) -> SendOutcome:
    campaigns = CampaignService(mailer)
    async with SmtpPool(server.url, size=4, backoff_base=0.01, timeout=5) as pool:
        transport = wrap(pool) if wrap else pool
        run_options = RunOptions(purpose="marketing", retry_delay=0, **options)
        return await campaigns.send(path, transport=transport, options=run_options)


def given_state(
    mailer: Mailer, email: str, marketing: str, tracking: bool, suppressed: bool
) -> None:
    grant = ConsentStatus.GRANTED
    if marketing in ("granted", "withdrawn", "regranted"):
        mailer.record_consent(email, "marketing", grant, source="webform")
    if marketing in ("withdrawn", "regranted"):
        mailer.record_consent(email, "marketing", ConsentStatus.WITHDRAWN, source="phone")
    if marketing == "regranted":
        mailer.record_consent(email, "marketing", grant, source="shop")
    if marketing in ("pending", "confirmed"):
        with mailer.session() as session:
            contact, _ = mailer._contact_for(session, email)
            assert contact.id is not None
            consent.record(
                session,
                contact_id=contact.id,
                purpose="marketing",
                status=ConsentStatus(marketing),
                method=ConsentMethod.DOUBLE_OPT_IN.value,
                source="webform",
            )
    if marketing == "none":
        mailer.record_consent(email, "newsletter-b2b", grant, source="fair")
    if tracking:
        mailer.record_consent(email, "tracking", grant, source="webform")
    if suppressed:
        mailer.suppress(email, SuppressionReason.UNSUBSCRIBED)


contact_state = st.tuples(st.sampled_from(MARKETING_STATES), st.booleans(), st.booleans())


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(people=st.lists(contact_state, min_size=1, max_size=8))
@pytest.mark.asyncio
async def test_delivered_set_equals_eligible_set(
    mailer: Mailer,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
    tmp_path: Path,
    people: list[tuple[str, bool, bool]],
) -> None:
    n = next(namespaces)
    smtp_server.clear()
    # each example gets its own contacts, tagged, and a campaign for that tag only
    emails = [f"g{n}-{i}@example.org" for i in range(len(people))]
    tagged = tmp_path / f"tagged-{n}.csv"
    tagged.write_text("email,tags\n" + "".join(f"{e},ns{n}\n" for e in emails))
    mailer.import_contacts(tagged)
    expected = set()
    for email, (marketing, tracking, suppressed) in zip(emails, people, strict=True):
        given_state(mailer, email, marketing, tracking, suppressed)
        if marketing in ("granted", "confirmed", "regranted") and not suppressed:
            expected.add(email)
    path = campaign_file(name=f"gate-{n}", extra=f'tags = ["ns{n}"]\n')
    outcome = await send_campaign(mailer, path, smtp_server)

    arrived = Counter(r for m in smtp_server.messages for r in m.recipients)
    assert set(arrived) == expected
    assert all(count == 1 for count in arrived.values())
    report = outcome.report
    assert report["sent"] == len(expected)
    assert sum(report["excluded"].values()) == len(people) - len(expected)


class ActsMidCampaign:
    """A transport that, when the first message goes out, has other contacts say no."""

    def __init__(self, inner: SmtpPool, act: Callable[[], None]) -> None:
        self.inner = inner
        self.act: Callable[[], None] | None = act

    async def send(self, envelope_from: str, recipient: str, data: bytes) -> SendResultLike:
        if self.act is not None:
            act, self.act = self.act, None
            act()
        return await self.inner.send(envelope_from, recipient, data)


@pytest.mark.asyncio
async def test_withdrawal_and_unsubscribe_mid_campaign_stop_the_rest(
    mailer: Mailer, smtp_server: CaptureServer, campaign_file: Callable[..., Path]
) -> None:
    emails = [f"p{i:02d}@example.org" for i in range(30)]
    for email in emails:
        mailer.record_consent(email, "marketing", ConsentStatus.GRANTED, source="webform")

    def people_say_no() -> None:
        mailer.suppress("p20@example.org", SuppressionReason.UNSUBSCRIBED)
        mailer.record_consent(
            "p25@example.org", "marketing", ConsentStatus.WITHDRAWN, source="phone"
        )

    outcome = await send_campaign(
        mailer,
        campaign_file(),
        smtp_server,
        wrap=lambda pool: ActsMidCampaign(pool, people_say_no),
        batch_size=5,
        wave_size=5,
    )
    arrived = {r for m in smtp_server.messages for r in m.recipients}
    assert arrived == set(emails) - {"p20@example.org", "p25@example.org"}
    assert outcome.report["sent"] == 28
    assert outcome.report["excluded"] == {"suppressed": 1, "withdrawn": 1}
    assert outcome.report["status"] == "finished"
