"""Describe a rune file without running it: what `rune inspect` shows and the controller stores.

Rules: a bundle is read (and so verified part by part) before it is described; a legacy rune is
described from its custom sections and its import/export lists. Malformed input of either kind is
an `InspectError` with the reason. Nothing is executed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import wasmtime

from ota.rune.bundle import BundleError, is_bundle, read_bundle, sha256_hex
from ota.rune.legacy import LegacyRuneError, read_legacy_info
from ota.rune.runefile import StageKind
from ota.rune.wasm import is_wasm


class InspectError(ValueError):
    """A file that is neither a valid bundle nor a valid legacy rune."""


@dataclass
class RuneDescription:
    kind: str
    name: str
    version: str
    sha256: str
    size: int
    capabilities: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    graph: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def describe_rune(data: bytes, fallback_name: str = "rune") -> RuneDescription:
    if is_bundle(data):
        return _describe_bundle(data)
    if is_wasm(data):
        return _describe_legacy(data, fallback_name)
    raise InspectError("neither a rune bundle (zip) nor a legacy .rune (wasm module)")


def _describe_bundle(data: bytes) -> RuneDescription:
    try:
        bundle = read_bundle(data)
    except BundleError as exc:
        raise InspectError(str(exc)) from None
    manifest = bundle.manifest
    sizes = {p.path: p for p in manifest.parts}
    desc = RuneDescription("bundle", manifest.name, manifest.version, bundle.sha256, bundle.size)
    for entry in manifest.stages:
        stage = entry.stage
        outputs = [str(t) for t in stage.outputs]
        args = {
            k: (f"${v.name}" if hasattr(v, "name") and not isinstance(v, str) else v)
            for k, v in stage.args.items()
        }
        part = sizes.get(entry.part or "")
        digest = {"sha256": part.sha256, "size": part.size} if part else {}
        if stage.kind is StageKind.CAPABILITY:
            desc.capabilities.append(
                {"stage": stage.name, "kind": stage.target, "args": args, "outputs": outputs}
            )
        elif stage.kind is StageKind.MODEL:
            desc.models.append(
                {
                    "stage": stage.name,
                    "mimetype": entry.mimetype,
                    "inputs": [str(r) for r in stage.inputs],
                    "outputs": outputs,
                    **digest,
                }
            )
        elif stage.kind is StageKind.PROC_BLOCK:
            desc.blocks.append(
                {
                    "stage": stage.name,
                    "source": entry.source,
                    "args": args,
                    "inputs": [str(r) for r in stage.inputs],
                    "outputs": outputs,
                    **digest,
                }
            )
        else:
            desc.outputs.append(
                {
                    "stage": stage.name,
                    "kind": stage.target,
                    "inputs": [str(r) for r in stage.inputs],
                }
            )
    for resource in manifest.resources:
        part = sizes[resource.path]
        desc.resources.append(
            {
                "name": resource.name,
                "type": "binary" if resource.binary else "string",
                "sha256": part.sha256,
                "size": part.size,
            }
        )
    desc.parts = [{"path": p.path, "sha256": p.sha256, "size": p.size} for p in manifest.parts]
    return desc


def _describe_legacy(data: bytes, fallback_name: str) -> RuneDescription:
    try:
        info = read_legacy_info(data)
        module = wasmtime.Module(wasmtime.Engine(), data)
    except LegacyRuneError as exc:
        raise InspectError(str(exc)) from None
    except wasmtime.WasmtimeError as exc:
        raise InspectError(
            f"not a valid WebAssembly module: {str(exc).strip().splitlines()[0]}"
        ) from None
    graph = info.graph or {}
    rune = graph.get("rune") if isinstance(graph.get("rune"), dict) else {}
    name = str((rune or {}).get("name") or graph.get("name") or fallback_name)
    desc = RuneDescription(
        "legacy",
        name,
        str(info.version if info.version is not None else "?"),
        sha256_hex(data),
        len(data),
        graph=info.graph,
    )
    desc.capabilities = [{"kind": k.name} for k in info.capabilities]
    desc.models = _graph_list(graph.get("models"))
    desc.blocks = _graph_list(graph.get("proc_blocks"))
    desc.outputs = _graph_list(graph.get("outputs"))
    desc.resources = [
        {"name": n, "sha256": sha256_hex(d), "size": len(d)} for n, d in info.resources.items()
    ]
    desc.imports = [f"{i.module}.{i.name}" for i in module.imports]
    return desc


def _graph_list(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [
            {"stage": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in value.items()
        ]
    if isinstance(value, list):
        return [v if isinstance(v, dict) else {"value": v} for v in value]
    return []
