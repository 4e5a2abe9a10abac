"""Grants go with their device and their custom role.

A grant named its device by id only, so removing the device left the grant behind, and
a device added later under the same id (ids are global and reusable) was at once
reachable by the old grant's holder; the same held for grants of a removed custom role
and a role created again under its name. The grants that already point at a removed
device or a removed custom role are deleted here, and ``grants.device`` becomes a
foreign key that cascades, so the database removes a device's grants with it.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: The built-in roles a grant may name (auth/permissions.py GRANT_ROLES when written).
BUILTIN_GRANT_ROLES = ("admin", "operator", "viewer")


def upgrade() -> None:
    op.execute(
        "DELETE FROM grants WHERE device IS NOT NULL "
        "AND device NOT IN (SELECT device_id FROM devices)"
    )
    builtin = ", ".join(f"'{role}'" for role in BUILTIN_GRANT_ROLES)
    op.execute(
        f"DELETE FROM grants WHERE role NOT IN ({builtin}) AND NOT EXISTS ("
        "SELECT 1 FROM roles WHERE roles.name = grants.role AND roles.org_id = COALESCE("
        "(SELECT org_id FROM users WHERE users.id = grants.user_id), "
        "(SELECT org_id FROM teams WHERE teams.id = grants.team_id)))"
    )
    with op.batch_alter_table("grants") as batch:
        batch.create_foreign_key(
            "fk_grants_device", "devices", ["device"], ["device_id"], ondelete="CASCADE"
        )
        batch.create_index("ix_grants_device", ["device"])


def downgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.drop_index("ix_grants_device")
        batch.drop_constraint("fk_grants_device", type_="foreignkey")
