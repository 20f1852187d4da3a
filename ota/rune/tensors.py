"""Tensor element types and shapes, as Runefiles, bundles and the sandbox name them.

Rules:
- Element types are the Rune project's eleven: u8 i8 u16 i16 u32 i32 f32 u64 i64 f64 utf8. Each has
  a fixed numeric code used on the block ABI (docs/runes.md) and, except utf8, a little-endian
  numpy dtype.
- A shape is a non-empty tuple of positive dimensions of at most `MAX_RANK`.
- A utf8 tensor holds strings; on the wire its data is each element as u32 LE length + bytes.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

import numpy as np

MAX_RANK = 8


class TensorError(ValueError):
    """A tensor type, shape or value that does not fit its declaration."""


class ElementType(enum.Enum):
    U8 = ("u8", 1, "<u1")
    I8 = ("i8", 2, "<i1")
    U16 = ("u16", 3, "<u2")
    I16 = ("i16", 4, "<i2")
    U32 = ("u32", 5, "<u4")
    I32 = ("i32", 6, "<i4")
    F32 = ("f32", 7, "<f4")
    U64 = ("u64", 8, "<u8")
    I64 = ("i64", 9, "<i8")
    F64 = ("f64", 10, "<f8")
    UTF8 = ("utf8", 11, "")

    def __init__(self, type_name: str, code: int, dtype: str) -> None:
        self.type_name = type_name
        self.code = code
        self._dtype = dtype

    @property
    def dtype(self) -> np.dtype[np.generic]:
        if not self._dtype:
            raise TensorError("utf8 tensors hold strings and have no numeric dtype")
        return np.dtype(self._dtype)

    @property
    def size(self) -> int:
        """Bytes per element; 0 for utf8, whose elements vary in length."""
        return self.dtype.itemsize if self._dtype else 0

    @property
    def is_float(self) -> bool:
        return self in (ElementType.F32, ElementType.F64)

    @classmethod
    def parse(cls, name: str) -> ElementType:
        text = str(name).strip().lower()
        for member in cls:
            if member.type_name == text:
                return member
        raise TensorError(
            f"unknown element type {name!r}; use one of {', '.join(m.type_name for m in cls)}"
        )

    @classmethod
    def from_code(cls, code: int) -> ElementType:
        for member in cls:
            if member.code == code:
                return member
        raise TensorError(f"unknown element type code {code}")

    @classmethod
    def from_dtype(cls, dtype: np.dtype[np.generic]) -> ElementType:
        for member in cls:
            if member._dtype and np.dtype(member._dtype) == dtype.newbyteorder("<"):
                return member
        raise TensorError(f"numpy dtype {dtype} has no Rune element type")


@dataclass(frozen=True)
class TensorType:
    element: ElementType
    dimensions: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.dimensions or len(self.dimensions) > MAX_RANK:
            raise TensorError(f"a tensor has 1 to {MAX_RANK} dimensions, not {self.dimensions}")
        if any(d <= 0 for d in self.dimensions):
            raise TensorError(f"dimensions must be positive, not {list(self.dimensions)}")

    @property
    def count(self) -> int:
        n = 1
        for d in self.dimensions:
            n *= d
        return n

    @property
    def byte_size(self) -> int:
        """Bytes of a numeric tensor of this type (utf8 sizes vary: 0)."""
        return self.count * self.element.size

    def __str__(self) -> str:
        return f"{self.element.type_name}[{', '.join(str(d) for d in self.dimensions)}]"

    def to_json(self) -> dict[str, object]:
        return {"type": self.element.type_name, "dimensions": list(self.dimensions)}

    @classmethod
    def from_json(cls, data: object) -> TensorType:
        if not isinstance(data, dict):
            raise TensorError(f"a tensor type is a mapping with type and dimensions, not {data!r}")
        dims = data.get("dimensions")
        if not isinstance(dims, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims
        ):
            raise TensorError(f"dimensions must be a list of integers, not {dims!r}")
        return cls(ElementType.parse(str(data.get("type", ""))), tuple(dims))

    _DESCRIPTOR = re.compile(r"^\s*([a-z0-9]+)\s*\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]\s*$")

    @classmethod
    def parse_descriptor(cls, text: str) -> TensorType:
        """Parse the legacy ABI's model tensor descriptors such as ``f32[1, 1]``."""
        match = cls._DESCRIPTOR.match(text)
        if not match:
            raise TensorError(f"tensor descriptor {text!r} is not of the form f32[1, 28, 28, 1]")
        dims = tuple(int(d) for d in match.group(2).split(","))
        return cls(ElementType.parse(match.group(1)), dims)


@dataclass(frozen=True)
class Tensor:
    """A value: numeric data as a numpy array in the declared shape, or a list of strings."""

    element: ElementType
    dimensions: tuple[int, ...]
    data: np.ndarray | tuple[str, ...]

    @property
    def type(self) -> TensorType:
        return TensorType(self.element, self.dimensions)

    @classmethod
    def from_array(cls, array: np.ndarray) -> Tensor:
        element = ElementType.from_dtype(array.dtype)
        dims = tuple(int(d) for d in array.shape) or (1,)
        return cls(element, dims, np.ascontiguousarray(array.reshape(dims), dtype=element.dtype))

    @classmethod
    def from_strings(cls, values: list[str] | tuple[str, ...]) -> Tensor:
        if not values:
            raise TensorError("a utf8 tensor holds at least one string")
        return cls(ElementType.UTF8, (len(values),), tuple(values))

    @classmethod
    def from_bytes(cls, tensor_type: TensorType, raw: bytes) -> Tensor:
        element = tensor_type.element
        if element is ElementType.UTF8:
            return cls(element, tensor_type.dimensions, tuple(decode_strings(raw)))
        if len(raw) != tensor_type.byte_size:
            raise TensorError(
                f"{tensor_type} needs {tensor_type.byte_size} bytes of data, got {len(raw)}"
            )
        array = np.frombuffer(raw, dtype=element.dtype).reshape(tensor_type.dimensions)
        return cls(element, tensor_type.dimensions, array)

    def to_bytes(self) -> bytes:
        if isinstance(self.data, tuple):
            return encode_strings(self.data)
        return np.ascontiguousarray(self.data, dtype=self.element.dtype).tobytes()

    def elements(self) -> list[object]:
        """The flattened values as plain Python numbers or strings."""
        if isinstance(self.data, tuple):
            return list(self.data)
        values: list[object] = self.data.reshape(-1).tolist()
        return values


def encode_strings(values: tuple[str, ...] | list[str]) -> bytes:
    out = bytearray()
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def decode_strings(raw: bytes) -> list[str]:
    values: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError("utf8 tensor data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError("utf8 tensor data ends inside a string")
        try:
            values.append(raw[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TensorError(f"utf8 tensor holds invalid UTF-8: {exc}") from None
        offset += length
    return values
