"""`mailer init`, settings and secret keys: no key is hard-coded, none is silently invented for
production, and the database refuses a key set that would change the suppression hashes."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

import mailer as package
from mailer.config import load_settings
from mailer.errors import ConfigError
from tests.conftest import TEST_KEY, CliResult


def test_init_is_idempotent(cli: Callable[..., CliResult]) -> None:
    first = cli("init")
    assert first.exit_code == 0
    assert "Created the database schema" in first.stdout
    again = cli("init")
    assert again.exit_code == 0
    assert "up to date" in again.stdout


def test_embedded_default_generates_and_reuses_a_key(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    no_keys = {"MAILER_DATABASE_URL": "", "MAILER_SECRET_KEYS": ""}
    result = cli("init", extra_env=no_keys)
    assert result.exit_code == 0, result.stderr
    key_file = tmp_path / "mailer.db.keys"
    assert key_file.exists()
    assert f"Generated a secret key in {key_file}" in result.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key not in result.stdout
    # the next command finds the key by itself, and init does not replace it
    assert cli("suppress", "a@example.com", extra_env=no_keys).exit_code == 0
    assert cli("init", extra_env=no_keys).exit_code == 0
    assert key_file.read_text().strip() == key


def test_production_database_without_key_refuses_to_start(cli: Callable[..., CliResult]) -> None:
    pg = {"MAILER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", "MAILER_SECRET_KEYS": ""}
    for args in (("init",), ("suppress", "a@example.com")):
        result = cli(*args, extra_env=pg)
        assert result.exit_code == 2
        assert "MAILER_SECRET_KEYS" in result.stderr
        assert "Traceback" not in result.stderr


def test_unreachable_database_is_a_clear_error(cli: Callable[..., CliResult]) -> None:
    down = {"MAILER_DATABASE_URL": "postgresql://postgres:hunter2@127.0.0.1:1/none"}
    result = cli("init", extra_env=down)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot reach the database")
    assert "hunter2" not in result.stderr


def test_replacing_the_oldest_key_is_refused(cli: Callable[..., CliResult]) -> None:
    assert cli("init").exit_code == 0
    assert cli("suppress", "a@example.com").exit_code == 0
    rotated = {"MAILER_SECRET_KEYS": f"{TEST_KEY},{'n' * 40}"}
    assert cli("suppress", "b@example.com", extra_env=rotated).exit_code == 0
    replaced = cli("suppress", "c@example.com", extra_env={"MAILER_SECRET_KEYS": "x" * 40})
    assert replaced.exit_code == 2
    assert "oldest secret key" in replaced.stderr


def test_short_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        load_settings({"MAILER_SECRET_KEYS": "short"}, cwd=tmp_path)


def test_configuration_file_is_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "mailer.toml").write_text(
        '[mailer]\nbase_url = "https://news.example.com/"\nsecret_keys = ["' + "k" * 40 + '"]\n'
    )
    settings = load_settings({}, cwd=tmp_path)
    assert settings.base_url == "https://news.example.com"
    assert settings.secret_keys == ("k" * 40,)
    # the environment wins over the file
    settings = load_settings({"MAILER_BASE_URL": "https://other.example"}, cwd=tmp_path)
    assert settings.base_url == "https://other.example"
    (tmp_path / "mailer.toml").write_text('[mailer]\nbase_ulr = "typo"\n')
    with pytest.raises(ConfigError, match="unknown key 'base_ulr'"):
        load_settings({}, cwd=tmp_path)


def test_only_the_cli_reads_the_environment() -> None:
    root = Path(package.__file__).parent
    readers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"os\.environ|getenv\(", path.read_text(encoding="utf-8"))
    )
    assert readers == ["cli.py"]
