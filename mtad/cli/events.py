"""`mtad events --recipient ADDR | --message QUEUE_ID [--tenant T] [--json]`: what happened, in order."""

from __future__ import annotations

import argparse
import asyncio
import json

from mtad.cli.database import operator_connection
from mtad.config import Settings
from mtad.db.queries import queries


def add_commands(commands: argparse._SubParsersAction) -> None:
    events = commands.add_parser("events", help="deliveries, bounces, deferrals, unsubscribes, complaints")
    target = events.add_mutually_exclusive_group(required=True)
    target.add_argument("--recipient")
    target.add_argument("--message", metavar="QUEUE_ID")
    events.add_argument("--tenant", help="only this tenant's mail")
    events.add_argument("--limit", type=int, default=1000)
    events.add_argument("--json", action="store_true")
    events.set_defaults(handler=run_events)


def run_events(settings: Settings, args: argparse.Namespace) -> int:
    async def fetch():
        async with operator_connection(settings) as conn:
            if args.recipient:
                return await conn.fetch(queries()["events_by_recipient"], args.recipient, args.tenant, args.limit)
            return await conn.fetch(queries()["events_by_message"], args.message, args.limit)

    # --message used to ignore --tenant: a tenant's filter showed another tenant's message
    rows = [dict(row) for row in asyncio.run(fetch()) if args.tenant is None or row["tenant"] == args.tenant]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        reply = " ".join(str(row[k]) for k in ("code", "enhanced", "reply") if row[k])
        extra = " ".join(f"{k}={row[k]}" for k in ("category", "source", "site") if row[k])
        print(f"{row['at']:%Y-%m-%d %H:%M:%S} {row['kind']:<12} {row['tenant']} {row['queue_id']} "
              f"{row['address'] or ''}  {reply}  {extra}".rstrip())
    return 0 if rows else 1
