"""A/B slots: the rune the agent runs and the one before it, kept so that power loss is harmless.

Layout (`state_dir/slots/`):
    .lock           taken (flock, exclusive, non-blocking) by every operation that writes
    state.json      `SlotState`: the active and previous slot, each with the SHA-256 it must
                    hold; the slot an install is writing; probation; a bounded history
    a/rune          the rune's bytes (bundle or legacy `.rune`)
    a/meta.json     its `SlotRune` (target, org, name, version, sha256, length, kind, ...)
    b/rune, b/meta.json

Rules:
- Every file is replaced whole: written to `NAME.tmp`, flushed, fsynced, `os.replace`d over
  NAME, then the directory is fsynced. A reader sees the old file or the new one, never a mix.
  One directory fsync makes every rename and removal before it in that directory durable, so
  `install` fsyncs the slot's directory once, after `meta.json` (the commit mark) is in place,
  not after each of the removal of the old `meta.json` and the rename of `rune`: until then a
  power loss can keep any mix of old and new names, and each mix is a slot that is not intact
  (an old `meta.json` does not match a new `rune`) or the old slot, which the `installing`
  pointer, durable before the slot is touched, tells recovery to empty.
- A slot is intact when its `meta.json` parses and its `rune` is exactly that many bytes with
  that SHA-256 (and, for a pointer in `state.json`, the SHA-256 the pointer expects). `meta.json`
  is removed before a slot is rewritten and written last, so it is the slot's commit mark: a
  half-written slot has none and is never run.
- `install` writes only the inactive slot. It first records in `state.json` which slot it is
  writing (dropping `previous` if the previous rune lived there), so recovery can tell an
  interrupted install from a lost state file. Nothing about the active rune changes.
- `install` hashes the bytes it is given to check them against the `SlotRune`, unless it is
  given the `VerifiedTarget` TUF checked, holding that very (immutable) bytes object with the
  same length and SHA-256.
- `switch` is one atomic write of `state.json`: the installed slot becomes active, the old active
  becomes previous, and probation starts for the new rune in the same write. It first checks the
  slot is intact: by reading and hashing it, or, when this `Slots` object wrote the slot itself
  (in `install`, having checked the bytes) and neither `rune` nor `meta.json` has changed since
  (same device, inode, size, mtime and ctime), from what it wrote. Reading a file back right
  after writing it reads the page cache, not the medium, so that read-back proved nothing the
  write had not; what catches a slot damaged on disk is the hash check at every `active()`
  (before each run) and at every `recover`.
- `rollback` (or a failed probation, or a corrupted active slot) makes the previous rune active
  again; `deactivate` (the active rune was revoked) does so only if the previous rune is intact
  and the caller does not refuse it too, and otherwise leaves no rune active. The slot left
  behind loses its `meta.json`, so neither a later rollback nor a recovery can bring back a rune
  that failed or was revoked. Every change of the active rune is recorded in the history.
- `recover` runs at every agent start and makes the slots consistent after a crash at any
  point: temp files go, an interrupted install leaves an inactive slot (kept if it finished
  writing, emptied if not), pointers to slots that are not intact are dropped (falling back as
  above), and probation for a rune that is no longer active is void. If `state.json` itself is
  missing or unreadable while intact slots exist, the state is rebuilt from them: the intact rune
  installed first becomes active (it is the one most likely to have run before; a later one may
  never have been switched to), none is previous, and runes the caller refuses are skipped.
- Crash points (`agent.faults`): `write-slot` when half of a rune is written to its temp file;
  `switch` when the new slot is complete and verified, just before `state.json` moves the active
  pointer; `probation` just after that write, which holds the switch and the probation record
  together, so a restart there continues probation.
- Probation (`agent.probation`) is persisted in `state.json` and survives restarts; the slots
  roll back by themselves when a rune fails it. With nothing intact to roll back to, the failing
  rune stays active (it is still the only runnable one) and the failure is recorded.
- One agent process per state directory: a second holder of the lock gets `SlotsLocked`. Every
  JSON file is parsed strictly; malformed content is a `SlotStateError` naming the file and what
  is wrong. Time is passed in as `now` (seconds); there are no hidden clocks.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from agent import probation as prob
from agent.faults import crash_point
from ota.rune.bundle import is_bundle
from ota.rune.runefile import CapabilityKind
from ota.rune.wasm import is_wasm
from ota.targets import KINDS, RuneTarget, TargetNameError, rune_target_path

if TYPE_CHECKING:
    from ota.updater import VerifiedTarget

FORMAT = "fleet-slots/1"
SLOTS = ("a", "b")
STATE = "state.json"
RUNE = "rune"
META = "meta.json"
LOCK = ".lock"
TMP_SUFFIX = ".tmp"
HISTORY_LIMIT = 64
MAX_JSON_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Refuse = Callable[["SlotRune"], bool]
# What identifies a file's version on disk: st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns.
FileId = tuple[int, int, int, int, int]


class SlotError(Exception):
    """A slot operation that was refused or could not be done; the message says why."""


class SlotStateError(SlotError):
    """A state or metadata file that is malformed; the message names the file."""


class SlotCorrupted(SlotError):
    """A slot that does not hold an intact rune."""


class SlotsLocked(SlotError):
    """Another process holds the slots' lock."""


class NoRollbackTarget(SlotError):
    """There is no intact previous rune to go back to."""


class EventKind(enum.StrEnum):
    INSTALL = "install"
    SWITCH = "switch"
    ROLLBACK = "rollback"
    REVOKE = "revoke"
    RECOVER = "recover"
    PROBATION_PASSED = "probation-passed"
    PROBATION_FAILED = "probation-failed"


_EVENT_KINDS = frozenset(k.value for k in EventKind)


class RunOutcome(enum.StrEnum):
    """What a reported run did: nothing (trusted rune), or something to probation."""

    TRUSTED = "trusted"
    ON_PROBATION = "on-probation"
    PASSED = "passed"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


@dataclass(frozen=True)
class SlotRune:
    """What a slot holds: the rune's target, identity and digest (`meta.json`)."""

    target: str
    org: str
    name: str
    version: str
    sha256: str
    length: int
    kind: str
    capabilities: tuple[str, ...]
    installed_at: float

    def __post_init__(self) -> None:
        try:
            expected = rune_target_path(self.org, self.name, self.version)
        except TargetNameError as exc:
            raise SlotError(str(exc)) from None
        if self.target != expected:
            raise SlotError(f"target {self.target!r} does not match {expected}")
        if not _SHA256.match(self.sha256):
            raise SlotError(f"sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if not _count(self.length):
            raise SlotError(f"length {self.length!r} is not a byte count")
        if self.kind not in KINDS:
            raise SlotError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        unknown = [c for c in self.capabilities if c not in CapabilityKind.__members__]
        if unknown:
            raise SlotError(f"unknown capabilities {', '.join(map(repr, unknown))}")
        if not _finite(self.installed_at):
            raise SlotError(f"installed_at {self.installed_at!r} is not a time")

    @classmethod
    def for_bytes(
        cls,
        data: bytes,
        *,
        org: str,
        name: str,
        version: str,
        kind: str,
        capabilities: tuple[str, ...],
        installed_at: float,
    ) -> SlotRune:
        """The metadata for rune bytes about to be installed."""
        try:
            target = rune_target_path(org, name, version)
        except TargetNameError as exc:
            raise SlotError(str(exc)) from None
        return cls(
            target=target,
            org=org,
            name=name,
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            length=len(data),
            kind=kind,
            capabilities=capabilities,
            installed_at=installed_at,
        )

    @classmethod
    def for_target(cls, data: bytes, target: RuneTarget, installed_at: float) -> SlotRune:
        """The metadata for the bytes of a verified TUF rune target."""
        return cls.for_bytes(
            data,
            org=target.org,
            name=target.name,
            version=target.version,
            kind=target.kind,
            capabilities=target.capabilities,
            installed_at=installed_at,
        )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "org": self.org,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "length": self.length,
            "kind": self.kind,
            "capabilities": list(self.capabilities),
            "installed_at": self.installed_at,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = META) -> SlotRune:
        if not isinstance(data, dict):
            raise SlotStateError(f"{where} must hold a JSON object")
        try:
            capabilities = data["capabilities"]
            if not isinstance(capabilities, list) or not all(
                isinstance(c, str) for c in capabilities
            ):
                raise SlotError("capabilities must be a list of names")
            texts = {k: data[k] for k in ("target", "org", "name", "version", "sha256", "kind")}
            wrong = [k for k, v in texts.items() if not isinstance(v, str)]
            if wrong:
                raise SlotError(f"{', '.join(wrong)} must be text")
            return cls(
                capabilities=tuple(capabilities),
                length=data["length"],
                installed_at=data["installed_at"],
                **texts,
            )
        except KeyError as exc:
            raise SlotStateError(f"{where} has no {exc.args[0]!r}") from None
        except SlotError as exc:
            raise SlotStateError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class SlotRef:
    """A pointer in `state.json`: a slot and the SHA-256 of the rune it must hold."""

    slot: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any, what: str) -> SlotRef | None:
        if data is None:
            return None
        slot = data.get("slot") if isinstance(data, dict) else None
        sha256 = data.get("sha256") if isinstance(data, dict) else None
        if slot not in SLOTS or not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise SlotStateError(f"{STATE}: {what} must be null or {{slot: a|b, sha256}}")
        return cls(slot, sha256)


@dataclass(frozen=True)
class SlotEvent:
    at: float
    kind: EventKind
    slot: str | None = None
    rune: str | None = None
    sha256: str | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "kind": self.kind.value,
            "slot": self.slot,
            "rune": self.rune,
            "sha256": self.sha256,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Any) -> SlotEvent:
        if not isinstance(data, dict):
            raise SlotStateError(f"{STATE}: a history event must be a JSON object")
        at, kind = data.get("at"), data.get("kind")
        slot, rune, sha256 = data.get("slot"), data.get("rune"), data.get("sha256")
        reason = data.get("reason", "")
        if not _finite(at) or not isinstance(kind, str) or kind not in _EVENT_KINDS:
            raise SlotStateError(f"{STATE}: a history event needs a time and a known kind")
        if slot not in (None, *SLOTS) or not all(
            v is None or isinstance(v, str) for v in (rune, sha256)
        ):
            raise SlotStateError(f"{STATE}: a history event has a malformed slot or rune")
        if not isinstance(reason, str):
            raise SlotStateError(f"{STATE}: a history event has a reason that is not text")
        return cls(float(at), EventKind(kind), slot, rune, sha256, reason)


@dataclass(frozen=True)
class SlotState:
    """`state.json`: which slot runs, which one to fall back to, and what happened."""

    active: SlotRef | None = None
    previous: SlotRef | None = None
    installing: SlotRef | None = None
    probation: prob.Probation | None = None
    history: tuple[SlotEvent, ...] = ()

    def __post_init__(self) -> None:
        if self.previous is not None and self.active is None:
            raise SlotStateError(f"{STATE}: there is a previous rune but no active one")
        if self.active and self.previous and self.active.slot == self.previous.slot:
            raise SlotStateError(f"{STATE}: active and previous are both slot {self.active.slot}")
        in_use = {ref.slot for ref in (self.active, self.previous) if ref is not None}
        if self.installing is not None and self.installing.slot in in_use:
            raise SlotStateError(
                f"{STATE}: slot {self.installing.slot} is being installed and in use"
            )

    def with_event(self, event: SlotEvent) -> SlotState:
        return replace(self, history=(*self.history, event)[-HISTORY_LIMIT:])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "active": self.active.to_json() if self.active else None,
            "previous": self.previous.to_json() if self.previous else None,
            "installing": self.installing.to_json() if self.installing else None,
            "probation": self.probation.to_json() if self.probation else None,
            "history": [e.to_json() for e in self.history],
        }

    @classmethod
    def from_json(cls, data: Any) -> SlotState:
        if not isinstance(data, dict):
            raise SlotStateError(f"{STATE} must hold a JSON object")
        if data.get("format") != FORMAT:
            raise SlotStateError(f"{STATE} has format {data.get('format')!r}, not {FORMAT}")
        history = data.get("history", [])
        if not isinstance(history, list):
            raise SlotStateError(f"{STATE}: history must be a list")
        probation = None
        if data.get("probation") is not None:
            try:
                probation = prob.Probation.from_json(data["probation"])
            except prob.ProbationError as exc:
                raise SlotStateError(f"{STATE}: {exc}") from None
        return cls(
            active=SlotRef.from_json(data.get("active"), "active"),
            previous=SlotRef.from_json(data.get("previous"), "previous"),
            installing=SlotRef.from_json(data.get("installing"), "installing"),
            probation=probation,
            history=tuple(SlotEvent.from_json(e) for e in history)[-HISTORY_LIMIT:],
        )


@dataclass(frozen=True)
class RunResult:
    """What `record_run` did, the slot active afterwards and why (empty when nothing ended)."""

    outcome: RunOutcome
    active: str | None
    reason: str = ""


class Slots:
    """The A/B slots of one device state directory."""

    def __init__(self, state_dir: Path, *, policy: prob.ProbationPolicy | None = None) -> None:
        self.root = Path(state_dir) / "slots"
        self.policy = policy or prob.ProbationPolicy()
        self._thread_lock = threading.RLock()
        self._depth = 0
        # Slots this object wrote and checked (`install`), for the `switch` that follows.
        self._written: dict[str, tuple[SlotRune, FileId | None, FileId | None]] = {}
        try:
            for slot in SLOTS:
                (self.root / slot).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SlotError(f"cannot create the slots directory {self.root}: {exc}") from None

    # -- reading --------------------------------------------------------------------------------

    def state(self) -> SlotState:
        """`state.json` as it is on disk (empty before the first install)."""
        state = self._read_state()
        return state if state is not None else SlotState()

    def rune(self, slot: str) -> SlotRune:
        """The metadata of the intact rune in `slot`; `SlotCorrupted` if it holds none."""
        if slot not in SLOTS:
            raise SlotError(f"there is no slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self._check(slot)[1]

    def contents(self, slot: str) -> bytes:
        """The intact rune in `slot`; `SlotCorrupted` if it holds none."""
        if slot not in SLOTS:
            raise SlotError(f"there is no slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self._check(slot)[0]

    def active(self, now: float) -> tuple[bytes, SlotRune] | None:
        """The active rune, verified; a corrupted one is replaced by the previous rune."""
        state = self.state()
        if state.active is None:
            return None
        try:
            return self._check(state.active.slot, state.active.sha256)
        except SlotCorrupted:
            pass
        with self._locked():
            state = self.state()
            while state.active is not None:
                try:
                    return self._check(state.active.slot, state.active.sha256)
                except SlotCorrupted as exc:
                    state = self._fall_back(state, EventKind.ROLLBACK, str(exc), now)
            return None

    # -- changing -------------------------------------------------------------------------------

    def install(
        self, data: bytes, info: SlotRune, *, verified: VerifiedTarget | None = None
    ) -> str:
        """Write `data` into the inactive slot and return its name; the active rune stays.

        `data` must be `info.length` bytes with SHA-256 `info.sha256`. That is checked by hashing
        `data`, unless `verified` is the `VerifiedTarget` TUF checked that holds this very bytes
        object (`is`, and bytes cannot change) with the same length and SHA-256."""
        checked = (
            verified is not None
            and verified.data is data
            and (verified.length, verified.sha256) == (info.length, info.sha256)
        )
        if len(data) != info.length or (
            not checked and hashlib.sha256(data).hexdigest() != info.sha256
        ):
            raise SlotError(f"{info.ref}: the bytes do not match the length and sha256 given")
        looks_like = "bundle" if is_bundle(data) else "legacy" if is_wasm(data) else None
        if looks_like != info.kind:
            raise SlotError(f"{info.ref} is declared a {info.kind} rune but is not one")
        with self._locked():
            state = self.state()
            slot = self._inactive(state)
            replaced = self._meta_if_intact(slot)
            previous = state.previous
            if previous is not None and previous.slot == slot:
                previous = None
            state = replace(state, installing=SlotRef(slot, info.sha256), previous=previous)
            self._write_state(state)
            folder = self.root / slot
            self._written.pop(slot, None)
            try:
                # One directory fsync, after meta.json: it makes all three durable (see Rules).
                _remove(folder / META, sync_dir=False)
                _write_file(folder / RUNE, data, crash_step="write-slot", sync_dir=False)
                _write_file(folder / META, _dump(info.to_json()))
            except SlotError:
                with suppress(SlotError):
                    _remove(folder / META)
                    self._write_state(replace(state, installing=None))
                raise
            reason = f"replaces {replaced.ref}" if replaced is not None else ""
            event = SlotEvent(
                info.installed_at, EventKind.INSTALL, slot, info.ref, info.sha256, reason
            )
            self._write_state(replace(state, installing=None).with_event(event))
            self._written[slot] = (info, _file_id(folder / RUNE), _file_id(folder / META))
            return slot

    def switch(self, slot: str, now: float) -> SlotRune:
        """Make the rune installed in `slot` active; the active one becomes previous."""
        if slot not in SLOTS:
            raise SlotError(f"there is no slot {slot!r}; slots are {', '.join(SLOTS)}")
        with self._locked():
            state = self.state()
            if state.active is not None and state.active.slot == slot:
                raise SlotError(f"slot {slot} is already active")
            if state.installing is not None and state.installing.slot == slot:
                raise SlotError(f"slot {slot} is still being installed")
            info = self._just_written(slot)
            if info is None:
                try:
                    info = self._check(slot)[1]
                except SlotCorrupted as exc:
                    raise SlotError(f"cannot switch: {exc}; install the rune again") from None
            crash_point("switch")
            event = SlotEvent(now, EventKind.SWITCH, slot, info.ref, info.sha256)
            switched = replace(
                state,
                active=SlotRef(slot, info.sha256),
                previous=state.active,
                probation=prob.start(info.sha256, now, self.policy),
            )
            self._write_state(switched.with_event(event))
            crash_point("probation")
            return info

    def rollback(self, reason: str, now: float) -> str:
        """Make the previous rune active again; `NoRollbackTarget` if there is none intact."""
        with self._locked():
            state = self.state()
            if state.active is None:
                raise NoRollbackTarget("no rune is active, so there is nothing to roll back")
            return self._roll_back(state, reason, now)[1]

    def deactivate(self, reason: str, now: float, *, refuse: Refuse | None = None) -> str | None:
        """Stop running the active rune (it was revoked): run the previous rune if it is intact
        and `refuse` does not refuse it too, otherwise none. Returns the slot now active."""
        with self._locked():
            state = self.state()
            gone, previous = state.active, state.previous
            if gone is None:
                return None
            fallback, why_not = self._usable_previous(state)
            refused = fallback is not None and refuse is not None and refuse(fallback)
            if refused:
                why_not = f"the previous rune {fallback.ref if fallback else ''} is refused too"
            new_active = previous if fallback is not None and not refused else None
            if new_active is not None and fallback is not None:
                outcome = f"now running {fallback.ref} from slot {new_active.slot}"
            else:
                outcome = f"no rune is active ({why_not})"
            old = self._meta_if_intact(gone.slot, gone.sha256)
            event = SlotEvent(
                now,
                EventKind.REVOKE,
                gone.slot,
                old.ref if old else None,
                gone.sha256,
                f"{reason}; {outcome}",
            )
            deactivated = replace(state, active=new_active, previous=None, probation=None)
            self._write_state(deactivated.with_event(event))
            self._retire(gone)
            if refused:
                self._retire(previous)
            return new_active.slot if new_active is not None else None

    def record_run(self, ok: bool, reason: str, now: float) -> RunResult:
        """Report one run of the active rune; on probation this may pass it or roll it back."""
        with self._locked():
            state = self.state()
            active = state.active.slot if state.active else None
            current = state.probation
            if current is None or state.active is None:
                return RunResult(RunOutcome.TRUSTED, active)
            return self._judge(state, prob.record(current, ok, reason, now), now)

    def check_probation(self, now: float) -> RunResult:
        """End probation if its window has passed (for a rune that is not run often)."""
        with self._locked():
            state = self.state()
            active = state.active.slot if state.active else None
            if state.probation is None or state.active is None:
                return RunResult(RunOutcome.TRUSTED, active)
            return self._judge(state, prob.expire(state.probation, now), now)

    def recover(self, now: float, *, refuse: Refuse | None = None) -> SlotState:
        """Make the slots consistent after a crash at any point; call at every agent start."""
        with self._locked():
            self._written.clear()
            for folder in (self.root, *(self.root / s for s in SLOTS)):
                for leftover in folder.glob(f"*{TMP_SUFFIX}"):
                    if leftover.is_file():
                        _remove(leftover)
            try:
                stored = self._read_state()
            except SlotStateError as exc:
                return self._rebuild(str(exc), now, refuse)
            if stored is None:
                if any(self._meta_if_intact(s) for s in SLOTS):
                    return self._rebuild(f"{STATE} is missing", now, refuse)
                state = SlotState()
                self._write_state(state)
                return state
            state = self._repair(stored, now)
            if state != stored:
                self._write_state(state)
            return state

    # -- internals --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            path = self.root / LOCK
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise SlotError(f"cannot open the slots lock {path}: {exc}") from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise SlotError(f"cannot lock {path}: {exc}") from None
                    raise SlotsLocked(
                        f"the slots in {self.root} are in use by another process (it holds "
                        f"{path}); run one agent per state directory"
                    ) from None
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
            finally:
                os.close(fd)

    def _read_state(self) -> SlotState | None:
        path = self.root / STATE
        raw = _read_json_file(path)
        if raw is None:
            return None
        return SlotState.from_json(raw)

    def _write_state(self, state: SlotState) -> None:
        _write_file(self.root / STATE, _dump(state.to_json()))

    def _check(self, slot: str, sha256: str | None = None) -> tuple[bytes, SlotRune]:
        folder = self.root / slot
        try:
            raw = _read_json_file(folder / META)
        except SlotStateError as exc:
            raise SlotCorrupted(f"slot {slot}: {exc}") from None
        if raw is None:
            raise SlotCorrupted(f"slot {slot} holds no complete rune (it has no {META})")
        try:
            info = SlotRune.from_json(raw, f"slot {slot} {META}")
        except SlotStateError as exc:
            raise SlotCorrupted(str(exc)) from None
        try:
            with (folder / RUNE).open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                data = handle.read(info.length + 1) if size == info.length else b""
        except OSError as exc:
            raise SlotCorrupted(f"slot {slot}: its rune cannot be read: {exc}") from None
        if size != info.length or len(data) != info.length:
            raise SlotCorrupted(
                f"slot {slot}: {info.ref} is {size} bytes, its metadata says {info.length}"
            )
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise SlotCorrupted(f"slot {slot}: {info.ref} does not match its sha256")
        if sha256 is not None and info.sha256 != sha256:
            raise SlotCorrupted(
                f"slot {slot} holds {info.ref} ({info.sha256[:12]}), not the rune "
                f"{sha256[:12]} {STATE} expects there"
            )
        return data, info

    def _just_written(self, slot: str) -> SlotRune | None:
        """What `install` wrote into `slot`, if neither of its files has changed since."""
        written = self._written.pop(slot, None)
        if written is None:
            return None
        info, rune, meta = written
        folder = self.root / slot
        if rune is None or meta is None:
            return None
        if _file_id(folder / RUNE) != rune or _file_id(folder / META) != meta:
            return None
        return info

    def _meta_if_intact(self, slot: str, sha256: str | None = None) -> SlotRune | None:
        try:
            return self._check(slot, sha256)[1]
        except SlotCorrupted:
            return None

    def _inactive(self, state: SlotState) -> str:
        taken = state.active or state.previous
        if taken is None:
            return SLOTS[0]
        return SLOTS[1] if taken.slot == SLOTS[0] else SLOTS[0]

    def _retire(self, ref: SlotRef | None) -> None:
        if ref is not None:
            _remove(self.root / ref.slot / META)

    def _usable_previous(self, state: SlotState) -> tuple[SlotRune | None, str]:
        if state.previous is None:
            return None, "there is no previous rune"
        try:
            return self._check(state.previous.slot, state.previous.sha256)[1], ""
        except SlotCorrupted as exc:
            return None, f"the previous rune is not intact: {exc}"

    def _roll_back(self, state: SlotState, reason: str, now: float) -> tuple[SlotState, str]:
        fallback, why_not = self._usable_previous(state)
        if fallback is None or state.previous is None or state.active is None:
            raise NoRollbackTarget(f"cannot roll back: {why_not}")
        old = self._meta_if_intact(state.active.slot)
        event = SlotEvent(
            now,
            EventKind.ROLLBACK,
            state.active.slot,
            old.ref if old else None,
            state.active.sha256,
            f"{reason}; now running {fallback.ref} from slot {state.previous.slot}",
        )
        rolled = replace(state, active=state.previous, previous=None, probation=None).with_event(
            event
        )
        self._write_state(rolled)
        self._retire(state.active)
        return rolled, state.previous.slot

    def _fall_back(self, state: SlotState, kind: EventKind, reason: str, now: float) -> SlotState:
        """Leave the active rune because it is broken: to the previous rune, or to none."""
        try:
            return self._roll_back(state, reason, now)[0]
        except NoRollbackTarget as exc:
            assert state.active is not None
            event = SlotEvent(
                now, kind, state.active.slot, None, state.active.sha256, f"{reason}; {exc}"
            )
            emptied = replace(state, active=None, previous=None, probation=None)
            emptied = emptied.with_event(event)
            self._write_state(emptied)
            self._retire(state.active)
            return emptied

    def _judge(self, state: SlotState, step: prob.Step, now: float) -> RunResult:
        assert state.active is not None
        slot = state.active.slot
        if step.verdict is prob.Verdict.CONTINUE:
            if step.probation != state.probation:
                self._write_state(replace(state, probation=step.probation))
            return RunResult(RunOutcome.ON_PROBATION, slot)
        info = self._meta_if_intact(slot)
        rune = info.ref if info else None
        if step.verdict is prob.Verdict.PASSED:
            event = SlotEvent(
                now, EventKind.PROBATION_PASSED, slot, rune, state.active.sha256, step.reason
            )
            self._write_state(replace(state, probation=None).with_event(event))
            return RunResult(RunOutcome.PASSED, slot, step.reason)
        try:
            return RunResult(
                RunOutcome.ROLLED_BACK, self._roll_back(state, step.reason, now)[1], step.reason
            )
        except NoRollbackTarget as exc:
            reason = f"{step.reason}; {exc}, so {rune or 'the rune'} stays active"
            event = SlotEvent(
                now, EventKind.PROBATION_FAILED, slot, rune, state.active.sha256, reason
            )
            self._write_state(replace(state, probation=None).with_event(event))
            return RunResult(RunOutcome.FAILED, slot, reason)

    def _repair(self, state: SlotState, now: float) -> SlotState:
        if state.installing is not None:
            slot, sha256 = state.installing.slot, state.installing.sha256
            done = self._meta_if_intact(slot, sha256)
            if done is None:
                _remove(self.root / slot / META)
                what = f"the install into slot {slot} was interrupted; the slot is empty"
            else:
                what = f"the install of {done.ref} into slot {slot} finished; it is not active"
            event = SlotEvent(
                now, EventKind.RECOVER, slot, done.ref if done else None, sha256, what
            )
            state = replace(state, installing=None).with_event(event)
        if state.previous is not None:
            try:
                self._check(state.previous.slot, state.previous.sha256)
            except SlotCorrupted as exc:
                event = SlotEvent(
                    now,
                    EventKind.RECOVER,
                    state.previous.slot,
                    None,
                    state.previous.sha256,
                    f"dropped the previous rune: {exc}",
                )
                state = replace(state, previous=None).with_event(event)
        while state.active is not None:
            try:
                self._check(state.active.slot, state.active.sha256)
                break
            except SlotCorrupted as exc:
                state = self._fall_back(state, EventKind.RECOVER, str(exc), now)
        if state.probation is not None and (
            state.active is None or state.probation.sha256 != state.active.sha256
        ):
            state = replace(state, probation=None)
        return state

    def _rebuild(self, why: str, now: float, refuse: Refuse | None) -> SlotState:
        candidates = []
        for slot in SLOTS:
            info = self._meta_if_intact(slot)
            if info is not None and (refuse is None or not refuse(info)):
                candidates.append((info.installed_at, slot, info))
        if not candidates:
            event = SlotEvent(now, EventKind.RECOVER, reason=f"{why}; no intact rune, none active")
            state = SlotState().with_event(event)
        else:
            _, slot, info = min(candidates)
            event = SlotEvent(
                now,
                EventKind.RECOVER,
                slot,
                info.ref,
                info.sha256,
                f"{why}; rebuilt it with {info.ref}, the intact rune installed first, active",
            )
            state = SlotState(active=SlotRef(slot, info.sha256)).with_event(event)
        self._write_state(state)
        return state


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _read_json_file(path: Path) -> Any:
    """The parsed JSON in `path`, or None when it does not exist."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SlotStateError(f"{path} cannot be read: {exc}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise SlotStateError(f"{path} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlotStateError(f"{path} is not valid JSON: {exc}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_id(path: Path) -> FileId | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _write_file(
    path: Path, data: bytes, *, crash_step: str | None = None, sync_dir: bool = True
) -> None:
    """Replace `path` with `data` (see Rules); `sync_dir=False` leaves the directory fsync to
    the caller, who must make one in the same directory before anything relies on `path`."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            if crash_step is None:
                handle.write(data)
            else:
                half = len(data) // 2
                handle.write(data[:half])
                handle.flush()
                crash_point(crash_step)
                handle.write(data[half:])
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        if sync_dir:
            _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SlotError(f"cannot write {path}: {exc}") from None


def _remove(path: Path, *, sync_dir: bool = True) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SlotError(f"cannot remove {path}: {exc}") from None
    if sync_dir:
        _fsync_dir(path.parent)


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
