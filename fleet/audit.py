"""The audit log's hash chain: how a record is hashed, and how a stored chain is checked.

Rules:
- A record is who (`actor`), what (`action`, `target`), when (`at`, UTC, to the microsecond), the
  `outcome`, and `details` (a JSON object, stored as the exact canonical text it was hashed as).
  Records are numbered `seq` 1, 2, 3... with no gaps.
- Each record's `hash` is HMAC-SHA256, under the fleet's audit key, of the previous record's hash
  (`GENESIS` for record 1) and the record's canonical form. Keyed, so that whoever can write the
  database but does not hold the key (a stolen database password, an injection, a careless
  administrator) cannot edit or delete a record and then recompute the chain after it.
- `check_chain` walks records in `seq` order and names every break: a record whose hash does not
  match its contents (edited), a gap in `seq` (deleted), a `prev` that is not the previous
  record's hash (deleted or re-ordered), and fewer records than the writer is known to have
  written (`expected_head`: the newest ones deleted). A chain is intact only when it names none.
- Nothing here does I/O: `fleet.audit_log` reads and writes the records.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

GENESIS = "0" * 64
KEY_BYTES = 32
MAX_TEXT = 300  # characters of any one string in `details`, and of `target`


@dataclass(frozen=True)
class Entry:
    """What happened, before it has a place in the chain."""

    at: datetime
    actor: str
    action: str
    target: str
    outcome: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """An entry in the chain, as stored."""

    seq: int
    at: datetime
    actor: str
    action: str
    target: str
    outcome: str
    details: str  # canonical JSON text
    prev: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": at_text(self.at),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "details": orjson.loads(self.details),
            "prev": self.prev,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class Break:
    seq: int
    problem: str  # edited | deleted | reordered | truncated

    def __str__(self) -> str:
        return f"record {self.seq}: {self.problem}"


@dataclass(frozen=True)
class ChainCheck:
    records: int
    head_seq: int
    head_hash: str
    breaks: tuple[Break, ...]

    @property
    def intact(self) -> bool:
        return not self.breaks


def at_text(at: datetime) -> str:
    """`at` in the one form it is hashed in: UTC, microseconds, `Z`."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_details(details: dict[str, Any]) -> str:
    """`details` as sorted compact JSON, each string cut to `MAX_TEXT` characters."""
    return orjson.dumps(_bounded(details), option=orjson.OPT_SORT_KEYS).decode()


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, dict):
        return {str(k)[:MAX_TEXT]: _bounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)[:MAX_TEXT]


def record_hash(key: bytes, prev: str, seq: int, entry: Entry, details: str) -> str:
    body = orjson.dumps(
        [seq, at_text(entry.at), entry.actor, entry.action, entry.target, entry.outcome, details]
    )
    return hmac.new(key, prev.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def link(key: bytes, prev: str, seq: int, entry: Entry) -> Record:
    """`entry` as record `seq`, chained after the record whose hash is `prev`."""
    details = canonical_details(entry.details)
    target = entry.target[:MAX_TEXT]
    bounded = Entry(entry.at, entry.actor[:MAX_TEXT], entry.action[:MAX_TEXT], target,
                    entry.outcome[:MAX_TEXT])  # fmt: skip
    digest = record_hash(key, prev, seq, bounded, details)
    return Record(seq, entry.at, bounded.actor, bounded.action, target, bounded.outcome, details,
                  prev, digest)  # fmt: skip


class ChainWalk:
    """`check_chain`, one record at a time (a log too long to hold in memory)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.breaks: list[Break] = []
        self.count = 0
        self.seq = 0
        self.hash = GENESIS

    def add(self, record: Record) -> None:
        self.count += 1
        if record.seq != self.seq + 1:
            first, last = self.seq + 1, record.seq - 1
            span = f"record {first} is" if first == last else f"records {first} to {last} are"
            self.breaks.append(Break(first, f"deleted ({span} missing)"))
        elif record.prev != self.hash:
            self.breaks.append(
                Break(record.seq, f"reordered or replaced: prev is not record {self.seq}'s hash")
            )
        entry = Entry(record.at, record.actor, record.action, record.target, record.outcome)
        digest = record_hash(self.key, record.prev, record.seq, entry, record.details)
        if not hmac.compare_digest(digest, record.hash):
            self.breaks.append(Break(record.seq, "edited: its hash does not match its contents"))
        self.seq, self.hash = record.seq, record.hash

    def finish(self, expected_head: int = 0) -> ChainCheck:
        breaks = list(self.breaks)
        if expected_head > self.seq:
            breaks.append(
                Break(
                    self.seq + 1,
                    f"truncated: the log ends at record {self.seq}, but record {expected_head} "
                    "was written",
                )
            )
        return ChainCheck(self.count, self.seq, self.hash, tuple(breaks))


def check_chain(key: bytes, records: Iterable[Record], expected_head: int = 0) -> ChainCheck:
    """Every break in `records` (in `seq` order), per the module's rules."""
    walk = ChainWalk(key)
    for record in records:
        walk.add(record)
    return walk.finish(expected_head)
