"""The rune bundle: one file holding a Runefile, its manifest, models, resources and blocks.

Layout (docs/runes.md): a zip archive whose first member is `manifest.json`; every other member is
a part listed in the manifest with its SHA-256 and size: `Runefile.yml`, `blocks/*.wasm`,
`models/*`, `resources/*`.

Rules when reading (nothing from a bundle is trusted before these pass):
- The file is at most `max_bytes`, a zip with no duplicate or unlisted members, and every listed
  part is present, no larger than its declared size, and matches its SHA-256.
- The manifest has the format `fleet-rune-bundle/1` and describes a pipeline that refers only to
  its own stages and parts.
Writing is deterministic: the same inputs give byte-identical bundles (fixed timestamps and
order), so a bundle's digest identifies its content.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from ota.rune.runefile import (
    CapabilityKind,
    InputRef,
    OutKind,
    ResourceRef,
    Stage,
    StageKind,
)
from ota.rune.streams import StreamError, StreamSpec, stream_from_json
from ota.rune.tensors import TensorError, TensorType

FORMAT = "fleet-rune-bundle/1"
MANIFEST = "manifest.json"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MIMETYPE_TFLITE = "application/tflite-model"
MIMETYPE_ONNX = "application/onnx-model"
MODEL_MIMETYPES = (MIMETYPE_TFLITE, MIMETYPE_ONNX)


class BundleError(ValueError):
    """A bundle that is malformed, tampered with or inconsistent; nothing of it may be used."""


@dataclass(frozen=True)
class Part:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BundleStage:
    """A pipeline stage plus where its code or model lives in the bundle."""

    stage: Stage
    part: str | None = None
    mimetype: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class ResourceEntry:
    name: str
    path: str
    binary: bool


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    image: str
    runefile: str
    stages: tuple[BundleStage, ...]
    resources: tuple[ResourceEntry, ...] = ()
    parts: tuple[Part, ...] = ()
    streams: tuple[StreamSpec, ...] = ()

    def stage(self, name: str) -> BundleStage:
        for entry in self.stages:
            if entry.stage.name == name:
                return entry
        raise KeyError(name)

    def of_kind(self, kind: StageKind) -> list[BundleStage]:
        return [s for s in self.stages if s.stage.kind is kind]

    @property
    def capabilities(self) -> list[CapabilityKind]:
        kinds: list[CapabilityKind] = []
        for entry in self.of_kind(StageKind.CAPABILITY):
            if entry.stage.capability not in kinds:
                kinds.append(entry.stage.capability)
        return kinds

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "image": self.image,
            "runefile": self.runefile,
            "stages": [_stage_to_json(s) for s in self.stages],
            "resources": [
                {"name": r.name, "path": r.path, "type": "binary" if r.binary else "string"}
                for r in self.resources
            ],
            "parts": [{"path": p.path, "sha256": p.sha256, "size": p.size} for p in self.parts],
        }
        if self.streams:
            document["telemetry"] = [s.to_json() for s in self.streams]
        return document

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        try:
            return _manifest_from_json(data)
        except (KeyError, TypeError, ValueError, TensorError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"the bundle manifest is malformed: {exc!r}") from None


@dataclass(frozen=True)
class Bundle:
    manifest: Manifest
    parts: dict[str, bytes] = field(repr=False)
    sha256: str = ""
    size: int = 0

    def part(self, path: str) -> bytes:
        return self.parts[path]

    def resource(self, name: str) -> bytes:
        for entry in self.manifest.resources:
            if entry.name == name:
                return self.parts[entry.path]
        raise BundleError(f"the bundle has no resource {name!r}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_bundle(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def write_bundle(manifest: Manifest, contents: dict[str, bytes]) -> bytes:
    """Pack `contents` (path -> bytes) with a manifest whose parts list is filled in here."""
    parts = tuple(
        Part(path, sha256_hex(data), len(data)) for path, data in sorted(contents.items())
    )
    final = Manifest(
        manifest.name,
        manifest.version,
        manifest.image,
        manifest.runefile,
        manifest.stages,
        manifest.resources,
        parts,
        manifest.streams,
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        entries = [(MANIFEST, json.dumps(final.to_json(), indent=2, sort_keys=True).encode())]
        entries += sorted(contents.items())
        for path, data in entries:
            info = zipfile.ZipInfo(path, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def read_bundle(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Bundle:
    if len(data) > max_bytes:
        raise BundleError(f"the bundle is {len(data)} bytes, over the {max_bytes}-byte limit")
    if not is_bundle(data):
        raise BundleError("not a rune bundle (not a zip archive)")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BundleError(f"the bundle is not a readable zip archive: {exc}") from None
    names = [info.filename for info in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BundleError(f"the bundle holds {', '.join(duplicates)} more than once")
    if MANIFEST not in names:
        raise BundleError("the bundle has no manifest.json")
    manifest_raw = _read_member(archive, MANIFEST, 1024 * 1024)
    try:
        manifest = Manifest.from_json(json.loads(manifest_raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"the bundle's manifest.json is not valid JSON: {exc}") from None
    listed = {p.path: p for p in manifest.parts}
    unlisted = sorted(set(names) - set(listed) - {MANIFEST})
    if unlisted:
        raise BundleError(
            f"the bundle holds files its manifest does not list: {', '.join(unlisted)}"
        )
    total = 0
    parts: dict[str, bytes] = {}
    for path, part in listed.items():
        if path not in names:
            raise BundleError(f"the bundle's manifest lists {path}, which is missing")
        total += part.size
        if total > max_bytes:
            raise BundleError(f"the bundle's parts add up to over the {max_bytes}-byte limit")
        content = _read_member(archive, path, part.size)
        if len(content) != part.size or sha256_hex(content) != part.sha256:
            raise BundleError(
                f"{path} does not match its SHA-256 in the manifest: the bundle was "
                "altered or damaged"
            )
        parts[path] = content
    _check_references(manifest, parts)
    return Bundle(manifest, parts, sha256_hex(data), len(data))


def _read_member(archive: zipfile.ZipFile, path: str, limit: int) -> bytes:
    try:
        with archive.open(path) as member:
            content = member.read(limit + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:
        raise BundleError(f"{path} in the bundle cannot be read: {exc}") from None
    if len(content) > limit:
        raise BundleError(f"{path} in the bundle is larger than its manifest says")
    return content


def _check_references(manifest: Manifest, parts: dict[str, bytes]) -> None:
    names = {s.stage.name: s.stage for s in manifest.stages}
    seen: set[str] = set()
    for entry in manifest.stages:
        stage = entry.stage
        for ref in stage.inputs:
            source = names.get(ref.stage)
            if source is None or ref.stage not in seen or ref.index >= len(source.outputs):
                raise BundleError(f"stage {stage.name} reads {ref}, which no earlier stage makes")
        if stage.kind in (StageKind.PROC_BLOCK, StageKind.MODEL) and entry.part not in parts:
            raise BundleError(f"stage {stage.name} needs part {entry.part}, which is missing")
        seen.add(stage.name)
    for resource in manifest.resources:
        if resource.path not in parts:
            raise BundleError(
                f"resource {resource.name} needs part {resource.path}, which is missing"
            )


def _arg_to_json(value: Any) -> Any:
    if isinstance(value, ResourceRef):
        return {"$resource": value.name}
    if isinstance(value, list):
        return [_arg_to_json(v) for v in value]
    return value


def _arg_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) != {"$resource"} or not isinstance(value["$resource"], str):
            raise BundleError(f"an arg value {value!r} is neither a value nor a resource reference")
        return ResourceRef(value["$resource"])
    if isinstance(value, list):
        return [_arg_from_json(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise BundleError(f"an arg value {value!r} has an unsupported type")


def _stage_to_json(entry: BundleStage) -> dict[str, Any]:
    stage = entry.stage
    data: dict[str, Any] = {
        "name": stage.name,
        "kind": stage.kind.value,
        "target": stage.target,
        "inputs": [str(ref) if ref.index else ref.stage for ref in stage.inputs],
        "outputs": [t.to_json() for t in stage.outputs],
        "args": {k: _arg_to_json(v) for k, v in stage.args.items()},
    }
    if entry.part is not None:
        data["part"] = entry.part
    if entry.mimetype is not None:
        data["mimetype"] = entry.mimetype
    if entry.source is not None:
        data["source"] = entry.source
    return data


def _stage_from_json(data: dict[str, Any]) -> BundleStage:
    kind = StageKind(data["kind"])
    target = str(data["target"])
    if kind is StageKind.CAPABILITY:
        CapabilityKind[target]
    elif kind is StageKind.OUT:
        OutKind[target]
    inputs = []
    for text in data.get("inputs", []):
        stage, _, index = str(text).partition(".")
        inputs.append(InputRef(stage, int(index or 0)))
    outputs = tuple(TensorType.from_json(t) for t in data.get("outputs", []))
    args = {str(k): _arg_from_json(v) for k, v in dict(data.get("args", {})).items()}
    mimetype = data.get("mimetype")
    if kind is StageKind.MODEL and mimetype not in MODEL_MIMETYPES:
        raise BundleError(f"stage {data['name']} has unsupported model type {mimetype!r}")
    part = data.get("part")
    if kind in (StageKind.PROC_BLOCK, StageKind.MODEL) and not isinstance(part, str):
        raise BundleError(f"stage {data['name']} names no part holding its code or model")
    return BundleStage(
        Stage(str(data["name"]), kind, target, tuple(inputs), outputs, args),
        part=part,
        mimetype=mimetype,
        source=data.get("source"),
    )


def _manifest_from_json(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise BundleError("the bundle manifest must be a JSON object")
    if data.get("format") != FORMAT:
        raise BundleError(
            f"unsupported bundle format {data.get('format')!r}; this agent reads {FORMAT}"
        )
    stages = tuple(_stage_from_json(s) for s in data["stages"])
    if not stages:
        raise BundleError("the bundle manifest has no stages")
    resources = tuple(
        ResourceEntry(str(r["name"]), str(r["path"]), r.get("type") == "binary")
        for r in data.get("resources", [])
    )
    parts = tuple(Part(str(p["path"]), str(p["sha256"]), int(p["size"])) for p in data["parts"])
    try:
        streams = tuple(stream_from_json(s) for s in data.get("telemetry", []))
    except StreamError as exc:
        raise BundleError(f"the bundle manifest's telemetry is malformed: {exc}") from None
    return Manifest(
        str(data["name"]),
        str(data["version"]),
        str(data.get("image", "")),
        str(data["runefile"]),
        stages,
        resources,
        parts,
        streams,
    )
