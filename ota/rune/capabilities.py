"""What a capability's args mean, and what tensor each capability makes from them.

Rules (the Rune project's args; `-` in keys already reads as `_`):
- IMAGE / FLOAT_IMAGE: `width`, `height` (required, positive), `pixel_format` RGB, BGR or
  GrayScale, written `@PixelFormat::GrayScale`, `GrayScale` or the enum number (RGB=0, BGR=1,
  GrayScale=2; default RGB). Makes u8 pixels (FLOAT_IMAGE: f32 in [0, 1]) laid out
  [1, height, width, channels].
- SOUND: `hz` (alias `frequency`, default 16000) and `sample_duration_ms` (default 1000). Makes
  hz * ms / 1000 i16 samples.
- ACCEL: `n` (alias `samples`, default 128) rows of X, Y, Z. Makes f32 values, 3 per row.
- RAW: `length` bytes (default: what the declared output holds). Makes u8.
- RAND: fills the declared output.
- `source` (which input file, default 0) is accepted and kept. Any other arg is an error.
A stage's declared output must hold exactly what its capability makes; `check_output` says what
to change when it does not. Pure: no I/O.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from ota.rune.runefile import CapabilityKind
from ota.rune.tensors import ElementType, TensorType


class PixelFormat(enum.Enum):
    RGB = 0
    BGR = 1
    GRAYSCALE = 2

    @property
    def channels(self) -> int:
        return 1 if self is PixelFormat.GRAYSCALE else 3


class CapabilityArgError(ValueError):
    """Capability args that do not make sense; the message says which and why."""


@dataclass(frozen=True)
class CapabilitySpec:
    kind: CapabilityKind
    width: int = 0
    height: int = 0
    pixel_format: PixelFormat = PixelFormat.RGB
    hz: int = 16000
    sample_duration_ms: int = 1000
    rows: int = 128
    length: int | None = None
    source: int = 0

    @property
    def samples(self) -> int:
        return self.hz * self.sample_duration_ms // 1000


ALLOWED_ARGS: dict[CapabilityKind, set[str]] = {
    CapabilityKind.IMAGE: {"width", "height", "pixel_format", "source"},
    CapabilityKind.FLOAT_IMAGE: {"width", "height", "pixel_format", "source"},
    CapabilityKind.SOUND: {"hz", "frequency", "sample_duration_ms", "source"},
    CapabilityKind.ACCEL: {"n", "samples", "source"},
    CapabilityKind.RAW: {"length", "source"},
    CapabilityKind.RAND: {"source", "amount"},
}


def parse_pixel_format(value: Any) -> PixelFormat:
    if isinstance(value, int) and not isinstance(value, bool):
        for member in PixelFormat:
            if member.value == value:
                return member
    text = str(value).strip().removeprefix("@").removeprefix("PixelFormat::").upper()
    if text in PixelFormat.__members__:
        return PixelFormat[text]
    if text.isdigit():
        return parse_pixel_format(int(text))
    raise CapabilityArgError(
        f'pixel_format {value!r} is not RGB, BGR or GrayScale (e.g. "@PixelFormat::GrayScale")'
    )


def _whole(args: dict[str, Any], key: str, default: int | None, *, alias: str = "") -> int:
    value = args.get(key, args.get(alias, default) if alias else default)
    if value is None:
        raise CapabilityArgError(f"needs the arg {key}")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if (
        isinstance(number, bool)
        or not isinstance(number, int | float)
        or not math.isfinite(number)
        or number != int(number)
        or number <= 0
    ):
        raise CapabilityArgError(f"{key} must be a positive whole number, not {value!r}")
    return int(number)


def parse_capability(kind: CapabilityKind, args: dict[str, Any]) -> CapabilitySpec:
    unknown = sorted(set(args) - ALLOWED_ARGS[kind])
    if unknown:
        raise CapabilityArgError(
            f"{kind.name} takes no arg {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(ALLOWED_ARGS[kind]))}"
        )
    source = int(args.get("source", 0) or 0)
    if kind in (CapabilityKind.IMAGE, CapabilityKind.FLOAT_IMAGE):
        return CapabilitySpec(
            kind,
            width=_whole(args, "width", None),
            height=_whole(args, "height", None),
            pixel_format=parse_pixel_format(args.get("pixel_format", PixelFormat.RGB.value)),
            source=source,
        )
    if kind is CapabilityKind.SOUND:
        spec = CapabilitySpec(
            kind,
            hz=_whole(args, "hz", 16000, alias="frequency"),
            sample_duration_ms=_whole(args, "sample_duration_ms", 1000),
            source=source,
        )
        if spec.samples <= 0:
            raise CapabilityArgError("hz * sample_duration_ms / 1000 must be at least one sample")
        return spec
    if kind is CapabilityKind.ACCEL:
        return CapabilitySpec(kind, rows=_whole(args, "n", 128, alias="samples"), source=source)
    if kind is CapabilityKind.RAW:
        length = _whole(args, "length", None) if "length" in args else None
        return CapabilitySpec(kind, length=length, source=source)
    return CapabilitySpec(kind, source=source)


def check_output(spec: CapabilitySpec, output: TensorType) -> str | None:
    """What is wrong with declaring `output` for this capability, or None."""
    kind = spec.kind
    if kind in (CapabilityKind.IMAGE, CapabilityKind.FLOAT_IMAGE):
        element = ElementType.U8 if kind is CapabilityKind.IMAGE else ElementType.F32
        count = spec.width * spec.height * spec.pixel_format.channels
        shape = f"[1, {spec.height}, {spec.width}, {spec.pixel_format.channels}]"
    elif kind is CapabilityKind.SOUND:
        element, count, shape = ElementType.I16, spec.samples, f"[1, {spec.samples}]"
    elif kind is CapabilityKind.ACCEL:
        element, count, shape = ElementType.F32, spec.rows * 3, f"[1, {spec.rows}, 3]"
    elif kind is CapabilityKind.RAW:
        element = ElementType.U8
        count = spec.length if spec.length is not None else output.count
        shape = f"[1, {count}]"
    else:
        if output.element is ElementType.UTF8:
            return "RAND cannot make utf8; declare a numeric output"
        return None
    if output.element is not element:
        return (
            f"{kind.name} makes {element.type_name}; declare its output as type "
            f"{element.type_name}, not {output.element.type_name}"
        )
    if output.count != count:
        return (
            f"{kind.name} with these args makes {count} values (e.g. dimensions {shape}), but "
            f"the output {output} holds {output.count}"
        )
    return None
