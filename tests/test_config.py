"""Configuration: original keys and defaults kept, every bad value refused by name."""

from __future__ import annotations

from typing import Any

import pytest

import samsara_mp._env
import samsara_mp.config
from samsara_mp import Config, InvalidConfiguration, SamsaraClient

URL = "http://127.0.0.1:9000"


def test_original_defaults_are_kept() -> None:
    c = Config.build(env={}, url=URL)
    assert (c.start_publishing_thread, c.publish_interval, c.max_buffer_size, c.min_buffer_size,
            c.send_timeout, c.compression, c.send_client_stats) == (
        True, 30_000, 10_000, 100, 30_000, "gzip", True)


def test_milliseconds_are_not_rounded_to_seconds() -> None:
    c = Config.build(env={}, url=URL, publish_interval=1_500, send_timeout=250)
    assert c.publish_interval_s == 1.5
    assert c.send_timeout_s == 0.25


def test_compression_none_is_accepted_in_both_spellings() -> None:
    assert Config.build(env={}, url=URL, compression="none").compression == "none"
    assert Config.build(env={}, url=URL, compression=None).compression == "none"


BAD: list[tuple[dict[str, Any], str]] = [
    ({"url": None}, "url"),
    ({"url": "ftp://host"}, "url"),
    ({"url": "not a url"}, "url"),
    ({"sourceId": ""}, "sourceId"),
    ({"sourceId": 5}, "sourceId"),
    ({"start_publishing_thread": "yes"}, "start_publishing_thread"),
    ({"send_client_stats": 1}, "send_client_stats"),
    ({"publish_interval": 0}, "publish_interval"),
    ({"publish_interval": 1.5}, "publish_interval"),
    ({"publish_interval": True}, "publish_interval"),
    ({"max_buffer_size": -1}, "max_buffer_size"),
    ({"min_buffer_size": -1}, "min_buffer_size"),
    ({"min_buffer_size": 20, "max_buffer_size": 10}, "min_buffer_size"),
    ({"send_timeout": 0}, "send_timeout"),
    ({"compression": "brotli"}, "compression"),
    ({"compression_level": 10}, "compression_level"),
    ({"channel": "../etc"}, "channel"),
    ({"channel": ""}, "channel"),
    ({"channel": "web\n"}, "channel"),  # a trailing newline, which a "$" lets through
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"staging_size": 0}, "staging_size"),
    ({"ipc_timeout": "2s"}, "ipc_timeout"),
    ({"backoff_base": 100, "backoff_cap": 10}, "backoff_cap"),
    ({"runtime_dir": ""}, "runtime_dir"),
    ({"no_such_key": 1}, "no_such_key"),
    ({"url": "http://host/a path"}, "url"),
    ({"url": "http://host/\x00"}, "url"),
    ({"max_event_bytes": 10**12}, "max_event_bytes"),  # past the default staging_bytes
    ({"max_event_bytes": 2 << 20, "staging_bytes": 1 << 20}, "staging_bytes"),
]


@pytest.mark.parametrize(("kwargs", "key"), BAD)
def test_bad_values_raise_naming_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={}, **dict({"url": URL}, **kwargs))
    assert info.value.key == key
    assert key in str(info.value)


def test_client_raises_invalid_configuration_too() -> None:
    with pytest.raises(InvalidConfiguration) as info:
        SamsaraClient(url=URL, max_buffer_size=0)
    assert info.value.key == "max_buffer_size"


def test_environment_fills_in_below_explicit_arguments() -> None:
    env = {
        "SAMSARA_MP_URL": URL,
        "SAMSARA_MP_CHANNEL": "from-env",
        "SAMSARA_MP_PUBLISH_INTERVAL": "250",
        "SAMSARA_MP_SEND_CLIENT_STATS": "false",
        "SAMSARA_MP_SOURCE_ID": "env-source",
    }
    c = Config.build(env=env)
    assert (c.url, c.channel, c.publish_interval, c.send_client_stats, c.sourceId) == (
        URL, "from-env", 250, False, "env-source")
    c = Config.build(env=env, publish_interval=999, channel="explicit")
    assert (c.publish_interval, c.channel) == (999, "explicit")


def test_explicit_none_lets_the_environment_fill_in() -> None:
    env = {"SAMSARA_MP_URL": URL, "SAMSARA_MP_CHANNEL": "from-env"}
    c = Config.build(env=env, url=None, channel=None)
    assert (c.url, c.channel) == (URL, "from-env")


def test_bad_environment_value_names_the_key() -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={"SAMSARA_MP_URL": URL, "SAMSARA_MP_MAX_BUFFER_SIZE": "lots"})
    assert info.value.key == "max_buffer_size"


def test_same_url_means_same_channel() -> None:
    a = Config.build(env={}, url=URL)
    b = Config.build(env={}, url=URL + "/")
    assert a.channel_name == b.channel_name
    assert a.channel_name != Config.build(env={}, url="http://other:1").channel_name


def test_errors_survive_pickling_across_processes() -> None:
    import pickle

    from samsara_mp import InvalidEvent

    e = pickle.loads(pickle.dumps(InvalidEvent("sourceId", "missing")))
    assert (e.field, e.reason) == ("sourceId", "missing")
    c = pickle.loads(pickle.dumps(InvalidConfiguration("url", "missing")))
    assert (c.key, c.reason) == ("url", "missing")


@pytest.mark.parametrize(
    "key", ["publish_interval", "send_timeout", "ship_delay", "ipc_timeout", "shutdown_timeout",
            "exit_timeout", "idle_timeout", "backoff_base", "backoff_cap", "stats_interval"],
)
def test_a_millisecond_setting_past_30_days_is_refused_naming_the_key(key: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={}, url="http://127.0.0.1/", **{key: 10**13})
    assert info.value.key == key
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={"SAMSARA_MP_" + key.upper(): str(10**13)}, url="http://127.0.0.1/")
    assert info.value.key == key


def test_a_config_is_immutable_and_replace_validates_the_copy() -> None:
    config = Config.build(env={}, url="http://127.0.0.1:1/", staging_size=7)
    with pytest.raises(AttributeError):
        config.staging_size = 8  # type: ignore[misc]
    assert config.staging_size == 7
    copy = config.replace(staging_size=9)
    assert (copy.staging_size, config.staging_size) == (9, 7)
    assert copy != config and copy.replace(staging_size=7) == config
    with pytest.raises(InvalidConfiguration) as err:
        config.replace(staging_size=0)
    assert err.value.key == "staging_size"
    with pytest.raises(InvalidConfiguration) as err:
        config.replace(no_such_key=1)
    assert err.value.key == "no_such_key"


def test_to_dict_builds_the_same_config_in_another_process() -> None:
    # What a launched publisher is given: every key, JSON-able, and equal once rebuilt.
    import json

    config = Config.build(env={}, url="http://u:p@127.0.0.1:1/", headers={"X-A": "b"},
                          max_buffer_size=123, sample_rate=0.5)
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data) == set(samsara_mp.config.KEYS)
    assert Config.build(env={}, **data) == config
    data["headers"]["X-A"] = "changed"
    assert config.headers == {"X-A": "b"}, "to_dict copies the headers"


@pytest.mark.parametrize("raw", ["1_000", "0x10", "1e3", "10 000", ""])
def test_an_environment_integer_is_plain_digits(raw: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={"SAMSARA_MP_URL": URL, "SAMSARA_MP_STAGING_SIZE": raw})
    assert info.value.key == "staging_size" and repr(raw) in str(info.value)


def test_an_environment_integer_may_keep_surrounding_blanks() -> None:
    assert Config.build(env={"SAMSARA_MP_URL": URL, "SAMSARA_MP_STAGING_SIZE": " 100\n"}).staging_size == 100


def test_a_url_with_a_space_is_refused_without_echoing_its_credentials() -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={}, url="https://user:s3cret@host/a b")
    assert info.value.key == "url" and "position 26" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_an_invalid_header_name_is_not_echoed() -> None:
    # A whole "Name: value" line given as a name is the usual mistake.
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={}, url=URL, headers={"X-Ok": "1", "Authorization: Bearer s3cret": "x"})
    assert info.value.key == "headers" and "header #2" in str(info.value)
    assert "s3cret" not in str(info.value) and "Bearer" not in str(info.value)


def test_a_misspelt_environment_variable_is_logged_once_with_a_suggestion(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"SAMSARA_MP_URL": URL, "SAMSARA_MP_PUBLISH_INTERVL": "5", "SAMSARA_MP_QQQQQQ": "1",
           # Kubernetes' links for a Service named samsara-mp: not settings, never warned of.
           "SAMSARA_MP_SERVICE_HOST": "10.0.0.1", "SAMSARA_MP_SERVICE_PORT": "80",
           "SAMSARA_MP_PORT": "tcp://10.0.0.1:80", "SAMSARA_MP_PORT_80_TCP_ADDR": "10.0.0.1"}
    samsara_mp._env._warned_env.clear()
    with caplog.at_level("WARNING", logger="samsara_mp"):
        Config.build(env=env)
        Config.build(env=env)
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count(
        "samsara_mp: environment variable SAMSARA_MP_PUBLISH_INTERVL is not a setting; ignored "
        "(did you mean SAMSARA_MP_PUBLISH_INTERVAL?)") == 1
    assert lines.count("samsara_mp: environment variable SAMSARA_MP_QQQQQQ is not a setting; ignored") == 1
    assert len(lines) == 2


def test_a_batch_bound_below_the_event_bound_is_accepted() -> None:
    # A batch always takes at least one event: a small max_batch_bytes only means
    # that a large event goes alone.
    assert Config.build(env={}, url=URL, max_batch_bytes=32_768).max_batch_bytes == 32_768


@pytest.mark.parametrize("url", [
    "http://user:SEKa/SEKb@host:1/", "http://user:SEKa#SEKb@host/", "http://user:SEKa?SEKb@host/",
    "http://u:SEKa:SEKb@h:x/",
    # These parse (host "user", port 1234...), the rest landing in the path or query.
    "https://user:1234/SEKa@api.example.com/v1", "https://user:8080?SEKa@api.example.com",
    "https://user:99#SEKa@api.example.com", "https://tok/SEKa@api.example.com", "user:p://wSEKa@host",
])
def test_a_malformed_url_never_echoes_its_password(url: str) -> None:
    # An unencoded / # ? in the password ends the parsed netloc early.
    try:
        shown = repr(Config.build(env={}, url=url))
    except InvalidConfiguration as exc:
        assert exc.key == "url"
        shown = str(exc)
    assert "SEKa" not in shown and "SEKb" not in shown, shown


@pytest.mark.parametrize("url", ["http://h/?x=1", "http://h/#top", "http://h?", "http://tok/pw@api.example.com"])
def test_a_url_with_a_query_a_fragment_or_an_at_in_its_path_is_refused(url: str) -> None:
    # The events go to {url}/v1/events, which a query or fragment would swallow.
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={}, url=url)
    assert info.value.key == "url" and "percent-encode" in str(info.value)


@pytest.mark.parametrize("url", [
    "http://user:p%2Fq@host:1/", "http://[::1]:8080", "https://u:p@ss@api.example.com/base/",
    "http://127.0.0.1:9/prefix", "https://host/@tenant/", "https://host/v1/@scope/x",
])
def test_well_formed_urls_are_accepted_and_redacted(url: str) -> None:
    cfg = Config.build(env={}, url=url)
    assert "p%2Fq" not in repr(cfg) and "p@ss" not in repr(cfg)
