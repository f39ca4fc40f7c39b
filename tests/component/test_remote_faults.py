"""Remote faults on the delivery side (issue 7, item 3): every way a receiving server can misbehave, against a real
daemon, a real PostgreSQL, a DNS server and SMTP sinks on 127.0.0.x.

Each case runs one faulty destination and one healthy destination side by side:
- the healthy one gets all its mail while the faulty one is stuck (a fault never blocks other destinations);
- every faulty recipient is deferred with the reason recorded (an event per attempt, the last reply on the row);
- a stall is ended by the configured timeout that RFC 5321 4.5.3.2 names for that wait, not by anything else;
- once the fault is cleared, the recipients are retried and delivered (or bounced, when the repaired server
  refuses them for good), each exactly once: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mtad.config import DeliverySettings
from mtad.deliver.connection import Timeouts
from mtad.simulate.remote_world import RemoteWorld
from mtad.simulate.smtp_sink import GARBAGE_REPLY, SessionSpan, SinkBehaviour, SmtpSink
from support.daemon import start_delivering, until, write_shaping
from support.queue import queue_messages

CONNECT_TIMEOUT_S, COMMAND_TIMEOUT_S, DATA_TIMEOUT_S = 1.0, 3.0, 5.0  # distinct, so a stall's length names its timer
STALL_S = 120.0  # longer than every timeout and every wait here: only the daemon's timeout can end a stall
HEALTHY_MESSAGES = 10
FAULTY_MESSAGES = [["f1@faulty.example"], ["f2@faulty.example", "f3@faulty.example"], ["f4@faulty.example"]]
FAULTY_RECIPIENTS = sorted(address for message in FAULTY_MESSAGES for address in message)
# The daemon's [delivery] in every case: the distinct timeouts, and retries a second apart.
DELIVERY = dict(
    connect_timeout=f"{CONNECT_TIMEOUT_S:g}s", command_timeout=f"{COMMAND_TIMEOUT_S:g}s",
    data_timeout=f"{DATA_TIMEOUT_S:g}s", minimal_backoff_time="1s", maximal_backoff_time="1s", retry_jitter=0,
)
WAIT_S = 45.0  # bound of every wait; generous for a loaded 2-core machine, never reached when things work


@dataclass(frozen=True)
class Fault:
    name: str
    behaviour: Callable[[], SinkBehaviour]  # a fresh one per test: behaviours are mutable
    reason: str  # regex the recorded deferral reply must match
    stall: str | None = None  # "greeting" or "data": which wait the fault stalls
    cleared: Callable[[], SinkBehaviour] = SinkBehaviour  # the server once repaired
    final_state: str = "delivered"
    shaping: dict = field(default_factory=dict)  # [domain."faulty.example"] settings
    in_transaction: bool = False  # the fault comes after MAIL FROM (else: while opening the session)


FAULTS = [
    Fault(
        "greeting_stalls",
        lambda: SinkBehaviour(stall_greeting_s=STALL_S),
        r"no greeting reply within 3s \(command_timeout\)",
        stall="greeting",
    ),
    Fault(
        "stalls_after_data",
        lambda: SinkBehaviour(stall_after_data_s=STALL_S),
        r"no reply to DATA within 5s \(data_timeout\)",
        stall="data",
        in_transaction=True,
    ),
    Fault(
        "resets_mid_data",
        lambda: SinkBehaviour(drop_mid_data=True),
        r"connection lost during DATA",
        in_transaction=True,
    ),
    Fault(
        "greets_with_garbage_then_refuses_the_recipients_for_good",
        lambda: SinkBehaviour(garbage_greeting=True),
        r"greeting: invalid SMTP reply: .*Dovecot ready",
        cleared=lambda: SinkBehaviour(recipient_replies={"faulty.example": "550 5.1.1 no such user"}),
        final_state="bounced",
    ),
    Fault(
        "answers_garbage_after_data",
        lambda: SinkBehaviour(data_reply=GARBAGE_REPLY),
        r"invalid reply to DATA: .*Thank you, your message will be read shortly",
        in_transaction=True,
    ),
    Fault(
        "accepts_and_closes_at_once",
        lambda: SinkBehaviour(close_on_connect=True),
        r"greeting: SMTPConnectError",
    ),
    Fault(
        "accepts_and_closes_after_the_greeting",
        lambda: SinkBehaviour(close_after_greeting=True),
        r"EHLO: SMTPServerDisconnected",
    ),
    Fault("starttls_then_closes", lambda: SinkBehaviour(tls_fails=True), r"STARTTLS: "),
    Fault(
        "starttls_then_answers_the_handshake_with_garbage",
        lambda: SinkBehaviour(tls_garbage_handshake=True),
        r"STARTTLS: .*(SSL|WRONG_VERSION|version)",
    ),
    Fault(
        "starttls_with_a_certificate_that_fails_verification",
        lambda: SinkBehaviour(starttls=True),  # self-signed: no system CA vouches for it
        r"STARTTLS: .*certificate verify failed",
        cleared=SinkBehaviour,  # the site stops offering its broken TLS; opportunistic delivery goes ahead
        shaping={"tls_verify": True},
    ),
]


def test_timeout_defaults_are_the_rfc_5321_minimums():
    """RFC 5321 4.5.3.2: initial 220, MAIL and RCPT 5 minutes; the reply to the final "." 10 minutes."""
    assert (DeliverySettings().command_timeout, DeliverySettings().data_timeout) == (300.0, 600.0)
    assert (Timeouts().command_s, Timeouts().data_s) == (300.0, 600.0)


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
async def test_a_remote_fault_is_deferred_with_its_reason_then_retried_and_never_holds_up_other_sites(
    db_url, tenants, pool, tmp_path, fault
):
    async with RemoteWorld({"mx-faulty": fault.behaviour(), "mx-healthy": None}) as world:
        world.add_domain("faulty.example", sink="mx-faulty")
        world.add_domain("healthy.example", sink="mx-healthy")
        faulty, healthy = world.sinks["mx-faulty"], world.sinks["mx-healthy"]
        shaping = write_shaping(
            tmp_path / "shaping.toml",
            {"dead_after_failures": 1, "connection_limit": 2},
            **({"domain": {"faulty.example": fault.shaping}} if fault.shaping else {}),
        )
        await queue_messages(pool, FAULTY_MESSAGES)
        daemon = await start_delivering(
            db_url, tmp_path / "state", world, shaping,
            **DELIVERY,
        )
        try:
            if fault.stall:  # the healthy mail comes while a faulty session hangs, and must not wait for it
                stalled = await until(lambda: _stalled(faulty, fault.stall), timeout_s=WAIT_S)
                assert stalled, "the faulty site was never tried"
            await queue_messages(pool, [[f"h{n}@healthy.example"] for n in range(HEALTHY_MESSAGES)])
            await healthy.wait_for_messages(HEALTHY_MESSAGES, timeout_s=WAIT_S)
            assert faulty.messages == []  # still stuck while the healthy site got everything
            if fault.stall:
                _assert_some_arrived_during_a_stall(healthy, faulty, fault.stall)

            deferrals = await until(lambda: _deferral_replies(pool), timeout_s=WAIT_S)
            assert sorted(deferrals) == FAULTY_RECIPIENTS, f"not every faulty recipient deferred: {deferrals}"
            for address, replies in deferrals.items():
                for attempted, reply in replies:
                    assert reply.startswith("451 4.") and re.search(_reason(fault, attempted), reply), replies
            if fault.in_transaction:  # the failed transaction's own recipients carry its exact reason
                assert any(attempted for replies in deferrals.values() for attempted, _ in replies), deferrals
            for row in await _faulty_rows(pool):  # the row keeps the last reason while it waits
                if row["state"] == "deferred":
                    assert re.search(_reason(fault, attempted=False), row["last_reply"]), dict(row)
            if fault.stall:
                _assert_stall_ended_by_its_timeout(faulty.session_spans, fault.stall)

            faulty.behaviour = fault.cleared()
            finished = await until(lambda: _all_final(pool), timeout_s=WAIT_S)
            assert finished, f"faulty recipients not finished after the fault was cleared: {await _faulty_rows(pool)}"
            await asyncio.sleep(0.5)  # a duplicate would show up here: an attempt still in flight
        finally:
            await daemon.stop()

        rows = await _faulty_rows(pool)
        assert {r["address"]: r["state"] for r in rows} == dict.fromkeys(FAULTY_RECIPIENTS, fault.final_state)
        assert all(r["attempts"] >= 2 for r in rows), [dict(r) for r in rows]  # deferred at least once, retried
        received = Counter(address for message in world.messages for address in message.rcpt_tos)
        expected = {f"h{n}@healthy.example": 1 for n in range(HEALTHY_MESSAGES)}
        if fault.final_state == "delivered":
            expected |= dict.fromkeys(FAULTY_RECIPIENTS, 1)
        assert received == expected  # nobody lost, nobody twice, nothing for a bounced recipient
        await _assert_events_end_once(pool, fault.final_state)


async def test_an_unanswered_tcp_handshake_is_bounded_by_connect_timeout_and_retried_once_the_host_answers(
    db_url, tenants, pool, tmp_path
):
    async with RemoteWorld(["mx-faulty", "mx-healthy"]) as world:
        world.add_domain("faulty.example", sink="mx-faulty")
        world.add_domain("healthy.example", sink="mx-healthy")
        faulty, healthy = world.sinks["mx-faulty"], world.sinks["mx-healthy"]
        shaping = write_shaping(tmp_path / "shaping.toml", {"dead_after_failures": 1, "connection_limit": 2})
        await faulty.stop()
        with _unanswered_listener(faulty.host, world.smtp_port):  # SYNs dropped: the handshake never completes
            await queue_messages(pool, FAULTY_MESSAGES)
            daemon = await start_delivering(
                db_url, tmp_path / "state", world, shaping,
                **DELIVERY,
            )
            try:
                await queue_messages(pool, [[f"h{n}@healthy.example"] for n in range(HEALTHY_MESSAGES)])
                await healthy.wait_for_messages(HEALTHY_MESSAGES, timeout_s=WAIT_S)
                deferrals = await until(lambda: _deferral_replies(pool), timeout_s=WAIT_S)
            except BaseException:
                await daemon.stop()
                raise
        try:
            assert sorted(deferrals) == FAULTY_RECIPIENTS, deferrals
            for replies in deferrals.values():
                for _, reply in replies:
                    assert re.search(r"connect: no answer within 1s \(connect_timeout\)", reply), replies
            await faulty.start()  # the host answers again, on the same address and port
            assert await until(lambda: _all_final(pool), timeout_s=WAIT_S), await _faulty_rows(pool)
            await asyncio.sleep(0.5)  # a duplicate would show up here: an attempt still in flight
        finally:
            await daemon.stop()
        received = Counter(address for message in world.messages for address in message.rcpt_tos)
        assert received == {f"h{n}@healthy.example": 1 for n in range(HEALTHY_MESSAGES)} | dict.fromkeys(
            FAULTY_RECIPIENTS, 1
        )
        await _assert_events_end_once(pool, "delivered")


@contextlib.contextmanager
def _unanswered_listener(host: str, port: int):
    """A listener whose accept queue is full and never drained: Linux drops further SYNs, so a new connection's
    handshake hangs (a firewalled or overloaded MX) until the client gives up."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(0)
        for _ in range(8):  # fill the queue until a handshake no longer completes
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex((host, port))
            _, writable, _ = select.select([], [filler], [], 0.5)
            if not writable:
                break
        else:
            raise AssertionError("the accept queue never filled: this kernel answers every SYN")
        yield
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def _reason(fault: Fault, attempted: bool) -> str:
    """What a deferral must say. Recipients that waited behind a failed session are handed back with the site's
    last error, which schedule/runner.py records as a bare "connection lost" for a failure inside a
    transaction (its own recipients get the full reply)."""
    if fault.in_transaction and not attempted:
        return f"{fault.reason}|(^451 4\\.4\\.1 |^)connection lost$"
    return fault.reason


def _stalled(sink: SmtpSink, stall: str) -> bool:
    """A session of the faulty sink is hanging right now in the stalled wait."""
    sessions = list(sink._sessions)
    if stall == "greeting":
        return bool(sessions)
    return any(session.data_ended_at is not None for session in sessions)


def _stall_start(span: SessionSpan, stall: str) -> float | None:
    return span.opened_at if stall == "greeting" else span.data_ended_at


def _assert_some_arrived_during_a_stall(healthy: SmtpSink, faulty: SmtpSink, stall: str) -> None:
    """Order, not speed: some healthy message came while a faulty session was hanging."""
    now = time.monotonic()
    windows = [(_stall_start(s, stall), s.closed_at) for s in faulty.session_spans if _stall_start(s, stall)]
    windows += [(_stall_start(s, stall), now) for s in _open_spans(faulty) if _stall_start(s, stall)]
    arrivals = [m.received_at for m in healthy.messages]
    assert any(start <= at <= end for start, end in windows for at in arrivals), (windows, arrivals)


def _open_spans(sink: SmtpSink) -> list[SessionSpan]:
    return [SessionSpan(s.session_id, s.opened_at, float("inf"), s.data_ended_at) for s in list(sink._sessions)]


def _assert_stall_ended_by_its_timeout(spans: list[SessionSpan], stall: str) -> None:
    """The daemon hung up after the configured timeout of that wait: never before it (a shorter timer), well
    before the next longer one, and long before the sink would have answered."""
    if stall == "greeting":
        timeout_s, next_longer_s = COMMAND_TIMEOUT_S, DATA_TIMEOUT_S
    else:
        timeout_s, next_longer_s = DATA_TIMEOUT_S, 2 * DATA_TIMEOUT_S
    stalls = [span.closed_at - start for span in spans if (start := _stall_start(span, stall)) is not None]
    assert stalls, spans
    for waited in stalls:
        assert timeout_s - 0.1 <= waited < next_longer_s, (stall, waited, stalls)


async def _deferral_replies(pool) -> dict[str, list[tuple[bool, str]]]:
    """Every faulty recipient's deferrals: (attempted on a connection, reply); empty until all have one."""
    rows = await pool.fetch(
        "SELECT r.address, e.mx_host IS NOT NULL AS attempted, e.code || ' ' || e.enhanced || ' ' || e.reply AS reply "
        "FROM events e JOIN recipients r ON r.id = e.recipient_id "
        "WHERE e.kind = 'deferred' AND r.domain = 'faulty.example' ORDER BY e.id"
    )
    found: dict[str, list[tuple[bool, str]]] = {}
    for row in rows:
        found.setdefault(row["address"], []).append((row["attempted"], row["reply"]))
    return found if len(found) == len(FAULTY_RECIPIENTS) else {}


async def _faulty_rows(pool):
    return await pool.fetch(
        "SELECT address, state, attempts, last_code, last_reply FROM recipients "
        "WHERE domain = 'faulty.example' ORDER BY address"
    )


async def _all_final(pool) -> bool:
    pending = await pool.fetchval("SELECT count(*) FROM recipients WHERE state NOT IN ('delivered', 'bounced')")
    return pending == 0


async def _assert_events_end_once(pool, final_state: str) -> None:
    """Per recipient: deferrals (faulty ones only), then exactly one final event, and nothing after it."""
    rows = await pool.fetch(
        "SELECT r.address, r.domain, e.kind FROM events e JOIN recipients r ON r.id = e.recipient_id ORDER BY e.id"
    )
    kinds: dict[str, list[str]] = {}
    for row in rows:
        kinds.setdefault(row["address"], []).append(row["kind"])
    for address, seen in kinds.items():
        if address.endswith("@healthy.example"):
            assert seen == ["delivered"], (address, seen)
        else:
            assert seen[-1] == final_state and set(seen[:-1]) == {"deferred"}, (address, seen)
    assert len(kinds) == HEALTHY_MESSAGES + len(FAULTY_RECIPIENTS)
