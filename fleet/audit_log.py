"""Writing and reading the audit log (`fleet.audit` has the chain's rules).

Rules:
- `AuditLog.record` takes an entry from any thread and never waits or fails: entries wait in a
  bounded buffer (`MAX_PENDING`) and a background task appends them in batches, one transaction
  each. When the buffer is full an entry is dropped and counted; the next batch then starts with
  an `audit.dropped` record saying how many, so a flood cannot hide that it happened.
- Appending reads the chain's head and inserts the next `seq` numbers in one transaction. Two
  writers (controller replicas, telemetry workers) that read the same head both try to insert the
  same `seq`; the database refuses the second, which reads the head again and retries. A batch that
  still fails after `WRITE_ATTEMPTS` stays buffered for the next round: nothing is lost while the
  database is away, up to the buffer's size.
- Every `security.*` log event (refused envelopes and requests, failed enrollment and attestation,
  quarantine) becomes a record (`security_entry`, fed by `fleet.logs` whatever the log level); API
  calls are recorded by the API's middleware (`fleet.api.audit`).
- The key is `keys/audit.key` in the fleet directory (64 hex digits, mode 0600). The controller
  makes it on first use; every other process that writes the log (ingest workers, maybe on other
  hosts) needs that same file and refuses to start without it, since a key of its own would make
  its records look edited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tortoise.exceptions import BaseORMException
from tortoise.transactions import in_transaction

from fleet.audit import GENESIS, KEY_BYTES, ChainCheck, ChainWalk, Entry, Record, link
from fleet.ca import write_new
from fleet.db.models import AuditRecord
from fleet.fleetdir import FleetDir, FleetDirError
from fleet.logs import add_security_sink, remove_security_sink
from fleet.tuf_store import utcnow

MAX_PENDING = 20_000
BATCH_MAX = 500
WRITE_ATTEMPTS = 8
RETRY_S = 0.05
IDLE_RETRY_S = 2.0
PAGE = 2_000


class AuditKeyError(FleetDirError):
    """The audit key file exists but cannot be used."""


def audit_key_file(fleet_dir: FleetDir) -> Path:
    return fleet_dir.keys / "audit.key"


def load_audit_key(fleet_dir: FleetDir, *, create: bool = True) -> bytes:
    """The fleet's audit key; made (0600) if the fleet has none yet and `create` is set."""
    path = audit_key_file(fleet_dir)
    if not path.exists():
        if not create:
            raise AuditKeyError(
                f"{path} is missing: copy it from the controller's fleet directory (every "
                "process writing the audit log needs the same key)"
            )
        with contextlib.suppress(FileExistsError):  # another process made it first
            write_new(path, secrets.token_hex(KEY_BYTES).encode() + b"\n", 0o600)
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise AuditKeyError(f"{path}: not an audit key ({exc}); restore it from a backup") from None
    if len(key) != KEY_BYTES:
        raise AuditKeyError(f"{path}: an audit key is {KEY_BYTES * 2} hex digits")
    return key


class AuditLog:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.written = 0  # records this process appended
        self.highest_seq = 0  # the newest seq this process appended
        self.dropped = 0  # entries dropped because the buffer was full, since the start
        self._unreported_drops = 0
        self._pending: deque[Entry] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._write_lock: asyncio.Lock | None = None
        self._stopping = False

    def record(self, entry: Entry) -> None:
        """Buffer `entry` for the next batch (any thread; never blocks)."""
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                self._unreported_drops += 1
                return
            self._pending.append(entry)
            first = len(self._pending) == 1
        if first and self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="audit-log")

    async def stop(self) -> None:
        """Write what is buffered (if the database answers), then stop. The writer is asked to
        finish rather than cancelled: a transaction cancelled half-way can leave the database
        client's lock taken."""
        self._stopping = True
        if self._task is not None and self._wake is not None:
            self._wake.set()
            await self._task
            self._task = None

    async def flush(self) -> None:
        """Append everything buffered now; raises if the database refuses."""
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            while True:
                batch = self._take()
                if not batch:
                    return
                try:
                    await self._append(batch)
                except BaseException:
                    self._put_back(batch)
                    raise

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the database away, or anything else: keep the entries
                if self._stopping:
                    _warn(f"audit log: {len(self._pending)} entries not written ({exc})")
                    return
                _warn(f"audit log: cannot write ({exc}); retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_RETRY_S)
                self._wake.set()
                continue
            if self._stopping:
                return

    def _take(self) -> list[Entry]:
        with self._lock:
            batch = []
            if self._unreported_drops:
                batch.append(
                    Entry(
                        utcnow(),
                        "controller",
                        "audit.dropped",
                        "audit",
                        "dropped",
                        {"entries": self._unreported_drops},
                    )
                )
                self._unreported_drops = 0
            while self._pending and len(batch) < BATCH_MAX:
                batch.append(self._pending.popleft())
            return batch

    def _put_back(self, batch: list[Entry]) -> None:
        with self._lock:
            for entry in reversed(batch):
                if entry.action == "audit.dropped":
                    self._unreported_drops += int(entry.details.get("entries", 0))
                else:
                    self._pending.appendleft(entry)

    async def _append(self, batch: Sequence[Entry]) -> None:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                async with in_transaction():
                    head = await AuditRecord.all().order_by("-seq").first()
                    seq, prev = (0, GENESIS) if head is None else (head.seq, head.hash)
                    rows = []
                    for entry in batch:
                        seq += 1
                        record = link(self.key, prev, seq, entry)
                        prev = record.hash
                        rows.append(_row(record))
                    await AuditRecord.bulk_create(rows)
                self.written += len(rows)
                self.highest_seq = max(self.highest_seq, seq)
                return
            except BaseORMException:
                if attempt + 1 == WRITE_ATTEMPTS:
                    raise
                await asyncio.sleep(RETRY_S * (attempt + 1) * (1 + secrets.randbelow(100) / 100))


def _warn(message: str) -> None:
    logging.getLogger("fleet").warning(message)


def security_entry(event: str, fields: dict[str, Any]) -> Entry:
    """A `security.*` log event as an audit entry: its fields are the details, the device (or
    path, or peer) it names the target, and the device the actor when it names one."""
    device = fields.get("device")
    named = device if isinstance(device, str) and device not in ("", "-") else None
    target = str(named or fields.get("path") or fields.get("peer") or "-")
    actor = f"device:{named}" if named else "controller"
    outcome = "quarantined" if event.endswith("quarantined") else "refused"
    return Entry(utcnow(), actor, event, target, outcome, dict(fields))


@contextlib.asynccontextmanager
async def audit_log(key: bytes) -> AsyncIterator[AuditLog]:
    """An `AuditLog` writing in the background, with `security.*` events feeding it, for the
    time of the block; it writes what is buffered when the block ends."""
    audit = AuditLog(key)

    def sink(event: str, fields: dict[str, Any]) -> None:
        audit.record(security_entry(event, fields))

    audit.start()
    add_security_sink(sink)
    try:
        yield audit
    finally:
        remove_security_sink(sink)
        await audit.stop()


def _row(record: Record) -> AuditRecord:
    return AuditRecord(
        seq=record.seq,
        at=record.at,
        actor=record.actor,
        action=record.action,
        target=record.target,
        outcome=record.outcome,
        details=record.details,
        prev=record.prev,
        hash=record.hash,
    )


def _record(row: AuditRecord) -> Record:
    return Record(row.seq, row.at, row.actor, row.action, row.target, row.outcome, row.details,
                  row.prev, row.hash)  # fmt: skip


async def read_records(
    *,
    since: datetime | None = None,
    after_seq: int = 0,
    action: str | None = None,
    actor: str | None = None,
    limit: int = 100,
) -> list[Record]:
    """Records in `seq` order, newest last, filtered; at most `limit` (the newest ones unless
    `after_seq` pages forward from a point)."""
    query = AuditRecord.filter(seq__gt=after_seq)
    if since is not None:
        query = query.filter(at__gte=since)
    if action is not None:
        query = query.filter(action__startswith=action)
    if actor is not None:
        query = query.filter(actor=actor)
    if after_seq:
        rows = await query.order_by("seq").limit(limit)
    else:
        rows = list(reversed(await query.order_by("-seq").limit(limit)))
    return [_record(row) for row in rows]


async def check_stored_chain(key: bytes, expected_head: int = 0) -> ChainCheck:
    """`fleet.audit.check_chain` over every stored record, read in pages of `PAGE`."""
    walk = ChainWalk(key)
    after = 0
    while True:
        rows = await AuditRecord.filter(seq__gt=after).order_by("seq").limit(PAGE)
        for row in rows:
            walk.add(_record(row))
        if len(rows) < PAGE:
            return walk.finish(expected_head)
        after = rows[-1].seq
