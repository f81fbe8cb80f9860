"""Campaign rendering: sandboxed Jinja, the mail layout, link rewriting and the open pixel.

`compile_campaign()` does the expensive work once per campaign; `CompiledCampaign.render()`
runs once per contact and must stay cheap (the runner's budget is well under 300 µs).

Compile time, on the template *source*:

- Syntax is checked on each original source, so errors name the campaign file and line.
- The source is split, with Jinja's own lexer, into literal text and Jinja code. The code is
  replaced by inert marker words, which lets HTML tools (a parser, css-inline, inscriptis)
  work on a template as if it were a document; the code is put back afterwards.
- Every static `http(s)` `href` of an `<a>` in the campaign becomes an entry of `links` and a
  call `_mailer_href(i)`, which renders the click URL for contacts with tracking and the
  original URL for everyone else. Footer links never pass through this step.
- CSS is inlined once, on the marked template, when that is provably the same as inlining
  every rendered message (argued in `_why_not_inline_once`); otherwise per message.
- Unless a text template is given, the text part is derived once from the HTML template
  with inscriptis (per message it costs about 300 µs), again with a per-message fallback.

Every final template remembers where each of its lines came from, so a runtime error
(undefined variable, unsafe attribute) names the original file and line.
"""

from __future__ import annotations

import functools
import html
import itertools
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import css_inline
from inscriptis import get_text  # type: ignore[import-untyped]
from inscriptis.model.config import ParserConfig  # type: ignore[import-untyped]
from jinja2 import StrictUndefined, Template, nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

from mailer.errors import BadInput, ConfigError

__all__ = [
    "CompiledCampaign",
    "ContactView",
    "Layout",
    "RenderedMessage",
    "TemplateError",
    "TemplateValues",
    "compile_campaign",
]


class TemplateError(BadInput):
    """A template that cannot be compiled or rendered, or code that reaches for internals."""

    def __init__(self, reason: str, *, template: str | None = None, line: int | None = None):
        where = f"{template}, line {line}" if template and line else template
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.template = template
        self.line = line


# --- the sandbox -----------------------------------------------------------------------------

# Sandboxing stops templates reaching Python internals; these bounds stop the cheapest ways of
# exhausting memory (`'x' * 10**9`, `10 ** 10**9`). range() is already capped by Jinja.
MAX_REPEAT_LENGTH = 100_000
MAX_EXPONENT = 1_000


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_REPEAT_LENGTH
                ):
                    raise SecurityError(f"repetition longer than {MAX_REPEAT_LENGTH} items")
        return super().call_binop(context, operator, left, right)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # The general check costs microseconds per lookup (isinstance against a dozen types
        # and ABCs); for the value types below it always comes down to this.
        if type(obj) in _VIEWS:
            return not attr.startswith("_")
        return bool(super().is_safe_attribute(obj, attr, value))


def _environment(autoescape: bool) -> _Sandbox:
    env = _Sandbox(autoescape=autoescape, undefined=StrictUndefined, auto_reload=False)
    del env.globals["lipsum"]  # Lorem ipsum has no place in a sent mail
    return env


_HTML = _environment(autoescape=True)
_TEXT = _environment(autoescape=False)


# --- template values -------------------------------------------------------------------------


class TemplateValues:
    """Read-only named values for templates: `contact.attributes.KEY` (or `["KEY"]`), `sender`.

    A plain dict would shadow keys such as `items` or `update` with its methods.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values: Mapping[str, Any] = values or {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class ContactView:
    """`contact` as templates see it: plain read-only values, missing ones as "".

    Templates get this rather than a database row: nothing on it reaches a session or a
    method with side effects, and an absent first name renders as "" rather than "None".
    """

    __slots__ = ("attributes", "email", "first_name", "last_name", "locale", "name")

    def __init__(
        self,
        email: str,
        *,
        name: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        locale: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self.email = email
        self.first_name = first_name or ""
        self.last_name = last_name or ""
        self.name = name or " ".join(p for p in (self.first_name, self.last_name) if p)
        self.locale = locale or ""
        self.attributes = TemplateValues(attributes)

    @classmethod
    def of(cls, contact: Any) -> ContactView:
        """From a mapping or an object with `email` and any of the other fields."""
        if isinstance(contact, ContactView):
            return contact
        email = _field(contact, "email")
        if not isinstance(email, str):
            raise TypeError(f"a template contact needs an email address, got {contact!r}")
        return cls(
            email,
            name=_field(contact, "name"),
            first_name=_field(contact, "first_name"),
            last_name=_field(contact, "last_name"),
            locale=_field(contact, "locale"),
            attributes=_field(contact, "attributes"),
        )


def _field(contact: Any, name: str) -> Any:
    return contact.get(name) if isinstance(contact, Mapping) else getattr(contact, name, None)


_VIEWS = frozenset({ContactView, TemplateValues})


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class Layout:
    """The frame around every campaign.

    `html` is a full document with `{{ body }}` where a campaign fragment goes and
    `{{ footer }}` where `footer_html` goes (a campaign that is a full document keeps its own
    frame and gets the footer before its `</body>`). `footer_text` ends every text part.
    """

    html: str
    footer_html: str
    footer_text: str
    html_name: str = "mail/layout.html"
    footer_html_name: str = "mail/footer.html"
    footer_text_name: str = "mail/footer.txt"

    @classmethod
    def builtin(cls) -> Layout:
        """The layout in mailer/templates/mail/."""
        return _builtin_layout()


@functools.cache
def _builtin_layout() -> Layout:
    folder = resources.files("mailer") / "templates" / "mail"
    return Layout(
        html=(folder / "layout.html").read_text("utf-8"),
        footer_html=(folder / "footer.html").read_text("utf-8"),
        footer_text=(folder / "footer.txt").read_text("utf-8"),
    )


# --- template pieces -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Piece:
    """Literal text (origin None) or Jinja code with the template and line it came from."""

    text: str
    origin: tuple[str, int | None] | None = None


_CODE_END = {"variable_begin": "variable_end", "block_begin": "block_end"}
_CODE_END["comment_begin"] = "comment_end"


def _parse(env: _Sandbox, source: str, name: str) -> nodes.Template:
    try:
        tree = env.parse(source, name=name)
    except TemplateSyntaxError as exc:
        raise TemplateError(exc.message or "syntax error", template=name, line=exc.lineno) from exc
    # There is no template loader: a campaign is its own files, nothing else on the disk.
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        reason = "templates cannot extend, include or import other templates"
        raise TemplateError(reason, template=name, line=node.lineno)
    return tree


def _split(env: _Sandbox, source: str, name: str) -> list[_Piece]:
    """Literal text and Jinja code, in order, exactly as Jinja's lexer sees them.

    Whitespace removed by `{%-`/`-%}` is already gone from the literal text; `{% raw %}`
    blocks become the literal text they stand for.
    """
    pieces: list[_Piece] = []
    code: list[str] = []
    end: str | None = None
    line = 0
    for lineno, kind, value in env.lexer.tokeniter(source, name):
        if end is not None:
            code.append(value)
            if kind == end:
                pieces.append(_Piece("".join(code), (name, line)))
                end = None
        elif kind in _CODE_END:
            end, code, line = _CODE_END[kind], [value], lineno
        elif kind == "data":
            if pieces and pieces[-1].origin is None:
                pieces[-1] = _Piece(pieces[-1].text + value)
            else:
                pieces.append(_Piece(value))
        elif kind not in ("raw_begin", "raw_end"):
            raise AssertionError(f"unexpected kind {kind} outside Jinja code")
    return pieces


# A literal "{" that would open Jinja code once the template is put back together (HTML tools
# decode `&#123;` to "{") is written as Jinja code printing "{".
_OPENING_BRACE = re.compile(r"\{(?=[{%#]|\Z)")


@dataclass(frozen=True, slots=True)
class _Source:
    text: str
    lines: Mapping[int, tuple[str, int | None]]


def _assemble(pieces: Sequence[_Piece]) -> _Source:
    out: list[str] = []
    lines: dict[int, tuple[str, int | None]] = {}
    current = 1
    for piece in pieces:
        if piece.origin is None:
            text = _OPENING_BRACE.sub("{{ '{' }}", piece.text)
        else:
            text = piece.text
            name, line = piece.origin
            for i in range(text.count("\n") + 1):
                lines.setdefault(current + i, (name, None if line is None else line + i))
        out.append(text)
        current += text.count("\n")
    return _Source("".join(out), lines)


class _Callback(Exception):
    """An exception raised by a caller's callback (click_url) while a template ran."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


class _Compiled:
    """A final template and the map from its lines back to the original templates."""

    _serials = itertools.count(1)

    def __init__(self, env: _Sandbox, source: _Source, name: str) -> None:
        self.name = name
        # Unique, so a traceback frame of this template is told apart from any other's.
        self.filename = f"<mailer template {next(self._serials)}: {name}>"
        self.lines = source.lines
        code = env.compile(source.text, name=name, filename=self.filename)
        self.template: Template = env.template_class.from_code(
            env, code, env.make_globals(None), None
        )

    def render(self, values: Mapping[str, Any]) -> str:
        try:
            return self.template.render(values)
        except _Callback as exc:
            raise exc.original from None
        except Exception as exc:
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> TemplateError:
        if isinstance(exc, SecurityError):
            reason = f"unsafe template code refused: {exc}"
        elif isinstance(exc, UndefinedError):
            reason = f"undefined value: {exc}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        line = None
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.filename:
                line = tb.tb_lineno
            tb = tb.tb_next
        name, original = self.lines.get(line, (self.name, None)) if line else (self.name, None)
        return TemplateError(reason, template=name, line=original)


def _compile(env: _Sandbox, pieces: Sequence[_Piece], name: str) -> _Compiled:
    return _Compiled(env, _assemble(pieces), name)


# --- markers: Jinja code as inert words ------------------------------------------------------


class _Marked:
    """Jinja code replaced by marker words (or HTML comments holding them) and back.

    A marker is `jm<nonce>x<index>x`: lower case, so HTML parsers keep it intact; the nonce is
    chosen so that no source contains it. The comment form `<!--jm<nonce>xc<index>x-->` is
    told apart from a comment the template itself wraps around code (`<!--{{ x }}-->`).
    """

    def __init__(self, sources: Sequence[str]) -> None:
        while True:
            prefix = f"jm{secrets.token_hex(4)}x"
            if not any(prefix in source for source in sources):
                break
        self.prefix = prefix
        self.code: list[_Piece] = []
        self.word = re.compile(rf"{prefix}(\d+)x")
        self.any = re.compile(rf"<!--{prefix}c(\d+)x-->|{prefix}(\d+)x")
        self.either = re.compile(rf"{prefix}c?(\d+)x")  # inside a comment's text, too

    def add(self, piece: _Piece) -> str:
        self.code.append(piece)
        return f"{self.prefix}{len(self.code) - 1}x"

    def mark(self, pieces: Sequence[_Piece]) -> str:
        return "".join(p.text if p.origin is None else self.add(p) for p in pieces)

    def order(self, text: str) -> list[int]:
        return [int(m.group(1) or m.group(2)) for m in self.any.finditer(text)]

    def unmark(
        self, text: str, replace: Mapping[int, Sequence[_Piece]] | None = None
    ) -> list[_Piece]:
        out: list[_Piece] = []
        pos = 0
        for m in self.any.finditer(text):
            if m.start() > pos:
                out.append(_Piece(text[pos : m.start()]))
            index = int(m.group(1) or m.group(2))
            out.extend(replace[index] if replace and index in replace else [self.code[index]])
            pos = m.end()
        if pos < len(text):
            out.append(_Piece(text[pos:]))
        return out


# Where a marker sits in an HTML document.
_DATA, _RCDATA, _STYLE, _SCRIPT, _COMMENT, _TAG, _OTHER = (
    "data",
    "rcdata",
    "style",
    "script",
    "comment",
    "tag",
    "other",
)
_TEXT_ELEMENTS = {"title": _RCDATA, "textarea": _RCDATA, "style": _STYLE, "script": _SCRIPT}
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
    | {"source", "track", "wbr"}
)


class _Scan(HTMLParser):
    """One pass over a marked document: marker contexts, links, styles, `</body>`, nesting.

    `stacks` records, for each marker, the open elements around it (by identity); it is exact
    on well-formed HTML such as css-inline's output, which is where it is used.
    """

    def __init__(self, marked: _Marked, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self._marked = marked
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._in: str | None = None
        self._stack: list[tuple[str, int]] = []
        self._serial = 0
        self.contexts: dict[int, str] = {}
        self.stacks: dict[int, tuple[int, ...]] = {}
        self.parents: dict[int, str] = {}
        self.anchors: list[tuple[int, str]] = []
        self.styles: list[str] = []
        self.document = False
        self.body_end: int | None = None
        self.feed(text)
        self.close()

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._starts[line - 1] + column

    def _note(self, text: str | None, context: str) -> None:
        if not text:
            return
        snapshot = tuple(serial for name, serial in self._stack if name != "tbody")
        parent = self._stack[-1][0] if self._stack else ""
        for m in self._marked.either.finditer(text):
            index = int(m.group(1))
            self.contexts.setdefault(index, context)
            self.stacks.setdefault(index, snapshot)
            self.parents.setdefault(index, parent)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs)
        if tag in _TEXT_ELEMENTS:
            self._in = tag
        if tag not in _VOID:
            self._serial += 1
            self._stack.append((tag, self._serial))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._note(tag, _TAG)
        for name, value in attrs:
            self._note(name, _TAG)
            self._note(value, f"attr:{name}")
        if tag in ("html", "head", "body"):
            self.document = True
        elif tag == "a":  # not <area>: image maps are rare in mail, not worth a redirect
            self.anchors.append((self._offset(), self.get_starttag_text() or ""))

    def handle_endtag(self, tag: str) -> None:
        self._note(tag, _TAG)
        if tag == "body":
            self.body_end = self._offset()
        if tag == self._in:
            self._in = None
        for depth in range(len(self._stack) - 1, -1, -1):
            if self._stack[depth][0] == tag:
                del self._stack[depth:]
                break

    def handle_data(self, data: str) -> None:
        context = _TEXT_ELEMENTS.get(self._in or "", _DATA)
        if context == _STYLE:
            self.styles.append(data)
        self._note(data, context)

    def handle_comment(self, data: str) -> None:
        self._note(data, _COMMENT)

    def handle_decl(self, decl: str) -> None:
        self.document = True
        self._note(decl, _OTHER)

    def unknown_decl(self, data: str) -> None:
        self._note(data, _OTHER)

    def handle_pi(self, data: str) -> None:
        self._note(data, _OTHER)


# --- link rewriting --------------------------------------------------------------------------

_TAG_NAME = re.compile(r"<[^\s/>]+")
_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s"'=<>`]+))?""")
_TRACKED_SCHEMES = ("http", "https")


def _trackable(value: str) -> str | None:
    """The URL behind a static href value, if it is one a click redirect may lead to."""
    url = html.unescape(value).strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme.lower() in _TRACKED_SCHEMES and parts.netloc else None


def _rewrite_links(
    marked: _Marked, text: str, name: str, *, rewrite: bool
) -> tuple[str, list[str]]:
    """The link table; with `rewrite`, static http(s) hrefs of `<a>` become `_mailer_href(i)`."""
    links: list[str] = []
    edits: list[tuple[int, int, str]] = []
    for offset, tag in _Scan(marked, text).anchors:
        start = _TAG_NAME.match(tag)
        for attribute in _ATTRIBUTE.finditer(tag, start.end() if start else 0):
            if attribute.group(1).lower() != "href":
                continue
            raw = attribute.group(2)
            if raw is None:
                break
            value = raw[1:-1] if raw[0] in "\"'" else raw
            url = None if marked.word.search(value) else _trackable(value)
            if url is not None:
                if rewrite:
                    code = marked.add(_Piece(f"{{{{ _mailer_href({len(links)}) }}}}", (name, None)))
                    begin, end = offset + attribute.start(2), offset + attribute.end(2)
                    edits.append((begin, end, f'"{code}"'))
                links.append(url)
            break  # browsers use the first href only
    for begin, end, replacement in reversed(edits):
        text = text[:begin] + replacement + text[end:]
    return text, links


# --- CSS inlining ----------------------------------------------------------------------------

_INLINER = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.S)
# Selectors that match by element, class and id, through descendant and child combinators,
# plus pseudo-classes css-inline never applies (they describe interaction, not structure).
_SIMPLE_SELECTOR = re.compile(
    r"(?:[\w\-.#*\s>,]|:(?:hover|focus|active|visited|link|focus-visible|focus-within)\b"
    r"|::?(?:before|after|placeholder|selection)\b)+"
)
_CONSTRUCTS_OUTSIDE_TREE = (
    nodes.Macro,
    nodes.CallBlock,
    nodes.FilterBlock,
    nodes.AssignBlock,
    nodes.Include,
    nodes.Import,
    nodes.FromImport,
    nodes.Extends,
    nodes.Block,
)
_MARKUP_FILTERS = frozenset({"safe", "urlize", "xmlattr"})
_STATEMENT = re.compile(r"\{%[-+]?\s*(\w+)")
_OPENS = {"if": "endif", "for": "endfor", "with": "endwith"}
_CONTINUES = {"elif": ("endif",), "else": ("endif", "endfor")}
_SIMPLE_STATEMENTS = frozenset({"set"})


def _selectors_are_context_free(styles: Sequence[str]) -> bool:
    css = _CSS_COMMENT.sub("", "".join(styles))
    depth, start = 0, 0
    selectors: list[str] = []
    skipping = False  # inside an at-rule: css-inline keeps those and inlines none of them
    for i, char in enumerate(css):
        if char == "{":
            if depth == 0:
                head = css[start:i].strip()
                skipping = head.startswith("@")
                if not skipping:
                    selectors.append(head)
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                start = i + 1
        elif char == ";" and depth == 0:
            start = i + 1  # @import, @charset
    return depth == 0 and all(_SIMPLE_SELECTOR.fullmatch(s) for s in selectors)


def _emits_markup(tree: nodes.Template) -> bool:
    """Whether code may print HTML elements: output not escaped, or built as markup."""
    if any(
        isinstance(n, nodes.Filter) and n.name in _MARKUP_FILTERS
        for n in tree.find_all(nodes.Filter)
    ):
        return True
    return any(
        True for _ in tree.find_all((nodes.ScopedEvalContextModifier, nodes.EvalContextModifier))
    )


def _why_not_inline_once(
    marked: _Marked, scan: _Scan, trees: Sequence[nodes.Template]
) -> str | None:
    """None when inlining the marked template is the same as inlining every rendering of it.

    Argument: css-inline gives an element the declarations of the rules whose selectors match
    it. Selectors here are restricted to element names, classes and ids joined by descendant
    and child combinators, so whether one matches depends only on the element and its
    ancestors. Template code never creates elements (no unescaped output), never stands where
    a tag, a class, an id or a style attribute is written, and never moves markup elsewhere
    (no macros, blocks or captured output). Every if/for statement opens and closes inside the
    same element (checked on the inliner's own tree, below), so repeating or leaving out its
    body removes or repeats whole subtrees without changing any other element's ancestors.
    Hence every element of every rendering gets exactly the declarations its source element
    got here. (An implied `<tbody>` is ignored: a loop over rows then repeats `<tbody>`, which
    the browser's parser reads as row groups with the same ancestors.)
    """
    for index in range(len(marked.code)):
        context = scan.contexts.get(index)
        if context is None:
            return "template code stands where the HTML parser cannot place it"
        if context in (_TAG, _STYLE, _OTHER, "attr:class", "attr:id", "attr:style"):
            where = {
                _TAG: "inside a tag but outside an attribute value",
                _STYLE: "inside a <style> element",
                _OTHER: "inside a declaration",
            }.get(context, f"in a {context[5:]} attribute")
            return f"template code {where} changes which CSS rules apply"
    if not _selectors_are_context_free(scan.styles):
        return "the CSS uses selectors that depend on sibling, position or attribute values"
    for tree in trees:
        if any(True for _ in tree.find_all(_CONSTRUCTS_OUTSIDE_TREE)):
            return "macros, blocks, includes or captured output move markup around"
        if _emits_markup(tree):
            return "template code prints unescaped markup"
    return None


def _statements_are_balanced(marked: _Marked, text: str) -> bool:
    stacks = _Scan(marked, text).stacks
    open_: list[tuple[str, tuple[int, ...]]] = []
    for index in marked.order(text):
        piece = marked.code[index]
        m = _STATEMENT.match(piece.text)
        if m is None:
            continue
        keyword, where = m.group(1), stacks.get(index)
        if where is None:
            return False
        if keyword in _OPENS:
            open_.append((_OPENS[keyword], where))
        elif keyword in _CONTINUES or keyword.startswith("end"):
            if not open_ or open_[-1][1] != where:
                return False
            if keyword.startswith("end"):
                if open_.pop()[0] != keyword:
                    return False
            elif open_[-1][0] not in _CONTINUES[keyword]:
                return False
        elif keyword not in _SIMPLE_STATEMENTS:
            return False
    return not open_


def _inline_once(marked: _Marked, document: str, scan: _Scan) -> str | None:
    """The marked document with CSS inlined, or None when the result cannot be trusted."""

    # In text, markers travel as comments: the HTML parser moves stray text out of tables
    # ("foster parenting") but leaves comments where they are.
    def protect(m: re.Match[str]) -> str:
        index = int(m.group(1))
        return (
            f"<!--{marked.prefix}c{index}x-->" if scan.contexts.get(index) == _DATA else m.group(0)
        )

    try:
        inlined = _INLINER.inline(marked.word.sub(protect, document))
    except css_inline.InlineError:
        return None
    expected = marked.order(document)
    if marked.order(inlined) != expected or not _statements_are_balanced(marked, inlined):
        return None
    return inlined


# --- text derivation -------------------------------------------------------------------------

_TEXT_CONFIG = ParserConfig(display_links=True)
_ROW_GROUPS = frozenset({"table", "thead", "tbody", "tfoot"})
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")
_EMPTY_LINK = re.compile(r"\[\]\(([^()\s]*)\)")  # an image link: just the URL


def _html_to_text(document: str) -> str:
    text = get_text(document, _TEXT_CONFIG)
    text = _EMPTY_LINK.sub(r"\1", _TRAILING_SPACE.sub("", text))
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def _stretches(order: Sequence[int], statements: set[int]) -> dict[int, int]:
    """For each piece of code, the statement it follows (-1 before the first)."""
    last, out = -1, {}
    for index in order:
        if index in statements:
            last = index
        out[index] = last
    return out


def _derive_text(marked: _Marked, document: str) -> list[_Piece] | None:
    """A text template made once from the marked HTML template, or None if unsound.

    Sound when inscriptis kept every statement (if, for, set...) in order, every printed value
    between the same two statements as in the HTML, and lost no code that sits in text. So
    each value is printed under the same conditions and loops as before; values may change
    places within that stretch (inscriptis writes a link's text before its URL), and values
    lost from attributes (alt, src, class) are ones a text part never shows.
    """
    scan = _Scan(marked, document)
    contexts = scan.contexts

    # Code between table rows or cells (a loop over rows) gets a row or cell of its own, where
    # inscriptis keeps it in order; stray text in a table would be moved before the table.
    def place(m: re.Match[str]) -> str:
        index = int(m.group(1))
        if contexts.get(index) != _DATA:
            return m.group(0)
        parent = scan.parents.get(index)
        if parent == "tr":
            return f"<td>{m.group(0)}</td>"
        if parent in _ROW_GROUPS:
            return f"<tr><td>{m.group(0)}</td></tr>"
        return m.group(0)

    text = _html_to_text(marked.word.sub(place, document))
    found = marked.order(text)
    if len(set(found)) != len(found):
        return None
    if any(index not in found for index, context in contexts.items() if context == _DATA):
        return None
    statements = {i for i, piece in enumerate(marked.code) if piece.text.startswith("{%")}
    kept = set(found)
    before = [i for i in marked.order(document) if i in kept]
    if [i for i in found if i in statements] != [i for i in before if i in statements]:
        return None
    if _stretches(found, statements) != _stretches(before, statements):
        return None
    alternates = {
        index: [_Piece(piece.text.replace("_mailer_href(", "_mailer_url("), piece.origin)]
        for index, piece in enumerate(marked.code)
        if piece.text.startswith("{{ _mailer_href(")
    }
    pieces = marked.unmark(text, alternates)
    try:
        _TEXT.parse(_assemble(pieces).text)
    except TemplateSyntaxError:
        return None
    return pieces


# --- compile and render ----------------------------------------------------------------------

_SLOT = re.compile(r"\{\{[-+]?\s*(body|footer)\s*[-+]?\}\}")
_LINE_BREAK = re.compile(r"[\r\n\0]")
_PIXEL = (
    '<img src="{}" width="1" height="1" alt="" '
    'style="display:block;border:0;width:1px;height:1px;">'
)


def _layout_slots(layout: Layout, pieces: Sequence[_Piece]) -> dict[str, int]:
    slots: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        m = _SLOT.fullmatch(piece.text) if piece.origin else None
        if m is not None:
            if m.group(1) in slots:
                raise TemplateError(
                    f"{{{{ {m.group(1)} }}}} appears twice", template=layout.html_name
                )
            slots[m.group(1)] = i
    for slot in ("body", "footer"):
        if slot not in slots:
            raise TemplateError(f"the layout has no {{{{ {slot} }}}}", template=layout.html_name)
    return slots


class CompiledCampaign:
    """A campaign's templates, compiled once; `render()` per contact.

    `links` is the campaign's link table: the click token's link index points into it, and
    nothing else may be a click redirect's target.
    """

    def __init__(
        self,
        *,
        subject: _Compiled,
        html: _Compiled,
        footer_html: _Compiled | None,
        footer_placeholder: str,
        text: _Compiled,
        text_body_html: _Compiled | None,
        links: list[str],
        static: Mapping[str, Any],
        track_clicks: bool,
        track_opens: bool,
        notes: Sequence[str],
    ) -> None:
        self.links = links
        self.track_clicks = track_clicks
        self.track_opens = track_opens
        self.css_inlined_once = footer_html is None
        self.text_derived_once = text_body_html is None
        self.notes = tuple(notes)
        self._subject = subject
        self._html = html
        self._footer_html = footer_html
        self._footer_placeholder = footer_placeholder
        self._text = text
        self._text_body_html = text_body_html
        self._static = dict(static)
        self._clean_urls = tuple(links)
        self._clean_hrefs = tuple(escape(url) for url in links)

    def render(
        self,
        context: Mapping[str, Any],
        *,
        unsubscribe_url: str,
        preferences_url: str,
        click_url: Callable[[int], str] | None,
        open_url: str | None,
        honeypot_url: str | None = None,
    ) -> RenderedMessage:
        """One contact's message. `click_url=None` (no tracking consent) leaves links clean;
        `open_url=None` adds no pixel. `honeypot_url`, used only where clicks are tracked, is
        the footer's hidden link that only link scanners follow. Raises TemplateError, never
        sends half a message."""
        values = {**self._static, **context}
        contact = values.get("contact")
        if contact is not None and type(contact) is not ContactView:
            values["contact"] = ContactView.of(contact)  # the same view whatever the caller has
        values["unsubscribe_url"] = unsubscribe_url
        values["preferences_url"] = preferences_url
        subject = self._subject.render(values)
        if _LINE_BREAK.search(subject):
            problem = "the rendered subject contains a line break"
            raise TemplateError(problem, template=self._subject.name)
        values["subject"] = subject
        if click_url is not None and self.track_clicks:
            values["_mailer_href"] = values["_mailer_url"] = _guarded(click_url)
            values["honeypot_url"] = honeypot_url
        else:
            values["_mailer_href"] = self._clean_hrefs.__getitem__
            values["_mailer_url"] = self._clean_urls.__getitem__
            values["honeypot_url"] = None

        body = self._html.render(values)
        if self._footer_html is not None:
            body = _INLINER.inline(body).replace(
                self._footer_placeholder, self._footer_html.render(values), 1
            )
        if open_url is not None and self.track_opens:
            end = body.rfind("</body>")
            pixel = _PIXEL.format(escape(open_url))
            body = body + pixel if end < 0 else body[:end] + pixel + body[end:]

        text = self._text.render(values)
        if self._text_body_html is not None:
            text = f"{_html_to_text(self._text_body_html.render(values))}\n\n{text}"
        return RenderedMessage(subject=subject, html=body, text=text)


def _guarded(click_url: Callable[[int], str]) -> Callable[[int], str]:
    """click_url for one message: each link's URL made once (HTML and text share it), and the
    callback's own exceptions kept apart from template errors."""
    made: dict[int, str] = {}

    def href(index: int) -> str:
        url = made.get(index)
        if url is None:
            try:
                url = made[index] = click_url(index)
            except Exception as exc:
                raise _Callback(exc) from exc
        return url

    return href


def compile_campaign(
    html_source: str,
    text_source: str | None,
    subject_source: str,
    *,
    template_name: str,
    sender: Mapping[str, str],
    reason: str,
    track_clicks: bool,
    track_opens: bool,
    layout: Layout | None = None,
    text_template_name: str | None = None,
    subject_template_name: str = "subject",
    campaign: Mapping[str, Any] | None = None,
    precompute: bool = True,
) -> CompiledCampaign:
    """Compile a campaign's subject, HTML and text templates (see the module docstring).

    `html_source` is a fragment (wrapped in `layout`, the built-in one by default) or a full
    document (which keeps its frame and gets the footer before `</body>`). `sender` needs
    `name` and `postal_address`; `reason` says why the person receives the mail. `sender`,
    `reason` and `campaign` are template variables unless the render context overrides them.
    A given `text_source` is used as written: its URLs are not click-tracked. `precompute=False`
    forces per-message CSS inlining and text derivation (for comparison); `notes` on the
    result say why either was needed anyway. Raises TemplateError naming template and line.
    """
    layout = layout or Layout.builtin()
    text_name = text_template_name or f"{template_name} (text)"
    if not (sender.get("name") or "").strip() or not (sender.get("postal_address") or "").strip():
        raise ConfigError(
            "every mail names its sender: sender name and postal_address are required"
        )
    if _LINE_BREAK.search(subject_source):
        problem = "the subject template contains a line break"
        raise TemplateError(problem, template=subject_template_name)

    trees = [
        _parse(_HTML, html_source, template_name),
        _parse(_HTML, layout.html, layout.html_name),
    ]
    _parse(_HTML, layout.footer_html, layout.footer_html_name)
    _parse(_TEXT, subject_source, subject_template_name)
    _parse(_TEXT, layout.footer_text, layout.footer_text_name)
    if text_source is not None:
        _parse(_TEXT, text_source, text_name)

    campaign_pieces = _split(_HTML, html_source, template_name)
    layout_pieces = _split(_HTML, layout.html, layout.html_name)
    footer_pieces = _split(_HTML, layout.footer_html, layout.footer_html_name)
    slots = _layout_slots(layout, layout_pieces)
    notes: list[str] = []

    marked = _Marked([html_source, layout.html])
    body = marked.mark(campaign_pieces)
    body, links = _rewrite_links(marked, body, template_name, rewrite=track_clicks)
    footer_slot = marked.add(_Piece("", ("footer", None)))
    footer_index = len(marked.code) - 1
    scan = _Scan(marked, body)
    if scan.document:
        end = len(body) if scan.body_end is None else scan.body_end
        document = body[:end] + footer_slot + body[end:]
    else:
        before = marked.mark(layout_pieces[: slots["body"]])
        between = marked.mark(layout_pieces[slots["body"] + 1 : slots["footer"]])
        after = marked.mark(layout_pieces[slots["footer"] + 1 :])
        document = before + body + between + footer_slot + after

    # HTML: inline CSS once if sound, else per message with the footer added afterwards (in
    # both cases campaign CSS never restyles the footer, and so never hides the unsubscribe link).
    html_compiled = footer_compiled = None
    placeholder = f"<!--{marked.prefix}footer-->"
    if precompute:
        full_scan = _Scan(marked, document)
        why = _why_not_inline_once(marked, full_scan, trees)
        inlined = _inline_once(marked, document, full_scan) if why is None else None
        if why is None and inlined is None:
            why = "template code and markup nest in a way the inliner would change"
        if inlined is not None:
            with_footer = marked.unmark(inlined, {footer_index: footer_pieces})
            try:
                html_compiled = _compile(_HTML, with_footer, template_name)
            except TemplateSyntaxError:
                why = "the inlined template does not compile"
        if why is not None:
            notes.append(f"CSS is inlined per message: {why}")
    if html_compiled is None:
        main = marked.unmark(document, {footer_index: [_Piece(placeholder)]})
        html_compiled = _compile(_HTML, main, template_name)
        footer_compiled = _compile(_HTML, footer_pieces, layout.footer_html_name)

    # Text: the given template, or one derived from the HTML, each followed by the footer.
    footer_text = _split(_TEXT, layout.footer_text, layout.footer_text_name)
    text_body_html = None
    if text_source is not None:
        text_pieces = [*_split(_TEXT, text_source, text_name), _Piece("\n\n"), *footer_text]
    else:
        derived = None
        if precompute and _emits_markup(trees[0]):
            notes.append("the text part is derived per message: template code prints markup")
        elif precompute:
            derived = _derive_text(marked, body)
            if derived is None:
                notes.append(
                    "the text part is derived per message: its template code sits where "
                    "inscriptis would move or lose it"
                )
        if derived is None:
            text_body_html = _compile(_HTML, marked.unmark(body, {footer_index: []}), template_name)
            text_pieces = footer_text
        else:
            text_pieces = [*derived, _Piece("\n\n"), *footer_text]

    static: dict[str, Any] = {"sender": TemplateValues(dict(sender)), "reason": reason}
    if campaign is not None:
        static["campaign"] = TemplateValues(dict(campaign))
    return CompiledCampaign(
        subject=_compile(
            _TEXT, _split(_TEXT, subject_source, subject_template_name), subject_template_name
        ),
        html=html_compiled,
        footer_html=footer_compiled,
        footer_placeholder=placeholder,
        text=_compile(_TEXT, text_pieces, text_name),
        text_body_html=text_body_html,
        links=links,
        static=static,
        track_clicks=track_clicks,
        track_opens=track_opens,
        notes=notes,
    )
