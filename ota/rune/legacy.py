"""What a legacy `.rune` (one wasm32 module from the Rune compiler v0.11) says about itself.

Rules:
- `.rune_version` is JSON (`{"version": ...}`); `.rune_graph` is JSON whose `capabilities`
  (a mapping of stage name to an object, or a list of objects) give each capability's kind under
  `kind`, `capability_type` or `capability`, and whose `outputs`, `models` and `proc_blocks` are
  shown as they are.
- The capabilities the graph names are the rune's declared capabilities. A rune without a graph
  declares none and may not use any sensor.
- `.rune_resource` sections hold records of (u32 big-endian name length, name, u32 big-endian data
  length, data); all such sections are read in order, a later record of the same name wins, and a
  truncated record is an error, not a silent stop.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ota.rune.runefile import CapabilityKind
from ota.rune.wasm import WasmFormatError, custom_sections

VERSION_SECTION = ".rune_version"
GRAPH_SECTION = ".rune_graph"
RESOURCE_SECTION = ".rune_resource"


class LegacyRuneError(ValueError):
    """A legacy rune whose metadata sections are malformed."""


@dataclass(frozen=True)
class LegacyRuneInfo:
    version: Any = None
    graph: dict[str, Any] | None = None
    capabilities: tuple[CapabilityKind, ...] = ()
    resources: dict[str, bytes] = field(default_factory=dict)


def read_legacy_info(module: bytes) -> LegacyRuneInfo:
    try:
        sections = custom_sections(module)
    except WasmFormatError as exc:
        raise LegacyRuneError(f"not a legacy rune: {exc}") from None
    version: Any = None
    graph: dict[str, Any] | None = None
    resources: dict[str, bytes] = {}
    for section in sections:
        if section.name == VERSION_SECTION:
            version = _json(section.payload, VERSION_SECTION)
            if isinstance(version, dict):
                version = version.get("version", version)
        elif section.name == GRAPH_SECTION:
            parsed = _json(section.payload, GRAPH_SECTION)
            if not isinstance(parsed, dict):
                raise LegacyRuneError(f"{GRAPH_SECTION} must hold a JSON object")
            graph = parsed
        elif section.name == RESOURCE_SECTION:
            resources.update(parse_resource_records(section.payload))
    capabilities = graph_capabilities(graph) if graph is not None else ()
    return LegacyRuneInfo(version, graph, capabilities, resources)


def _json(payload: bytes, section: str) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LegacyRuneError(f"the {section} section is not valid JSON: {exc}") from None


def graph_capabilities(graph: dict[str, Any]) -> tuple[CapabilityKind, ...]:
    raw = graph.get("capabilities") or {}
    entries = list(raw.values()) if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise LegacyRuneError(f"{GRAPH_SECTION}: capabilities must be a mapping or a list")
    kinds: list[CapabilityKind] = []
    for entry in entries:
        kind = entry
        if isinstance(entry, dict):
            kind = entry.get("kind") or entry.get("capability_type") or entry.get("capability")
        name = str(kind).upper() if kind is not None else ""
        if name not in CapabilityKind.__members__:
            raise LegacyRuneError(f"{GRAPH_SECTION}: unknown capability {kind!r}")
        if CapabilityKind[name] not in kinds:
            kinds.append(CapabilityKind[name])
    return tuple(kinds)


def parse_resource_records(payload: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    offset = 0
    while offset < len(payload):
        name_len = _u32be(payload, offset, "a resource name length")
        name_raw = _take(payload, offset + 4, name_len, "a resource name")
        offset += 4 + name_len
        data_len = _u32be(payload, offset, "a resource data length")
        data = _take(payload, offset + 4, data_len, "resource data")
        offset += 4 + data_len
        try:
            records[name_raw.decode("utf-8")] = data
        except UnicodeDecodeError:
            raise LegacyRuneError(f"{RESOURCE_SECTION}: a resource name is not UTF-8") from None
    return records


def encode_resource_records(resources: dict[str, bytes]) -> bytes:
    out = bytearray()
    for name, data in resources.items():
        raw = name.encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(data)) + data
    return bytes(out)


def _u32be(payload: bytes, offset: int, what: str) -> int:
    value: int = struct.unpack(">I", _take(payload, offset, 4, what))[0]
    return value


def _take(payload: bytes, offset: int, length: int, what: str) -> bytes:
    if offset + length > len(payload):
        raise LegacyRuneError(f"{RESOURCE_SECTION}: {what} runs past the end of the section")
    return payload[offset : offset + length]
