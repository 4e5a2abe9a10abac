"""The relay's cache of web sessions: one read of the store per session at a time."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from hatchway.store.base import WebSessionRecord
from hatchway.store.sql import SqlStore
from hatchway.web.access import WebAccess
from tests.test_store import LENIENT


class CountingStore:
    """A real store whose session reads are counted and take a while (a busy disk)."""

    def __init__(self, store: SqlStore, delay: float) -> None:
        self.store = store
        self.delay = delay
        self.reads = 0
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None  # the next read waits for it once done

    def web_session(self, secret: str, kind: str) -> WebSessionRecord | None:
        with self.lock:
            self.reads += 1
            gate, self.gate = self.gate, None  # only the first read waits
        time.sleep(self.delay)
        record = self.store.web_session(secret, kind)
        if gate is not None:
            gate.wait(10)  # read, but not back yet
        return record

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    store = SqlStore.open_data_dir(tmp_path / "data", policy=LENIENT)
    store.add_user("alice", "admin", "pw-alice")
    store.add_device("dev1")
    yield store
    store.close()


def access_for(store: CountingStore) -> WebAccess:
    tasks: set[asyncio.Task[object]] = set()
    server = types.SimpleNamespace(
        config=types.SimpleNamespace(domain="relay.localhost"),
        store=store,
        track=tasks.add,
    )
    return WebAccess(server)  # type: ignore[arg-type]


async def test_connections_opened_at_once_share_one_read(store: SqlStore) -> None:
    secret = store.create_web_session(
        "alice", "device", timedelta(hours=1), device="dev1", service="http"
    )
    counting = CountingStore(store, delay=0.05)
    access = access_for(counting)
    records = await asyncio.gather(*(access.load(secret, "device") for _ in range(30)))
    assert counting.reads == 1
    assert all(r is not None and r.device == "dev1" for r in records)
    assert access.cached(secret, "device") == (True, records[0])
    assert await access.load("hwd_unknown", "device") is None
    assert counting.reads == 2  # another secret: a read of its own


async def test_a_caller_that_gives_up_leaves_the_read_to_the_others(store: SqlStore) -> None:
    secret = store.create_web_session(
        "alice", "device", timedelta(hours=1), device="dev1", service="http"
    )
    counting = CountingStore(store, delay=0.05)
    access = access_for(counting)
    first = asyncio.ensure_future(access.load(secret, "device"))
    second = asyncio.ensure_future(access.load(secret, "device"))
    await asyncio.sleep(0.01)
    first.cancel()
    record = await second
    assert record is not None and counting.reads == 1


async def test_a_read_begun_before_sessions_ended_is_made_again(store: SqlStore) -> None:
    secret = store.create_web_session(
        "alice", "device", timedelta(hours=1), device="dev1", service="http"
    )
    counting = CountingStore(store, delay=0)
    gate = counting.gate = threading.Event()
    access = access_for(counting)
    loading = asyncio.ensure_future(access.load(secret, "device"))
    await asyncio.sleep(0.05)  # the session was read (live) and waits at the gate
    store.revoke_web_session(secret)
    await access.sessions_ended()
    gate.set()
    assert await loading is None  # read again after the logout: gone
    assert counting.reads == 2
    assert access.cached(secret, "device") == (True, None)
