"""`mtad queue summary [--json]` and `mtad queue show ID [--json]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone

from mtad.cli.database import operator_connection
from mtad.config import Settings
from mtad.policy.addresses import to_ascii_domain
from mtad.queue.controls import ControlError, QueueControls
from mtad.queue.report import message_story, queue_summary


def add_commands(commands: argparse._SubParsersAction) -> None:
    queue = commands.add_parser("queue", help="inspect the queue")
    actions = queue.add_subparsers(dest="queue_action", required=True)
    summary = actions.add_parser("summary", help="recipients by state, domain and tenant; oldest pending age")
    summary.add_argument("--json", action="store_true")
    summary.set_defaults(handler=run_summary)
    show = actions.add_parser("show", help="one message: envelope, recipients and events")
    show.add_argument("queue_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=run_show)
    for action, help_text in (
        ("pause", "stop delivering to a domain or for a tenant"),
        ("resume", "lift a pause"),
        ("retry", "make deferred recipients due now (all, or a domain or tenant)"),
        ("cancel", "cancel recipients not yet delivered, by domain, tenant or message"),
    ):
        cmd = actions.add_parser(action, help=help_text)
        target = cmd.add_mutually_exclusive_group(required=action in ("pause", "resume"))
        target.add_argument("--domain")
        target.add_argument("--tenant")
        if action == "cancel":
            target.add_argument("--queue-id")
        cmd.set_defaults(handler=run_control, control=action)


def run_summary(settings: Settings, args: argparse.Namespace) -> int:
    async def fetch():
        async with operator_connection(settings) as conn:
            return await queue_summary(conn, datetime.now(timezone.utc))

    summary = asyncio.run(fetch())
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    states = ", ".join(f"{state} {count}" for state, count in sorted(summary["by_state"].items())) or "empty"
    print(f"recipients: {states}")
    age = summary["oldest_pending_age_s"]
    print(f"pending: {summary['pending']}  oldest pending: {'-' if age is None else f'{age:.0f}s'}")
    if summary["by_domain"]:
        print("\npending by domain:")
        for row in summary["by_domain"]:
            print(f"  {row['domain']:<40} {row['recipients']:>8}  deferred {row['deferred']}  active {row['active']}")
    if summary["sites"]:
        print("\nsites (as the delivering nodes see them):")
        for row in summary["sites"]:
            dead = f"  dead until {row['dead_until']:%H:%M:%S}" if row["dead_until"] else ""
            error = f"  last error: {row['last_error']}" if row["last_error"] else ""
            print(
                f"  {row['site']:<32} {row['health']:<8} window {row['concurrency']:>3}  in flight {row['in_flight']:>3}"
                f"  pending {row['pending']:>6}  rate x{row['rate_scale']:.2f}{dead}{error}"
            )
    if summary["paused"]:
        print("\npaused:")
        for row in summary["paused"]:
            print(f"  {'domain ' + row['domain'] if row['domain'] else 'tenant ' + row['tenant']}")
    if summary["by_tenant"]:
        print("\npending by tenant:")
        for row in summary["by_tenant"]:
            print(f"  {row['tenant']:<40} {row['recipients']:>8}")
    return 0


def run_show(settings: Settings, args: argparse.Namespace) -> int:
    async def fetch():
        async with operator_connection(settings) as conn:
            return await message_story(conn, args.queue_id)

    story = asyncio.run(fetch())
    if story is None:
        print(f"mtad: no message {args.queue_id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(story, indent=2, default=str))
        return 0
    message = story["message"]
    print(f"message {message['queue_id']}  tenant {message['tenant']}  from <{message['mail_from']}>")
    print(f"  received {message['received_at']:%Y-%m-%d %H:%M:%S%z}  size {message['size_bytes']}  client {message['client_ip']}")
    print("recipients:")
    for row in story["recipients"]:
        last = f"  last {row['last_code']} {row['last_enhanced'] or ''} {row['last_reply'] or ''}".rstrip()
        print(f"  {row['address']:<40} {row['state']:<10} attempts {row['attempts']}{last if row['last_code'] else ''}")
    if story["events"]:
        print("events:")
        for row in story["events"]:
            reply = f" {row['code']} {row['enhanced'] or ''} {row['reply'] or ''}".rstrip() if row["code"] else ""
            print(f"  {row['at']:%Y-%m-%d %H:%M:%S} {row['kind']:<10} {row['address'] or ''}{reply}")
    return 0


def run_control(settings: Settings, args: argparse.Namespace) -> int:
    domain = to_ascii_domain(args.domain) if args.domain else None
    filters = {"domain": domain, "tenant": args.tenant}
    if args.control == "cancel":
        filters["queue_id"] = args.queue_id

    async def apply() -> int:
        async with operator_connection(settings) as conn:
            controls = QueueControls(conn)
            return await getattr(controls, args.control)(datetime.now(timezone.utc), **filters)

    try:
        count = asyncio.run(apply())
    except ControlError as exc:
        print(f"mtad: {exc}", file=sys.stderr)
        return 1
    target = domain or args.tenant or getattr(args, "queue_id", None) or "all"
    print(f"{args.control}: {target}: {count} recipients")
    return 0
