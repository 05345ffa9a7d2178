"""The schema: the guide's three tables plus the outbox (SPEC §7).

Changed only through Alembic migrations in ``migrations/versions``; a test checks that the
migrations produce exactly these tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

metadata = MetaData()

# JSONB on PostgreSQL as the guide says; JSON (text) on SQLite.
Json = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE that always reads back timezone-aware UTC, on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if not isinstance(value, datetime):
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


requests = Table(
    "requests",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("task_type", String(50), nullable=False),
    Column("payload", Json, nullable=False),
    Column("metadata", Json),
    Column("status", String(20), nullable=False, server_default="PENDING"),
    Column("created_at", UTCDateTime, server_default=func.now()),
    Column("updated_at", UTCDateTime, server_default=func.now()),
    # Beyond the guide's columns:
    Column("worker_type", String(50), nullable=False),
    Column("worker_id", String(64)),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("max_attempts", Integer, nullable=False, server_default="3"),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("correlation_id", String(128)),
    Column("idempotency_key", String(255)),
    Column("api_key_hash", String(16)),
    Column("traceparent", String(64)),
    Column("deadline", UTCDateTime, nullable=False),
    Column("dispatched_at", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("dispatch_after", UTCDateTime),
    Index("ix_requests_created", "created_at", "id"),
    Index("ix_requests_status_updated", "status", "updated_at"),
    Index("ix_requests_worker", "worker_id"),
    # A tenant's own list, newest first (migration 0003).
    Index("ix_requests_tenant_created", "api_key_hash", "created_at", "id"),
    # The scheduler's queue (migration 0003): the waiting requests of a band, per tenant.
    Index(
        "ix_requests_queue",
        "worker_type",
        "priority",
        "api_key_hash",
        "created_at",
        postgresql_where=text("status = 'PENDING'"),
        sqlite_where=text("status = 'PENDING'"),
    ),
    Index(
        "ux_requests_idempotency",
        "api_key_hash",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
        sqlite_where=text("idempotency_key IS NOT NULL"),
    ),
)

request_results = Table(
    "request_results",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("request_id", Uuid, ForeignKey("requests.id"), nullable=False),
    Column("status", String(20), nullable=False),
    Column("result", Json),
    Column("error", Text),
    Column("processing_time", Integer),
    Column("created_at", UTCDateTime, server_default=func.now()),
    Column("attempt", Integer, nullable=False, server_default="1"),
    Column("worker_id", String(64)),
    # One outcome per request: the store itself refuses a second one.
    Index("ux_request_results_request", "request_id", unique=True),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("type", String(50), nullable=False),
    Column("endpoint", String(255), nullable=False),
    Column("status", String(20), nullable=False, server_default="HEALTHY"),
    Column("capabilities", Json),
    Column("last_health_check", UTCDateTime),
    Column("created_at", UTCDateTime, server_default=func.now()),
    Column("updated_at", UTCDateTime, server_default=func.now()),
    Column("capacity", Integer, nullable=False, server_default="1"),
    Column("active", Integer, nullable=False, server_default="0"),
    Column("last_heartbeat", UTCDateTime),
    Column("status_reason", Text),
    Column("inbox", String(255)),
)

outbox = Table(
    "outbox",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("topic", String(255), nullable=False),
    Column("key", String(255), nullable=False),
    Column("value", Text, nullable=False),
    Column("headers", Json, nullable=False),
    Column("available_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, server_default=func.now()),
    Index("ix_outbox_available", "available_at", "id"),
)

# What landed on a dead-letter topic and why, for the operator console (migration 0002).
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("topic", String(255), nullable=False),
    Column("key", String(255), nullable=False),
    Column("reason", Text, nullable=False),
    Column("failed_at", UTCDateTime, nullable=False),
    Column("message", Json, nullable=False),
    Column("request_id", String(64)),
    Column("recorded_at", UTCDateTime, server_default=func.now()),
    Index("ix_dead_letters_failed", "failed_at"),
)
