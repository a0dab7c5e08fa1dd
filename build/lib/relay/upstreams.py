"""The upstream channels' settings: `SMTP_CONFIG` (worker-mailer's format), Resend's and
Cloudflare's keys and API URLs, each checked once at start with one clean line.

Part of the one settings object (`relay.config.Settings` holds these values);
kept apart because each upstream's format is a document of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from relay.errors import ConfigError
from relay.network import is_loopback


class Secret(str):
    """A string that never prints itself (settings are logged on start)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


@dataclass(frozen=True)
class SmtpUpstream:
    """One `SMTP_CONFIG` entry, in the worker-mailer format users already have."""

    host: str
    port: int
    secure: bool = False  # implicit TLS from the first byte (port 465)
    start_tls: bool = True  # upgrade when the upstream offers STARTTLS
    # worker-mailer's default is no authType at all (src/mailer.ts: `[]`); empty
    # here means "not given": the first of UPSTREAM_AUTH_TYPES the upstream offers.
    auth_types: tuple[str, ...] = ()
    username: str | None = None
    password: Secret | None = None
    verify_tls: bool = True
    ca: str | None = None  # a PEM file path or PEM text
    # Credentials go only over TLS unless the entry says `tls.allowPlaintextAuth`.
    allow_plaintext_auth: bool = False
    rate: float | None = None  # messages per second this upstream takes (None: no pacing)
    # Keys neither worker-mailer nor the relay knows (a typo?): named at start.
    unknown_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResendConfig:
    token: Secret | None = None
    domain_tokens: Mapping[str, Secret] = field(default_factory=dict)
    api_url: str = "https://api.resend.com"
    # Requests per second per team. Resend's documented default is 5 per second
    # per team, across all of its API keys (resend.com/docs/api-reference/rate-limit;
    # earlier versions of that page said 2). Keys of one team share it.
    rate_limit: float = 5.0
    # RESEND_TEAMS: the team of each key, by its setting's suffix ("" for
    # RESEND_TOKEN, "EXAMPLE_COM" for RESEND_TOKEN_EXAMPLE_COM). A key named in
    # no team shares the default one: by default every key is of one team.
    teams: Mapping[str, str] = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        return bool(self.token or self.domain_tokens)

    def token_for(self, domain: str) -> Secret | None:
        """`RESEND_TOKEN_<DOMAIN>` (upper-cased, dots to `_`) wins over `RESEND_TOKEN`."""
        return self.domain_tokens.get(resend_domain_key(domain)) or self.token

    def team_for(self, domain: str) -> str:
        """The team whose rate the key for `domain` spends (never the key itself)."""
        key = resend_domain_key(domain)
        suffix = key if self.domain_tokens.get(key) else ""
        return self.teams.get(suffix, DEFAULT_TEAM)


DEFAULT_TEAM = "default"


def resend_teams(value: Any, domain_tokens: Mapping[str, str], token: bool) -> dict[str, str]:
    """`RESEND_TEAMS`: teams separated by `;`, each the comma-separated names of
    the key settings of one Resend team, e.g.
    `RESEND_TOKEN,RESEND_TOKEN_A_COM;RESEND_TOKEN_B_ORG`. Names only, never keys.

        >>> resend_teams("RESEND_TOKEN_A_COM;RESEND_TOKEN", {"A_COM": "k"}, True)
        {'A_COM': 'team-1', '': 'team-2'}
    """
    if value is None or str(value).strip() == "":
        return {}
    teams: dict[str, str] = {}
    for index, group in enumerate(str(value).split(";"), start=1):
        for name in (n.strip() for n in group.split(",")):
            if not name:
                continue
            upper = name.upper()
            if upper == "RESEND_TOKEN" and token:
                suffix = ""
            elif (
                upper.startswith(RESEND_DOMAIN_PREFIX)
                and upper[len(RESEND_DOMAIN_PREFIX) :] in domain_tokens
            ):
                suffix = upper[len(RESEND_DOMAIN_PREFIX) :]
            else:
                raise ConfigError(f"RESEND_TEAMS: {name[:60]!r} names no configured Resend key")
            if suffix in teams:
                raise ConfigError(f"RESEND_TEAMS: {name[:60]!r} is in two teams")
            teams[suffix] = f"team-{index}"
    return teams


@dataclass(frozen=True)
class CloudflareConfig:
    account_id: str
    api_token: Secret
    api_url: str = "https://api.cloudflare.com/client/v4"


# worker-mailer's AuthType, in the order its `auth()` prefers them (src/mailer.ts).
UPSTREAM_AUTH_TYPES = ("plain", "login", "cram-md5")
# The keys worker-mailer's WorkerMailerOptions takes (src/mailer.ts) that the relay
# reads no value from: `dsn` (the relay passes the client's own DSN parameters as
# they came, or none), `logLevel` (the relay's log has its own level) and the
# timeouts (RELAY_UPSTREAM_TIMEOUT bounds every call). Accepted and ignored, so an
# entry pasted from a worker-mailer setup starts unchanged.
WORKER_MAILER_IGNORED = frozenset({"dsn", "logLevel", "socketTimeoutMs", "responseTimeoutMs"})
# What the relay adds to worker-mailer's format: `tls` (rejectUnauthorized, ca,
# allowPlaintextAuth) and `rate`.
KNOWN_KEYS = (
    frozenset({"host", "port", "secure", "startTls", "authType", "credentials", "tls", "rate"})
    | WORKER_MAILER_IGNORED
)
RESEND_DOMAIN_PREFIX = "RESEND_TOKEN_"


def resend_domain_key(domain: str) -> str:
    return domain.upper().replace(".", "_")


def cloudflare_config(text: Any) -> CloudflareConfig | None:
    account, token = text("CLOUDFLARE_ACCOUNT_ID"), text("CLOUDFLARE_API_TOKEN")
    # Checked even while unused: a bad setting stops the start, not a later edit.
    url = api_url("CLOUDFLARE_API_URL", text("CLOUDFLARE_API_URL") or CloudflareConfig.api_url)
    if not account and not token:
        return None
    if not account or not token:
        missing = "CLOUDFLARE_ACCOUNT_ID" if not account else "CLOUDFLARE_API_TOKEN"
        raise ConfigError(f"{missing}: Cloudflare needs both the account id and the API token")
    return CloudflareConfig(account, Secret(token), url)


def smtp_config(value: Any) -> dict[str, SmtpUpstream]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"SMTP_CONFIG: not valid JSON ({exc.msg} at char {exc.pos})"
            ) from None
    if not isinstance(value, dict):
        raise ConfigError("SMTP_CONFIG: expected a JSON object keyed by sender domain")
    for domain in value:
        if not str(domain).strip():
            raise ConfigError("SMTP_CONFIG: a sender domain key is empty")
    return {str(domain).lower(): _smtp_entry(str(domain), entry) for domain, entry in value.items()}


def _smtp_entry(domain: str, entry: Any) -> SmtpUpstream:
    where = f"SMTP_CONFIG[{domain!r}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object with host and port")
    host, port = entry.get("host"), entry.get("port", 465 if entry.get("secure") else 587)
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}.host: required")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{where}.port: expected a port number, got {port!r}")
    auth = entry.get("authType")
    if auth is None:
        auth = []
    if isinstance(auth, str):
        auth = [auth]
    if not isinstance(auth, list) or not all(isinstance(a, str) for a in auth):
        raise ConfigError(f'{where}.authType: expected a list such as ["plain", "login"]')
    for kind in auth:
        if kind.lower() not in UPSTREAM_AUTH_TYPES:
            raise ConfigError(
                f"{where}.authType: {kind!r} is not supported"
                f" (use {', '.join(UPSTREAM_AUTH_TYPES)})"
            )
    creds = entry.get("credentials") or {}
    if not isinstance(creds, dict):
        raise ConfigError(f"{where}.credentials: expected {{username, password}}")
    tls = entry.get("tls") or {}
    if not isinstance(tls, dict):
        raise ConfigError(f"{where}.tls: expected {{rejectUnauthorized, ca, allowPlaintextAuth}}")
    password, username, ca = creds.get("password"), creds.get("username"), tls.get("ca")
    for name, value in (("credentials.username", username), ("credentials.password", password),
                        ("tls.ca", ca)):  # fmt: skip
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}.{name}: expected a string")
    return SmtpUpstream(
        host=host,
        port=port,
        secure=_flag(entry, "secure", False, where),
        start_tls=_flag(entry, "startTls", True, where),
        auth_types=tuple(a.lower() for a in auth),
        username=username or None,
        password=Secret(password) if password else None,
        verify_tls=_flag(tls, "rejectUnauthorized", True, f"{where}.tls"),
        ca=ca or None,
        allow_plaintext_auth=_flag(tls, "allowPlaintextAuth", False, f"{where}.tls"),
        rate=rate(entry.get("rate"), f"{where}.rate"),
        unknown_keys=tuple(sorted(str(k) for k in entry if k not in KNOWN_KEYS)),
    )


def rate(value: Any, name: str) -> float | None:
    """A positive number per second, or None when not set."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number per second, got {value!r}") from None
    if not 0 < number <= 10_000:
        raise ConfigError(f"{name}: must be above 0 and at most 10000 per second, got {value}")
    return number


def _flag(entry: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    # JSON "false" (a string) is true to bool(): take only real booleans.
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def api_url(name: str, value: str) -> str:
    """An upstream API's base URL, without its trailing slash, or a `ConfigError`.

    The relay sends its API key in every request's Authorization header, so the
    URL must be `https://`; plain `http://` only to a loopback host (a test
    double, a local proxy), which `start_warnings` names. Credentials in the URL
    are refused (the key has its own setting), and so is a query or fragment (the
    channel appends its paths). Errors never print the URL: it may hold a secret.

        >>> api_url("RESEND_API_URL", "https://api.resend.com/")
        'https://api.resend.com'
    """
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{name}: a URL holds no spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - a port out of range or not a number raises here
    except ValueError:
        raise ConfigError(f"{name}: not a URL (expected https://host/path)") from None
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in ("https", "http"):
        raise ConfigError(f"{name}: expected an https:// URL, got {scheme or 'no'} scheme")
    if "@" in parts.netloc:
        raise ConfigError(
            f"{name}: a URL with credentials in it is refused (the key has its own setting)"
        )
    if not host:
        raise ConfigError(f"{name}: the URL names no host")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ConfigError(f"{name}: a base URL takes no ?query or #fragment")
    if scheme == "http" and not is_loopback(host):
        raise ConfigError(
            f"{name}: plain http:// would send the API key unencrypted to {host};"
            " use https:// (http:// is accepted only to a loopback host)"
        )
    return value.rstrip("/")
