"""SqlStore against a real SQLite file."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import StatementError

from hatchway.auth.device import derive_device_key, device_proof, new_nonce, verify_device_proof
from hatchway.auth.policy import PasswordPolicy
from hatchway.errors import AlreadyExistsError, ConfigError, NotFoundError
from hatchway.store.base import ChannelRecord, Store
from hatchway.store.sql import SqlStore, _ApiToken

LENIENT = PasswordPolicy(
    min_length=1,
    require_upper=False,
    require_lower=False,
    require_digit=False,
    require_special=False,
    reject_common=False,
    reject_user_name=False,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    # Store behaviour, not the password policy (tests/test_policy.py): any password goes.
    store = SqlStore.open_data_dir(tmp_path / "data", policy=LENIENT)
    yield store
    store.close()


def test_satisfies_store_protocol(store: SqlStore) -> None:
    as_protocol: Store = store
    assert as_protocol.count_users() == 0


def test_data_dir_and_file_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    store = SqlStore.open_data_dir(data_dir)
    store.close()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "hatchway.db").stat().st_mode) == 0o600


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = SqlStore.open_data_dir(tmp_path)
    store.add_device("dev1")
    assert (tmp_path / "hatchway.db-wal").exists()
    store.close()


def test_add_device_returns_secret_and_stores_only_key(store: SqlStore, tmp_path: Path) -> None:
    secret = store.add_device("dev1")
    key = store.device_key("dev1")
    assert key == derive_device_key(secret)
    assert secret.encode() not in (tmp_path / "data" / "hatchway.db").read_bytes()
    nonce = new_nonce()
    assert verify_device_proof(
        key, "dev1", nonce, device_proof(derive_device_key(secret), "dev1", nonce)
    )


def test_add_device_rejects_duplicates_and_bad_ids(store: SqlStore) -> None:
    store.add_device("dev1")
    with pytest.raises(AlreadyExistsError):
        store.add_device("dev1")
    with pytest.raises(ConfigError):
        store.add_device("Bad_Id")
    assert [d.device_id for d in store.list_devices()] == ["dev1"]


def test_device_key_unknown(store: SqlStore) -> None:
    assert store.device_key("nope") is None


def test_list_devices_sorted_with_aware_timestamps(store: SqlStore) -> None:
    before = datetime.now(UTC)
    for device_id in ["zeta", "alpha", "mid"]:
        store.add_device(device_id)
    devices = store.list_devices()
    assert [d.device_id for d in devices] == ["alpha", "mid", "zeta"]
    for device in devices:
        assert device.created_at.tzinfo is not None
        assert device.created_at.utcoffset() == timedelta(0)
        assert before <= device.created_at <= datetime.now(UTC)


def test_remove_device(store: SqlStore) -> None:
    store.add_device("dev1")
    store.remove_device("dev1")
    assert store.device_key("dev1") is None
    assert store.list_devices() == []
    with pytest.raises(NotFoundError):
        store.remove_device("dev1")


def test_add_and_list_users(store: SqlStore) -> None:
    alice = store.add_user("alice", "admin", "pw-alice")
    store.add_user("bob@example.com", "user", "pw-bob")
    assert alice.name == "alice"
    assert alice.role == "admin"
    assert alice.created_at.tzinfo is not None
    assert [(u.name, u.role) for u in store.list_users()] == [
        ("alice", "admin"),
        ("bob@example.com", "user"),
    ]
    assert store.count_users() == 2


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "ève", "a/b", "a\n"])
def test_add_user_rejects_bad_names(store: SqlStore, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid user name"):
        store.add_user(name, "user", "pw")


def test_add_user_rejects_bad_role_and_duplicates(store: SqlStore) -> None:
    with pytest.raises(ConfigError, match="invalid role"):
        store.add_user("alice", "root", "pw")
    store.add_user("alice", "user", "pw")
    with pytest.raises(AlreadyExistsError):
        store.add_user("alice", "admin", "pw")


def test_authenticate_user(store: SqlStore) -> None:
    store.add_user("alice", "admin", "s3cret")
    user = store.authenticate_user("alice", "s3cret")
    assert user is not None
    assert (user.name, user.role) == ("alice", "admin")
    assert store.authenticate_user("alice", "wrong") is None
    assert store.authenticate_user("nobody", "s3cret") is None


def test_unknown_user_costs_a_hash(store: SqlStore) -> None:
    store.add_user("alice", "user", "pw")
    start = time.perf_counter()
    store.authenticate_user("alice", "wrong")
    known = time.perf_counter() - start
    start = time.perf_counter()
    store.authenticate_user("nobody", "wrong")
    unknown = time.perf_counter() - start
    assert unknown > known / 4  # both ran argon2, not one lookup alone


def test_authenticate_rehashes_weak_hash(store: SqlStore, tmp_path: Path) -> None:
    from argon2 import PasswordHasher

    store.add_user("alice", "user", "pw")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    with store._write() as session:  # simulate a hash made with older parameters
        user = store._user(session, "alice")
        assert user is not None
        user.password_hash = weak
    assert store.authenticate_user("alice", "pw") is not None
    with store._read() as session:
        user = store._user(session, "alice")
        assert user is not None
        assert user.password_hash != weak
        assert user.password_hash.startswith("$argon2id$")
    assert store.authenticate_user("alice", "pw") is not None


def test_set_password(store: SqlStore) -> None:
    store.add_user("alice", "user", "old")
    store.set_password("alice", "new")
    assert store.authenticate_user("alice", "old") is None
    assert store.authenticate_user("alice", "new") is not None
    with pytest.raises(NotFoundError):
        store.set_password("nobody", "pw")


def test_remove_user(store: SqlStore) -> None:
    store.add_user("alice", "user", "pw")
    store.remove_user("alice")
    assert store.list_users() == []
    assert store.count_users() == 0
    assert store.authenticate_user("alice", "pw") is None
    with pytest.raises(NotFoundError):
        store.remove_user("alice")


def test_token_round_trip(store: SqlStore) -> None:
    store.add_user("alice", "admin", "pw")
    token = store.create_token("alice", "laptop", None)
    assert token.startswith("hwt_")
    user = store.user_for_token(token)
    assert user is not None
    assert user.name == "alice"
    assert store.user_for_token(token + "x") is None
    assert store.user_for_token("") is None


def test_token_stored_hashed(store: SqlStore, tmp_path: Path) -> None:
    store.add_user("alice", "admin", "pw")
    token = store.create_token("alice", "laptop", None)
    store.close()
    data = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir())
    assert token.encode() not in data


def test_token_updates_last_used(store: SqlStore) -> None:
    store.add_user("alice", "admin", "pw")
    token = store.create_token("alice", "laptop", None)
    with store._read() as session:
        assert session.scalars(select(_ApiToken)).one().last_used_at is None
    store.user_for_token(token)
    with store._read() as session:
        last_used = session.scalars(select(_ApiToken)).one().last_used_at
    assert last_used is not None
    assert last_used.tzinfo is not None


def test_token_expiry(store: SqlStore) -> None:
    store.add_user("alice", "admin", "pw")
    token = store.create_token("alice", "short", timedelta(milliseconds=200))
    assert store.user_for_token(token) is not None
    time.sleep(0.3)
    assert store.user_for_token(token) is None


def test_token_ttl_must_be_positive(store: SqlStore) -> None:
    store.add_user("alice", "admin", "pw")
    with pytest.raises(ConfigError):
        store.create_token("alice", "bad", timedelta(0))


def test_token_for_unknown_user(store: SqlStore) -> None:
    with pytest.raises(NotFoundError):
        store.create_token("nobody", "x", None)


def test_removed_users_token_is_invalid(store: SqlStore) -> None:
    store.add_user("alice", "admin", "pw")
    token = store.create_token("alice", "laptop", None)
    store.remove_user("alice")
    assert store.user_for_token(token) is None
    # A new user of the same name does not inherit the old token.
    store.add_user("alice", "user", "pw")
    assert store.user_for_token(token) is None


def test_revoke_tokens(store: SqlStore) -> None:
    store.add_user("alice", "admin", "pw")
    store.add_user("bob", "user", "pw")
    alice_tokens = [store.create_token("alice", f"t{i}", None) for i in range(3)]
    bob_token = store.create_token("bob", "t", None)
    assert store.revoke_tokens("alice") == 3
    assert all(store.user_for_token(t) is None for t in alice_tokens)
    assert store.user_for_token(bob_token) is not None
    assert store.revoke_tokens("alice") == 0
    with pytest.raises(NotFoundError):
        store.revoke_tokens("nobody")


def _channel(n: int, ended: datetime) -> ChannelRecord:
    return ChannelRecord(
        user="alice",
        device="dev1",
        service=f"tcp:{n}",
        source="203.0.113.7",
        started_at=ended - timedelta(seconds=5),
        ended_at=ended,
        bytes_up=n,
        bytes_down=2**40 + n,  # beyond 32 bits
        outcome="closed",
    )


def test_channels_newest_first(store: SqlStore) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    records = [_channel(n, base + timedelta(minutes=n)) for n in range(5)]
    for record in records:
        store.record_channel(record)
    assert store.recent_channels() == records[::-1]
    assert store.recent_channels(limit=2) == [records[4], records[3]]


def test_persisted_across_reopen(tmp_path: Path) -> None:
    store = SqlStore.open_data_dir(tmp_path, policy=LENIENT)
    secret = store.add_device("dev1")
    store.add_user("alice", "admin", "pw")
    token = store.create_token("alice", "laptop", timedelta(days=1))
    record = _channel(1, datetime.now(UTC))
    store.record_channel(record)
    store.close()

    store = SqlStore.open_data_dir(tmp_path)
    try:
        assert store.device_key("dev1") == derive_device_key(secret)
        assert store.authenticate_user("alice", "pw") is not None
        user = store.user_for_token(token)
        assert user is not None
        assert user.name == "alice"
        assert store.recent_channels() == [record]
    finally:
        store.close()


def test_in_memory_url_shared_across_threads() -> None:
    store = SqlStore("sqlite://", policy=LENIENT)
    try:
        store.add_device("dev1")
        seen: list[bytes | None] = []
        thread = threading.Thread(target=lambda: seen.append(store.device_key("dev1")))
        thread.start()
        thread.join()
        assert seen[0] is not None
    finally:
        store.close()


def test_concurrent_writes_from_threads(store: SqlStore) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                store.add_device(f"dev-{n}-{i}")
                store.device_key(f"dev-{n}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list_devices()) == 80


def test_naive_datetimes_are_refused(store: SqlStore) -> None:
    naive = _channel(1, datetime(2025, 1, 1))
    with pytest.raises(StatementError, match="naive datetime"):
        store.record_channel(naive)
