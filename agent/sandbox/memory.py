"""Bounds-checked access to a rune's linear memory, for host functions.

Rule: every pointer and length a rune hands the host is checked against the memory's current size
before a byte is read or written; a bad one raises `GuestFault` naming the host call, and nothing
is read or written. Lengths are also checked against the caller's cap before any copy is made.
"""

from __future__ import annotations

import struct

import wasmtime

from agent.sandbox.errors import GuestFault, LimitExceeded


class GuestMemory:
    def __init__(self, memory: wasmtime.Memory, store: wasmtime.Store) -> None:
        self._memory = memory
        self._store = store

    @property
    def size(self) -> int:
        return int(self._memory.data_len(self._store))

    def check(self, ptr: int, length: int, what: str) -> None:
        size = self.size
        if ptr < 0 or length < 0 or ptr + length > size:
            raise GuestFault(
                f"{what}: pointer {ptr:#x} with length {length} lies outside the rune's "
                f"{size}-byte memory"
            )

    def read(self, ptr: int, length: int, what: str, cap: int | None = None) -> bytes:
        if cap is not None and length > cap:
            raise LimitExceeded(f"{what}: {length} bytes is over the {cap}-byte limit")
        self.check(ptr, length, what)
        return bytes(self._memory.read(self._store, ptr, ptr + length))

    def write(self, ptr: int, data: bytes, what: str) -> None:
        self.check(ptr, len(data), what)
        self._memory.write(self._store, data, ptr)

    def read_u32s(self, ptr: int, count: int, what: str) -> tuple[int, ...]:
        return struct.unpack(f"<{count}I", self.read(ptr, 4 * count, what))

    def read_utf8(self, ptr: int, length: int, what: str, cap: int) -> str:
        raw = self.read(ptr, length, what, cap)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GuestFault(f"{what}: the string is not valid UTF-8") from None
