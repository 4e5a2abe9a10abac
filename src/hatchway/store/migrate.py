"""Schema migrations (Alembic): every store opens its database at the newest schema.

``migrations/versions`` holds one revision per schema change; the models in ``sql.py``
must always equal the result of all of them (tests/test_migrations.py checks). A
database made before migrations existed (the tunnel core's tables, no
``alembic_version``) is stamped with revision 0001 first.
"""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

SCRIPT_LOCATION = "hatchway.store:migrations"
#: The revision of a database from before migrations (tunnel core 0.1.0).
PRE_MIGRATIONS = "0001"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        current = MigrationContext.configure(connection).get_current_revision()
        if current is None and inspect(connection).has_table("users"):
            command.stamp(config, PRE_MIGRATIONS)
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
