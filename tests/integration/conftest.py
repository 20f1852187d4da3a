"""Integration fixtures: a real controller (`fleetctl serve`) on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
