from mtad.policy.shaping import ShapeLimits
from mtad.policy.window import DestinationWindow, SiteHealth

LIMITS = ShapeLimits(connection_limit=8, initial_destination_concurrency=2, dead_after_failures=3, dead_for_s=60,
                     backoff_for_s=30)


def test_window_starts_at_the_initial_concurrency():
    assert DestinationWindow(LIMITS).concurrency(0) == 2


def test_window_grows_by_one_per_window_full_of_successes_up_to_the_limit():
    window = DestinationWindow(LIMITS)
    for _ in range(3):  # g(N) = 1/N: 2 -> 2.5 -> 2.9 -> 3.24
        window.on_success(0)
    assert window.concurrency(0) == 3
    for _ in range(200):
        window.on_success(0)
    assert window.concurrency(0) == 8


def test_session_failures_shrink_the_window_and_declare_the_site_dead():
    window = DestinationWindow(LIMITS)
    window.on_session_failure(0, "connection refused")
    window.on_session_failure(1, "connection refused")
    assert window.health is SiteHealth.HEALTHY and window.concurrency(1) == 1
    window.on_session_failure(2, "connection refused")
    assert window.health is SiteHealth.DEAD and window.concurrency(2) == 0
    assert window.concurrency(61) == 0
    assert window.concurrency(62) == 1  # one probe after dead_for
    window.on_session_failure(63, "still refused")
    assert window.health is SiteHealth.DEAD  # one more failure kills it again


def test_a_success_after_the_probe_revives_the_site():
    window = DestinationWindow(LIMITS)
    for t in range(3):
        window.on_session_failure(t, "refused")
    window.concurrency(100)
    window.on_success(100)
    window.on_session_failure(101, "blip")
    assert window.health is SiteHealth.HEALTHY


def test_throttling_halves_window_and_rate_then_recovers_gradually():
    window = DestinationWindow(LIMITS, window=8.0)
    window.on_throttled(0, "421 too many connections")
    assert window.health is SiteHealth.BACKOFF
    assert window.concurrency(0) == 4 and window.rate_scale == 0.5
    window.on_throttled(1, "421 again")
    assert window.concurrency(1) == 2 and window.rate_scale == 0.25
    window.on_success(2)
    assert window.concurrency(2) == 2  # no growth while backing off
    assert window.concurrency(31 + 0.1) == 2 and window.rate_scale == 0.5  # rate doubles back per backoff_for
    window.concurrency(61.2)
    assert window.rate_scale == 1.0 and window.health is SiteHealth.HEALTHY


def test_rate_scale_never_goes_below_its_floor():
    window = DestinationWindow(LIMITS)
    for t in range(20):
        window.on_throttled(t, "421")
    assert window.rate_scale == LIMITS.backoff_min_rate_scale and window.concurrency(20) == 1
