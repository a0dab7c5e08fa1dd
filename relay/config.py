"""The one settings object, built once from the environment and an optional TOML file.

Nothing else in the relay reads `os.environ`. `RELAY_CONFIG` names a TOML file
whose top-level keys are the same names as the environment variables; the
environment wins over the file. Any bad setting raises `ConfigError` with one
line that names it.

    >>> settings = load_settings({"RELAY_LISTEN": "127.0.0.1:2465"})
    >>> settings.listen
    ('127.0.0.1', 2465)
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.errors import ConfigError
from relay.upstreams import (
    RESEND_DOMAIN_PREFIX,
    CloudflareConfig,
    ResendConfig,
    Secret,
    SmtpUpstream,
    api_url,
    cloudflare_config,
    rate,
    resend_teams,
    smtp_config,
)


@dataclass(frozen=True)
class Limits:
    """What one client may use of the relay: sizes, counts and timeouts.

    The defaults are the documented endpoint's; tests build shorter ones
    instead of patching a module:

        >>> Limits().max_recipients, Limits().max_message_size
        (50, 5242880)
        >>> Limits(data_timeout=1.0).data_timeout
        1.0
    """

    # RFC 5321 section 4.5.3.1.8 asks for at least 100 recipients; the endpoint we
    # reproduce documents 50 per session (cloudflare-email-service-smtp.txt, Limits).
    max_recipients: int = 50
    # The documented SIZE: 5 MiB, advertised in EHLO.
    max_message_size: int = 5 * 1024 * 1024
    # The documented AUTH and DATA command timeouts; RFC 5321 section 4.5.3.2.7
    # also asks a server to wait at least 5 minutes for the next command.
    auth_timeout: float = 30.0
    data_timeout: float = 300.0
    command_timeout: float = 300.0
    # Failed AUTH attempts a session may make. smtplib tries PLAIN then LOGIN
    # after one 535, so one wrong password is two failures.
    max_auth_failures: int = 3
    # Commands that move nothing forward (NOOP, RSET, HELP, VRFY, a repeated
    # EHLO, refused or unknown ones) between two delivered messages.
    max_idle_commands: int = 100


@dataclass(frozen=True)
class Upkeep:
    """How often each relay process tends its store.

    >>> Upkeep().sweep_interval
    60.0
    """

    # How often each process looks for charges a dead process left pending.
    sweep_interval: float = 60.0
    # The inline store connection never checkpoints (that would sync the disk on
    # the loop), so the upkeep thread copies the write-ahead log back this often.
    checkpoint_interval: float = 1.0
    # How often a process records that it lives.
    heartbeat_interval: float = 10.0
    # A process whose heartbeat is older than this is dead: a sweep may refund its
    # pending charges. Several heartbeats long, so a slow tick is not a death.
    owner_dead_after: float = 60.0


@dataclass(frozen=True)
class PostgresUrl:
    """`RELAY_DATABASE=postgresql://user:pass@host:5432/db`: a PostgreSQL store shared by
    many relays. Printed without its password.

        >>> str(PostgresUrl("postgresql://relay:s3cret@db:5432/relay"))
        'postgresql://relay:***@db:5432/relay'
    """

    url: str

    def __str__(self) -> str:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", self.url)


def database_location(text: str) -> Path | PostgresUrl:
    """`RELAY_DATABASE`: a PostgreSQL URL, a `sqlite:///path` URL or a plain path (SQLite).

    >>> database_location("sqlite:///var/lib/relay/relay.db")
    PosixPath('/var/lib/relay/relay.db')
    >>> database_location("data/relay.db")
    PosixPath('data/relay.db')
    """
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresUrl(text)
    if text.startswith("sqlite://"):
        return Path(text[len("sqlite://") :])
    if "://" in text:
        raise ConfigError(
            f"RELAY_DATABASE: expected a path, sqlite:///path or postgresql://..., got {text!r}"
        )
    return Path(text)


@dataclass(frozen=True)
class Settings:
    hostname: str = "localhost"
    listen: tuple[str, int] = ("0.0.0.0", 465)  # noqa: S104 - a server listens on all addresses
    # The STARTTLS submission port (RFC 3207, RFC 6409's 587) for clients that cannot
    # speak implicit TLS; None: off. RFC 8314 prefers implicit TLS (RELAY_LISTEN).
    starttls_listen: tuple[str, int] | None = None
    tls_cert: Path = Path("certs/relay.crt")
    tls_key: Path = Path("certs/relay.key")
    database: Path | PostgresUrl = Path("data/relay.db")
    dev_outbox: Path | None = None
    smtp_config: Mapping[str, SmtpUpstream] = field(default_factory=dict)
    resend: ResendConfig = field(default_factory=ResendConfig)
    cloudflare: CloudflareConfig | None = None
    default_send_balance: int = 0
    no_limit_roles: frozenset[str] = frozenset()
    workers: int = 1
    max_connections: int = 10_000
    # One address's share: a mail client pool opens a handful (Nodemailer's
    # default pool is 5), so 20 leaves room and stops one host from taking all.
    max_connections_per_ip: int = 20
    # Failed AUTH from one address within 15 minutes before its connections get
    # 421 at the greeting (relay.store.throttle); tokens carry 256 bits, so this only
    # keeps a guesser from costing the relay work.
    auth_failure_limit: int = 10
    # A session that delivers no message for this long ends with 421 4.4.2, so
    # commands each just inside the command timeout cannot hold a slot for hours.
    session_idle_max: float = 600.0
    # Connections the kernel queues before the loop accepts them (asyncio's default
    # of 100 drops SYNs in a burst of new sessions); the kernel caps it at somaxconn.
    listen_backlog: int = 1024
    # Every upstream call is bounded well inside the client's 300 s DATA budget.
    upstream_timeout: float = 30.0
    # How long a stopping server lets sessions in flight finish.
    drain_timeout: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one JSON object per line
    # Delivery-log records older than this are pruned by the upkeep.
    log_retention_days: int = 30
    # Messages one token may have refused at the end of DATA within 15 minutes
    # (relay.store.refusals) before its next MAIL gets 421 4.7.0; 0: no limit. Each
    # refusal writes a delivery record: this bounds what one token can write.
    refusal_limit: int = 100
    # The delivery log's size cap in MiB: past it the upkeep prunes the oldest
    # records first, whatever their age; 0: no cap, only the retention.
    log_max_mb: int = 1024
    # Where settles the database could not take are journaled (relay.store.journal);
    # None: beside the SQLite database, or data/settle-journal for PostgreSQL.
    settle_journal: Path | None = None
    # The operators' HTTP listener (/metrics, /healthz, /readyz, the admin API and
    # console); None: off. Off loopback it serves TLS only, with this certificate
    # (None: the SMTP one).
    admin_listen: tuple[str, int] | None = None
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    upkeep: Upkeep = field(default_factory=Upkeep)
    # Where uploads past 64 KiB wait for their end (relay.smtp.spool), and the bytes
    # all uploads in progress may hold there (None: a tenth of the free space
    # at start, at most 1 GiB).
    spool_dir: Path = Path("data/spool")
    spool_max_bytes: int | None = None
    # The durable queue (relay.delivery.queue): off (an answer in session, with
    # failover), on-failure (a message no channel can take now is kept and
    # retried), always (kept right after the charge, delivered in the background).
    queue: str = "off"
    queue_backoff: float = 60.0  # the first retry's delay; doubles up to QUEUE_BACKOFF_CAP
    queue_max_age: float = 86400.0  # then the message fails, its undelivered part refunded
    queue_max_messages: int = 10_000
    queue_max_bytes: int = 256 * 1024 * 1024
    # Webhooks (relay.events): the first retry's delay in seconds, doubling to an
    # hour; and whether an endpoint may resolve to a private or loopback address.
    webhook_backoff: float = 30.0
    webhook_allow_private: bool = False
    # Resend's webhook signing secret (`whsec_...`): POST /hooks/resend takes
    # Resend's events signed with it (relay.events.provider); unset, the route is off.
    resend_webhook_secret: Secret | None = None

    @property
    def forward_budget(self) -> float:
        """The whole time one message may spend with its upstream (retries included)."""
        return self.upstream_timeout * 2

    @property
    def settle_journal_dir(self) -> Path:
        if self.settle_journal is not None:
            return self.settle_journal
        if isinstance(self.database, Path):
            return self.database.with_name(self.database.name + "-settles")
        return Path("data/settle-journal")

    @property
    def stale_after(self) -> float:
        """A pending charge older than this belongs to a process that died."""
        return self.forward_budget * 2 + self.upkeep.owner_dead_after


KNOWN = frozenset(
    {
        "RELAY_CONFIG",
        "RELAY_HOSTNAME",
        "RELAY_LISTEN",
        "RELAY_STARTTLS_LISTEN",
        "RELAY_TLS_CERT",
        "RELAY_TLS_KEY",
        "RELAY_DATABASE",
        "RELAY_DEV_OUTBOX",
        "RELAY_WORKERS",
        "RELAY_MAX_CONNECTIONS",
        "RELAY_MAX_CONNECTIONS_PER_IP",
        "RELAY_AUTH_FAILURE_LIMIT",
        "RELAY_SESSION_IDLE_MAX",
        "RELAY_UPSTREAM_TIMEOUT",
        "RELAY_DRAIN_TIMEOUT",
        "RELAY_LOG_LEVEL",
        "RELAY_SWEEP_INTERVAL",
        "RELAY_HEARTBEAT_INTERVAL",
        "RELAY_OWNER_DEAD_AFTER",
        "RELAY_LOG_FORMAT",
        "RELAY_LOG_RETENTION_DAYS",
        "RELAY_REFUSAL_LIMIT",
        "RELAY_LOG_MAX_MB",
        "RELAY_SETTLE_JOURNAL",
        "RELAY_ADMIN_LISTEN",
        "RELAY_ADMIN_TLS_CERT",
        "RELAY_ADMIN_TLS_KEY",
        "SMTP_CONFIG",
        "RESEND_TOKEN",
        "RESEND_API_URL",
        "RESEND_RATE_LIMIT",
        "RESEND_TEAMS",
        "CLOUDFLARE_ACCOUNT_ID",
        "CLOUDFLARE_API_TOKEN",
        "CLOUDFLARE_API_URL",
        "DEFAULT_SEND_BALANCE",
        "NO_LIMIT_SEND_ROLE",
        "RELAY_LISTEN_BACKLOG",
        "RELAY_SPOOL_DIR",
        "RELAY_SPOOL_MAX_BYTES",
        "RELAY_QUEUE",
        "RELAY_QUEUE_BACKOFF",
        "RELAY_QUEUE_MAX_AGE",
        "RELAY_QUEUE_MAX_MESSAGES",
        "RELAY_QUEUE_MAX_BYTES",
        "RELAY_WEBHOOK_BACKOFF",
        "RELAY_WEBHOOK_ALLOW_PRIVATE",
        "RESEND_WEBHOOK_SECRET",
    }
)
QUEUE_MODES = ("off", "on-failure", "always")
# The longest wait between two attempts at a queued message.
QUEUE_BACKOFF_CAP = 3600.0
# SQLite stores integers as signed 64-bit: a balance beyond cannot be charged.
SQLITE_MAX_INT = 2**63 - 1
# More worker processes than this only add context switches and memory.
WORKERS_PER_CPU = 4
# Below this an upstream cannot even finish a TLS handshake; 0.1 s still lets a
# test make an upstream time out on purpose.
MIN_UPSTREAM_TIMEOUT = 0.1
# The mechanisms relay.channels.smtp_upstream can use to log in to an upstream.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
# Ten years: a longer retention is a typo, and the delivery log would outgrow the disk.
MAX_LOG_RETENTION_DAYS = 3650
# A day: a session slot held longer without a message is no longer a session.
MAX_SESSION_IDLE = 86400.0


def is_known_setting(name: str) -> bool:
    return name in KNOWN or (
        name.startswith(RESEND_DOMAIN_PREFIX) and len(name) > len(RESEND_DOMAIN_PREFIX)
    )


# RFC 5321 section 4.1.2's Domain: dot-separated labels of letters, digits and
# hyphens (RFC 1035 section 2.3.1), each at most 63 octets (RFC 1035 section
# 2.3.4), the whole at most 255 (RFC 5321 section 4.5.3.1.2). The name is written
# into the greeting and every EHLO reply: a space or CR LF there would be read
# by clients as the end of the reply, or as another one.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _hostname(value: str | None) -> str | None:
    """RELAY_HOSTNAME, checked; None when unset (the machine's FQDN is used)."""
    if not value:
        return None
    labels = value.split(".")
    if len(value) > 255 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"RELAY_HOSTNAME: expected a domain name such as smtp.example.com, got {value!r}"
        )
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment (default `os.environ`) and `RELAY_CONFIG`."""
    env = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    if env.get("RELAY_CONFIG"):
        raw.update(_read_toml(Path(env["RELAY_CONFIG"])))
    # An empty variable (compose passes `${X:-}`) does not override the file.
    raw.update({k: v for k, v in env.items() if is_known_setting(k) and v != ""})

    def text(name: str, default: str | None = None) -> str | None:
        value = raw.get(name, default)
        if value is None or value == "":
            return default
        if isinstance(value, bool) or not isinstance(value, str | int):
            # TOML `false` must not become the path "False".
            raise ConfigError(f"{name}: expected a string, got {type(value).__name__}")
        return str(value)

    roles = raw.get("NO_LIMIT_SEND_ROLE") or ""
    if isinstance(roles, list) and all(isinstance(r, str) for r in roles):
        roles = ",".join(roles)  # TOML may give a list
    elif not isinstance(roles, str):
        raise ConfigError("NO_LIMIT_SEND_ROLE: expected a comma list of roles")
    level = (text("RELAY_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"RELAY_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, got {level}")
    log_format = (text("RELAY_LOG_FORMAT") or "text").lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"RELAY_LOG_FORMAT: expected text or json, got {log_format}")
    admin = text("RELAY_ADMIN_LISTEN")
    listen = _host_port(text("RELAY_LISTEN", "0.0.0.0:465") or "")
    starttls = text("RELAY_STARTTLS_LISTEN")
    starttls_listen = _host_port(starttls, "RELAY_STARTTLS_LISTEN") if starttls else None
    if starttls_listen == listen and listen[1] != 0:
        raise ConfigError(
            f"RELAY_STARTTLS_LISTEN: {starttls} is RELAY_LISTEN's address too; the STARTTLS"
            " port needs one of its own (587)"
        )
    database = database_location(text("RELAY_DATABASE", "data/relay.db") or "")
    upkeep = Upkeep(
        sweep_interval=_number(raw, "RELAY_SWEEP_INTERVAL", Upkeep.sweep_interval, maximum=3600),
        heartbeat_interval=_number(
            raw, "RELAY_HEARTBEAT_INTERVAL", Upkeep.heartbeat_interval, maximum=600
        ),
        owner_dead_after=_number(
            raw, "RELAY_OWNER_DEAD_AFTER", Upkeep.owner_dead_after, maximum=86400
        ),
    )
    if upkeep.owner_dead_after < 2 * upkeep.heartbeat_interval:
        raise ConfigError(
            "RELAY_OWNER_DEAD_AFTER: must be at least two heartbeats"
            f" (RELAY_HEARTBEAT_INTERVAL={upkeep.heartbeat_interval:g}), got"
            f" {upkeep.owner_dead_after:g}: a live relay's charges would be refunded"
        )

    resend_token = text("RESEND_TOKEN")
    resend_domains = {
        k[len(RESEND_DOMAIN_PREFIX) :].upper(): Secret(str(v))
        for k, v in raw.items()
        if k.startswith(RESEND_DOMAIN_PREFIX) and v
    }
    return Settings(
        hostname=_hostname(text("RELAY_HOSTNAME")) or socket.getfqdn(),
        listen=listen,
        starttls_listen=starttls_listen,
        tls_cert=Path(text("RELAY_TLS_CERT", "certs/relay.crt") or ""),
        tls_key=Path(text("RELAY_TLS_KEY", "certs/relay.key") or ""),
        database=database,
        dev_outbox=Path(p) if (p := text("RELAY_DEV_OUTBOX")) else None,
        smtp_config=smtp_config(raw.get("SMTP_CONFIG")),
        resend=ResendConfig(
            token=Secret(resend_token) if resend_token else None,
            domain_tokens=resend_domains,
            api_url=api_url("RESEND_API_URL", text("RESEND_API_URL") or ResendConfig.api_url),
            rate_limit=rate(raw.get("RESEND_RATE_LIMIT"), "RESEND_RATE_LIMIT") or 5.0,
            teams=resend_teams(raw.get("RESEND_TEAMS"), resend_domains, bool(resend_token)),
        ),
        cloudflare=cloudflare_config(text),
        default_send_balance=_integer(
            raw, "DEFAULT_SEND_BALANCE", 0, minimum=0, maximum=SQLITE_MAX_INT
        ),
        no_limit_roles=frozenset(r.strip() for r in roles.split(",") if r.strip()),
        workers=_integer(raw, "RELAY_WORKERS", 1, minimum=1, maximum=max_workers()),
        max_connections=_integer(raw, "RELAY_MAX_CONNECTIONS", 10_000, minimum=1),
        max_connections_per_ip=_integer(raw, "RELAY_MAX_CONNECTIONS_PER_IP", 20, minimum=1),
        auth_failure_limit=_integer(raw, "RELAY_AUTH_FAILURE_LIMIT", 10, minimum=1),
        session_idle_max=_number(
            raw, "RELAY_SESSION_IDLE_MAX", 600.0, minimum=1, maximum=MAX_SESSION_IDLE
        ),
        listen_backlog=_integer(raw, "RELAY_LISTEN_BACKLOG", 1024, minimum=1, maximum=65535),
        # A forward gets twice this: at most half the client's DATA budget.
        upstream_timeout=_number(
            raw,
            "RELAY_UPSTREAM_TIMEOUT",
            30.0,
            minimum=MIN_UPSTREAM_TIMEOUT,
            maximum=Limits.data_timeout / 4,
        ),
        drain_timeout=_number(raw, "RELAY_DRAIN_TIMEOUT", 30.0, maximum=3600),
        log_level=level,
        log_format=log_format,
        log_retention_days=_integer(
            raw, "RELAY_LOG_RETENTION_DAYS", 30, minimum=0, maximum=MAX_LOG_RETENTION_DAYS
        ),
        refusal_limit=_integer(raw, "RELAY_REFUSAL_LIMIT", 100, minimum=0),
        log_max_mb=_integer(raw, "RELAY_LOG_MAX_MB", 1024, minimum=0),
        settle_journal=Path(p) if (p := text("RELAY_SETTLE_JOURNAL")) else None,
        admin_listen=_host_port(admin, "RELAY_ADMIN_LISTEN") if admin else None,
        admin_tls_cert=Path(p) if (p := text("RELAY_ADMIN_TLS_CERT")) else None,
        admin_tls_key=Path(p) if (p := text("RELAY_ADMIN_TLS_KEY")) else None,
        upkeep=upkeep,
        spool_dir=Path(p) if (p := text("RELAY_SPOOL_DIR")) else spool_dir_for(database),
        spool_max_bytes=_integer(raw, "RELAY_SPOOL_MAX_BYTES", 0, minimum=MIN_SPOOL_BYTES) or None,
        queue=queue_mode(text("RELAY_QUEUE") or "off", "RELAY_QUEUE"),
        queue_backoff=_number(raw, "RELAY_QUEUE_BACKOFF", 60.0, maximum=QUEUE_BACKOFF_CAP),
        queue_max_age=_number(raw, "RELAY_QUEUE_MAX_AGE", 86400.0, maximum=30 * 86400),
        queue_max_messages=_integer(raw, "RELAY_QUEUE_MAX_MESSAGES", 10_000, minimum=1),
        queue_max_bytes=_integer(
            raw, "RELAY_QUEUE_MAX_BYTES", 256 * 1024 * 1024, minimum=MIN_SPOOL_BYTES
        ),
        webhook_backoff=_number(raw, "RELAY_WEBHOOK_BACKOFF", 30.0, minimum=0.01, maximum=3600),
        webhook_allow_private=_boolean(raw, "RELAY_WEBHOOK_ALLOW_PRIVATE"),
        resend_webhook_secret=_webhook_secret(text("RESEND_WEBHOOK_SECRET")),
    )


def queue_mode(value: str, name: str) -> str:
    """`off`, `on-failure` or `always` (RELAY_QUEUE, or an account's override)."""
    mode = value.strip().lower()
    if mode not in QUEUE_MODES:
        raise ConfigError(f"{name}: expected one of {', '.join(QUEUE_MODES)}, got {value!r}")
    return mode


# RELAY_SPOOL_MAX_BYTES: below one upload's in-memory part and a little more, every
# large message would be refused.
MIN_SPOOL_BYTES = 1024 * 1024


def spool_dir_for(database: Path | PostgresUrl) -> Path:
    """`RELAY_SPOOL_DIR` when unset: `spool` beside the SQLite database, else `data/spool`.

    Not TMPDIR: that is often a small tmpfs (memory) shared with everything else.

        >>> spool_dir_for(Path("/var/lib/relay/relay.db"))
        PosixPath('/var/lib/relay/spool')
        >>> spool_dir_for(PostgresUrl("postgresql://relay@db/relay"))
        PosixPath('data/spool')
    """
    return database.parent / "spool" if isinstance(database, Path) else Path("data/spool")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"RELAY_CONFIG: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"RELAY_CONFIG: {path} is not valid TOML: {exc}") from exc


def _host_port(value: str, name: str = "RELAY_LISTEN") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def max_workers() -> int:
    """The most worker processes `RELAY_WORKERS` and `--workers` accept."""
    return WORKERS_PER_CPU * (os.cpu_count() or 1)


def _integer(
    raw: Mapping[str, Any], name: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    value = raw.get(name)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool | float):
            raise TypeError  # TOML 2.9 must not become 2, nor true 1
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name}: must be at most {maximum}, got {number}")
    return number


def _webhook_secret(value: str | None) -> Secret | None:
    """A `whsec_` secret: base64 after the prefix (Svix's format); never echoed."""
    if not value:
        return None
    body = value.removeprefix("whsec_")
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not value.startswith("whsec_") or len(key) < 16:
        raise ConfigError("RESEND_WEBHOOK_SECRET: expected Resend's signing secret, whsec_...")
    return Secret(value)


def _boolean(raw: Mapping[str, Any], name: str) -> bool:
    """`true` or `false` (any case; TOML's booleans too); unset is false."""
    value = raw.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ConfigError(f"{name}: expected true or false, got {str(value)[:20]!r}")
    return text == "true"


def _number(
    raw: Mapping[str, Any], name: str, default: float, *, maximum: float, minimum: float = 0.0
) -> float:
    value = raw.get(name)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number of seconds, got {value!r}") from None
    if not (0 < number and minimum <= number <= maximum):
        raise ConfigError(
            f"{name}: must be between {minimum:g} and {maximum:g} seconds, got {value}"
        )
    return number


# --- upstream API URLs and the warnings a start logs -----------------------------------


def start_warnings(settings: Settings) -> list[str]:
    """What `relay serve` logs at WARNING, once, as it starts: settings that work,
    but not as a production relay should."""
    apis = []
    if settings.resend.configured:
        apis.append(("RESEND_API_URL", settings.resend.api_url))
    if settings.cloudflare is not None:
        apis.append(("CLOUDFLARE_API_URL", settings.cloudflare.api_url))
    warnings = [
        f"{name}: plain http:// to {urlsplit(url).hostname}: the API key crosses loopback"
        " unencrypted (for a test double or a local proxy only)"
        for name, url in apis
        if urlsplit(url).scheme.lower() == "http"
    ]
    warnings += [
        f"SMTP_CONFIG[{domain!r}]: unknown key(s) ignored: {', '.join(entry.unknown_keys)}"
        for domain, entry in settings.smtp_config.items()
        if entry.unknown_keys
    ]
    if settings.webhook_allow_private:
        warnings.append(
            "RELAY_WEBHOOK_ALLOW_PRIVATE=true: webhook endpoints may reach loopback, private"
            " and link-local addresses (for tests and private networks only)"
        )
    missing = no_channel(settings)
    return warnings + ([missing] if missing else [])


def no_channel(settings: Settings) -> str | None:
    """Why the relay can send nothing (no channel is configured), or None."""
    if settings.smtp_config or settings.resend.configured or settings.cloudflare:
        return None
    if settings.dev_outbox:
        return None
    return (
        "no channel configured: set SMTP_CONFIG, RESEND_TOKEN, CLOUDFLARE_ACCOUNT_ID with"
        " CLOUDFLARE_API_TOKEN, or RELAY_DEV_OUTBOX; until then every MAIL FROM gets 451 4.3.0"
    )
