"""Device challenge-response, device ids, passwords, API tokens, and constant-time checks."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hatchway.agent.config import AgentConfig
from hatchway.agent.runner import Agent
from hatchway.auth import device as device_module
from hatchway.auth import totp as totp_module
from hatchway.auth.device import (
    DEVICE_ID_RE,
    derive_device_key,
    device_proof,
    new_device_secret,
    new_nonce,
    validate_device_id,
    verify_device_proof,
)
from hatchway.auth.passwords import (
    DUMMY_HASH,
    hash_password,
    needs_rehash,
    new_password,
    verify_password,
)
from hatchway.auth.tokens import hash_token, new_api_token
from hatchway.errors import ConfigError
from hatchway.relay.server import RelayConfig, RelayServer
from hatchway.tunnel.connect import ConnectError
from tests.procs import free_port


def test_proof_round_trip() -> None:
    key = derive_device_key(new_device_secret())
    nonce = new_nonce()
    proof = device_proof(key, "dev1", nonce)
    assert len(nonce) == 32
    assert len(proof) == 32
    assert verify_device_proof(key, "dev1", nonce, proof)


def test_key_is_derived_deterministically_and_differs_from_secret() -> None:
    secret = new_device_secret()
    assert derive_device_key(secret) == derive_device_key(secret)
    assert derive_device_key(secret) != secret.encode()
    assert derive_device_key(secret) != derive_device_key(new_device_secret())


def test_wrong_key_fails() -> None:
    nonce = new_nonce()
    proof = device_proof(derive_device_key(new_device_secret()), "dev1", nonce)
    assert not verify_device_proof(derive_device_key(new_device_secret()), "dev1", nonce, proof)


def test_wrong_device_fails() -> None:
    key = derive_device_key(new_device_secret())
    nonce = new_nonce()
    proof = device_proof(key, "dev1", nonce)
    assert not verify_device_proof(key, "dev2", nonce, proof)


def test_replay_with_another_nonce_fails() -> None:
    key = derive_device_key(new_device_secret())
    old_proof = device_proof(key, "dev1", new_nonce())
    assert not verify_device_proof(key, "dev1", new_nonce(), old_proof)


def test_truncated_proof_fails() -> None:
    key = derive_device_key(new_device_secret())
    nonce = new_nonce()
    proof = device_proof(key, "dev1", nonce)
    assert not verify_device_proof(key, "dev1", nonce, proof[:-1])
    assert not verify_device_proof(key, "dev1", nonce, b"")


def test_nonces_differ() -> None:
    assert new_nonce() != new_nonce()


@pytest.mark.parametrize("device_id", ["a", "0", "dev1", "pi-kitchen", "a" * 63, "a-b-c"])
def test_valid_device_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@pytest.mark.parametrize(
    "device_id",
    ["", "-a", "a-", "Dev1", "dev_1", "dev.1", "a" * 64, "dev1\n", " dev1", "dév", "a/b"],
)
def test_invalid_device_ids(device_id: str) -> None:
    with pytest.raises(ConfigError, match="invalid device id"):
        validate_device_id(device_id)


_LABEL_CHARS = string.ascii_lowercase + string.digits


@given(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True))
def test_generated_dns_labels_are_accepted(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@given(st.text(max_size=80))
def test_validation_agrees_with_dns_label_rules(device_id: str) -> None:
    is_label = (
        1 <= len(device_id) <= 63
        and all(c in _LABEL_CHARS + "-" for c in device_id)
        and device_id[0] != "-"
        and device_id[-1] != "-"
    )
    assert (DEVICE_ID_RE.fullmatch(device_id) is not None) == is_label
    if is_label:
        assert validate_device_id(device_id) == device_id
    else:
        with pytest.raises(ConfigError):
            validate_device_id(device_id)


def test_password_hash_round_trip() -> None:
    password_hash = hash_password("correct horse")
    assert password_hash.startswith("$argon2id$")
    assert verify_password(password_hash, "correct horse")
    assert not verify_password(password_hash, "wrong horse")
    assert not needs_rehash(password_hash)


def test_verify_password_tolerates_bad_hashes() -> None:
    assert not verify_password("", "pw")
    assert not verify_password("not a hash", "pw")
    assert not verify_password(DUMMY_HASH, "")


def test_needs_rehash_for_weaker_parameters() -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    assert needs_rehash(weak)
    assert verify_password(weak, "pw")


def test_new_password_has_every_character_class() -> None:
    for _ in range(50):
        password = new_password()
        assert len(password) == 20
        assert any(c.isupper() for c in password)
        assert any(c.islower() for c in password)
        assert any(c.isdigit() for c in password)
        assert any(not c.isalnum() for c in password)
    assert new_password() != new_password()


def test_api_token_format_and_hash() -> None:
    token = new_api_token()
    assert token.startswith("hwt_")
    assert len(token) == 4 + 43
    assert new_api_token() != token
    assert len(hash_token(token)) == 64
    assert hash_token(token) == hash_token(token)
    assert hash_token(token) != hash_token(new_api_token())


# --- constant-time comparisons ---------------------------------------------------------
#
# A secret-dependent answer compared with ``==`` stops at the first differing byte, and
# how long the check takes tells an attacker how much of a forged proof is right. These
# tests record the calls of ``hmac.compare_digest`` (which ``secrets.compare_digest``
# is) and check that every verification path goes through it, for a right answer and
# for a wrong one: a regression to ``==`` makes no call, and fails here.

Compared = list[tuple[Any, Any, bool]]


def record_compare_digest(monkeypatch: pytest.MonkeyPatch, *modules: ModuleType) -> Compared:
    """Route ``compare_digest`` through a recorder: the ``hmac`` and ``secrets``
    functions, and the name in ``modules`` if one imported it directly."""
    calls: Compared = []
    real: Callable[[Any, Any], bool] = hmac.compare_digest

    def recorder(a: Any, b: Any) -> bool:
        result = real(a, b)
        calls.append((a, b, result))
        return result

    monkeypatch.setattr(hmac, "compare_digest", recorder)
    monkeypatch.setattr(secrets, "compare_digest", recorder)
    for module in modules:
        if hasattr(module, "compare_digest"):
            monkeypatch.setattr(module, "compare_digest", recorder)
    return calls


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize(
    "answer",
    ["right", "last byte wrong", "first byte wrong", "truncated", "wrong key"],
)
def test_proof_is_checked_with_compare_digest(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    key = derive_device_key(new_device_secret())
    nonce = new_nonce()
    expected = device_proof(key, "dev1", nonce)
    given = {
        "right": expected,
        "last byte wrong": _flip_last_byte(expected),
        "first byte wrong": bytes([expected[0] ^ 0x80]) + expected[1:],
        "truncated": expected[:16],
        "wrong key": device_proof(derive_device_key(new_device_secret()), "dev1", nonce),
    }[answer]
    calls = record_compare_digest(monkeypatch, device_module)
    assert verify_device_proof(key, "dev1", nonce, given) is (answer == "right")
    # Exactly one comparison, of the expected proof with the one given, whose result
    # is the verdict.
    assert len(calls) == 1, calls
    a, b, result = calls[0]
    assert {bytes(a), bytes(b)} == {expected, given}
    assert result is (answer == "right")


@pytest.mark.parametrize("right", [True, False])
def test_totp_codes_are_checked_with_compare_digest(
    monkeypatch: pytest.MonkeyPatch, right: bool
) -> None:
    import pyotp

    secret = totp_module.new_secret()
    now = 1_700_000_000.0
    step = pyotp.TOTP(secret).timecode(int(now))
    code = pyotp.TOTP(secret).generate_otp(step)
    if not right:
        code = f"{(int(code) + 1) % 1_000_000:06d}"
        while any(
            pyotp.TOTP(secret).generate_otp(s) == code
            for s in range(step - totp_module.DRIFT_STEPS, step + totp_module.DRIFT_STEPS + 1)
        ):
            code = f"{(int(code) + 1) % 1_000_000:06d}"
    calls = record_compare_digest(monkeypatch, totp_module)
    found = totp_module.matching_step(secret, code, now=now)
    assert found == (step if right else None)
    # Every step in the drift window is compared, the match or not: no early exit
    # whose timing tells which step (or whether any) matched.
    steps = 2 * totp_module.DRIFT_STEPS + 1
    assert len(calls) == steps, calls
    assert all(code in (a, b) for a, b, _ in calls)
    assert [result for _, _, result in calls].count(True) == (1 if right else 0)


async def test_relay_checks_device_proofs_with_compare_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's own path (relay/tunnels.py), with a real agent in this process: the
    proof it receives is compared with compare_digest, accepted or refused."""
    config = RelayConfig(data_dir=tmp_path / "relay", host="127.0.0.1", port=free_port())
    server = RelayServer(config)
    secret = server.store.add_device("dev1")
    await server.start()
    try:

        def agent(device_secret: str) -> Agent:
            return Agent(
                AgentConfig(
                    server=f"https://127.0.0.1:{config.port}",
                    device="dev1",
                    secret=device_secret,
                    ca_file=server.ca_file,
                )
            )

        calls = record_compare_digest(monkeypatch, device_module)
        with pytest.raises(ConnectError, match="refused this device's credentials"):
            await agent(new_device_secret()).connect_once()
        proofs = [(a, b, r) for a, b, r in calls if len(a) == 32 and len(b) == 32]
        assert len(proofs) == 1, calls
        assert proofs[0][0] != proofs[0][1] and proofs[0][2] is False
        assert server.registry.get("dev1") is None

        calls.clear()
        tunnel = await agent(secret).connect_once()
        try:
            proofs = [(a, b, r) for a, b, r in calls if len(a) == 32 and len(b) == 32]
            assert len(proofs) == 1, calls
            assert proofs[0][0] == proofs[0][1] and proofs[0][2] is True
            assert server.registry.get("dev1") is not None
        finally:
            tunnel.abort()
            await asyncio.wait_for(tunnel.done, 5)
            # Shut down once the relay has seen the tunnel go (shutting down while the
            # tunnel closes trips over a transport closed twice: reported separately).
            for _ in range(100):
                if server.registry.get("dev1") is None:
                    break
                await asyncio.sleep(0.05)
    finally:
        await server.shutdown()
