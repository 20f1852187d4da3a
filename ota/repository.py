"""The fleet's TUF repository, controller side, without I/O: metadata in, signed files out.

Rules:
- Four top-level roles. `root` is signed only by the offline root keys (k of n); `targets`,
  `snapshot` and `timestamp` by one online key each, which the caller hands in as signers.
- Consistent snapshots are on: every `targets` and `snapshot` version is published under its
  version number, and targets are fetched by hash, so clients never mix files from two states.
- Any change to `targets` publishes a new `targets`, `snapshot` and `timestamp`, in that order,
  each with its version one above the last; a change never reuses a version number.
- A role is re-signed (with a new version and expiry) once less than half its lifetime is left, so
  as long as `refresh` is called on schedule, short expiries never lapse; and at once when its
  expiry lies further ahead than its (shortened) lifetime allows. `root` cannot be renewed
  here: it needs the offline keys (`draft_root` / `accept_root`).
- A new root is accepted only if it is exactly one version above the current one and is signed by
  a threshold of the current root's keys *and* of its own (the TUF rotation rule), and every
  online key it names is one the caller can sign with. Roles whose key changed are re-signed at
  once so clients can fast-forward past the rotation.
- Nothing here touches a disk, the network or a clock: `now` is passed in and the files to publish
  are returned as `PublishedFile`s for the caller to store atomically.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from securesystemslib.signer import Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
TOP_LEVEL_ROLES = ("root", *ONLINE_ROLES)
HASH_ALGORITHM = "sha256"

_SERIALIZER = JSONSerializer(compact=True)


class RepositoryError(Exception):
    """A repository operation that was refused, with the reason."""


@dataclass(frozen=True)
class Lifetimes:
    """How long each role's signature is valid after it is (re)signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=30)
    snapshot: timedelta = timedelta(days=1)
    timestamp: timedelta = timedelta(hours=6)

    def of(self, role: str) -> timedelta:
        value: timedelta = getattr(self, role)
        return value


@dataclass(frozen=True)
class PublishedFile:
    """One signed metadata file to store and serve (`{version}.{role}.json`, and timestamp)."""

    role: str
    version: int
    data: bytes

    @property
    def filename(self) -> str:
        if self.role == "timestamp":
            return "timestamp.json"
        return f"{self.version}.{self.role}.json"


def _expiry(now: datetime, lifetime: timedelta) -> datetime:
    return (now + lifetime).astimezone(UTC).replace(microsecond=0)


def _publish(md: Metadata[Any]) -> PublishedFile:
    return PublishedFile(md.signed.type, md.signed.version, md.to_bytes(_SERIALIZER))


def _meta_for(md: Metadata[Any]) -> MetaFile:
    return MetaFile.from_data(md.signed.version, md.to_bytes(_SERIALIZER), [HASH_ALGORITHM])


def _load(data: bytes, kind: type[Signed], role: str) -> Metadata[Any]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except Exception as exc:  # tuf raises DeserializationError and ValueError alike
        raise RepositoryError(f"stored {role} metadata is unreadable: {exc}") from None
    if not isinstance(md.signed, kind):
        raise RepositoryError(f"stored {role} metadata is a {md.signed.type}, not {role}")
    return md


class Repository:
    """The current state of the four top-level roles, and the online keys that sign them."""

    def __init__(
        self,
        root: Metadata[Root],
        targets: Metadata[Targets],
        snapshot: Metadata[Snapshot],
        timestamp: Metadata[Timestamp],
        signers: Mapping[str, Signer],
        lifetimes: Lifetimes | None = None,
    ) -> None:
        self.root = root
        self.targets = targets
        self.snapshot = snapshot
        self.timestamp = timestamp
        self.lifetimes = lifetimes or Lifetimes()
        self._signers: dict[str, Signer] = {}
        for role in ONLINE_ROLES:
            signer = signers.get(role)
            if signer is None:
                raise RepositoryError(f"no key given for the online role {role}")
            self._check_signer(role, signer, root.signed)
            self._signers[role] = signer

    @classmethod
    def create(
        cls,
        root_signers: Sequence[Signer],
        threshold: int,
        online: Mapping[str, Signer],
        now: datetime,
        lifetimes: Lifetimes | None = None,
    ) -> tuple[Repository, list[PublishedFile]]:
        """A new repository: root version 1 signed by every root key, and empty targets."""
        lifetimes = lifetimes or Lifetimes()
        distinct = len({_public(s).keyid for s in root_signers})
        if distinct != len(root_signers):
            raise RepositoryError("the same root key was given twice")
        if not 1 <= threshold <= distinct:
            raise RepositoryError(
                f"a root threshold of {threshold} needs between 1 and {distinct} keys"
            )
        root = Root(expires=_expiry(now, lifetimes.root), consistent_snapshot=True)
        for signer in root_signers:
            root.add_key(_public(signer), "root")
        root.roles["root"].threshold = threshold
        for role in ONLINE_ROLES:
            online_signer = online.get(role)
            if online_signer is None:
                raise RepositoryError(f"no key given for the online role {role}")
            root.add_key(_public(online_signer), role)
        root_md = Metadata(root)
        for signer in root_signers:
            root_md.sign(signer, append=True)
        targets = Metadata(Targets(expires=_expiry(now, lifetimes.targets)))
        targets.sign(online["targets"])
        snapshot = Metadata(Snapshot(expires=_expiry(now, lifetimes.snapshot)))
        snapshot.signed.meta["targets.json"] = _meta_for(targets)
        snapshot.sign(online["snapshot"])
        timestamp = Metadata(Timestamp(expires=_expiry(now, lifetimes.timestamp)))
        timestamp.signed.snapshot_meta = _meta_for(snapshot)
        timestamp.sign(online["timestamp"])
        repo = cls(root_md, targets, snapshot, timestamp, online, lifetimes)
        return repo, [_publish(md) for md in (root_md, targets, snapshot, timestamp)]

    @classmethod
    def load(
        cls,
        latest: Mapping[str, bytes],
        signers: Mapping[str, Signer],
        lifetimes: Lifetimes | None = None,
    ) -> Repository:
        """The repository from the latest stored file of each role."""
        missing = [role for role in TOP_LEVEL_ROLES if role not in latest]
        if missing:
            raise RepositoryError(f"the metadata store lacks {', '.join(missing)}")
        return cls(
            _load(latest["root"], Root, "root"),
            _load(latest["targets"], Targets, "targets"),
            _load(latest["snapshot"], Snapshot, "snapshot"),
            _load(latest["timestamp"], Timestamp, "timestamp"),
            signers,
            lifetimes,
        )

    # Targets.

    @property
    def target_files(self) -> dict[str, TargetFile]:
        return dict(self.targets.signed.targets)

    def add_target(
        self, path: str, data: bytes, custom: Mapping[str, Any], now: datetime
    ) -> list[PublishedFile]:
        """Publish `data` as target `path`; refused if `path` is already a different target."""
        return self.add_targets([(path, data, custom)], now)

    def add_targets(
        self, items: Sequence[tuple[str, bytes, Mapping[str, Any]]], now: datetime
    ) -> list[PublishedFile]:
        """Publish every (path, data, custom) in one new `targets`; refused (nothing published)
        if one of the paths is already a different target."""
        new = {}
        for path, data, custom in items:
            target = TargetFile.from_data(path, data, [HASH_ALGORITHM])
            target.unrecognized_fields["custom"] = copy.deepcopy(dict(custom))
            existing = self.targets.signed.targets.get(path)
            if existing is not None:
                if existing.hashes != target.hashes:
                    raise RepositoryError(f"{path} is already published with different bytes")
                if existing.custom == target.custom:
                    continue
            new[path] = target
        if not new:
            return []
        self.targets.signed.targets.update(new)
        return self._resign_from("targets", now)

    def remove_target(self, path: str, now: datetime) -> list[PublishedFile]:
        if path not in self.targets.signed.targets:
            raise RepositoryError(f"{path} is not a published target")
        del self.targets.signed.targets[path]
        return self._resign_from("targets", now)

    # Renewal.

    def renewal_due(self, role: str) -> datetime:
        """When `role` should be re-signed: halfway between its signing and its expiry."""
        expires: datetime = self._metadata(role).signed.expires
        return expires - self.lifetimes.of(role) / 2

    def next_renewal(self) -> datetime:
        return min(self.renewal_due(role) for role in ONLINE_ROLES)

    def refresh(self, now: datetime) -> list[PublishedFile]:
        """Re-sign every online role whose renewal is due, and the roles that list it."""
        for role in ONLINE_ROLES:
            expires: datetime = self._metadata(role).signed.expires
            shortened = expires > _expiry(now, self.lifetimes.of(role))
            if self.renewal_due(role) <= now or shortened:
                return self._resign_from(role, now)
        return []

    # Root rotation.

    def draft_root(
        self,
        now: datetime,
        online_keys: Mapping[str, SSlibKey] | None = None,
        root_keys: Sequence[SSlibKey] | None = None,
        threshold: int | None = None,
    ) -> Metadata[Root]:
        """The next root version, unsigned: the same keys except those replaced here."""
        current = self.root.signed
        draft = Root.from_dict(copy.deepcopy(current.to_dict()))
        draft.version = current.version + 1
        draft.expires = _expiry(now, self.lifetimes.root)
        for role, key in (online_keys or {}).items():
            if role not in ONLINE_ROLES:
                raise RepositoryError(f"{role} is not an online role")
            for keyid in list(draft.roles[role].keyids):
                draft.revoke_key(keyid, role)
            draft.add_key(key, role)
        if root_keys is not None:
            for keyid in list(draft.roles["root"].keyids):
                draft.revoke_key(keyid, "root")
            for key in root_keys:
                draft.add_key(key, "root")
        if threshold is not None:
            draft.roles["root"].threshold = threshold
        keys = len(draft.roles["root"].keyids)
        if not 1 <= draft.roles["root"].threshold <= keys:
            raise RepositoryError(
                f"a root threshold of {draft.roles['root'].threshold} needs between 1 and "
                f"{keys} root keys"
            )
        return Metadata(draft)

    def accept_root(
        self, new_root: Metadata[Root], signers: Mapping[str, Signer], now: datetime
    ) -> list[PublishedFile]:
        """Make `new_root` current if the rotation rules hold; re-sign roles whose key changed."""
        current = self.root.signed
        proposed = new_root.signed
        if proposed.version != current.version + 1:
            raise RepositoryError(
                f"the new root is version {proposed.version}; the next one must be "
                f"{current.version + 1}"
            )
        if proposed.is_expired(now):
            raise RepositoryError("the new root has already expired")
        if not proposed.consistent_snapshot:
            raise RepositoryError("the new root must keep consistent snapshots on")
        payload = new_root.signed_bytes
        try:
            current.verify_delegate("root", payload, new_root.signatures)
        except UnsignedMetadataError as exc:
            raise RepositoryError(
                f"the new root is not signed by a threshold of the current root keys: {exc}"
            ) from None
        try:
            proposed.verify_delegate("root", payload, new_root.signatures)
        except UnsignedMetadataError as exc:
            raise RepositoryError(
                f"the new root is not signed by a threshold of its own root keys: {exc}"
            ) from None
        merged = {**self._signers, **signers}
        for role in ONLINE_ROLES:
            if proposed.roles[role].threshold != 1:
                raise RepositoryError(f"the new root must keep one signature for {role}")
            self._check_signer(role, merged[role], proposed)
        changed = [
            role
            for role in ONLINE_ROLES
            if set(current.roles[role].keyids) != set(proposed.roles[role].keyids)
        ]
        self.root = new_root
        self._signers = merged
        published = [_publish(new_root)]
        if changed:
            published += self._resign_from(changed[0], now)
        return published

    # Internals.

    def _metadata(self, role: str) -> Metadata[Any]:
        md: Metadata[Any] = getattr(self, role)
        return md

    def _resign_from(self, first: str, now: datetime) -> list[PublishedFile]:
        """Bump and re-sign `first` and every role after it in targets -> snapshot -> timestamp."""
        published = []
        for role in ONLINE_ROLES[ONLINE_ROLES.index(first) :]:
            md = self._metadata(role)
            if role == "snapshot":
                md.signed.meta["targets.json"] = _meta_for(self.targets)
            elif role == "timestamp":
                md.signed.snapshot_meta = _meta_for(self.snapshot)
            md.signed.version += 1
            md.signed.expires = _expiry(now, self.lifetimes.of(role))
            md.sign(self._signers[role])
            published.append(_publish(md))
        return published

    @staticmethod
    def _check_signer(role: str, signer: Signer, root: Root) -> None:
        keyid = _public(signer).keyid
        if keyid not in root.roles[role].keyids:
            raise RepositoryError(
                f"the key given for {role} ({keyid[:12]}) is not the one the root names for it"
            )


def _public(signer: Signer) -> SSlibKey:
    key = signer.public_key
    if not isinstance(key, SSlibKey):
        raise RepositoryError("only securesystemslib keys are supported")
    return key
