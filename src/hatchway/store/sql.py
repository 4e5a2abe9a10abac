"""``SqlStore``: the Store on SQLAlchemy 2 (SQLite embedded; PostgreSQL later).

The relay calls the store from worker threads (``asyncio.to_thread``), so the
engine is shared across threads. Writes take an in-process lock: SQLite has a
single writer anyway, and serialising them here turns lock contention into a
short wait instead of ``database is locked``. Password hashing runs outside
every transaction and lock, so slow argon2 checks never block other requests.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Delete,
    Dialect,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import URL, CursorResult, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import ColumnElement

from hatchway.auth import totp
from hatchway.auth.device import derive_device_key, new_device_secret, validate_device_id
from hatchway.auth.passwords import DUMMY_HASH, hash_password, needs_rehash, verify_password
from hatchway.auth.permissions import (
    GRANT_ROLES,
    ROLE_PERMISSIONS,
    Access,
    Grant,
    check_permission,
)
from hatchway.auth.policy import PasswordPolicy, parse_setting, policy_from_settings
from hatchway.auth.tokens import hash_token, new_api_token
from hatchway.errors import AlreadyExistsError, AuthenticationError, ConfigError, NotFoundError
from hatchway.store.audit import (
    GENESIS,
    AuditRecord,
    VerifyResult,
    canonical_details,
    format_time,
    record_hash,
)
from hatchway.store.base import (
    ROLES,
    TOKEN_SCOPES,
    WEB_SESSION_KINDS,
    ChannelRecord,
    DeviceRecord,
    TokenRecord,
    UserRecord,
    WebSessionRecord,
)

USER_NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
DB_FILE_NAME = "hatchway.db"

# Writing last_used_at on every API request would make each read a write.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def _now() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the backend stores.

    SQLite has no time zone type, so values are stored as naive UTC there and
    given back their tzinfo on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class _Base(DeclarativeBase):
    pass


class _Setting(_Base):
    """An operator's setting (``hatchway settings``): the password policy, so far."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class _Organisation(_Base):
    """A tenant: its users and devices see nothing of another organisation's."""

    __tablename__ = "organisations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # Every user of the organisation must log in with a second factor.
    require_totp: Mapped[bool] = mapped_column(Boolean, server_default=false())


class _Device(_Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    org_id: Mapped[int] = mapped_column(
        ForeignKey("organisations.id"), server_default="1", index=True
    )
    tags: Mapped[str] = mapped_column(String(512), server_default="")  # space-separated


class _User(_Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # organisation-wide (auth/permissions.py)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    org_id: Mapped[int] = mapped_column(
        ForeignKey("organisations.id"), server_default="1", index=True
    )
    superadmin: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # Set for the bootstrap admin: no token or session until the password is changed.
    must_change_password: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # Where the password is checked: "local" (password_hash) or "ldap" (the directory).
    source: Mapped[str] = mapped_column(String(16), server_default="local")
    org: Mapped[_Organisation] = relationship(lazy="joined")

    def record(self) -> UserRecord:
        return UserRecord(
            name=self.name,
            role=self.role,
            created_at=self.created_at,
            org=self.org.name,
            superadmin=self.superadmin,
            must_change_password=self.must_change_password,
            source=self.source,
        )


class _Team(_Base):
    """Users of one organisation that grants can name together."""

    __tablename__ = "teams"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_teams_org_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class _TeamMember(_Base):
    __tablename__ = "team_members"

    team_id: Mapped[int] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class _Role(_Base):
    """An organisation's custom role: a name for a set of permissions."""

    __tablename__ = "roles"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_roles_org_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    permissions: Mapped[str] = mapped_column(String(1024))  # space-separated
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class _Grant(_Base):
    """A role on one device, or on every device with a tag, for a user or a team."""

    __tablename__ = "grants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    team_id: Mapped[int | None] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(32))
    # A grant goes with its device: a device added later under the same id starts bare.
    device: Mapped[str | None] = mapped_column(
        ForeignKey("devices.device_id", ondelete="CASCADE"), index=True
    )
    tag: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class _ApiToken(_Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Space-separated ``TOKEN_SCOPES``: what this token may be used for.
    scopes: Mapped[str] = mapped_column(String(200), server_default="all")

    def record(self) -> TokenRecord:
        return TokenRecord(
            id=self.id,
            label=self.label,
            scopes=tuple(self.scopes.split()),
            created_at=self.created_at,
            expires_at=self.expires_at,
            last_used_at=self.last_used_at,
        )


class _WebSession(_Base):
    """Browser sessions and one-time grants, stored by the hash of their secret."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    device: Mapped[str | None] = mapped_column(String(63))
    service: Mapped[str | None] = mapped_column(String(32))
    # The hash of the relay session or API token this one derives from.
    parent_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    # Last use, for the idle timeout (``SqlStore.session_idle``); None: never touched.
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class _LoginState(_Base):
    """Failed logins in a row, and the lockout they caused (survives restarts)."""

    __tablename__ = "login_state"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    failures: Mapped[int] = mapped_column(Integer)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime())


class _Totp(_Base):
    """A user's second factor: the shared secret and the last time step used."""

    __tablename__ = "totp"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    secret: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean)
    last_step: Mapped[int] = mapped_column(BigInteger)


class _AuditEntry(_Base):
    """The append-only, hash-chained audit log (``store/audit.py``)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    device: Mapped[str | None] = mapped_column(String(63), index=True)
    source: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    org: Mapped[str | None] = mapped_column(String(63), index=True)

    def record(self) -> AuditRecord:
        return AuditRecord(
            id=self.id,
            at=self.at,
            kind=self.kind,
            actor=self.actor,
            device=self.device,
            source=self.source,
            details=json.loads(self.details),
            prev_hash=self.prev_hash,
            hash=self.hash,
            org=self.org,
        )


class _AuditAnchor(_Base):
    """Where the chain starts once old records were removed by retention."""

    __tablename__ = "audit_anchor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_id: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))


class _Channel(_Base):
    """Audit log: plain names, no foreign keys, so it outlives users and devices."""

    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(63))
    service: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    ended_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    bytes_down: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(64))


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets readers proceed while one thread writes.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _deleted(session: Session, statement: Delete) -> int:
    """Run a DELETE and say how many rows it removed."""
    result = cast("CursorResult[Any]", session.execute(statement))
    return int(result.rowcount)


def _validate_user_name(name: str) -> str:
    if USER_NAME_RE.fullmatch(name) is None:
        raise ConfigError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    return name


DEFAULT_ORG = "default"
ORG_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _tags(tags: tuple[str, ...]) -> str:
    for tag in tags:
        if not TAG_RE.fullmatch(tag):
            raise ConfigError(f"invalid tag {tag!r}: use a-z, 0-9, '-', '_' and '.'")
    return " ".join(sorted(set(tags)))


#: Web sessions end after this long unused (OWASP's guidance for sensitive systems).
DEFAULT_SESSION_IDLE = timedelta(minutes=15)
#: Wrong passwords in a row that lock an account, and for how long.
LOCKOUT_FAILURES = 10
LOCKOUT_TIME = timedelta(minutes=10)

_SESSION_PREFIX = {"relay": "hws_", "device": "hwd_", "grant": "hwg_"}
#: Audit records about the relay itself, in no organisation: for super-admins only.
RELAY_RECORDS = frozenset({"setting_changed"})
#: The password_hash of a user whose password is kept elsewhere (a directory): not an
#: argon2 hash, so nothing verifies against it.
_EXTERNAL_PASSWORD = "!external"


class SqlStore:
    """The Store protocol on a SQLAlchemy engine."""

    def __init__(self, url: str | URL, *, policy: PasswordPolicy | None = None) -> None:
        self._policy = policy  # None: the operator's settings, else the default
        #: Web sessions unused this long are over (grants excepted); None: no idle limit.
        self.session_idle: timedelta | None = DEFAULT_SESSION_IDLE
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False}
            if parsed.database in (None, "", ":memory:"):
                # One shared connection, or every thread would see its own empty database.
                kwargs["poolclass"] = StaticPool
        self._engine = create_engine(parsed, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self._engine, "connect", _sqlite_on_connect)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._write_lock = threading.Lock()
        from hatchway.store.migrate import upgrade

        upgrade(self._engine)

    @classmethod
    def open_data_dir(cls, data_dir: Path, *, policy: PasswordPolicy | None = None) -> SqlStore:
        """Open (creating if needed) the SQLite database in ``data_dir``, private to us."""
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700, parents=True)
            data_dir.chmod(0o700)  # mkdir's mode is filtered by the umask
        db_path = data_dir / DB_FILE_NAME
        # Create the file ourselves so it is never world-readable, even briefly;
        # SQLite gives the -wal and -shm files the same mode.
        fd = os.open(db_path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        db_path.chmod(0o600)
        return cls(URL.create("sqlite", database=str(db_path.resolve())), policy=policy)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self._engine.dispose()

    # Devices

    def add_device(
        self,
        device_id: str,
        *,
        actor: str = "cli",
        org: str = DEFAULT_ORG,
        tags: tuple[str, ...] = (),
    ) -> str:
        validate_device_id(device_id)
        tag_text = _tags(tags)
        secret = new_device_secret()
        with self._write() as session:
            if session.get(_Device, device_id) is not None:
                raise AlreadyExistsError(f"device {device_id!r} already exists")
            session.add(
                _Device(
                    device_id=device_id,
                    key=derive_device_key(secret),
                    created_at=_now(),
                    org_id=self._org(session, org).id,
                    tags=tag_text,
                )
            )
            self._append(
                session, "device_added", actor, device_id, None, {"org": org, "tags": tag_text}
            )
        return secret

    def set_device_tags(self, device_id: str, tags: tuple[str, ...], *, actor: str = "cli") -> None:
        tag_text = _tags(tags)
        with self._write() as session:
            device = session.get(_Device, device_id)
            if device is None:
                raise NotFoundError(f"no device {device_id!r}")
            device.tags = tag_text
            self._append(session, "device_tagged", actor, device_id, None, {"tags": tag_text})

    def device_info(self, device_id: str) -> tuple[str, tuple[str, ...]] | None:
        """(organisation, tags) of a device, or None if it does not exist."""
        query = (
            select(_Organisation.name, _Device.tags)
            .join(_Organisation, _Device.org_id == _Organisation.id)
            .where(_Device.device_id == device_id)
        )
        with self._read() as session:
            row = session.execute(query).one_or_none()
            return None if row is None else (row[0], tuple(row[1].split()))

    # Settings

    def settings(self) -> dict[str, str]:
        with self._read() as session:
            return {row.name: row.value for row in session.scalars(select(_Setting))}

    def set_setting(self, name: str, value: str, *, actor: str = "cli") -> None:
        """Change a setting: a ``password.*`` policy value (stored in lower case), or an
        ``ldap.*`` one (``auth/ldap.py``: checked on its own, stored as given; an empty
        value removes it). ``ConfigError`` for an unknown name or a bad value."""
        if name.startswith("ldap."):
            from hatchway.auth.ldap import check_setting  # ldap3 only when LDAP is used

            value = check_setting(name, value)
        else:
            try:
                parse_setting(name, value)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            value = value.lower()
        with self._write() as session:
            if name == "ldap.org" and value:
                known = session.scalars(select(_Organisation).where(_Organisation.name == value))
                if known.first() is None:
                    raise ConfigError(f"ldap.org: no organisation {value!r} (create it first)")
            row = session.get(_Setting, name)
            if not value:
                if row is not None:
                    session.delete(row)
            elif row is None:
                session.add(_Setting(name=name, value=value))
            else:
                row.value = value
            self._append(session, "setting_changed", actor, None, None, {name: value})

    def password_policy(self) -> PasswordPolicy:
        """The policy every new password must pass: the operator's settings on top of the
        strict default (a store opened with an explicit policy uses that)."""
        if self._policy is not None:
            return self._policy
        return policy_from_settings(self.settings())

    # Organisations

    @staticmethod
    def _org_name(session: Session, org_id: int) -> str | None:
        return session.scalar(select(_Organisation.name).where(_Organisation.id == org_id))

    @staticmethod
    def _org(session: Session, name: str) -> _Organisation:
        org = session.scalars(select(_Organisation).where(_Organisation.name == name)).first()
        if org is None:
            raise NotFoundError(f"no organisation {name!r}")
        return org

    def add_org(self, name: str, *, actor: str = "cli") -> None:
        if not ORG_NAME_RE.fullmatch(name):
            raise ConfigError(f"invalid organisation name {name!r}: use a-z, 0-9 and '-'")
        with self._write() as session:
            if session.scalars(select(_Organisation).where(_Organisation.name == name)).first():
                raise AlreadyExistsError(f"organisation {name!r} already exists")
            session.add(_Organisation(name=name, created_at=_now()))
            self._append(session, "org_added", actor, None, None, {"org": name})

    def set_org_require_totp(self, name: str, required: bool, *, actor: str = "cli") -> None:
        with self._write() as session:
            self._org(session, name).require_totp = required
            self._append(
                session, "org_changed", actor, None, None, {"org": name, "require_totp": required}
            )

    def totp_policy(self, user: str) -> tuple[bool, bool]:
        """(the user has two-factor login on, the user's organisation requires it)."""
        with self._read() as session:
            row = self._user(session, user)
            if row is None:
                return False, False
            totp_row = session.get(_Totp, row.id)
            return totp_row is not None and totp_row.enabled, row.org.require_totp

    def org_require_totp(self, name: str) -> bool:
        with self._read() as session:
            return bool(self._org(session, name).require_totp)

    def list_orgs(self) -> list[str]:
        with self._read() as session:
            return list(session.scalars(select(_Organisation.name).order_by(_Organisation.name)))

    def remove_org(self, name: str, *, actor: str = "cli") -> None:
        with self._write() as session:
            org = self._org(session, name)
            used = session.scalar(
                select(func.count()).select_from(_User).where(_User.org_id == org.id)
            ) or session.scalar(
                select(func.count()).select_from(_Device).where(_Device.org_id == org.id)
            )
            if used:
                raise ConfigError(f"organisation {name!r} still has users or devices")
            # Its teams (with their grants) and custom roles go with it.
            teams = select(_Team.id).where(_Team.org_id == org.id)
            session.execute(delete(_TeamMember).where(_TeamMember.team_id.in_(teams)))
            session.execute(delete(_Grant).where(_Grant.team_id.in_(teams)))
            session.execute(delete(_Team).where(_Team.org_id == org.id))
            session.execute(delete(_Role).where(_Role.org_id == org.id))
            session.delete(org)
            self._append(session, "org_removed", actor, None, None, {"org": name})

    # Teams and custom roles

    @staticmethod
    def _team(session: Session, org_id: int, name: str) -> _Team:
        team = session.scalars(
            select(_Team).where(_Team.org_id == org_id, _Team.name == name)
        ).first()
        if team is None:
            raise NotFoundError(f"no team {name!r} in that organisation")
        return team

    def add_team(self, name: str, *, org: str = DEFAULT_ORG, actor: str = "cli") -> None:
        if not ORG_NAME_RE.fullmatch(name):
            raise ConfigError(f"invalid team name {name!r}: use a-z, 0-9 and '-'")
        with self._write() as session:
            org_row = self._org(session, org)
            exists = session.scalars(
                select(_Team).where(_Team.org_id == org_row.id, _Team.name == name)
            ).first()
            if exists is not None:
                raise AlreadyExistsError(f"team {name!r} already exists in {org}")
            session.add(_Team(org_id=org_row.id, name=name, created_at=_now()))
            self._append(session, "team_added", actor, None, None, {"team": name, "org": org})

    def remove_team(self, name: str, *, org: str = DEFAULT_ORG, actor: str = "cli") -> None:
        with self._write() as session:
            team = self._team(session, self._org(session, org).id, name)
            session.execute(delete(_TeamMember).where(_TeamMember.team_id == team.id))
            session.execute(delete(_Grant).where(_Grant.team_id == team.id))
            session.delete(team)
            self._append(session, "team_removed", actor, None, None, {"team": name, "org": org})

    def set_team_member(
        self, team: str, user: str, member: bool = True, *, actor: str = "cli"
    ) -> None:
        """Add ``user`` to (or remove from) a team of the user's own organisation."""
        with self._write() as session:
            owner = self._user(session, user)
            if owner is None:
                raise NotFoundError(f"no user {user!r}")
            team_row = self._team(session, owner.org_id, team)
            session.execute(
                delete(_TeamMember).where(
                    _TeamMember.team_id == team_row.id, _TeamMember.user_id == owner.id
                )
            )
            if member:
                session.add(_TeamMember(team_id=team_row.id, user_id=owner.id))
            self._append(
                session,
                "team_member_added" if member else "team_member_removed",
                actor,
                None,
                None,
                {"team": team, "user": user},
            )

    def list_teams(self, org: str | None = None) -> list[tuple[str, str, list[str]]]:
        """(organisation, team, members) for every team."""
        query = (
            select(_Team, _Organisation.name)
            .join(_Organisation, _Team.org_id == _Organisation.id)
            .order_by(_Organisation.name, _Team.name)
        )
        if org is not None:
            query = query.where(_Organisation.name == org)
        with self._read() as session:
            out = []
            for team, org_name in session.execute(query).all():
                members = session.scalars(
                    select(_User.name)
                    .join(_TeamMember, _TeamMember.user_id == _User.id)
                    .where(_TeamMember.team_id == team.id)
                    .order_by(_User.name)
                )
                out.append((org_name, team.name, list(members)))
            return out

    def add_role(
        self,
        name: str,
        permissions: tuple[str, ...],
        *,
        org: str = DEFAULT_ORG,
        actor: str = "cli",
    ) -> None:
        if name in ROLE_PERMISSIONS or not ORG_NAME_RE.fullmatch(name) or len(name) > 32:
            raise ConfigError(f"invalid role name {name!r} (built-in names are taken)")
        try:
            text = " ".join(sorted({check_permission(p) for p in permissions}))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not text:
            raise ConfigError("a role needs at least one permission")
        with self._write() as session:
            org_row = self._org(session, org)
            exists = session.scalars(
                select(_Role).where(_Role.org_id == org_row.id, _Role.name == name)
            ).first()
            if exists is not None:
                raise AlreadyExistsError(f"role {name!r} already exists in {org}")
            session.add(_Role(org_id=org_row.id, name=name, permissions=text, created_at=_now()))
            self._append(
                session, "role_added", actor, None, None,
                {"role": name, "org": org, "permissions": text},
            )  # fmt: skip

    def remove_role(self, name: str, *, org: str = DEFAULT_ORG, actor: str = "cli") -> None:
        with self._write() as session:
            org_row = self._org(session, org)
            role = session.scalars(
                select(_Role).where(_Role.org_id == org_row.id, _Role.name == name)
            ).first()
            if role is None:
                raise NotFoundError(f"no role {name!r} in {org}")
            # Its grants go with it: a role created again under the name gives nothing
            # to those who held the old one.
            users = select(_User.id).where(_User.org_id == org_row.id)
            teams = select(_Team.id).where(_Team.org_id == org_row.id)
            grants = _deleted(
                session,
                delete(_Grant).where(
                    _Grant.role == name, _Grant.user_id.in_(users) | _Grant.team_id.in_(teams)
                ),
            )
            session.delete(role)
            self._append(
                session, "role_removed", actor, None, None,
                {"role": name, "org": org, "grants_removed": grants},
            )  # fmt: skip

    def list_roles(self, org: str = DEFAULT_ORG) -> dict[str, frozenset[str]]:
        """The organisation's custom roles (built-in ones: auth/permissions.py)."""
        with self._read() as session:
            return self._custom_roles(session, self._org(session, org).id)

    @staticmethod
    def _custom_roles(session: Session, org_id: int) -> dict[str, frozenset[str]]:
        roles = session.scalars(select(_Role).where(_Role.org_id == org_id))
        return {r.name: frozenset(r.permissions.split()) for r in roles}

    # Grants

    def add_grant(
        self,
        user: str | None,
        role: str,
        *,
        team: str | None = None,
        device: str | None = None,
        tag: str | None = None,
        org: str | None = None,
        actor: str = "cli",
    ) -> int:
        """Give a user, or every member of a team (of ``org``), a role on a device or
        on every device with a tag."""
        if (user is None) == (team is None):
            raise ConfigError("a grant is for one user or one team")
        if (device is None) == (tag is None):
            raise ConfigError("a grant is on one device or on one tag")
        if tag is not None:
            _tags((tag,))
        with self._write() as session:
            owner = self._user(session, user) if user is not None else None
            if user is not None and owner is None:
                raise NotFoundError(f"no user {user!r}")
            org_id = (
                owner.org_id if owner is not None else self._org(session, org or DEFAULT_ORG).id
            )
            team_row = self._team(session, org_id, team) if team is not None else None
            if role not in GRANT_ROLES and role not in self._custom_roles(session, org_id):
                raise ConfigError(
                    f"invalid role {role!r} for a grant: {', '.join(GRANT_ROLES)} or a custom "
                    "role of the organisation"
                )
            if device is not None:
                target = session.get(_Device, device)
                if target is None or target.org_id != org_id:
                    raise NotFoundError(f"no device {device!r} in that organisation")
            org_name = owner.org.name if owner is not None else self._org_name(session, org_id)
            grant = _Grant(
                user_id=owner.id if owner is not None else None,
                team_id=team_row.id if team_row is not None else None,
                role=role,
                device=device,
                tag=tag,
                created_at=_now(),
            )
            session.add(grant)
            session.flush()
            self._append(
                session, "grant_added", actor, device, None,
                {"id": grant.id, "user": user, "team": team, "role": role, "tag": tag,
                 "org": org_name},
            )  # fmt: skip
            return grant.id

    def list_grants(
        self,
        user: str | None = None,
        *,
        org: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[Grant]:
        """Every grant, or those that apply to ``user`` (their own and their teams'), or
        those of ``org``'s users and teams; in id order, paged with ``after``/``limit``."""
        query = (
            select(_Grant, _User.name, _Team.name)
            .outerjoin(_User, _Grant.user_id == _User.id)
            .outerjoin(_Team, _Grant.team_id == _Team.id)
            .where(_Grant.id > after)
            .order_by(_Grant.id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            if org is not None:
                org_id = self._org(session, org).id
                query = query.where((_User.org_id == org_id) | (_Team.org_id == org_id))
            if user is not None:
                owner = self._user(session, user)
                if owner is None:
                    return []
                teams = select(_TeamMember.team_id).where(_TeamMember.user_id == owner.id)
                query = query.where((_Grant.user_id == owner.id) | (_Grant.team_id.in_(teams)))
            return [
                Grant(g.id, user_name, g.role, g.device, g.tag, team_name)
                for g, user_name, team_name in session.execute(query)
            ]

    def remove_grant(self, grant_id: int, *, org: str | None = None, actor: str = "cli") -> None:
        """Remove a grant (with ``org``: only one of that organisation's)."""
        with self._write() as session:
            grant = session.get(_Grant, grant_id)
            org_id = None
            if grant is not None:
                owner = session.get(_User, grant.user_id) if grant.user_id else None
                team = session.get(_Team, grant.team_id) if grant.team_id else None
                org_id = owner.org_id if owner is not None else team.org_id if team else None
                if org is not None and org_id != self._org(session, org).id:
                    grant = None
            if grant is None:
                raise NotFoundError(f"no grant {grant_id}")
            session.delete(grant)
            org_name = None if org_id is None else self._org_name(session, org_id)
            self._append(
                session, "grant_removed", actor, grant.device, None, {"id": grant_id}, org_name
            )

    def access(self, user: str) -> Access | None:
        """Everything that decides what ``user`` may do (None: no such user)."""
        with self._read() as session:
            row = self._user(session, user)
            if row is None:
                return None
            org_name, org_id, superadmin, role = row.org.name, row.org_id, row.superadmin, row.role
        grants = self.list_grants(user)
        with self._read() as session:
            custom = self._custom_roles(session, org_id)
        return Access(
            user=user,
            org=org_name,
            role=role,
            superadmin=superadmin,
            grants=tuple(grants),
            custom_roles=custom,
        )

    def device_key(self, device_id: str) -> bytes | None:
        with self._read() as session:
            device = session.get(_Device, device_id)
            return None if device is None else device.key

    def list_devices(
        self, org: str | None = None, *, after: str | None = None, limit: int | None = None
    ) -> list[DeviceRecord]:
        """Devices in id order; ``after`` and ``limit`` page through large fleets."""
        query = (
            select(_Device, _Organisation.name)
            .join(_Organisation, _Device.org_id == _Organisation.id)
            .order_by(_Device.device_id)
        )
        if org is not None:
            query = query.where(_Organisation.name == org)
        if after is not None:
            query = query.where(_Device.device_id > after)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return [
                DeviceRecord(d.device_id, d.created_at, org_name, tuple(d.tags.split()))
                for d, org_name in session.execute(query)
            ]

    def remove_device(self, device_id: str, *, actor: str = "cli") -> None:
        """Remove a device and the grants on it (a device added later under the same id
        starts without them; the foreign key cascades too, this says how many)."""
        with self._write() as session:
            org = self._record_org(session, "device_removed", actor, device_id, None)
            grants = _deleted(session, delete(_Grant).where(_Grant.device == device_id))
            if _deleted(session, delete(_Device).where(_Device.device_id == device_id)) == 0:
                raise NotFoundError(f"no device {device_id!r}")
            self._append(
                session, "device_removed", actor, device_id, None, {"grants_removed": grants}, org
            )

    # Users

    def add_user(
        self,
        name: str,
        role: str,
        password: str,
        *,
        actor: str = "cli",
        org: str = DEFAULT_ORG,
        superadmin: bool = False,
        must_change_password: bool = False,
    ) -> UserRecord:
        _validate_user_name(name)
        if role not in ROLES:
            raise ConfigError(f"invalid role {role!r}: choose one of {', '.join(ROLES)}")
        self.password_policy().check(password, name)
        password_hash = hash_password(password)
        with self._write() as session:
            if self._user(session, name) is not None:
                raise AlreadyExistsError(f"user {name!r} already exists")
            org_row = self._org(session, org)
            user = _User(
                name=name,
                role=role,
                password_hash=password_hash,
                created_at=_now(),
                org_id=org_row.id,
                superadmin=superadmin,
                must_change_password=must_change_password,
                source="local",
            )
            user.org = org_row
            session.add(user)
            self._append(
                session,
                "user_added",
                actor,
                None,
                None,
                {"user": name, "role": role, "org": org, "superadmin": superadmin},
            )
            return user.record()

    def list_users(
        self, org: str | None = None, *, after: str | None = None, limit: int | None = None
    ) -> list[UserRecord]:
        """Users in name order; ``after`` and ``limit`` page through them."""
        query = select(_User).order_by(_User.name)
        if org is not None:
            query = query.join(_Organisation, _User.org_id == _Organisation.id).where(
                _Organisation.name == org
            )
        if after is not None:
            query = query.where(_User.name > after)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return [u.record() for u in session.scalars(query)]

    def remove_user(self, name: str, *, actor: str = "cli") -> None:
        with self._write() as session:
            user = self._user(session, name)
            if user is None:
                raise NotFoundError(f"no user {name!r}")
            # Explicit, so tokens and sessions go even on a connection without foreign_keys.
            session.execute(delete(_ApiToken).where(_ApiToken.user_id == user.id))
            session.execute(delete(_WebSession).where(_WebSession.user_id == user.id))
            org = user.org.name
            session.delete(user)
            self._append(session, "user_removed", actor, None, None, {"user": name}, org)

    def count_users(self) -> int:
        with self._read() as session:
            return session.scalar(select(func.count()).select_from(_User)) or 0

    def get_user(self, name: str) -> UserRecord | None:
        with self._read() as session:
            user = self._user(session, name)
            return None if user is None else user.record()

    def set_password(
        self,
        name: str,
        password: str,
        *,
        actor: str = "cli",
        current: str | None = None,
        keep: str | None = None,
    ) -> None:
        """Set a local user's password (clearing a forced change), and end every API token
        and web session of the user, which the old password opened.

        Without ``current`` it is a reset (an administrator, the offline CLI): all of
        them end. With ``current``, the user changes their own: it must be right (a wrong
        one counts towards the lockout like a failed login, and a locked account is
        refused whatever it sends), the new one must differ, and ``keep``, the token or
        relay session the change came with, stays with the web sessions made from it.
        """
        self.password_policy().check(password, name)
        if current is not None and current == password:
            raise ConfigError("the new password must differ from the current one")
        password_hash = hash_password(password)
        now = _now()
        with self._read() as session:
            user = self._user(session, name)
            if user is None:
                raise NotFoundError(f"no user {name!r}")
            stored, user_id = user.password_hash, user.id
            if user.source != "local":
                raise ConfigError(f"{name}'s password is kept by the directory ({user.source})")
            state = session.get(_LoginState, user_id)
            locked = (
                state is not None and state.locked_until is not None and (state.locked_until > now)
            )
        if current is not None:
            correct = verify_password(stored, current)
            if locked or not correct:
                if not locked:
                    self._login_failed(user_id, name)
                raise AuthenticationError("the current password is wrong")
        with self._write() as session:
            user = self._user(session, name)
            if user is None:
                raise NotFoundError(f"no user {name!r}")
            user.password_hash = password_hash
            user.must_change_password = False
            tokens, sessions = self._end_sessions(
                session, user.id, None if keep is None else hash_token(keep)
            )
            self._append(
                session, "password_changed", actor, None, None,
                {"user": name, "tokens_revoked": tokens, "sessions_ended": sessions},
            )  # fmt: skip

    @staticmethod
    def _end_sessions(session: Session, user_id: int, keep: str | None = None) -> tuple[int, int]:
        """Revoke a user's API tokens and end their web sessions (relay logins, one-time
        links, device sessions), but for ``keep`` (a token's or session's hash) and the
        sessions made from it: (tokens, sessions) ended."""
        tokens = delete(_ApiToken).where(_ApiToken.user_id == user_id)
        sessions = delete(_WebSession).where(_WebSession.user_id == user_id)
        if keep is not None:
            tokens = tokens.where(_ApiToken.token_hash != keep)
            sessions = sessions.where(
                _WebSession.session_hash != keep,
                _WebSession.parent_hash.is_(None) | (_WebSession.parent_hash != keep),
            )
        return _deleted(session, tokens), _deleted(session, sessions)

    def set_user_role(self, name: str, role: str, *, actor: str = "cli") -> None:
        if role not in ROLES:
            raise ConfigError(f"invalid role {role!r}: choose one of {', '.join(ROLES)}")
        with self._write() as session:
            user = self._user(session, name)
            if user is None:
                raise NotFoundError(f"no user {name!r}")
            user.role = role
            self._append(session, "user_changed", actor, None, None, {"user": name, "role": role})

    def authenticate_user(self, name: str, password: str) -> UserRecord | None:
        """The user if the password is right and the account not locked.

        ``LOCKOUT_FAILURES`` wrong passwords in a row lock the account for
        ``LOCKOUT_TIME`` (kept in the database, so a restart does not unlock it). A
        locked account answers exactly like a wrong password, after the same work. The
        right password resets the count, unless the user has two-factor login: then a
        right code does (``totp_check``), so wrong codes count towards the lockout too.
        Only local users: the password of a directory user (``source`` ldap) is checked
        by the directory (``RelayServer.authenticate_user``), never here.
        """
        now = _now()
        with self._read() as session:
            user = self._user(session, name)
            if user is None or user.source != "local":
                # Spend the same time as for a wrong password: no user enumeration.
                verify_password(DUMMY_HASH, password)
                return None
            record, stored_hash, user_id = user.record(), user.password_hash, user.id
            state = session.get(_LoginState, user_id)
            locked = (
                state is not None and state.locked_until is not None and (state.locked_until > now)
            )
            failures = state.failures if state is not None else 0
            second_factor = self._totp_enabled(session, user_id)
        correct = verify_password(stored_hash, password)
        if locked:
            return None
        if not correct:
            self._login_failed(user_id, name)
            return None
        if failures and not second_factor:
            with self._write() as session:
                session.execute(delete(_LoginState).where(_LoginState.user_id == user_id))
        if needs_rehash(stored_hash):
            new_hash = hash_password(password)
            with self._write() as session:
                # Only if nobody changed the password meanwhile.
                fresh = self._user(session, name)
                if fresh is not None and fresh.password_hash == stored_hash:
                    fresh.password_hash = new_hash
        return record

    def login_failed(self, name: str) -> None:
        """Count a failed login of ``name`` towards its lockout (nothing for an unknown
        name): for passwords checked elsewhere, such as by the directory."""
        with self._read() as session:
            user = self._user(session, name)
            user_id = None if user is None else user.id
        if user_id is not None:
            self._login_failed(user_id, name)

    def sync_external_user(
        self, name: str, role: str, org: str, *, source: str = "ldap", actor: str = "ldap"
    ) -> UserRecord | None:
        """A directory accepted ``name``'s password: create the user, or bring their role
        and organisation up to date, and clear their failed-login count.

        The directory decides, so a role or organisation changed by hand is set back. A
        user of another ``source`` (a local account) is never taken over: ``None``, and
        nothing changes. Moving to another organisation drops the user's grants and team
        memberships, which belong to the old one. The stored password hash is not a hash
        (``verify_password`` is False for it) and ``authenticate_user`` refuses such
        users anyway.
        """
        _validate_user_name(name)
        if role not in ROLES:
            raise ConfigError(f"invalid role {role!r}: choose one of {', '.join(ROLES)}")
        if source == "local":
            raise ConfigError("sync_external_user is for users whose password is kept elsewhere")
        with self._write() as session:
            org_row = self._org(session, org)
            user = self._user(session, name)
            if user is None:
                user = _User(
                    name=name,
                    role=role,
                    password_hash=_EXTERNAL_PASSWORD,
                    created_at=_now(),
                    org_id=org_row.id,
                    source=source,
                )
                user.org = org_row
                session.add(user)
                self._append(
                    session, "user_added", actor, None, None,
                    {"user": name, "role": role, "org": org, "superadmin": False, "source": source},
                )  # fmt: skip
                return user.record()
            if user.source != source:
                return None
            if not self._totp_enabled(session, user.id):  # else a right code resets it
                session.execute(delete(_LoginState).where(_LoginState.user_id == user.id))
            if (user.role, user.org_id) == (role, org_row.id):
                return user.record()
            details: dict[str, Any] = {"user": name, "role": role}
            if user.org_id != org_row.id:
                details["org"] = org
                details["grants_removed"] = _deleted(
                    session, delete(_Grant).where(_Grant.user_id == user.id)
                )
                details["teams_left"] = _deleted(
                    session, delete(_TeamMember).where(_TeamMember.user_id == user.id)
                )
                user.org_id, user.org = org_row.id, org_row
            user.role = role
            self._append(session, "user_changed", actor, None, None, details, org)
            return user.record()

    def _login_failed(self, user_id: int, name: str) -> None:
        now = _now()
        with self._write() as session:
            state = session.get(_LoginState, user_id)
            if state is None:
                state = _LoginState(user_id=user_id, failures=0, locked_until=None)
                session.add(state)
            if state.locked_until is not None and state.locked_until <= now:
                state.locked_until = None
            state.failures += 1
            if state.failures >= LOCKOUT_FAILURES:
                state.failures = 0
                state.locked_until = now + LOCKOUT_TIME
                self._append(
                    session,
                    "lockout",
                    name,
                    None,
                    None,
                    {"failures": LOCKOUT_FAILURES, "until": format_time(state.locked_until)},
                )

    # Two-factor (TOTP)

    def totp_begin(self, name: str) -> str:
        """A new secret for ``name``, not yet required: ``totp_confirm`` enables it."""
        secret = totp.new_secret()
        with self._write() as session:
            user = self._user(session, name)
            if user is None:
                raise NotFoundError(f"no user {name!r}")
            session.execute(delete(_Totp).where(_Totp.user_id == user.id))
            session.add(_Totp(user_id=user.id, secret=secret, enabled=False, last_step=0))
        return secret

    def totp_confirm(self, name: str, code: str, *, actor: str = "cli") -> bool:
        """Enable two-factor login once a code from the new secret checks out."""
        with self._write() as session:
            user = self._user(session, name)
            row = session.get(_Totp, user.id) if user is not None else None
            if user is None or row is None:
                return False
            step = totp.matching_step(row.secret, code)
            if step is None:
                return False
            row.enabled, row.last_step = True, step
            self._append(session, "totp_enabled", actor, None, None, {"user": name})
            return True

    def totp_disable(self, name: str, *, actor: str = "cli") -> None:
        with self._write() as session:
            user = self._user(session, name)
            if user is None:
                raise NotFoundError(f"no user {name!r}")
            session.execute(delete(_Totp).where(_Totp.user_id == user.id))
            self._append(session, "totp_disabled", actor, None, None, {"user": name})

    def totp_required(self, name: str) -> bool:
        with self._read() as session:
            user = self._user(session, name)
            row = session.get(_Totp, user.id) if user is not None else None
            return row is not None and row.enabled

    def totp_check(self, name: str, code: str) -> bool:
        """True for a valid code not used before; a wrong code counts as a failed login,
        and a right one ends the count (the right password alone does not reset it for a
        user with two-factor login)."""
        with self._write() as session:
            user = self._user(session, name)
            row = session.get(_Totp, user.id) if user is not None else None
            step = None if row is None else totp.matching_step(row.secret, code)
            if user is not None and row is not None and step is not None and step > row.last_step:
                row.last_step = step
                session.execute(delete(_LoginState).where(_LoginState.user_id == user.id))
                return True
        if user is not None:
            self._login_failed(user.id, name)
        return False

    def locked_until(self, name: str) -> datetime | None:
        """When the account's lockout ends, if it is locked now."""
        with self._read() as session:
            user = self._user(session, name)
            state = session.get(_LoginState, user.id) if user is not None else None
            if state is None or state.locked_until is None or state.locked_until <= _now():
                return None
            return state.locked_until

    def unlock(self, name: str, *, actor: str = "cli") -> None:
        with self._write() as session:
            user = self._user(session, name)
            if user is None:
                raise NotFoundError(f"no user {name!r}")
            session.execute(delete(_LoginState).where(_LoginState.user_id == user.id))
            self._append(session, "unlocked", actor, None, None, {"user": name})

    @staticmethod
    def _totp_enabled(session: Session, user_id: int) -> bool:
        row = session.get(_Totp, user_id)
        return row is not None and row.enabled

    @staticmethod
    def _user(session: Session, name: str) -> _User | None:
        return session.scalars(select(_User).where(_User.name == name)).one_or_none()

    # API tokens

    def create_token(
        self,
        user: str,
        label: str,
        ttl: timedelta | None,
        scopes: tuple[str, ...] = ("all",),
        *,
        actor: str | None = None,
    ) -> str:
        if ttl is not None and ttl <= timedelta(0):
            raise ConfigError("token lifetime must be positive")
        unknown = set(scopes) - set(TOKEN_SCOPES)
        if unknown or not scopes:
            raise ConfigError(
                f"unknown token scope {', '.join(sorted(unknown)) or '(none)'}: "
                f"choose from {', '.join(TOKEN_SCOPES)}"
            )
        token = new_api_token()
        now = _now()
        with self._write() as session:
            owner = self._user(session, user)
            if owner is None:
                raise NotFoundError(f"no user {user!r}")
            row = _ApiToken(
                user_id=owner.id,
                token_hash=hash_token(token),
                label=label,
                created_at=now,
                expires_at=None if ttl is None else now + ttl,
                scopes=" ".join(sorted(set(scopes))),
            )
            session.add(row)
            session.flush()
            self._append(
                session,
                "token_created",
                actor or user,
                None,
                None,
                {"user": user, "id": row.id, "label": label, "scopes": row.scopes},
            )
        return token

    def token_scopes(self, token: str) -> tuple[str, ...]:
        """The scopes of a token (empty if it is not a live token)."""
        with self._read() as session:
            row = session.scalars(
                select(_ApiToken).where(_ApiToken.token_hash == hash_token(token))
            ).one_or_none()
            if row is None or (row.expires_at is not None and row.expires_at <= _now()):
                return ()
            return tuple(row.scopes.split())

    def list_tokens(self, user: str) -> list[TokenRecord]:
        with self._read() as session:
            owner = self._user(session, user)
            if owner is None:
                raise NotFoundError(f"no user {user!r}")
            rows = session.scalars(
                select(_ApiToken).where(_ApiToken.user_id == owner.id).order_by(_ApiToken.id)
            )
            return [row.record() for row in rows]

    def revoke_token(self, user: str, token_id: int, *, actor: str | None = None) -> bool:
        """Revoke one of ``user``'s tokens (and the web sessions made with it)."""
        with self._write() as session:
            owner = self._user(session, user)
            row = session.get(_ApiToken, token_id)
            if owner is None or row is None or row.user_id != owner.id:
                return False
            session.execute(delete(_WebSession).where(_WebSession.parent_hash == row.token_hash))
            session.delete(row)
            self._append(
                session, "token_revoked", actor or user, None, None, {"user": user, "id": token_id}
            )
            return True

    def revoke_token_secret(self, token: str, *, actor: str) -> bool:
        """Revoke the token given in plain text (log out), and its web sessions."""
        token_hash = hash_token(token)
        with self._write() as session:
            row = session.scalars(
                select(_ApiToken).where(_ApiToken.token_hash == token_hash)
            ).one_or_none()
            if row is None:
                return False
            session.execute(delete(_WebSession).where(_WebSession.parent_hash == token_hash))
            session.delete(row)
            self._append(session, "token_revoked", actor, None, None, {"id": row.id})
            return True

    def user_for_token(self, token: str) -> UserRecord | None:
        now = _now()
        query = (
            select(_ApiToken, _User)
            .join(_User, _ApiToken.user_id == _User.id)
            .where(_ApiToken.token_hash == hash_token(token))
        )
        with self._read() as session:
            row = session.execute(query).one_or_none()
            if row is None:
                return None
            api_token, user = row
            if api_token.expires_at is not None and api_token.expires_at <= now:
                return None
            record, token_id, last_used = user.record(), api_token.id, api_token.last_used_at
        if last_used is None or now - last_used >= _LAST_USED_RESOLUTION:
            with self._write() as session:
                fresh = session.get(_ApiToken, token_id)
                if fresh is not None:
                    fresh.last_used_at = now
                    self._append(
                        session, "token_used", record.name, None, None, {"label": fresh.label}
                    )
        return record

    def revoke_tokens(self, user: str, *, actor: str = "cli") -> int:
        """Revoke every API token of ``user`` and end all their web sessions (relay
        logins and what was made from them or from a token); the number of tokens."""
        with self._write() as session:
            owner = self._user(session, user)
            if owner is None:
                raise NotFoundError(f"no user {user!r}")
            count, sessions = self._end_sessions(session, owner.id)
            self._append(
                session, "tokens_revoked", actor, None, None,
                {"user": user, "tokens": count, "sessions_ended": sessions},
            )  # fmt: skip
            return count

    # Web sessions

    def create_web_session(
        self,
        user: str,
        kind: str,
        ttl: timedelta,
        *,
        device: str | None = None,
        service: str | None = None,
        parent: str | None = None,
    ) -> str:
        return self._create_session(
            user, kind, ttl, device, service, None if parent is None else hash_token(parent)
        )

    def create_child_session(
        self, user: str, kind: str, ttl: timedelta, *, device: str, service: str, parent_id: str
    ) -> str:
        return self._create_session(user, kind, ttl, device, service, parent_id)

    def _create_session(
        self,
        user: str,
        kind: str,
        ttl: timedelta,
        device: str | None,
        service: str | None,
        parent_hash: str | None,
    ) -> str:
        if kind not in WEB_SESSION_KINDS:
            raise ConfigError(f"unknown session kind {kind!r}")
        if ttl <= timedelta(0):
            raise ConfigError("session lifetime must be positive")
        secret = new_api_token(_SESSION_PREFIX[kind])
        now = _now()
        with self._write() as session:
            owner = self._user(session, user)
            if owner is None:
                raise NotFoundError(f"no user {user!r}")
            session.execute(delete(_WebSession).where(_WebSession.expires_at <= now))
            session.add(
                _WebSession(
                    user_id=owner.id,
                    session_hash=hash_token(secret),
                    kind=kind,
                    device=device,
                    service=service,
                    parent_hash=parent_hash,
                    created_at=now,
                    expires_at=now + ttl,
                    last_seen_at=now,
                )
            )
        return secret

    def _live_sessions(
        self, session: Session, hashes: list[str], kind: str | None = None
    ) -> list[tuple[_WebSession, _User]]:
        now = _now()
        query = (
            select(_WebSession, _User)
            .join(_User, _WebSession.user_id == _User.id)
            .where(
                _WebSession.session_hash.in_(hashes),
                _WebSession.expires_at > now,
                self._not_idle(now),
            )
        )
        if kind is not None:
            query = query.where(_WebSession.kind == kind)
        rows = [(row[0], row[1]) for row in session.execute(query)]
        parents = {ws.parent_hash for ws, _ in rows if ws.parent_hash is not None}
        if not parents:
            return rows
        live = set(
            session.scalars(
                select(_WebSession.session_hash).where(
                    _WebSession.session_hash.in_(parents),
                    _WebSession.expires_at > now,
                    self._not_idle(now),
                )
            )
        )
        live.update(
            session.scalars(
                select(_ApiToken.token_hash).where(
                    _ApiToken.token_hash.in_(parents),
                    (_ApiToken.expires_at.is_(None)) | (_ApiToken.expires_at > now),
                )
            )
        )
        return [(ws, u) for ws, u in rows if ws.parent_hash is None or ws.parent_hash in live]

    def _not_idle(self, now: datetime) -> ColumnElement[bool]:
        if self.session_idle is None:
            return true()
        last = func.coalesce(_WebSession.last_seen_at, _WebSession.created_at)
        return or_(_WebSession.kind == "grant", last > now - self.session_idle)

    def touch_web_sessions(self, session_ids: list[str]) -> None:
        """Mark sessions (by hash) and the sessions they derive from as used now."""
        if not session_ids:
            return
        now = _now()
        with self._write() as session:
            parents = [
                p
                for p in session.scalars(
                    select(_WebSession.parent_hash).where(_WebSession.session_hash.in_(session_ids))
                )
                if p is not None
            ]
            session.execute(
                update(_WebSession)
                .where(_WebSession.session_hash.in_([*session_ids, *parents]))
                .values(last_seen_at=now)
            )

    @staticmethod
    def _session_record(ws: _WebSession, user: _User) -> WebSessionRecord:
        return WebSessionRecord(
            session_id=ws.session_hash,
            kind=ws.kind,
            user=user.record(),
            device=ws.device,
            service=ws.service,
            expires_at=ws.expires_at,
        )

    def web_session(self, secret: str, kind: str) -> WebSessionRecord | None:
        with self._read() as session:
            rows = self._live_sessions(session, [hash_token(secret)], kind)
            return self._session_record(*rows[0]) if rows else None

    def consume_grant(self, secret: str) -> tuple[WebSessionRecord, str | None] | None:
        with self._write() as session:
            rows = self._live_sessions(session, [hash_token(secret)], "grant")
            if not rows:
                return None
            ws, user = rows[0]
            record, parent = self._session_record(ws, user), ws.parent_hash
            if not _deleted(session, delete(_WebSession).where(_WebSession.id == ws.id)):
                return None  # used by a concurrent request
            return record, parent

    def live_web_sessions(self, session_ids: list[str]) -> dict[str, WebSessionRecord]:
        with self._read() as session:
            rows = self._live_sessions(session, session_ids)
            return {ws.session_hash: self._session_record(ws, u) for ws, u in rows}

    def revoke_web_session(self, secret: str) -> None:
        digest = hash_token(secret)
        with self._write() as session:
            session.execute(
                delete(_WebSession).where(
                    (_WebSession.session_hash == digest) | (_WebSession.parent_hash == digest)
                )
            )

    # Audit log

    def audit(
        self,
        kind: str,
        actor: str,
        *,
        device: str | None = None,
        source: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        with self._write() as session:
            self._append(session, kind, actor, device, source, details)

    @classmethod
    def _append(
        cls,
        session: Session,
        kind: str,
        actor: str,
        device: str | None,
        source: str | None,
        details: dict[str, Any] | None,
        org: str | None = None,
    ) -> None:
        """Append one record in the caller's (write) transaction, chained to the last."""
        if org is None:
            org = cls._record_org(session, kind, actor, device, details)
        last = session.execute(
            select(_AuditEntry.hash).order_by(_AuditEntry.id.desc()).limit(1)
        ).scalar_one_or_none()
        if last is None:
            anchor = session.get(_AuditAnchor, 1)
            last = anchor.prev_hash if anchor is not None else GENESIS
        at = _now()
        details_json = canonical_details(details)
        entry = _AuditEntry(
            at=at,
            kind=kind[:32],
            actor=actor[:64],
            device=device,
            source=None if source is None else source[:255],
            details=details_json,
            prev_hash=last,
            hash="",
            org=org,
        )
        session.add(entry)
        session.flush()  # assigns the id, which the hash covers
        entry.hash = record_hash(
            last, entry.id, at, entry.kind, entry.actor, device, entry.source, details_json, org
        )

    @classmethod
    def _record_org(
        cls,
        session: Session,
        kind: str,
        actor: str,
        device: str | None,
        details: dict[str, Any] | None,
    ) -> str | None:
        """The organisation a record is about: its device's, else the user's it names,
        else the organisation it names, else its actor's; None for the relay's own
        records (settings, unknown names), which only super-admins read.

        The actor comes last: a super-admin's change in another organisation belongs to
        that organisation, not to the super-admin's own."""
        if kind in RELAY_RECORDS:
            return None
        if device is not None:
            found = session.execute(
                select(_Organisation.name)
                .join(_Device, _Device.org_id == _Organisation.id)
                .where(_Device.device_id == device)
            ).scalar_one_or_none()
            if found is not None:
                return found
        details = details or {}
        name = details.get("user")
        user = cls._user(session, name) if isinstance(name, str) else None
        if user is not None:
            return user.org.name
        org = details.get("org")
        if isinstance(org, str):
            return org
        user = cls._user(session, actor)
        return None if user is None else user.org.name

    def audit_records(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        device: str | None = None,
        kind: str | None = None,
        org: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[AuditRecord]:
        """Records in chain order, filtered; page with ``after_id``. ``org``: only that
        organisation's records (what its auditors may read)."""
        query = select(_AuditEntry).where(_AuditEntry.id > after_id)
        if org is not None:
            query = query.where(_AuditEntry.org == org)
        if since is not None:
            query = query.where(_AuditEntry.at >= since)
        if until is not None:
            query = query.where(_AuditEntry.at < until)
        if actor is not None:
            query = query.where(_AuditEntry.actor == actor)
        if device is not None:
            query = query.where(_AuditEntry.device == device)
        if kind is not None:
            query = query.where(_AuditEntry.kind == kind)
        query = query.order_by(_AuditEntry.id).limit(limit)
        with self._read() as session:
            return [entry.record() for entry in session.scalars(query)]

    def audit_verify(self, batch: int = 5000) -> VerifyResult:
        """Recompute the whole chain from its anchor."""
        with self._read() as session:
            anchor = session.get(_AuditAnchor, 1)
            expected = anchor.prev_hash if anchor is not None else GENESIS
            next_id = anchor.first_id if anchor is not None else None
            count, last_id, after = 0, 0, 0
            while True:
                rows = session.scalars(
                    select(_AuditEntry).where(_AuditEntry.id > after).order_by(_AuditEntry.id)
                    .limit(batch)
                ).all()  # fmt: skip
                if not rows:
                    break
                for row in rows:
                    if next_id is not None and row.id != next_id and count == 0:
                        return VerifyResult(
                            False, count, last_id, expected,
                            f"the chain should start at record {next_id}, found {row.id}", row.id,
                        )  # fmt: skip
                    if row.prev_hash != expected:
                        return VerifyResult(
                            False, count, last_id, expected,
                            f"record {row.id} does not follow record {last_id or 'the anchor'} "
                            "(a record was removed or changed)", row.id,
                        )  # fmt: skip
                    actual = record_hash(
                        row.prev_hash, row.id, row.at, row.kind, row.actor, row.device,
                        row.source, row.details, row.org,
                    )  # fmt: skip
                    if actual != row.hash:
                        return VerifyResult(
                            False, count, last_id, expected,
                            f"record {row.id} was changed (its hash does not match)", row.id,
                        )  # fmt: skip
                    expected, last_id, count = row.hash, row.id, count + 1
                after = rows[-1].id
            return VerifyResult(True, count, last_id, expected)

    def audit_prune(self, before: datetime) -> int:
        """Retention: remove records older than ``before``, from the start of the chain."""
        with self._write() as session:
            last = session.execute(
                select(_AuditEntry.id, _AuditEntry.hash)
                .where(_AuditEntry.at < before)
                .order_by(_AuditEntry.id.desc())
                .limit(1)
            ).first()
            if last is None:
                return 0
            removed = _deleted(session, delete(_AuditEntry).where(_AuditEntry.id <= last.id))
            anchor = session.get(_AuditAnchor, 1)
            if anchor is None:
                session.add(_AuditAnchor(id=1, first_id=last.id + 1, prev_hash=last.hash))
            else:
                anchor.first_id, anchor.prev_hash = last.id + 1, last.hash
            return removed

    # Channel log

    def record_channel(self, rec: ChannelRecord) -> None:
        self.record_channels([rec])

    def record_channels(self, records: Sequence[ChannelRecord]) -> None:
        """Store finished channels, and their audit records, in one transaction: two
        multi-row inserts, whatever the number of channels."""
        if not records:
            return
        with self._write() as session:
            session.execute(
                insert(_Channel),
                [
                    {"user": r.user, "device": r.device, "service": r.service,
                     "source": r.source, "started_at": r.started_at, "ended_at": r.ended_at,
                     "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "outcome": r.outcome}
                    for r in records
                ],
            )  # fmt: skip
            entries = [
                ("channel", r.user, r.device, r.source,
                 {"service": r.service, "started_at": format_time(r.started_at),
                  "ended_at": format_time(r.ended_at), "bytes_up": r.bytes_up,
                  "bytes_down": r.bytes_down, "outcome": r.outcome}, r.org)
                for r in records
            ]  # fmt: skip
            self._append_many(session, entries)

    def _append_many(
        self,
        session: Session,
        entries: Sequence[tuple[str, str, str | None, str | None, dict[str, Any], str | None]],
    ) -> None:
        """Append records (kind, actor, device, source, details, org) in the caller's write
        transaction with one multi-row insert. The ids follow the last record's, and the
        hashes are computed here: the transaction holds the database's write lock (SQLite
        refuses to write from a snapshot another writer has moved past), so nothing can
        come in between. An empty log (a new one, or all pruned) takes the slow path."""
        last = session.execute(
            select(_AuditEntry.id, _AuditEntry.hash).order_by(_AuditEntry.id.desc()).limit(1)
        ).first()
        if last is None:
            for kind, actor, device, source, details, org in entries:
                self._append(session, kind, actor, device, source, details, org)
            return
        next_id, prev = last[0] + 1, last[1]
        rows = []
        for kind, actor, device, source, details, org in entries:
            if org is None:
                org = self._record_org(session, kind, actor, device, details)
            at = _now()
            details_json = canonical_details(details)
            kind, actor = kind[:32], actor[:64]
            source = None if source is None else source[:255]
            digest = record_hash(prev, next_id, at, kind, actor, device, source, details_json, org)
            rows.append(
                {"id": next_id, "at": at, "kind": kind, "actor": actor, "device": device,
                 "source": source, "details": details_json, "prev_hash": prev,
                 "hash": digest, "org": org}
            )  # fmt: skip
            next_id, prev = next_id + 1, digest
        session.execute(insert(_AuditEntry), rows)

    def recent_channels(self, limit: int = 100) -> list[ChannelRecord]:
        query = select(_Channel).order_by(_Channel.ended_at.desc(), _Channel.id.desc()).limit(limit)
        with self._read() as session:
            return [
                ChannelRecord(
                    user=c.user,
                    device=c.device,
                    service=c.service,
                    source=c.source,
                    started_at=c.started_at,
                    ended_at=c.ended_at,
                    bytes_up=c.bytes_up,
                    bytes_down=c.bytes_down,
                    outcome=c.outcome,
                )
                for c in session.scalars(query)
            ]
