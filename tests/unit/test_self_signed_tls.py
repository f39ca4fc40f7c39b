"""The development certificate of the submission listeners, made by several worker processes at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

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
