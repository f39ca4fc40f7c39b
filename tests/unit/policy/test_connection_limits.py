from mtad.policy.connection_limits import ConnectionLimits, over_queue_limit


def test_connections_are_limited_per_client_and_in_all():
    limits = ConnectionLimits(max_total=3, max_per_client=2)
    assert limits.admit("a") is None and limits.admit("a") is None
    assert limits.admit("a").startswith("421 4.7.0")
    assert limits.admit("b") is None
    assert limits.admit("c").startswith("421 4.3.2")  # 3 open in all
    limits.release("a")
    assert limits.admit("c") is None


def test_back_pressure_only_when_configured_and_reached():
    assert over_queue_limit(10**9, 0) is None
    assert over_queue_limit(99, 100) is None
    assert over_queue_limit(100, 100).startswith("452 4.3.1")
