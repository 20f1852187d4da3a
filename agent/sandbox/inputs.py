"""Sensor data for capabilities, from files a person names (or a seed), on the host side.

Rules:
- IMAGE / FLOAT_IMAGE: the image file is decoded (Pillow), resized to the capability's width and
  height and converted to its pixel format: u8 bytes (FLOAT_IMAGE: f32 in [0, 1]), row-major HWC.
- SOUND: a PCM WAV (8/16/32-bit, any channels: mixed down to mono) resampled to `hz` (at most
  `MAX_SOUND_HZ`); i16.
- ACCEL: a CSV of X, Y, Z rows (a non-numeric first row is a header); f32, interleaved.
- RAW: the file's bytes. RAND: bytes from a generator seeded with `seed`, numbers for typed
  tensors (integers over their whole range, floats uniform in [0, 1)).
- SOUND, ACCEL and RAW are streams: each inference takes the next window, wrapping around at the
  end of the file, so a recording replays continuously. Each capability stage has its own cursor.
- Synthetic inputs (`InputFiles(synthetic=True)`, for health checks): a capability with no file
  gets plausible data made from `seed` instead of an `InputError`: IMAGE random pixels, SOUND a
  quiet sine (continuous from one window to the next), ACCEL small noise around gravity on Z
  (m/s^2), RAW random bytes. Same seed, same stage, same stream; a file that is given still wins,
  and the size rules below apply to synthetic data exactly as to files.
- The host fills exactly the bytes a rune asks for; a size that does not match what the
  capability makes is an `InputError` naming both, and a missing or unreadable file is an
  `InputError` naming the flag to pass. Sizes are checked before an image is decoded and `hz`
  is capped, so a rune's args alone cannot make the host do unbounded work.
"""

from __future__ import annotations

import csv
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from agent.sandbox.errors import InputError
from ota.rune.capabilities import CapabilitySpec, PixelFormat
from ota.rune.runefile import CapabilityKind
from ota.rune.tensors import ElementType

FLAGS = {
    CapabilityKind.IMAGE: "--image",
    CapabilityKind.FLOAT_IMAGE: "--image",
    CapabilityKind.SOUND: "--sound",
    CapabilityKind.ACCEL: "--accel",
    CapabilityKind.RAW: "--raw",
}
MAX_SOUND_HZ = 384_000
GRAVITY = 9.81
SYNTHETIC_SOUND_AMPLITUDE = 0.05 * 32767


@dataclass
class InputFiles:
    """Where each capability's data comes from; the `rune run` flags map onto these fields."""

    image: Path | None = None
    sound: Path | None = None
    accel: Path | None = None
    raw: Path | None = None
    seed: int = 0
    synthetic: bool = False


@dataclass
class InputSources:
    files: InputFiles = field(default_factory=InputFiles)
    _cursors: dict[str, int] = field(default_factory=dict)
    _cache: dict[tuple[str, object], np.ndarray] = field(default_factory=dict)
    _rngs: dict[str, np.random.Generator] = field(default_factory=dict)
    _tones: dict[str, float] = field(default_factory=dict)

    def provide(
        self, key: str, spec: CapabilitySpec, element: ElementType | None, nbytes: int
    ) -> bytes:
        """Exactly `nbytes` of data for the capability stage `key` (a stage name or an id)."""
        kind = spec.kind
        if kind is CapabilityKind.RAND:
            return self._random(key, element, nbytes)
        path = self._path(kind)
        if kind in (CapabilityKind.IMAGE, CapabilityKind.FLOAT_IMAGE):
            size = spec.width * spec.height * spec.pixel_format.channels
            size *= 4 if kind is CapabilityKind.FLOAT_IMAGE else 1
            if size != nbytes:
                raise InputError(
                    f"the rune asks for {nbytes} bytes of {kind.name}, but a {spec.width}x"
                    f"{spec.height} {spec.pixel_format.name} image is {size} bytes; check "
                    "its width, height and pixel_format args"
                )
            if path is None:
                return self._synthetic_image(key, spec).tobytes()
            return self._image(path, spec).tobytes()
        if kind is CapabilityKind.SOUND:
            if spec.hz > MAX_SOUND_HZ:
                raise InputError(
                    f"the rune asks for SOUND at {spec.hz} Hz; the most the host resamples "
                    f"to is {MAX_SOUND_HZ} Hz"
                )
            if path is None:
                self._whole_samples(nbytes, 2, kind)
                return self._synthetic_sound(key, spec.hz, nbytes // 2).tobytes()
            return self._window(key, self._sound(path, spec.hz), nbytes, 2, kind)
        if kind is CapabilityKind.ACCEL:
            if path is None:
                self._whole_samples(nbytes, 12, kind)
                return self._synthetic_accel(key, nbytes // 12).tobytes()
            return self._window(key, self._accel(path), nbytes, 12, kind)
        if path is None:
            return self._rng(key).bytes(nbytes)
        return self._window(key, self._raw(path), nbytes, 1, kind)

    def _path(self, kind: CapabilityKind) -> Path | None:
        """The file for `kind`, or None when it has none and synthetic data was asked for."""
        path = {
            CapabilityKind.IMAGE: self.files.image,
            CapabilityKind.FLOAT_IMAGE: self.files.image,
            CapabilityKind.SOUND: self.files.sound,
            CapabilityKind.ACCEL: self.files.accel,
            CapabilityKind.RAW: self.files.raw,
        }[kind]
        if path is None:
            if self.files.synthetic:
                return None
            raise InputError(f"this rune reads {kind.name}: pass a file with {FLAGS[kind]} FILE")
        if not path.is_file():
            raise InputError(f"{FLAGS[kind]} {path}: no such file")
        return path

    def _window(
        self, key: str, data: np.ndarray, nbytes: int, unit: int, kind: CapabilityKind
    ) -> bytes:
        raw = data.tobytes()
        self._whole_samples(nbytes, unit, kind)
        if not raw:
            raise InputError(f"the {kind.name} input file {FLAGS[kind]} holds no data")
        start = self._cursors.get(key, 0) % len(raw)
        out = bytearray()
        position = start
        while len(out) < nbytes:
            take = min(nbytes - len(out), len(raw) - position)
            out += raw[position : position + take]
            position = (position + take) % len(raw)
        self._cursors[key] = position
        return bytes(out)

    @staticmethod
    def _whole_samples(nbytes: int, unit: int, kind: CapabilityKind) -> None:
        if nbytes % unit:
            raise InputError(
                f"the rune asks for {nbytes} bytes of {kind.name}, which is not a "
                f"whole number of {unit}-byte samples"
            )

    def _rng(self, key: str) -> np.random.Generator:
        return self._rngs.setdefault(key, np.random.default_rng(self.files.seed))

    def _random(self, key: str, element: ElementType | None, nbytes: int) -> bytes:
        rng = self._rng(key)
        if element is None or element is ElementType.UTF8 or not element.is_float:
            return rng.bytes(nbytes)
        count = nbytes // element.size
        return rng.random(count).astype(element.dtype).tobytes()

    def _synthetic_image(self, key: str, spec: CapabilitySpec) -> np.ndarray:
        shape = (spec.height, spec.width, spec.pixel_format.channels)
        pixels = self._rng(key).integers(0, 256, size=shape, dtype=np.uint8)
        if spec.kind is CapabilityKind.FLOAT_IMAGE:
            return (pixels.astype("<f4") / 255.0).astype("<f4")
        return pixels

    def _synthetic_sound(self, key: str, hz: int, count: int) -> np.ndarray:
        if key not in self._tones:
            self._tones[key] = float(self._rng(key).uniform(200.0, 1000.0))
        start = self._cursors.get(key, 0)
        self._cursors[key] = start + count
        seconds = np.arange(start, start + count, dtype=np.float64) / hz
        samples = SYNTHETIC_SOUND_AMPLITUDE * np.sin(2 * np.pi * self._tones[key] * seconds)
        return np.round(samples).astype("<i2")

    def _synthetic_accel(self, key: str, rows: int) -> np.ndarray:
        values = self._rng(key).normal(0.0, 0.05, size=(rows, 3))
        values[:, 2] += GRAVITY
        return values.astype("<f4").reshape(-1)

    def _image(self, path: Path, spec: CapabilitySpec) -> np.ndarray:
        cache_key = (str(path), (spec.kind, spec.width, spec.height, spec.pixel_format))
        if cache_key not in self._cache:
            try:
                with Image.open(path) as image:
                    mode = "L" if spec.pixel_format is PixelFormat.GRAYSCALE else "RGB"
                    converted = image.convert(mode).resize(
                        (spec.width, spec.height), Image.Resampling.BICUBIC
                    )
                    pixels = np.asarray(converted, dtype=np.uint8)
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                raise InputError(f"--image {path} is not an image Pillow can read: {exc}") from None
            pixels = pixels.reshape(spec.height, spec.width, spec.pixel_format.channels)
            if spec.pixel_format is PixelFormat.BGR:
                pixels = pixels[:, :, ::-1]
            if spec.kind is CapabilityKind.FLOAT_IMAGE:
                self._cache[cache_key] = (pixels.astype("<f4") / 255.0).astype("<f4")
            else:
                self._cache[cache_key] = np.ascontiguousarray(pixels)
        return self._cache[cache_key]

    def _sound(self, path: Path, hz: int) -> np.ndarray:
        cache_key = (str(path), hz)
        if cache_key not in self._cache:
            try:
                with wave.open(str(path), "rb") as wav:
                    width, channels = wav.getsampwidth(), wav.getnchannels()
                    rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
            except (OSError, EOFError, wave.Error) as exc:
                raise InputError(f"--sound {path} is not a PCM WAV file: {exc}") from None
            dtype = {1: "u1", 2: "<i2", 4: "<i4"}.get(width)
            if dtype is None:
                raise InputError(
                    f"--sound {path}: {8 * width}-bit samples are not supported; "
                    "use 8, 16 or 32-bit PCM"
                )
            samples = np.frombuffer(frames, dtype=dtype).astype(np.float64)
            if width == 1:
                samples = (samples - 128) * 256
            elif width == 4:
                samples = samples / 65536
            samples = samples.reshape(-1, channels).mean(axis=1)
            if rate != hz and len(samples) > 1:
                count = max(1, round(len(samples) * hz / rate))
                positions = np.linspace(0, len(samples) - 1, count)
                samples = np.interp(positions, np.arange(len(samples)), samples)
            self._cache[cache_key] = np.clip(np.round(samples), -32768, 32767).astype("<i2")
        return self._cache[cache_key]

    def _accel(self, path: Path) -> np.ndarray:
        cache_key = (str(path), "accel")
        if cache_key not in self._cache:
            rows: list[list[float]] = []
            try:
                with path.open(newline="", encoding="utf-8") as handle:
                    for number, row in enumerate(csv.reader(handle), start=1):
                        if not row or all(not c.strip() for c in row):
                            continue
                        try:
                            values = [float(c) for c in row[:3]]
                        except ValueError:
                            if number == 1:
                                continue
                            raise InputError(
                                f"--accel {path} line {number}: X, Y, Z must be "
                                f"numbers, not {row[:3]}"
                            ) from None
                        if len(values) != 3:
                            raise InputError(
                                f"--accel {path} line {number}: needs three columns X, Y, Z"
                            )
                        rows.append(values)
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"--accel {path} cannot be read: {exc}") from None
            self._cache[cache_key] = np.asarray(rows, dtype="<f4").reshape(-1)
        return self._cache[cache_key]

    def _raw(self, path: Path) -> np.ndarray:
        cache_key = (str(path), "raw")
        if cache_key not in self._cache:
            try:
                self._cache[cache_key] = np.frombuffer(path.read_bytes(), dtype=np.uint8)
            except OSError as exc:
                raise InputError(f"--raw {path} cannot be read: {exc}") from None
        return self._cache[cache_key]
