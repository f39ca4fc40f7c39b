"""systemd/mtad.service: a valid unit (systemd-analyze verify), hardened (security exposure <= 2.0), and the
settings the daemon's life cycle relies on (notify, watchdog, restart, stop timeout, credential, capability).

systemd need not be running: both systemd-analyze commands work offline on the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mtad.config import parse_duration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "mtad.service"
EXAMPLE_CONFIG = ROOT / "config" / "mtad.example.toml"
ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze not installed (Debian package systemd; scripts/install-system-deps.sh installs it)",
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; comments, blank lines and line continuations as systemd reads them."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"directive outside a section: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def timespan_s(value: str) -> float:
    """A systemd time span as used in the unit ("30s", "2min", "1min 30s")."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), f"unparsed time span {value!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


SERVICE = parse_unit(UNIT.read_text())["Service"]


def one(key: str) -> str:
    values = SERVICE.get(key, [])
    assert len(values) == 1, f"{key}= should be set once in [Service], found {values}"
    return values[0]


def verify(unit_text: str, tmp_path: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on a copy of the unit; (exit status, lines that are about this unit).

    verify refuses an ExecStart= binary that does not exist, and /opt/mtad/venv/bin/mtad only exists after
    `make install`, so the copy runs this checkout's mtad (or this Python) instead; everything else is
    verbatim. User=mtad stays: verify does not look the user up (checked with systemd 252), so the test
    needs no mtad user. verify reports unknown keys and unparsable values as warnings, "ignoring" the line,
    and exits 0 for them unless --recursive-errors is given; =no counts only this unit's own warnings (not
    those of other units on the host). Any line naming the copy also counts as a problem.
    """
    mtad = Path(sys.executable).with_name("mtad")
    runnable = mtad if mtad.exists() else Path(sys.executable)
    copy = tmp_path / "mtad.service"
    copy.write_text(unit_text.replace("ExecStart=/opt/mtad/venv/bin/mtad ", f"ExecStart={runnable} "))
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True, text=True, timeout=30,
    )
    output = (result.stdout + result.stderr).splitlines()
    about_unit = [line for line in output if str(copy) in line or "mtad.service" in line]
    return result.returncode, about_unit


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    code, problems = verify(UNIT.read_text(), tmp_path)
    assert code == 0 and not problems, "\n".join(problems)


@needs_analyze
@pytest.mark.parametrize("breakage", [
    ("Type=notify\n", "Tpye=notify\n"),                           # unknown directive
    ("WatchdogSec=30s\n", "WatchdogSec=thirty\n"),               # unparsable value
    ("ProtectSystem=strict\n", "ProtectSystem=strictest\n"),      # unknown enum value
    ("[Service]\n", "[Servce]\n"),                                # unknown section
])
def test_verify_as_run_here_catches_a_broken_unit(tmp_path, breakage):
    """The check above would notice: verify merely warns about these and carries on with defaults."""
    old, new = breakage
    text = UNIT.read_text()
    assert old in text
    code, problems = verify(text.replace(old, new, 1), tmp_path)
    assert code != 0 or problems


@needs_analyze
def test_security_exposure_is_at_most_2():
    # --threshold is on the 0-100 scale of the printed level x 10 (the default, 100, is the maximum 10.0):
    # 20 fails the command above 2.0.
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager", str(UNIT)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=30,
    )
    output = result.stdout + result.stderr
    level = re.search(r"Overall exposure level for mtad\.service: (\d+\.\d+)", output)
    assert level, output
    assert float(level.group(1)) <= MAX_EXPOSURE, output
    assert result.returncode == 0, output


def test_notify_with_watchdog_and_reload_by_sighup():
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == "/opt/mtad/venv/bin/mtad --config /etc/mtad/mtad.toml run"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert 0 < timespan_s(one("WatchdogSec")) <= 60  # mtad pings every WATCHDOG_USEC / 2


def test_restarts_on_failure_and_waits_for_the_drain():
    assert one("Restart") == "on-failure"
    assert timespan_s(one("RestartSec")) > 0
    assert one("KillMode") == "mixed"
    # Daemon.stop: SMTP drain (shutdown_grace), then deliveries in flight (shutdown_grace), then the pool (10 s).
    grace = parse_duration(tomllib.loads(EXAMPLE_CONFIG.read_text())["shutdown_grace"])
    assert timespan_s(one("TimeoutStopSec")) > 2 * grace + 10


def test_database_password_comes_from_a_credential_asyncpg_accepts():
    assert one("LoadCredential") == "db-password:/etc/mtad/db-password"
    # asyncpg ignores a pgpass file with group or world bits; the copy in /run/mtad is a plain 0400.
    assert one("ExecStartPre") == "/usr/bin/install -m 0400 %d/db-password /run/mtad/pgpass"
    assert "PGPASSFILE=/run/mtad/pgpass" in SERVICE["Environment"]
    assert one("RuntimeDirectory") == "mtad"


def test_only_the_capability_to_bind_ports_below_1024():
    assert one("User") == "mtad" and one("Group") == "mtad"
    assert one("CapabilityBoundingSet").split() == ["CAP_NET_BIND_SERVICE"]
    assert one("AmbientCapabilities").split() == ["CAP_NET_BIND_SERVICE"]
    assert one("NoNewPrivileges") == "yes"


def test_hardened_file_system_view():
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("StateDirectory") == "mtad"  # state_dir = /var/lib/mtad, the one writable place for state
    assert "ReadWritePaths" not in SERVICE
    assert one("MemoryDenyWriteExecute") == "yes"
