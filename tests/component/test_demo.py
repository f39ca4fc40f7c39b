"""`mtad demo` end to end: its own PostgreSQL, DNS and providers on loopback, a summary that adds up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from mtad.simulate.smtp_sink import GREYLISTED, SmtpSink

DEMO_TIMEOUT_S = 120


def test_demo_delivers_defers_bounces_and_honours_unsubscribes(tmp_path):
    config = tmp_path / "mtad.toml"
    config.write_text("# the demo builds its own world; nothing here is used\n")
    result = subprocess.run(
        [sys.executable, "-m", "mtad", "--config", str(config), "demo", "--messages", "200", "--json"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["delivered"] > 0
    assert summary["bounced_by_category"].get("invalid_recipient", 0) > 0
    assert summary["unsubscribed"] > 0
    assert summary["deliveries_after_unsubscribe"] == 0
    assert summary["deferred_then_delivered"] > 0  # the greylisting provider
    assert summary["suppressed"] > 0  # later mail to the unsubscribed and the unknown users is never attempted
    assert summary["still_pending"] == 0
    assert summary["messages_per_s"] > 0
    assert set(summary["latency_ms"]) == {"p50", "p95", "p99"}
    assert "mx-greylisting: 450 at RCPT" in summary["provider_refusals"]
    assert not Path(summary["workdir"]).exists()  # its temporary directory (cluster included) is gone


async def test_a_greylisting_sink_defers_each_recipient_once():
    async with SmtpSink("127.0.0.2", 0, greylist=True) as sink:
        client = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False, timeout=10)
        await client.connect()
        try:
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await client.sendmail("a@x.example", ["bob@y.example"], b"Subject: 1\r\n\r\nx\r\n")
            assert refused.value.recipients[0].code == 450
            await client.rset()
            await client.sendmail("a@x.example", ["Bob@y.example"], b"Subject: 2\r\n\r\nx\r\n")  # same, any case
        finally:
            client.close()
    assert [m.rcpt_tos for m in sink.messages] == [["Bob@y.example"]]
    assert [r.reply for r in sink.rejections] == [GREYLISTED]
    assert sink.messages[0].mail_at <= sink.messages[0].received_at
