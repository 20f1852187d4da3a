"""What the controller serves from its stored metadata (`fleet.tuf_store.FleetRepository`):
whatever order the database hands the stored files in, every root version stays fetchable (a
client walks the chain of roots one version at a time) and `root.json` and `timestamp.json` are
the newest. A database may return rows in any order without `ORDER BY` (PostgreSQL does under
load, with synchronized scans); a missing `N.root.json` ends a client's walk early and it then
refuses every newer timestamp."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

from fleet.blobs import BlobStore
from fleet.fleetdir import FleetDir
from fleet.tuf_store import FleetRepository
from ota.repository import PublishedFile, Repository


def test_every_root_stays_fetchable_whatever_the_order(tmp_path: Path) -> None:
    files = [PublishedFile("root", n, f"root {n}".encode()) for n in (1, 2, 3)]
    files += [PublishedFile("timestamp", n, f"timestamp {n}".encode()) for n in (4, 5)]
    for order in itertools.permutations(files):
        served = FleetRepository(
            FleetDir(tmp_path), cast(Repository, cast(Any, None)), BlobStore(tmp_path)
        )
        for file in order:
            served._remember(file)
        assert [served.metadata(f"{n}.root.json") for n in (1, 2, 3)] == [
            b"root 1",
            b"root 2",
            b"root 3",
        ]
        assert served.metadata("root.json") == b"root 3"
        assert served.metadata("timestamp.json") == b"timestamp 5"
