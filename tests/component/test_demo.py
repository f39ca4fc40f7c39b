"""`mtad demo` end to end: its own PostgreSQL, DNS and providers on loopback, a summary that adds up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
