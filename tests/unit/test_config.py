import pytest

from mtad.config import ConfigError, TrustedNetwork, parse_duration, parse_settings, parse_size


def test_defaults_need_no_file():
    settings = parse_settings({}, {})
    assert settings.database.url == ""
    assert settings.submission.max_recipients == 1000


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("60s", 60), ("5m", 300), ("2h", 7200), ("5d", 432000), (30, 30.0)]
)
def test_durations_are_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512", 512), ("64KB", 65536), ("25MB", 25 * 1024**2), (1000, 1000)])
def test_sizes_are_read_in_bytes(text, size):
    assert parse_size(text) == size


def test_file_values_are_converted_by_type():
    settings = parse_settings(
        {"submission": {"max_message_size": "1MB", "idle_timeout": "2m", "listen": ["127.0.0.1:25"]}}, {}
    )
    assert settings.submission.max_message_size == 1024**2
    assert settings.submission.idle_timeout == 120
    assert settings.submission.listen == ("127.0.0.1:25",)


def test_environment_overrides_the_file():
    settings = parse_settings(
        {"database": {"url": "postgresql://file/db"}, "submission": {"max_recipients": 5}},
        {"MTAD_DATABASE_URL": "postgresql://env/db", "MTAD_SUBMISSION_MAX_RECIPIENTS": "7", "MTAD_STATE_DIR": "/x"},
    )
    assert settings.database.url == "postgresql://env/db"
    assert settings.submission.max_recipients == 7
    assert settings.state_dir == "/x"


def test_environment_lists_are_comma_separated_and_trusted_networks_are_net_equals_tenant():
    settings = parse_settings(
        {},
        {
            "MTAD_SUBMISSION_LISTEN": "127.0.0.1:2525, [::1]:2525",
            "MTAD_SUBMISSION_TRUSTED_NETWORKS": "10.0.0.0/8=platform",
        },
    )
    assert settings.submission.listen == ("127.0.0.1:2525", "[::1]:2525")
    assert settings.submission.trusted_networks == (TrustedNetwork("10.0.0.0/8", "platform"),)


@pytest.mark.parametrize(
    ("document", "environ", "key"),
    [
        ({"submission": {"max_recipients": "many"}}, {}, "submission.max_recipients"),
        ({"submission": {"max_recipents": 3}}, {}, "submission.max_recipents: unknown setting"),
        ({"queue": {"lease": "forever"}}, {}, "queue.lease"),
        ({"logging": {"format": "xml"}}, {}, "logging.format"),
        ({"database": {"auto_migrate": "perhaps"}}, {}, "database.auto_migrate"),
        ({"submission": {"trusted_networks": [{"network": "nonsense", "tenant": "a"}]}}, {}, "submission.trusted_networks"),
        ({}, {"MTAD_QUEUE_CLAIM_BATCH_SIZE": "lots"}, "queue.claim_batch_size"),
        ({"bogus": 1}, {}, "bogus: unknown setting"),
    ],
)
def test_a_wrong_value_fails_with_one_line_naming_the_key(document, environ, key):
    with pytest.raises(ConfigError) as error:
        parse_settings(document, environ)
    message = str(error.value)
    assert message.startswith(key)
    assert "\n" not in message


def test_shipped_configs_parse(tmp_path):
    from pathlib import Path

    from mtad.config import load_settings

    root = Path(__file__).resolve().parents[2]
    dev = load_settings(root / "config" / "mtad.toml", {})
    assert dev.state_dir == "./var" and dev.database.url == "" and dev.database.auto_migrate
    assert dev.submission.listen == ("127.0.0.1:2525",)
    example = load_settings(root / "config" / "mtad.example.toml", {})
    assert example.database.url.startswith("postgresql://") and not example.database.auto_migrate
