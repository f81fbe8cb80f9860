"""Contacts: one per normalised address, merged field by field from every source."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from mailer.models import Contact, ContactTag

NAME_FIELDS = ("name", "first_name", "last_name", "locale")
MAX_TAG_LENGTH = 64
MAX_LOCALE_LENGTH = 35  # the column's size: longer is no language tag anyone uses
LOCALE_PATTERN = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")


def normalise_locale(raw: str) -> str:
    """'nl_nl' -> 'nl-NL'; raises ValueError for what is not a language tag."""
    value = raw.strip()
    if len(value) > MAX_LOCALE_LENGTH or not LOCALE_PATTERN.match(value):
        raise ValueError(f"not a language tag: {raw!r}")
    parts = re.split(r"[-_]", value)
    head, rest = parts[0].lower(), parts[1:]
    return "-".join([head, *(p.upper() if len(p) == 2 else p for p in rest)])


def split_tags(raw: str) -> list[str]:
    tags = []
    for part in raw.split(";"):
        tag = part.strip()
        if tag:
            if len(tag) > MAX_TAG_LENGTH:
                raise ValueError(f"tag longer than {MAX_TAG_LENGTH} characters")
            tags.append(tag)
    return tags


@dataclass
class ContactData:
    """What one source says about a contact; empty values say nothing."""

    email: str
    name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    def absorb(self, other: ContactData) -> None:
        """Later, non-empty values win; tags are a union; attributes merge key by key."""
        for name in NAME_FIELDS:
            value = getattr(other, name)
            if value:
                setattr(self, name, value)
        self.tags = _union(self.tags, other.tags)
        self.attributes.update({k: v for k, v in other.attributes.items() if v not in ("", None)})


def _union(first: Iterable[str], second: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))


def merge_changes(contact: Mapping[Any, Any], data: ContactData) -> dict[str, Any]:
    """The column values that change when `data` is merged into the stored `contact`."""
    changes: dict[str, Any] = {}
    for name in NAME_FIELDS:
        value = getattr(data, name)
        if value and value != contact[name]:
            changes[name] = value
    attributes = dict(contact["attributes"] or {})
    merged = {**attributes, **{k: v for k, v in data.attributes.items() if v not in ("", None)}}
    if merged != attributes:
        changes["attributes"] = merged
    return changes


def get_by_email(session: Session, normalised: str) -> Contact | None:
    return session.exec(select(Contact).where(Contact.email == normalised)).first()


def tags_of(session: Session, contact_id: int) -> list[str]:
    rows = session.exec(
        select(ContactTag.tag)
        .where(ContactTag.contact_id == contact_id)
        .order_by(col(ContactTag.tag))
    )
    return list(rows)
