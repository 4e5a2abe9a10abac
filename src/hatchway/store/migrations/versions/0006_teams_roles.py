"""Teams, custom roles, and grants for teams.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.UniqueConstraint("org_id", "name", name="uq_teams_org_name"),
    )
    op.create_index("ix_teams_org_id", "teams", ["org_id"])
    op.create_table(
        "team_members",
        sa.Column(
            "team_id",
            sa.Integer,
            sa.ForeignKey("teams.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index("ix_team_members_user_id", "team_members", ["user_id"])
    op.create_table(
        "roles",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("permissions", sa.String(1024), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.UniqueConstraint("org_id", "name", name="uq_roles_org_name"),
    )
    op.create_index("ix_roles_org_id", "roles", ["org_id"])
    with op.batch_alter_table("grants") as batch:
        batch.alter_column("user_id", existing_type=sa.Integer, nullable=True)
        batch.alter_column("role", existing_type=sa.String(16), type_=sa.String(32))
        batch.add_column(sa.Column("team_id", sa.Integer, nullable=True))
        batch.create_foreign_key(
            "fk_grants_team_id", "teams", ["team_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_index("ix_grants_team_id", ["team_id"])


def downgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.drop_index("ix_grants_team_id")
        batch.drop_column("team_id")
    op.drop_table("roles")
    op.drop_table("team_members")
    op.drop_table("teams")
