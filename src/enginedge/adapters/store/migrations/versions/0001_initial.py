"""The guide's tables (requests, request_results, workers) and the transactional outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from enginedge.adapters.store.tables import Json, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("task_type", sa.String(50), nullable=False),
        sa.Column("payload", Json, nullable=False),
        sa.Column("metadata", Json),
        sa.Column("status", sa.String(20), nullable=False, server_default="PENDING"),
        sa.Column("created_at", UTCDateTime, server_default=sa.func.now()),
        sa.Column("updated_at", UTCDateTime, server_default=sa.func.now()),
        sa.Column("worker_type", sa.String(50), nullable=False),
        sa.Column("worker_id", sa.String(64)),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="3"),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("correlation_id", sa.String(128)),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("api_key_hash", sa.String(16)),
        sa.Column("traceparent", sa.String(64)),
        sa.Column("deadline", UTCDateTime, nullable=False),
        sa.Column("dispatched_at", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
    )
    op.create_index("ix_requests_created", "requests", ["created_at", "id"])
    op.create_index("ix_requests_status_updated", "requests", ["status", "updated_at"])
    op.create_index("ix_requests_worker", "requests", ["worker_id"])
    op.create_index(
        "ux_requests_idempotency",
        "requests",
        ["api_key_hash", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_table(
        "request_results",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("request_id", sa.Uuid(), sa.ForeignKey("requests.id"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("result", Json),
        sa.Column("error", sa.Text()),
        sa.Column("processing_time", sa.Integer()),
        sa.Column("created_at", UTCDateTime, server_default=sa.func.now()),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("worker_id", sa.String(64)),
    )
    op.create_index("ux_request_results_request", "request_results", ["request_id"], unique=True)
    op.create_table(
        "workers",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("type", sa.String(50), nullable=False),
        sa.Column("endpoint", sa.String(255), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default="HEALTHY"),
        sa.Column("capabilities", Json),
        sa.Column("last_health_check", UTCDateTime),
        sa.Column("created_at", UTCDateTime, server_default=sa.func.now()),
        sa.Column("updated_at", UTCDateTime, server_default=sa.func.now()),
        sa.Column("capacity", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("active", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_heartbeat", UTCDateTime),
        sa.Column("status_reason", sa.Text()),
    )
    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("headers", Json, nullable=False),
        sa.Column("request_id", sa.Uuid()),
        sa.Column("attempt", sa.Integer()),
        sa.Column("available_at", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, server_default=sa.func.now()),
    )
    op.create_index("ix_outbox_available", "outbox", ["available_at", "id"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("workers")
    op.drop_index("ux_request_results_request", table_name="request_results")
    op.drop_table("request_results")
    op.drop_table("requests")
