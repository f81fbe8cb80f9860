"""Links, pixel, inlining and the text part: tracking only with consent, nothing else changed."""

from __future__ import annotations

import re
from typing import Any

import css_inline
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.render import CompiledCampaign, ContactView, RenderedMessage, compile_campaign

SENDER = {"name": "Actief Klussenservice", "postal_address": "Voorbeeldstraat 1, Utrecht"}
REASON = "You receive this because you subscribed on our website."
UNSUBSCRIBE = "https://t.example/u/UNSUB"
PREFERENCES = "https://t.example/p/PREFS"
OPEN = "https://t.example/o/OPEN"
CLICK = "https://t.example/c/"

CAMPAIGN = """\
<style>
p { margin: 0 0 12px 0; }
.button { background-color: #0a7d3b; color: #ffffff; padding: 10px; }
a { color: #ffffff; }
</style>
<a href="https://www.example.com/?utm_source=mail&amp;utm_campaign=spring"><img
   src="https://www.example.com/logo.png" alt="Logo"></a>
<p>Hello {{ contact.first_name }} from {{ contact.attributes.city }},</p>
<p><a class="button" href="https://www.example.com/book">Book a visit</a></p>
<p><a href="mailto:info@example.com">Mail us</a>, <a href="tel:+31301234567">call us</a>,
<a href="#top">back to top</a>, <a href="{{ contact.attributes.portal }}">your portal</a>,
<a href="https://www.example.com/u/{{ contact.attributes.city }}">your town</a>.</p>
<p>Read <a href='http://www.example.com/terms'>our terms</a>.</p>
"""
CAMPAIGN_LINKS = [
    "https://www.example.com/?utm_source=mail&utm_campaign=spring",
    "https://www.example.com/book",
    "http://www.example.com/terms",
]
UNTOUCHED = [
    "mailto:info@example.com",
    "tel:+31301234567",
    "#top",
    "https://portal.example.com/ann",
    "https://www.example.com/u/Delft",
]


def compile_(html: str = CAMPAIGN, *, text: str | None = None, **options: Any) -> CompiledCampaign:
    options.setdefault("track_clicks", True)
    options.setdefault("track_opens", True)
    return compile_campaign(
        html,
        text,
        "Spring, {{ contact.first_name }}",
        template_name="spring.html",
        sender=SENDER,
        reason=REASON,
        **options,
    )


ANN = ContactView(
    "ann@example.com",
    first_name="Ann",
    attributes={"city": "Delft", "portal": "https://portal.example.com/ann"},
)


def render(
    compiled: CompiledCampaign, *, tracked: bool, contact: ContactView = ANN, **extra: Any
) -> RenderedMessage:
    return compiled.render(
        {"contact": contact, **extra},
        unsubscribe_url=UNSUBSCRIBE,
        preferences_url=PREFERENCES,
        click_url=(lambda i: f"{CLICK}{i}") if tracked else None,
        open_url=OPEN if tracked else None,
    )


def hrefs(html: str) -> list[str]:
    return [h.replace("&amp;", "&") for h in re.findall(r'href="([^"]*)"', html)]


def test_the_link_table_holds_exactly_the_campaigns_links() -> None:
    assert compile_().links == CAMPAIGN_LINKS
    # Also without click tracking: the table describes the campaign, not the contact.
    assert compile_(track_clicks=False).links == CAMPAIGN_LINKS


def test_links_are_rewritten_for_a_contact_with_tracking() -> None:
    found = hrefs(render(compile_(), tracked=True).html)
    tracked = [h for h in found if h.startswith(CLICK)]
    assert tracked == [f"{CLICK}{i}" for i in range(len(CAMPAIGN_LINKS))]
    assert not set(CAMPAIGN_LINKS) & set(found)
    assert all(h in found for h in UNTOUCHED)


def test_a_contact_without_tracking_gets_the_original_links() -> None:
    message = render(compile_(), tracked=False)
    found = hrefs(message.html)
    assert all(link in found for link in CAMPAIGN_LINKS + UNTOUCHED)
    assert CLICK not in message.html and CLICK not in message.text
    # The source's own entity encoding is kept valid: a bare "&" never appears in an href.
    assert "utm_source=mail&amp;utm_campaign=spring" in message.html


def test_a_campaign_without_click_tracking_ignores_click_url() -> None:
    message = render(compile_(track_clicks=False), tracked=True)
    assert CLICK not in message.html and CLICK not in message.text
    assert all(link in hrefs(message.html) for link in CAMPAIGN_LINKS)


def test_footer_links_are_never_rewritten() -> None:
    for tracked in (True, False):
        message = render(compile_(), tracked=tracked)
        assert hrefs(message.html).count(UNSUBSCRIBE) == 1
        assert hrefs(message.html).count(PREFERENCES) == 1
        assert UNSUBSCRIBE in message.text and PREFERENCES in message.text


def test_click_url_is_asked_only_for_links_in_the_table() -> None:
    asked: list[int] = []

    def click_url(index: int) -> str:
        asked.append(index)
        return f"{CLICK}{index}"

    compile_().render(
        {"contact": ANN},
        unsubscribe_url=UNSUBSCRIBE,
        preferences_url=PREFERENCES,
        click_url=click_url,
        open_url=None,
    )
    assert sorted(asked) == list(range(len(CAMPAIGN_LINKS)))  # once each: HTML and text share


def test_comments_around_template_code_stay_comments() -> None:
    source = "<p>a<!--{{ contact.first_name }}--> <!-- {{ contact.email }} --></p>"
    for precompute in (True, False):
        html = render(compile_(source, precompute=precompute), tracked=False).html
        assert "<p>a<!--Ann--> <!-- ann@example.com --></p>" in html


def test_the_pixel_comes_only_with_an_open_url() -> None:
    pixel = f'<img src="{OPEN}" width="1" height="1" alt=""'
    tracked = render(compile_(), tracked=True).html
    assert pixel in tracked
    assert tracked.index(pixel) < tracked.index("</body>")
    assert tracked.index(pixel) > tracked.index(UNSUBSCRIBE)
    assert "/o/" not in render(compile_(), tracked=False).html
    assert OPEN not in render(compile_(track_opens=False), tracked=True).html


def test_the_text_part_has_the_personal_content_links_and_unsubscribe_url() -> None:
    compiled = compile_()
    assert compiled.text_derived_once
    text = render(compiled, tracked=True).text
    assert "Hello Ann from Delft," in text
    assert f"[Book a visit]({CLICK}1)" in text
    assert UNSUBSCRIBE in text and PREFERENCES in text
    assert "<p>" not in text and "<a " not in text
    clean = render(compiled, tracked=False).text
    assert "[Book a visit](https://www.example.com/book)" in clean


def test_a_given_text_template_is_used_with_the_footer() -> None:
    compiled = compile_(text="Hi {{ contact.first_name }}, see https://www.example.com/book")
    text = render(compiled, tracked=True).text
    assert text.startswith("Hi Ann, see https://www.example.com/book\n\n")
    assert UNSUBSCRIBE in text


def test_a_text_part_derived_per_message_is_still_complete() -> None:
    # |safe may print markup, so the text cannot be derived from the template once.
    compiled = compile_(
        "<p>Hi {{ contact.first_name|safe }}</p><p><a href='https://x.example/'>Go</a></p>"
    )
    assert not compiled.text_derived_once
    text = render(compiled, tracked=True).text
    assert "Hi Ann" in text and f"[Go]({CLICK}0)" in text and UNSUBSCRIBE in text


def test_css_is_inlined_once_at_compile_time() -> None:
    compiled = compile_()
    assert compiled.css_inlined_once, compiled.notes
    html = render(compiled, tracked=True).html
    assert 'class="button" href="https://t.example/c/1" style="background-color: #0a7d3b;' in html
    assert "<style>" not in html


def test_campaign_css_never_restyles_the_footer() -> None:
    # The campaign makes its links white; the footer's unsubscribe link must stay visible.
    for precompute in (True, False):
        html = render(compile_(precompute=precompute), tracked=True).html
        footer = html[html.index(REASON) :]
        assert "color: #ffffff" not in footer
        assert "color:#555555" in footer


@pytest.mark.parametrize(
    ("css", "why"),
    [
        ("td + td { color: red; }", "selectors"),
        ("tr:nth-child(2) td { color: red; }", "selectors"),
        ("a[href^='https'] { color: red; }", "selectors"),
        ("p:first-child { color: red; }", "selectors"),
    ],
)
def test_css_that_depends_on_structure_is_inlined_per_message(css: str, why: str) -> None:
    compiled = compile_(f"<style>{css}</style><table><tr><td>a</td><td>b</td></tr></table><p>x</p>")
    assert not compiled.css_inlined_once
    assert any(why in note for note in compiled.notes)
    render(compiled, tracked=True)


def test_template_code_in_a_class_is_inlined_per_message() -> None:
    compiled = compile_(
        '<style>.vip { color: gold; }</style><p class="{{ contact.attributes.level }}">Hello</p>'
    )
    assert not compiled.css_inlined_once
    html = render(
        compiled, tracked=False, contact=ContactView("a@x.org", attributes={"level": "vip"})
    ).html
    assert '<p class="vip" style="color: gold;">Hello</p>' in html


def test_a_full_document_keeps_its_frame_and_gets_the_footer() -> None:
    document = """<!DOCTYPE html>
<html lang="nl"><head><title>Lente</title><style>h1 { color: green; }</style></head>
<body style="background: #eeeeee;"><h1>Hallo {{ contact.first_name }}</h1>
<a href="https://www.example.com/">site</a></body></html>"""
    compiled = compile_(document)
    assert compiled.links == ["https://www.example.com/"]
    html = render(compiled, tracked=True).html
    assert "<title>Lente</title>" in html and 'lang="nl"' in html
    assert '<h1 style="color: green;">Hallo Ann</h1>' in html
    assert (
        html.index("Hallo Ann") < html.index(UNSUBSCRIBE) < html.index(OPEN) < html.index("</body>")
    )
    assert html.count("<body") == 1


@pytest.mark.parametrize(
    "source",
    [
        CAMPAIGN,
        """<style>.offers td { padding: 4px; } .price { font-weight: bold; }</style>
<table class="offers">
{% for name, price in offers %}
<tr><td>{{ name }}</td><td class="price">{{ price }}</td></tr>
{% endfor %}
</table>""",
        """<style>li { color: #333333; } .note { font-size: 12px; }</style>
<ul>{% for name, price in offers -%}
  <li>{{ name }}{% if price > 50 %} <span class="note">(premium)</span>{% endif %}</li>
{%- endfor %}</ul>
{%- if contact.first_name %}<p class="note">Hi {{ contact.first_name }}</p>
{%- else %}<p>Hi!</p>{% endif %}""",
        """<!DOCTYPE html><html><head>
<style>body { color: #111111; } h1 { margin: 0; }</style></head>
<body><h1>{{ contact.first_name }} &amp; co &#123;&#123;</h1>
{% raw %}<p>{{ literally }}</p>{% endraw %}
{% set total = offers|length %}<p title="{{ total }} offers">{{ total }}</p></body></html>""",
        """<style>p { color: #222222; }</style>
<p>Hi<!--{{ contact.first_name }}--></p><!-- {{ contact.email }} -->
<!--[if mso]><table><tr><td><a href="https://x.example/mso">{{ contact.first_name }}</a>
</td></tr></table><![endif]-->
<title>{{ contact.first_name }}</title><p>{{ offers|length }}</p>""",
    ],
)
@settings(max_examples=25, deadline=None)
@given(
    name=st.text(alphabet=st.sampled_from("aZ <>&\"'{}%#é\u00a0"), max_size=12),
    offers=st.lists(
        st.tuples(st.text(alphabet="ab<&", max_size=5), st.integers(min_value=0, max_value=99)),
        max_size=3,
    ),
)
def test_inlining_once_gives_what_inlining_every_message_gives(
    source: str, name: str, offers: list[tuple[str, int]]
) -> None:
    contact = ContactView(
        "ann@example.com",
        first_name=name,
        attributes={"city": name, "portal": "https://portal.example.com/x"},
    )
    fast, slow = compile_(source), compile_(source, precompute=False)
    assert fast.css_inlined_once, fast.notes
    for tracked in (True, False):
        once = render(fast, tracked=tracked, contact=contact, offers=offers)
        each = render(slow, tracked=tracked, contact=contact, offers=offers)
        assert _normalised(once.html) == _normalised(each.html)
        assert once.subject == each.subject


_REPARSE = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)


def _normalised(html: str) -> str:
    """The document as a parser reads it, row groups merged: serialisation details aside."""
    return re.sub(r"</?tbody>", "", _REPARSE.inline(html))


@pytest.mark.parametrize(
    "source",
    [
        # <div> closes the open <p>: the statement's two ends sit in different elements.
        "<style>p { color: red; } div p { color: blue; }</style>"
        "<p>Intro {% if vip %}<div>box</div>{% endif %} more</p><p>end</p>",
        # The statement swaps one paragraph for another halfway through.
        '<style>.a span { color: red; }</style><p class="a">x {% if vip %}</p><p class="b">'
        "{% endif %}<span>s</span></p>",
    ],
)
def test_statements_that_cross_elements_are_inlined_per_message(source: str) -> None:
    fast, slow = compile_(source), compile_(source, precompute=False)
    assert not fast.css_inlined_once
    for vip in (True, False):
        once = render(fast, tracked=False, vip=vip)
        each = render(slow, tracked=False, vip=vip)
        assert _normalised(once.html) == _normalised(each.html)
