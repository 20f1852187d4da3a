"""The controller's TUF repository with its storage: `ota.repository` plus the database and keys.

Rules:
- Every change goes through one lock and is stored in one transaction: the files a change
  publishes (targets, snapshot, timestamp, root) appear together or not at all. The lock is
  always taken before the database (never while a transaction is open).
- Replicas (controllers sharing one PostgreSQL database and fleet directory) take turns: the lock
  is also a PostgreSQL advisory lock (`REPOSITORY_LOCK_KEY`, on a connection of its own), and
  whoever takes it first loads what the others stored since (`sync`), so every change starts from
  the newest signed state and versions only go up. A replica also syncs before it serves
  `timestamp.json`, so a device never gets an older timestamp from one replica than it already
  got from another.
- Metadata is served from memory after it is stored; every stored version stays fetchable.
- Online keys are read from the fleet dir's `keys/`; the root keys are never read here. A root
  change is drafted here, signed offline by `fleetctl keys rotate`, and accepted here only if
  `ota.repository` finds it properly signed and it is exactly the draft that was handed out.
- The command key is published as the target `fleet/command-key.json`, so devices learn it (and
  its rotations) through TUF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tortoise.transactions import in_transaction
from tuf.api.metadata import Metadata, Root

from attestation.keys import generate_key_file, load_key_file, public_key_of
from fleet.blobs import BlobStore
from fleet.db import postgres_dsn, sql
from fleet.db.models import KeyRotation, TufFile
from fleet.fleetdir import FleetDir
from ota.repository import (
    ONLINE_ROLES,
    TOP_LEVEL_ROLES,
    Lifetimes,
    PublishedFile,
    Repository,
    RepositoryError,
)
from ota.targets import COMMAND_KEY_TARGET

REPOSITORY_LOCK_KEY = 0x666C656574_02  # "fleet" + 2 (the scheduler's is + 1)


def utcnow() -> datetime:
    return datetime.now(UTC)


def command_key_document(signer: CryptoSigner) -> bytes:
    key = public_key_of(signer)
    return json.dumps(
        {"keyid": key.keyid, "key": key.to_dict()}, sort_keys=True, separators=(",", ":")
    ).encode()


class RepositoryLock:
    """This process's change lock and, on PostgreSQL, every replica's (see the module's rules);
    there, `on_acquired` runs once both are held."""

    def __init__(self, dsn: str | None, on_acquired: Callable[[], Awaitable[object]]) -> None:
        self.local = asyncio.Lock()
        self._dsn = dsn
        self._on_acquired = on_acquired
        self._connection: Any = None

    async def __aenter__(self) -> None:
        await self.local.acquire()
        try:
            if self._dsn is not None:
                await self._lock_shared()
                try:
                    await self._on_acquired()
                except BaseException:
                    await self._unlock_shared()
                    raise
        except BaseException:
            self.local.release()
            raise

    async def __aexit__(self, *_exc: object) -> None:
        try:
            await self._unlock_shared()
        finally:
            self.local.release()

    async def _lock_shared(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # only on PostgreSQL

        for attempt in (1, 2):  # a connection lost since the last change is made again once
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(self._dsn)
            try:
                await self._connection.execute("SELECT pg_advisory_lock($1)", REPOSITORY_LOCK_KEY)
                return
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                await self.close()
                if attempt == 2:
                    raise

    async def _unlock_shared(self) -> None:
        if self._dsn is None or self._connection is None:
            return
        try:
            await self._connection.execute("SELECT pg_advisory_unlock($1)", REPOSITORY_LOCK_KEY)
        except Exception:
            await self.close()  # closing the session releases its locks

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


@dataclass(frozen=True)
class RotationDraft:
    id: int
    role: str
    draft: bytes


class FleetRepository:
    def __init__(
        self,
        fleet_dir: FleetDir,
        repository: Repository,
        blobs: BlobStore,
        shared_dsn: str | None = None,
    ) -> None:
        self.fleet_dir = fleet_dir
        self.repository = repository
        self.blobs = blobs
        # Lock order: this lock first, then the database. A caller that needs its own rows in
        # the same transaction as a change takes this lock, opens the transaction and calls a
        # `*_locked` method. (SQLite has one connection, locked for a whole transaction:
        # holding a transaction while waiting for this lock deadlocks against the renewal.)
        self.shared = shared_dsn is not None
        self.lock = RepositoryLock(shared_dsn, self.sync)
        self._files: dict[str, bytes] = {}
        self._latest: dict[str, int] = {}
        self._synced_at = 0.0

    @classmethod
    async def open(
        cls, fleet_dir: FleetDir, lifetimes: Lifetimes, db_url: str | None = None
    ) -> FleetRepository:
        latest = await _latest_files()
        signers = {role: _online_signer(fleet_dir, role, latest) for role in ONLINE_ROLES}
        repo = Repository.load(latest, signers, lifetimes)
        store = cls(fleet_dir, repo, BlobStore(fleet_dir.blobs), postgres_dsn(db_url))
        for row in await TufFile.all().order_by("version"):
            store._remember(PublishedFile(row.role, row.version, bytes(row.data)))
        return store

    async def close(self) -> None:
        await self.lock.close()

    async def sync(self) -> bool:
        """Load what other replicas stored since this one last looked; whether there was any.
        Call it holding `lock` (it is `lock`'s `on_acquired`), or through `sync_for_serving`."""
        self._synced_at = time.monotonic()
        rows = await sql.fetch(
            "SELECT role, MAX(version) AS version FROM tuf_file GROUP BY role", []
        )
        newest = {str(row["role"]): int(row["version"]) for row in rows}
        current = {role: getattr(self.repository, role).signed.version for role in TOP_LEVEL_ROLES}
        behind = [role for role in TOP_LEVEL_ROLES if newest.get(role, 0) > current[role]]
        if not behind:
            return False
        for role in behind:
            for row in await TufFile.filter(role=role, version__gt=current[role]).order_by(
                "version"
            ):
                self._remember(PublishedFile(row.role, row.version, bytes(row.data)))
        latest = await _latest_files()
        signers = {role: _online_signer(self.fleet_dir, role, latest) for role in ONLINE_ROLES}
        self.repository = Repository.load(latest, signers, self.repository.lifetimes)
        return True

    async def sync_for_serving(self) -> None:
        """`sync` before serving a timestamp, on replicas only: what every replica had stored
        when the request arrived is served. Requests waiting together share one sync, since a
        sync that started after a request arrived answers it too."""
        if not self.shared:
            return
        arrived = time.monotonic()
        async with self.lock.local:
            if self._synced_at < arrived:
                await self.sync()

    @staticmethod
    async def store(files: Iterable[PublishedFile]) -> None:
        async with in_transaction():
            for file in files:
                await TufFile.create(role=file.role, version=file.version, data=file.data)

    def _remember(self, file: PublishedFile) -> None:
        """Serve `file`; in whatever order files come, `timestamp.json` and `root.json` stay the
        newest ones, and every root version stays fetchable as `N.root.json` (clients walk the
        chain of roots one version at a time)."""
        if file.role == "root":
            self._files[file.filename] = file.data
        if file.role in ("timestamp", "root"):
            if self._latest.get(file.role, 0) > file.version:
                return
            self._latest[file.role] = file.version
            if file.role == "root":
                self._files["root.json"] = file.data
        self._files[file.filename] = file.data

    def _checkpoint(self) -> dict[str, bytes]:
        return {role: getattr(self.repository, role).to_bytes() for role in TOP_LEVEL_ROLES}

    def _restore(self, saved: dict[str, bytes]) -> None:
        for role, data in saved.items():
            setattr(self.repository, role, Metadata.from_bytes(data))

    async def _change(self, change: Callable[[], list[PublishedFile]]) -> list[PublishedFile]:
        """Apply `change` to the repository and store what it publishes, or undo it."""
        saved = self._checkpoint()
        try:
            files = change()
            await self.store(files)
        except BaseException:
            self._restore(saved)
            raise
        for file in files:
            self._remember(file)
        return files

    def metadata(self, filename: str) -> bytes | None:
        return self._files.get(filename)

    def current_file(self, path: str, sha256: str) -> bool:
        """Whether `sha256` is the current content of target `path`."""
        target = self.repository.targets.signed.targets.get(path)
        return target is not None and target.hashes.get("sha256") == sha256

    def status(self) -> dict[str, Any]:
        repo = self.repository
        root = repo.root.signed
        roles = {}
        for role in TOP_LEVEL_ROLES:
            md = getattr(repo, role)
            roles[role] = {
                "version": md.signed.version,
                "expires": md.signed.expires.isoformat(),
                "keyids": list(root.roles[role].keyids),
                "threshold": root.roles[role].threshold,
            }
        return {"roles": roles, "targets": len(repo.targets.signed.targets)}

    # Changes.

    async def add_target(
        self, path: str, data: bytes, custom: dict[str, Any], now: datetime
    ) -> list[PublishedFile]:
        async with self.lock:
            return await self.add_target_locked(path, data, custom, now)

    async def add_target_locked(
        self, path: str, data: bytes, custom: dict[str, Any], now: datetime
    ) -> list[PublishedFile]:
        """`add_target` for a caller that holds `self.lock` (see `lock`)."""
        return await self.add_targets_locked([(path, data, custom)], now)

    async def add_targets_locked(
        self, items: list[tuple[str, bytes, dict[str, Any]]], now: datetime
    ) -> list[PublishedFile]:
        """Publish several targets in one new `targets`, for a caller that holds `self.lock`."""
        for _, data, _ in items:
            self.blobs.put(data)
        return await self._change(lambda: self.repository.add_targets(items, now))

    async def remove_target(self, path: str, now: datetime) -> list[PublishedFile]:
        async with self.lock:
            return await self.remove_target_locked(path, now)

    async def remove_target_locked(self, path: str, now: datetime) -> list[PublishedFile]:
        """`remove_target` for a caller that holds `self.lock` (see `lock`)."""
        return await self._change(lambda: self.repository.remove_target(path, now))

    async def refresh(self, now: datetime) -> list[PublishedFile]:
        async with self.lock:
            return await self._change(lambda: self.repository.refresh(now))

    async def publish_command_key(
        self, now: datetime, signer: CryptoSigner | None = None
    ) -> list[PublishedFile]:
        """Publish the command key's public half (by default the one in `keys/command.pem`)."""
        signer = signer or load_key_file(self.fleet_dir.key_file("command"))
        document = command_key_document(signer)
        custom = {"fleet-command-key": {"keyid": public_key_of(signer).keyid}}
        return await self.add_or_replace(COMMAND_KEY_TARGET, document, custom, now)

    async def add_or_replace(
        self, path: str, data: bytes, custom: dict[str, Any], now: datetime
    ) -> list[PublishedFile]:
        """Publish `data` at `path`, replacing what was there (for fleet-owned targets only)."""
        async with self.lock:
            self.blobs.put(data)

            def replace() -> list[PublishedFile]:
                self.repository.targets.signed.targets.pop(path, None)
                return self.repository.add_target(path, data, custom, now)

            return await self._change(replace)

    # Key rotation.

    async def draft_rotation(
        self,
        role: str,
        now: datetime,
        root_keys: list[Any] | None = None,
        threshold: int | None = None,
    ) -> RotationDraft:
        """Prepare the next root for rotating `role` (an online role, or `root`).

        A new draft replaces any unfinished one (and deletes the key that draft had made).
        """
        async with self.lock:
            for stale in await KeyRotation.filter(completed_at=None):
                if stale.new_key_file:
                    Path(stale.new_key_file).unlink(missing_ok=True)
                await stale.delete()
            new_key_file: Path | None = None
            online = {}
            if role in ONLINE_ROLES:
                new_key_file = self.fleet_dir.keys / f"{role}.next-{int(now.timestamp())}.pem"
                signer = generate_key_file(new_key_file)
                online[role] = public_key_of(signer)
            elif role != "root":
                raise RepositoryError(f"{role} is not a role the root signs for")
            draft = self.repository.draft_root(now, online, root_keys, threshold)
            data = draft.signed_bytes
            row = await KeyRotation.create(
                role=role,
                root_version=draft.signed.version,
                draft=data,
                new_key_file=str(new_key_file) if new_key_file else None,
            )
            return RotationDraft(row.id, role, data)

    async def accept_rotation(
        self, rotation_id: int, signed_root: bytes, now: datetime
    ) -> list[PublishedFile]:
        async with self.lock:
            row = await KeyRotation.get_or_none(id=rotation_id)
            if row is None or row.completed_at is not None:
                raise RepositoryError(f"no pending key rotation {rotation_id}")
            try:
                new_root = Metadata[Root].from_bytes(signed_root)
            except Exception as exc:
                raise RepositoryError(f"the signed root is not TUF metadata: {exc}") from None
            if new_root.signed_bytes != bytes(row.draft):
                raise RepositoryError(
                    "the signed root differs from the draft the controller prepared"
                )
            signers = {}
            if row.new_key_file:
                signers[row.role] = load_key_file(Path(row.new_key_file))
            saved = self._checkpoint()
            try:
                files = self.repository.accept_root(new_root, signers, now)
                async with in_transaction():
                    await self.store(files)
                    row.completed_at = now
                    await row.save()
            except BaseException:
                self._restore(saved)
                raise
            for file in files:
                self._remember(file)
            if row.new_key_file:
                Path(row.new_key_file).replace(self.fleet_dir.key_file(row.role))
            return files


async def _latest_files() -> dict[str, bytes]:
    latest: dict[str, bytes] = {}
    for role in TOP_LEVEL_ROLES:
        row = await TufFile.filter(role=role).order_by("-version").first()
        if row is not None:
            latest[role] = bytes(row.data)
    return latest


def _online_signer(fleet_dir: FleetDir, role: str, latest: dict[str, bytes]) -> CryptoSigner:
    """The key for `role`, finishing a rotation that stopped between the database and the rename.

    A rotation stores the new root first and renames `{role}.next-*.pem` into place after; if the
    controller died in between, the root names the pending key, which is promoted here.
    """
    current = fleet_dir.key_file(role)
    signer = load_key_file(current)
    root_data = latest.get("root")
    if root_data is None:
        return signer
    wanted = Metadata[Root].from_bytes(root_data).signed.roles[role].keyids
    if public_key_of(signer).keyid in wanted:
        return signer
    for pending in sorted(fleet_dir.keys.glob(f"{role}.next-*.pem")):
        candidate = load_key_file(pending)
        if public_key_of(candidate).keyid in wanted:
            pending.replace(current)
            return candidate
    return signer
