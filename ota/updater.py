"""The device's TUF client: refresh the fleet's signed metadata and fetch verified targets.

Rules:
- The only trust anchor is the `root.json` provisioned into the metadata dir; without one the
  client does not start (`UpdaterSetupError`). Newer roots are reached only through the TUF
  rotation chain from it (ngclient with `bootstrap=None`).
- Every metadata file has a bounded size (`UpdateLimits`); a target larger than
  `max_target_bytes` is refused from its signed length before a byte of it is fetched.
- A target is returned only after python-tuf's `TargetFile.verify_length_and_hashes` (the check
  ngclient's `download_target` makes) has passed against the signed targets metadata, on the very
  bytes object that is handed back: the body is fetched into memory (bounded by the signed length,
  from the URL ngclient would use) and nothing is copied to or read back from disk after the
  check. Only the fetcher's partial file touches the disk, for resuming, and it is deleted once
  the check has run. (`.target-*` copies an older client may have left behind are removed when
  the next client starts.)
- Every failure is one of three errors, each with a one-line reason and a short `kind`:
  `UpdateRefused` when the repository presented something that must not be trusted (bad or
  missing signatures, expired metadata, a rollback, bytes that do not match the signed hashes,
  more data than allowed, a target that is not published); `UpdateUnavailable` when the update
  server could not be reached or did not answer usefully (retry later: an outage, not an attack);
  and `UpdateUnauthorized`, a kind of `UpdateUnavailable`, when the server refused the device's
  signed request (HTTP 401/403): the device is not registered or its clock is off, which retrying
  alone will not fix.
- ngclient refreshes top-level metadata once per `Updater`: the first `refresh` uses the one
  built (and whose trusted root was loaded and verified) when the client started, and each later
  `refresh` starts a new one from the metadata trusted so far; rollback protection carries over
  through the metadata dir.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Root, Signed, Snapshot, TargetFile, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig

from ota.fetcher import TufFetcher
from ota.targets import COMMAND_KEY_TARGET, RuneTarget, TargetNameError

METADATA_PATH = "/tuf/metadata/"
TARGETS_PATH = "/tuf/targets/"
ROOT_FILE = "root.json"
_DOWNLOAD_PREFIX = ".target-"


class UpdateError(Exception):
    """An update that did not happen: `reason` says why in one line, `kind` is a short tag."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class UpdateRefused(UpdateError):
    """The repository presented metadata or bytes that fail verification: never install them."""


class UpdateUnavailable(UpdateError):
    """The update server could not be reached or did not answer usefully: try again later."""


class UpdateUnauthorized(UpdateUnavailable):
    """The server refused the device's signed request: register the device or fix its clock."""


class UpdaterSetupError(UpdateError):
    """The client cannot start: no usable trusted root in the metadata dir."""


@dataclass(frozen=True)
class UpdateLimits:
    """Upper bounds on what the device downloads, in bytes.

    The fleet's metadata is far below these: a root with five keys is ~3 KB, a timestamp ~0.5 KB,
    a snapshot ~0.2 KB per targets role and targets ~0.6 KB per published rune, so 8 MiB of
    targets is over ten thousand rune versions. A target is at most one rune bundle, which
    `ota.rune.bundle` already caps at 64 MiB.
    """

    root_max_bytes: int = 256 * 1024
    timestamp_max_bytes: int = 16 * 1024
    snapshot_max_bytes: int = 2 * 1024 * 1024
    targets_max_bytes: int = 8 * 1024 * 1024
    max_target_bytes: int = 64 * 1024 * 1024
    max_root_rotations: int = 32
    max_delegations: int = 32

    def config(self) -> UpdaterConfig:
        return UpdaterConfig(
            max_root_rotations=self.max_root_rotations,
            max_delegations=self.max_delegations,
            root_max_length=self.root_max_bytes,
            timestamp_max_length=self.timestamp_max_bytes,
            snapshot_max_length=self.snapshot_max_bytes,
            targets_max_length=self.targets_max_bytes,
            prefix_targets_with_hash=True,
        )


@dataclass(frozen=True)
class TargetInfo:
    """What the signed targets metadata says about one target."""

    path: str
    length: int
    sha256: str
    custom: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class VerifiedTarget:
    """A target's bytes, checked against the signed length and SHA-256."""

    path: str
    data: bytes = field(repr=False)
    sha256: str
    length: int
    custom: dict[str, Any] = field(repr=False)


class TufClient:
    """The fleet's TUF repository as seen from one device; use it from one thread at a time."""

    def __init__(
        self,
        metadata_dir: Path,
        server_url: str,
        fetcher: TufFetcher,
        download_dir: Path | None = None,
        limits: UpdateLimits | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.server_url = server_url.rstrip("/")
        self.fetcher = fetcher
        self.download_dir = download_dir or metadata_dir / "downloads"
        self.limits = limits or UpdateLimits()
        root = metadata_dir / ROOT_FILE
        if not root.is_file():
            raise UpdaterSetupError(
                f"no trusted root in {metadata_dir}: provision it with the fleet's root.json "
                "(the one `fleetctl init` wrote)",
                "no-trusted-root",
            )
        self._updater = self._new_updater()
        # What `_updater` was built from, while it has not refreshed: the first `refresh` uses
        # it unless one of these was changed since.
        self._unrefreshed: tuple[object, ...] | None = self._settings()
        self._refreshed = False
        for leftover in self.download_dir.glob(f"{_DOWNLOAD_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Fetch and verify the newest root, timestamp, snapshot and targets."""
        if self._unrefreshed is None or self._unrefreshed != self._settings():
            self._updater = self._new_updater()
        self._unrefreshed = None
        self._refreshed = False
        with self._translated("metadata"):
            self._updater.refresh()
        self._refreshed = True

    def target_info(self, path: str) -> TargetInfo | None:
        """The signed facts about `path`, or None if it is not published (refreshes if needed)."""
        targetfile = self._lookup(path)
        return None if targetfile is None else _info(targetfile)

    def is_published(self, path: str) -> bool:
        return self.target_info(path) is not None

    def rune_target(self, path: str) -> RuneTarget:
        """The fleet metadata of the rune published at `path`, checked against its path."""
        info = self._published(path)
        try:
            return RuneTarget.from_custom(path, info.custom)
        except TargetNameError as exc:
            raise UpdateRefused(str(exc), "bad-custom") from None

    def fetch_target(self, path: str) -> VerifiedTarget:
        """The bytes of target `path`, downloaded and verified against the signed metadata."""
        targetfile = self._lookup(path)
        if targetfile is None:
            raise _not_published(path)
        info = _info(targetfile)
        if info.length > self.limits.max_target_bytes:
            raise UpdateRefused(
                f"{path} is {info.length} bytes, more than the {self.limits.max_target_bytes} "
                "this device accepts",
                "too-large",
            )
        try:
            with (
                self._translated("target", path),
                self.fetcher.expect_target(info.sha256),
            ):
                data = self.fetcher.download_bytes(self._target_url(targetfile), info.length)
                try:
                    # ngclient's own check (what `Updater.download_target` runs), on the very
                    # bytes object handed back below: nothing is copied or re-read after it.
                    targetfile.verify_length_and_hashes(data)
                finally:
                    self.fetcher.discard_partial(info.sha256)
        except UpdateRefused:
            self.fetcher.discard_partial(info.sha256)
            raise
        return VerifiedTarget(path, data, info.sha256, info.length, info.custom)

    def command_key(self) -> dict[str, Any]:
        """The controller's command public key document, as published through TUF."""
        target = self.fetch_target(COMMAND_KEY_TARGET)
        try:
            document = json.loads(target.data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UpdateRefused(
                f"{COMMAND_KEY_TARGET} is not JSON ({exc})", "malformed-target"
            ) from None
        if not isinstance(document, dict):
            raise UpdateRefused(f"{COMMAND_KEY_TARGET} is not a JSON object", "malformed-target")
        return document

    # Internals.

    def _new_updater(self) -> Updater:
        try:
            return Updater(
                str(self.metadata_dir),
                f"{self.server_url}{METADATA_PATH}",
                str(self.download_dir),
                f"{self.server_url}{TARGETS_PATH}",
                fetcher=self.fetcher,
                config=self.limits.config(),
                bootstrap=None,
            )
        except (OSError, tuf_errors.RepositoryError, ValueError) as exc:
            raise UpdaterSetupError(
                f"the trusted root.json in {self.metadata_dir} is unusable ({exc}); "
                "provision it again with the fleet's root.json",
                "bad-trusted-root",
            ) from None

    def _settings(self) -> tuple[object, ...]:
        return (
            self.metadata_dir,
            self.server_url,
            self.download_dir,
            self.fetcher,
            self.limits,
        )

    def _target_url(self, targetfile: TargetFile) -> str:
        """Where `Updater.download_target` would fetch `targetfile` from."""
        target_path = targetfile.path
        if self._updater._trusted_set.root.consistent_snapshot:
            directory, sep, basename = target_path.rpartition("/")
            target_path = f"{directory}{sep}{next(iter(targetfile.hashes.values()))}.{basename}"
        return f"{self.server_url}{TARGETS_PATH}{target_path}"

    def _lookup(self, path: str) -> TargetFile | None:
        if not self._refreshed:
            self.refresh()
        with self._translated("metadata"):
            return self._updater.get_targetinfo(path)

    def _published(self, path: str) -> TargetInfo:
        info = self.target_info(path)
        if info is None:
            raise _not_published(path)
        return info

    @contextlib.contextmanager
    def _translated(self, phase: str, path: str = "") -> Iterator[None]:
        try:
            yield
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, OSError) as exc:
            _raise_translated(exc, phase, path, self._trusted())

    def _trusted(self) -> dict[str, Signed]:
        """The metadata ngclient has loaded so far, including an expired final one."""
        trusted_set: Any = getattr(self._updater, "_trusted_set", {})
        roles: dict[str, Signed] = {}
        for role in (Root.type, Timestamp.type, Snapshot.type):
            with contextlib.suppress(Exception):
                roles[role] = trusted_set[role]
        return roles


def _info(targetfile: TargetFile) -> TargetInfo:
    digest = targetfile.hashes.get("sha256")
    if digest is None:
        raise UpdateRefused(
            f"{targetfile.path} is signed without a SHA-256 hash, which this device requires",
            "no-sha256",
        )
    return TargetInfo(targetfile.path, targetfile.length, digest, dict(targetfile.custom))


def _not_published(path: str) -> UpdateRefused:
    return UpdateRefused(f"{path} is not in the signed targets metadata", "not-published")


_FRESHNESS = "(freeze attack, or the controller stopped re-signing)"
_TIMESTAMP_ROLLBACK = re.compile(r"New timestamp version (\d+) must be >= (\d+)")
_SNAPSHOT_ROLLBACK = re.compile(r"New snapshot version must be >= (\d+), got version (\d+)")
_META_ROLLBACK = re.compile(r"Expected (\S+)\.json version (\d+), got (\d+)")
_ROOT_VERSION = re.compile(r"Expected root version (\d+) instead got version (\d+)")
_META_VERSION = re.compile(r"Expected (\w+) (?:version |v)(\d+), got (?:v)?(\d+)")
_EXPIRED = re.compile(r"(?:Final |New )?(\w+)(?:\.json)? is expired")
_SIGNED_BY = re.compile(r"(\S+) was signed by (\d+)/(\d+) keys")


def _raise_translated(
    exc: Exception, phase: str, path: str, trusted: dict[str, Signed]
) -> NoReturn:
    """Raise the one-line UpdateError that says what `exc` (from ngclient) means."""
    what = path or "the repository metadata"
    message = str(exc)
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        status = exc.status_code
        if status in (401, 403):
            raise UpdateUnauthorized(
                f"the update server refused this device's signed request (HTTP {status}): the "
                "device is not registered, was revoked, or its clock is more than 5 minutes off",
                "unauthorized",
            ) from None
        if status == 404 and phase == "target":
            raise UpdateUnavailable(
                f"the update server has no file for {path} although the signed metadata lists "
                "it (a mirror that is not in sync yet)",
                "missing-target",
            ) from None
        raise UpdateUnavailable(
            f"the update server answered {message} while fetching {what}", f"http-{status}"
        ) from None
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        raise UpdateRefused(
            f"the server sent more data than allowed for {what}: {message} "
            "(endless-data attack or a broken server)",
            "too-long",
        ) from None
    if isinstance(exc, tuf_errors.SlowRetrievalError):
        raise UpdateUnavailable(f"fetching {what} timed out: {message}", "timeout") from None
    if isinstance(exc, tuf_errors.DownloadError):
        raise UpdateUnavailable(f"fetching {what} failed: {message}", "network") from None
    if isinstance(exc, OSError):
        raise UpdateUnavailable(
            f"cannot write update files on this device: {exc}", "local-io"
        ) from None
    raise _refusal(exc, phase, path, trusted) from None


def _refusal(exc: Exception, phase: str, path: str, trusted: dict[str, Signed]) -> UpdateRefused:
    message = str(exc)
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        if phase == "target":
            if message.startswith("Observed length"):
                return UpdateRefused(
                    f"target length mismatch for {path}: the server sent a different number of "
                    f"bytes than the signed metadata says ({message})",
                    "length-mismatch",
                )
            return UpdateRefused(
                f"target hash mismatch for {path}: the server sent different bytes than the "
                "signed metadata says",
                "hash-mismatch",
            )
        return UpdateRefused(
            f"metadata does not match the length or hash its parent role signed ({message}): "
            "mix-and-match attack or a half-published repository",
            "metadata-mismatch",
        )
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        match = _EXPIRED.search(message)
        role = match.group(1) if match else "some"
        signed = trusted.get(role)
        when = f" at {_utc(signed.expires)}" if signed is not None else ""
        if role == Root.type:
            return UpdateRefused(
                f"root metadata expired{when}: the fleet root must be renewed with the offline "
                "root keys",
                "expired",
            )
        return UpdateRefused(f"{role} metadata expired{when} {_FRESHNESS}", "expired")
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return _version_refusal(message)
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        match = _SIGNED_BY.search(message)
        if match:
            role, good, threshold = match.groups()
            return UpdateRefused(
                f"{role} metadata has {good} valid signature(s) from the keys the fleet trusts "
                f"for it; it needs {threshold}",
                "bad-signature",
            )
        return UpdateRefused(f"metadata signature check failed: {message}", "bad-signature")
    if isinstance(exc, DeserializationError):
        return UpdateRefused(f"the server sent malformed metadata: {message}", "malformed")
    return UpdateRefused(f"the repository was refused: {message}", "repository")


def _version_refusal(message: str) -> UpdateRefused:
    if match := _TIMESTAMP_ROLLBACK.search(message):
        new, old = match.groups()
        return _rollback("timestamp", new, old)
    if match := _SNAPSHOT_ROLLBACK.search(message):
        old, new = match.groups()
        return _rollback("snapshot", new, old)
    if match := _META_ROLLBACK.search(message):
        # ngclient's message for this case names the two versions in either order.
        role, first, second = match.groups()
        low, high = sorted((int(first), int(second)))
        return _rollback(role, str(low), str(high))
    if match := _ROOT_VERSION.search(message):
        expected, got = match.groups()
        return UpdateRefused(
            f"root version {got} is not the next one ({expected}): root versions go up by one",
            "bad-version",
        )
    if match := _META_VERSION.search(message):
        role, expected, got = match.groups()
        parent = "timestamp" if role == Snapshot.type else "snapshot"
        return UpdateRefused(
            f"{role} version {got} is not the version {expected} the {parent} lists "
            "(mix-and-match attack or a half-published repository)",
            "inconsistent",
        )
    return UpdateRefused(f"metadata version refused: {message}", "bad-version")


def _rollback(role: str, new: str, old: str) -> UpdateRefused:
    return UpdateRefused(
        f"rollback: {role} version {new} is older than the trusted {old}", "rollback"
    )


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
