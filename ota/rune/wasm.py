"""Read the section table of a WebAssembly module: enough to find its custom sections.

wasmtime-py exposes a module's imports and exports but not its custom sections, which carry a
legacy rune's version, graph and resources; the binary layout is small and frozen by the core
spec (magic, version, then `id: u8, size: uleb128, payload` sections), so it is read here.

Rules: the magic and version must be those of core wasm 1; every section must lie within the
file; names must be valid UTF-8. Anything else is a `WasmFormatError` naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"\0asm"
VERSION_1 = b"\x01\0\0\0"
CUSTOM_SECTION = 0


class WasmFormatError(ValueError):
    """Bytes that are not a well-formed WebAssembly module."""


@dataclass(frozen=True)
class CustomSection:
    name: str
    payload: bytes


def is_wasm(data: bytes) -> bool:
    return data[:4] == MAGIC


def read_uleb128(data: bytes, offset: int) -> tuple[int, int]:
    """Decode an unsigned LEB128 (at most 5 bytes, 32 bits) at offset; return (value, next)."""
    result = shift = 0
    for i in range(5):
        if offset + i >= len(data):
            raise WasmFormatError("the module ends inside a LEB128 number")
        byte = data[offset + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, offset + i + 1
        shift += 7
    raise WasmFormatError("a LEB128 number is longer than 32 bits")


def custom_sections(data: bytes) -> list[CustomSection]:
    if not is_wasm(data):
        raise WasmFormatError("not a WebAssembly module (no \\0asm magic)")
    if data[4:8] != VERSION_1:
        raise WasmFormatError(f"unsupported WebAssembly version {data[4:8].hex()}")
    sections: list[CustomSection] = []
    offset = 8
    while offset < len(data):
        section_id = data[offset]
        size, start = read_uleb128(data, offset + 1)
        end = start + size
        if end > len(data):
            raise WasmFormatError(f"section {section_id} runs past the end of the module")
        if section_id == CUSTOM_SECTION:
            name_len, name_start = read_uleb128(data, start)
            if name_start + name_len > end:
                raise WasmFormatError("a custom section's name runs past the section")
            try:
                name = data[name_start : name_start + name_len].decode("utf-8")
            except UnicodeDecodeError:
                raise WasmFormatError("a custom section's name is not UTF-8") from None
            sections.append(CustomSection(name, data[name_start + name_len : end]))
        offset = end
    return sections


def custom_section(data: bytes, name: str) -> bytes | None:
    """The payload of the first custom section called `name`, or None."""
    for section in custom_sections(data):
        if section.name == name:
            return section.payload
    return None


def encode_uleb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_custom_section(module: bytes, name: str, payload: bytes) -> bytes:
    """Append a custom section to a module (how `rune build` labels blocks and tests make runes)."""
    raw_name = name.encode("utf-8")
    body = encode_uleb128(len(raw_name)) + raw_name + payload
    return module + bytes([CUSTOM_SECTION]) + encode_uleb128(len(body)) + body
