"""Configuration from environment variables (SPEC §9), validated at start-up.

Every variable is declared once in :data:`VARIABLES`; the same table validates, documents
(``enginedge serve --help``, README) and reports which ones are missing in production.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from enginedge.application.tenancy import NAME_PATTERN, TENANT_PATTERN


class ConfigError(ValueError):
    """A bad or missing configuration value; the message names the variable."""


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive whole number")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be zero or a positive whole number")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be zero or a positive number")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError("must be a port number from 1 to 65535")
    return number


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return lowered

    return parse


def _database_url(value: str) -> str:
    url = make_url(value)  # raises ArgumentError on garbage
    if url.get_backend_name() not in ("postgresql", "postgres", "sqlite"):
        raise ValueError("must be a postgresql:// (or sqlite:///) URL")
    return value


def _redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis:// or rediss:// URL")
    return value


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _brokers(value: str) -> str:
    for broker in value.split(","):
        host, sep, port = broker.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("must be comma-separated host:port pairs")
    return value


def split_key_entry(entry: str) -> tuple[str | None, str]:
    """An entry of ``API_KEYS`` / ``ADMIN_API_KEYS``: ``name:key`` when the part before the
    first ``:`` looks like a name (lowercase letters, digits, ``.``, ``_``, ``-``, at most 63,
    starting with a letter or digit), else the whole entry is the key, unnamed."""
    name, sep, key = entry.partition(":")
    if sep and NAME_PATTERN.fullmatch(name):
        return name, key
    return None, entry


def key_entries(value: str) -> list[tuple[str | None, str]]:
    """The ``(name, key)`` pairs of a comma-separated list of keys, each checked; a
    ``ValueError`` says what is wrong by entry number and name, never showing a key."""
    entries: list[tuple[str | None, str]] = []
    names: dict[str, tuple[int, str]] = {}
    keys: dict[str, tuple[int, str | None]] = {}
    raw = [e.strip() for e in value.split(",") if e.strip()]
    if not raw:
        raise ValueError("must hold at least one key")
    for number, entry in enumerate(raw, 1):
        if entry.startswith(":"):
            raise ValueError(f"entry {number}: the name before ':' is empty")
        name, key = split_key_entry(entry)
        which = f"entry {number}" + (f" ({name})" if name else "")
        if name is not None and TENANT_PATTERN.fullmatch(name):
            raise ValueError(
                f"entry {number}: a name must not be 16 hex digits (it reads as a tenant hash)"
            )
        if not key:
            raise ValueError(f"{which}: the key after ':' is empty")
        if len(key) < 8:
            raise ValueError(f"{which}: each key must have at least 8 characters")
        if name is not None and name in names and names[name][1] != key:
            raise ValueError(f"entries {names[name][0]} and {number}: two keys named {name!r}")
        if key in keys and name is not None and keys[key][1] not in (None, name):
            raise ValueError(f"entries {keys[key][0]} and {number}: one key with two names")
        if name is not None:
            names.setdefault(name, (number, key))
        if key not in keys or keys[key][1] is None:
            keys[key] = (number, name)
        entries.append((name, key))
    return entries


def _keys(value: str) -> str:
    key_entries(value)
    return ",".join(e.strip() for e in value.split(",") if e.strip())


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key the service accepts, the name its operator gave it, and whether it is an
    operator's (``ADMIN_API_KEYS``)."""

    key: str = field(repr=False)
    name: str | None = None
    admin: bool = False


def merge_keys(api_keys: str | None, admin_api_keys: str | None) -> list[ApiKey]:
    """Every accepted key once: those of ``API_KEYS`` and of ``ADMIN_API_KEYS`` (operator
    keys, accepted whether or not ``API_KEYS`` repeats them). A ``ValueError`` if a key has
    two names or a name two keys across the two lists."""
    merged: dict[str, ApiKey] = {}
    owners: dict[str, str] = {}
    for value, admin in ((api_keys, False), (admin_api_keys, True)):
        for name, key in key_entries(value) if value else []:
            known = merged.get(key)
            if known is not None and name and known.name and known.name != name:
                raise ValueError(f"one key is named both {known.name!r} and {name!r}")
            if name is not None and owners.setdefault(name, key) != key:
                raise ValueError(f"two keys are named {name!r}")
            merged[key] = ApiKey(
                key,
                name or (known.name if known else None),
                admin or (known.admin if known else False),
            )
    return list(merged.values())


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _workers(value: str) -> str:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = set(names) - {"data-processing", "llm", "none"}
    if unknown:
        raise ValueError(
            f"unknown built-in worker(s) {', '.join(sorted(unknown))}; "
            "known: data-processing, llm, none"
        )
    return ",".join(names)


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    attr: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "ENVIRONMENT",
        "environment",
        "development",
        _choice("development", "production", "test"),
        "development or production (NODE_ENV is accepted as an alias)",
    ),
    Variable("PORT", "port", "3000", _port, "HTTP server port"),
    Variable("HOST", "host", "0.0.0.0", str, "address to listen on"),  # noqa: S104
    Variable(
        "LOG_LEVEL",
        "log_level",
        "info",
        _choice("error", "warn", "info", "debug"),
        "logging level (error/warn/info/debug)",
    ),
    Variable(
        "DATABASE_URL",
        "database_url",
        None,
        _database_url,
        "PostgreSQL connection string; unset: a SQLite file in ENGINEDGE_DATA_DIR",
        secret=True,
    ),
    Variable(
        "DATABASE_READ_URL",
        "database_read_url",
        None,
        _database_url,
        "PostgreSQL read replica for status, list and console reads (stale reads allowed; "
        "a request not found there is read from DATABASE_URL); unset: DATABASE_URL",
        secret=True,
    ),
    Variable(
        "DB_PGBOUNCER",
        "db_pgbouncer",
        "false",
        _bool,
        "the database URLs point at PgBouncer in transaction pooling mode: no server-side "
        "prepared statements are kept (also selected by ?pgbouncer=true in the URL)",
    ),
    Variable(
        "KAFKA_BROKERS",
        "kafka_brokers",
        None,
        _brokers,
        "Kafka broker addresses (host:port,...); unset: the in-process bus",
    ),
    Variable(
        "KAFKA_PARTITIONS",
        "kafka_partitions",
        "3",
        _positive_int,
        "partitions of each topic the service or a worker creates (a worker: its inbox)",
    ),
    Variable("KAFKA_USERNAME", "kafka_username", None, str, "SASL user name for Kafka"),
    Variable("KAFKA_PASSWORD", "kafka_password", None, str, "SASL password for Kafka", secret=True),
    Variable(
        "REDIS_URL",
        "redis_url",
        None,
        _redis_url,
        "Redis connection string; unset: in-process registry, events and limits",
        secret=True,
    ),
    Variable(
        "API_KEYS",
        "api_keys",
        None,
        _keys,
        "comma-separated API keys, each a tenant, optionally named as name:key; unset "
        "(and ADMIN_API_KEYS unset) in development: an operator key is generated",
        secret=True,
    ),
    Variable(
        "ADMIN_API_KEYS",
        "admin_api_keys",
        None,
        _keys,
        "comma-separated operator keys (name:key like API_KEYS, valid keys even if not in "
        "API_KEYS): they see and cancel every tenant's requests",
        secret=True,
    ),
    Variable(
        "REQUEST_TIMEOUT",
        "request_timeout",
        "300",
        _positive_float,
        "seconds a request may take before it is TIMEOUT (metadata.timeout overrides)",
    ),
    Variable(
        "HEALTH_CHECK_INTERVAL",
        "health_check_interval",
        "30",
        _positive_float,
        "seconds between health checks of each worker",
    ),
    Variable(
        "WORKER_HEALTH_CHECK_TIMEOUT",
        "worker_health_check_timeout",
        "10",
        _positive_float,
        "seconds a worker health check may take",
    ),
    Variable(
        "WORKER_HEARTBEAT_INTERVAL",
        "worker_heartbeat_interval",
        "5",
        _positive_float,
        "seconds between heartbeats of the built-in workers",
    ),
    Variable(
        "WORKER_HEARTBEAT_TTL",
        "worker_heartbeat_ttl",
        "15",
        _positive_float,
        "seconds without a heartbeat after which a worker is UNHEALTHY",
    ),
    Variable(
        "PRIORITY_AGING",
        "priority_aging",
        "5",
        _non_negative_float,
        "seconds of waiting that lift a request's band one priority level, so that low "
        "priority is never starved (0: no aging)",
    ),
    Variable(
        "TENANT_MAX_RUNNING",
        "tenant_max_running",
        None,
        _positive_int,
        "requests of one API key running at once; beyond it they wait (unset: no limit)",
    ),
    Variable(
        "TENANT_MAX_QUEUED",
        "tenant_max_queued",
        None,
        _positive_int,
        "requests of one API key waiting; beyond it a submit answers 429 (unset: no limit)",
    ),
    Variable(
        "MAX_ATTEMPTS",
        "max_attempts",
        "3",
        _positive_int,
        "dispatch attempts per request before it FAILS",
    ),
    Variable(
        "RETRY_BACKOFF",
        "retry_backoff",
        "1",
        _positive_float,
        "seconds before the second attempt; doubles per attempt, at most 30",
    ),
    Variable(
        "RATE_LIMIT_REQUESTS",
        "rate_limit_requests",
        "6000",
        _positive_int,
        "API calls allowed per key per window",
    ),
    Variable(
        "RATE_LIMIT_WINDOW",
        "rate_limit_window",
        "60",
        _positive_int,
        "rate-limit window in seconds",
    ),
    Variable(
        "MAX_BODY_BYTES",
        "max_body_bytes",
        "1048576",
        _positive_int,
        "largest request body accepted (413 above)",
    ),
    Variable(
        "SWEEP_INTERVAL",
        "sweep_interval",
        "1",
        _positive_float,
        "seconds between sweeps for timeouts and lost workers",
    ),
    Variable("DB_POOL_SIZE", "db_pool_size", "10", _positive_int, "database connection pool size"),
    Variable(
        "DB_CONNECT_RETRIES",
        "db_connect_retries",
        "3",
        _non_negative_int,
        "database connection retries at start-up",
    ),
    Variable(
        "DB_RETRY_DELAY",
        "db_retry_delay",
        "3",
        _positive_float,
        "seconds between database connection retries",
    ),
    Variable(
        "DB_ACQUIRE_TIMEOUT",
        "db_acquire_timeout",
        "60",
        _positive_float,
        "seconds to wait for a pooled database connection",
    ),
    Variable(
        "DB_IDLE_TIMEOUT",
        "db_idle_timeout",
        "300",
        _positive_float,
        "seconds after which a pooled connection is replaced",
    ),
    Variable(
        "MIGRATE_ON_START",
        "migrate_on_start",
        "true",
        _bool,
        "apply database migrations at start-up",
    ),
    Variable(
        "ENGINEDGE_DATA_DIR",
        "data_dir",
        ".enginedge",
        Path,
        "directory of the embedded SQLite file and the generated API key",
    ),
    Variable(
        "JAEGER_AGENT_HOST",
        "jaeger_agent_host",
        None,
        str,
        "send traces to this Jaeger host (OTLP/HTTP; the standard OTEL_* variables work too)",
    ),
    Variable(
        "JAEGER_AGENT_PORT",
        "jaeger_agent_port",
        None,
        _port,
        "its port: 6831 (the guide's) means OTLP/HTTP on 4318; others are used as given",
    ),
    Variable(
        "JAEGER_SERVICE_NAME",
        "jaeger_service_name",
        None,
        str,
        "service name on the traces (default main-hexagon)",
    ),
    Variable(
        "LLM_BASE_URL",
        "llm_base_url",
        None,
        _http_url,
        "OpenAI-compatible API for the llm worker, e.g. https://api.openai.com/v1",
    ),
    Variable("LLM_API_KEY", "llm_api_key", None, str, "bearer key for LLM_BASE_URL", secret=True),
    Variable("LLM_MODEL", "llm_model", None, str, "model used when a request names none"),
    Variable(
        "WORKER_HEALTH_PORT",
        "worker_health_port",
        "8081",
        _port,
        "port of `enginedge worker`'s own /health endpoint",
    ),
    Variable(
        "WORKER_ADVERTISED_HOST",
        "worker_advertised_host",
        None,
        str,
        "host name the orchestrator reaches a worker's /health at (default: this "
        "machine's host name)",
    ),
    Variable(
        "TASK_STALL_TIMEOUT",
        "task_stall_timeout",
        "600",
        _positive_float,
        "seconds a built-in worker's task may go without progress before the worker "
        "reports itself unhealthy",
    ),
    Variable(
        "BUILTIN_WORKERS",
        "builtin_workers",
        None,
        _workers,
        "built-in workers to run in-process; default: data-processing (and llm when "
        "LLM_BASE_URL is set) with the "
        "in-process bus, none with Kafka",
    ),
    Variable(
        "BUILTIN_WORKER_CAPACITY",
        "builtin_worker_capacity",
        "4",
        _positive_int,
        "concurrent tasks per built-in worker",
    ),
    Variable(
        "DATA_ROOT",
        "data_root",
        ".",
        Path,
        "directory the data-processing worker may read files from",
    ),
    Variable(
        "EVENT_RETENTION",
        "event_retention",
        "3600",
        _positive_float,
        "seconds a finished request's events stay available to SSE clients (in embedded "
        "mode, for the 2,000 most recently finished requests)",
    ),
)

PRODUCTION_REQUIRED = ("DATABASE_URL", "KAFKA_BROKERS", "REDIS_URL", "API_KEYS")


@dataclass(frozen=True, slots=True)
class Settings:
    environment: str = "development"
    port: int = 3000
    host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on all interfaces
    log_level: str = "info"
    database_url: str | None = None
    database_read_url: str | None = None
    db_pgbouncer: bool = False
    kafka_brokers: str | None = None
    kafka_partitions: int = 3
    jaeger_agent_host: str | None = None
    jaeger_agent_port: int | None = None
    jaeger_service_name: str | None = None
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str | None = None
    task_stall_timeout: float = 600
    worker_health_port: int = 8081
    worker_advertised_host: str | None = None
    kafka_username: str | None = None
    kafka_password: str | None = None
    redis_url: str | None = None
    api_keys: str | None = None
    admin_api_keys: str | None = None
    request_timeout: float = 300
    health_check_interval: float = 30
    worker_health_check_timeout: float = 10
    worker_heartbeat_interval: float = 5
    worker_heartbeat_ttl: float = 15
    priority_aging: float = 5
    tenant_max_running: int | None = None
    tenant_max_queued: int | None = None
    max_attempts: int = 3
    retry_backoff: float = 1
    rate_limit_requests: int = 6000
    rate_limit_window: int = 60
    max_body_bytes: int = 1048576
    sweep_interval: float = 1
    db_pool_size: int = 10
    db_connect_retries: int = 3
    db_retry_delay: float = 3
    db_acquire_timeout: float = 60
    db_idle_timeout: float = 300
    migrate_on_start: bool = True
    data_dir: Path = field(default_factory=lambda: Path(".enginedge"))
    builtin_workers: str | None = None
    builtin_worker_capacity: int = 4
    data_root: Path = field(default_factory=lambda: Path("."))
    event_retention: float = 3600

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @property
    def api_key_list(self) -> list[str]:
        """The keys of ``API_KEYS``, without their names."""
        return [key for _, key in key_entries(self.api_keys)] if self.api_keys else []

    @property
    def api_key_entries(self) -> list[ApiKey]:
        """Every accepted key, ``API_KEYS`` and ``ADMIN_API_KEYS``, with names and roles."""
        return merge_keys(self.api_keys, self.admin_api_keys)

    @property
    def builtin_worker_list(self) -> list[str]:
        if self.builtin_workers is None:
            if self.kafka_brokers:
                return []
            return ["data-processing", "llm"] if self.llm_base_url else ["data-processing"]
        return [w for w in self.builtin_workers.split(",") if w != "none"]

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'enginedge.db').resolve()}"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every variable; raise :class:`ConfigError` naming all bad ones."""
    env = dict(os.environ if environ is None else environ)
    if "ENVIRONMENT" not in env and "NODE_ENV" in env:
        env["ENVIRONMENT"] = env["NODE_ENV"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for var in VARIABLES:
        raw = env.get(var.name)
        if raw is None or raw.strip() == "":
            if var.default is None:
                continue
            raw = var.default
        try:
            values[var.attr] = var.parse(raw.strip())
        except (ValueError, TypeError) as exc:
            shown = "(hidden)" if var.secret else repr(raw)
            reason = str(exc) if isinstance(exc, ValueError) and str(exc) else "is not valid"
            problems.append(f"{var.name}={shown}: {reason}")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    settings = Settings(**values)
    try:
        settings.api_key_entries  # noqa: B018 - checks that the two lists agree
    except ValueError as exc:
        raise ConfigError(f"API_KEYS and ADMIN_API_KEYS: {exc}") from None
    if settings.database_read_url and not (
        settings.database_url and make_url(settings.database_url).get_backend_name() != "sqlite"
    ):
        raise ConfigError("DATABASE_READ_URL needs DATABASE_URL set to a PostgreSQL primary")
    if settings.production:
        missing = [name for name in PRODUCTION_REQUIRED if not env.get(name, "").strip()]
        if missing:
            raise ConfigError("ENVIRONMENT=production needs " + ", ".join(missing) + " to be set")
    return settings


# The name of the generated development key, in logs and on the console.
GENERATED_KEY_NAME = "dev"


def ensure_api_keys(settings: Settings) -> tuple[list[ApiKey], str | None]:
    """The keys to accept, and a key generated for this data directory if none were given.

    In development with neither ``API_KEYS`` nor ``ADMIN_API_KEYS``, a key is generated once
    and kept in the data directory (mode 0600), so the CLI on the same machine finds it and
    restarts keep it. It is an operator key: whoever runs the service sees everything.
    """
    if settings.api_key_entries:
        return settings.api_key_entries, None
    path = generated_key_path(settings.data_dir)
    if path.exists():
        key = path.read_text().strip()
        return [ApiKey(key, GENERATED_KEY_NAME, admin=True)], key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "edk_" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return [ApiKey(key, GENERATED_KEY_NAME, admin=True)], key


def generated_key_path(data_dir: Path) -> Path:
    return data_dir / "api-key"
