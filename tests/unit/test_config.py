"""Configuration: the guide's defaults, one clear message per bad value, production rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from enginedge.config import (
    ApiKey,
    ConfigError,
    ensure_api_keys,
    load_settings,
    split_key_entry,
)


def test_defaults_are_the_guides() -> None:
    s = load_settings({})
    assert (
        s.port,
        s.log_level,
        s.request_timeout,
        s.health_check_interval,
        s.worker_health_check_timeout,
    ) == (3000, "info", 300, 30, 10)
    assert (
        s.db_pool_size,
        s.db_connect_retries,
        s.db_retry_delay,
        s.db_acquire_timeout,
        s.db_idle_timeout,
    ) == (10, 3, 3, 60, 300)
    assert s.environment == "development"
    assert s.builtin_worker_list == ["data-processing"]
    assert s.effective_database_url.startswith("sqlite:///")


def test_every_bad_value_is_named_and_secrets_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "PORT": "70000",
                "LOG_LEVEL": "loud",
                "REQUEST_TIMEOUT": "-1",
                "DATABASE_URL": "mysql://root:hunter2@db/x",
            }
        )
    message = str(caught.value)
    for part in ("PORT='70000'", "LOG_LEVEL='loud'", "REQUEST_TIMEOUT='-1'", "DATABASE_URL"):
        assert part in message
    assert "hunter2" not in message


def test_production_refuses_to_start_without_its_backing_services() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"ENVIRONMENT": "production", "API_KEYS": "0123456789abcdef"})
    assert str(caught.value) == (
        "ENVIRONMENT=production needs DATABASE_URL, KAFKA_BROKERS, REDIS_URL to be set"
    )


def test_node_env_is_an_alias() -> None:
    with pytest.raises(ConfigError, match="API_KEYS"):
        load_settings(
            {
                "NODE_ENV": "production",
                "DATABASE_URL": "postgresql://u@h/db",
                "KAFKA_BROKERS": "k:9092",
                "REDIS_URL": "redis://r:6379",
            }
        )
    assert load_settings({"NODE_ENV": "development"}).environment == "development"


def test_short_api_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 8 characters"):
        load_settings({"API_KEYS": "abc,0123456789"})
    assert load_settings({"API_KEYS": " k1-0123456 , k2-0123456 "}).api_key_list == [
        "k1-0123456",
        "k2-0123456",
    ]


def test_a_development_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    settings = load_settings({"ENGINEDGE_DATA_DIR": str(tmp_path)})
    keys, generated = ensure_api_keys(settings)
    # The generated key is an operator's: whoever runs `make run` sees everything.
    assert generated is not None and keys == [ApiKey(generated, "dev", admin=True)]
    assert (tmp_path / "api-key").stat().st_mode & 0o777 == 0o600
    again, _ = ensure_api_keys(settings)
    assert again == keys
    configured = load_settings({"API_KEYS": "0123456789", "ENGINEDGE_DATA_DIR": str(tmp_path)})
    assert ensure_api_keys(configured) == ([ApiKey("0123456789")], None)
    # Operator keys alone are configured keys too: nothing is generated.
    admins = load_settings({"ADMIN_API_KEYS": "ops:0123456789", "ENGINEDGE_DATA_DIR": "/x"})
    assert ensure_api_keys(admins) == ([ApiKey("0123456789", "ops", admin=True)], None)


# ------------------------------------------------------------------ key names and operators


def test_keys_may_be_named_and_a_bare_key_is_the_whole_entry() -> None:
    s = load_settings({"API_KEYS": "search-team:key-aaaaaaaa, key-bbbbbbbb,a.b_c-9:k:with:colons"})
    assert s.api_key_entries == [
        ApiKey("key-aaaaaaaa", "search-team"),
        ApiKey("key-bbbbbbbb"),
        ApiKey("k:with:colons", "a.b_c-9"),
    ]
    assert s.api_key_list == ["key-aaaaaaaa", "key-bbbbbbbb", "k:with:colons"]
    # A prefix that is no name (uppercase, a space, too long) leaves the entry a bare key.
    for bare in ("Team:abcdefgh", "my team:abcdefgh", "x" * 64 + ":abcdefgh"):
        assert load_settings({"API_KEYS": bare}).api_key_entries == [ApiKey(bare)]
    assert split_key_entry("ci:0123456789") == ("ci", "0123456789")
    assert split_key_entry("0123456789") == (None, "0123456789")


def test_operator_keys_are_accepted_without_being_in_api_keys() -> None:
    s = load_settings(
        {"API_KEYS": "team-a:key-aaaaaaaa,key-shared-1", "ADMIN_API_KEYS": "ops:key-oooooooo"}
    )
    assert s.api_key_entries == [
        ApiKey("key-aaaaaaaa", "team-a"),
        ApiKey("key-shared-1"),
        ApiKey("key-oooooooo", "ops", admin=True),
    ]
    # One key in both lists is one operator key, with the name either list gives it.
    both = load_settings({"API_KEYS": "boss:key-bbbbbbbb", "ADMIN_API_KEYS": "key-bbbbbbbb"})
    assert both.api_key_entries == [ApiKey("key-bbbbbbbb", "boss", admin=True)]
    # API_KEYS alone: no key is an operator's.
    assert not any(k.admin for k in load_settings({"API_KEYS": "key-aaaaaaaa"}).api_key_entries)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"API_KEYS": "team:aaaaaaaa,team:bbbbbbbb"}, "entries 1 and 2: two keys named 'team'"),
        ({"API_KEYS": "x:aaaaaaaa,y:aaaaaaaa"}, "entries 1 and 2: one key with two names"),
        ({"API_KEYS": "team:"}, "entry 1 (team): the key after ':' is empty"),
        ({"API_KEYS": "ok:aaaaaaaa,:bbbbbbbb"}, "entry 2: the name before ':' is empty"),
        ({"API_KEYS": "team:short"}, "entry 1 (team): each key must have at least 8 characters"),
        ({"API_KEYS": "0123456789abcdef:aaaaaaaa"}, "a name must not be 16 hex digits"),
        ({"ADMIN_API_KEYS": "team:"}, "ADMIN_API_KEYS=(hidden): entry 1 (team)"),
        (
            {"API_KEYS": "team:aaaaaaaa", "ADMIN_API_KEYS": "team:bbbbbbbb"},
            "API_KEYS and ADMIN_API_KEYS: two keys are named 'team'",
        ),
        (
            {"API_KEYS": "a:aaaaaaaa", "ADMIN_API_KEYS": "b:aaaaaaaa"},
            "API_KEYS and ADMIN_API_KEYS: one key is named both 'a' and 'b'",
        ),
    ],
)
def test_bad_key_lists_are_refused_in_one_line_without_showing_a_key(
    environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    for value in environ.values():
        for entry in value.split(","):
            key = split_key_entry(entry)[1]
            if key:
                assert key not in message, message


def test_tracing_is_off_unless_an_exporter_is_configured() -> None:
    from enginedge.adapters.telemetry.tracing import configure_tracing, exporter_endpoint

    assert exporter_endpoint({}) is None
    assert not configure_tracing(environ={}).enabled
    assert exporter_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == (
        "http://c:4318/v1/traces"
    )
    # The guide's Jaeger agent variables map onto Jaeger's OTLP/HTTP receiver.
    assert (
        exporter_endpoint({"JAEGER_AGENT_HOST": "jaeger-agent", "JAEGER_AGENT_PORT": "6831"})
        == "http://jaeger-agent:4318/v1/traces"
    )
    assert exporter_endpoint({"JAEGER_AGENT_HOST": "j", "OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(ConfigError, match="JAEGER_AGENT_PORT"):
        load_settings({"JAEGER_AGENT_PORT": "not-a-port"})
