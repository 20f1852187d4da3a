"""The processing-block ABI, fleet-block/1: how a host and a block module exchange data.

Rules (the full contract is in docs/runes.md):
- A block module has no imports and exports `memory`, `fleet_alloc(size) -> ptr` and
  `fleet_transform(inputs, count) -> result`; `fleet_configure(args, count) -> result` is
  optional and required only when the stage has args.
- The host writes only into regions `fleet_alloc` returned; everything is little-endian.
- An arg record is 32 bytes: key ptr/len, value ptr/len (UTF-8 text), kind (1: `number` holds the
  value as f64), reserved, f64 number.
- A tensor descriptor is 48 bytes: type code, rank, dims[8], data ptr, data len.
- A result is 12 bytes: status (0 ok), count, ptr; ok: `count` descriptors at ptr; otherwise a
  UTF-8 message of `count` bytes at ptr.
This module packs and unpacks those layouts; it does no I/O and trusts nothing it unpacks.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import wasmtime

from ota.rune.tensors import MAX_RANK, ElementType, Tensor, TensorError, TensorType

ABI_NAME = "fleet-block/1"
EXPORT_MEMORY = "memory"
EXPORT_ALLOC = "fleet_alloc"
EXPORT_CONFIGURE = "fleet_configure"
EXPORT_TRANSFORM = "fleet_transform"
REQUIRED_EXPORTS = (EXPORT_MEMORY, EXPORT_ALLOC, EXPORT_TRANSFORM)

ARG_RECORD = struct.Struct("<IIIIII d")
DESCRIPTOR = struct.Struct(f"<II{MAX_RANK}III")
RESULT = struct.Struct("<III")
ARG_KIND_TEXT = 0
ARG_KIND_NUMBER = 1
STATUS_OK = 0


@dataclass(frozen=True)
class BlockArg:
    key: str
    text: str
    number: float | None


def _align8(n: int) -> int:
    return (n + 7) & ~7


def pack_args(base: int, args: Sequence[BlockArg]) -> bytes:
    """The args table, followed by its strings, as it must sit at address `base`."""
    table = bytearray()
    strings = bytearray()
    cursor = base + ARG_RECORD.size * len(args)
    for arg in args:
        key, value = arg.key.encode("utf-8"), arg.text.encode("utf-8")
        key_ptr, value_ptr = cursor + len(strings), cursor + len(strings) + len(key)
        strings += key + value
        kind = ARG_KIND_NUMBER if arg.number is not None else ARG_KIND_TEXT
        table += ARG_RECORD.pack(
            key_ptr,
            len(key),
            value_ptr,
            len(value),
            kind,
            0,
            arg.number if arg.number is not None else 0.0,
        )
    return bytes(table + strings)


def pack_inputs(base: int, tensors: Sequence[Tensor]) -> bytes:
    """Descriptors for `tensors` followed by their 8-aligned data, as it must sit at `base`."""
    descriptors = bytearray()
    data = bytearray()
    start = _align8(base + DESCRIPTOR.size * len(tensors))
    padding = start - (base + DESCRIPTOR.size * len(tensors))
    for tensor in tensors:
        raw = tensor.to_bytes()
        dims = list(tensor.dimensions) + [0] * (MAX_RANK - len(tensor.dimensions))
        descriptors += DESCRIPTOR.pack(
            tensor.element.code, len(tensor.dimensions), *dims, start + len(data), len(raw)
        )
        data += raw + bytes(_align8(len(raw)) - len(raw))
    return bytes(descriptors) + bytes(padding) + bytes(data)


@dataclass(frozen=True)
class Descriptor:
    tensor_type: TensorType
    data_ptr: int
    data_len: int


def unpack_descriptor(raw: bytes) -> Descriptor:
    """Check and decode one output descriptor; raises TensorError for anything inconsistent."""
    fields = DESCRIPTOR.unpack(raw)
    code, rank = fields[0], fields[1]
    dims, data_ptr, data_len = fields[2 : 2 + MAX_RANK], fields[-2], fields[-1]
    if not 1 <= rank <= MAX_RANK:
        raise TensorError(f"output rank {rank} is not between 1 and {MAX_RANK}")
    tensor_type = TensorType(ElementType.from_code(code), tuple(dims[:rank]))
    if tensor_type.element is not ElementType.UTF8 and data_len != tensor_type.byte_size:
        raise TensorError(
            f"output {tensor_type} has {data_len} bytes of data, not {tensor_type.byte_size}"
        )
    return Descriptor(tensor_type, data_ptr, data_len)


def arg_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def block_module_problems(module: wasmtime.Module) -> list[str]:
    """What keeps a compiled module from being a fleet-block/1 block (empty when it is one)."""
    problems = []
    imports = [f"{i.module}.{i.name}" for i in module.imports]
    if imports:
        problems.append(
            f"blocks may import nothing (no WASI, no host calls), but it imports "
            f"{', '.join(imports)}"
        )
    exports = {e.name for e in module.exports}
    missing = [name for name in REQUIRED_EXPORTS if name not in exports]
    if missing:
        problems.append(
            f"it does not export {', '.join(missing)} (see the block ABI in docs/runes.md)"
        )
    return problems


def block_args(args: dict[str, Any], resource_text: Callable[[str], str]) -> list[BlockArg]:
    """A stage's Runefile args as the text-and-number records a block receives.

    Numbers keep their shortest text (360.0 reads "360"), lists are joined by newlines (the old
    `labels: [a, b]` form of a word list), and `$NAME` becomes the string resource's content.
    """
    return [BlockArg(key, *_arg_text(value, resource_text)) for key, value in args.items()]


def _arg_text(value: Any, resource_text: Callable[[str], str]) -> tuple[str, float | None]:
    if isinstance(value, bool):
        return ("true" if value else "false"), float(value)
    if isinstance(value, int | float):
        number = float(value)
        text = str(int(number)) if number.is_integer() else repr(number)
        return text, number
    if isinstance(value, list):
        return "\n".join(_arg_text(v, resource_text)[0] for v in value), None
    if value is None:
        return "", None
    if hasattr(value, "name") and not isinstance(value, str):
        text = resource_text(value.name)
        return text, arg_number(text.strip())
    text = str(value).strip()
    return text, arg_number(text)
