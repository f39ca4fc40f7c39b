"""Group commit of submissions: the messages that arrive while one is being stored are stored together.

A durable commit costs PostgreSQL a WAL flush and a transaction, and the daemon a round trip; stored one by
one, 20 submitting sessions paid that 20 times. Here each session's `store()` joins a queue; a batch starts
at once when fewer than `max_in_flight` batches are being written (so a lone message waits for nothing), and
otherwise the messages that pile up meanwhile go in the next batch, one statement and one commit for all.
Measured with benchmarks: PostgreSQL's CPU per stored message fell from ~0.65 to ~0.27 ms with batches of 5.

Every caller still gets its own answer only after its message is committed. A batch that PostgreSQL refuses
for its content (a value it cannot store, a queue id already taken) is retried message by message, so one
bad message costs the others nothing; a batch that fails because the database is unavailable fails all of
them alike (each client gets 451 and keeps its message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from mtad.model import Submission
from mtad.queue.store import QueueStore

# PostgreSQL refused what one of the messages holds, not the batch: worth storing each on its own.
_CONTENT_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


class GroupCommit:
    def __init__(self, store: QueueStore, *, max_batch: int = 64, max_in_flight: int = 2) -> None:
        """`max_in_flight`: batches written at once; two keep one batch filling while the other commits."""
        self._store = store
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[Submission, asyncio.Future[dict[str, str]]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def store(self, submission: Submission) -> dict[str, str]:
        """Store the message (committed when this returns); the recipients stored as suppressed, with reason."""
        answer: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_consume)  # an answer its session no longer awaits is not an unhandled error
        self._waiting.append((submission, answer))
        self._start_batches()
        # shield: a session that goes away mid-commit must not cancel the batch the other messages are in
        return await asyncio.shield(answer)

    def _start_batches(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            self._in_flight += 1
            task = asyncio.create_task(self._write(batch), name="group-commit")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[tuple[Submission, asyncio.Future[dict[str, str]]]]) -> None:
        try:
            await self._write_batch(batch)
        finally:
            for _, answer in batch:  # cancelled at shutdown: nobody is left waiting for an answer
                if not answer.done():
                    answer.cancel()
            self._in_flight -= 1
            self._start_batches()

    async def _write_batch(self, batch: Sequence[tuple[Submission, asyncio.Future[dict[str, str]]]]) -> None:
        try:
            results = await self._store.insert_submissions([submission for submission, _ in batch])
        except _CONTENT_ERRORS as error:
            if len(batch) == 1:
                _answer(batch[0][1], error=error)
                return
            for item in batch:
                await self._write_batch([item])
            return
        except Exception as error:  # unavailable or timed out: all alike
            for _, answer in batch:
                _answer(answer, error=error)
            return
        for (_, answer), suppressed in zip(batch, results):
            _answer(answer, result=suppressed)


def _answer(answer: asyncio.Future[dict[str, str]], *, result: dict[str, str] | None = None,
            error: Exception | None = None) -> None:
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)


def _consume(answer: asyncio.Future[dict[str, str]]) -> None:
    if not answer.cancelled():
        answer.exception()
