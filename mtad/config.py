"""Settings: a TOML file, then MTAD_* environment variables, validated into frozen dataclasses.

In:  the parsed TOML document and the process environment.
Out: one immutable `Settings`; every leaf key `section.key` can be overridden by `MTAD_SECTION_KEY`
     (`database.url` -> `MTAD_DATABASE_URL`, `state_dir` -> `MTAD_STATE_DIR`).
Invariant: an unknown key or a value of the wrong shape raises `ConfigError` whose message is one line that
     starts with the key, so a wrong config fails at start with a message an operator can act on.

Durations are written "250ms", "60s", "5m", "2h", "5d" (a bare number means seconds); sizes "512", "64KB",
"25MB", "1GB" (powers of 1024); lists from the environment are comma separated.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

Duration = Annotated[float, "duration"]
ByteSize = Annotated[int, "size"]

DEFAULT_CONFIG_PATHS = (Path("config/mtad.toml"), Path("/etc/mtad/mtad.toml"))


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


@dataclass(frozen=True)
class TrustedNetwork:
    """Clients from `network` may submit without AUTH, as `tenant` (explicit opt-in, never a default)."""

    network: str
    tenant: str

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_network(self.network, strict=False)
        except ValueError as exc:
            raise ValueError(f"not an IP network: {self.network!r}") from exc


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""  # empty: use the embedded cluster under state_dir/pg
    auto_migrate: bool = False
    pool_min_size: int = 2
    pool_max_size: int = 10
    embedded_port: int = 0  # 0: pick a free loopback port once, at initdb
    connect_timeout: Duration = 5.0
    command_timeout: Duration = 30.0


@dataclass(frozen=True)
class SubmissionSettings:
    listen: tuple[str, ...] = ("127.0.0.1:587",)
    implicit_tls_listen: tuple[str, ...] = ()
    tls_cert_file: str = ""  # empty: a self-signed certificate is generated under state_dir/tls
    tls_key_file: str = ""
    max_message_size: ByteSize = 25 * 1024 * 1024
    max_recipients: int = 1000
    max_failed_logins: int = 5
    failed_login_window: Duration = 300.0
    idle_timeout: Duration = 300.0
    trusted_networks: tuple[TrustedNetwork, ...] = ()
    max_connections: int = 1000  # open submission connections in all; more get 421
    max_connections_per_client: int = 100  # per client address
    max_queue_recipients: int = 0  # back-pressure: MAIL gets 452 while this many are pending; 0 = no limit


@dataclass(frozen=True)
class QueueSettings:
    lease: Duration = 300.0
    claim_batch_size: int = 200
    poll_interval: Duration = 1.0
    reclaim_interval: Duration = 15.0
    gauge_interval: Duration = 15.0  # how often the queue gauges (/metrics) are refreshed


@dataclass(frozen=True)
class DeliverySettings:
    enabled: bool = True
    ehlo_name: str = ""  # empty: the hostname setting
    smtp_port: int = 25
    nameservers: tuple[str, ...] = ()  # empty: the system resolver configuration
    dns_port: int = 53
    dns_timeout: Duration = 5.0
    ipv6: bool = False  # also deliver to AAAA addresses (needs working outbound IPv6)
    shaping_file: str = ""  # empty: built-in conservative defaults only
    routes: dict[str, str] = field(default_factory=dict)  # domain or "*" -> "host:port", no MX lookup
    max_active_recipients: int = 10_000  # held in memory at once; the rest waits in PostgreSQL
    minimal_backoff_time: Duration = 300.0
    maximal_backoff_time: Duration = 4000.0
    maximal_queue_lifetime: Duration = 5 * 86400.0
    retry_jitter: float = 0.2
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0  # RFC 5321 4.5.3.2: greeting, MAIL, RCPT
    data_timeout: Duration = 600.0  # RFC 5321 4.5.3.2: after the final dot
    status_interval: Duration = 5.0  # how often a node publishes its sites' state for `queue summary`


@dataclass(frozen=True)
class DkimSettings:
    key_dir: str = ""  # empty: state_dir/dkim


@dataclass(frozen=True)
class FeedbackSettings:
    """Mail coming back and unsubscribes: the inbound listener, VERP, List-Unsubscribe."""

    listen: tuple[str, ...] = ()  # inbound SMTP for DSNs, complaints and mailto unsubscribes (port 25 behind MX)
    bounce_domain: str = ""  # VERP return-path domain, MX pointing at `listen`; empty: no VERP, no mailto link
    unsubscribe_url: str = ""  # public base of one-click links, e.g. "https://unsub.example.net/u/"
    secret_file: str = ""  # HMAC key shared by all nodes; empty: state_dir/feedback.key (generated)
    fbl_local_parts: tuple[str, ...] = ("fbl", "abuse")  # @bounce_domain addresses that take ARF reports
    bounce_rules_file: str = ""  # empty: config/bounce_rules.toml of this installation


@dataclass(frozen=True)
class HttpSettings:
    listen: tuple[str, ...] = ("127.0.0.1:8025",)  # unsubscribe pages (and later metrics, health)


@dataclass(frozen=True)
class ClusterSettings:
    """Several nodes on one PostgreSQL: membership by heartbeat, site limits shared by the whole cluster."""

    heartbeat_interval: Duration = 2.0  # how often a node says it is alive and renews its connection slots
    dead_after: Duration = 15.0  # a node silent this long counts as dead; its connection slots lapse
    workers: int = 1  # processes of `mtad run` on this host, sharing the listeners (SO_REUSEPORT)


@dataclass(frozen=True)
class LoggingSettings:
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    mask_client_ips: bool = True  # privacy policy: last octet (/24, IPv6 /48) zeroed in logs and events
    pseudonymise_recipients: bool = False  # recipients in logs as a per-tenant HMAC instead of the address


@dataclass(frozen=True)
class Settings:
    hostname: str = "localhost"  # SMTP banner and EHLO name, Received and Message-ID domain
    state_dir: str = "/var/lib/mtad"
    shutdown_grace: Duration = 30.0
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    submission: SubmissionSettings = field(default_factory=SubmissionSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def dkim_key_path(self) -> Path:
        return Path(self.dkim.key_dir).resolve() if self.dkim.key_dir else self.state_path / "dkim"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
_SIZE_UNIT = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "60s", "5m", "2h", "5d" or a bare number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f'expected a duration like "60s" or "5m", got {value!r}')
    return float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


def parse_size(value: object) -> int:
    """Bytes from "25MB", "64KB", "512" or a bare integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f'expected a size like "25MB", got {value!r}')
    return int(match.group(1)) * _SIZE_UNIT[(match.group(2) or "B").upper()]


def find_config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The file to read: --config, else $MTAD_CONFIG, else the first default that exists."""
    chosen = explicit or environ.get("MTAD_CONFIG")
    if chosen:
        return Path(chosen)
    return next((path for path in DEFAULT_CONFIG_PATHS if path.exists()), None)


def load_settings(path: Path | None, environ: Mapping[str, str] = os.environ) -> Settings:
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(document, environ)


def parse_settings(document: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Pure: the TOML document plus the MTAD_* environment → Settings, or ConfigError naming the key."""
    return _build(Settings, document, environ, prefix="")


def _build(cls: type, section: Mapping[str, Any], environ: Mapping[str, str], prefix: str) -> Any:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in section:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown setting")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, section.get(f.name, {}), environ, key + ".")
            continue
        env_name = "MTAD_" + key.upper().replace(".", "_")
        if env_name in environ:
            raw: Any = _from_environment(hint, environ[env_name])
        elif f.name in section:
            raw = section[f.name]
        else:
            continue
        try:
            values[f.name] = _convert(hint, raw)
        except (TypeError, ValueError) as exc:
            source = f" (from {env_name})" if env_name in environ else ""
            raise ConfigError(f"{key}: {exc}{source}") from None
    return cls(**values)


def _from_environment(hint: Any, text: str) -> Any:
    """Environment values are strings; lists are comma separated, trusted networks `net=tenant`,
    tables `key=value,key=value`."""
    if typing.get_origin(hint) is dict:
        pairs = [item.split("=", 1) for item in text.split(",") if "=" in item]
        return {key.strip(): value.strip() for key, value in pairs}
    if typing.get_origin(hint) is tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if typing.get_args(hint)[0] is TrustedNetwork:
            return [dict(zip(("network", "tenant"), item.split("=", 1))) for item in items]
        return items
    return text


def _convert(hint: Any, raw: Any) -> Any:
    if typing.get_origin(hint) is Annotated:
        kind = hint.__metadata__[0]
        return parse_duration(raw) if kind == "duration" else parse_size(raw)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {raw!r}")
        return raw
    if typing.get_origin(hint) is dict:
        if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError(f"expected a table of strings, got {raw!r}")
        return dict(raw)
    if typing.get_origin(hint) is tuple:
        if not isinstance(raw, (list, tuple)):
            raise ValueError(f"expected a list, got {raw!r}")
        item_type = typing.get_args(hint)[0]
        return tuple(_convert(item_type, item) for item in raw)
    if dataclasses.is_dataclass(hint):
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a table, got {raw!r}")
        try:
            return hint(**raw)
        except TypeError as exc:
            raise ValueError(f"expected keys {', '.join(f.name for f in dataclasses.fields(hint))}: {exc}") from None
    return _convert_scalar(hint, raw)


def _convert_scalar(hint: Any, raw: Any) -> Any:
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"expected true or false, got {raw!r}")
    if hint is int:
        if isinstance(raw, bool):
            raise ValueError(f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if hint is str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {raw!r}") from None
    raise TypeError(f"unsupported setting type {hint}")
