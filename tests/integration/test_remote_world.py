"""The simulated remote world itself: FakeDNS answers a real dnspython resolver, sinks answer a real aiosmtplib.

If these pass, a delivery test that fails is about mtad, not about its fake internet.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiosmtplib
import dns.asyncresolver
import dns.rdatatype
import dns.resolver
import pytest
from mtad.simulate.dns_server import FakeDNS
from mtad.simulate.remote_world import RemoteWorld
from mtad.simulate.smtp_sink import SinkBehaviour, SmtpSink, free_consecutive_ports_on, free_port_on


MESSAGE = b"From: news@acme.example\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n" + b"body line\r\n" * 200
SENDER = "news@acme.example"


def resolver_for(fake: FakeDNS, *, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [fake.host]
    resolver.port = fake.port
    resolver.lifetime = lifetime
    return resolver


@pytest.fixture
async def fake_dns():
    async with FakeDNS() as server:
        yield server


@pytest.fixture
async def sink():
    async with SmtpSink("127.0.0.2", 0, hostname="mx1.example.net") as server:
        yield server


def client_for(sink: SmtpSink, *, timeout: float = 3.0) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=sink.host, port=sink.port, timeout=timeout, start_tls=False, local_hostname="mtad.test"
    )


async def send(sink: SmtpSink, recipients: list[str] | None = None, *, timeout: float = 3.0):
    async with client_for(sink, timeout=timeout) as client:
        return await client.sendmail(SENDER, recipients or ["bob@example.org"], MESSAGE)


# ---- DNS ----------------------------------------------------------------------------------------------------


async def test_mx_answer_lists_exchanges_and_carries_their_addresses(fake_dns):
    fake_dns.add_mx("gmail.example", [(5, "alt1.mx.example"), (10, "alt2.mx.example")], ttl=120)
    fake_dns.add_a("alt1.mx.example", "127.0.0.2")

    answer = await resolver_for(fake_dns).resolve("gmail.example", "MX")

    assert sorted((r.preference, r.exchange.to_text()) for r in answer) == [
        (5, "alt1.mx.example."),
        (10, "alt2.mx.example."),
    ]
    assert answer.rrset.ttl == 120
    additional = {(rrset.name.to_text(), rrset.rdtype) for rrset in answer.response.additional}
    assert additional == {("alt1.mx.example.", dns.rdatatype.A)}


async def test_a_and_aaaa_answers_hold_every_address(fake_dns):
    fake_dns.add_a("mx.example", "127.0.0.2")
    fake_dns.add_a("mx.example", "127.0.0.3")
    fake_dns.add_aaaa("mx.example", "::1")
    resolver = resolver_for(fake_dns)

    a = await resolver.resolve("mx.example", "A")
    aaaa = await resolver.resolve("mx.example", "AAAA")

    assert sorted(r.address for r in a) == ["127.0.0.2", "127.0.0.3"]
    assert [r.address for r in aaaa] == ["::1"]


async def test_names_are_case_insensitive_and_the_trailing_dot_optional(fake_dns):
    fake_dns.add_a("MX.Example.", "127.0.0.2")

    answer = await resolver_for(fake_dns).resolve("mx.EXAMPLE", "A")

    assert [r.address for r in answer] == ["127.0.0.2"]
    assert fake_dns.queries == [("mx.example", "A")]


async def test_unknown_and_explicitly_missing_and_removed_names_are_nxdomain(fake_dns):
    fake_dns.add_a("gone.example", "127.0.0.2")
    fake_dns.add_a("hidden.example", "127.0.0.2")
    fake_dns.remove("gone.example")
    fake_dns.nxdomain("hidden.example")
    resolver = resolver_for(fake_dns)

    for name in ("never-heard-of.example", "gone.example", "hidden.example"):
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve(name, "A")


async def test_null_mx_is_one_mx_of_preference_zero_to_the_root(fake_dns):
    fake_dns.add_mx("nomail.example", [(10, "mx.nomail.example")])
    fake_dns.null_mx("nomail.example")

    answer = await resolver_for(fake_dns).resolve("nomail.example", "MX")

    assert [(r.preference, r.exchange.to_text()) for r in answer] == [(0, ".")]


async def test_servfail_makes_the_resolver_give_up_and_clears_on_request(fake_dns):
    fake_dns.add_mx("broken.example", [(10, "mx.broken.example")])
    fake_dns.servfail("broken.example")
    resolver = resolver_for(fake_dns)

    with pytest.raises(dns.resolver.NoNameservers):
        await resolver.resolve("broken.example", "MX")
    fake_dns.clear_fault("broken.example")
    assert len(await resolver.resolve("broken.example", "MX")) == 1


async def test_a_fault_can_hit_one_record_type_only(fake_dns):
    fake_dns.add_a("mx.example", "127.0.0.2")
    fake_dns.add_aaaa("mx.example", "::1")
    fake_dns.timeout("mx.example", "AAAA")
    resolver = resolver_for(fake_dns, lifetime=0.3)

    assert [r.address for r in await resolver.resolve("mx.example", "A")] == ["127.0.0.2"]
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver.resolve("mx.example", "AAAA")


async def test_nodata_answers_noerror_with_an_soa_so_it_can_be_cached(fake_dns):
    fake_dns.negative_ttl = 45
    fake_dns.add_a("mx.example", "127.0.0.2")
    resolver = resolver_for(fake_dns)
    resolver.cache = dns.resolver.Cache()

    answer = await resolver.resolve("mx.example", "AAAA", raise_on_no_answer=False)
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("mx.example", "AAAA")

    assert answer.rrset is None
    [soa] = answer.response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa[0].minimum == 45
    assert fake_dns.count("mx.example", "AAAA") == 1  # the second lookup came from the negative cache


async def test_a_name_that_times_out_never_answers(fake_dns):
    fake_dns.timeout("slow.example")

    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolver_for(fake_dns, lifetime=0.3).resolve("slow.example", "MX")
    assert fake_dns.count("slow.example", "MX") >= 1


async def test_an_answer_too_big_for_udp_is_truncated_and_retried_over_tcp(fake_dns):
    for last_octet in range(1, 61):  # 60 A records do not fit into 512 bytes
        fake_dns.add_a("big.example", f"127.0.1.{last_octet}")

    answer = await resolver_for(fake_dns).resolve("big.example", "A")

    assert len(answer) == 60
    assert fake_dns.tcp_queries == [("big.example", "A")]
    assert fake_dns.count("big.example", "A") == 2  # once over UDP (truncated), once over TCP


async def test_truncate_udp_forces_every_answer_over_tcp(fake_dns):
    fake_dns.add_mx("gmail.example", [(10, "mx.gmail.example")])
    fake_dns.truncate_udp = True

    answer = await resolver_for(fake_dns).resolve("gmail.example", "MX")

    assert len(answer) == 1
    assert fake_dns.tcp_queries == [("gmail.example", "MX")]


# ---- SMTP sinks --------------------------------------------------------------------------------------------


async def test_sink_accepts_and_records_the_message(sink):
    errors, _reply = await send(sink, ["bob@example.org", "Carol@Example.org"])

    assert errors == {}
    [message] = sink.messages
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ["bob@example.org", "Carol@Example.org"]
    assert message.data == MESSAGE
    assert message.peer[0] == "127.0.0.1" and message.tls is False and message.session_id == 1
    assert (sink.connections_total, sink.transactions_total, sink.current_sessions) == (1, 1, 0)


async def test_sink_refuses_recipients_by_address_or_domain(sink):
    sink.behaviour.recipient_replies = {
        "nobody@example.org": "550 5.1.1 no such user",
        "busy.example": "450 4.2.0 busy",
    }

    errors, _reply = await send(sink, ["bob@example.org", "Nobody@example.org", "ann@busy.example"])

    assert {address: reply.code for address, reply in errors.items()} == {
        "Nobody@example.org": 550,
        "ann@busy.example": 450,
    }
    assert sink.messages[0].rcpt_tos == ["bob@example.org"]
    assert [(r.stage, r.reply) for r in sink.rejections] == [
        ("RCPT", "550 5.1.1 no such user"),
        ("RCPT", "450 4.2.0 busy"),
    ]


async def test_data_reply_override_applies_to_the_first_messages_only(sink):
    sink.behaviour = SinkBehaviour(data_reply="452 4.3.1 try later", data_reply_for_first=2)

    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(sink)
        assert refused.value.code == 452
    await send(sink)

    assert len(sink.messages) == 1
    assert [r.stage for r in sink.rejections] == ["DATA", "DATA"]


async def test_sink_answers_421_to_mail_after_n_messages_on_one_connection(sink):
    sink.behaviour.reply_421_after_messages = 2

    async with client_for(sink) as client:
        for _ in range(2):
            await client.sendmail(SENDER, ["bob@example.org"], MESSAGE)
        with pytest.raises((aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPServerDisconnected)):
            await client.sendmail(SENDER, ["bob@example.org"], MESSAGE)
    await send(sink)  # a new connection starts counting again

    assert len(sink.messages) == 3
    assert [(r.stage, r.reply) for r in sink.rejections] == [("MAIL", "421 4.7.0 Try again later")]


async def test_connections_above_the_cap_get_421_and_are_closed(sink):
    sink.behaviour.max_concurrent_sessions = 2
    admitted = [client_for(sink) for _ in range(2)]
    for client in admitted:
        await client.connect()

    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await client_for(sink).connect()
    assert refused.value.code == 421
    for client in admitted:
        await client.quit()
    await send(sink)  # a slot is free again

    assert (sink.connections_total, sink.rejected_connections, sink.max_concurrent_sessions) == (4, 1, 2)


async def test_a_stalled_greeting_makes_the_client_time_out(sink):
    sink.behaviour.stall_greeting_s = 0.5

    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await client_for(sink, timeout=0.2).connect()


async def test_a_stall_after_data_delays_the_final_reply(sink):
    sink.behaviour.stall_after_data_s = 0.3
    loop = asyncio.get_running_loop()

    async with client_for(sink) as client:
        await client.ehlo()
        await client.mail(SENDER)
        await client.rcpt("bob@example.org")
        started = loop.time()
        await client.data(MESSAGE)
        assert loop.time() - started >= 0.3
        with pytest.raises(aiosmtplib.SMTPTimeoutError):  # a client that does not wait gets nothing recorded
            await client.sendmail(SENDER, ["bob@example.org"], MESSAGE, timeout=0.1)
    await asyncio.sleep(0.4)  # past the stall: the sink would have recorded it by now

    assert len(sink.messages) == 1


async def test_a_connection_dropped_mid_data_raises_on_the_client(sink):
    sink.behaviour.drop_mid_data = True

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(sink)

    assert sink.messages == []
    assert [r.stage for r in sink.rejections] == ["DATA"]


async def test_starttls_handshake_verifies_against_the_sinks_certificate(sink):
    sink.behaviour.starttls = True
    trusting = ssl.create_default_context(cadata=sink.certificate_pem)

    async with client_for(sink) as client:
        await client.starttls(server_hostname="mx1.example.net", tls_context=trusting)
        await client.sendmail(SENDER, ["bob@example.org"], MESSAGE)
    async with client_for(sink) as client:
        with pytest.raises(ssl.SSLCertVerificationError):
            await client.starttls(server_hostname="other.example.net", tls_context=trusting)

    assert [m.tls for m in sink.messages] == [True]


async def test_broken_starttls_fails_the_handshake(sink):
    sink.behaviour.tls_fails = True
    trusting = ssl.create_default_context(cadata=sink.certificate_pem)

    async with client_for(sink) as client:
        await client.ehlo()
        assert client.supports_extension("starttls")  # advertised, so a client will try it
        with pytest.raises((aiosmtplib.SMTPServerDisconnected, ssl.SSLError, ConnectionError)):
            await client.starttls(server_hostname="mx1.example.net", tls_context=trusting)

    assert [r.stage for r in sink.rejections] == ["STARTTLS"]


async def test_a_garbage_greeting_is_not_smtp(sink):
    sink.behaviour.garbage_greeting = True

    with pytest.raises(aiosmtplib.SMTPResponseException):
        await client_for(sink).connect()


async def test_wait_for_messages_says_what_arrived_when_it_times_out(sink):
    sink.behaviour.recipient_replies = {"example.org": "550 5.1.1 no such user"}
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(sink)

    with pytest.raises(TimeoutError, match="got 0 of 1 messages"):
        await sink.wait_for_messages(1, timeout_s=0.2)


async def test_stop_cuts_live_sessions(sink):
    client = client_for(sink)
    await client.connect()

    await sink.stop()

    assert sink.current_sessions == 0
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.noop()


async def test_sinks_on_different_addresses_share_one_port():
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = free_port_on(ips)
    sinks = [SmtpSink(ip, port) for ip in ips]
    for each in sinks:
        await each.start()
    try:
        await send(sinks[1])
        assert [len(each.messages) for each in sinks] == [0, 1, 0]
    finally:
        for each in sinks:
            await each.stop()


def test_consecutive_ports_are_free_and_outside_the_range_outgoing_connections_take_theirs_from():
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = free_consecutive_ports_on(["127.0.0.1", "127.0.0.2"], 3)
    assert first + 3 <= ephemeral_low
    listeners = []
    try:
        for ip in ("127.0.0.1", "127.0.0.2"):
            for port in range(first, first + 3):
                listener = socket.socket()
                listeners.append(listener)
                listener.bind((ip, port))
    finally:
        for listener in listeners:
            listener.close()


# ---- the world ------------------------------------------------------------------------------------------------


async def test_remote_world_routes_a_domain_through_mx_and_a_to_its_sink():
    async with RemoteWorld({"mx-google": None, "mx-other": SinkBehaviour(garbage_greeting=True)}) as world:
        world.add_domain("gmail.example", sink="mx-google", mx_host="alt1.gmail-smtp-in.l.google.example")
        resolver = resolver_for(world.dns)

        [mx] = await resolver.resolve("gmail.example", "MX")
        [a] = await resolver.resolve(mx.exchange, "A")
        async with aiosmtplib.SMTP(hostname=a.address, port=world.smtp_port, timeout=3, start_tls=False) as client:
            await client.sendmail(SENDER, ["bob@gmail.example"], MESSAGE)

        messages = await world.sinks["mx-google"].wait_for_messages(1, timeout_s=2)
        assert messages[0].rcpt_tos == ["bob@gmail.example"]
        assert (world.ip_of("mx-google"), world.ip_of("mx-other")) == ("127.0.0.2", "127.0.0.3")
        assert {sink.port for sink in world.sinks.values()} == {world.smtp_port}
        assert world.messages == messages
