"""Micro-benchmark: microseconds per rendered message, and per link token signed and verified.

    .venv/bin/python bench/render.py [--messages N]

A realistic campaign: a fragment in the built-in layout, a <style> block, personalisation,
a conditional block, a loop over offers, seven tracked links. Figures: the render alone;
untracked (clean links, no pixel) and tracked (click tokens for every link and an open pixel)
as the runner calls it, contact object and tokens included; and the same campaign with the
compile-time work disabled (CSS inlined and text derived per message).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from mailer.render import CompiledCampaign, ContactView, RenderedMessage, compile_campaign
from mailer.tokens import TokenKind, Tokens

CAMPAIGN = """\
<style>
h1 { font-size: 24px; line-height: 30px; color: #1d3b2a; margin: 0 0 16px 0; }
p { margin: 0 0 16px 0; }
.lead { font-size: 18px; }
.button { display: inline-block; background-color: #0a7d3b; color: #ffffff; padding: 12px 20px;
          border-radius: 4px; text-decoration: none; font-weight: bold; }
.offers td { padding: 8px 0; border-bottom: 1px solid #e5e5e5; }
.price { color: #0a7d3b; font-weight: bold; text-align: right; }
.small { font-size: 13px; color: #666666; }
@media (max-width: 480px) { .button { display: block; text-align: center; } }
</style>
<a href="https://www.actiefklussenservice.nl/?utm_source=mail&amp;utm_campaign=voorjaar"><img
   src="https://www.actiefklussenservice.nl/img/logo.png" width="180"
   alt="Actief Klussenservice"></a>
<h1>Hello {{ contact.first_name or "there" }},</h1>
<p class="lead">Spring is here. As a customer in {{ contact.attributes.city }} you get
{{ contact.attributes.discount }}% off every job booked before 1 May.</p>
{% if contact.attributes.last_job %}
<p>Last time we did your {{ contact.attributes.last_job }}. Time for the next one?</p>
{% endif %}
<p><a class="button" href="https://www.actiefklussenservice.nl/afspraak?code=VOORJAAR"
   >Book a visit</a></p>
<table class="offers" role="presentation" width="100%" cellpadding="0" cellspacing="0">
{% for name, price, url in offers %}
<tr><td><a href="{{ url }}">{{ name }}</a></td><td class="price">from EUR {{ price }}</td></tr>
{% endfor %}
</table>
<p>See all <a href="https://www.actiefklussenservice.nl/diensten">our services</a>, read
<a href="https://www.actiefklussenservice.nl/reviews">what customers say</a> or look at
<a href="https://www.actiefklussenservice.nl/projecten">recent projects</a>.</p>
<p>Questions? Call <a href="tel:+31301234567">030 123 4567</a> or
<a href="mailto:info@actiefklussenservice.nl">write to us</a>.</p>
<p class="small">Prices include VAT. <a href="https://www.actiefklussenservice.nl/voorwaarden">Terms</a>
and <a href="https://www.actiefklussenservice.nl/privacy">privacy statement</a>.</p>
"""
SUBJECT = "{{ contact.first_name or 'Hello' }}, {{ contact.attributes.discount }}% off in spring"
OFFERS = [
    ("Garden maintenance", 45, "https://www.actiefklussenservice.nl/tuin"),
    ("Gutter cleaning", 60, "https://www.actiefklussenservice.nl/dakgoot"),
    ("Outdoor painting", 120, "https://www.actiefklussenservice.nl/schilderwerk"),
]
SENDER = {"name": "Actief Klussenservice", "postal_address": "Voorbeeldstraat 1, 3511 AA Utrecht"}
REASON = "You receive this because you subscribed to our newsletter on actiefklussenservice.nl."


def compile_(precompute: bool = True) -> CompiledCampaign:
    return compile_campaign(
        CAMPAIGN,
        None,
        SUBJECT,
        template_name="voorjaar.html",
        sender=SENDER,
        reason=REASON,
        track_clicks=True,
        track_opens=True,
        campaign={"name": "voorjaar"},
        precompute=precompute,
    )


def per_call(fn: Callable[[int], object], n: int, repeat: int = 5) -> float:
    """Microseconds of this process's CPU time per call, best of `repeat` runs.

    CPU time rather than wall time, and the best run, so that other work on a shared machine
    inflates the figure as little as possible.
    """
    fn(0)
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for i in range(n):
            fn(i)
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    n = parser.parse_args().messages
    tokens = Tokens(["an-older-key-" + "x" * 40, "the-newest-key-" + "y" * 40])
    base = "https://t.actiefklussenservice.nl"

    def render(compiled: CompiledCampaign, tracked: bool) -> Callable[[int], object]:
        def one(i: int) -> object:
            contact = ContactView(
                f"person{i}@example.com",
                first_name=f"Person {i}",
                last_name="Jansen",
                locale="en",
                attributes={
                    "city": "Utrecht",
                    "discount": 10,
                    "last_job": "gutters" if i % 2 else "",
                },
            )
            delivery = 1_000_000 + i
            token = tokens.sign(TokenKind.UNSUBSCRIBE, [delivery])
            return compiled.render(
                {"contact": contact, "offers": OFFERS},
                unsubscribe_url=f"{base}/u/{token}",
                preferences_url=f"{base}/p/{tokens.sign(TokenKind.PREFERENCES, [delivery])}",
                click_url=(
                    (lambda link: f"{base}/c/{tokens.sign(TokenKind.CLICK, [delivery, link])}")
                    if tracked
                    else None
                ),
                open_url=f"{base}/o/{tokens.sign(TokenKind.OPEN, [delivery])}" if tracked else None,
            )

        return one

    start = time.perf_counter()
    compiled = compile_()
    compile_ms = (time.perf_counter() - start) * 1e3
    slow = compile_(precompute=False)
    contact = ContactView("a@example.com", attributes={"city": "X", "discount": 5, "last_job": ""})

    def bare(i: int) -> object:
        return compiled.render(
            {"contact": contact, "offers": OFFERS},
            unsubscribe_url="https://t.example/u/x",
            preferences_url="https://t.example/p/x",
            click_url=None,
            open_url=None,
        )

    sample = bare(0)
    assert isinstance(sample, RenderedMessage)
    print(
        f"compile: {compile_ms:.1f} ms; links: {len(compiled.links)}; "
        f"CSS inlined once: {compiled.css_inlined_once}; text derived once: "
        f"{compiled.text_derived_once}; notes: {list(compiled.notes) or 'none'}"
    )
    print(f"message: {len(sample.html)} bytes HTML, {len(sample.text)} bytes text")
    print(f"render alone (no tokens, one contact object):  {per_call(bare, n):7.1f} µs")
    untracked_us = per_call(render(compiled, False), n)
    print(f"render, untracked (contact, 2 tokens signed):  {untracked_us:7.1f} µs")
    tracked_us = per_call(render(compiled, True), n)
    print(f"render, tracked (contact, 10 tokens signed):   {tracked_us:7.1f} µs")
    slow_us = per_call(render(slow, True), max(n // 10, 1))
    print(f"render, tracked, CSS and text per message:     {slow_us:7.1f} µs")

    token = tokens.sign(TokenKind.CLICK, [1_234_567, 3])
    old = Tokens(["an-older-key-" + "x" * 40]).sign(TokenKind.CLICK, [1_234_567, 3])
    sign_us = per_call(lambda i: tokens.sign(TokenKind.CLICK, [i, 3]), n * 5)
    verify_us = per_call(lambda i: tokens.verify(TokenKind.CLICK, token), n * 5)
    old_us = per_call(lambda i: tokens.verify(TokenKind.CLICK, old), n * 5)
    print(f"token sign: {sign_us:5.2f} µs ({len(token)} characters)")
    print(f"token verify: {verify_us:5.2f} µs; signed with the older key: {old_us:5.2f} µs")


if __name__ == "__main__":
    main()
