"""The queue lives in the store: the scheduler's index, retry backoff, worker inboxes;
and each tenant's list of its own requests gets an index.

Dispatches no longer go through the outbox (the scheduler hands each one to the worker it
chose), so the outbox loses the columns that tied a message to a request attempt. Dispatches
the previous version left there went to a topic no worker reads any more: their requests go
back to the queue.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from enginedge.adapters.store.tables import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("dispatch_after", UTCDateTime))
    op.create_index(
        "ix_requests_queue",
        "requests",
        ["worker_type", "priority", "api_key_hash", "created_at"],
        postgresql_where=sa.text("status = 'PENDING'"),
        sqlite_where=sa.text("status = 'PENDING'"),
    )
    op.create_index("ix_requests_tenant_created", "requests", ["api_key_hash", "created_at", "id"])
    op.add_column("workers", sa.Column("inbox", sa.String(255)))
    op.execute("DELETE FROM outbox WHERE request_id IS NOT NULL")
    op.execute(
        "UPDATE requests SET status = 'PENDING', dispatched_at = NULL "
        "WHERE status = 'DISPATCHED' AND worker_id IS NULL"
    )
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("request_id")
        batch.drop_column("attempt")


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("request_id", sa.Uuid()))
        batch.add_column(sa.Column("attempt", sa.Integer()))
    op.drop_column("workers", "inbox")
    op.drop_index("ix_requests_tenant_created", table_name="requests")
    op.drop_index("ix_requests_queue", table_name="requests")
    op.drop_column("requests", "dispatch_after")
