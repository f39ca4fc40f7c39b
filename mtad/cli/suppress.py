"""`mtad suppress add|remove|list|import|export --tenant T`: a tenant's suppression list, for operators.

add/import put addresses on the tenant-wide list (reason manual unless given) and cancel their pending mail;
export writes CSV (address,list,reason,source,created_at) that import reads back.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from datetime import datetime, timezone

from mtad.cli.database import operator_connection
from mtad.config import Settings
from mtad.feedback.store import FeedbackStore
from mtad.policy.addresses import AddressError, parse_address

TENANT_WIDE_REASONS = ("manual", "hard_bounce", "complaint")


def add_commands(commands: argparse._SubParsersAction) -> None:
    suppress = commands.add_parser("suppress", help="a tenant's suppression list")
    actions = suppress.add_subparsers(dest="suppress_action", required=True)
    for name, help_text in (
        ("add", "suppress addresses (cancels their pending mail)"),
        ("remove", "lift suppressions of addresses"),
        ("list", "show the list"),
        ("import", "add addresses from a file: one per line, or CSV with an address column"),
        ("export", "write the list as CSV to standard output"),
    ):
        cmd = actions.add_parser(name, help=help_text)
        cmd.add_argument("--tenant", required=True)
        if name in ("add", "remove"):
            cmd.add_argument("addresses", nargs="+")
        if name == "import":
            cmd.add_argument("file", type=argparse.FileType("r"))
        if name in ("add", "import"):
            cmd.add_argument("--reason", choices=TENANT_WIDE_REASONS, default="manual")
        if name == "remove":
            cmd.add_argument("--reason", choices=TENANT_WIDE_REASONS + ("unsubscribed",))
        cmd.set_defaults(handler=run_suppress)


def _addresses_from(file) -> list[str]:
    text = file.read()
    if "," in text.splitlines()[0] if text else False:
        rows = csv.DictReader(text.splitlines())
        return [row["address"] for row in rows if row.get("address")]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def run_suppress(settings: Settings, args: argparse.Namespace) -> int:
    action = args.suppress_action
    addresses = args.addresses if action in ("add", "remove") else _addresses_from(args.file) if action == "import" else []
    clean = []
    for address in addresses:
        try:
            clean.append(parse_address(address, smtputf8=True, role="recipient").address.lower())
        except AddressError:
            print(f"mtad: skipped, not an address: {address!r}", file=sys.stderr)

    async def go() -> int:
        async with operator_connection(settings) as conn:
            tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", args.tenant)
            if tenant_id is None:
                print(f"mtad: no tenant named {args.tenant}", file=sys.stderr)
                return 1
            store = FeedbackStore(conn)
            now = datetime.now(timezone.utc)
            if action in ("add", "import"):
                added = cancelled = 0
                for address in clean:
                    a, c = await store.suppress(tenant_id, address, args.reason, source="operator", detail=None, now=now)
                    added, cancelled = added + a, cancelled + c
                print(f"suppressed {added} addresses for {args.tenant}; {cancelled} pending recipients cancelled")
            elif action == "remove":
                removed = sum([await store.unsuppress(tenant_id, a, args.reason) for a in clean])
                print(f"removed {removed} suppressions for {args.tenant}")
            else:
                rows = await store.suppressions(tenant_id)
                if action == "export":
                    writer = csv.writer(sys.stdout)
                    writer.writerow(["address", "list", "reason", "source", "created_at"])
                    for row in rows:
                        writer.writerow([row["address"], row["list_id"], row["reason"], row["source"] or "",
                                         row["created_at"].isoformat()])
                else:
                    for row in rows:
                        scope = f" list={row['list_id']}" if row["list_id"] else ""
                        print(f"{row['address']}  {row['reason']}{scope}  {row['source'] or ''}  "
                              f"{row['created_at']:%Y-%m-%d %H:%M}")
            return 0

    return asyncio.run(go())
