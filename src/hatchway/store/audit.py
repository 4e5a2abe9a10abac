"""The audit log's records and their hash chain (storage-independent).

Every record carries the hash of the one before it: ``hash = SHA-256(prev_hash ||
canonical JSON of [id, time, kind, actor, device, source, details(, org)])``; the
organisation a record belongs to (what an organisation's auditors may read) is covered
when it is set, so records written before it existed verify as they were. Editing,
inserting or deleting a record in the middle breaks the chain at that point, which
``verify`` reports. Cutting records off the end, or rewriting the whole chain, is only
detectable against a head (id and hash) kept elsewhere: ``hatchway audit verify``
prints the head to write down and checks against one given with ``--expect-head``.
Retention removes records from the start and keeps the last removed hash as the anchor
the chain continues from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS = "0" * 64

#: What is recorded (``kind``), and who the ``actor`` is for it.
KINDS = (
    "login",  # actor: user; details: via (api|web)
    "login_failed",  # actor: the name tried
    "lockout",  # actor: the user; details: failures, until
    "unlocked",  # actor: who ran the command; details: user
    "totp_enabled",  # details: user
    "totp_disabled",
    "logout",  # actor: user
    "token_created",  # details: user, id, label, scopes
    "token_revoked",  # details: user, id
    "token_used",  # actor: user; at most once a minute per token; details: label
    "web_session",  # actor: user; device, details: service
    "device_connected",  # actor: device; source: its address
    "device_disconnected",  # actor: device
    "channel",  # actor: user; device, source; details: service, times, bytes, outcome
    "device_added",  # actor: who ran the command ("cli" offline); details: org, tags
    "device_tagged",
    "org_added",
    "org_removed",
    "org_changed",  # details: org, require_totp
    "setting_changed",  # details: {name: value}
    "team_added",
    "team_removed",
    "team_member_added",
    "team_member_removed",
    "role_added",
    "role_removed",
    "grant_added",  # details: id, user or team, role, tag (or the device)
    "grant_removed",
    "device_removed",
    "user_added",  # details: user, role
    "user_removed",
    "user_changed",  # details: user, role
    "password_changed",
    "tokens_revoked",
)


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    kind: str
    actor: str
    device: str | None
    source: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str
    #: The organisation the record is about (None: the relay's own, super-admins only).
    org: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": format_time(self.at),
            "kind": self.kind,
            "actor": self.actor,
            "device": self.device,
            "source": self.source,
            "details": self.details,
            "org": self.org,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    head_id: int
    head_hash: str
    problem: str | None = None
    bad_id: int | None = None


def format_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_details(details: dict[str, Any] | None) -> str:
    return json.dumps(details or {}, sort_keys=True, separators=(",", ":"), default=str)


def record_hash(
    prev_hash: str,
    record_id: int,
    at: datetime,
    kind: str,
    actor: str,
    device: str | None,
    source: str | None,
    details_json: str,
    org: str | None = None,
) -> str:
    fields: list[Any] = [record_id, format_time(at), kind, actor, device, source, details_json]
    if org is not None:
        fields.append(org)
    payload = json.dumps(fields, separators=(",", ":"))
    return hashlib.sha256((prev_hash + payload).encode()).hexdigest()
