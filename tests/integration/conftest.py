"""Integration fixtures: a real controller (`fleetctl serve`) on SQLite and on PostgreSQL, and the
controller's database opened in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fleet.db import close_database, open_database
from tests.controller import BACKEND_PARAMS, RunningController, controller_for


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def controller(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningController]:
    """One controller per test module and backend; PostgreSQL gets a fresh, dropped database.

    Tests sharing it must not depend on each other: use rune names and tokens of their own and
    compare versions before and after rather than absolute numbers.
    """
    backend: str = request.param
    with controller_for(backend, tmp_path_factory.mktemp(f"controller-{backend}")) as running:
        yield running


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[str]:
    """A fresh controller database (migrated) opened in this process; its URL.

    SQLite only: Tortoise keeps one SQL dialect per process, and other tests of the session run a
    controller on SQLite in-process. PostgreSQL is covered through controllers and ingest workers
    run as processes (test_telemetry_workers, tests/e2e)."""
    url = f"sqlite://{tmp_path / 'fleet.sqlite3'}"
    await open_database(url)
    yield url
    await close_database()
