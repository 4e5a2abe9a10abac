"""Schema migrations (Alembic): every store opens its database at the newest schema.

``migrations/versions`` holds one revision per schema change; the models in ``sql.py``
must always equal the result of all of them (tests/test_migrations.py checks). A
database made before migrations existed (the tunnel core's tables, no
``alembic_version``) is stamped with revision 0001 first.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, inspect

# Alembic logs each plugin and revision at INFO, from its import on: not for operators.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402

SCRIPT_LOCATION = "hatchway.store:migrations"
#: The revision of a database from before migrations (tunnel core 0.1.0).
PRE_MIGRATIONS = "0001"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # SQLite changes a table by copying it: the old one is dropped while other
            # tables still point at it. Foreign keys are checked once, at the end.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # (the pragma only works outside a transaction)
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                current = MigrationContext.configure(connection).get_current_revision()
                if current is None and inspect(connection).has_table("users"):
                    command.stamp(config, PRE_MIGRATIONS)
                command.upgrade(config, revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
