"""Two controller replicas (`fleetctl serve` twice on one fleet directory and one PostgreSQL
database) share one signed repository (`fleet.tuf_store`'s replica rules).

- A rune pushed through one replica is in the metadata the other serves, and a real TUF client
  that alternates between the replicas verifies every refresh (no version ever goes back).
- A push through the replica that did not make the last change succeeds (it starts from the
  newest stored state instead of its own stale copy), and pushes through both at once all succeed
  with one unbroken line of versions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.controller import (
    Device,
    RunningController,
    controller_for,
    spawn_serve,
    write_legacy_rune,
)
from tests.mosquitto import free_port


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[RunningController, RunningController]]:
    with controller_for("postgres", tmp_path) as first:
        process, url = spawn_serve(
            first.fleet_dir, first.db_url, f"127.0.0.1:{free_port()}", tmp_path / "serve-101"
        )
        second = replace(first, url=url, process=process, _starts=101)
        try:
            yield first, second
        finally:
            second.stop()


def versions(db_url: str, role: str) -> list[int]:
    async def run() -> list[int]:
        connection = await asyncpg.connect(db_url)
        try:
            rows = await connection.fetch(
                "SELECT version FROM tuf_file WHERE role = $1 ORDER BY version", role
            )
            return [int(row["version"]) for row in rows]
        finally:
            await connection.close()

    return asyncio.run(run())


def test_two_replicas_serve_and_change_one_repository(
    replicas: tuple[RunningController, RunningController], tmp_path: Path
) -> None:
    first, second = replicas
    on_first = first.device(tmp_path / "device")
    on_second = Device(second, on_first.identity, on_first.state_dir, on_first.passport)

    first.push(write_legacy_rune(tmp_path, "a.rune", nbytes=1), org="default", name="a",
               version="1.0.0")  # fmt: skip
    _, _, targets = on_second.newest()
    assert any("/a/" in path for path in targets.signed.targets), list(targets.signed.targets)
    on_first.updater("alternating")

    # The second replica changes the repository after the first did: from the newest state.
    second.push(write_legacy_rune(tmp_path, "b.rune", nbytes=2), org="default", name="b",
                version="1.0.0")  # fmt: skip
    on_second.updater("alternating")  # the same trusted state, now through the other replica
    _, _, seen_by_first = on_first.newest()
    assert any("/b/" in path for path in seen_by_first.signed.targets)
    on_first.updater("alternating")

    # Pushes through both replicas at once.
    files = [write_legacy_rune(tmp_path, f"c{n}.rune", nbytes=3 + n) for n in range(6)]
    with ThreadPoolExecutor(6) as pool:
        pushed = list(
            pool.map(
                lambda n: (first, second)[n % 2].push(
                    files[n], org="default", name=f"c{n}", version="1.0.0"
                ),
                range(6),
            )
        )
    assert len(pushed) == 6
    for device in (on_first, on_second):
        _, _, newest = device.newest()
        names = {path.split("/")[2] for path in newest.signed.targets if path.startswith("runes/")}
        assert {"a", "b"} | {f"c{n}" for n in range(6)} <= names, names
    for role in ("targets", "snapshot", "timestamp"):
        stored = versions(first.db_url or "", role)
        assert stored == list(range(1, len(stored) + 1)), (role, stored)
    on_second.updater("alternating")
    on_first.updater("alternating")
