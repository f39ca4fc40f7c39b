"""Routes from a real DNS server on loopback: MX order, implicit MX, null MX, failures, cache, static routes."""

from __future__ import annotations

import pytest

from mtad.deliver.resolver import RouteResolver, parse_static_routes
from mtad.model import Route, RouteFailure
from mtad.simulate.dns_server import FakeDNS


@pytest.fixture
async def dns():
    async with FakeDNS() as server:
        yield server


def resolver(dns, **kwargs) -> RouteResolver:
    options = {"static_routes": {}, "smtp_port": 25, **kwargs}
    return RouteResolver(nameservers=("127.0.0.1",), dns_port=dns.port, timeout_s=1.0, **options)


async def test_mx_hosts_come_in_preference_order_with_their_addresses(dns):
    dns.add_mx("shop.example", [(20, "backup.mx.example"), (10, "primary.mx.example")])
    dns.add_a("primary.mx.example", "127.0.0.2")
    dns.add_a("backup.mx.example", "127.0.0.3")
    dns.add_a("backup.mx.example", "127.0.0.4")
    route = await resolver(dns).route("shop.example")
    assert isinstance(route, Route) and route.port == 25
    assert [(h.name, h.addresses) for h in route.hosts] == [
        ("primary.mx.example", ("127.0.0.2",)),
        ("backup.mx.example", ("127.0.0.3", "127.0.0.4")),
    ]


async def test_a_domain_without_mx_is_its_own_mail_host(dns):
    dns.add_a("plain.example", "127.0.0.5")
    dns.add_aaaa("plain.example", "::1")
    route = await resolver(dns).route("plain.example")
    assert [(h.name, h.addresses) for h in route.hosts] == [("plain.example", ("127.0.0.5",))]
    with_v6 = await resolver(dns, ipv6=True).route("plain.example")
    assert with_v6.hosts[0].addresses == ("127.0.0.5", "::1")


async def test_nxdomain_and_null_mx_are_permanent(dns):
    dns.null_mx("nomail.example")
    nx = await resolver(dns).route("nowhere.example")
    null = await resolver(dns).route("nomail.example")
    assert isinstance(nx, RouteFailure) and nx.permanent and nx.reply.enhanced == "5.1.2"
    assert isinstance(null, RouteFailure) and null.permanent and (null.reply.code, null.reply.enhanced) == (556, "5.1.10")


async def test_servfail_and_timeouts_are_temporary(dns):
    dns.servfail("broken.example")
    dns.timeout("slow.example")
    for domain in ("broken.example", "slow.example"):
        failure = await resolver(dns).route(domain)
        assert isinstance(failure, RouteFailure) and not failure.permanent and failure.reply.code == 451


async def test_answers_are_cached_for_their_ttl(dns):
    dns.add_mx("busy.example", [(10, "mx.busy.example")])
    dns.add_a("mx.busy.example", "127.0.0.2")
    routes = resolver(dns)
    for _ in range(20):
        assert isinstance(await routes.route("busy.example"), Route)
    assert dns.count("busy.example", "MX") == 1 and dns.count("mx.busy.example", "A") == 1


async def test_static_routes_skip_the_mx_lookup(dns):
    routes = resolver(dns, static_routes=parse_static_routes({"special.example": "127.0.0.9:2525", "*": "127.0.0.8"}, 25))
    special = await routes.route("special.example")
    other = await routes.route("anything.example")
    assert (special.hosts[0].addresses, special.port) == (("127.0.0.9",), 2525)
    assert (other.hosts[0].addresses, other.port) == (("127.0.0.8",), 25)
    assert dns.queries == []
