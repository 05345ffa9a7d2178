"""The dead_letters table, for the operator console.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from enginedge.adapters.store.tables import Json, UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("failed_at", UTCDateTime, nullable=False),
        sa.Column("message", Json, nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("recorded_at", UTCDateTime, server_default=sa.func.now()),
    )
    op.create_index("ix_dead_letters_failed", "dead_letters", ["failed_at"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_failed", table_name="dead_letters")
    op.drop_table("dead_letters")
