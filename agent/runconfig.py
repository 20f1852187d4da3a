"""The run settings: what feeds the active rune, how often it runs, and where its outputs go.

They are the `run:` section of `STATE_DIR/agent.yaml` (the rest of that file is the owner's policy,
`agent.policy`):

    run:
      input:                    # default: {kind: random}
        kind: accelerometer     # random | replay | accelerometer
        seed: 7                 # any kind, optional: seeds RAND (and the simulated data)
        hz: 100                 # accelerometer: simulated samples per second
        noise: 0.05             # accelerometer: standard deviation of the noise, m/s^2
        burst_every_s: 4.0      # accelerometer: mean seconds between gesture bursts (0: none)
      # or: {kind: replay, path: /dev/ttyACM0, format: csv, scale: 1.0, timeout_s: 1.0}
      interval_s: 1.0           # seconds from the start of one inference to the next
      sink:
        path: outputs.jsonl     # relative paths are in the state dir
        max_bytes: 10485760     # rotated to PATH.1 beyond this
      remote_replay_paths: []   # owner only: the paths a controller may choose to replay

Rules:
- No file, no `run:` section or a missing key: the defaults above. An unknown key, a key of
  another input kind, or a bad value is a `RunConfigError` naming it (`run.input.hz`).
- `replay` needs a `path` (a regular file, which loops at its end, or a FIFO or character device,
  read as a stream) and a `format` (`f32le`, `i16le`, `u8`, `csv`, `jsonl`; `csv` and `jsonl`
  are guessed from a `.csv` / `.jsonl` / `.ndjson` suffix). Relative paths are in the state dir.
- `apply_config` is what a controller `config` command may do, and all it may do: replace
  `input`, set `interval_s` or `sink.max_bytes`. Capabilities, probation, the rest of the policy,
  the sink's path and `remote_replay_paths` are the owner's: naming them is an error. A remote
  `replay` must name a path the owner listed in `remote_replay_paths`, and never one in the state
  dir (where the device key lives), even through a symlink.
- A change is checked completely before anything is written; a refused change leaves the file
  as it was. The file is replaced atomically (temp file, fsync, rename, directory fsync). Only
  the `run:` block is rewritten; every other line, comments included, is kept as it was (if the
  file writes `run:` in a form that cannot be replaced line by line, the whole file is dumped
  again with the same settings and without its comments).
"""

from __future__ import annotations

import copy
import enum
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.policy import POLICY_FILE

SECTION = "run"
DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.01
MAX_INTERVAL_S = 86_400.0
DEFAULT_SINK = "outputs.jsonl"
DEFAULT_SINK_BYTES = 10 * 1024 * 1024
MIN_SINK_BYTES = 4096
MAX_SINK_BYTES = 1024 * 1024 * 1024
MAX_SEED = 2**63 - 1
REMOTE_KEYS = ("input", "interval_s", "sink.max_bytes")
_RUN_KEYS = {"input", "interval_s", "sink", "remote_replay_paths"}
_SINK_KEYS = {"path", "max_bytes"}
_POLICY_KEYS = {
    "allowed_capabilities",
    "health_check_calls",
    "allow_downgrade",
    "require_provenance",
    "probation",
    "telemetry",
}
_TOP_LEVEL_KEY = re.compile(r"^[^\s#]")
_RUN_KEY = re.compile(r"^run\s*:")
_RUN_LINE = re.compile(r"^run\s*:(\s*(#.*)?)?$")
_write_lock = threading.Lock()


class RunConfigError(ValueError):
    """Run settings, or a change to them, that cannot be used; the message names the key."""


class InputKind(enum.StrEnum):
    RANDOM = "random"
    REPLAY = "replay"
    ACCELEROMETER = "accelerometer"


class SampleFormat(enum.StrEnum):
    """How a replayed file or stream writes its numbers (see `agent.sensors`)."""

    F32LE = "f32le"
    I16LE = "i16le"
    U8 = "u8"
    CSV = "csv"
    JSONL = "jsonl"


_SUFFIX_FORMATS = {".csv": SampleFormat.CSV, ".jsonl": SampleFormat.JSONL}
_SUFFIX_FORMATS[".ndjson"] = SampleFormat.JSONL


@dataclass(frozen=True)
class RandomInput:
    """Seeded synthetic data for every capability (what health checks run on)."""

    seed: int | None = None

    @property
    def kind(self) -> InputKind:
        return InputKind.RANDOM

    def describe(self) -> str:
        return "random" + (f" (seed {self.seed})" if self.seed is not None else "")


@dataclass(frozen=True)
class ReplayInput:
    """Numbers read from a file (looped) or a FIFO or character device (a stream)."""

    path: Path
    format: SampleFormat
    seed: int | None = None
    scale: float = 1.0
    timeout_s: float = 1.0

    @property
    def kind(self) -> InputKind:
        return InputKind.REPLAY

    def describe(self) -> str:
        return f"replay {self.path} ({self.format.value})"


@dataclass(frozen=True)
class AccelerometerInput:
    """A simulated 3-axis accelerometer: gravity, noise and occasional gesture-like bursts."""

    seed: int | None = None
    hz: float = 100.0
    noise: float = 0.05
    burst_every_s: float = 4.0

    @property
    def kind(self) -> InputKind:
        return InputKind.ACCELEROMETER

    def describe(self) -> str:
        return f"simulated accelerometer at {self.hz:g} Hz" + (
            f" (seed {self.seed})" if self.seed is not None else ""
        )


InputConfig = RandomInput | ReplayInput | AccelerometerInput

_INPUT_KEYS: dict[InputKind, set[str]] = {
    InputKind.RANDOM: {"kind", "seed"},
    InputKind.REPLAY: {"kind", "seed", "path", "format", "scale", "timeout_s"},
    InputKind.ACCELEROMETER: {"kind", "seed", "hz", "noise", "burst_every_s"},
}


@dataclass(frozen=True)
class SinkConfig:
    path: Path
    max_bytes: int = DEFAULT_SINK_BYTES


@dataclass(frozen=True)
class RunConfig:
    sink: SinkConfig
    input: InputConfig = field(default_factory=RandomInput)
    interval_s: float = DEFAULT_INTERVAL_S
    remote_replay_paths: tuple[Path, ...] = ()

    @classmethod
    def defaults(cls, state_dir: Path) -> RunConfig:
        return cls(sink=SinkConfig(_in_state_dir(state_dir, DEFAULT_SINK)))

    @classmethod
    def load(cls, state_dir: Path) -> RunConfig:
        """The `run:` section of `state_dir/agent.yaml` (the defaults when there is none)."""
        path = Path(state_dir) / POLICY_FILE
        data = _read_yaml(path)
        return cls.parse(data.get(SECTION), Path(state_dir), where=f"{path}: ")

    @classmethod
    def parse(cls, data: Any, state_dir: Path, *, where: str = "") -> RunConfig:
        """Run settings from the `run:` mapping (None: all defaults)."""
        if data is None:
            return cls.defaults(state_dir)
        if not isinstance(data, dict):
            raise RunConfigError(f"{where}run must be a mapping of settings")
        _no_unknown(data, _RUN_KEYS, "run", where)
        sink = data.get("sink", {})
        if sink is None:
            sink = {}
        if not isinstance(sink, dict):
            raise RunConfigError(f"{where}run.sink must be a mapping (path, max_bytes)")
        _no_unknown(sink, _SINK_KEYS, "run.sink", where)
        sink_path = sink.get("path", DEFAULT_SINK)
        if not isinstance(sink_path, str) or not sink_path.strip():
            raise RunConfigError(f"{where}run.sink.path must be a file path")
        remote = data.get("remote_replay_paths", [])
        if remote is None:
            remote = []
        if not isinstance(remote, list) or not all(isinstance(p, str) and p for p in remote):
            raise RunConfigError(f"{where}run.remote_replay_paths must be a list of file paths")
        return cls(
            sink=SinkConfig(
                _in_state_dir(state_dir, sink_path),
                _whole(
                    sink, "max_bytes", DEFAULT_SINK_BYTES, MIN_SINK_BYTES, MAX_SINK_BYTES, where
                ),
            ),
            input=_parse_input(data.get("input"), state_dir, where),
            interval_s=_number(
                data, "interval_s", DEFAULT_INTERVAL_S, MIN_INTERVAL_S, MAX_INTERVAL_S, where, "run"
            ),
            remote_replay_paths=tuple(_in_state_dir(state_dir, p) for p in remote),
        )


def apply_config(state_dir: Path, changes: Mapping[str, Any]) -> RunConfig:
    """Apply a controller `config` command's body to the run settings and save them.

    Returns the new settings; a change that is not allowed or not valid is a `RunConfigError`
    and changes nothing (see the module's rules)."""
    state_dir = Path(state_dir)
    if not isinstance(changes, Mapping) or not changes:
        raise RunConfigError(
            "a config command must change at least one of " + ", ".join(REMOTE_KEYS)
        )
    for key in changes:
        if key not in ("input", "interval_s", "sink"):
            raise RunConfigError(_forbidden(str(key)))
    sink_change = changes.get("sink")
    if "sink" in changes:
        if not isinstance(sink_change, Mapping) or not sink_change:
            raise RunConfigError("config: sink must be a mapping holding max_bytes")
        for key in sink_change:
            if key != "max_bytes":
                raise RunConfigError(_forbidden(f"sink.{key}"))
    path = state_dir / POLICY_FILE
    with _write_lock:
        text = _read_text(path)
        data = _parse_yaml(text, path)
        current = data.get(SECTION)
        if current is not None and not isinstance(current, dict):
            raise RunConfigError(f"{path}: run must be a mapping of settings")
        updated: dict[str, Any] = copy.deepcopy(current) if current else {}
        if "input" in changes:
            updated["input"] = copy.deepcopy(changes["input"])
        if "interval_s" in changes:
            updated["interval_s"] = changes["interval_s"]
        if isinstance(sink_change, Mapping):
            sink = updated.get("sink")
            updated["sink"] = {**(sink if isinstance(sink, dict) else {}), **sink_change}
        config = RunConfig.parse(updated, state_dir, where="config: ")
        if "input" in changes and isinstance(config.input, ReplayInput):
            _check_remote_replay(config.input.path, config, state_dir)
        _write_atomically(path, _with_run_section(text, data, updated))
        return config


def _forbidden(key: str) -> str:
    if key in _POLICY_KEYS:
        what = f"{key} is the device owner's policy"
    elif key in ("sink.path", "remote_replay_paths"):
        what = f"run.{key} is the device owner's to set"
    else:
        what = f"{key} is not a run setting"
    return (
        f"config: {what} and cannot be changed remotely; a config command may change only "
        + ", ".join(REMOTE_KEYS)
    )


def _check_remote_replay(path: Path, config: RunConfig, state_dir: Path) -> None:
    if path not in config.remote_replay_paths:
        raise RunConfigError(
            f"config: input.path {path} is not a path the device owner allows a controller to "
            "replay; the owner lists those in run.remote_replay_paths in agent.yaml"
        )
    real, home = Path(os.path.realpath(path)), Path(os.path.realpath(state_dir))
    if real == home or home in real.parents:
        raise RunConfigError(
            f"config: input.path {path} is in the agent's state dir, which is never replayed"
        )


# -- parsing ------------------------------------------------------------------------------------


def _parse_input(data: Any, state_dir: Path, where: str) -> InputConfig:
    if data is None:
        return RandomInput()
    if not isinstance(data, dict):
        raise RunConfigError(f"{where}run.input must be a mapping with a kind")
    kinds = ", ".join(k.value for k in InputKind)
    raw_kind = data.get("kind")
    if raw_kind is None:
        raise RunConfigError(f"{where}run.input.kind is required: one of {kinds}")
    try:
        kind = InputKind(raw_kind)
    except ValueError:
        raise RunConfigError(f"{where}run.input.kind {raw_kind!r} is not one of {kinds}") from None
    unknown = sorted(set(map(str, data)) - _INPUT_KEYS[kind])
    if unknown:
        raise RunConfigError(
            f"{where}run.input.{unknown[0]} is not a setting of input kind {kind.value}; it "
            f"takes {', '.join(sorted(_INPUT_KEYS[kind] - {'kind'}))}"
        )
    seed = data.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED
    ):
        raise RunConfigError(
            f"{where}run.input.seed must be a whole number 0-{MAX_SEED}, not {seed!r}"
        )
    section = "run.input"
    if kind is InputKind.RANDOM:
        return RandomInput(seed)
    if kind is InputKind.ACCELEROMETER:
        return AccelerometerInput(
            seed,
            hz=_number(data, "hz", 100.0, 1.0, 10_000.0, where, section),
            noise=_number(data, "noise", 0.05, 0.0, 50.0, where, section),
            burst_every_s=_number(data, "burst_every_s", 4.0, 0.0, 86_400.0, where, section),
        )
    raw_path = data.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise RunConfigError(
            f"{where}run.input.path is required for replay: a file, FIFO or character device"
        )
    path = _in_state_dir(state_dir, raw_path)
    formats = ", ".join(f.value for f in SampleFormat)
    raw_format = data.get("format", _SUFFIX_FORMATS.get(path.suffix.lower()))
    if raw_format is None:
        raise RunConfigError(f"{where}run.input.format is required for {path}: one of {formats}")
    try:
        sample_format = SampleFormat(raw_format)
    except ValueError:
        raise RunConfigError(
            f"{where}run.input.format {raw_format!r} is not one of {formats}"
        ) from None
    scale = _number(data, "scale", 1.0, -1e9, 1e9, where, section)
    if scale == 0:
        raise RunConfigError(f"{where}run.input.scale must not be 0")
    return ReplayInput(
        path,
        sample_format,
        seed,
        scale=scale,
        timeout_s=_number(data, "timeout_s", 1.0, 0.0, 60.0, where, section),
    )


def _no_unknown(data: dict[Any, Any], allowed: set[str], section: str, where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise RunConfigError(
            f"{where}{section}.{unknown[0]} is not a setting; {section} takes "
            f"{', '.join(sorted(allowed))}"
        )


def _number(
    data: dict[Any, Any],
    key: str,
    default: float,
    low: float,
    high: float,
    where: str,
    section: str,
) -> float:
    value = data.get(key, default)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise RunConfigError(
            f"{where}{section}.{key} must be a number from {low:g} to {high:g}, not {value!r}"
        )
    return float(value)


def _whole(data: dict[Any, Any], key: str, default: int, low: int, high: int, where: str) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RunConfigError(
            f"{where}run.sink.{key} must be a whole number of bytes from {low} to {high}, "
            f"not {value!r}"
        )
    return value


def _in_state_dir(state_dir: Path, text: str) -> Path:
    return Path(os.path.normpath((Path(state_dir) / Path(text).expanduser()).absolute()))


# -- the file -----------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"{path}: cannot read it ({exc})") from None


def _parse_yaml(text: str, path: Path) -> dict[Any, Any]:
    try:
        data: Any = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RunConfigError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise RunConfigError(f"{path}: expected a mapping of settings")
    return data


def _read_yaml(path: Path) -> dict[Any, Any]:
    return _parse_yaml(_read_text(path), path)


def _with_run_section(text: str, data: dict[Any, Any], run: dict[str, Any]) -> str:
    """`text` with its `run:` block replaced by `run` (see the module's rules)."""
    wanted = {**data, SECTION: run}
    block = yaml.safe_dump({SECTION: run}, sort_keys=False, default_flow_style=False)
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _RUN_KEY.match(line)]
    candidate: str | None = None
    if not starts and SECTION not in data:
        candidate = (text if not text or text.endswith("\n") else text + "\n") + block
    elif len(starts) == 1 and _RUN_LINE.match(lines[starts[0]].rstrip("\r\n")):
        start = starts[0]
        end = next(
            (j for j in range(start + 1, len(lines)) if _TOP_LEVEL_KEY.match(lines[j])),
            len(lines),
        )
        # Comments and blank lines just above the next key belong to that key: keep them.
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
            end -= 1
        candidate = "".join([*lines[:start], block, *lines[end:]])
    if candidate is not None:
        try:
            if yaml.safe_load(candidate) == wanted:
                return candidate
        except yaml.YAMLError:
            pass
    return yaml.safe_dump(wanted, sort_keys=False, default_flow_style=False)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    except OSError as exc:
        raise RunConfigError(f"cannot write {path}: {exc}") from None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunConfigError(f"cannot write {path}: {exc}") from None
