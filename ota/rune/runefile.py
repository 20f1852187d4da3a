"""Parse a Runefile (the Rune project's YAML) into typed stages, collecting every problem.

Rules:
- `version` must be 1; `image` is kept as written; `pipeline` maps stage names to stages.
- A stage has exactly one of `capability`, `proc-block`, `model` or `out`.
- Capabilities are RAND, SOUND, ACCEL, IMAGE, RAW, FLOAT_IMAGE in any case; outs are serial or
  tensor (any case).
- `inputs` name earlier stages as `name` or `name.N` (output N, from 0).
- `outputs` are `{type, dimensions}`; `out` stages have none, every other stage needs at least one.
- Arg keys have `-` read as `_`. A string arg `$NAME` refers to a declared resource; `@Enum::Value`
  strings are kept as written for the stage that reads them.
- Resources have exactly one of `path` (relative to the Runefile) or `inline`, and `type` string
  (the default) or binary.
- `telemetry` (this project's addition: the streams a device owner may opt in to) is kept as
  written here and checked by `ota.rune.streams` when the bundle is built.
Problems are reported together, each with the stage (or key) it is about and what to change.
This module reads text; it opens no files.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ota.rune.tensors import TensorError, TensorType

STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
INPUT_REF = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\.(\d+))?$")
RESOURCE_REF = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")


class CapabilityKind(enum.Enum):
    """Capabilities and their legacy-ABI numbers."""

    RAND = 1
    SOUND = 2
    ACCEL = 3
    IMAGE = 4
    RAW = 5
    FLOAT_IMAGE = 6


class OutKind(enum.Enum):
    SERIAL = 1
    BLE = 2
    PIN = 3
    WIFI = 4
    TENSOR = 5


SUPPORTED_OUTS = (OutKind.SERIAL, OutKind.TENSOR)


class StageKind(enum.Enum):
    CAPABILITY = "capability"
    PROC_BLOCK = "proc-block"
    MODEL = "model"
    OUT = "out"


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class RunefileError(ValueError):
    """A Runefile (or the files it names) that cannot be built; lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the Runefile has {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class InputRef:
    stage: str
    index: int = 0

    def __str__(self) -> str:
        return f"{self.stage}.{self.index}" if self.index else self.stage


@dataclass(frozen=True)
class ResourceRef:
    name: str


ArgValue = Any  # str | int | float | bool | list[...] | ResourceRef, as YAML gives it


@dataclass(frozen=True)
class Stage:
    name: str
    kind: StageKind
    target: str
    inputs: tuple[InputRef, ...] = ()
    outputs: tuple[TensorType, ...] = ()
    args: dict[str, ArgValue] = field(default_factory=dict)

    @property
    def capability(self) -> CapabilityKind:
        return CapabilityKind[self.target]

    @property
    def out(self) -> OutKind:
        return OutKind[self.target]


@dataclass(frozen=True)
class Resource:
    name: str
    binary: bool
    path: str | None = None
    inline: str | None = None


@dataclass(frozen=True)
class Runefile:
    image: str
    stages: dict[str, Stage]
    resources: dict[str, Resource]
    telemetry: object = None


def parse_runefile(text: str) -> Runefile:
    problems: list[Problem] = []
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "Runefile"
        raise RunefileError([Problem(where, f"not valid YAML: {exc}")]) from None
    if not isinstance(doc, dict):
        raise RunefileError([Problem("Runefile", "must be a YAML mapping with a pipeline")])

    version = doc.get("version")
    if version != 1:
        problems.append(
            Problem("version", f"must be 1 (the Rune Runefile format), not {version!r}")
        )
    image = doc.get("image", "runicos/base")
    if not isinstance(image, str):
        problems.append(Problem("image", f"must be a string, not {image!r}"))
        image = str(image)
    known = {"version", "image", "pipeline", "resources", "telemetry"}
    for key in doc:
        if key not in known:
            problems.append(
                Problem(str(key), f"unknown top-level key; use {', '.join(sorted(known))}")
            )

    resources = _parse_resources(doc.get("resources") or {}, problems)
    pipeline = doc.get("pipeline")
    stages: dict[str, Stage] = {}
    if not isinstance(pipeline, dict) or not pipeline:
        problems.append(Problem("pipeline", "must map stage names to stages, and not be empty"))
    else:
        for name, body in pipeline.items():
            stage = _parse_stage(str(name), body, resources, problems)
            if stage is not None:
                stages[stage.name] = stage
    if problems:
        raise RunefileError(problems)
    return Runefile(image=image, stages=stages, resources=resources, telemetry=doc.get("telemetry"))


def _parse_resources(raw: object, problems: list[Problem]) -> dict[str, Resource]:
    if not isinstance(raw, dict):
        problems.append(Problem("resources", "must map resource names to {path|inline, type}"))
        return {}
    resources: dict[str, Resource] = {}
    for name, body in raw.items():
        where = f"resource {name}"
        if not isinstance(name, str) or not RESOURCE_REF.match(f"${name}"):
            problems.append(Problem(where, "names are letters, digits and _"))
            continue
        if body is None:
            body = {}
        if not isinstance(body, dict):
            problems.append(Problem(where, "must be a mapping with path or inline, and type"))
            continue
        kind = str(body.get("type", "string")).lower()
        if kind not in ("string", "binary"):
            problems.append(Problem(where, f"type must be string or binary, not {kind!r}"))
        path, inline = body.get("path"), body.get("inline")
        if (path is None) == (inline is None):
            problems.append(Problem(where, "give exactly one of path or inline"))
            continue
        if path is not None and not isinstance(path, str):
            problems.append(Problem(where, "path must be a string"))
            continue
        if inline is not None and not isinstance(inline, str):
            problems.append(Problem(where, "inline must be a string"))
            continue
        resources[name] = Resource(name=name, binary=kind == "binary", path=path, inline=inline)
    return resources


def _parse_stage(
    name: str, body: object, resources: dict[str, Resource], problems: list[Problem]
) -> Stage | None:
    where = f"stage {name}"
    if not STAGE_NAME.match(name):
        problems.append(Problem(where, "stage names are letters, digits, _ and -"))
        return None
    if not isinstance(body, dict):
        problems.append(
            Problem(where, "must be a mapping with capability, proc-block, model or out")
        )
        return None
    kinds = [k for k in StageKind if k.value in body]
    if len(kinds) != 1:
        problems.append(Problem(where, "needs exactly one of capability, proc-block, model or out"))
        return None
    kind = kinds[0]
    allowed = {kind.value, "inputs", "outputs", "args"}
    for key in body:
        if key not in allowed:
            problems.append(
                Problem(
                    where,
                    f"unknown key {key!r}; a {kind.value} stage takes {', '.join(sorted(allowed))}",
                )
            )
    raw_target = body[kind.value]
    if not isinstance(raw_target, str) or not raw_target.strip():
        problems.append(Problem(where, f"{kind.value} must be a non-empty string"))
        return None
    target = raw_target.strip()
    if kind is StageKind.CAPABILITY:
        target = target.upper()
        if target not in CapabilityKind.__members__:
            problems.append(
                Problem(
                    where,
                    f"unknown capability {raw_target!r}; use one of "
                    f"{', '.join(CapabilityKind.__members__)}",
                )
            )
    elif kind is StageKind.OUT:
        target = target.upper()
        if target not in OutKind.__members__ or OutKind[target] not in SUPPORTED_OUTS:
            problems.append(Problem(where, f"unsupported out {raw_target!r}; use serial or tensor"))

    inputs = _parse_inputs(where, body.get("inputs"), problems)
    outputs = _parse_outputs(where, body.get("outputs"), problems)
    args = _parse_args(where, body.get("args"), resources, problems)
    if kind is StageKind.CAPABILITY and inputs:
        problems.append(Problem(where, "a capability reads a sensor and takes no inputs"))
    if kind is not StageKind.CAPABILITY and not inputs:
        problems.append(Problem(where, f"a {kind.value} stage needs inputs naming earlier stages"))
    if kind is StageKind.OUT and outputs:
        problems.append(Problem(where, "an out stage has no outputs; remove them"))
    if kind is not StageKind.OUT and not outputs:
        problems.append(Problem(where, "declare its outputs as a list of {type, dimensions}"))
    return Stage(name, kind, target, inputs, outputs, args)


def _parse_inputs(where: str, raw: object, problems: list[Problem]) -> tuple[InputRef, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(Problem(where, "inputs must be a list of stage names"))
        return ()
    refs: list[InputRef] = []
    for item in raw:
        match = INPUT_REF.match(str(item)) if isinstance(item, str) else None
        if match is None:
            problems.append(Problem(where, f"input {item!r} is not a stage name or name.N"))
            continue
        refs.append(InputRef(match.group(1), int(match.group(2) or 0)))
    return tuple(refs)


def _parse_outputs(where: str, raw: object, problems: list[Problem]) -> tuple[TensorType, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(Problem(where, "outputs must be a list of {type, dimensions}"))
        return ()
    outputs: list[TensorType] = []
    for i, item in enumerate(raw):
        try:
            outputs.append(TensorType.from_json(item))
        except TensorError as exc:
            problems.append(Problem(f"{where} output {i}", str(exc)))
    return tuple(outputs)


def _parse_args(
    where: str, raw: object, resources: dict[str, Resource], problems: list[Problem]
) -> dict[str, ArgValue]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(Problem(where, "args must be a mapping"))
        return {}
    args: dict[str, ArgValue] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        args[name] = _resolve_value(f"{where} arg {name}", value, resources, problems)
    return args


def _resolve_value(
    where: str, value: object, resources: dict[str, Resource], problems: list[Problem]
) -> ArgValue:
    if isinstance(value, str):
        match = RESOURCE_REF.match(value.strip())
        if match:
            if match.group(1) not in resources:
                problems.append(
                    Problem(
                        where,
                        f"refers to resource ${match.group(1)}, which is not "
                        "declared under resources",
                    )
                )
            return ResourceRef(match.group(1))
        return value
    if isinstance(value, list):
        return [_resolve_value(where, v, resources, problems) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    problems.append(Problem(where, f"must be a number, string or list, not {type(value).__name__}"))
    return None
