"""Routes for destination domains: static routes, else MX (RFC 5321 section 5.1) via dnspython, cached by TTL.

In:  a destination domain (ASCII).
Out: `Route` (MX hosts in preference order, each with its IPv4 addresses) or `RouteFailure`:
- NXDOMAIN, and a null MX (RFC 7505, `MX 0 .`), are permanent: the recipients bounce at once;
- no MX record: the domain itself is the implicit MX (its A records, and AAAA when `ipv6` is on);
- SERVFAIL, timeouts, and MX hosts without addresses are temporary: the recipients are deferred.
Answers (negative ones too, for a short time) are cached for their TTL, so a burst of mail to one domain
costs one lookup.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mtad.model import MxHost, Reply, Route, RouteFailure
from mtad.observe.metrics import DNS_LOOKUPS

NEGATIVE_TTL_S = 60.0
MAX_CACHE_ENTRIES = 100_000


@dataclass(frozen=True)
class StaticRoute:
    host: str
    port: int


def parse_static_routes(table: dict[str, str], default_port: int) -> dict[str, StaticRoute]:
    """`{"example.com": "relay.example.net:2525", "*": "smarthost:25"}` -> StaticRoute per domain."""
    routes = {}
    for domain, target in table.items():
        host, _, port = target.rpartition(":") if ":" in target else (target, "", "")
        routes[domain.lower()] = StaticRoute(host.strip("[]") or target, int(port) if port else default_port)
    return routes


class RouteResolver:
    def __init__(
        self,
        *,
        nameservers: tuple[str, ...],
        dns_port: int,
        timeout_s: float,
        smtp_port: int,
        static_routes: dict[str, StaticRoute],
        ipv6: bool = False,
    ) -> None:
        self._ipv6 = ipv6
        self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = dns_port
        self._resolver.lifetime = timeout_s
        self._resolver.timeout = min(timeout_s, 2.0)
        self._smtp_port = smtp_port
        self._static = static_routes
        self._cache: dict[tuple[str, str], tuple[float, object]] = {}

    async def route(self, domain: str) -> Route | RouteFailure:
        static = self._static.get(domain) or self._static.get("*")
        if static is not None:
            addresses = await self._addresses(static.host)
            if isinstance(addresses, RouteFailure):
                return addresses
            return Route((MxHost(static.host, addresses),), static.port)
        return await self._cached(("route", domain), lambda: self._mx_route(domain))

    async def _mx_route(self, domain: str) -> tuple[Route | RouteFailure, float]:
        answer = await self._query(domain, "MX")
        if isinstance(answer, RouteFailure):
            return answer, NEGATIVE_TTL_S
        if answer is None:  # NODATA: the domain is its own mail host (RFC 5321 5.1)
            exchanges = [domain]
            ttl = NEGATIVE_TTL_S
        else:
            records = sorted(answer, key=lambda r: (r.preference, str(r.exchange)))
            if len(records) == 1 and records[0].exchange == dns.name.root:
                return RouteFailure(True, Reply(556, "5.1.10", f"{domain} does not accept mail (null MX)")), answer.rrset.ttl
            exchanges = [str(r.exchange).rstrip(".").lower() for r in records if r.exchange != dns.name.root]
            ttl = answer.rrset.ttl
        hosts = []
        for name in exchanges:
            addresses = await self._addresses(name)
            if isinstance(addresses, RouteFailure):
                if addresses.permanent:
                    continue  # a dangling MX host is skipped if others remain
                return addresses, NEGATIVE_TTL_S
            hosts.append(MxHost(name, addresses))
        if not hosts:
            return RouteFailure(False, Reply(451, "4.4.4", f"no usable address for the mail hosts of {domain}")), NEGATIVE_TTL_S
        return Route(tuple(hosts), self._smtp_port), ttl

    async def _addresses(self, host: str) -> tuple[str, ...] | RouteFailure:
        if _is_ip(host):
            return (host,)

        async def lookup():
            answers = [await self._query(host, "A")] + ([await self._query(host, "AAAA")] if self._ipv6 else [])
            found = [a for a in answers if a is not None and not isinstance(a, RouteFailure)]
            if not found:
                failure = next((a for a in answers if isinstance(a, RouteFailure)), None)
                if failure is None:
                    failure = RouteFailure(True, Reply(550, "5.4.4", f"mail host {host} has no address"))
                return failure, NEGATIVE_TTL_S
            addresses = tuple(r.address for answer in found for r in sorted(answer, key=lambda r: r.address))
            return addresses, min(answer.rrset.ttl for answer in found)

        return await self._cached(("a", host), lookup)

    async def _query(self, name: str, rdtype: str):
        """The answer, None for NODATA, or RouteFailure."""
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
            DNS_LOOKUPS.labels("ok").inc()
            return answer
        except dns.resolver.NXDOMAIN:
            DNS_LOOKUPS.labels("nxdomain").inc()
            return RouteFailure(True, Reply(550, "5.1.2", f"domain {name} does not exist"))
        except dns.resolver.NoAnswer:
            DNS_LOOKUPS.labels("nodata").inc()
            return None
        except dns.resolver.NoNameservers:
            DNS_LOOKUPS.labels("servfail").inc()
            return RouteFailure(False, Reply(451, "4.4.3", f"DNS lookup of {name} {rdtype} failed temporarily"))
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            DNS_LOOKUPS.labels("timeout").inc()
            return RouteFailure(False, Reply(451, "4.4.3", f"DNS lookup of {name} {rdtype} failed temporarily"))

    async def _cached(self, key: tuple[str, str], compute):
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value, ttl = await compute()
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()  # crude but bounded; a full cache is refilled at the cost of lookups
        self._cache[key] = (now + max(1.0, float(ttl)), value)
        return value


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
