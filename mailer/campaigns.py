"""Campaign files: a TOML definition and its Jinja templates, checked before anything is queued."""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from mailer import consent
from mailer.addresses import normalise_address
from mailer.errors import BadInput, InvalidAddress

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
REQUIRED = ("name", "subject", "from", "template")
OPTIONAL = (
    "reply_to",
    "text_template",
    "purpose",
    "track_opens",
    "track_clicks",
    "tags",
    "min_policy_version",
    "reason",
    "list_name",
)
HEADER_UNSAFE = re.compile(r"[\r\n\0]")


class CampaignFileError(BadInput):
    pass


@dataclass(frozen=True)
class CampaignDefinition:
    path: Path
    name: str
    subject: str
    from_address: str
    from_name: str | None
    reply_to: str | None
    template: Path
    text_template: Path | None
    purpose: str
    track_opens: bool
    track_clicks: bool
    tags: tuple[str, ...]
    min_policy_version: str | None
    reason: str | None
    list_name: str
    html_source: str
    text_source: str | None
    file_sha256: str

    @property
    def domain(self) -> str:
        return self.from_address.rpartition("@")[2]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "from": self.from_address,
            "from_name": self.from_name,
            "reply_to": self.reply_to,
            "template": str(self.template),
            "text_template": str(self.text_template) if self.text_template else None,
            "purpose": self.purpose,
            "track_opens": self.track_opens,
            "track_clicks": self.track_clicks,
            "tags": list(self.tags),
            "min_policy_version": self.min_policy_version,
            "reason": self.reason,
            "list_name": self.list_name,
            "file_sha256": self.file_sha256,
        }


def _fail(path: Path, key: str | None, problem: str) -> CampaignFileError:
    where = f"{path}: {key}: " if key else f"{path}: "
    return CampaignFileError(where + problem)


def _address(path: Path, key: str, raw: Any) -> tuple[str, str | None]:
    if not isinstance(raw, str) or not raw.strip():
        raise _fail(path, key, "must be an address, e.g. \"Shop <news@shop.example>\"")
    if HEADER_UNSAFE.search(raw):
        raise _fail(path, key, "contains a line break or NUL (header injection)")
    name, address = parseaddr(raw)
    try:
        normalised = normalise_address(address)
    except InvalidAddress as exc:
        raise _fail(path, key, f"invalid address {raw!r}: {exc}") from None
    return normalised, name.strip() or None


def _template(path: Path, key: str, raw: Any) -> tuple[Path, str]:
    if not isinstance(raw, str) or not raw.strip():
        raise _fail(path, key, "must be a file name relative to the campaign file")
    file = (path.parent / raw).resolve()
    try:
        return file, file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(path, key, f"template {raw!r} not found (looked at {file})") from None
    except UnicodeDecodeError:
        raise _fail(path, key, f"template {raw!r} is not UTF-8 text") from None
    except OSError as exc:
        raise _fail(path, key, f"cannot read template {raw!r}: {exc.strerror}") from None


def _bool(path: Path, key: str, raw: Any, default: bool) -> bool:
    if raw is None:
        return default
    if not isinstance(raw, bool):
        raise _fail(path, key, "must be true or false")
    return raw


def load_campaign(path: Path) -> CampaignDefinition:
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise CampaignFileError(f"{path}: campaign file not found") from None
    except OSError as exc:
        raise CampaignFileError(f"{path}: cannot read campaign file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(path, None, f"not valid TOML: {exc}") from None

    for key in data:
        if key not in REQUIRED and key not in OPTIONAL:
            raise _fail(path, key, "unknown key")
    for key in REQUIRED:
        if key not in data:
            raise _fail(path, key, "missing")

    name = data["name"]
    if not isinstance(name, str) or not SLUG.match(name):
        raise _fail(path, "name", "must be a slug: lower-case letters, digits and '-'")
    subject = data["subject"]
    if not isinstance(subject, str) or not subject.strip():
        raise _fail(path, "subject", "must be non-empty text (a template)")
    if HEADER_UNSAFE.search(subject):
        raise _fail(path, "subject", "contains a line break or NUL (header injection)")
    from_address, from_name = _address(path, "from", data["from"])
    reply_to = _address(path, "reply_to", data["reply_to"])[0] if "reply_to" in data else None
    template, html_source = _template(path, "template", data["template"])
    text_template: Path | None = None
    text_source: str | None = None
    if "text_template" in data:
        text_template, text_source = _template(path, "text_template", data["text_template"])
    try:
        purpose = consent.check_purpose(str(data.get("purpose", consent.MARKETING)))
    except BadInput as exc:
        raise _fail(path, "purpose", str(exc)) from None
    if purpose == consent.TRACKING:
        raise _fail(path, "purpose", "'tracking' is a permission, not a purpose to mail for")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        raise _fail(path, "tags", "must be a list of tag names")
    policy = data.get("min_policy_version")
    if policy is not None and (not isinstance(policy, str) or not policy.strip()):
        raise _fail(path, "min_policy_version", "must be text, e.g. \"2026-01\"")
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise _fail(path, "reason", "must be text")
    list_name = data.get("list_name", name)
    if not isinstance(list_name, str) or HEADER_UNSAFE.search(list_name):
        raise _fail(path, "list_name", "must be text without line breaks")
    return CampaignDefinition(
        path=path,
        name=name,
        subject=subject,
        from_address=from_address,
        from_name=from_name,
        reply_to=reply_to,
        template=template,
        text_template=text_template,
        purpose=purpose,
        track_opens=_bool(path, "track_opens", data.get("track_opens"), True),
        track_clicks=_bool(path, "track_clicks", data.get("track_clicks"), True),
        tags=tuple(t.strip() for t in tags),
        min_policy_version=policy.strip() if policy else None,
        reason=reason.strip() if reason else None,
        list_name=list_name.strip(),
        html_source=html_source,
        text_source=text_source,
        file_sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )
