"""CI smoke run of benchmarks/relay.py (issue 6): a few hundred messages through mtad and a private Postfix.

It proves the script works end to end (both MTAs start, relay every message to the sink, the reports and the
plot are written, everything is stopped); the numbers are not checked, this is not a timed test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "relay.py"
SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
TIMEOUT_S = 90

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("smtp-sink", path=SBIN_PATH) is None
                       or shutil.which("postfix", path=SBIN_PATH) is None,
                       reason="Postfix (postfix, smtp-sink) is not installed; make setup installs it"),
]


def test_relay_benchmark_smoke(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib draws the plot: pip install -e '.[test]'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTAD_")}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--messages", "200", "--clients", "4", "--pairs", "1",
                             "--time-limit", "60", "--pipelining", "--pg-stats", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its sink, daemon, PostgreSQL and Postfix on SIGTERM
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"relay.py did not finish within {TIMEOUT_S}s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]

    reports = list(tmp_path.glob("relay-*.json"))
    assert len(reports) == 1, output[-3000:]
    report = json.loads(reports[0].read_text())
    assert reports[0].with_suffix(".png").stat().st_size > 0
    assert reports[0].with_suffix(".md").read_text().startswith("# Relay benchmark")
    runs = {run["mta"]: run for run in report["runs"]}
    if report["postfix_missing"]:  # the fallback: mtad alone, with the reason stated
        assert set(runs) == {"mtad"} and report["postfix_missing"].strip()
    else:
        assert set(runs) == {"mtad", "postfix"}, output[-3000:]
        assert len(report["ratios"]) == 1 and report["ratio_median"]["delivered_per_s"] > 0
    for mta, run in runs.items():
        assert run["injected"] == 200 and run["accepted"] == 200, (mta, run["problems"])
        assert run["delivered"] == run["injected"], (mta, run["problems"])
        assert run["ok"], (mta, run["problems"])
        assert run["p99_ms"] is not None and run["cpu_s_per_1k"] > 0 and run["peak_rss_mb"] > 0
    assert runs["mtad"]["dkim_signed_pct"] == 100
    assert "MAIL/RCPT/DATA pipelined" in report["injector"]
    assert all(run["pipelined"] == 200 for run in runs.values())  # both MTAs offered PIPELINING and took it
    # --pg-stats: mtad's statements from PostgreSQL, the group-committed insert among them, in both reports
    statements = runs["mtad"]["pg_statements"]
    inserts = [s for s in statements if s["query"].startswith("WITH message AS ( INSERT INTO messages")]
    assert inserts and 1 <= inserts[0]["calls"] <= 200, statements
    assert "PostgreSQL statements, mtad pair 1" in reports[0].with_suffix(".md").read_text()
