"""Settings, built once from MAILER_* variables and an optional mailer.toml, then passed explicitly.

Nothing else in mailer reads the environment. Precedence: command-line option, then environment,
then the configuration file, then the defaults below.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from mailer.errors import ConfigError
from mailer.tracking.classify import NETWORK_REASONS, MachineReason, Network

DEFAULT_SQLITE_FILE = "mailer.db"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
CONFIG_FILE = "mailer.toml"
KEY_FILE_SUFFIX = ".keys"
MIN_KEY_LENGTH = 32

_KNOWN_FILE_KEYS = {
    "database_url",
    "secret_keys",
    "base_url",
    "require_double_opt_in",
    "operator",
    "smtp_url",
    "sender_name",
    "postal_address",
    "dkim_selector",
    "dkim_domain",
    "dkim_key_file",
    "error_threshold",
    "brand_color",
    "logo_url",
    "company_url",
    "mail_from",
    "soft_bounce_limit",  # mailer inbound: soft bounces of one address before it is suppressed
    # retention periods (mailer retention purge)
    "retention_events_months",
    "retention_unconsented_months",
    "retention_unconfirmed_days",
    "retention_dead_letters_days",
    # webhooks: allow private/loopback targets and plain http (development and tests only)
    "webhook_allow_private",
    # [mailer.machine_networks]: reason = ["CIDR", ...], the gateways' published ranges
    "machine_networks",
}
DEFAULT_SMTP_URL = "smtp://127.0.0.1:25"
DEFAULT_SENDER_NAME = "mailer"
DEFAULT_ERROR_THRESHOLD = 0.2
DEFAULT_BRAND_COLOR = "#1d4e89"
DEFAULT_SOFT_BOUNCE_LIMIT = 3
MACHINE_NETWORKS_ENV = "MAILER_MACHINE_NETWORKS"
MachineNetworkList = tuple[tuple[MachineReason, Network], ...]


@dataclass(frozen=True)
class Settings:
    database_url: str
    secret_keys: tuple[str, ...]
    base_url: str = DEFAULT_BASE_URL
    require_double_opt_in: bool = False
    operator: str = "operator"
    smtp_url: str = DEFAULT_SMTP_URL
    sender_name: str = DEFAULT_SENDER_NAME
    postal_address: str | None = None  # required to send: every marketing mail names the sender
    dkim_selector: str | None = None
    dkim_domain: str | None = None
    dkim_key_file: Path | None = None
    error_threshold: float = DEFAULT_ERROR_THRESHOLD
    brand_color: str = DEFAULT_BRAND_COLOR
    logo_url: str | None = None
    company_url: str | None = None
    mail_from: str | None = None  # From of mailer's own mails (double opt-in confirmations)
    soft_bounce_limit: int = DEFAULT_SOFT_BOUNCE_LIMIT  # soft bounces that suppress an address
    # retention periods (`mailer retention purge`), in months or days as named
    retention_events_months: int = 13
    retention_unconsented_months: int = 24
    retention_unconfirmed_days: int = 30
    retention_dead_letters_days: int = 90
    webhook_allow_private: bool = False  # development and tests: loopback/private targets, http
    # the operator's gateway, proxy and scanner ranges: an open or click from one is a machine's
    machine_networks: MachineNetworkList = ()
    key_file: Path | None = None
    config_file: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def signing_key(self) -> str:
        """The newest key: it signs; all keys verify."""
        if not self.secret_keys:
            raise ConfigError(_missing_key_message(self))
        return self.secret_keys[-1]

    @property
    def suppression_key(self) -> bytes:
        """Keys the suppression hashes. Derived from the oldest key, so that adding keys for token
        rotation never changes the hash of an address that is already suppressed."""
        if not self.secret_keys:
            raise ConfigError(_missing_key_message(self))
        return hmac.new(
            self.secret_keys[0].encode(), b"mailer.suppression.v1", hashlib.sha256
        ).digest()

    @property
    def verp_key(self) -> bytes:
        """Keys the bounce addresses; from the oldest key, so bounces of old mails still map."""
        if not self.secret_keys:
            raise ConfigError(_missing_key_message(self))
        return hmac.new(self.secret_keys[0].encode(), b"mailer.verp.v1", hashlib.sha256).digest()

    @property
    def signup_limit_key(self) -> bytes:
        """Keys the client hashes the sign-up limit counts by (signup_limits): a key of its own,
        so that they cannot be matched against address hashes; from the oldest key, so that a
        key rotation does not restart every client's count."""
        if not self.secret_keys:
            raise ConfigError(_missing_key_message(self))
        return hmac.new(
            self.secret_keys[0].encode(), b"mailer.signup-limit.v1", hashlib.sha256
        ).digest()

    @property
    def suppression_key_fingerprint(self) -> str:
        return hashlib.sha256(b"fingerprint:" + self.suppression_key).hexdigest()[:16]

    def display_database_url(self) -> str:
        """The database URL without its password, for messages and logs."""
        return redact_url(self.database_url)


def redact_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _missing_key_message(settings: Settings) -> str:
    if settings.is_sqlite:
        return (
            "no secret key configured: run `mailer init` to generate one, or set MAILER_SECRET_KEYS"
        )
    return (
        "no secret key configured for this production database: set MAILER_SECRET_KEYS "
        "(comma-separated, newest last) or secret_keys in mailer.toml"
    )


def normalise_database_url(raw: str) -> str:
    """`postgresql://` means psycopg 3; anything else is passed to SQLAlchemy as given."""
    try:
        url: URL = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {raw!r}: {exc}") from exc
    if url.drivername in {"postgresql", "postgres"}:
        url = url.set(drivername="postgresql+psycopg")
    elif url.drivername.startswith("sqlite"):
        pass
    elif not url.drivername.startswith("postgresql+"):
        raise ConfigError(
            f"unsupported database {url.drivername!r}: use sqlite:///FILE or postgresql://..."
        )
    return url.render_as_string(hide_password=False)


def sqlite_path(database_url: str) -> Path | None:
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def key_file_for(database_url: str) -> Path | None:
    """Where `mailer init` keeps the generated key of an embedded database: beside the file."""
    path = sqlite_path(database_url)
    return path.with_name(path.name + KEY_FILE_SUFFIX) if path else None


def parse_keys(raw: str, origin: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    for key in keys:
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"{origin}: every secret key must be at least {MIN_KEY_LENGTH} characters"
            )
    return keys


def parse_bool(raw: object, origin: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{origin}: expected true or false, got {raw!r}")


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    section = data.get("mailer", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: expected a [mailer] table")
    unknown = sorted(set(section) - _KNOWN_FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}")
    return section


def load_settings(
    env: Mapping[str, str],
    *,
    database_url: str | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Build the settings from a snapshot of the environment (passed in, never read here)."""
    cwd = cwd or Path.cwd()
    config_path_raw = env.get("MAILER_CONFIG")
    config_path = Path(config_path_raw) if config_path_raw else cwd / CONFIG_FILE
    file_values: dict[str, Any] = {}
    if config_path_raw or config_path.exists():
        file_values = _read_config_file(config_path)
    else:
        config_path = None  # type: ignore[assignment]

    raw_url = (
        database_url
        or env.get("MAILER_DATABASE_URL")
        or file_values.get("database_url")
        or f"sqlite:///{cwd / DEFAULT_SQLITE_FILE}"
    )
    url = normalise_database_url(str(raw_url))

    key_file = key_file_for(url)
    keys: tuple[str, ...] = ()
    if env.get("MAILER_SECRET_KEYS"):
        keys = parse_keys(env["MAILER_SECRET_KEYS"], "MAILER_SECRET_KEYS")
    elif file_values.get("secret_keys"):
        raw_keys = file_values["secret_keys"]
        joined = ",".join(raw_keys) if isinstance(raw_keys, list) else str(raw_keys)
        keys = parse_keys(joined, f"{config_path}: secret_keys")
    elif key_file is not None and key_file.exists():
        keys = parse_keys(key_file.read_text(encoding="utf-8").replace("\n", ","), str(key_file))

    operator = (
        env.get("MAILER_OPERATOR")
        or file_values.get("operator")
        or env.get("USER")
        or env.get("LOGNAME")
        or "operator"
    )

    def pick(env_name: str, file_key: str, default: Any = None) -> Any:
        return env.get(env_name) or file_values.get(file_key) or default

    dkim_key = pick("MAILER_DKIM_KEY_FILE", "dkim_key_file")
    try:
        error_threshold = float(
            pick("MAILER_ERROR_THRESHOLD", "error_threshold", DEFAULT_ERROR_THRESHOLD)
        )
    except ValueError:
        raise ConfigError("MAILER_ERROR_THRESHOLD must be a number between 0 and 1") from None
    if not 0 < error_threshold <= 1:
        raise ConfigError("MAILER_ERROR_THRESHOLD must be a number between 0 and 1")
    return Settings(
        smtp_url=str(pick("MAILER_SMTP_URL", "smtp_url", DEFAULT_SMTP_URL)),
        sender_name=str(pick("MAILER_SENDER_NAME", "sender_name", DEFAULT_SENDER_NAME)),
        postal_address=pick("MAILER_POSTAL_ADDRESS", "postal_address"),
        dkim_selector=pick("MAILER_DKIM_SELECTOR", "dkim_selector"),
        dkim_domain=pick("MAILER_DKIM_DOMAIN", "dkim_domain"),
        dkim_key_file=Path(dkim_key) if dkim_key else None,
        error_threshold=error_threshold,
        brand_color=_colour(pick("MAILER_BRAND_COLOR", "brand_color", DEFAULT_BRAND_COLOR)),
        logo_url=pick("MAILER_LOGO_URL", "logo_url"),
        company_url=pick("MAILER_COMPANY_URL", "company_url"),
        mail_from=pick("MAILER_MAIL_FROM", "mail_from"),
        soft_bounce_limit=_period(
            pick("MAILER_SOFT_BOUNCE_LIMIT", "soft_bounce_limit", DEFAULT_SOFT_BOUNCE_LIMIT),
            "MAILER_SOFT_BOUNCE_LIMIT",
        ),
        retention_events_months=_period(
            pick("MAILER_RETENTION_EVENTS_MONTHS", "retention_events_months", 13),
            "MAILER_RETENTION_EVENTS_MONTHS",
        ),
        retention_unconsented_months=_period(
            pick("MAILER_RETENTION_UNCONSENTED_MONTHS", "retention_unconsented_months", 24),
            "MAILER_RETENTION_UNCONSENTED_MONTHS",
        ),
        retention_unconfirmed_days=_period(
            pick("MAILER_RETENTION_UNCONFIRMED_DAYS", "retention_unconfirmed_days", 30),
            "MAILER_RETENTION_UNCONFIRMED_DAYS",
        ),
        retention_dead_letters_days=_period(
            pick("MAILER_RETENTION_DEAD_LETTERS_DAYS", "retention_dead_letters_days", 90),
            "MAILER_RETENTION_DEAD_LETTERS_DAYS",
        ),
        machine_networks=_machine_networks(env, file_values, config_path),
        webhook_allow_private=parse_bool(
            env.get(
                "MAILER_WEBHOOK_ALLOW_PRIVATE", file_values.get("webhook_allow_private", False)
            ),
            "MAILER_WEBHOOK_ALLOW_PRIVATE",
        ),
        database_url=url,
        secret_keys=keys,
        base_url=str(
            env.get("MAILER_BASE_URL") or file_values.get("base_url") or DEFAULT_BASE_URL
        ).rstrip("/"),
        require_double_opt_in=parse_bool(
            env.get(
                "MAILER_REQUIRE_DOUBLE_OPT_IN", file_values.get("require_double_opt_in", False)
            ),
            "MAILER_REQUIRE_DOUBLE_OPT_IN",
        ),
        operator=str(operator),
        key_file=key_file,
        config_file=config_path,
    )


def _machine_networks(
    env: Mapping[str, str], file_values: Mapping[str, Any], config_path: Path | None
) -> MachineNetworkList:
    if env.get(MACHINE_NETWORKS_ENV):
        return parse_machine_networks(env[MACHINE_NETWORKS_ENV], MACHINE_NETWORKS_ENV)
    if "machine_networks" in file_values:
        return parse_machine_networks(
            file_values["machine_networks"], f"{config_path}: machine_networks"
        )
    return ()


def parse_machine_networks(raw: object, origin: str) -> MachineNetworkList:
    """Machine reasons and their networks: a table of reason -> list of CIDRs (mailer.toml), or
    `reason=CIDR,CIDR;reason=CIDR` (MAILER_MACHINE_NETWORKS; commas or spaces between CIDRs).

    Each network is normalised (host bits cleared, so a pasted address with its prefix is its
    network); a network named for two reasons is refused, as nothing could say which is meant.
    """
    groups: list[tuple[str, list[object]]] = []
    if isinstance(raw, str):
        for part in raw.split(";"):
            if not part.strip():
                continue
            name, equals, listed = part.partition("=")
            if not equals:
                raise ConfigError(
                    f"{origin}: expected REASON=CIDR[,CIDR...], each separated by ';', "
                    f"got {part.strip()!r}"
                )
            groups.append((name, [*_split_networks(listed)]))
    elif isinstance(raw, Mapping):
        for name, value in raw.items():
            if isinstance(value, str):
                groups.append((str(name), [*_split_networks(value)]))
            elif isinstance(value, list):
                groups.append((str(name), value))
            else:
                raise ConfigError(f"{origin}: {name}: expected a list of CIDRs, got {value!r}")
    else:
        raise ConfigError(f"{origin}: expected a table of reason = [CIDR, ...], got {raw!r}")
    allowed = {reason.value: reason for reason in NETWORK_REASONS}
    found: dict[Network, MachineReason] = {}
    for name, items in groups:
        reason = allowed.get(name.strip().lower())
        if reason is None:
            raise ConfigError(
                f"{origin}: {name.strip()!r} is not a machine reason for a network "
                f"(one of: {', '.join(allowed)})"
            )
        for item in items:
            network = _network(item)
            if network is None:
                raise ConfigError(
                    f"{origin}: {reason}: {item!r} is not an IPv4 or IPv6 network "
                    "(such as 192.0.2.0/24 or 2001:db8::/32)"
                )
            other = found.setdefault(network, reason)
            if other is not reason:
                raise ConfigError(f"{origin}: {network} is listed for both {other} and {reason}")
    return tuple((reason, network) for network, reason in found.items())


def _split_networks(raw: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", raw) if item]


def _network(item: object) -> Network | None:
    if not isinstance(item, str):  # ip_network takes an int as an address: not what was meant
        return None
    try:
        return ipaddress.ip_network(item.strip(), strict=False)
    except ValueError:
        return None


def _colour(raw: object) -> str:
    value = str(raw).strip()
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
        raise ConfigError(f"brand colour {value!r} must look like #1d4e89")
    return value


def generate_key_file(path: Path) -> str:
    """Create the key file of an embedded database, readable by its owner only."""
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    return key


def _period(raw: object, origin: str) -> int:
    """A retention period: a whole number of months or days, at least 1."""
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{origin} must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{origin} must be at least 1")
    return value
