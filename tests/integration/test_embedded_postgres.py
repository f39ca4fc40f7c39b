"""The embedded PostgreSQL cluster against real server binaries: lifecycle, settings, files, crash recovery.

One non-durable cluster serves the module (initdb once); each test leaves it running. Run as root, a
pytest tmp_path sits under a mode-700 directory, so these tests also exercise the /var/lib/mtad fall-back;
`test_cluster_lives_in_root_when_the_server_user_can_traverse_it` covers the in-place layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest

from mtad.db.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    cluster_home,
    find_pg_bindir,
    render_settings,
)


def _remove_cluster(pg: EmbeddedPostgres) -> None:
    pg.stop(mode="immediate")
    if pg.home != pg.root:
        shutil.rmtree(pg.home, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("embedded") / "pg", durable=False)
    yield pg
    _remove_cluster(pg)


@pytest.fixture
def pg(cluster: EmbeddedPostgres) -> EmbeddedPostgres:
    cluster.start()
    return cluster


async def _fetchval(dsn: str, sql: str):
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _pid_is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # an unreaped zombie holds nothing any more


def _kill_cluster_processes(postmaster_pid: int) -> None:
    """SIGKILL the postmaster and its children by pid, as a crash or an OOM kill would."""
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == postmaster_pid]
    for pid in [postmaster_pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while not all(_pid_is_gone(pid) for pid in [postmaster_pid, *children]):
        assert time.monotonic() < deadline, "killed server processes did not exit"
        time.sleep(0.05)


def _ppid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


async def test_started_cluster_accepts_connections_over_unix_socket_and_tcp(pg: EmbeddedPostgres):
    assert pg.is_running()
    assert await _fetchval(pg.url(), "SELECT 1") == 1
    assert await _fetchval(pg.tcp_url(), "SELECT 1") == 1
    assert await _fetchval(pg.url(), "SELECT current_database() || '/' || current_user") == "mtad/mtad"
    assert pg.url().endswith(f"?host={pg.socket_dir}&port={pg.port}")
    assert f"@127.0.0.1:{pg.port}/mtad" in pg.tcp_url()


async def test_wrong_password_is_rejected(pg: EmbeddedPostgres):
    wrong = pg.tcp_url().replace(pg.password_path.read_text().strip(), "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _fetchval(wrong, "SELECT 1")


def test_start_returns_false_when_already_running(pg: EmbeddedPostgres):
    pid = pg.status().split("pid ")[1].split(",")[0]
    assert pg.start() is False
    assert pg.init() is None
    assert f"pid {pid}," in pg.status()


async def test_committed_data_survives_stop_and_start(pg: EmbeddedPostgres):
    conn = await asyncpg.connect(pg.url())
    await conn.execute("DROP TABLE IF EXISTS kept; CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')")
    await conn.close()

    pg.stop()
    assert not pg.is_running()
    assert pg.status().startswith("stopped (")
    pg.stop()  # idempotent

    assert pg.start() is True
    assert pg.status().startswith("running (pid ")
    assert await _fetchval(pg.url(), "SELECT v FROM kept") == "x"


async def test_non_durable_cluster_runs_with_fsync_off(pg: EmbeddedPostgres):
    for setting in ("fsync", "synchronous_commit", "full_page_writes"):
        assert await _fetchval(pg.url(), f"SHOW {setting}") == "off"
    assert await _fetchval(pg.url(), "SHOW max_connections") == "200"
    assert await _fetchval(pg.url(), "SHOW listen_addresses") == "127.0.0.1"


def test_durable_settings_leave_postgres_crash_safety_defaults():
    durable = render_settings(port=5999, socket_dir=Path("/s"), durable=True)
    fast = render_settings(port=5999, socket_dir=Path("/s"), durable=False)
    assert "fsync" not in durable and "synchronous_commit" not in durable
    assert {"fsync = off", "synchronous_commit = off", "full_page_writes = off"} <= set(fast.splitlines())
    assert "port = 5999" in durable and "unix_socket_directories = '/s'" in durable


def test_password_file_is_readable_by_its_owner_only(pg: EmbeddedPostgres):
    mode = stat.S_IMODE(pg.password_path.stat().st_mode)
    assert mode == 0o600
    assert pg.password_path.stat().st_uid == os.geteuid()
    assert len(pg.password_path.read_text().strip()) >= 24


def test_new_instance_for_the_same_root_reuses_port_and_password(pg: EmbeddedPostgres):
    again = EmbeddedPostgres(pg.root, durable=False)
    assert again.port == pg.port
    assert again.url() == pg.url()
    assert again.is_running()


def test_start_recovers_after_the_server_was_killed_leaving_a_stale_pid_file(pg: EmbeddedPostgres):
    postmaster_pid = int((pg.data_dir / "postmaster.pid").read_text().splitlines()[0])
    _kill_cluster_processes(postmaster_pid)
    assert (pg.data_dir / "postmaster.pid").exists()
    assert not pg.is_running()

    assert pg.start() is True
    assert pg.is_running()
    assert f"pid {postmaster_pid}," not in pg.status()


def test_cluster_outlives_the_process_that_started_it(pg: EmbeddedPostgres):
    pg.stop()
    script = (
        "import sys; from pathlib import Path; from mtad.db.embedded import EmbeddedPostgres; "
        "print(EmbeddedPostgres(Path(sys.argv[1]), durable=False).start())"
    )
    done = subprocess.run([sys.executable, "-c", script, str(pg.root)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert pg.is_running()


def test_start_failure_reports_the_server_log(pg: EmbeddedPostgres):
    pg.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", pg.port))
        squatter.listen()
        with pytest.raises(EmbeddedPostgresError) as failure:
            pg.start(timeout_s=10)
    message = str(failure.value)
    assert message.startswith("PostgreSQL did not start")
    assert "could not bind" in message or "could not create any TCP/IP sockets" in message
    assert str(pg.log_path) in message
    assert pg.start() is True


def test_cluster_lives_in_root_when_the_server_user_can_traverse_it():
    parent = Path(tempfile.mkdtemp(prefix="mtad-pg-"))
    try:
        os.chmod(parent, 0o755)
        pg = EmbeddedPostgres(parent / "pg", durable=False)
        try:
            assert pg.start() is True
            assert pg.home == pg.root
            assert not (pg.root / "cluster-home").exists()
            assert (pg.root / "data" / "PG_VERSION").exists()
            if os.geteuid() == 0:
                assert (pg.root / "data").stat().st_uid != 0  # owned by the postgres system user
            subprocess.run([str(find_pg_bindir() / "pg_isready"), "-q", "-h", str(pg.socket_dir),
                            "-p", str(pg.port)], check=True, timeout=10)
        finally:
            _remove_cluster(pg)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_fallback_home_is_named_in_a_pointer_file(pg: EmbeddedPostgres):
    pointer = pg.root / "cluster-home"
    if pg.home == pg.root:
        assert not pointer.exists()
    else:
        assert Path(pointer.read_text().strip()) == pg.home
        assert EmbeddedPostgres(pg.root).home == pg.home


def _digest(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    ("root", "traversable", "expected"),
    [
        ("/srv/mtad/var/pg", True, "/srv/mtad/var/pg"),
        ("/root/mtad/var/pg", False, f"/var/lib/mtad/pg-{_digest('/root/mtad/var/pg')}"),
        ("/home/a/mtad/var/pg", False, f"/var/lib/mtad/pg-{_digest('/home/a/mtad/var/pg')}"),
        ("/x/" + "d" * 90, True, f"/var/lib/mtad/pg-{_digest('/x/' + 'd' * 90)}"),  # socket path too long
    ],
)
def test_cluster_home_falls_back_when_root_is_unreachable_or_too_deep(root: str, traversable: bool, expected: str):
    asked: list[Path] = []

    def can_traverse(path: Path) -> bool:
        asked.append(path)
        return traversable

    assert cluster_home(Path(root), can_traverse, Path("/var/lib/mtad")) == Path(expected)
    assert asked == [Path(root)]


def test_cluster_home_fallback_is_stable_per_root_and_distinct_across_roots():
    never = lambda _path: False  # noqa: E731
    a1 = cluster_home(Path("/root/a/pg"), never, Path("/var/lib/mtad"))
    a2 = cluster_home(Path("/root/a/pg"), never, Path("/var/lib/mtad"))
    b = cluster_home(Path("/root/b/pg"), never, Path("/var/lib/mtad"))
    assert a1 == a2 != b
    assert a1.parent == Path("/var/lib/mtad")


def test_find_pg_bindir_returns_a_directory_with_server_tools():
    bindir = find_pg_bindir()
    assert os.access(bindir / "initdb", os.X_OK)
    assert os.access(bindir / "pg_ctl", os.X_OK)


def test_invalid_role_or_database_name_is_refused_before_touching_disk(tmp_path: Path):
    with pytest.raises(EmbeddedPostgresError):
        EmbeddedPostgres(tmp_path / "pg", user='x"; DROP')
    assert not (tmp_path / "pg").exists()
