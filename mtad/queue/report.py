"""Read-only views of the queue for operators: the summary and one message's story.

Works against any mtad database, whether a daemon is running or not.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg

from mtad.db.queries import queries


SITE_STATUS_FRESH = timedelta(minutes=2)  # a node publishes every few seconds; older rows are from dead nodes


async def queue_summary(conn: asyncpg.Connection, now: datetime, top_domains: int = 20) -> dict[str, Any]:
    sql = queries()
    by_state = {row["state"]: row["recipients"] for row in await conn.fetch(sql["count_by_state"])}
    oldest = await conn.fetchval(sql["oldest_pending"])
    return {
        "by_state": by_state,
        "pending": sum(by_state.get(state, 0) for state in ("queued", "deferred", "active")),
        "oldest_pending_age_s": round((now - oldest).total_seconds(), 1) if oldest else None,
        "by_domain": [dict(row) for row in await conn.fetch(sql["count_pending_by_domain"], top_domains)],
        "by_tenant": [dict(row) for row in await conn.fetch(sql["count_pending_by_tenant"])],
        "sites": [dict(row) for row in await conn.fetch(sql["site_statuses"], now - SITE_STATUS_FRESH, 50)],
        "paused": [dict(row) for row in await conn.fetch(sql["list_pauses"])],
    }


async def message_story(conn: asyncpg.Connection, queue_id: str) -> dict[str, Any] | None:
    sql = queries()
    message = await conn.fetchrow(sql["message_by_queue_id"], queue_id)
    if message is None:
        return None
    return {
        "message": {key: value for key, value in dict(message).items() if key != "id"},
        "recipients": [dict(row) for row in await conn.fetch(sql["recipients_of_message"], message["id"])],
        "events": [dict(row) for row in await conn.fetch(sql["events_of_message"], message["id"])],
    }
