"""`mtad nodes [--json]`: the cluster's nodes, alive or dead, with what each holds."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json

from mtad.cli.database import operator_connection
from mtad.cluster.store import ClusterStore
from mtad.config import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    nodes = commands.add_parser("nodes", help="the cluster's nodes: heartbeat, leased recipients, connection slots")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(handler=run_nodes)


def run_nodes(settings: Settings, args: argparse.Namespace) -> int:
    async def fetch():
        async with operator_connection(settings) as conn:
            return await ClusterStore(conn).nodes()

    rows = asyncio.run(fetch())
    dead_after = settings.cluster.dead_after
    listed = [dict(dataclasses.asdict(row), alive=row.silent_s <= dead_after) for row in rows]
    if args.json:
        print(json.dumps(listed, indent=2, default=str))
        return 0
    if not listed:
        print("no nodes registered")
        return 0
    print(f"{'node':<36} {'state':<6} {'heartbeat':>10} {'started':<20} {'leased':>8} {'slots':>6}")
    for node in listed:
        state = "alive" if node["alive"] else "dead"
        started = node["started_at"].strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{node['id']:<36} {state:<6} {node['silent_s']:>9.1f}s {started:<20} {node['leased']:>8} {node['slots']:>6}"
        )
    alive = sum(1 for node in listed if node["alive"])
    print(f"\n{alive} alive, {len(listed) - alive} dead (silent longer than {dead_after:g}s)")
    return 0
