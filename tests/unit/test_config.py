"""Configuration: the guide's defaults, one clear message per bad value, production rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from enginedge.config import ConfigError, ensure_api_keys, load_settings


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
    assert generated is not None and keys == [generated]
    assert (tmp_path / "api-key").stat().st_mode & 0o777 == 0o600
    again, _ = ensure_api_keys(settings)
    assert again == keys
    configured = load_settings({"API_KEYS": "0123456789", "ENGINEDGE_DATA_DIR": str(tmp_path)})
    assert ensure_api_keys(configured) == (["0123456789"], None)


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
