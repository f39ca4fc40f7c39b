"""Traffic shaping as data (after KumoMTA's shaping.toml): `[default]` <- `[provider.NAME]` <- `[domain."x"]`.

In:  the parsed shaping document; a destination domain and its MX host names.
Out: `SiteShape`: the site the destination belongs to and the limits that apply to it.
Rollup: every domain whose MX hosts match a provider's `match_mx_suffix` is one site (all Google-hosted
domains share the site "google"), so a limit is a limit towards the provider, not towards each domain.
Other destinations are one site per set of MX hosts (two domains on the same MX servers share a site).
Unknown keys are refused, so a typo cannot silently leave a limit at its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from mtad.policy.rate import parse_rate


def _seconds(value: Any) -> float:
    # Local copy of the config duration grammar: policy must not import the I/O-side config module.
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    for unit in ("ms", "s", "m", "h", "d"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * units[unit]
    raise ValueError(f'expected a duration like "30s", got {value!r}')


@dataclass(frozen=True)
class ShapeLimits:
    connection_limit: int = 5
    initial_destination_concurrency: int = 2
    max_message_rate: float | None = None  # messages per second; None: no rate limit
    max_connection_rate: float | None = None  # new connections per second
    max_deliveries_per_connection: int = 100
    max_recipients_per_transaction: int = 50
    idle_timeout_s: float = 30.0
    tls: str = "opportunistic"  # opportunistic | required | disabled
    tls_verify: bool = False  # check the certificate against the MX host name
    dead_after_failures: int = 3  # consecutive failed sessions that declare the site dead
    dead_for_s: float = 60.0
    backoff_for_s: float = 60.0  # how long a throttle reply keeps the site slowed down
    backoff_min_rate_scale: float = 0.125

    def __post_init__(self) -> None:
        if self.tls not in ("opportunistic", "required", "disabled"):
            raise ValueError(f"tls must be opportunistic, required or disabled, not {self.tls!r}")
        if self.connection_limit < 1 or self.initial_destination_concurrency < 1:
            raise ValueError("connection_limit and initial_destination_concurrency must be at least 1")


_CONVERTERS = {
    "max_message_rate": parse_rate,
    "max_connection_rate": parse_rate,
    "idle_timeout": _seconds,
    "dead_for": _seconds,
    "backoff_for": _seconds,
}
_RENAMED = {"idle_timeout": "idle_timeout_s", "dead_for": "dead_for_s", "backoff_for": "backoff_for_s"}
_LIMIT_FIELDS = {f.name for f in dataclasses.fields(ShapeLimits)}


def _limits_from(base: ShapeLimits, table: Mapping[str, Any], where: str) -> ShapeLimits:
    changes = {}
    for key, value in table.items():
        if key == "match_mx_suffix":
            continue
        name = _RENAMED.get(key, key)
        if name not in _LIMIT_FIELDS:
            raise ValueError(f"{where}.{key}: unknown shaping setting")
        try:
            changes[name] = _CONVERTERS[key](value) if key in _CONVERTERS else value
        except ValueError as exc:
            raise ValueError(f"{where}.{key}: {exc}") from None
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class SiteShape:
    site: str  # throttling key: a provider name, or "mx:" + the sorted MX host names
    provider: str | None  # the configured provider, for metrics labels ("other" when None)
    limits: ShapeLimits


@dataclass(frozen=True)
class ShapingRules:
    default: ShapeLimits = field(default_factory=ShapeLimits)
    providers: tuple[tuple[str, tuple[str, ...], ShapeLimits], ...] = ()
    domains: Mapping[str, ShapeLimits] = field(default_factory=dict)
    throttle_patterns: tuple[str, ...] = ()

    def shape_for(self, domain: str, mx_hosts: tuple[str, ...]) -> SiteShape:
        provider = self.provider_of(mx_hosts)
        if provider is not None:
            name, limits = provider
            site = name
        else:
            name, limits = None, self.default
            site = "mx:" + ",".join(sorted(h.lower().rstrip(".") for h in mx_hosts)) if mx_hosts else domain
        if domain in self.domains:  # a per-domain override makes the domain its own site
            return SiteShape(site=f"domain:{domain}", provider=name, limits=self.domains[domain])
        return SiteShape(site=site, provider=name, limits=limits)

    def provider_of(self, mx_hosts: tuple[str, ...]) -> tuple[str, ShapeLimits] | None:
        for name, suffixes, limits in self.providers:
            if any(h.lower().rstrip(".").endswith(suffix) for h in mx_hosts for suffix in suffixes):
                return name, limits
        return None


def parse_shaping(document: Mapping[str, Any]) -> ShapingRules:
    unknown = set(document) - {"default", "provider", "domain", "throttle"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown shaping section")
    default = _limits_from(ShapeLimits(), document.get("default", {}), "default")
    providers = []
    for name, table in document.get("provider", {}).items():
        suffixes = tuple(s.lower() for s in table.get("match_mx_suffix", ()))
        if not suffixes:
            raise ValueError(f"provider.{name}.match_mx_suffix: a provider needs at least one MX suffix")
        providers.append((name, suffixes, _limits_from(default, table, f"provider.{name}")))
    domains = {
        domain.lower(): _limits_from(default, table, f'domain."{domain}"')
        for domain, table in document.get("domain", {}).items()
    }
    patterns = tuple(document.get("throttle", {}).get("patterns", ()))
    return ShapingRules(default=default, providers=tuple(providers), domains=domains, throttle_patterns=patterns)
