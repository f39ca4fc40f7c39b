from datetime import datetime, timezone

from mtad.model import Claim, MxHost, Route
from mtad.policy.shaping import ShapeLimits, SiteShape
from mtad.schedule.engine import Feedback, Scheduler

NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)
ROUTE = Route((MxHost("mx.example", ("127.0.0.2",)),), 25)


def claims(message_id: int, count: int, start: int = 0) -> list[Claim]:
    return [Claim(message_id * 1000 + n, message_id, "Q", 1, "a@b", f"r{n}@x", "x", 0, NOW, NOW)
            for n in range(start, start + count)]


def shape(site: str, **limits) -> SiteShape:
    return SiteShape(site, None, ShapeLimits(**limits))


def test_recipients_of_one_message_at_one_site_go_in_one_transaction_up_to_the_limit():
    scheduler = Scheduler()
    scheduler.add(shape("a", max_recipients_per_transaction=3), ROUTE, claims(1, 7), 0)
    dispatches = scheduler.next_dispatches(0)
    assert [len(d.claims) for d in dispatches] == [3, 3]  # window 2: two transactions in flight
    assert scheduler.held == 7


def test_in_flight_never_exceeds_the_window():
    scheduler = Scheduler()
    scheduler.add(shape("a", connection_limit=10, initial_destination_concurrency=2), ROUTE,
                  [c for m in range(1, 11) for c in claims(m, 1)], 0)
    first = scheduler.next_dispatches(0)
    assert len(first) == 2 and scheduler.next_dispatches(0) == []
    scheduler.finish(first[0], Feedback.DELIVERED, 0)
    assert len(scheduler.next_dispatches(0)) == 1


def test_sites_take_turns_so_a_huge_site_does_not_starve_a_small_one():
    scheduler = Scheduler()
    big = shape("big", connection_limit=50, initial_destination_concurrency=50)
    small = shape("small", connection_limit=50, initial_destination_concurrency=50)
    scheduler.add(big, ROUTE, [c for m in range(1, 40) for c in claims(m, 1)], 0)
    scheduler.add(small, ROUTE, claims(100, 1), 0)
    sites = [d.site for d in scheduler.next_dispatches(0)[:4]]
    assert "small" in sites[:2]


def test_message_rate_limits_dispatches_and_next_wakeup_says_when():
    scheduler = Scheduler()
    scheduler.add(shape("a", max_message_rate=10, connection_limit=50, initial_destination_concurrency=50), ROUTE,
                  [c for m in range(1, 50) for c in claims(m, 1)], 0)
    assert len(scheduler.next_dispatches(0)) == 1  # burst of max(1, rate/10)
    wakeup = scheduler.next_wakeup(0)
    assert 0.09 < wakeup <= 0.1
    started = sum(len(scheduler.next_dispatches(t / 100)) for t in range(1, 101))
    assert started == 10  # one second at 10/s


def test_session_failure_puts_recipients_back_and_a_dead_site_hands_them_back():
    scheduler = Scheduler()
    scheduler.add(shape("a", dead_after_failures=2, dead_for_s=60), ROUTE, claims(1, 2), 0)
    (dispatch,) = scheduler.next_dispatches(0)
    scheduler.put_back(dispatch, Feedback.SESSION_FAILED, 1, "refused")
    assert scheduler.held == 2
    (dispatch,) = scheduler.next_dispatches(1)
    scheduler.put_back(dispatch, Feedback.SESSION_FAILED, 2, "refused again")
    assert scheduler.next_dispatches(2) == []
    handed = scheduler.take_unservable(2, max_hold_s=1000)
    assert [h.claim.recipient_id for h in handed] == [1000, 1001]
    assert handed[0].not_before == 62 and handed[0].error == "refused again"
    assert scheduler.held == 0


def test_recipients_held_too_long_are_handed_back_before_their_lease_runs_out():
    scheduler = Scheduler()
    scheduler.add(shape("a", max_message_rate=0.001), ROUTE, [c for m in range(1, 4) for c in claims(m, 1)], 0)
    scheduler.next_dispatches(0)
    handed = scheduler.take_unservable(200, max_hold_s=150)
    assert len(handed) == 2 and all(h.not_before is None for h in handed)


def test_a_recipient_put_back_keeps_its_hold_age_and_is_handed_back_before_its_lease_runs_out():
    # Put back again and again (no connection slot, failed sessions): its lease has been running since the
    # claim, so the hold age must not restart, else the lease expires while we still hold it and a second
    # claim delivers it twice.
    scheduler = Scheduler()
    scheduler.add(shape("a", connection_limit=1), ROUTE, claims(1, 1), 0)
    for t in range(1, 10):
        (dispatch,) = scheduler.next_dispatches(t * 0.2)
        scheduler.put_back(dispatch, Feedback.RECIPIENT_ONLY, t * 0.2)
    handed = scheduler.take_unservable(2.0, max_hold_s=1.5)
    assert [h.claim.recipient_id for h in handed] == [1000] and scheduler.held == 0


def test_no_free_connection_slot_caps_the_site_at_what_is_in_flight_for_a_while():
    scheduler = Scheduler(slot_retry_s=0.5)
    scheduler.add(shape("a", connection_limit=10, initial_destination_concurrency=4), ROUTE,
                  [c for m in range(1, 11) for c in claims(m, 1)], 0)
    first = scheduler.next_dispatches(0)
    assert len(first) == 4
    scheduler.put_back(first[3], Feedback.NO_SLOT, 0.1)  # the fourth found every cluster slot taken
    assert scheduler.next_dispatches(0.2) == []  # capped at the 3 in flight
    assert scheduler.next_wakeup(0.2) == 0.6
    assert scheduler.site_states(0.2)[0].health == "healthy"  # waiting for a slot is no judgement of the site
    assert len(scheduler.next_dispatches(0.6)) == 1  # the cap is lifted after slot_retry_s


def test_with_shared_rates_a_site_dispatches_only_on_tokens_granted_by_the_cluster():
    scheduler = Scheduler()
    scheduler.shared_rates = True  # more than one live node
    scheduler.add(shape("a", max_message_rate=30, connection_limit=50, initial_destination_concurrency=50), ROUTE,
                  [c for m in range(1, 200) for c in claims(m, 1)], 0)
    assert scheduler.next_dispatches(0) == []  # the local bucket alone is not enough
    assert scheduler.tokens_wanted(0) == [("a", 30.0, 3.0, 6)]  # 0.2 s worth at 30/s
    scheduler.grant("a", 2)
    assert len(scheduler.next_dispatches(0)) == 2  # the local burst is 3, but only 2 were granted
    assert scheduler.next_dispatches(0.5) == []
    scheduler.grant("a", 5)
    assert len(scheduler.next_dispatches(10)) == 3  # and the local bucket still caps a node's own burst


def test_a_throttle_met_by_another_node_backs_this_node_off_too():
    scheduler = Scheduler()
    scheduler.add(shape("a", connection_limit=8, initial_destination_concurrency=8), ROUTE,
                  [c for m in range(1, 20) for c in claims(m, 1)], 0)
    assert scheduler.throttled_elsewhere("a", 1.0, "421 4.7.0 slow down")
    assert not scheduler.throttled_elsewhere("unknown.example", 1.0, "421")
    (state,) = scheduler.site_states(1.0)
    assert state.health == "backoff" and state.concurrency == 4 and state.rate_scale == 0.5


def test_held_recipient_ids_are_the_waiting_and_the_in_flight_ones():
    scheduler = Scheduler()
    scheduler.add(shape("a", connection_limit=1, initial_destination_concurrency=1), ROUTE,
                  claims(1, 1) + claims(2, 1), 0)
    (dispatch,) = scheduler.next_dispatches(0)
    assert sorted(scheduler.held_recipient_ids()) == [1000, 2000]
    scheduler.finish(dispatch, Feedback.DELIVERED, 1)
    assert scheduler.held_recipient_ids() == [2000]


def test_a_throttle_told_before_this_node_holds_the_site_applies_when_it_comes_within_the_backoff_time():
    scheduler = Scheduler()
    assert not scheduler.throttled_elsewhere("a", 10.0, "421 4.7.0 slow down")
    scheduler.add(shape("a", connection_limit=8, initial_destination_concurrency=8, backoff_for_s=30), ROUTE,
                  claims(1, 4), 20.0)
    (state,) = scheduler.site_states(20.0)
    assert state.health == "backoff" and state.rate_scale == 0.5
    later = Scheduler()
    later.throttled_elsewhere("b", 10.0, "421")
    later.add(shape("b", backoff_for_s=30), ROUTE, claims(2, 1), 50.0)  # long after: nothing to remember
    assert later.site_states(50.0)[0].health == "healthy"


def test_a_rate_limited_site_holds_what_it_can_send_within_the_horizon_and_the_rest_gets_turns_in_order():
    scheduler = Scheduler()
    slow = shape("slow", max_message_rate=2, connection_limit=5, initial_destination_concurrency=5)
    later = scheduler.add(slow, ROUTE, [c for m in range(1, 31) for c in claims(m, 1)], 100.0, horizon_s=10)
    assert scheduler.held == 20  # 2/s for 10 s
    turns = [turn for _, turn in later]
    assert [c.message_id for c, _ in later] == list(range(21, 31))  # the newest go back, in claim order
    assert turns == [100.0 + 20 / 2 + k / 2 for k in range(10)]  # after the 20 held, one every 1/rate
    # the next batch queues behind those already put back: each recipient gets its own turn once
    again = scheduler.add(slow, ROUTE, [c for m in range(40, 43) for c in claims(m, 1)], 100.0, horizon_s=10)
    assert [turn for _, turn in again] == [115.0, 115.5, 116.0]
    assert scheduler.held == 20


def test_sites_without_a_message_rate_and_calls_without_a_horizon_hold_everything():
    scheduler = Scheduler()
    fast = shape("fast", connection_limit=5, initial_destination_concurrency=5)
    assert scheduler.add(fast, ROUTE, [c for m in range(1, 500) for c in claims(m, 1)], 0, horizon_s=1) == []
    assert scheduler.add(shape("slow", max_message_rate=1), ROUTE, claims(600, 50), 0) == []
    assert scheduler.held == 499 + 50


def test_a_site_in_backoff_holds_less_because_its_rate_is_scaled_down():
    scheduler = Scheduler()
    slow = shape("slow", max_message_rate=10, connection_limit=5, initial_destination_concurrency=5,
                 backoff_for_s=60)
    scheduler.add(slow, ROUTE, claims(1, 1), 0)
    [dispatch] = scheduler.next_dispatches(0)
    scheduler.finish(dispatch, Feedback.THROTTLED, 0)  # halves the rate scale
    later = scheduler.add(slow, ROUTE, [c for m in range(2, 40) for c in claims(m, 1)], 1.0, horizon_s=2)
    assert scheduler.held == 10  # 5/s for 2 s
    assert later[0][1] == 1.0 + 10 / 5


def test_a_rate_limited_site_never_holds_more_than_max_held():
    scheduler = Scheduler()
    slow = shape("slow", max_message_rate=100, connection_limit=5, initial_destination_concurrency=5)
    later = scheduler.add(slow, ROUTE, [c for m in range(1, 101) for c in claims(m, 1)], 0.0, horizon_s=60,
                          max_held=40)
    assert scheduler.held == 40 and len(later) == 60
    assert later[0][1] == 40 / 100


def test_with_shared_rates_a_node_still_plans_with_the_sites_whole_rate():
    # which node gets how much of a shared rate changes all the time: planning with a share left the site idle
    scheduler = Scheduler()
    scheduler.shared_rates = True
    slow = shape("slow", max_message_rate=4, connection_limit=5, initial_destination_concurrency=5)
    later = scheduler.add(slow, ROUTE, [c for m in range(1, 51) for c in claims(m, 1)], 0.0, horizon_s=10)
    assert scheduler.held == 40 and [turn for _, turn in later[:2]] == [10.0, 10.25]


def test_recipients_that_share_transactions_count_as_one_message_against_the_rate():
    scheduler = Scheduler()
    slow = shape("slow", max_message_rate=2, max_recipients_per_transaction=10)
    later = scheduler.add(slow, ROUTE, claims(1, 300), 0.0, horizon_s=10)  # one message, 300 recipients
    assert scheduler.held == 200  # 2 transactions/s of 10 recipients for 10 s
    assert [turn for _, turn in later[:2]] == [10.0, 10.05]
    # copies that differ per recipient (marketing) go one per transaction
    per_recipient = Scheduler(one_recipient_per_transaction=lambda claim: True)
    per_recipient.add(slow, ROUTE, claims(2, 300), 0.0, horizon_s=10)
    assert per_recipient.held == 20


def finish_transactions(scheduler: Scheduler, site: SiteShape, count: int, took_s: float, start: float = 0.0) -> None:
    """`count` one-recipient transactions at `site`, each taking `took_s`: the scheduler learns its speed."""
    scheduler.add(site, ROUTE, [c for m in range(900, 900 + count) for c in claims(m, 1)], start)
    for dispatch in scheduler.next_dispatches(start):
        scheduler.finish(dispatch, Feedback.DELIVERED, start + took_s + 30, took_s=took_s)  # +30: recording it


def test_a_slow_site_without_a_message_rate_holds_what_its_connections_send_within_the_horizon():
    # a slow MX: 2 s per message, 2 connections: 1 recipient/s, so 10 s of its backlog is 10 recipients
    scheduler = Scheduler()
    slow = shape("slow", connection_limit=2, initial_destination_concurrency=2)
    finish_transactions(scheduler, slow, 2, took_s=2.0)
    assert scheduler.held == 0
    later = scheduler.add(slow, ROUTE, [c for m in range(1, 31) for c in claims(m, 1)], 10.0, horizon_s=10,
                          max_held=1000)
    assert scheduler.held == 10
    assert [c.message_id for c, _ in later] == list(range(11, 31))
    assert [turn for _, turn in later[:3]] == [20.0, 21.0, 22.0]  # after the 10 held, one a second


def test_the_speed_follows_the_recent_transactions():
    scheduler = Scheduler()
    site = shape("mx", connection_limit=1, initial_destination_concurrency=1)
    finish_transactions(scheduler, site, 1, took_s=1.0)
    for n in range(30):  # it got faster: 0.1 s per transaction
        scheduler.add(site, ROUTE, claims(500 + n, 1), 10.0 + n)
        [dispatch] = scheduler.next_dispatches(10.0 + n)
        scheduler.finish(dispatch, Feedback.DELIVERED, 10.1 + n, took_s=0.1)
    scheduler.add(site, ROUTE, [c for m in range(1, 101) for c in claims(m, 1)], 50.0, horizon_s=5)
    assert 45 <= scheduler.held <= 55  # ~10/s for 5 s


def test_a_fast_site_is_not_capped_by_max_held_once_its_speed_is_known():
    # every domain routed through one relay: capping it would put back much of a deep queue, a write each
    scheduler = Scheduler()
    relay = shape("relay", connection_limit=20, initial_destination_concurrency=20)
    finish_transactions(scheduler, relay, 5, took_s=0.02)
    later = scheduler.add(relay, ROUTE, [c for m in range(1, 3001) for c in claims(m, 1)], 1.0, horizon_s=75,
                          max_held=500)
    assert later == [] and scheduler.held == 3000


def test_a_site_whose_speed_is_not_known_yet_holds_at_most_max_held_and_the_rest_comes_back_after_the_horizon():
    scheduler = Scheduler()
    unknown = shape("unknown", connection_limit=5, initial_destination_concurrency=5)
    later = scheduler.add(unknown, ROUTE, [c for m in range(1, 101) for c in claims(m, 1)], 0.0, horizon_s=10,
                          max_held=40)
    assert scheduler.held == 40 and len(later) == 60
    assert {turn for _, turn in later} == {10.0}  # planned again then, at the speed it will have shown
    assert scheduler.add(unknown, ROUTE, claims(200, 5), 1.0, horizon_s=10, max_held=40) == [
        (claim, 11.0) for claim in claims(200, 5)]


def test_a_rate_limited_site_is_held_to_its_connections_when_they_are_slower_than_its_rate():
    scheduler = Scheduler()
    site = shape("slow", max_message_rate=100, connection_limit=2, initial_destination_concurrency=2)
    finish_transactions(scheduler, site, 2, took_s=4.0)  # 2 connections, 4 s each: 0.5/s, far below 100/s
    later = scheduler.add(site, ROUTE, [c for m in range(1, 21) for c in claims(m, 1)], 10.0, horizon_s=10,
                          max_held=1000)
    assert scheduler.held == 5 and later[0][1] == 20.0


def test_one_stalled_transaction_does_not_make_a_site_look_slow_for_long():
    scheduler = Scheduler()
    site = shape("mx", connection_limit=1, initial_destination_concurrency=1)
    finish_transactions(scheduler, site, 1, took_s=0.1)
    finish_transactions(scheduler, site, 1, took_s=30.0, start=1.0)  # one hiccup: 300 times as long
    scheduler.add(site, ROUTE, [c for m in range(1, 101) for c in claims(m, 1)], 50.0, horizon_s=10)
    assert scheduler.held >= 50  # still ~6/s (0.16 s a transaction), not 1/6 s
