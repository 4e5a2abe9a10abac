"""Schema migrations: the models equal the migrations, and old databases are upgraded."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from hatchway.store.migrate import current_revision, upgrade
from hatchway.store.sql import DB_FILE_NAME, SqlStore, _Base


def test_models_equal_the_migrations(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db'}")
    upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), _Base.metadata)
    assert diff == [], "a model changed without a migration (alembic revision --autogenerate)"
    engine.dispose()


def test_a_database_from_before_migrations_is_upgraded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    engine = create_engine(f"sqlite:///{data / DB_FILE_NAME}")
    upgrade(engine, "0001")  # the tunnel core's tables, as 0.1.0 made them...
    created = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))  # ...without Alembic
        connection.execute(
            text(
                "INSERT INTO users (name, role, password_hash, created_at) "
                "VALUES ('old-admin', 'admin', 'x', :created)"
            ),
            {"created": created},
        )
        # Rows that point at users: tables are copied under them during the upgrade.
        connection.execute(
            text(
                "INSERT INTO api_tokens (user_id, token_hash, label, created_at) "
                "VALUES (1, :hash, 'cli', :created)"
            ),
            {"hash": "a" * 64, "created": created},
        )
    engine.dispose()
    store = SqlStore.open_data_dir(data)
    assert [u.name for u in store.list_users()] == ["old-admin"]
    assert [t.label for t in store.list_tokens("old-admin")] == ["cli"]
    assert store.list_users()[0].org == "default"
    assert current_revision(store._engine) == "0010"
    assert inspect(store._engine).has_table("audit_log")
    store.add_device("dev1")
    assert store.audit_verify().ok
    store.close()
    # Opening again changes nothing.
    store = SqlStore.open_data_dir(data)
    assert [d.device_id for d in store.list_devices()] == ["dev1"]
    store.close()


def test_grants_left_by_a_removed_device_or_custom_role_are_deleted(tmp_path: Path) -> None:
    """Before 0010 removing a device or a custom role left its grants, which came back
    with a device or role created again under the name: the upgrade deletes them."""
    data = tmp_path / "data"
    data.mkdir()
    engine = create_engine(f"sqlite:///{data / DB_FILE_NAME}")
    upgrade(engine, "0009")
    now = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO organisations (id, name, created_at) VALUES (2, 'globex', :now)"),
            {"now": now},
        )
        for org_id, name in ((1, "ann"), (2, "gus")):
            connection.execute(
                text(
                    "INSERT INTO users (id, name, role, password_hash, created_at, org_id) "
                    "VALUES (:id, :name, 'user', 'x', :now, :id)"
                ),
                {"id": org_id, "name": name, "now": now},
            )
        connection.execute(
            text("INSERT INTO devices (device_id, key, created_at) VALUES ('cam1', :k, :now)"),
            {"k": b"k" * 32, "now": now},
        )
        connection.execute(
            text(
                "INSERT INTO roles (org_id, name, permissions, created_at) "
                "VALUES (1, 'look', 'devices.view', :now)"
            ),
            {"now": now},
        )
        for grant_id, user_id, role, device in (
            (1, 1, "viewer", "cam1"),  # kept
            (2, 1, "operator", "gone1"),  # its device was removed
            (3, 1, "look", "cam1"),  # acme's custom role: kept
            (4, 2, "look", None),  # globex has no role "look"
            (5, 1, "removed-role", None),  # its role was removed
        ):
            connection.execute(
                text(
                    "INSERT INTO grants (id, user_id, role, device, tag, created_at) "
                    "VALUES (:id, :user, :role, :device, :tag, :now)"
                ),
                {"id": grant_id, "user": user_id, "role": role, "device": device,
                 "tag": None if device else "plant1", "now": now},
            )  # fmt: skip
    engine.dispose()
    store = SqlStore.open_data_dir(data)
    assert [g.id for g in store.list_grants()] == [1, 3]
    store.remove_device("cam1")  # the foreign key and remove_device take its grants
    assert store.list_grants() == []
    store.close()
