"""Files mtad makes on its first start (the development TLS certificate, the feedback key), made by several
worker processes at once: one of them makes each, every one of them loads the same whole file."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from mtad.feedback.secret import load_or_create_key
from mtad.ingest.tls import ensure_self_signed, server_context

WORKERS = 8


def _start_like_a_worker(load, directory: str, barrier, results) -> None:
    barrier.wait()  # all at once, as `mtad run --workers N` starts them
    try:
        results.put(load(Path(directory)))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put(repr(error))


def _started_together(load, directory: Path) -> list:
    """What `load(directory)` gave in each of WORKERS processes started at the same moment."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(WORKERS), context.Queue()
    workers = [context.Process(target=_start_like_a_worker, args=(load, str(directory), barrier, results))
               for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    return outcomes


def _load_tls(directory: Path) -> str:
    cert, key = ensure_self_signed(directory, "mx.test.example")
    server_context(cert, key)  # raises on a key that does not match the certificate
    return cert.read_text()


def _load_feedback_key(directory: Path) -> str:
    return load_or_create_key("", directory).hex()


def test_workers_starting_together_all_load_one_matching_tls_pair(tmp_path):
    for round_ in range(5):
        directory = tmp_path / f"tls-{round_}"
        certificates = _started_together(_load_tls, directory)
        assert len(set(certificates)) == 1 and "BEGIN CERTIFICATE" in certificates[0], certificates
        assert (directory / "submission.key").stat().st_mode & 0o777 == 0o600


def test_workers_starting_together_all_load_one_feedback_key(tmp_path):
    for round_ in range(5):
        directory = tmp_path / f"state-{round_}"
        keys = _started_together(_load_feedback_key, directory)
        assert len(set(keys)) == 1 and len(bytes.fromhex(keys[0])) == 32, keys
        assert (directory / "feedback.key").stat().st_mode & 0o777 == 0o600
