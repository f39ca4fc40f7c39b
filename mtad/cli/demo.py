"""`mtad demo`: everything on loopback under load, with live progress and a summary (see mtad/demo/run.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from mtad.config import Settings

DEFAULT_MESSAGES = 2000


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run mtad against simulated providers on loopback (own PostgreSQL, DNS, MX servers) and summarise",
    )
    demo.add_argument("--messages", type=_positive_int, default=DEFAULT_MESSAGES, metavar="N",
                      help=f"messages to submit (default {DEFAULT_MESSAGES})")
    demo.add_argument("--clients", type=_positive_int, default=8, metavar="C", help="parallel SMTP sessions (default 8)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON (progress goes to stderr)")
    demo.add_argument("--verbose", action="store_true", help="show the daemon's log events")
    demo.set_defaults(handler=run_demo)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None
    if not 0 < value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000000: {text}")
    return value


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    """The demo ignores the config file's listeners and database: it builds its own world in a temp dir."""
    import uvloop

    from mtad.demo.run import DemoOptions, Status, quiet_logs, run_scenario

    quiet_logs(args.verbose)
    options = DemoOptions(messages=args.messages, clients=args.clients)
    status = Status(total=args.messages)
    started: list = []
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            summary = runner.run(_with_progress(run_scenario(options, status, started.append), status, started,
                                                json_output=args.json))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("mtad demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        if started:
            started[0].close_at_exit()  # a no-op unless the loop ended before close() did
    if args.json:
        print(json.dumps({key: value for key, value in summary.items()}, indent=2))
    else:
        print_summary(summary, started[0] if started else None)
    return 0


async def _with_progress(scenario, status, started: list, *, json_output: bool) -> dict:
    """Run the scenario while showing its progress: a rich bar on a terminal, else a line every few seconds."""
    task = asyncio.ensure_future(scenario)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # like Ctrl-C: clean up, exit
    interactive = sys.stderr.isatty()
    try:
        if interactive:
            await _rich_progress(task, status, started)
        else:
            await _plain_progress(task, status, started)
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return task.result()


async def _rich_progress(task: asyncio.Future, status, started: list) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    hinted = False
    with Progress(
        TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        submitted = progress.add_task("submitted", total=status.total, extra="")
        finished = progress.add_task("finished", total=status.total, extra="")
        while not task.done():
            if not hinted and started and started[0].metrics_url:
                hinted = True
                progress.console.print(f"metrics while the demo runs: {started[0].metrics_url}", markup=False)
                progress.console.print(f"live view in another terminal: {started[0].top_hint}", markup=False)
            progress.update(submitted, completed=status.submitted, extra=status.phase)
            progress.update(
                finished, completed=status.finished,
                extra=f"delivered {status.delivered}, deferred now {status.deferred_now}, "
                      f"unsubscribed {status.unsubscribed}, DSNs {status.dsns_sent}",
            )
            await asyncio.wait({task}, timeout=0.25)
        progress.update(submitted, completed=status.submitted, extra=status.phase)
        progress.update(finished, completed=status.finished)


async def _plain_progress(task: asyncio.Future, status, started: list) -> None:
    last = 0.0
    hinted = False
    while not task.done():
        if not hinted and started and started[0].metrics_url:
            hinted = True
            print(f"mtad demo: metrics while the demo runs: {started[0].metrics_url}", file=sys.stderr)
            print(f"mtad demo: live view in another terminal: {started[0].top_hint}", file=sys.stderr, flush=True)
        now = time.monotonic()
        if now - last >= 5:
            last = now
            print(
                f"mtad demo: {status.phase}: submitted {status.submitted}/{status.total}, "
                f"finished {status.finished}, delivered {status.delivered}, deferred now {status.deferred_now}, "
                f"unsubscribed {status.unsubscribed}, DSNs {status.dsns_sent}",
                file=sys.stderr, flush=True,
            )
        await asyncio.wait({task}, timeout=0.5)


def print_summary(summary: dict, demo) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mtad demo: {summary['messages']} messages in {summary['elapsed_s']} s", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("delivered", str(summary["delivered"]))
    table.add_row("  of which deferred, then delivered", str(summary["deferred_then_delivered"]))
    bounces = summary["bounced_by_category"]
    table.add_row("bounced (at RCPT, or by DSN later)", str(sum(bounces.values())))
    for category, count in bounces.items():
        table.add_row(f"  {category}", str(count))
    table.add_row("suppressed (never attempted)", str(summary["suppressed"]))
    table.add_row("unsubscribed (one-click)", str(summary["unsubscribed"]))
    table.add_row("deliveries after unsubscribe", str(summary["deliveries_after_unsubscribe"]))
    if summary.get("still_pending"):
        table.add_row("still pending at the end", str(summary["still_pending"]))
    for refusal, count in summary.get("provider_refusals", {}).items():
        table.add_row(f"provider refusals: {refusal}", str(count))
    table.add_row("throughput", f"{summary['messages_per_s']} messages/s")
    latency = summary["latency_ms"]
    table.add_row("latency p50 / p95 / p99", " / ".join(_ms(latency[k]) for k in ("p50", "p95", "p99")))
    console = Console()
    console.print(table)
    for note in summary.get("notes", []):
        print(f"note: {note}")
    lines = [
        "Where to look next:",
        f"  the demo's metrics were at {summary['metrics_url']} (stopped with the demo);",
        "  your own daemon: `make run`, then `.venv/bin/mtad --config config/mtad.toml top` (live view)",
        "  and `curl http://127.0.0.1:8025/metrics` (the [http] listen address in config/mtad.toml).",
    ]
    print("\n".join(lines))


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"
