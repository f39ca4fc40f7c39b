from datetime import datetime, timedelta, timezone

import pytest

from mtad.model import Claim, RecipientState, Reply
from mtad.policy.outcome import next_state, unreachable_site_reply
from mtad.policy.rate import TokenBucket, parse_rate
from mtad.policy.retry import next_attempt_at, retry_delay_s
from mtad.policy.shaping import parse_shaping
from mtad.policy.throttling import is_throttling_reply

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(("text", "per_s"), [("100/s", 100), ("300/m", 5), ("36000/h", 10), ("86400/d", 1)])
def test_rates_are_tokens_per_second(text, per_s):
    assert parse_rate(text) == per_s


def test_token_bucket_paces_at_its_rate_after_the_burst():
    bucket = TokenBucket(rate_per_s=10, burst=1)
    taken = [t / 1000 for t in range(0, 2000) if bucket.try_take(t / 1000)]
    assert len(taken) == 20  # 2 s at 10/s
    assert bucket.try_take(2.0)
    assert bucket.seconds_until_token(2.0) == pytest.approx(0.1, abs=0.01)


def test_token_bucket_scale_slows_the_rate():
    bucket = TokenBucket(rate_per_s=10, burst=1)
    assert len([t for t in range(0, 2000) if bucket.try_take(t / 1000, scale=0.5)]) == 10


@pytest.mark.parametrize(("age_s", "delay_s"), [(0, 300), (100, 300), (1000, 1000), (10_000, 4000)])
def test_retry_delay_is_the_age_clamped_between_the_backoff_times(age_s, delay_s):
    assert retry_delay_s(age_s, 300, 4000) == delay_s


def test_jitter_only_lengthens_the_delay_by_its_fraction():
    at = next_attempt_at(NOW - timedelta(seconds=1000), NOW, minimal_backoff_s=300, maximal_backoff_s=4000,
                         jitter_fraction=0.2, random_unit=0.5)
    assert at == NOW + timedelta(seconds=1100)


def claim(queued_at=NOW - timedelta(minutes=10)) -> Claim:
    return Claim(1, 1, "Q", 1, "a@b.example", "r@x.example", "x.example", 0, queued_at, NOW)


@pytest.mark.parametrize(
    ("code", "state"),
    [(250, RecipientState.DELIVERED), (550, RecipientState.BOUNCED), (450, RecipientState.DEFERRED),
     (421, RecipientState.DEFERRED)],
)
def test_reply_classes_decide_the_next_state(code, state):
    result, retry_at = next_state(claim(), Reply(code, None, "x"), NOW, minimal_backoff_s=300, maximal_backoff_s=4000,
                                  queue_lifetime_s=5 * 86400, jitter_fraction=0, random_unit=0)
    assert result is state
    assert (retry_at is not None) == (state is RecipientState.DEFERRED)


def test_a_temporary_failure_past_the_queue_lifetime_expires():
    old = claim(queued_at=NOW - timedelta(days=5, seconds=1))
    state, _ = next_state(old, Reply(450, "4.2.0", "busy"), NOW, minimal_backoff_s=300, maximal_backoff_s=4000,
                          queue_lifetime_s=5 * 86400, jitter_fraction=0, random_unit=0)
    assert state is RecipientState.EXPIRED


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "throttled"),
    [
        (421, "4.7.0", "Try again later, closing connection", True),
        (450, "4.7.28", "unusual rate of unsolicited mail", True),
        (451, "4.7.0", "Temporary server error. Rate limit exceeded", True),
        (450, "4.2.1", "mailbox busy", False),
        (550, "5.7.1", "rate limit", False),  # permanent replies are never throttling
    ],
)
def test_throttling_replies_are_recognised_by_pattern(code, enhanced, text, throttled):
    patterns = (r"4\.7\.28", r"rate limit")
    assert is_throttling_reply(code, enhanced, text, patterns) is throttled


SHAPING = {
    "default": {"connection_limit": 3, "max_message_rate": "10/s"},
    "provider": {"google": {"match_mx_suffix": [".google.example"], "connection_limit": 20}},
    "domain": {"special.example": {"max_message_rate": "1/s"}},
}


def test_domains_on_a_providers_mx_roll_up_into_one_site():
    rules = parse_shaping(SHAPING)
    a = rules.shape_for("gmail.example", ("alt1.gmail-smtp-in.l.google.example",))
    b = rules.shape_for("customer.example", ("aspmx.l.google.example",))
    assert a.site == b.site == "google" and a.limits.connection_limit == 20
    assert a.limits.max_message_rate == 10  # inherited from [default]


def test_other_domains_share_a_site_only_when_they_share_mx_hosts():
    rules = parse_shaping(SHAPING)
    one = rules.shape_for("one.example", ("mx.hoster.example",))
    two = rules.shape_for("two.example", ("MX.hoster.example.",))
    three = rules.shape_for("three.example", ("mx.elsewhere.example",))
    assert one.site == two.site != three.site and one.provider is None


def test_a_domain_override_is_its_own_site():
    shape = parse_shaping(SHAPING).shape_for("special.example", ("mx.hoster.example",))
    assert shape.site == "domain:special.example" and shape.limits.max_message_rate == 1


@pytest.mark.parametrize(
    "document",
    [
        {"default": {"conection_limit": 3}},
        {"default": {"max_message_rate": "fast"}},
        {"default": {"tls": "maybe"}},
        {"provider": {"x": {"connection_limit": 3}}},
        {"defaults": {}},
    ],
)
def test_a_wrong_shaping_setting_is_refused(document):
    with pytest.raises(ValueError):
        parse_shaping(document)


@pytest.mark.parametrize(
    "error, expected",
    [
        ("421 4.7.0 mx.example: try again later", Reply(421, "4.7.0", "mx.example: try again later")),
        ("451 4.4.2 mx.example [127.0.0.2]: no greeting reply within 3s (command_timeout)",
         Reply(451, "4.4.2", "mx.example [127.0.0.2]: no greeting reply within 3s (command_timeout)")),
        ("554 5.7.1 mx.example: go away", Reply(451, "4.4.1", "554 5.7.1 mx.example: go away")),
        ("connection refused", Reply(451, "4.4.1", "connection refused")),
        (None, Reply(451, "4.4.1", "destination unreachable")),
    ],
)
def test_an_unreachable_site_defers_with_its_own_words_and_no_code_twice(error, expected):
    assert unreachable_site_reply(error) == expected
