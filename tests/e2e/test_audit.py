"""The audit log against a real controller (`fleetctl serve`, SQLite and PostgreSQL), through
`fleetctl audit`.

- API calls that change something are recorded with who, what, the path and the outcome: an
  admin's, a viewer's refused write, a call without a token, a device's signed call and one whose
  signature is refused (with its security event).
- Viewers may not read the log; operators can.
- `fleetctl audit --verify` says the chain is intact, and after a record is edited, deleted, or
  the newest ones cut off in the database, it exits 1 naming the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from attestation.identity import DeviceIdentity
from fleet.api.attestation import CHALLENGE_PATH
from ota.request_auth import sign_request
from tests.controller import BACKEND_PARAMS, RunningController, controller_for

EXIT_REFUSED = 1
EXIT_UNAUTHORIZED = 5


@pytest.fixture(params=BACKEND_PARAMS)
def ctl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningController]:
    with controller_for(request.param, tmp_path) as running:
        yield running


def sql(ctl: RunningController, statement: str) -> None:
    """Run `statement` on the controller's database behind its back, as an intruder would."""
    if ctl.db_url is None:
        with contextlib.closing(sqlite3.connect(ctl.fleet_dir / "fleet.sqlite3")) as db:
            db.execute(statement)
            db.commit()
        return

    async def run() -> None:
        connection = await asyncpg.connect(ctl.db_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def records(ctl: RunningController, *args: str) -> list[dict[str, Any]]:
    result = ctl.cli("audit", "-o", "json", "--limit", "1000", *args)
    found: list[dict[str, Any]] = json.loads(result.stdout)["records"]
    return found


def wait_for_records(ctl: RunningController, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        found = records(ctl)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def verify(ctl: RunningController) -> tuple[int, str]:
    result = ctl.cli("audit", "--verify", check=False)
    return result.returncode, result.stdout + result.stderr


def test_calls_and_security_events_are_recorded_and_tampering_is_detected(
    ctl: RunningController, tmp_path: Path
) -> None:
    status, viewer = ctl.api("POST", "/api/v1/tokens", json={"name": "watcher", "role": "viewer"})
    assert status == 201
    status, _ = ctl.api("POST", "/api/v1/tokens", json={"name": "x"}, token=viewer["token"])
    assert status == 403
    status, _ = ctl.api("POST", "/api/v1/tokens", json={"name": "y"}, token=None)
    assert status == 401
    device = ctl.device(tmp_path / "device")  # registered by the admin, then attests (signed)
    stranger = DeviceIdentity.load_or_create(tmp_path / "stranger")
    headers = sign_request(stranger.signer, stranger.device_id, "POST", CHALLENGE_PATH, time.time())
    assert ctl.request("POST", CHALLENGE_PATH, headers=headers).status == 401

    found = wait_for_records(ctl, 8)
    seen = [(r["actor"], r["action"], r["outcome"], r["details"].get("status")) for r in found]
    admin = next(r["actor"] for r in found if r["action"] == "POST /api/v1/tokens")
    assert admin.endswith("(admin)")
    assert (admin, "POST /api/v1/tokens", "ok", 201) in seen
    assert ("watcher (viewer)", "POST /api/v1/tokens", "refused", 403) in seen
    assert ("anonymous", "POST /api/v1/tokens", "refused", 401) in seen
    assert (admin, "POST /api/v1/devices", "ok", 201) in seen
    assert (f"device:{device.identity.device_id}", f"POST {CHALLENGE_PATH}", "ok", 201) in seen
    assert (f"unverified:{stranger.device_id}", f"POST {CHALLENGE_PATH}", "refused", 401) in seen
    security = records(ctl, "--action", "security.")
    assert any(
        r["action"] == "security.device_request_refused" and r["target"] == CHALLENGE_PATH
        for r in security
    )
    refused = next(r for r in found if r["details"].get("status") == 403)
    assert "operator" in refused["details"]["error"] or "admin" in refused["details"]["error"]
    everything = json.dumps(found)
    assert viewer["token"] not in everything and ctl.token not in everything

    # Who may read it.
    denied = ctl.cli("audit", token=viewer["token"], check=False)
    assert denied.returncode == EXIT_UNAUTHORIZED, denied.stderr
    table = ctl.cli("audit").stdout
    assert "watcher (viewer)" in table and "refused 403" in table

    code, said = verify(ctl)
    assert code == 0 and "intact" in said, said
    head = max(r["seq"] for r in found)

    # An edited record.
    sql(ctl, "UPDATE audit_record SET actor = 'nobody (admin)' WHERE seq = 3")
    code, said = verify(ctl)
    assert code == EXIT_REFUSED, said
    assert "record 3: edited" in said

    # ... put back, then a deleted one.
    original = next(r for r in found if r["seq"] == 3)["actor"].replace("'", "''")
    sql(ctl, f"UPDATE audit_record SET actor = '{original}' WHERE seq = 3")
    assert verify(ctl)[0] == 0
    sql(ctl, "DELETE FROM audit_record WHERE seq = 2")
    code, said = verify(ctl)
    assert code == EXIT_REFUSED and "record 2: deleted (record 2 is missing)" in said, said

    # The newest records cut off: the controller knows what it wrote.
    sql(ctl, f"DELETE FROM audit_record WHERE seq >= {head - 1}")
    code, said = verify(ctl)
    assert code == EXIT_REFUSED and "truncated" in said, said
