"""A private PostgreSQL cluster that mtad creates, starts and stops itself.

What it manages: one cluster per state directory, made with the distribution's own server binaries
(`initdb`, `pg_ctl`), listening on 127.0.0.1 at a port chosen once and on a unix socket in its own
directory, with scram-sha-256 password authentication for every connection and one database owned by
one role. `pg_ctl` daemonizes the postmaster in its own session, so the cluster outlives the mtad process
that started it; a later `start()` finds it running (and returns False), or starts it again after a crash
(PostgreSQL itself discards a stale `postmaster.pid`).

Why root runs the server as `postgres`: `initdb` and `pg_ctl` refuse to run as root (a superuser-owned
server would turn any SQL-level compromise into root). When mtad runs as root, every server-side command
goes through `runuser -u postgres --` and the cluster directories are chowned to that system user; the
client side (password file, `psql`, the daemon's own connections) stays with the caller. As a normal
user everything runs as that user.

Where files live, for a root such as `<state_dir>/pg`:

    root/password        generated password of the role, mode 0600, owned by the caller
    root/port            the TCP port, picked once (bind 127.0.0.1:0) and kept across restarts
    root/cluster-home    only when the cluster lives elsewhere (see below): the path of its home
    home/data/           PGDATA; settings in data/mtad.conf, included from postgresql.conf
    home/run/            unix socket directory
    home/log/postgres.log server log (pg_ctl -l)

`home` is `root` itself unless the `postgres` user cannot traverse to it (a repository under a mode-700
/root) or the socket path would exceed the 107-byte `sun_path` limit; then it is
`/var/lib/mtad/pg-<sha256(root)[:12]>` (for a normal user `$TMPDIR/mtad-<uid>/pg-...`), chosen by the pure
function `cluster_home` and remembered in `root/cluster-home`.

Every subprocess gets a timeout; a timed-out one is killed with its process group.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from mtad.state_files import write_atomically

log = logging.getLogger(__name__)

POSTGRES_SYSTEM_USER = "postgres"
SYSTEM_FALLBACK_BASE = Path("/var/lib/mtad")
SOCKET_PATH_MAX_BYTES = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL
POINTER_FILE = "cluster-home"
DATABASE_MARKER = "mtad.database-created"  # in PGDATA, so a fresh initdb forgets it
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_STOP_MODES = ("smart", "fast", "immediate")
_INCLUDE_LINE = "include_if_exists = 'mtad.conf'"


class EmbeddedPostgresError(RuntimeError):
    """The embedded cluster could not be found, created, started or stopped; the message says why."""


def find_pg_bindir() -> Path:
    """Highest-version /usr/lib/postgresql/*/bin with initdb and pg_ctl; else `pg_config --bindir`; else PATH."""
    versioned = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        version = _version_key(bindir.parent.name)
        if version is not None and _has_server_tools(bindir):
            versioned.append((version, bindir))
    if versioned:
        return max(versioned)[1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True, stdin=subprocess.DEVNULL).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_tools(Path(out)):
            return Path(out)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and _has_server_tools(Path(pg_ctl).parent):
        return Path(pg_ctl).parent
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found in /usr/lib/postgresql/*/bin, "
        "pg_config --bindir or PATH; run scripts/install-system-deps.sh")


def _version_key(name: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return None


def _has_server_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl"))


def cluster_home(root: Path, can_traverse: Callable[[Path], bool],
                 fallback_base: Path = SYSTEM_FALLBACK_BASE) -> Path:
    """Directory holding data/, run/ and log/ for an absolute, resolved `root`.

    `root` itself when the server user can traverse to it and the socket path fits `sun_path`;
    otherwise `fallback_base/pg-<first 12 hex of sha256(root)>`, stable for the same root.
    """
    if can_traverse(root) and _socket_path_fits(root / "run"):
        return root
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return fallback_base / f"pg-{digest}"


def _socket_path_fits(run_dir: Path) -> bool:
    return len(os.fsencode(run_dir / ".s.PGSQL.65535")) <= SOCKET_PATH_MAX_BYTES


def render_settings(*, port: int, socket_dir: Path, durable: bool, extra: Mapping[str, str] | None = None) -> str:
    """Text of data/mtad.conf. durable=False trades crash safety for speed (test suites only). `extra`:
    more settings as name -> value written as is (benchmarks/relay.py --pg-stats loads pg_stat_statements)."""
    lines = [
        "# Written by mtad (mtad/db/embedded.py) at every init/start; edits are overwritten.",
        "listen_addresses = '127.0.0.1'",
        f"port = {port}",
        f"unix_socket_directories = '{socket_dir}'",
        "logging_collector = off",
        "max_connections = 200",
        "shared_buffers = 128MB",
    ]
    if not durable:
        lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
    lines += [f"{name} = {value}" for name, value in (extra or {}).items()]
    return "\n".join(lines) + "\n"


def pick_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's choice for a bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedPostgres:
    """One cluster rooted at `root`; every method is idempotent and safe to call from a fresh process."""

    def __init__(self, root: Path, *, port: int = 0, durable: bool = True,
                 database: str = "mtad", user: str = "mtad", extra_settings: Mapping[str, str] | None = None) -> None:
        for what, name in (("database", database), ("user", user)):
            if not _IDENTIFIER.match(name):
                raise EmbeddedPostgresError(f"{what} name {name!r} must match {_IDENTIFIER.pattern}")
        if not 0 <= port <= 65535:
            raise EmbeddedPostgresError(f"port {port} is out of range")
        self.root = Path(root).resolve()
        self.durable = durable
        self.extra_settings = dict(extra_settings or {})
        self.database = database
        self.user = user
        self._requested_port = port
        self._port: int | None = None
        self._home: Path | None = None
        self._bindir: Path | None = None
        self._as_root = os.geteuid() == 0

    # -- layout -------------------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        """Directory holding data/, run/ and log/ (root itself, or the fall-back named in root/cluster-home)."""
        if self._home is None:
            self._home = self._locate_home()
        return self._home

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_path(self) -> Path:
        return self.home / "log" / "postgres.log"

    @property
    def password_path(self) -> Path:
        return self.root / "password"

    @property
    def port(self) -> int:
        """TCP port: the one given, else the one remembered in root/port, else a free one (then remembered)."""
        if self._port is None:
            self._port = self._resolve_port()
        return self._port

    def _locate_home(self) -> Path:
        pointer = self.root / POINTER_FILE
        if pointer.is_file():
            return Path(pointer.read_text().strip())
        if (self.root / "data" / "PG_VERSION").exists():
            return self.root  # an existing cluster in place wins over a fresh traversal verdict
        if self._as_root:
            return cluster_home(self.root, self._postgres_can_traverse, SYSTEM_FALLBACK_BASE)
        user_base = Path(tempfile.gettempdir()) / f"mtad-{os.getuid()}"
        return cluster_home(self.root, lambda _path: True, user_base)

    def _postgres_can_traverse(self, path: Path) -> bool:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return self._run(["test", "-x", probe], timeout_s=10, as_postgres=True).returncode == 0

    def _resolve_port(self) -> int:
        port_file = self.root / "port"
        stored = _read_int(port_file)
        if self._requested_port:
            if stored != self._requested_port:
                self.root.mkdir(parents=True, exist_ok=True)
                write_atomically(port_file, f"{self._requested_port}\n", 0o644)
            return self._requested_port
        if stored:
            return stored
        self.root.mkdir(parents=True, exist_ok=True)
        port = pick_free_port()
        write_atomically(port_file, f"{port}\n", 0o644)
        return port

    def _is_initialised(self) -> bool:
        return self.root.is_dir() and (self.data_dir / "PG_VERSION").exists()

    # -- lifecycle ----------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster, its settings and the database; a no-op for work already done."""
        self._prepare()
        if (self.data_dir / DATABASE_MARKER).exists():
            return
        was_running = self.is_running()
        if not was_running:
            self._clear_stale_lock_files()
            self._pg_ctl_start(timeout_s=60)
        try:
            self._ensure_database()
        finally:
            if not was_running:
                self._pg_ctl_stop("fast", timeout_s=60)

    def start(self, timeout_s: float = 30) -> bool:
        """Start the server (initialising first if needed); True if this call started it.

        Settings (port, durability) are rewritten on every call and apply from the next server start.
        """
        self._prepare()
        started = not self.is_running()
        if started:
            self._clear_stale_lock_files()
            try:
                self._pg_ctl_start(timeout_s)
            except EmbeddedPostgresError:
                if not self.is_running():
                    raise
                started = False  # another process started it between our check and pg_ctl
        self._wait_ready(timeout_s)
        self._ensure_database()
        return started

    def stop(self, mode: str = "fast", timeout_s: float = 30) -> None:
        """Stop the server if it runs; mode is pg_ctl's: smart, fast or immediate."""
        if mode not in _STOP_MODES:
            raise EmbeddedPostgresError(f"stop mode {mode!r} is not one of {', '.join(_STOP_MODES)}")
        if self.is_running():
            self._pg_ctl_stop(mode, timeout_s)

    def is_running(self) -> bool:
        return self._running_pid() is not None

    def status(self) -> str:
        if not self._is_initialised():
            return f"not initialised (root {self.root})"
        pid = self._running_pid()
        where = f"port {self.port}, data {self.data_dir}"
        return f"running (pid {pid}, {where})" if pid else f"stopped ({where})"

    def url(self) -> str:
        """DSN over the unix socket directory, for asyncpg.connect() or libpq."""
        host = quote(str(self.socket_dir), safe="/")
        return (f"postgresql://{self.user}:{quote(self._read_password(), safe='')}@/{self.database}"
                f"?host={host}&port={self.port}")

    def tcp_url(self) -> str:
        """DSN over 127.0.0.1:port."""
        return (f"postgresql://{self.user}:{quote(self._read_password(), safe='')}"
                f"@127.0.0.1:{self.port}/{self.database}")

    # -- steps --------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True)
            os.chmod(self.root, 0o755)  # whatever the umask, so the server user may live in it
        home = self.home
        if home != self.root:
            pointer = self.root / POINTER_FILE
            if not pointer.is_file() or pointer.read_text().strip() != str(home):
                write_atomically(pointer, f"{home}\n", 0o644)
        port = self.port
        password = self._ensure_password()
        self._make_dirs(home)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(password)
        self._write_settings(port)

    def _make_dirs(self, home: Path) -> None:
        if home != self.root:
            # Both traversable, whatever the umask: the server user must reach run/; data/ is 0700 itself.
            for path in (home.parent, home):
                if not path.is_dir():
                    path.mkdir(parents=True)
                    os.chmod(path, 0o755)
            self._give_to_postgres(home)
        for path, mode in ((self.data_dir, 0o700), (self.socket_dir, 0o755), (self.log_path.parent, 0o750)):
            if not path.is_dir():
                path.mkdir()
                os.chmod(path, mode)  # mkdir's mode is filtered by the umask
            self._give_to_postgres(path)

    def _give_to_postgres(self, path: Path) -> None:
        if not self._as_root:
            return
        uid, gid = _postgres_ids()
        if path.stat().st_uid != uid:
            os.chown(path, uid, gid)

    def _ensure_password(self) -> str:
        if not self.password_path.is_file():
            write_atomically(self.password_path, secrets.token_urlsafe(24) + "\n", 0o600)
        return self._read_password()

    def _read_password(self) -> str:
        try:
            return self.password_path.read_text().strip()
        except FileNotFoundError:
            raise EmbeddedPostgresError(
                f"no password file at {self.password_path}: the cluster is not initialised") from None

    def _initdb(self, password: str) -> None:
        # initdb runs as postgres, so the password file it reads must be postgres's, not the caller's.
        pwfile = self.socket_dir / ".initdb-password"
        write_atomically(pwfile, password + "\n", 0o600)
        self._give_to_postgres(pwfile)
        argv = [self._tool("initdb"), "-D", self.data_dir, "-U", self.user, "--auth=scram-sha-256",
                f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-instructions"]
        if not self.durable:
            argv.append("--no-sync")
        try:
            result = self._run(argv, timeout_s=180, as_postgres=True)
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed (exit {result.returncode}) for {self.data_dir}: {_first_line(result.stderr)}")
        log.debug("initialised PostgreSQL cluster in %s", self.data_dir)

    def _write_settings(self, port: int) -> None:
        main_conf = self.data_dir / "postgresql.conf"
        if _INCLUDE_LINE not in main_conf.read_text():
            with main_conf.open("a") as conf:
                conf.write(f"\n# mtad's settings (listen address, port, socket, durability)\n{_INCLUDE_LINE}\n")
        ours = self.data_dir / "mtad.conf"
        text = render_settings(port=port, socket_dir=self.socket_dir, durable=self.durable, extra=self.extra_settings)
        if not ours.is_file() or ours.read_text() != text:
            write_atomically(ours, text, 0o600)
            self._give_to_postgres(ours)

    def _pg_ctl_start(self, timeout_s: float) -> None:
        wait_s = max(1, math.ceil(timeout_s))
        result = self._run([self._tool("pg_ctl"), "start", "-D", self.data_dir, "-l", self.log_path,
                            "-w", "-t", str(wait_s), "-s"], timeout_s=wait_s + 15, as_postgres=True)
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}): "
                f"{_first_line(result.stderr or result.stdout)}\n{self._log_tail()}")

    def _pg_ctl_stop(self, mode: str, timeout_s: float) -> None:
        wait_s = max(1, math.ceil(timeout_s))
        result = self._run([self._tool("pg_ctl"), "stop", "-D", self.data_dir, "-m", mode,
                            "-w", "-t", str(wait_s), "-s"], timeout_s=wait_s + 15, as_postgres=True)
        if result.returncode != 0 and self.is_running():
            raise EmbeddedPostgresError(
                f"PostgreSQL did not stop (pg_ctl exit {result.returncode}): "
                f"{_first_line(result.stderr or result.stdout)}\n{self._log_tail()}")

    def _running_pid(self) -> int | None:
        if not self._is_initialised():
            return None
        pid = _read_int(self.data_dir / "postmaster.pid", first_line=True)
        return pid if pid and _is_live_postgres(pid) else None

    def _clear_stale_lock_files(self) -> None:
        # PostgreSQL trusts kill(pid, 0), which succeeds for a zombie: under a PID 1 that never reaps
        # (many containers) a killed postmaster would block every later start with "lock file exists".
        for lock in (self.data_dir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{self.port}.lock"):
            pid = _read_int(lock, first_line=True)
            if pid is not None and not _is_live_postgres(pid):
                log.debug("removing stale %s of dead pid %d", lock, pid)
                lock.unlink(missing_ok=True)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        argv = [self._tool("pg_isready"), "-q", "-h", self.socket_dir, "-p", str(self.port),
                "-U", self.user, "-d", "postgres", "-t", "2"]
        while self._run(argv, timeout_s=10).returncode != 0:
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL runs but did not accept connections within {timeout_s:g}s\n{self._log_tail()}")
            time.sleep(0.1)

    def _ensure_database(self) -> None:
        marker = self.data_dir / DATABASE_MARKER
        if marker.exists():
            return
        found = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
        if found.strip() != "1":
            self._psql(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')
        write_atomically(marker, f"{self.database}\n", 0o600)
        self._give_to_postgres(marker)

    def _psql(self, sql: str) -> str:
        env = {"PGPASSWORD": self._read_password(), "PGHOST": str(self.socket_dir), "PGPORT": str(self.port),
               "PGUSER": self.user, "PGDATABASE": "postgres", "PGCONNECT_TIMEOUT": "10"}
        result = self._run([self._tool("psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql],
                           timeout_s=30, env_extra=env)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed (exit {result.returncode}): {_first_line(result.stderr)}")
        return result.stdout

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 8192))
                tail = fh.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no server log at {self.log_path})"
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)

    # -- processes ----------------------------------------------------------------------------------

    def _tool(self, name: str) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir / name

    def _run(self, argv: Sequence[object], *, timeout_s: float, as_postgres: bool = False,
             env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        args = [str(arg) for arg in argv]
        if as_postgres and self._as_root:
            _postgres_ids()  # a clear error when the system user is missing
            args = [_runuser(), "-u", POSTGRES_SYSTEM_USER, "--", *args]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", **(env_extra or {}))
        return _run_bounded(args, timeout_s=timeout_s, env=env)


def _run_bounded(args: list[str], *, timeout_s: float, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run in a new session (so a Ctrl-C to mtad never reaches the server) and kill the group on timeout."""
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd="/", start_new_session=True)
    except OSError as exc:
        raise EmbeddedPostgresError(f"cannot run {args[0]}: {exc}") from exc
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
        raise EmbeddedPostgresError(f"{' '.join(args)} did not finish within {timeout_s:g}s") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _runuser() -> str:
    found = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None)
    if not found:
        raise EmbeddedPostgresError("running as root needs runuser (util-linux) to start PostgreSQL as postgres")
    return found


def _postgres_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        raise EmbeddedPostgresError(
            f"running as root needs a '{POSTGRES_SYSTEM_USER}' system user to own the cluster; "
            "install the postgresql package") from None
    return entry.pw_uid, entry.pw_gid


def _read_int(path: Path, *, first_line: bool = False) -> int | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return int((text.splitlines() or [""])[0] if first_line else text.strip())
    except ValueError:
        return None


def _is_live_postgres(pid: int) -> bool:
    """True unless `pid` is gone, a zombie, or (where /proc shows it) a process that is not PostgreSQL."""
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True  # cannot tell: let PostgreSQL's own lock check decide
    return state not in ("Z", "X") and (b"postgres" in cmdline or b"postmaster" in cmdline)


def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return "(no output)"
