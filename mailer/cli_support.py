"""What every `mailer` command module shares: the consoles, one-line error handling with the
right exit code, the Mailer for a command, and how times are printed.

The environment itself is read once, by `mailer.cli`'s root callback, into the typer context:
no other module reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from sqlalchemy.exc import OperationalError

from mailer.config import load_settings
from mailer.errors import MailerError
from mailer.models import as_utc
from mailer.service import Mailer

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

P = ParamSpec("P")
R = TypeVar("R")


def handled(fn: Callable[P, R]) -> Callable[P, R]:
    """Print MailerErrors (and an unreachable database) as one line with the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MailerError as exc:
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except OperationalError as exc:
            first = str(exc.orig).strip().splitlines()[0] if exc.orig else "operational error"
            err.print(f"error: database error: {first}", markup=False)
            raise typer.Exit(2) from None

    return wrapper


def mailer_for(ctx: typer.Context, *, ready: bool = True) -> Mailer:
    """The Mailer for this command, from the environment the root callback read and `--db`."""
    state: dict[str, Any] = ctx.ensure_object(dict)
    settings = load_settings(state.get("environ", {}), database_url=state.get("db"))
    mailer = Mailer(settings)
    ctx.call_on_close(mailer.close)
    return mailer.ready() if ready else mailer


def print_line(text: str) -> None:
    out.print(text, markup=False)


def when_text(value: datetime | None) -> str:
    return "" if value is None else as_utc(value).strftime("%Y-%m-%d %H:%M:%SZ")


def iso_text(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat().replace("+00:00", "Z")
