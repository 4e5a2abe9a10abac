"""The organisation of each audit record (org-scoped audit reading), forced password
change (the bootstrap admin's), and where a user's password is checked (local or LDAP).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("org", sa.String(63), nullable=True))
        batch.create_index("ix_audit_log_org", ["org"])
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column(
                "must_change_password", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="local"))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("source")
        batch.drop_column("must_change_password")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_index("ix_audit_log_org")
        batch.drop_column("org")
