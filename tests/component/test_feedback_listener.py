"""Mail coming back over SMTP to the feedback listener: DSNs, complaints, auto-replies, mailto unsubscribes."""

from __future__ import annotations

import re
from pathlib import Path

import aiosmtplib
import pytest

from mtad.simulate.remote_world import RemoteWorld
from support.daemon import start_delivering, write_shaping
from support.smtp_client import submit_one

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
BOUNCE_DOMAIN = "bounces.mtad.example"
OUT_OF_OFFICE = (
    b"From: Hard Worker <ooo@a.example>\r\nTo: news@acme.example\r\nSubject: Afwezigheidsbericht: offers\r\n"
    b"Auto-Submitted: auto-replied\r\n\r\nIk ben tot maandag afwezig.\r\n"
)



async def send_feedback(port: int, rcpt: str, data: bytes) -> tuple[int, str]:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=15)
    await client.connect()
    try:
        await client.sendmail("MAILER-DAEMON@remote.example", [rcpt], data)
        return 250, "ok"
    except aiosmtplib.SMTPRecipientsRefused as exc:
        return exc.recipients[0].code, exc.recipients[0].message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        client.close()


@pytest.fixture
async def world():
    async with RemoteWorld(["mx"]) as world:
        world.add_domain("a.example", sink="mx")
        yield world


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_bounces_complaints_and_auto_replies_are_understood(db_url, tenants, pool, world, tmp_path):
    complaints_before = metric("mtad_feedback_complaints_total")
    dsn_invalid_before = metric("mtad_delivery_bounces_total", source="dsn", category="invalid_recipient")
    daemon = await start_delivering(
        db_url, tmp_path / "state", world, write_shaping(tmp_path / "shaping.toml"),
        feedback={"listen": ["127.0.0.1:0"], "bounce_domain": BOUNCE_DOMAIN},
    )
    try:
        port = daemon.listeners.servers[0].sockets[0].getsockname()[1]
        feedback_port = daemon.feedback_servers[0].sockets[0].getsockname()[1]
        people = ["hard@a.example", "soft@a.example", "complain@a.example", "ooo@a.example"]
        for rcpt in people:
            await submit_one(port, rcpt)
        messages = await world.sinks["mx"].wait_for_messages(4, timeout_s=20)
        verp = {m.rcpt_tos[0]: m.mail_from for m in messages}
        assert all(re.fullmatch(r"b-[a-z2-7]{39}@" + re.escape(BOUNCE_DOMAIN), v) for v in verp.values())
        reports = {
            "hard@a.example": (FIXTURES / "postfix_user_unknown.eml").read_bytes(),
            "soft@a.example": (FIXTURES / "postfix_mailbox_full.eml").read_bytes(),
            "complain@a.example": (FIXTURES / "arf_abuse_complaint.eml").read_bytes(),
            "ooo@a.example": OUT_OF_OFFICE,
        }
        for rcpt, report in reports.items():
            assert (await send_feedback(feedback_port, verp[rcpt], report))[0] == 250
        suppressions = {r["address"]: (r["reason"], r["source"]) for r in await pool.fetch("SELECT * FROM suppressions")}
        events = {
            (r["address"], r["kind"], r["category"])
            for r in await pool.fetch(
                "SELECT r.address, e.kind, e.category FROM events e JOIN recipients r ON r.id = e.recipient_id "
                "WHERE e.kind IN ('dsn', 'complained', 'auto_reply')"
            )
        }
        # the suppression applies to every class: a transactional message to the hard bounce is not sent
        await submit_one(port, "hard@a.example")
        state = await pool.fetchval(
            "SELECT state FROM recipients WHERE address = 'hard@a.example' ORDER BY id DESC LIMIT 1"
        )
    finally:
        await daemon.stop()
    assert suppressions == {"hard@a.example": ("hard_bounce", "dsn"), "complain@a.example": ("complaint", "arf")}
    assert ("hard@a.example", "dsn", "invalid_recipient") in events
    assert ("soft@a.example", "dsn", "mailbox_full") in events
    assert ("ooo@a.example", "auto_reply", None) in events
    assert state == "suppressed"
    assert metric("mtad_feedback_complaints_total") == complaints_before + 1
    assert metric("mtad_delivery_bounces_total", source="dsn", category="invalid_recipient") == dsn_invalid_before + 1


async def test_mail_to_the_mailto_unsubscribe_address_unsubscribes(db_url, tenants, pool, world, tmp_path):
    daemon = await start_delivering(
        db_url, tmp_path / "state", world, write_shaping(tmp_path / "shaping.toml"),
        feedback={"listen": ["127.0.0.1:0"], "bounce_domain": BOUNCE_DOMAIN},
    )
    try:
        port = daemon.listeners.servers[0].sockets[0].getsockname()[1]
        feedback_port = daemon.feedback_servers[0].sockets[0].getsockname()[1]
        await submit_one(port, "leaver@a.example")
        (message,) = await world.sinks["mx"].wait_for_messages(1, timeout_s=20)
        mailto = re.search(rb"<mailto:(u-[a-z2-7]{39}@[^?>]+)", message.data).group(1).decode()
        code, _ = await send_feedback(
            feedback_port, mailto, b"From: leaver@a.example\r\nSubject: unsubscribe\r\n\r\nunsubscribe\r\n"
        )
        assert code == 250
        row = await pool.fetchrow("SELECT address, reason, source FROM suppressions")
    finally:
        await daemon.stop()
    assert dict(row) == {"address": "leaver@a.example", "reason": "unsubscribed", "source": "mailto"}
    assert metric("mtad_feedback_unsubscribes_total", method="mailto") >= 1


@pytest.mark.parametrize(
    "rcpt",
    [
        "someone@example.net",  # not our domain: no relay
        f"postmaster@{BOUNCE_DOMAIN}x",
        f"b-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@{BOUNCE_DOMAIN}",  # a forged VERP address
        f"u-{'a' * 39}@{BOUNCE_DOMAIN}",
        f"someone%example.net@{BOUNCE_DOMAIN}",
    ],
)
async def test_the_feedback_listener_is_no_relay(db_url, tenants, world, tmp_path, rcpt):
    daemon = await start_delivering(
        db_url, tmp_path / "state", world, write_shaping(tmp_path / "shaping.toml"),
        feedback={"listen": ["127.0.0.1:0"], "bounce_domain": BOUNCE_DOMAIN},
    )
    try:
        feedback_port = daemon.feedback_servers[0].sockets[0].getsockname()[1]
        code, text = await send_feedback(feedback_port, rcpt, b"Subject: relay?\r\n\r\nx\r\n")
    finally:
        await daemon.stop()
    assert code == 550 and "5.7.1" in text
