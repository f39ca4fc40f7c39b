"""Entry point of the `mtad` command: parse arguments, load settings, dispatch."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from mtad.cli import bounce, database, demo, dkim, events, nodes, queue, suppress, tenants, top
from mtad.config import ConfigError, find_config_path, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtad", description="mtad, the mail delivery daemon of HTML-mailing")
    parser.add_argument("--config", help="config file (default: $MTAD_CONFIG, ./config/mtad.toml, /etc/mtad/mtad.toml)")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the daemon in the foreground")
    run_parser.add_argument(
        "--workers", type=int, help="processes sharing the listeners and the database (default: cluster.workers)"
    )
    run_parser.set_defaults(handler=run)
    database.add_commands(commands)
    tenants.add_commands(commands)
    queue.add_commands(commands)
    dkim.add_commands(commands)
    bounce.add_commands(commands)
    suppress.add_commands(commands)
    events.add_commands(commands)
    top.add_commands(commands)
    nodes.add_commands(commands)
    demo.add_commands(commands)
    return parser


def run(settings, args) -> int:
    import uvloop

    from mtad.app import run_daemon
    from mtad.cluster.workers import Supervisor, die_with_the_supervisor, worker_index
    from mtad.observe.logs import configure_logging

    workers = args.workers if args.workers is not None else settings.cluster.workers
    if workers < 1:
        print("mtad: --workers must be at least 1", file=sys.stderr)
        return 2
    configure_logging(settings.logging.format, settings.logging.level)
    if worker_index() is not None:
        die_with_the_supervisor()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if workers > 1 and worker_index() is None:
            return runner.run(Supervisor(settings, args.config_path, workers).run())
        runner.run(run_daemon(settings, args.config_path))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.config_path = find_config_path(args.config, os.environ)
        settings = load_settings(args.config_path)
    except ConfigError as exc:
        print(f"mtad: config error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.handler(settings, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
