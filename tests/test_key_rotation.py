"""Key rotation (invariant 5): `mailer keys rotate` adds a signing key; links in mails sent
before keep working, new links are signed with the new key, and no key is ever removed."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailer.config import load_settings
from mailer.service import Mailer
from mailer.tokens import BadToken, TokenKind, Tokens
from tests.conftest import TEST_KEY
from tests.smtp_server import CaptureServer
from tests.test_tracking_pixel_and_click import (
    LINKS,
    SentMail,
    client_for,
    events,
    make_app,
    path_of,
    send_tracked,
)


async def follow(mailer: Mailer, mail: SentMail) -> None:
    """Open and click a mail's links on an app built from `mailer`'s settings."""
    app = make_app(mailer)
    async with client_for(app) as http:
        assert (await http.get(path_of(mail.opens[0]))).status_code == 200
        response = await http.get(path_of(mail.clicks[1]))
        assert (response.status_code, response.headers["location"]) == (302, LINKS[1])
    assert await app.state.recorder.flush() == 2


def new_token_verifies_only_with(keys: tuple[str, ...], old: tuple[str, ...]) -> None:
    token = Tokens(keys).sign(TokenKind.CLICK, (1, 2, 3))
    assert Tokens(keys).verify(TokenKind.CLICK, token) == (1, 2, 3)
    with pytest.raises(BadToken):
        Tokens(old).verify(TokenKind.CLICK, token)  # signed with the new key, not an old one


@pytest.mark.asyncio
async def test_rotating_the_key_file_of_an_embedded_database(
    cli: Callable[..., Any],
    tmp_path: Path,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
) -> None:
    # the embedded default: no MAILER_SECRET_KEYS, `mailer init` keeps a key beside the database
    database = tmp_path / "embedded.db"
    env = {"MAILER_DATABASE_URL": f"sqlite:///{database}", "MAILER_SECRET_KEYS": ""}
    assert cli("init", extra_env=env).exit_code == 0
    key_file = tmp_path / "embedded.db.keys"
    (first_key,) = key_file.read_text().split()

    settings_env = {
        "MAILER_DATABASE_URL": env["MAILER_DATABASE_URL"],
        "MAILER_SENDER_NAME": "Shop BV",
        "MAILER_POSTAL_ADDRESS": "Voorbeeldstraat 1, 3511 AA Utrecht",
    }
    before = Mailer(load_settings(settings_env, cwd=tmp_path)).ready()
    assert before.settings.secret_keys == (first_key,)
    mail = (await send_tracked(before, smtp_server, campaign_file))["tracked@example.org"]
    before.close()

    result = cli("keys", "rotate", extra_env=env)
    assert result.exit_code == 0, result.stderr
    assert str(key_file) in result.stdout
    keys = key_file.read_text().split()
    assert len(keys) == 2 and keys[0] == first_key and len(keys[1]) >= 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert cli("keys", "rotate", extra_env=env).exit_code == 0
    assert key_file.read_text().split()[:2] == keys  # appended again, nothing removed

    after = Mailer(load_settings(settings_env, cwd=tmp_path)).ready()  # oldest key unchanged
    try:
        assert after.settings.secret_keys[0] == first_key
        assert len(after.settings.secret_keys) == 3
        await follow(after, mail)  # links signed before the rotation still work
        assert [e.kind for e in events(after)] == ["open", "click"]
        new_token_verifies_only_with(after.settings.secret_keys, (first_key,))
        # and the unsubscribe link of that mail still verifies
        token = path_of(mail.unsubscribe).rsplit("/", 1)[1]
        assert Tokens(after.settings.secret_keys).verify(TokenKind.UNSUBSCRIBE, token) == (
            mail.delivery_id,
        )
    finally:
        after.close()
    assert cli("campaign", "report", "autumn", extra_env=env).exit_code == 0


@pytest.mark.asyncio
async def test_rotating_keys_set_in_the_environment_prints_the_new_list(
    cli: Callable[..., Any],
    mailer: Mailer,
    env: dict[str, str],
    tmp_path: Path,
    smtp_server: CaptureServer,
    campaign_file: Callable[..., Path],
) -> None:
    mail = (await send_tracked(mailer, smtp_server, campaign_file))["tracked@example.org"]
    result = cli("keys", "rotate")
    assert result.exit_code == 0, result.stderr
    (line,) = re.findall(r"^MAILER_SECRET_KEYS=(\S+)$", result.stdout, re.MULTILINE)
    keys = tuple(line.split(","))
    assert keys[0] == TEST_KEY and len(keys) == 2 and keys[1] in result.stdout.split()
    assert not list(tmp_path.glob("*.keys"))  # nothing written: the operator sets it

    rotated = {**env, "MAILER_SECRET_KEYS": line}
    assert cli("campaign", "report", "autumn", extra_env=rotated).exit_code == 0
    after = Mailer(load_settings(rotated, cwd=tmp_path), mailer.engine)
    await follow(after, mail)
    new_token_verifies_only_with(keys, (TEST_KEY,))

    # dropping the oldest key is refused: suppression hashes depend on it
    dropped = {**env, "MAILER_SECRET_KEYS": keys[1]}
    refused = cli("campaign", "report", "autumn", extra_env=dropped)
    assert refused.exit_code == 2 and "oldest secret key" in refused.stderr


def test_rotating_keys_from_the_configuration_file_prints_both_forms(
    cli: Callable[..., Any], mailer: Mailer, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "mailer.toml").write_text(f'[mailer]\nsecret_keys = ["{TEST_KEY}"]\n')
    without_env = {**env, "MAILER_SECRET_KEYS": ""}
    result = cli("keys", "rotate", extra_env=without_env)
    assert result.exit_code == 0, result.stderr
    (line,) = re.findall(r"^MAILER_SECRET_KEYS=(\S+)$", result.stdout, re.MULTILINE)
    first, new = line.split(",")
    assert first == TEST_KEY
    assert f'secret_keys = ["{TEST_KEY}", "{new}"]' in result.stdout
    assert (tmp_path / "mailer.toml").read_text().count(",") == 0  # the file is not changed


def test_rotating_needs_an_initialised_database(cli: Callable[..., Any]) -> None:
    result = cli("keys", "rotate")
    assert result.exit_code == 2 and "mailer init" in result.stderr
