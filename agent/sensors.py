"""The run loop's input sources: the data each capability of the active rune reads.

`LiveSources` is the sandbox's `InputSources` for a `RunConfig` input, so the sandbox asks it for
exactly the bytes one capability stage reads, as it does for `rune run`.

Rules:
- RAND always comes from generators seeded with the input's `seed` (a fresh random seed when none
  is set), whatever the source: it is not a sensor.
- `random`: every capability gets the sandbox's seeded synthetic data (the data a health check
  runs on): IMAGE random pixels, SOUND a quiet tone, ACCEL noise around gravity, RAW random bytes.
- `accelerometer`: ACCEL reads `AccelSimulator`, one continuous signal in m/s^2 (each inference
  takes the next `n` rows, so simulated time runs with the samples, not the wall clock). Same
  seed, same rows, however they are split into windows. Other sensor capabilities are a
  `SourceError`: this device has no such sensor.
- `replay`: every sensor capability reads the next values of one stream of numbers, in pipeline
  order. Formats: `f32le` / `i16le` / `u8` (raw little-endian samples; a trailing partial sample
  of a file is ignored), `csv` (numbers separated by commas or spaces, any count per line, `#`
  comments; a first line that is not numbers is a header) and `jsonl` (a number or an array,
  possibly nested, of numbers per line). Each value is multiplied by `scale` and converted to what
  the capability makes: f32 for ACCEL (rows of X, Y, Z) and FLOAT_IMAGE, i16 for SOUND and u8 for
  IMAGE (HWC pixels) and RAW, integers rounded and clipped to their range.
- A regular file starts again at its end; a FIFO or character device is a stream read without
  blocking: a FIFO whose writer left is reopened for the next writer. `provide` never waits (a
  legacy rune's host calls run inside its wall-clock limit): a stream that has not delivered a
  whole window is `InputPending`, and `prepare(timeout)` waits, before a call, for as much data as
  the previous call read. `begin` / `commit` / `abort` bracket a call: `abort` puts back what the
  call took, so a call that stopped on pending input loses no data.
- A `SourceError` is this device's input failing (no such path, malformed data, a capability the
  source does not make), not the rune; both it and `InputPending` are `InputError`s, so the
  sandbox passes them through unchanged. Malformed data is skipped once reported. Lines are at
  most `MAX_LINE` bytes and the sizes the sandbox checks for `rune run` are checked here too.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import select
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.runconfig import (
    AccelerometerInput,
    InputConfig,
    RandomInput,
    ReplayInput,
    SampleFormat,
)
from agent.sandbox.errors import InputError
from agent.sandbox.inputs import GRAVITY, InputFiles, InputSources
from ota.rune.capabilities import CapabilitySpec
from ota.rune.runefile import CapabilityKind
from ota.rune.tensors import ElementType

CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
SIM_BLOCK = 256
# What each sensor capability makes, one value per element.
ELEMENTS: dict[CapabilityKind, np.dtype[Any]] = {
    CapabilityKind.ACCEL: np.dtype("<f4"),
    CapabilityKind.FLOAT_IMAGE: np.dtype("<f4"),
    CapabilityKind.SOUND: np.dtype("<i2"),
    CapabilityKind.IMAGE: np.dtype("u1"),
    CapabilityKind.RAW: np.dtype("u1"),
}
_BINARY: dict[SampleFormat, np.dtype[Any]] = {
    SampleFormat.F32LE: np.dtype("<f4"),
    SampleFormat.I16LE: np.dtype("<i2"),
    SampleFormat.U8: np.dtype("u1"),
}
_SEPARATORS = re.compile(r"[,\s]+")
_EMPTY = np.empty(0, dtype=np.float64)


class SourceError(InputError):
    """The configured input source cannot feed this rune now; not the rune's fault."""


class InputPending(InputError):
    """A stream has not delivered a whole window yet."""


# -- the simulated accelerometer ----------------------------------------------------------------


@dataclass(frozen=True)
class _Burst:
    start: int
    length: int
    amplitude: float
    frequency: float
    axis: np.ndarray


class AccelSimulator:
    """A 3-axis accelerometer at rest, slightly tilted, with gesture-like bursts (m/s^2)."""

    def __init__(self, seed: int, hz: float, noise: float, burst_every_s: float) -> None:
        self.hz = hz
        self.noise = noise
        self.burst_every_s = burst_every_s
        self._rng = np.random.default_rng(seed)
        tilt_x, tilt_y = self._rng.normal(0.0, 0.08, size=2)
        self._gravity = GRAVITY * np.array(
            [math.sin(tilt_x), math.sin(tilt_y), math.cos(tilt_x) * math.cos(tilt_y)]
        )
        self._made = 0
        self._buffer = np.empty((0, 3), dtype=np.float64)
        self._bursts: list[_Burst] = []
        self._next_burst = self._gap(0) if burst_every_s > 0 else math.inf

    def rows(self, count: int) -> np.ndarray:
        """The next `count` rows of X, Y, Z as float32, shape (count, 3)."""
        while len(self._buffer) < count:
            self._buffer = np.concatenate([self._buffer, self._block()])
        out, self._buffer = self._buffer[:count], self._buffer[count:]
        return out.astype("<f4")

    def _gap(self, after: int) -> float:
        return after + max(1, round(self._rng.exponential(self.burst_every_s) * self.hz))

    def _block(self) -> np.ndarray:
        start, end = self._made, self._made + SIM_BLOCK
        values = self._gravity + self._rng.normal(0.0, self.noise, size=(SIM_BLOCK, 3))
        while self._next_burst < end:
            axis = self._rng.normal(0.0, 0.2, size=3)
            axis[self._rng.integers(0, 3)] = 1.0  # a gesture moves mostly along one axis
            burst = _Burst(
                start=int(self._next_burst),
                length=max(4, round(self._rng.uniform(0.8, 2.0) * self.hz)),
                amplitude=float(self._rng.uniform(4.0, 9.0)),
                frequency=float(self._rng.uniform(1.0, 3.0)),
                axis=axis / np.linalg.norm(axis),
            )
            self._bursts.append(burst)
            self._next_burst = self._gap(burst.start + burst.length)
        for burst in self._bursts:
            low, high = max(start, burst.start), min(end, burst.start + burst.length)
            if low >= high:
                continue
            offset = np.arange(low - burst.start, high - burst.start, dtype=np.float64)
            # Tukey envelope: a quarter of the burst to ramp up, a quarter to ramp down.
            edge = np.minimum(offset, burst.length - 1 - offset) / (burst.length / 4)
            envelope = np.where(edge < 1, 0.5 - 0.5 * np.cos(np.pi * np.minimum(edge, 1)), 1.0)
            wave = np.sin(2 * np.pi * burst.frequency * offset / self.hz)
            values[low - start : high - start] += np.outer(
                burst.amplitude * envelope * wave, burst.axis
            )
        self._bursts = [b for b in self._bursts if b.start + b.length > end]
        self._made = end
        return values


# -- replayed files and streams -----------------------------------------------------------------


class _BinaryDecoder:
    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self._partial = b""

    def feed(self, chunk: bytes) -> tuple[np.ndarray, list[str]]:
        data = self._partial + chunk
        whole = len(data) - len(data) % self.dtype.itemsize
        self._partial = data[whole:]
        values = np.frombuffer(data[:whole], dtype=self.dtype).astype(np.float64)
        return values, []

    def end_of_pass(self) -> tuple[np.ndarray, list[str]]:
        self._partial = b""
        return _EMPTY, []


class _TextDecoder:
    def __init__(self, sample_format: SampleFormat) -> None:
        self.format = sample_format
        self._partial = b""
        self._line = 0
        self._skipping = False
        self._seen_data = False

    def feed(self, chunk: bytes) -> tuple[np.ndarray, list[str]]:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        values: list[float] = []
        errors: list[str] = []
        for line in lines:
            self._parse(line, values, errors)
        if len(self._partial) > MAX_LINE:
            self._line += 1
            errors.append(f"line {self._line} is longer than {MAX_LINE} bytes; skipped")
            self._partial, self._skipping = b"", True
        return np.asarray(values, dtype=np.float64), errors

    def end_of_pass(self) -> tuple[np.ndarray, list[str]]:
        values: list[float] = []
        errors: list[str] = []
        if self._partial:
            self._parse(self._partial, values, errors)
        self._partial, self._line, self._skipping, self._seen_data = b"", 0, False, False
        return np.asarray(values, dtype=np.float64), errors

    def _parse(self, raw: bytes, values: list[float], errors: list[str]) -> None:
        if self._skipping:
            self._skipping = False
            return
        self._line += 1
        if len(raw) > MAX_LINE:
            errors.append(f"line {self._line} is longer than {MAX_LINE} bytes; skipped")
            return
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            errors.append(f"line {self._line} is not UTF-8 text")
            return
        if not text or text.startswith("#"):
            return
        try:
            numbers = self._numbers(text)
        except ValueError as exc:
            if self.format is SampleFormat.CSV and not self._seen_data:
                self._seen_data = True  # a header
                return
            errors.append(f"line {self._line}: {exc}")
            return
        self._seen_data = True
        values.extend(numbers)

    def _numbers(self, text: str) -> list[float]:
        if self.format is SampleFormat.CSV:
            numbers = [float(field) for field in _SEPARATORS.split(text.strip(", ")) if field]
        else:
            try:
                numbers = _flatten(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc.msg})") from None
        if not all(math.isfinite(n) for n in numbers):
            raise ValueError(f"{text[:40]!r} holds a number that is not finite")
        return numbers


def _flatten(value: Any) -> list[float]:
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        raise ValueError(f"{value!r} is not a number or an array of numbers")
    if isinstance(value, list):
        return [n for item in value for n in _flatten(item)]
    return [float(value)]


class ReplayStream:
    """The numbers in a file (looped at its end) or a FIFO or character device (a stream)."""

    def __init__(self, path: Path, sample_format: SampleFormat) -> None:
        self.path = path
        self.format = sample_format
        dtype = _BINARY.get(sample_format)
        self._decoder: _BinaryDecoder | _TextDecoder = (
            _BinaryDecoder(dtype) if dtype is not None else _TextDecoder(sample_format)
        )
        self._fd: int | None = None
        self._regular = False
        self._samples = _EMPTY
        self._pass_values = 0
        self._taken: list[np.ndarray] = []

    @property
    def is_stream(self) -> bool:
        """Whether the path is a FIFO or device (True) rather than a file; opens it to tell."""
        self._open()
        return not self._regular

    def buffered(self) -> int:
        return len(self._samples)

    def fill(self, count: int, timeout: float = 0.0) -> bool:
        """Read until `count` values are buffered; a stream waits at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        while len(self._samples) < count:
            values, new_errors, waited_out = self._read(deadline)
            errors += new_errors
            if len(values):
                self._samples = np.concatenate([self._samples, values])
            if waited_out:
                break
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise SourceError(f"replay {self.path}: {errors[0]}{more}")
        return len(self._samples) >= count

    def take(self, count: int) -> np.ndarray:
        """The next `count` values (float64); `InputPending` if a stream has not sent them."""
        if not self.fill(count):
            raise InputPending(
                f"waiting for input: {len(self._samples)} of {count} values from {self.path}"
            )
        out, self._samples = self._samples[:count], self._samples[count:]
        self._taken.append(out)
        return out

    def commit(self) -> None:
        self._taken = []

    def rollback(self) -> None:
        """Put back what was taken since the last commit."""
        if self._taken:
            self._samples = np.concatenate([*self._taken, self._samples])
        self._taken = []

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        try:
            info = self.path.stat()
        except FileNotFoundError:
            raise SourceError(f"replay {self.path}: no such file or device") from None
        except OSError as exc:
            raise SourceError(f"replay {self.path}: {exc.strerror}") from None
        if stat.S_ISREG(info.st_mode):
            flags = os.O_RDONLY
        elif stat.S_ISFIFO(info.st_mode) or stat.S_ISCHR(info.st_mode):
            flags = os.O_RDONLY | os.O_NONBLOCK
        else:
            raise SourceError(
                f"replay {self.path} is not a regular file, a FIFO or a character device"
            )
        try:
            self._fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"replay {self.path} cannot be opened: {exc.strerror}") from None
        self._regular = stat.S_ISREG(info.st_mode)
        return self._fd

    def _read(self, deadline: float) -> tuple[np.ndarray, list[str], bool]:
        """One chunk: (values, errors, True when a stream had nothing before the deadline)."""
        fd = self._open()
        if self._regular:
            chunk = self._read_fd(fd)
            if chunk:
                values, errors = self._decoder.feed(chunk)
                self._pass_values += len(values)
                return values, errors, False
            values, errors = self._decoder.end_of_pass()
            self._pass_values += len(values)
            if not self._pass_values:
                raise SourceError(
                    f"replay {self.path} holds no {self.format.value} values"
                    + (f": {errors[0]}" if errors else "")
                )
            self._pass_values = 0
            os.lseek(fd, 0, os.SEEK_SET)
            return values, errors, False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        remaining = max(0.0, deadline - time.monotonic())
        if not poller.poll(math.ceil(remaining * 1000)):
            return _EMPTY, [], True
        chunk = self._read_fd(fd)
        if chunk is None:
            return _EMPTY, [], time.monotonic() >= deadline
        if not chunk:
            # The writer left (a FIFO at EOF polls readable forever): wait for the next one.
            values, errors = self._decoder.end_of_pass()
            self.close()
            self._open()
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))  # a device at EOF
            return values, errors, time.monotonic() >= deadline
        values, errors = self._decoder.feed(chunk)
        return values, errors, False

    def _read_fd(self, fd: int) -> bytes | None:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.close()
            raise SourceError(f"replay {self.path} cannot be read: {exc.strerror}") from None


# -- what the sandbox calls ---------------------------------------------------------------------


class LiveSources(InputSources):
    """The sandbox's inputs for one `RunConfig` input (see the module's rules)."""

    def __init__(self, config: InputConfig) -> None:
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        super().__init__(InputFiles(seed=seed, synthetic=True))
        self.config = config
        self.seed = seed
        self._simulator: AccelSimulator | None = None
        self._stream: ReplayStream | None = None
        self._demand: dict[str, int] = {}
        if isinstance(config, AccelerometerInput):
            self._simulator = AccelSimulator(seed, config.hz, config.noise, config.burst_every_s)
        elif isinstance(config, ReplayInput):
            self._stream = ReplayStream(config.path, config.format)

    def describe(self) -> str:
        return self.config.describe()

    def provide(
        self, key: str, spec: CapabilitySpec, element: ElementType | None, nbytes: int
    ) -> bytes:
        kind = spec.kind
        if kind is CapabilityKind.RAND or isinstance(self.config, RandomInput):
            return super().provide(key, spec, element, nbytes)
        dtype = ELEMENTS[kind]
        _check_size(spec, nbytes, dtype)
        count = nbytes // dtype.itemsize
        if self._simulator is not None:
            if kind is not CapabilityKind.ACCEL:
                raise SourceError(
                    f"the rune reads {kind.name}, but this device's input is a simulated "
                    "accelerometer (ACCEL only); configure input kind random or replay"
                )
            return self._simulator.rows(count // 3).tobytes()
        assert self._stream is not None
        assert isinstance(self.config, ReplayInput)
        self._demand[key] = count
        values = self._stream.take(count) * self.config.scale
        if dtype.kind == "f":
            return values.astype(dtype).tobytes()
        info = np.iinfo(dtype)
        return np.clip(np.round(values), info.min, info.max).astype(dtype).tobytes()

    def prepare(self, timeout: float | None = None) -> bool:
        """Wait (a stream only) until the values the last call read are buffered, at most
        `timeout` seconds (default: the input's `timeout_s`); whether they are."""
        if self._stream is None or not self._stream.is_stream:
            return True
        assert isinstance(self.config, ReplayInput)
        wait = self.config.timeout_s if timeout is None else timeout
        return self._stream.fill(max(1, sum(self._demand.values())), wait)

    def forget_demand(self) -> None:
        """Another rune reads from now on: `prepare` waits for what it asks for, not the last."""
        self._demand.clear()

    def pending_reason(self) -> str:
        if self._stream is None:
            return ""
        need = max(1, sum(self._demand.values()))
        return (
            f"waiting for input: {self._stream.buffered()} of {need} values from "
            f"{self._stream.path}"
        )

    def begin(self) -> None:
        if self._stream is not None:
            self._stream.commit()

    def commit(self) -> None:
        if self._stream is not None:
            self._stream.commit()

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.rollback()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


def _check_size(spec: CapabilitySpec, nbytes: int, dtype: np.dtype[Any]) -> None:
    kind = spec.kind
    unit = 3 * dtype.itemsize if kind is CapabilityKind.ACCEL else dtype.itemsize
    if nbytes % unit:
        raise InputError(
            f"the rune asks for {nbytes} bytes of {kind.name}, which is not a whole number "
            f"of {unit}-byte samples"
        )
    if kind in (CapabilityKind.IMAGE, CapabilityKind.FLOAT_IMAGE):
        size = spec.width * spec.height * spec.pixel_format.channels * dtype.itemsize
        if size != nbytes:
            raise InputError(
                f"the rune asks for {nbytes} bytes of {kind.name}, but a {spec.width}x"
                f"{spec.height} {spec.pixel_format.name} image is {size} bytes; check its "
                "width, height and pixel_format args"
            )
