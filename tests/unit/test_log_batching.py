"""Log lines of one event-loop iteration go out in one write; warnings, other threads and loop-less callers
at once; nothing is lost or reordered."""

from __future__ import annotations

import asyncio
import io
import logging
import threading

import pytest

from mtad.observe.logs import IterationBatchingHandler, TextFormatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logged():
    stream = CountingStream()
    handler = IterationBatchingHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("mtad.test.batching")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.handlers[:] = []


def lines(stream: CountingStream) -> list[str]:
    return stream.getvalue().splitlines()


async def test_info_lines_of_one_iteration_are_written_together_at_its_end(logged):
    logger, stream = logged
    for n in range(3):
        logger.info("queued %d", n)
    assert lines(stream) == []  # still this iteration
    await asyncio.sleep(0)
    assert lines(stream) == ["INFO queued 0", "INFO queued 1", "INFO queued 2"]
    assert stream.writes == 1


async def test_a_warning_is_written_at_once_after_the_lines_pending_before_it(logged):
    logger, stream = logged
    logger.info("first")
    logger.warning("trouble")
    assert lines(stream) == ["INFO first", "WARNING trouble"]
    await asyncio.sleep(0)
    logger.info("after")
    await asyncio.sleep(0)
    assert lines(stream) == ["INFO first", "WARNING trouble", "INFO after"]


def test_without_a_running_loop_each_line_is_written_at_once(logged):
    logger, stream = logged
    logger.info("plain")
    assert lines(stream) == ["INFO plain"]


async def test_a_line_from_another_thread_is_written_at_once_and_in_order(logged):
    logger, stream = logged
    logger.info("loop")
    worker = threading.Thread(target=logger.info, args=("thread",))
    worker.start()
    worker.join()
    assert lines(stream) == ["INFO loop", "INFO thread"]


def test_a_flush_left_on_a_closed_loop_does_not_hold_back_the_next_loops_lines(logged):
    logger, stream = logged
    handler = logger.handlers[0]
    closed = asyncio.new_event_loop()
    logger.info("pending when the loop closed")
    handler._pending, handler._flush_on = [], closed  # as if that loop had closed before running its flush
    closed.close()

    async def log_once() -> None:
        logger.info("next loop")
        await asyncio.sleep(0)
        assert lines(stream)[-1:] == ["INFO next loop"]

    asyncio.run(log_once())


async def test_the_daemons_formatter_works_through_the_batching_handler():
    stream = CountingStream()
    handler = IterationBatchingHandler(stream)
    handler.setFormatter(TextFormatter())
    record = logging.LogRecord("mtad.x", logging.INFO, __file__, 1, "event.name", None, None)
    handler.handle(record)
    await asyncio.sleep(0)
    assert " info mtad.x event.name" in stream.getvalue()
