import pytest

from mtad.policy.ip_privacy import mask_ip
from mtad.policy.login_throttle import LoginThrottle
from mtad.policy.queue_id import make_queue_id
from mtad.policy.replies import with_enhanced_code


@pytest.mark.parametrize(
    ("ip", "masked"),
    [
        ("192.0.2.77", "192.0.2.0"),
        ("2001:db8:1:2:3::5", "2001:db8:1::"),
        ("::ffff:198.51.100.9", "198.51.100.0"),
        ("not-an-ip", "not-an-ip"),
        (None, None),
    ],
)
def test_ip_addresses_lose_their_last_octet(ip, masked):
    assert mask_ip(ip) == masked


def test_login_throttle_blocks_after_max_failures_within_the_window():
    throttle = LoginThrottle(max_failures=3, window_s=60)
    for t in (0, 1, 2):
        assert not throttle.is_blocked("192.0.2.1", t)
        throttle.record_failure("192.0.2.1", t)
    assert throttle.is_blocked("192.0.2.1", 3)
    assert not throttle.is_blocked("192.0.2.2", 3)  # per client
    assert not throttle.is_blocked("192.0.2.1", 61)  # the window slides


def test_login_throttle_forgets_a_client_that_logs_in():
    throttle = LoginThrottle(max_failures=2, window_s=60)
    throttle.record_failure("c", 0)
    throttle.record_success("c")
    throttle.record_failure("c", 1)
    assert not throttle.is_blocked("c", 1)


def test_login_throttle_memory_is_bounded():
    throttle = LoginThrottle(max_failures=1, window_s=60, max_clients=100)
    for n in range(1000):
        throttle.record_failure(f"10.0.{n // 256}.{n % 256}", 0)
    assert len(throttle._failures) == 100


def test_queue_ids_are_16_chars_and_sort_by_time():
    first = make_queue_id(1_700_000_000_000, 0xFFFFFFFF)
    later = make_queue_id(1_700_000_000_001, 0)
    assert len(first) == len(later) == 16
    assert first < later
    assert make_queue_id(1, 1) != make_queue_id(1, 2)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
        ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
        ("500 Line too long (see RFC5321 4.5.3.1.6)", "500 5.6.0 Line too long (see RFC5321 4.5.3.1.6)"),
        ("530 5.7.0 Authentication required", "530 5.7.0 Authentication required"),
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
        ("250 Supported commands: AUTH DATA", "250 2.0.0 Supported commands: AUTH DATA"),
        ("220 mtad.example ESMTP mtad", "220 mtad.example ESMTP mtad"),  # the greeting takes none
        ("250 mtad.example", "250 mtad.example"),  # nor the reply to HELO
        ("250-SIZE 1000", "250-SIZE 1000"),
        ("250 HELP", "250 HELP"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("421 Error: timeout", "421 4.3.2 Error: timeout"),
    ],
)
def test_aiosmtpd_replies_get_enhanced_codes(reply, expected):
    assert with_enhanced_code(reply) == expected
