"""Where inbound mail is read from, and where it goes afterwards (`mailer inbound process PATH`).

    maildir       PATH with cur/ and new/: every mail is moved into a Maildir++ folder of
                  PATH: `.processed`, `.unmatched` (not understood, or about no delivery of
                  ours) or `.failed` (malformed); the folders are maildirs themselves, so mail
                  clients and the delivering MTA keep working
    folder        a directory of `*.eml` files: moved into PATH/.processed, .unmatched, .failed
    eml           one file: moved the same way, into folders beside it
    mbox          one mbox file: single messages cannot be taken out of an mbox another
                  program appends to, so it is left as it is; mails that are set aside are
                  copied, once, into `NAME.unmatched.mbox` or `NAME.failed.mbox` beside it, and
                  a re-run recognises the processed ones (by Message-ID) and changes nothing

A mail that could not be processed because of the database is left where it was and the run
stops: the next run retries it.
"""

from __future__ import annotations

import functools
import mailbox
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from mailer.errors import BadInput, DatabaseError
from mailer.inbound import Action, InboundProcessor, InboundResult, Outcome
from mailer.inbound_parse import MAX_MESSAGE_BYTES, Kind
from mailer.service import Mailer

MBOX_MARK = b"From "
ASIDE = {Outcome.PROCESSED: "processed", Outcome.UNMATCHED: "unmatched", Outcome.FAILED: "failed"}


class Layout(StrEnum):
    MAILDIR = "maildir"
    MBOX = "mbox"
    FOLDER = "folder of .eml files"
    EML = "eml file"


@dataclass(frozen=True)
class ItemReport:
    source: str  # the file name, maildir key, or "message N" of an mbox
    result: InboundResult
    moved_to: str | None = None  # where the mail (or its copy) went, relative to PATH's folder


@dataclass
class RunReport:
    path: Path
    layout: Layout
    items: list[ItemReport] = field(default_factory=list)
    stopped: str | None = None  # why the run stopped early (the database)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.result.outcome.value] = counts.get(item.result.outcome.value, 0) + 1
        return counts

    @property
    def complete(self) -> bool:
        return self.stopped is None and not any(
            item.result.outcome is Outcome.ERROR for item in self.items
        )


def layout_of(path: Path) -> Layout:
    """What PATH is; BadInput (exit 2, nothing done) for one that cannot be processed."""
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise BadInput(f"{path}: not readable")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise BadInput(f"{path}: not writable (processed mails are moved out of it)")
        if (path / "cur").is_dir() and (path / "new").is_dir():
            return Layout.MAILDIR
        return Layout.FOLDER
    if not path.is_file():
        raise BadInput(f"{path}: not a file or a directory")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise BadInput(f"{path.parent}: not writable (mails set aside are written there)")
    with path.open("rb") as fh:
        head = fh.read(len(MBOX_MARK))
    return Layout.MBOX if head == MBOX_MARK else Layout.EML


def process_path(
    mailer: Mailer,
    path: Path,
    *,
    limit: int | None = None,
    on_item: Callable[[ItemReport], None] | None = None,
) -> RunReport:
    """Process every mail at PATH (at most `limit`), reporting each as it is done."""
    layout = layout_of(path)
    processor = InboundProcessor(mailer)
    report = RunReport(path, layout)
    source: _Source
    if layout is Layout.MAILDIR:
        source = _Maildir(path)
    elif layout is Layout.MBOX:
        source = _Mbox(path)
    elif layout is Layout.FOLDER:
        source = _Files(path, sorted(p for p in path.glob("*.eml") if p.is_file()))
    else:
        source = _Files(path.parent, [path])
    try:
        for count, (name, read) in enumerate(source.mails()):
            if limit is not None and count >= limit:
                break
            try:
                raw = read()
            except OSError as exc:  # vanished or unreadable since it was listed
                item = ItemReport(name, _error(Action.UNREADABLE, f"cannot read: {exc.strerror}"))
            else:
                try:
                    result = processor.process(raw)
                except (SQLAlchemyError, DatabaseError) as exc:
                    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                    item = ItemReport(name, _error(Action.DATABASE, f"database error: {first}"))
                    report.items.append(item)
                    report.stopped = "database error: the remaining mails were left in place"
                    if on_item is not None:
                        on_item(item)
                    break
                item = ItemReport(name, result, source.put(name, raw, result))
            report.items.append(item)
            if on_item is not None:
                on_item(item)
    finally:
        source.close()
    return report


def _error(action: Action, detail: str) -> InboundResult:
    return InboundResult(Kind.UNKNOWN, Outcome.ERROR, action, detail)


class _Source:
    def mails(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        raise NotImplementedError

    def put(self, name: str, raw: bytes, result: InboundResult) -> str | None:
        """Move (or copy) the mail where its outcome says; returns where, for the report."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Maildir(_Source):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.box = mailbox.Maildir(path, factory=None, create=False)
        self.folders: dict[str, mailbox.Maildir] = {}

    def mails(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        for key in sorted(self.box.keys()):  # a snapshot: mail arriving meanwhile waits
            yield key, functools.partial(self.box.get_bytes, key)

    def put(self, name: str, raw: bytes, result: InboundResult) -> str | None:
        folder = ASIDE[result.outcome]
        if self.path.name == f".{folder}":
            return None  # re-processing an aside folder: a mail that stays aside stays put
        target = self.folders.get(folder)
        if target is None:
            target = self.box.add_folder(folder)
            self.folders[folder] = target
        # the exact bytes, added before the original is removed: a crash in between leaves a
        # copy, never a loss (and processing the copy again changes nothing)
        target.add(raw)
        self.box.discard(name)
        return f".{folder}/"


class _Mbox(_Source):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.box = mailbox.mbox(path, create=False)
        # the MTA's own locks (fcntl and dot-lock): it waits while we read, so no message is
        # read half-appended
        self.box.lock()

    def close(self) -> None:
        self.box.unlock()
        self.box.close()

    def mails(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        for number, key in enumerate(self.box.iterkeys(), start=1):
            yield f"message {number}", functools.partial(self.box.get_bytes, key)

    def put(self, name: str, raw: bytes, result: InboundResult) -> str | None:
        if result.outcome is Outcome.PROCESSED or result.seen:
            return None  # copied aside by an earlier run already
        stem = self.path.stem if self.path.suffix == ".mbox" else self.path.name
        target_path = self.path.with_name(f"{stem}.{ASIDE[result.outcome]}.mbox")
        target = mailbox.mbox(target_path, create=True)
        target.lock()
        try:
            target.add(raw)
            target.flush()
        finally:
            target.unlock()
            target.close()
        return target_path.name


class _Files(_Source):
    def __init__(self, folder: Path, files: list[Path]) -> None:
        self.folder = folder
        self.files = {path.name: path for path in files}

    def mails(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        for name, path in self.files.items():
            yield name, functools.partial(_read, path)

    def put(self, name: str, raw: bytes, result: InboundResult) -> str | None:
        source = self.files[name]
        folder = ASIDE[result.outcome]
        if source.parent.name == f".{folder}":
            return None
        target_dir = self.folder / f".{folder}"
        target_dir.mkdir(exist_ok=True)
        target = target_dir / name
        if target.exists():  # a name used before: keep both
            target = target_dir / f"{source.stem}.{uuid.uuid4().hex[:8]}{source.suffix}"
        os.replace(source, target)
        return f".{folder}/{target.name}"


def _read(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(MAX_MESSAGE_BYTES + 1)  # classify refuses what is larger
