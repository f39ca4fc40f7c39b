"""`mtad top [--interval S] [--once] [--json]`: a live, read-only view of the daemon's database for operators.

Every refresh takes one snapshot in a read-only, repeatable-read transaction (all numbers from one moment) on a
connection whose transactions default to read-only as well: `mtad top` never writes. Each query is bounded by an
index or a LIMIT, so watching a queue of millions costs little; mtad.observe.top_view says what each number
means and turns two snapshots into what is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg

from mtad.cli.database import operator_connection
from mtad.config import Settings
from mtad.db.pool import DATABASE_UNAVAILABLE
from mtad.observe.top_view import (
    DEFAULT_CAP,
    EVENT_SETTLE,
    QUEUE_STATES,
    Frame,
    NodeLoad,
    SiteLoad,
    SiteTrouble,
    Snapshot,
    build_frame,
    frame_as_json,
    render_lines,
    render_text,
)
from mtad.queue.report import SITE_STATUS_FRESH

# The database's clock, where it is, and the newest ids (two index lookups: the growth is the arrival rate).
SNAPSHOT_CLOCK = """
SELECT now() AS at, current_database() AS database, host(inet_server_addr()) AS host, inet_server_port() AS port,
       coalesce((SELECT max(id) FROM messages), 0) AS messages_max_id,
       coalesce((SELECT max(id) FROM recipients), 0) AS recipients_max_id
"""

# Events by kind stamped within ($1, $2]: a range on events_at_idx.
EVENTS_IN_WINDOW = """
SELECT kind, count(*) AS events FROM events WHERE at > $1 AND at <= $2 GROUP BY kind
"""

# The queue's states counted up to a cap ($1). The states are literals, not parameters, so that the planner can
# use the partial indexes (recipients_due_idx for queued/deferred, recipients_lease_idx for active) even when
# it switches the prepared statement to a generic plan; the oldest pending comes from recipients_pending_age_idx.
QUEUE_CAPPED = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM recipients WHERE state = 'queued' LIMIT $1) AS q) AS queued,
       (SELECT count(*) FROM (SELECT 1 FROM recipients WHERE state = 'active' LIMIT $1) AS a) AS active,
       (SELECT count(*) FROM (SELECT 1 FROM recipients WHERE state = 'deferred' LIMIT $1) AS d) AS deferred,
       (SELECT min(queued_at) FROM recipients WHERE state IN ('queued', 'deferred')) AS oldest_pending_at
"""

# site_status rows refreshed within $1 (older ones are from nodes that stopped): how many nodes and sites.
SITE_TOTALS = """
SELECT count(DISTINCT node) AS nodes, count(DISTINCT site) AS sites,
       count(DISTINCT site) FILTER (WHERE health <> 'healthy') AS troubled_sites
FROM site_status WHERE updated_at > now() - $1::interval
"""

# The sites with the most work, all nodes' views added up.
BUSIEST_SITES = """
SELECT site, min(provider) AS provider, count(*) AS nodes, sum(concurrency)::int AS window,
       sum(in_flight)::int AS in_flight, sum(pending)::int AS pending
FROM site_status WHERE updated_at > now() - $1::interval
GROUP BY site HAVING sum(in_flight + pending) > 0
ORDER BY sum(in_flight + pending) DESC, site LIMIT $2
"""

# Not-healthy sites per node, in the order of mtad.observe.top_view.troubled_order (so the LIMIT keeps the right ones).
TROUBLED_SITES = """
SELECT node, site, provider, health, concurrency AS window, in_flight, pending, rate_scale, dead_until, last_error
FROM site_status WHERE updated_at > now() - $1::interval AND health <> 'healthy'
ORDER BY CASE health WHEN 'dead' THEN 0 WHEN 'backoff' THEN 1 ELSE 2 END, pending + in_flight DESC, site, node
LIMIT $2
"""

# Every registered node: alive within $2, what its fresh site_status rows ($1) say it holds, its slots.
NODE_LOADS = """
SELECT n.id AS node, n.heartbeat_at > now() - $2::interval AS alive,
       extract(epoch FROM now() - n.heartbeat_at)::float8 AS silent_s,
       coalesce((SELECT sum(s.in_flight) FROM site_status AS s WHERE s.node = n.id
                 AND s.updated_at > now() - $1::interval), 0)::int AS in_flight,
       coalesce((SELECT sum(s.pending) FROM site_status AS s WHERE s.node = n.id
                 AND s.updated_at > now() - $1::interval), 0)::int AS pending,
       (SELECT count(*) FROM connection_slots AS c WHERE c.node = n.id AND c.expires_at > now())::int AS slots
FROM nodes AS n ORDER BY n.started_at, n.id LIMIT $3
"""

_RICH_STYLES = {
    "": "", "title": "bold", "dim": "dim", "dead": "bold red", "backoff": "yellow", "warning": "bold yellow",
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    top = commands.add_parser("top", help="live view: arrival and delivery rates, queue, busiest and troubled sites")
    top.add_argument("--interval", type=_positive_seconds, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--once", action="store_true", help="print one frame as plain text (rates over one interval)")
    top.add_argument("--json", action="store_true", help="print one frame as JSON (implies --once)")
    top.add_argument("--sites", type=_positive_int, default=10, metavar="N", help="rows of busiest and of troubled sites")
    top.add_argument("--cap", type=_positive_int, default=DEFAULT_CAP, metavar="N", help="count each queue state up to N")
    top.set_defaults(handler=run_top)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("the interval must be more than 0 and at most 3600 seconds")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text}")
    return int(text)


async def read_only(conn: asyncpg.Connection) -> None:
    """Every transaction on this connection is read-only unless one asks otherwise, and no snapshot does."""
    await conn.execute("SET default_transaction_read_only = on")
    await conn.execute("SET application_name = 'mtad top'")


async def take_snapshot(
    conn: asyncpg.Connection,
    since: datetime | None,
    cap: int = DEFAULT_CAP,
    sites: int = 10,
    dead_after: timedelta = timedelta(seconds=15),
) -> Snapshot:
    """One consistent snapshot; events are those of the window since the snapshot taken at `since`."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        clock = await conn.fetchrow(SNAPSHOT_CLOCK)
        at: datetime = clock["at"]
        events: dict[str, int] = {}
        if since is not None:
            rows = await conn.fetch(EVENTS_IN_WINDOW, since - EVENT_SETTLE, at - EVENT_SETTLE)
            events = {row["kind"]: row["events"] for row in rows}
        queue = await conn.fetchrow(QUEUE_CAPPED, cap)
        totals = await conn.fetchrow(SITE_TOTALS, SITE_STATUS_FRESH)
        busiest = [SiteLoad(**row) for row in await conn.fetch(BUSIEST_SITES, SITE_STATUS_FRESH, sites)]
        troubled = [SiteTrouble(**row) for row in await conn.fetch(TROUBLED_SITES, SITE_STATUS_FRESH, sites)]
        node_loads = [NodeLoad(**row) for row in await conn.fetch(NODE_LOADS, SITE_STATUS_FRESH, dead_after, 100)]
    return Snapshot(
        at=at,
        database=(
            f"{clock['database']}@{clock['host']}:{clock['port']}" if clock["host"]
            else f"{clock['database']} (local socket)"
        ),
        messages_max_id=clock["messages_max_id"],
        recipients_max_id=clock["recipients_max_id"],
        events=events,
        queue={state: queue[state] for state in QUEUE_STATES},
        cap=cap,
        oldest_pending_at=queue["oldest_pending_at"],
        nodes=totals["nodes"],
        sites=totals["sites"],
        troubled_sites=totals["troubled_sites"],
        busiest=busiest,
        troubled=troubled,
        node_loads=node_loads,
    )


async def one_frame(settings: Settings, args: argparse.Namespace) -> Frame:
    """Two snapshots `--interval` apart: the second one's state, with the rates between them."""
    async with operator_connection(settings) as conn:
        await read_only(conn)
        dead_after = timedelta(seconds=settings.cluster.dead_after)
        first = await take_snapshot(conn, None, args.cap, args.sites, dead_after)
        await asyncio.sleep(args.interval)
        second = await take_snapshot(conn, first.at, args.cap, args.sites, dead_after)
    return build_frame(first, second)


async def keep_showing(settings: Settings, args: argparse.Namespace, show: Callable[[Frame], None]) -> None:
    """Refresh every interval until cancelled. Once the database has answered, losing it shows as a status line
    and the view reconnects; a database that never answered is an error (most likely the configuration)."""
    previous: Snapshot | None = None
    last: Frame | None = None
    while True:
        try:
            async with operator_connection(settings) as conn:
                await read_only(conn)
                while True:
                    current = await take_snapshot(
                        conn,
                        previous.at if previous else None,
                        args.cap,
                        args.sites,
                        timedelta(seconds=settings.cluster.dead_after),
                    )
                    last = build_frame(previous, current)
                    show(last)
                    previous = current
                    await asyncio.sleep(args.interval)
        except DATABASE_UNAVAILABLE as exc:
            if last is None:
                raise
            status = f"database unavailable ({type(exc).__name__}: {exc}); retrying every {args.interval:g}s"
            show(dataclasses.replace(last, status=status))  # the last numbers, marked as not current
            await asyncio.sleep(args.interval)


def run_top(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.json or args.once:
            frame = asyncio.run(one_frame(settings, args))
            if args.json:
                print(json.dumps(frame_as_json(frame), indent=2))
            else:
                print(render_text(frame, args.interval), end="")
            return 0
        return _live(settings, args)
    except DATABASE_UNAVAILABLE as exc:
        print(f"mtad: database unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _live(settings: Settings, args: argparse.Namespace) -> int:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    console = Console()

    def renderable(frame: Frame) -> Group:
        return Group(
            *(
                Text(line.text, style=_RICH_STYLES.get(line.style, ""), no_wrap=True, overflow="ellipsis")
                for line in render_lines(frame, args.interval)
            )
        )

    try:
        if not console.is_terminal:  # piped or redirected: one plain frame after another, like `top -b`
            def show(frame: Frame) -> None:
                print(render_text(frame, args.interval), flush=True)

            asyncio.run(keep_showing(settings, args, show))
        else:
            with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False) as live:
                asyncio.run(keep_showing(settings, args, lambda frame: live.update(renderable(frame), refresh=True)))
    except KeyboardInterrupt:  # Ctrl-C is how one leaves a live view: not an error
        return 0
    return 0
