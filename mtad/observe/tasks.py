"""Stopping background tasks for sure.

In Python 3.11 `asyncio.wait_for` can swallow a cancellation that arrives just as the awaited thing
completes (fixed in 3.12), so one `cancel()` may not end a loop built on it. Cancel, wait a little, and
cancel again until every task is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task], patience_s: float = 1.0) -> None:
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience_s)
