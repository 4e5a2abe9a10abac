"""Device challenge-response, device ids, passwords and API tokens."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
