"""`mtad top`, the pure part: two snapshots of the database and the seconds between them become a frame.

No I/O here: mtad.cli.top takes the snapshots (read-only queries) and shows the frame, as plain text, JSON or
a live terminal view. Everything an operator sees is decided in this module, so it is tested with plain data.

How the numbers are made, and what they mean:
- messages and recipients in per second: the growth of `max(id)` of messages and of recipients between the two
  snapshots (an index lookup each). Identity values lost to rolled-back inserts count too: rare, and an
  over-count of a failed submission is the right direction for a load view.
- events per second by kind (delivered, deferred, bounced, ...): the events whose `at` lies in the window
  between the snapshots, counted on events_at_idx. The window trails the snapshots by `EVENT_SETTLE`: a node
  stamps `at` with its clock before its outcome batch commits, so an event stamped just before a snapshot may
  become visible just after it; without the lag such events would fall between two windows and never count.
- queue by state: queued, active and deferred, each counted exactly up to a cap (then shown as "N+"), so a
  refresh never scans a huge queue. Finished states (delivered, bounced, ...) are history, not queue: their
  growth is the event rates above.
- oldest pending: the oldest queued or deferred recipient (as the queue-age gauge and alert).
- nodes: every registered node (the `nodes` table of mtad.cluster) with its heartbeat age, whether it counts as
  alive (heartbeat within `cluster.dead_after`), what it holds (in flight and pending, from its fresh
  site_status rows) and its cluster-wide connection slots; the last line adds them up for the cluster.
- sites: from `site_status`, published by every delivering node every few seconds; rows not refreshed within
  two minutes are from nodes that stopped and are left out. Busiest sites add up all nodes' views of a site;
  troubled sites (health other than healthy) are listed per node, as each node has its own window.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

DEFAULT_CAP = 100_000
EVENT_SETTLE = timedelta(seconds=1)
# Always shown, in this order; any other kind is shown when it happened in the interval.
MAIN_EVENT_KINDS = ("delivered", "deferred", "bounced")
QUEUE_STATES = ("queued", "active", "deferred")
_HEALTH_RANK = {"dead": 0, "backoff": 1}  # unknown non-healthy values after these; "healthy" never troubled

SITE_WIDTH = 32
NODE_WIDTH = 16
ERROR_WIDTH = 60


@dataclass(frozen=True)
class SiteLoad:
    """One site as all fresh nodes see it together."""

    site: str
    provider: str | None
    nodes: int
    window: int  # sum of the nodes' concurrency windows
    in_flight: int
    pending: int


@dataclass(frozen=True)
class SiteTrouble:
    """One node's view of a site that is not healthy."""

    node: str
    site: str
    provider: str | None
    health: str
    window: int
    in_flight: int
    pending: int
    rate_scale: float
    dead_until: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class NodeLoad:
    """One registered node: alive or not, and what it holds."""

    node: str
    alive: bool
    silent_s: float
    in_flight: int
    pending: int
    slots: int


@dataclass(frozen=True)
class Snapshot:
    at: datetime  # the database's clock when the snapshot was taken
    database: str  # name@host:port, never credentials
    messages_max_id: int  # 0 for an empty table
    recipients_max_id: int
    events: Mapping[str, int]  # events by kind in the window since the previous snapshot; empty for the first
    queue: Mapping[str, int]  # QUEUE_STATES counted up to `cap`
    cap: int
    oldest_pending_at: datetime | None
    nodes: int  # distinct nodes with fresh site_status rows
    sites: int  # distinct sites in fresh rows
    troubled_sites: int  # distinct sites some node sees as not healthy
    busiest: Sequence[SiteLoad] = ()
    troubled: Sequence[SiteTrouble] = ()
    node_loads: Sequence[NodeLoad] = ()


@dataclass(frozen=True)
class Rates:
    elapsed_s: float
    messages_in: float
    recipients_in: float
    events: Mapping[str, float]  # per second, by kind


@dataclass(frozen=True)
class Frame:
    at: datetime
    database: str
    nodes: int
    rates: Rates | None  # None when the elapsed time is not positive (no second snapshot yet)
    queue: Mapping[str, int]
    cap: int
    oldest_pending_age_s: float | None
    sites: int
    troubled_sites: int
    busiest: Sequence[SiteLoad] = ()
    troubled: Sequence[SiteTrouble] = ()
    node_loads: Sequence[NodeLoad] = ()
    status: str = ""  # e.g. "database unavailable: ..., retrying" in the live view


@dataclass(frozen=True)
class Line:
    """A line of the frame and how it may be styled: "" plain, "title", "dim", "dead", "backoff", "warning"."""

    text: str
    style: str = ""


# -- numbers --------------------------------------------------------------------------------------------------


def rates(previous: Snapshot, current: Snapshot, elapsed_s: float | None = None) -> Rates | None:
    """Per-second rates between two snapshots; None if no time passed (or the clock went back)."""
    if elapsed_s is None:
        elapsed_s = (current.at - previous.at).total_seconds()
    if elapsed_s <= 0:
        return None

    def per_second(count: int) -> float:
        return max(count, 0) / elapsed_s  # a negative growth is another (or a restored) database, not a rate

    return Rates(
        elapsed_s=elapsed_s,
        messages_in=per_second(current.messages_max_id - previous.messages_max_id),
        recipients_in=per_second(current.recipients_max_id - previous.recipients_max_id),
        events={kind: per_second(count) for kind, count in current.events.items()},
    )


def capped(count: int, cap: int) -> str:
    """A count taken with `LIMIT cap`: reaching the cap means "at least"."""
    return f"{cap}+" if count >= cap else str(count)


def troubled_order(sites: Sequence[SiteTrouble]) -> list[SiteTrouble]:
    """Dead sites first, then backed-off ones, then any other unhealthy state; the most held-up first within."""
    return sorted(
        sites, key=lambda s: (_HEALTH_RANK.get(s.health, len(_HEALTH_RANK)), -(s.pending + s.in_flight), s.site, s.node)
    )


def busiest_order(sites: Sequence[SiteLoad]) -> list[SiteLoad]:
    return sorted(sites, key=lambda s: (-(s.in_flight + s.pending), s.site))


def truncate(text: str | None, width: int) -> str:
    """One line of at most `width` characters; an ellipsis marks a cut."""
    flat = re.sub(r"\s+", " ", text or "").strip()
    if len(flat) <= width:
        return flat
    return flat[: max(width - 1, 0)].rstrip() + "…"


def format_rate(per_second: float) -> str:
    if per_second == 0:
        return "0"
    if per_second < 10:
        return f"{per_second:.1f}"
    if per_second < 10_000:
        return f"{per_second:.0f}"
    return f"{per_second / 1000:.1f}k"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


# -- the frame ------------------------------------------------------------------------------------------------


def build_frame(
    previous: Snapshot | None, current: Snapshot, elapsed_s: float | None = None, status: str = ""
) -> Frame:
    """What to show for `current`, with rates since `previous` (none for the very first snapshot)."""
    oldest = current.oldest_pending_at
    return Frame(
        at=current.at,
        database=current.database,
        nodes=current.nodes,
        rates=rates(previous, current, elapsed_s) if previous is not None else None,
        queue={state: current.queue.get(state, 0) for state in QUEUE_STATES},
        cap=current.cap,
        oldest_pending_age_s=None if oldest is None else max((current.at - oldest).total_seconds(), 0.0),
        sites=current.sites,
        troubled_sites=current.troubled_sites,
        busiest=busiest_order(current.busiest),
        troubled=troubled_order(current.troubled),
        node_loads=sorted(current.node_loads, key=lambda n: (not n.alive, n.node)),
        status=status,
    )


def event_kinds_shown(frame_rates: Rates) -> list[str]:
    others = sorted(kind for kind, rate in frame_rates.events.items() if rate > 0 and kind not in MAIN_EVENT_KINDS)
    return [*MAIN_EVENT_KINDS, *others]


def render_lines(frame: Frame, interval_s: float | None = None) -> list[Line]:
    every = f"  every {interval_s:g}s" if interval_s else ""
    lines = [
        Line(
            f"mtad top  {frame.at:%Y-%m-%d %H:%M:%S %Z}  db {frame.database}  nodes reporting {frame.nodes}{every}",
            "title",
        )
    ]
    if frame.status:
        lines.append(Line(frame.status, "warning"))
    lines.append(Line(""))
    r = frame.rates
    if r is None:
        lines.append(Line("in     (rates after the next refresh)", "dim"))
        lines.append(Line("out", "dim"))
    else:
        lines.append(Line(f"in     {format_rate(r.messages_in)} msg/s  {format_rate(r.recipients_in)} rcpt/s"))
        out = "  ".join(f"{kind} {format_rate(r.events.get(kind, 0.0))}/s" for kind in event_kinds_shown(r))
        lines.append(Line(f"out    {out}"))
    queue = "  ".join(f"{state} {capped(frame.queue[state], frame.cap)}" for state in QUEUE_STATES)
    lines.append(Line(f"queue  {queue}  oldest pending {format_duration(frame.oldest_pending_age_s)}"))

    lines += _node_lines(frame)

    lines.append(Line(""))
    lines.append(Line(f"busiest sites ({frame.sites} reporting)", "title"))
    if frame.busiest:
        lines.append(
            Line(
                f"  {'site':<{SITE_WIDTH}} {'provider':<12} {'nodes':>5} {'window':>6} {'in flight':>9} {'pending':>8}",
                "dim",
            )
        )
        for s in frame.busiest:
            lines.append(
                Line(
                    f"  {truncate(s.site, SITE_WIDTH):<{SITE_WIDTH}} {truncate(s.provider, 12):<12} {s.nodes:>5}"
                    f" {s.window:>6} {s.in_flight:>9} {s.pending:>8}"
                )
            )
    else:
        lines.append(Line("  none: no node reports work in flight or pending", "dim"))

    lines.append(Line(""))
    shown = f", showing {len(frame.troubled)}" if len(frame.troubled) < frame.troubled_sites else ""
    lines.append(Line(f"troubled sites ({frame.troubled_sites}{shown})", "title"))
    if frame.troubled:
        lines.append(
            Line(
                f"  {'site':<{SITE_WIDTH}} {'node':<{NODE_WIDTH}} {'health':<8} {'window':>6} {'rate':>6}"
                f" {'pending':>8}  {'dead for':<9} last error",
                "dim",
            )
        )
        for s in frame.troubled:
            dead_for = format_duration((s.dead_until - frame.at).total_seconds()) if s.dead_until else "-"
            lines.append(
                Line(
                    f"  {truncate(s.site, SITE_WIDTH):<{SITE_WIDTH}} {truncate(s.node, NODE_WIDTH):<{NODE_WIDTH}}"
                    f" {s.health:<8} {s.window:>6} {'x' + format(s.rate_scale, '.2f'):>6} {s.pending:>8}"
                    f"  {dead_for:<9} {truncate(s.last_error, ERROR_WIDTH) or '-'}",
                    "dead" if s.health == "dead" else "backoff",
                )
            )
    else:
        lines.append(Line("  none", "dim"))
    return lines


def _node_lines(frame: Frame) -> list[Line]:
    alive = [n for n in frame.node_loads if n.alive]
    lines = [Line(""), Line(f"nodes ({len(alive)} alive, {len(frame.node_loads) - len(alive)} dead)", "title")]
    if not frame.node_loads:
        return lines + [Line("  none registered", "dim")]
    lines.append(
        Line(f"  {'node':<{SITE_WIDTH}} {'state':<6} {'heartbeat':>9} {'in flight':>9} {'pending':>8} {'slots':>6}", "dim")
    )
    for n in frame.node_loads:
        lines.append(
            Line(
                f"  {truncate(n.node, SITE_WIDTH):<{SITE_WIDTH}} {'alive' if n.alive else 'dead':<6}"
                f" {format_duration(n.silent_s) + ' ago':>9} {n.in_flight:>9} {n.pending:>8} {n.slots:>6}",
                "" if n.alive else "dead",
            )
        )
    lines.append(
        Line(
            f"  {'cluster':<{SITE_WIDTH}} {'':<6} {'':>9} {sum(n.in_flight for n in alive):>9}"
            f" {sum(n.pending for n in alive):>8} {sum(n.slots for n in alive):>6}"
        )
    )
    return lines


def render_text(frame: Frame, interval_s: float | None = None) -> str:
    return "\n".join(line.text for line in render_lines(frame, interval_s)).rstrip() + "\n"


def frame_as_json(frame: Frame) -> dict[str, Any]:
    """The frame for scripts: numbers as numbers, capped counts flagged, times in ISO 8601."""

    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    r = frame.rates
    return plain(
        {
            "at": frame.at,
            "database": frame.database,
            "nodes": frame.nodes,
            "rates": None
            if r is None
            else {
                "elapsed_s": round(r.elapsed_s, 3),
                "messages_in_per_s": round(r.messages_in, 3),
                "recipients_in_per_s": round(r.recipients_in, 3),
                "events_per_s": {
                    kind: round(r.events.get(kind, 0.0), 3) for kind in sorted({*MAIN_EVENT_KINDS, *r.events})
                },
            },
            "queue": {
                state: {"count": frame.queue[state], "capped": frame.queue[state] >= frame.cap}
                for state in QUEUE_STATES
            },
            "cap": frame.cap,
            "oldest_pending_age_s": (
                None if frame.oldest_pending_age_s is None else round(frame.oldest_pending_age_s, 1)
            ),
            "sites": frame.sites,
            "troubled_sites": frame.troubled_sites,
            "busiest": [asdict(s) for s in frame.busiest],
            "troubled": [asdict(s) for s in frame.troubled],
            "nodes_registered": [asdict(n) for n in frame.node_loads],
        }
    )
