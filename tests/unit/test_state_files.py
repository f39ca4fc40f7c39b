"""Files mtad makes on its first start (the development TLS certificate, the feedback key), made by several
worker processes at once: one of them makes each, every one of them loads the same whole file."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from mtad.feedback.secret import load_or_create_key
from mtad.ingest.tls import ensure_self_signed, server_context


def _start_like_a_worker(directory: str, barrier, results) -> None:
    barrier.wait()  # all at once, as `mtad run --workers N` starts them
    try:
        cert, key = ensure_self_signed(Path(directory), "mx.test.example")
        server_context(cert, key)  # raises on a key that does not match the certificate
        results.put("ok")
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put(repr(error))


def test_workers_starting_together_all_load_one_matching_pair(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        directory = tmp_path / f"tls-{round_}"
        barrier, results = context.Barrier(8), context.Queue()
        workers = [context.Process(target=_start_like_a_worker, args=(str(directory), barrier, results)) for _ in range(8)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert outcomes == ["ok"] * 8
        assert (directory / "submission.key").stat().st_mode & 0o777 == 0o600
    cert, key = ensure_self_signed(tmp_path / "tls-0", "mx.test.example")
    assert cert.read_bytes() == (tmp_path / "tls-0" / "submission.crt").read_bytes()


def _load_key_like_a_worker(directory: str, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(load_or_create_key("", Path(directory)).hex())
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put(repr(error))


def test_workers_starting_together_all_load_one_feedback_key(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        directory = tmp_path / f"state-{round_}"
        barrier, results = context.Barrier(8), context.Queue()
        workers = [context.Process(target=_load_key_like_a_worker, args=(str(directory), barrier, results))
                   for _ in range(8)]
        for worker in workers:
            worker.start()
        keys = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert len(set(keys)) == 1 and len(bytes.fromhex(keys[0])) == 32, keys
        assert (directory / "feedback.key").stat().st_mode & 0o777 == 0o600
