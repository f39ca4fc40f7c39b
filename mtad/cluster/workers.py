"""`mtad run --workers N`: N daemon processes on one host, sharing its listeners and its database.

The supervisor (this process) starts the embedded PostgreSQL when the config uses one and applies the schema,
then starts N workers (`mtad run` with MTAD_WORKER=k). Each worker is a full node: its own membership row,
claims, connection slots and event loop, so the host's cores are used and the cluster rules (mtad.cluster)
keep site limits for all of them together. SMTP listeners (submission and feedback) are shared through
SO_REUSEPORT, the kernel spreading connections; worker k's HTTP listeners (metrics, health, unsubscribe
pages) are on the configured port + k, so Prometheus scrapes each worker as its own instance.

SO_REUSEPORT also lets any other process of the same user share those ports: a second `mtad run --workers N`
started by mistake would silently take half the connections. So the supervisor first binds each shared port
without SO_REUSEPORT (and lets go at once), and refuses to start if one is already in use.

Signals: TERM and INT stop every worker (each drains as a single daemon does), HUP is passed on for a
reload. A worker that dies on its own is restarted after a backoff. Under systemd the workers' READY=1 go
to the supervisor's own notify socket, and the supervisor says READY=1 once every worker has.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from mtad.config import Settings
from mtad.observe import systemd
from mtad.observe.logs import log_event

log = logging.getLogger("mtad.workers")

WORKER_ENV = "MTAD_WORKER"
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def worker_index(environ=os.environ) -> int | None:
    """This process's worker number under a supervisor, or None when it runs alone."""
    value = environ.get(WORKER_ENV)
    return int(value) if value and value.isdigit() else None


def die_with_the_supervisor() -> None:
    """In a worker: have the kernel send SIGTERM when the supervisor dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so no orphaned worker keeps serving with nobody to stop or restart it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's own signals are all there is
    if os.getppid() == 1:  # the supervisor died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def shifted_port(address: str, by: int) -> str:
    """'127.0.0.1:8025' shifted by 2 -> '127.0.0.1:8027' (port 0 stays 0: the kernel picks)."""
    host, _, port = address.rpartition(":")
    return address if by == 0 or port == "0" else f"{host}:{int(port) + by}"


def shared_listen_addresses(settings: Settings) -> list[str]:
    """The SMTP listeners the workers share through SO_REUSEPORT (port 0 is each worker's own pick)."""
    addresses = (*settings.submission.listen, *settings.submission.implicit_tls_listen, *settings.feedback.listen)
    return [address for address in addresses if not address.endswith(":0")]


def ports_in_use(addresses: list[str]) -> list[str]:
    """Those of `addresses` that a plain bind (no SO_REUSEPORT) finds taken."""
    from mtad.ingest.server import parse_listen_address

    taken = []
    for address in addresses:
        host, port = parse_listen_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners: TIME_WAIT is no owner
            try:
                probe.bind((host, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:  # anything else, the workers' own bind reports
                    taken.append(address)
    return taken


class Supervisor:
    def __init__(self, settings: Settings, config_path: Path | None, workers: int) -> None:
        self.settings = settings
        self.config_path = config_path
        self.workers = workers
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._ready: set[int] = set()
        self._notify_dir = tempfile.mkdtemp(prefix="mtad-workers-")
        self._notify_path = os.path.join(self._notify_dir, "notify")

    async def run(self) -> int:
        from mtad.app import prepare_database  # the daemon's own start-up, without the rest of the app

        taken = ports_in_use(shared_listen_addresses(self.settings))
        if taken:
            log_event(log, "workers.address_in_use", logging.ERROR, addresses=taken)
            print(f"mtad: {', '.join(taken)} already in use (another mtad running?)", file=sys.stderr)
            return 1
        cluster = await prepare_database(self.settings)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._send(signal.SIGHUP))
        notify = self._listen_for_notifications(loop)
        interval = systemd.watchdog_interval_s()
        watchdog = loop.create_task(self._watchdog(interval)) if interval else None
        try:
            keepers = [asyncio.create_task(self._keep_running(k)) for k in range(self.workers)]
            await asyncio.gather(*keepers)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            loop.remove_reader(notify.fileno())
            notify.close()
            os.unlink(self._notify_path)
            os.rmdir(self._notify_dir)
            if cluster is not None:
                await asyncio.to_thread(cluster.stop)
        log_event(log, "workers.stopped", workers=self.workers)
        return 0

    def _stop(self) -> None:
        if not self._stopping.is_set():
            log_event(log, "workers.stopping", workers=len(self._processes))
            systemd.notify("STOPPING=1")
        self._stopping.set()
        self._send(signal.SIGTERM)

    def _send(self, signum: int) -> None:
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signum)

    async def _keep_running(self, k: int) -> None:
        restarts = 0
        while not self._stopping.is_set():
            env = dict(os.environ, **{WORKER_ENV: str(k), "NOTIFY_SOCKET": self._notify_path})
            env.pop("WATCHDOG_USEC", None)  # the supervisor answers systemd's watchdog for the group
            argv = [sys.executable, "-m", "mtad"]
            if self.config_path is not None:
                argv += ["--config", str(self.config_path)]
            process = await asyncio.create_subprocess_exec(*argv, "run", "--workers", "1", env=env)
            self._processes[k] = process
            log_event(log, "workers.started", worker=k, pid=process.pid)
            code = await process.wait()
            self._ready.discard(k)
            if self._stopping.is_set():
                return
            delay = _RESTART_BACKOFF_S[min(restarts, len(_RESTART_BACKOFF_S) - 1)]
            log_event(log, "workers.died", logging.ERROR, worker=k, exit_code=code, restart_in_s=delay)
            restarts += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass

    def _listen_for_notifications(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self._notify_path)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._read_notification, sock)
        return sock

    def _read_notification(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        fields = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line)
        if fields.get("READY") != "1" or not fields.get(WORKER_ENV, "").isdigit():
            return
        self._ready.add(int(fields[WORKER_ENV]))
        if len(self._ready) == self.workers:
            systemd.notify(f"READY=1\nSTATUS=accepting mail with {self.workers} workers")
            log_event(log, "workers.ready", workers=self.workers)

    async def _watchdog(self, interval_s: float) -> None:
        while not self._stopping.is_set():
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)
