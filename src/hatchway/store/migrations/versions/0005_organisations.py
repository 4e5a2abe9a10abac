"""Organisations, device tags and grants; users get an organisation and a super-admin flag.

Everything that exists goes into the organisation "default" (id 1), where the existing
admins stay admins: nobody gains or loses access.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    organisations = op.create_table(
        "organisations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
    )
    op.bulk_insert(
        organisations,
        [{"id": 1, "name": "default", "created_at": datetime.now(UTC).replace(tzinfo=None)}],
    )
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("org_id", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(
            sa.Column("superadmin", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.create_foreign_key("fk_users_org_id", "organisations", ["org_id"], ["id"])
        batch.create_index("ix_users_org_id", ["org_id"])
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("org_id", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("tags", sa.String(512), nullable=False, server_default=""))
        batch.create_foreign_key("fk_devices_org_id", "organisations", ["org_id"], ["id"])
        batch.create_index("ix_devices_org_id", ["org_id"])
    op.create_table(
        "grants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("device", sa.String(63), nullable=True),
        sa.Column("tag", sa.String(64), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
    )
    op.create_index("ix_grants_user_id", "grants", ["user_id"])


def downgrade() -> None:
    op.drop_table("grants")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("tags")
        batch.drop_column("org_id")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("superadmin")
        batch.drop_column("org_id")
    op.drop_table("organisations")
