"""`mtad top`'s pure part: two snapshots and the time between them become what an operator sees."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from mtad.observe.top_view import (
    ERROR_WIDTH,
    Frame,
    NodeLoad,
    SiteLoad,
    SiteTrouble,
    Snapshot,
    build_frame,
    busiest_order,
    capped,
    format_duration,
    format_rate,
    frame_as_json,
    rates,
    render_lines,
    render_text,
    troubled_order,
    truncate,
)

T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def snapshot(at: datetime = T0, **fields) -> Snapshot:
    base = dict(
        at=at,
        database="mtad@db.internal:5432",
        messages_max_id=1000,
        recipients_max_id=5000,
        events={},
        queue={"queued": 10, "active": 2, "deferred": 3},
        cap=100_000,
        oldest_pending_at=None,
        nodes=1,
        sites=0,
        troubled_sites=0,
    )
    return Snapshot(**{**base, **fields})


def trouble(site: str, health: str, node: str = "n1", pending: int = 0, in_flight: int = 0, **fields) -> SiteTrouble:
    base = dict(
        node=node, site=site, provider=None, health=health, window=1, in_flight=in_flight, pending=pending,
        rate_scale=1.0, dead_until=None, last_error=None,
    )
    return SiteTrouble(**{**base, **fields})


@pytest.mark.parametrize(
    "before, after, elapsed_s, messages_in, recipients_in, events",
    [
        # 20 messages with 60 recipients in 2 s; the events counted in the window
        ((1000, 5000), (1020, 5060), 2.0, 10.0, 30.0, {"delivered": 50, "deferred": 4}),
        ((1000, 5000), (1000, 5000), 0.5, 0.0, 0.0, {}),
        ((0, 0), (3, 9), 1.5, 2.0, 6.0, {"bounced": 3}),
        # ids that went backwards: another (or a restored) database, not a negative rate
        ((1000, 5000), (10, 20), 2.0, 0.0, 0.0, {}),
    ],
)
def test_rates_are_the_growth_between_snapshots_per_second(
    before, after, elapsed_s, messages_in, recipients_in, events
):
    previous = snapshot(messages_max_id=before[0], recipients_max_id=before[1])
    current = snapshot(
        at=T0 + timedelta(seconds=elapsed_s), messages_max_id=after[0], recipients_max_id=after[1], events=events
    )
    r = rates(previous, current, elapsed_s)
    assert (r.messages_in, r.recipients_in) == (pytest.approx(messages_in), pytest.approx(recipients_in))
    assert r.events == {kind: pytest.approx(count / elapsed_s) for kind, count in events.items()}
    assert rates(previous, current) == r  # the elapsed time defaults to the snapshots' clocks


@pytest.mark.parametrize("elapsed_s", [0.0, -1.0])
def test_no_rates_without_time_between_the_snapshots(elapsed_s):
    assert rates(snapshot(), snapshot(messages_max_id=2000), elapsed_s) is None


def test_the_first_frame_has_no_rates_yet():
    frame = build_frame(None, snapshot())
    assert frame.rates is None
    assert "rates after the next refresh" in render_text(frame)


@pytest.mark.parametrize(
    "count, cap, shown",
    [(0, 100_000, "0"), (99_999, 100_000, "99999"), (100_000, 100_000, "100000+"), (3, 3, "3+"), (2, 3, "2")],
)
def test_a_count_that_reached_its_cap_reads_as_at_least(count, cap, shown):
    assert capped(count, cap) == shown


def test_queue_line_shows_capped_states_and_the_oldest_pending_age():
    current = snapshot(
        queue={"queued": 100_000, "active": 17, "deferred": 4242}, oldest_pending_at=T0 - timedelta(hours=2, minutes=5)
    )
    text = render_text(build_frame(None, current))
    assert "queue  queued 100000+  active 17  deferred 4242  oldest pending 2h 05m" in text
    assert json.loads(json.dumps(frame_as_json(build_frame(None, current))))["queue"]["queued"] == {
        "count": 100_000,
        "capped": True,
    }


def test_troubled_sites_dead_first_then_backoff_then_others_most_held_up_first():
    given = [
        trouble("b.example", "backoff", pending=5),
        trouble("z.example", "dead", pending=1),
        trouble("odd.example", "degraded", pending=10_000),  # an unknown state still shows, after the known ones
        trouble("a.example", "backoff", pending=50),
        trouble("y.example", "dead", pending=100),
        trouble("c.example", "backoff", pending=2, in_flight=48),  # in flight counts as held up as well
        trouble("y.example", "dead", node="n0", pending=100),  # same site, same load: by node
    ]
    assert [(s.site, s.node) for s in troubled_order(given)] == [
        ("y.example", "n0"),
        ("y.example", "n1"),
        ("z.example", "n1"),
        ("a.example", "n1"),
        ("c.example", "n1"),
        ("b.example", "n1"),
        ("odd.example", "n1"),
    ]


def test_busiest_sites_by_work_in_flight_and_pending():
    loads = [
        SiteLoad("small", None, 1, 2, 1, 1),
        SiteLoad("google", "google", 3, 60, 50, 10_000),
        SiteLoad("mid", None, 1, 5, 5, 100),
        SiteLoad("also-mid", None, 1, 5, 100, 5),
    ]
    assert [s.site for s in busiest_order(loads)] == ["google", "also-mid", "mid", "small"]


@pytest.mark.parametrize(
    "text, width, shown",
    [
        (None, 10, ""),
        ("", 10, ""),
        ("short", 10, "short"),
        ("exactly 10", 10, "exactly 10"),
        ("eleven char", 10, "eleven ch…"),
        ("eleven char", 8, "eleven…"),  # the cut leaves no dangling space before the ellipsis
        ("421 4.7.0\r\nTry again   later", 40, "421 4.7.0 Try again later"),  # one line, runs of blanks as one
        ("abc", 1, "…"),
    ],
)
def test_truncate_to_one_short_line(text, width, shown):
    assert truncate(text, width) == shown
    assert len(truncate(text, width)) <= width


@pytest.mark.parametrize(
    "seconds, shown",
    [(None, "-"), (-3, "0s"), (0, "0s"), (59.9, "59s"), (61, "1m 01s"), (3600, "1h 00m"), (90061, "1d 01h")],
)
def test_durations(seconds, shown):
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(
    "rate, shown",
    [(0, "0"), (0.04, "0.0"), (0.5, "0.5"), (9.94, "9.9"), (12.4, "12"), (9999, "9999"), (12_345, "12.3k")],
)
def test_rates_read_at_a_glance(rate, shown):
    assert format_rate(rate) == shown


def full_frame() -> tuple[Frame, str]:
    previous = snapshot()
    current = snapshot(
        at=T0 + timedelta(seconds=2),
        messages_max_id=1050,
        recipients_max_id=5200,
        events={"delivered": 180, "deferred": 6, "cancelled": 2},
        nodes=3,
        sites=12,
        troubled_sites=4,
        busiest=[SiteLoad("google", "google", 3, 60, 55, 12_000), SiteLoad("outlook", "microsoft", 2, 4, 1, 900)],
        troubled=[
            trouble("x.example", "backoff", node="node-b", pending=7, rate_scale=0.25, last_error="452 4.2.2 full"),
            trouble(
                "outlook", "dead", node="node-a", pending=900, rate_scale=0.5,
                dead_until=T0 + timedelta(seconds=2 + 125), last_error="421 4.7.0 " + "too much mail " * 20,
            ),
        ],
    )
    frame = build_frame(previous, current)
    return frame, render_text(frame, interval_s=2)


def test_a_whole_frame_as_text():
    frame, text = full_frame()
    lines = text.splitlines()
    assert lines[0] == "mtad top  2026-11-25 10:00:02 UTC  db mtad@db.internal:5432  nodes reporting 3  every 2s"
    assert "in     25 msg/s  100 rcpt/s" in lines
    # the main kinds always, in a fixed order, then any other kind that happened
    assert "out    delivered 90/s  deferred 3.0/s  bounced 0/s  cancelled 1.0/s" in lines
    assert any(line.startswith("busiest sites (12 reporting)") for line in lines)
    google = next(line for line in lines if line.strip().startswith("google"))
    assert google.split() == ["google", "google", "3", "60", "55", "12000"]
    start = lines.index("troubled sites (4, showing 2)")
    dead, backoff = lines[start + 2], lines[start + 3]
    assert dead.split()[:8] == ["outlook", "node-a", "dead", "1", "x0.50", "900", "2m", "05s"]
    error = dead[dead.index("421 4.7.0"):]
    assert len(error) == ERROR_WIDTH and error.endswith("…")
    assert backoff.split()[:7] == ["x.example", "node-b", "backoff", "1", "x0.25", "7", "-"]
    assert backoff.endswith("452 4.2.2 full")


def test_line_styles_mark_dead_and_backed_off_sites():
    frame, _ = full_frame()
    styled = {line.style for line in render_lines(frame) if "outlook" in line.text and "node-a" in line.text}
    assert styled == {"dead"}
    assert {line.style for line in render_lines(frame) if "x.example" in line.text} == {"backoff"}
    status = render_lines(replace(frame, status="database unavailable; retrying"))
    assert status[1].text == "database unavailable; retrying" and status[1].style == "warning"


def test_nothing_to_show_says_so():
    text = render_text(build_frame(snapshot(), snapshot(at=T0 + timedelta(seconds=1)), status=""))
    assert "none: no node reports work in flight or pending" in text
    assert "troubled sites (0)\n  none" in text


def test_json_frame_keeps_numbers_and_whole_errors():
    frame, _ = full_frame()
    document = json.loads(json.dumps(frame_as_json(frame)))
    assert document["at"] == "2026-11-25T10:00:02+00:00"
    assert document["rates"] == {
        "elapsed_s": 2.0,
        "messages_in_per_s": 25.0,
        "recipients_in_per_s": 100.0,
        "events_per_s": {"bounced": 0.0, "cancelled": 1.0, "deferred": 3.0, "delivered": 90.0},
    }
    assert [s["site"] for s in document["troubled"]] == ["outlook", "x.example"]
    assert document["troubled"][0]["last_error"].startswith("421 4.7.0 too much mail too much mail")
    assert len(document["troubled"][0]["last_error"]) > ERROR_WIDTH
    assert document["troubled"][0]["dead_until"] == "2026-11-25T10:02:07+00:00"
    assert document["busiest"][0] == {
        "site": "google", "provider": "google", "nodes": 3, "window": 60, "in_flight": 55, "pending": 12_000,
    }


def test_nodes_are_listed_alive_first_with_cluster_totals_of_the_live_ones():
    current = snapshot(
        at=T0 + timedelta(seconds=2),
        node_loads=[
            NodeLoad("mx2:41:bbbbbb", False, 3600.0, 4, 100, 2),  # dead: what it held is not counted
            NodeLoad("mx1:40:aaaaaa", True, 0.4, 6, 500, 6),
            NodeLoad("mx1:42:cccccc", True, 1.2, 2, 300, 2),
        ],
    )
    frame = build_frame(snapshot(), current)
    lines = render_text(frame).splitlines()
    start = lines.index("nodes (2 alive, 1 dead)")
    rows = [line.split() for line in lines[start + 2 : start + 6]]
    assert rows == [
        ["mx1:40:aaaaaa", "alive", "0s", "ago", "6", "500", "6"],
        ["mx1:42:cccccc", "alive", "1s", "ago", "2", "300", "2"],
        ["mx2:41:bbbbbb", "dead", "1h", "00m", "ago", "4", "100", "2"],
        ["cluster", "8", "800", "8"],
    ]
    assert {line.style for line in render_lines(frame) if "mx2:41" in line.text} == {"dead"}
    assert [n["node"] for n in frame_as_json(frame)["nodes_registered"]] == ["mx1:40:aaaaaa", "mx1:42:cccccc", "mx2:41:bbbbbb"]
