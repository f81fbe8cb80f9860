"""Campaign templates run sandboxed: no Python internals, no silent blanks, clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from mailer.errors import BadInput, ConfigError
from mailer.render import (
    CompiledCampaign,
    ContactView,
    Layout,
    RenderedMessage,
    TemplateError,
    compile_campaign,
)

SENDER = {"name": "Actief Klussenservice", "postal_address": "Voorbeeldstraat 1, Utrecht"}
REASON = "You receive this because you subscribed on our website."


def compile_(
    html: str, *, text: str | None = None, subject: str = "Hello", **options: Any
) -> CompiledCampaign:
    options.setdefault("track_clicks", True)
    options.setdefault("track_opens", True)
    return compile_campaign(
        html,
        text,
        subject,
        template_name="spring.html",
        sender=SENDER,
        reason=REASON,
        text_template_name="spring.txt",
        **options,
    )


def render(compiled: CompiledCampaign, contact: ContactView | None = None) -> RenderedMessage:
    contact = contact or ContactView(
        "ann@example.com", first_name="Ann", attributes={"city": "Delft"}
    )
    return compiled.render(
        {"contact": contact, "campaign": {"name": "spring"}},
        unsubscribe_url="https://t.example/u/TOKEN",
        preferences_url="https://t.example/p/TOKEN",
        click_url=lambda i: f"https://t.example/c/{i}",
        open_url="https://t.example/o/TOKEN",
    )


SSTI = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__dict__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ contact.__class__.__init__.__globals__ }}",
    "{{ contact|attr('__class__') }}",
    "{{ (contact|attr('__class__')|attr('__mro__')) }}",
    "{{ contact.attributes._values }}",
    "{{ ''.format.__globals__ }}",
    "{{ '{0.__class__}'.format(contact) }}",
    "{{ 'x' * 100000000 }}",
    "{{ 10 ** 100000000 }}",
    "{{ range.__self__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{% set x = ''.__class__ %}{{ x }}",
]


@pytest.mark.parametrize("payload", SSTI)
def test_template_code_reaching_for_internals_fails_in_the_html(payload: str) -> None:
    compiled = compile_(f"<p>Hello</p>\n<p>{payload}</p>")
    with pytest.raises(TemplateError) as error:
        render(compiled)
    assert error.value.template == "spring.html"
    assert error.value.line == 2
    assert "spring.html, line 2" in str(error.value)


@pytest.mark.parametrize("payload", SSTI[:6])
def test_template_code_reaching_for_internals_fails_in_subject_and_text(payload: str) -> None:
    with pytest.raises(TemplateError, match="subject"):
        render(compile_("<p>Hi</p>", subject=f"Hi {payload}"))
    with pytest.raises(TemplateError, match=r"spring\.txt, line 3"):
        render(compile_("<p>Hi</p>", text=f"Hi\n\n{payload}"))


def test_attribute_access_to_dunders_names_the_refusal() -> None:
    with pytest.raises(TemplateError, match="unsafe template code refused"):
        render(compile_("{{ ''.__class__ }}"))


def test_the_template_environment_has_no_config_or_request() -> None:
    for name in ("config", "request", "settings", "os", "lipsum"):
        with pytest.raises(TemplateError, match="undefined"):
            render(compile_(f"<p>{{{{ {name} }}}}</p>"))


def test_a_missing_variable_is_an_error_not_an_empty_string() -> None:
    with pytest.raises(TemplateError, match=r"spring\.html, line 3: undefined.*'nickname'"):
        render(compile_("<p>a</p>\n<p>b</p>\n<p>Hello {{ contact.nickname }}</p>"))


def test_a_missing_custom_attribute_is_an_error() -> None:
    with pytest.raises(TemplateError, match="'shoe_size'"):
        render(compile_("<p>{{ contact.attributes.shoe_size }}</p>"))
    message = render(compile_("<p>{{ contact.attributes.city }}</p>"))
    assert "Delft" in message.html


def test_a_missing_variable_in_a_condition_is_an_error() -> None:
    with pytest.raises(TemplateError, match="undefined"):
        render(compile_("{% if vip %}<p>VIP</p>{% endif %}"))


def test_an_error_inside_a_loop_names_its_own_line() -> None:
    source = (
        "<ul>\n{% for i in range(2) %}\n<li>\n{{ i.real }} {{ nothing }}\n</li>\n{% endfor %}</ul>"
    )
    with pytest.raises(TemplateError, match=r"spring\.html, line 4"):
        render(compile_(source))


def test_a_multi_line_expression_reports_the_line_of_the_failing_part() -> None:
    source = "<p>\n{{ contact.first_name\n   ~ contact.nope }}</p>"
    with pytest.raises(TemplateError, match=r"spring\.html, line [23]"):
        render(compile_(source))


@pytest.mark.parametrize(
    ("html", "text", "subject", "where"),
    [
        ("<p>a</p>\n<p>{{ contact.first_name </p>", None, "Hi", "spring.html, line 2"),
        ("<p>a</p>\n\n{% if x %}<p>never closed</p>", None, "Hi", "spring.html, line 3"),
        ("<p>a</p>\n{% endfor %}", None, "Hi", "spring.html, line 2"),
        ("<p>a</p>\n{{ }}", None, "Hi", "spring.html, line 2"),
        ("<p>a</p>", "ok\n{{ x | }}", "Hi", "spring.txt, line 2"),
        ("<p>a</p>", None, "Hi {{ contact.first_name", "subject, line 1"),
    ],
)
def test_a_syntax_error_names_the_file_and_line(
    html: str, text: str | None, subject: str, where: str
) -> None:
    with pytest.raises(TemplateError) as error:
        compile_(html, text=text, subject=subject)
    assert str(error.value).startswith(where + ": ")


def test_a_template_error_is_bad_input() -> None:
    assert issubclass(TemplateError, BadInput)


def test_autoescape_escapes_a_contact_name_in_the_html() -> None:
    evil = ContactView("eve@example.com", first_name='<script>alert("x")</script>', last_name="&")
    message = render(
        compile_(
            "<p>Hello {{ contact.first_name }} {{ contact.name }}</p>",
            subject="Hi {{ contact.first_name }}",
        ),
        evil,
    )
    assert "<script>" not in message.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in message.html
    # The text part and the subject are not HTML: they carry the name as written.
    assert '<script>alert("x")</script>' in message.text
    assert message.subject == 'Hi <script>alert("x")</script>'


def test_autoescape_also_covers_attribute_values() -> None:
    evil = ContactView("eve@example.com", first_name='"><img src=x onerror=alert(1)>')
    message = render(
        compile_('<a title="{{ contact.first_name }}" href="https://x.example/">x</a>'), evil
    )
    assert "<img src=x" not in message.html
    assert "onerror" in message.html  # as text inside the attribute, quotes escaped


def test_a_subject_that_renders_a_line_break_is_refused() -> None:
    injected = ContactView("eve@example.com", first_name="Eve\r\nBcc: all@example.com")
    with pytest.raises(TemplateError, match=r"subject.*line break"):
        render(compile_("<p>Hi</p>", subject="Hello {{ contact.first_name }}"), injected)


def test_a_subject_template_with_a_line_break_is_refused() -> None:
    with pytest.raises(TemplateError, match="subject"):
        compile_("<p>Hi</p>", subject="Hello\nBcc: all@example.com")


def test_the_subject_is_available_to_the_html() -> None:
    message = render(compile_("<p>x</p>", subject="Spring for {{ contact.first_name }}"))
    assert message.subject == "Spring for Ann"
    assert "<title>Spring for Ann</title>" in message.html


def test_missing_optional_contact_fields_render_empty_not_none() -> None:
    message = render(
        compile_("<p>[{{ contact.first_name }}][{{ contact.last_name }}][{{ contact.name }}]</p>"),
        ContactView("bob@example.com"),
    )
    assert "[][][]" in message.html
    assert "None" not in message.html


def test_custom_attributes_named_like_dict_methods_are_reachable() -> None:
    contact = ContactView("a@example.com", attributes={"items": "three", "update": "weekly"})
    message = render(
        compile_("<p>{{ contact.attributes.items }} {{ contact.attributes.update }}</p>"), contact
    )
    assert "three weekly" in message.html


def test_a_callback_error_is_not_disguised_as_a_template_error() -> None:
    compiled = compile_('<a href="https://x.example/">x</a>')

    def broken(index: int) -> str:
        raise RuntimeError("token service down")

    with pytest.raises(RuntimeError, match="token service down"):
        compiled.render(
            {"contact": ContactView("a@example.com")},
            unsubscribe_url="u",
            preferences_url="p",
            click_url=broken,
            open_url=None,
        )


@pytest.mark.parametrize("sender", [{}, {"name": "Shop"}, {"name": "Shop", "postal_address": " "}])
def test_every_mail_needs_a_sender_name_and_postal_address(sender: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        compile_campaign(
            "<p>x</p>",
            None,
            "Hi",
            template_name="x.html",
            sender=sender,
            reason=REASON,
            track_clicks=False,
            track_opens=False,
        )


def test_the_footer_names_sender_reason_and_ways_out() -> None:
    message = render(compile_("<p>x</p>"))
    for part in (message.html, message.text):
        assert "Actief Klussenservice" in part
        assert "Voorbeeldstraat 1, Utrecht" in part
        assert REASON in part
        assert "https://t.example/u/TOKEN" in part
        assert "https://t.example/p/TOKEN" in part


def test_the_footer_speaks_dutch_to_dutch_contacts() -> None:
    message = render(compile_("<p>x</p>"), ContactView("a@example.nl", locale="nl-NL"))
    assert "Afmelden" in message.html and "Afmelden" in message.text
    assert '<html lang="nl">' in message.html


@pytest.mark.parametrize(
    "statement",
    [
        '{% include "mail/footer.html" %}',
        '{% extends "base.html" %}',
        '{% import "macros.html" as m %}',
        '{% from "macros.html" import button %}',
    ],
)
def test_templates_cannot_reach_other_files(statement: str) -> None:
    with pytest.raises(TemplateError, match=r"spring\.html, line 2: .*include"):
        compile_(f"<p>x</p>\n{statement}")


@dataclass(frozen=True)
class Row:
    email: str
    name: str | None
    first_name: str | None
    last_name: str | None
    locale: str | None
    attributes: dict[str, Any]


@pytest.mark.parametrize(
    "contact",
    [
        Row("ann@example.com", None, "Ann", None, None, {"items": "3"}),
        {"email": "ann@example.com", "first_name": "Ann", "attributes": {"items": "3"}},
    ],
)
def test_any_contact_record_is_seen_through_the_same_view(contact: Any) -> None:
    compiled = compile_(
        "<p>[{{ contact.first_name }}|{{ contact.last_name }}|{{ contact.name }}]"
        "[{{ contact.attributes.items }}]</p>"
    )
    message = compiled.render(
        {"contact": contact},
        unsubscribe_url="u",
        preferences_url="p",
        click_url=None,
        open_url=None,
    )
    assert "[Ann||Ann][3]" in message.html


def test_a_custom_layout_needs_both_slots() -> None:
    builtin = Layout.builtin()
    broken = Layout(html=builtin.html.replace("{{ footer }}", ""), footer_html="", footer_text="")
    with pytest.raises(
        TemplateError, match=r"mail/layout\.html: the layout has no \{\{ footer \}\}"
    ):
        compile_("<p>x</p>", layout=broken)


def test_a_custom_layout_wraps_the_campaign() -> None:
    layout = Layout(
        html="<html><body><main>{{ body }}</main><footer>{{ footer }}</footer></body></html>",
        footer_html="<p>{{ sender.name }} <a href='{{ unsubscribe_url }}'>out</a></p>",
        footer_text="{{ sender.name }}: {{ unsubscribe_url }}",
    )
    message = render(compile_("<p>Hi {{ contact.first_name }}</p>", layout=layout))
    assert "<main><p>Hi Ann</p></main><footer><p>Actief Klussenservice" in message.html
    assert message.text.endswith("Actief Klussenservice: https://t.example/u/TOKEN")
