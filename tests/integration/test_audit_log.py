"""The audit log's writer on a real database (SQLite, in this process; the controller's
PostgreSQL path is in tests/e2e/test_audit.py).

- Two writers appending at once (two controller replicas) make one chain: every entry once, no
  gap, no fork, intact.
- `security.*` log events become records naming the device and the reason.
- A full buffer drops entries, counts them, and the chain then says how many were dropped.
- While the database is away nothing is lost: the entries wait and are written once it is back.
- An ingest worker whose fleet directory lacks the controller's audit key refuses to start, naming
  the file, instead of making a key of its own.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from pathlib import Path

import pytest

import fleet.audit_log
from fleet.audit import Entry
from fleet.audit_log import AuditLog, audit_log, check_stored_chain, read_records
from fleet.db import close_database, open_database
from fleet.db.models import AuditRecord
from fleet.logs import log
from fleet.tuf_store import utcnow
from tests.controller import FLEETCTL

KEY = secrets.token_bytes(32)


def entry(n: int, actor: str = "ops (operator)") -> Entry:
    return Entry(utcnow(), actor, "POST /api/v1/devices/{id}/labels", f"/d/{n}", "ok", {"n": n})


async def test_two_writers_make_one_intact_chain(database: str) -> None:
    first, second = AuditLog(KEY), AuditLog(KEY)
    first.start()
    second.start()
    for n in range(300):
        first.record(entry(n, "replica-a"))
        second.record(entry(n, "replica-b"))
        if n % 50 == 0:
            await asyncio.sleep(0)  # let both background writers run between bursts
    await asyncio.gather(first.stop(), second.stop())
    check = await check_stored_chain(KEY, max(first.highest_seq, second.highest_seq))
    assert check.intact, check.breaks
    assert check.records == check.head_seq == 600
    assert first.written == second.written == 300
    seqs = [r.seq for r in await AuditRecord.all().order_by("seq")]
    assert seqs == list(range(1, 601))
    for actor in ("replica-a", "replica-b"):
        mine = await read_records(actor=actor, limit=1000)
        assert [r.to_json()["details"]["n"] for r in mine] == list(range(300))


async def test_security_events_become_records(database: str) -> None:
    async with audit_log(KEY) as audit:
        log("security.telemetry_refused", kind="bad-signature", device="d-123", reason="nope")
        log("security.device_quarantined", device="d-456", reason="agent code changed")
        log("rollout.created", rollout="r1")  # not a security event: not recorded
        await audit.flush()
    records = await read_records(action="security.")
    assert [(r.actor, r.action, r.target, r.outcome) for r in records] == [
        ("device:d-123", "security.telemetry_refused", "d-123", "refused"),
        ("device:d-456", "security.device_quarantined", "d-456", "quarantined"),
    ]
    assert records[0].to_json()["details"]["kind"] == "bad-signature"
    assert await AuditRecord.all().count() == 2


async def test_a_full_buffer_drops_and_says_so(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet.audit_log, "MAX_PENDING", 10)
    audit = AuditLog(KEY)  # not started: nothing drains the buffer meanwhile
    for n in range(25):
        audit.record(entry(n))
    assert audit.dropped == 15
    await audit.flush()
    records = await read_records(limit=100)
    assert records[0].action == "audit.dropped"
    assert records[0].to_json()["details"] == {"entries": 15}
    assert [r.to_json()["details"]["n"] for r in records[1:]] == list(range(10))
    assert (await check_stored_chain(KEY, audit.highest_seq)).intact


async def test_nothing_is_lost_while_the_database_is_away(database: str) -> None:
    audit = AuditLog(KEY)
    audit.record(entry(1))
    await audit.flush()
    await close_database()
    for n in range(2, 6):
        audit.record(entry(n))
    with pytest.raises(Exception):  # noqa: B017 (whatever the ORM raises without a db)
        await audit.flush()
    await open_database(database)
    await audit.flush()
    records = await read_records(limit=100)
    assert [r.to_json()["details"]["n"] for r in records] == [1, 2, 3, 4, 5]
    assert (await check_stored_chain(KEY, audit.highest_seq)).intact


def test_an_ingest_worker_without_the_audit_key_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("name: elsewhere\n")
    started = subprocess.run(
        [FLEETCTL, "telemetry", "ingest", "--dir", str(tmp_path), "--mqtt-url",
         "mqtt://127.0.0.1:1", "--db-url", f"sqlite://{tmp_path / 'f.sqlite3'}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode == 3, started.stderr
    said = " ".join(started.stderr.split())  # however the terminal wrapped it
    assert "audit.key is missing: copy it from the controller's fleet directory" in said
    assert "Traceback" not in started.stderr
    assert not (tmp_path / "keys" / "audit.key").exists()
