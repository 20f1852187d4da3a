"""`rune build`: turn a Runefile and the files it names into a bundle, or say what to fix.

Rules:
- Every problem found is reported at once, each with its stage and what to change: unknown or
  cyclic inputs, bad capability args, type or shape mismatches, missing or unsupported files.
- Blocks are built-ins (compiled from WAT) or the author's `.wasm` files, which must be
  fleet-block/1 modules (no imports; `memory`, `fleet_alloc`, `fleet_transform` exported).
- Models are TFLite (`.tflite`, `application/tflite-model`) or ONNX (`.onnx`,
  `application/onnx-model`), chosen by the stage's `format` arg or the file extension;
  TensorFlow and TF.js models are refused. When a model inspector is given (the `rune` CLI passes
  one backed by the installed runtimes), the model's own tensor signature is checked against the
  Runefile; when no runtime can read it, that is a warning, not silence.
- Paths are relative to the Runefile; nothing is written unless the whole build succeeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from attestation.provenance import Dependency, build_statement
from ota.rune.blocks.abi import block_module_problems
from ota.rune.blocks.builtin import BUILTINS, builtin_wasm, resolve_block_ref
from ota.rune.bundle import (
    MIMETYPE_ONNX,
    MIMETYPE_TFLITE,
    BundleStage,
    Manifest,
    ResourceEntry,
    read_bundle,
    sha256_hex,
    write_bundle,
)
from ota.rune.capabilities import CapabilityArgError, check_output, parse_capability
from ota.rune.graph import StageChecker, check_types, execution_order
from ota.rune.runefile import (
    Problem,
    ResourceRef,
    Runefile,
    RunefileError,
    Stage,
    StageKind,
    parse_runefile,
)
from ota.rune.streams import parse_streams
from ota.rune.tensors import TensorType

RUNEFILE_PART = "Runefile.yml"
MAX_PART_BYTES = 32 * 1024 * 1024
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
REFUSED_MODEL_FORMATS = {
    "tensorflow": "TensorFlow SavedModel/frozen graphs",
    "tensorflow-js": "TensorFlow.js models",
    "tfjs": "TensorFlow.js models",
}


class ModelSignature:
    """A model's input and output tensor types, as its runtime reports them."""

    def __init__(self, inputs: list[TensorType], outputs: list[TensorType]) -> None:
        self.inputs = inputs
        self.outputs = outputs


# Returns the signature, None when no runtime can read the model here, or raises ValueError.
ModelInspector = Callable[[str, bytes], ModelSignature | None]


@dataclass
class BuildResult:
    data: bytes
    manifest: Manifest
    warnings: list[str] = field(default_factory=list)


def default_name(runefile_path: Path) -> str:
    base = runefile_path.resolve().parent.name.lower()
    return re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._") or "rune"


def build_bundle(
    runefile_path: Path,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    inspect_model: ModelInspector | None = None,
) -> BuildResult:
    try:
        text = runefile_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunefileError(
            [Problem(str(runefile_path), f"cannot read the Runefile: {exc}")]
        ) from None
    runefile = parse_runefile(text)
    order = execution_order(runefile)
    name = name or default_name(runefile_path)
    problems: list[Problem] = []
    if not NAME_PATTERN.match(name):
        problems.append(Problem("name", f"{name!r} must be lowercase letters, digits, ., _ or -"))
    if not re.match(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$", version):
        problems.append(Problem("version", f"{version!r} is not a version such as 1.2.0"))

    builder = _Builder(runefile, runefile_path.parent, inspect_model)
    stages = [builder.stage(runefile.stages[n]) for n in order]
    resources = builder.resources()
    problems += builder.problems
    streams = parse_streams(runefile.telemetry, runefile.stages, problems)
    if problems:
        raise RunefileError(problems)
    check_types(runefile, order, builder.checkers)

    contents = dict(builder.contents)
    contents[RUNEFILE_PART] = text.encode("utf-8")
    manifest = Manifest(
        name,
        version,
        runefile.image,
        RUNEFILE_PART,
        tuple(stages),
        tuple(resources),
        streams=tuple(streams),
    )
    data = write_bundle(manifest, contents)
    # Re-read what was written: what the author ships is exactly what an agent will parse.
    return BuildResult(data, read_bundle(data).manifest, builder.warnings)


class _Builder:
    def __init__(
        self, runefile: Runefile, folder: Path, inspect_model: ModelInspector | None
    ) -> None:
        self.runefile = runefile
        self.folder = folder
        self.inspect_model = inspect_model
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self.contents: dict[str, bytes] = {}
        self.checkers: dict[str, StageChecker] = {}

    def _read(self, where: str, relative: str) -> bytes | None:
        path = self.folder / relative
        try:
            if path.is_dir():
                self.problems.append(Problem(where, f"{relative} is a directory, not a file"))
                return None
            data = path.read_bytes()
        except OSError as exc:
            self.problems.append(Problem(where, f"cannot read {relative}: {exc.strerror or exc}"))
            return None
        if len(data) > MAX_PART_BYTES:
            self.problems.append(Problem(where, f"{relative} is over {MAX_PART_BYTES} bytes"))
            return None
        return data

    def stage(self, stage: Stage) -> BundleStage:
        where = f"stage {stage.name}"
        if stage.kind is StageKind.CAPABILITY:
            return self._capability(where, stage)
        if stage.kind is StageKind.PROC_BLOCK:
            return self._block(where, stage)
        if stage.kind is StageKind.MODEL:
            return self._model(where, stage)
        return BundleStage(stage)

    def _capability(self, where: str, stage: Stage) -> BundleStage:
        try:
            spec = parse_capability(stage.capability, stage.args)
        except CapabilityArgError as exc:
            self.problems.append(Problem(where, str(exc)))
            return BundleStage(stage)
        if len(stage.outputs) != 1:
            self.problems.append(Problem(where, "a capability makes exactly one output"))
        else:
            mismatch = check_output(spec, stage.outputs[0])
            if mismatch:
                self.problems.append(Problem(where, mismatch))
        return BundleStage(stage)

    def _block(self, where: str, stage: Stage) -> BundleStage:
        ref = resolve_block_ref(stage.target)
        part = f"blocks/{stage.name}.wasm"
        if isinstance(ref, str):
            self.problems.append(Problem(where, ref))
            return BundleStage(stage, part=part)
        if ref.builtin is not None:
            block = BUILTINS[ref.builtin]
            self.contents[part] = builtin_wasm(ref.builtin)
            self.checkers[stage.name] = block.check
            return BundleStage(stage, part=part, source=f"builtin:{ref.builtin}")
        assert ref.path is not None
        data = self._read(where, ref.path)
        if data is not None:
            for message in check_block_module(data):
                self.problems.append(Problem(where, f"{ref.path}: {message}"))
            self.contents[part] = data
        return BundleStage(stage, part=part, source=f"file:{ref.path}")

    def _model(self, where: str, stage: Stage) -> BundleStage:
        target = stage.target
        fmt = str(stage.args.get("format", "")).strip().lower()
        if fmt in REFUSED_MODEL_FORMATS or target.endswith((".pb", "model.json", ".h5", ".keras")):
            kind = REFUSED_MODEL_FORMATS.get(fmt, "TensorFlow and TF.js models")
            self.problems.append(
                Problem(
                    where,
                    f"{kind} are not supported on devices; convert "
                    "the model to TFLite (.tflite) or ONNX (.onnx)",
                )
            )
            return BundleStage(stage)
        resource = re.match(r"^\$([A-Za-z_]\w*)$", target)
        if resource:
            entry = self.runefile.resources.get(resource.group(1))
            if entry is None or not entry.binary:
                self.problems.append(Problem(where, f"model {target} must name a binary resource"))
                return BundleStage(stage)
            data = self._resource_bytes(entry.name)
            suffix = ""
        else:
            data = self._read(where, target)
            suffix = Path(target).suffix.lower()
        if fmt in ("onnx",) or suffix == ".onnx":
            mimetype, ext = MIMETYPE_ONNX, ".onnx"
        elif fmt in ("", "tflite", "tensorflow-lite") and suffix in (".tflite", ""):
            mimetype, ext = MIMETYPE_TFLITE, ".tflite"
        else:
            self.problems.append(
                Problem(
                    where,
                    f"cannot tell the model type of {target!r}: name it "
                    ".tflite or .onnx, or set args: format: onnx|tflite",
                )
            )
            return BundleStage(stage)
        unknown = set(stage.args) - {"format"}
        if unknown:
            self.problems.append(
                Problem(
                    where, f"a model takes only the arg format, not {', '.join(sorted(unknown))}"
                )
            )
        part = f"models/{stage.name}{ext}"
        if data is None:
            return BundleStage(stage, part=part, mimetype=mimetype)
        if mimetype == MIMETYPE_TFLITE and data[4:8] != b"TFL3":
            self.problems.append(
                Problem(where, f"{target} is not a TFLite flatbuffer (no TFL3 identifier)")
            )
        self.contents[part] = data
        self._check_model(stage, mimetype, data)
        return BundleStage(stage, part=part, mimetype=mimetype)

    def _check_model(self, stage: Stage, mimetype: str, data: bytes) -> None:
        if self.inspect_model is None:
            return
        try:
            signature = self.inspect_model(mimetype, data)
        except ValueError as exc:
            self.problems.append(Problem(f"stage {stage.name}", f"the model cannot be read: {exc}"))
            return
        if signature is None:
            self.warnings.append(
                f"stage {stage.name}: no {mimetype} runtime is installed here, so "
                "the model's tensor types were not checked against the Runefile"
            )
            return

        def checker(s: Stage, inputs: list[TensorType]) -> list[str]:
            return _compare_signature(s, inputs, signature)

        self.checkers[stage.name] = checker

    def _resource_bytes(self, name: str) -> bytes | None:
        entry = self.runefile.resources[name]
        if entry.inline is not None:
            return entry.inline.encode("utf-8")
        assert entry.path is not None
        return self._read(f"resource {name}", entry.path)

    def resources(self) -> list[ResourceEntry]:
        entries = []
        used = {v.name for s in self.runefile.stages.values() for v in _refs(s.args)}
        for name, resource in self.runefile.resources.items():
            data = self._resource_bytes(name)
            if data is None:
                continue
            if not resource.binary:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    self.problems.append(
                        Problem(
                            f"resource {name}",
                            "is type string but not UTF-8 text; declare type: binary",
                        )
                    )
                    continue
            if resource.binary and name in used:
                self.problems.append(
                    Problem(
                        f"resource {name}",
                        "is binary, so it cannot be an arg value; declare type: string",
                    )
                )
            path = f"resources/{name}"
            self.contents[path] = data
            entries.append(ResourceEntry(name, path, resource.binary))
        return entries


def _refs(value: object) -> list[ResourceRef]:
    if isinstance(value, ResourceRef):
        return [value]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _compare_signature(
    stage: Stage, inputs: list[TensorType], signature: ModelSignature
) -> list[str]:
    problems = []
    if len(inputs) != len(signature.inputs):
        problems.append(
            f"the model takes {len(signature.inputs)} input(s), the stage gives {len(inputs)}"
        )
    for i, (given, wanted) in enumerate(zip(inputs, signature.inputs, strict=False)):
        if given.element is not wanted.element or given.count != wanted.count:
            problems.append(f"input {i} is {given}, but the model takes {wanted}")
    if len(stage.outputs) != len(signature.outputs):
        problems.append(
            f"the model makes {len(signature.outputs)} output(s); the stage declares "
            f"{len(stage.outputs)}"
        )
    for i, (declared, made) in enumerate(zip(stage.outputs, signature.outputs, strict=False)):
        if declared.element is not made.element or declared.count != made.count:
            problems.append(f"output {i} is declared {declared}, but the model makes {made}")
    return problems


def check_block_module(data: bytes) -> list[str]:
    """What keeps `data` from being a fleet-block/1 module (empty when it is one)."""
    if data[:4] != b"\0asm":
        return ["not a WebAssembly module (compile the block to wasm32)"]
    try:
        module = wasmtime.Module(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        return [f"not a valid WebAssembly module: {str(exc).strip().splitlines()[0]}"]
    return block_module_problems(module)


def provenance_statement(
    result: BuildResult, artifact: str, runefile_path: Path, builder_version: str
) -> dict[str, Any]:
    """The in-toto statement that the bundle `result` (written as `artifact`) was built from its
    Runefile and parts (`attestation.provenance`): each part with its SHA-256, and where a stage's
    part came from (`file:PATH` or `builtin:NAME`)."""
    manifest = result.manifest
    sources = {s.part: s.source or f"file:{s.stage.target}" for s in manifest.stages if s.part}
    sources[manifest.runefile] = f"file:{runefile_path.name}"
    dependencies = [
        Dependency(part.path, part.sha256, sources.get(part.path, "")) for part in manifest.parts
    ]
    return build_statement(
        artifact,
        sha256_hex(result.data),
        dependencies,
        {"runefile": runefile_path.name, "name": manifest.name, "version": manifest.version},
        {"fleet-tinyml": builder_version},
    )
