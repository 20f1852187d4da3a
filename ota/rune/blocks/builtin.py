"""The built-in processing blocks: how Runefiles name them, what they accept, what they make.

Rules:
- A `proc-block:` value names a built-in by the Rune project's names: `NAME`,
  `hotg-ai/proc-blocks@vX#NAME`, `hotg-ai/proc-blocks#NAME` or `hotg-ai/rune#proc_blocks/NAME`
  (`-` and `_` alike). A value ending in `.wasm` is the author's own block file. Anything else is
  an error listing the built-ins.
- Each built-in takes exactly one input and makes one output; its rule states which element types
  it accepts and the output type it makes, so `rune build` catches a mismatched Runefile.
- Built-ins are WebAssembly text in `wat/` (one shared prelude plus one body each), compiled with
  `wasmtime.wat2wasm`: the module the bundle carries is the one the sandbox runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

import wasmtime

from ota.rune.runefile import ResourceRef, Stage
from ota.rune.tensors import ElementType, TensorType

E = ElementType
NUMERIC = frozenset(e for e in E if e is not E.UTF8)
INTEGER = frozenset({E.U8, E.I8, E.U16, E.I16, E.U32, E.I32, E.U64, E.I64})
FLOAT = frozenset({E.F32, E.F64})
PROC_BLOCK_REF = re.compile(r"^(?P<base>[^@#]+)(?:@(?P<version>[^#]+))?(?:#(?P<sub>.+))?$")

OutputRule = Callable[[TensorType, Stage], TensorType | str]


@dataclass(frozen=True)
class BuiltinBlock:
    name: str
    accepts: frozenset[ElementType]
    output: OutputRule
    args: tuple[str, ...] = ()
    required_args: tuple[str, ...] = ()

    def check(self, stage: Stage, inputs: list[TensorType]) -> list[str]:
        """Problems with using this block at `stage` with these input types (empty when fine)."""
        problems = [
            f"{self.name} takes no arg {key!r}"
            + (f"; it takes {', '.join(self.args)}" if self.args else "")
            for key in stage.args
            if key not in self.args
        ]
        problems += [
            f"{self.name} needs the arg {' or '.join(alts.split('|'))}"
            for alts in self.required_args
            if not any(a in stage.args for a in alts.split("|"))
        ]
        if len(inputs) != 1:
            return [*problems, f"{self.name} takes exactly one input, not {len(inputs)}"]
        if len(stage.outputs) != 1:
            return [*problems, f"{self.name} makes exactly one output; declare one"]
        source = inputs[0]
        if source.element not in self.accepts:
            accepted = ", ".join(sorted(e.type_name for e in self.accepts))
            return [
                *problems,
                f"{self.name} cannot take {source.element.type_name} input "
                f"({source}); it takes {accepted}",
            ]
        expected = self.output(source, stage)
        if isinstance(expected, str):
            return [*problems, expected]
        declared = stage.outputs[0]
        if declared != expected:
            problems.append(
                f"declares output {declared}, but {self.name} makes {expected} from "
                f"{source}; change the output to type {expected.element.type_name}, "
                f"dimensions {list(expected.dimensions)}"
            )
        return problems


def _same(source: TensorType, stage: Stage) -> TensorType:
    return source


def _f32_same_dims(source: TensorType, stage: Stage) -> TensorType:
    return TensorType(E.F32, source.dimensions)


def _one_index(source: TensorType, stage: Stage) -> TensorType:
    return TensorType(E.U32, (1,))


def _top_indices(source: TensorType, stage: Stage) -> TensorType | str:
    dims = list(source.dimensions)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 1:
        return f"most_confident_indices needs a 1-D input such as [1, N], not {source}"
    count = stage.args.get("count", 1)
    if (
        isinstance(count, bool)
        or not isinstance(count, int | float)
        or count != int(count)
        or count < 1
    ):
        return f"count must be a whole number of at least 1, not {count!r}"
    if count > dims[0]:
        return f"count {int(count)} is more than the {dims[0]} values of its input {source}"
    return TensorType(E.U32, (int(count),))


def _labels(source: TensorType, stage: Stage) -> TensorType:
    return TensorType(E.UTF8, (source.count,))


def _image(source: TensorType, stage: Stage) -> TensorType | str:
    if len(source.dimensions) != 4 or source.dimensions[3] not in (1, 3):
        return f"image_normalization needs an image [N, H, W, C] with 1 or 3 channels, not {source}"
    return TensorType(E.F32, source.dimensions)


def _modulo(source: TensorType, stage: Stage) -> TensorType | str:
    modulus = stage.args.get("modulus", 1)
    if isinstance(modulus, str):
        try:
            modulus = float(modulus)
        except ValueError:
            return f"modulus must be a number, not {modulus!r}"
    if (
        isinstance(modulus, bool | ResourceRef)
        or not isinstance(modulus, int | float)
        or modulus == 0
    ):
        return f"modulus must be a non-zero number, not {modulus!r}"
    return source


BUILTINS: dict[str, BuiltinBlock] = {
    b.name: b
    for b in (
        BuiltinBlock("modulo", NUMERIC, _modulo, args=("modulus",)),
        BuiltinBlock("normalize", NUMERIC, _f32_same_dims),
        BuiltinBlock("softmax", FLOAT, _same),
        BuiltinBlock("argmax", NUMERIC, _one_index),
        BuiltinBlock("most_confident_indices", NUMERIC, _top_indices, args=("count",)),
        BuiltinBlock(
            "label",
            INTEGER | FLOAT,
            _labels,
            args=("wordlist", "labels"),
            required_args=("wordlist|labels",),
        ),
        BuiltinBlock("image_normalization", INTEGER - {E.U64, E.I64}, _image),
    )
}


@dataclass(frozen=True)
class BlockRef:
    """Where a stage's block comes from: a built-in by name, or the author's .wasm file."""

    builtin: str | None = None
    path: str | None = None


def resolve_block_ref(target: str) -> BlockRef | str:
    """Resolve a `proc-block:` value, or return what is wrong with it."""
    text = target.strip()
    if text.endswith(".wasm"):
        return BlockRef(path=text)
    if text.startswith(("./", "../", "/")):
        return (
            f"proc-block {text!r} is not a .wasm file: compile the block to wasm32 (see "
            "docs/runes.md, the block ABI) and reference the .wasm file"
        )
    match = PROC_BLOCK_REF.match(text)
    name = ""
    if match:
        path = match.group("sub") or match.group("base")
        name = path.rstrip("/").rsplit("/", 1)[-1].replace("-", "_").lower()
    if name in BUILTINS:
        return BlockRef(builtin=name)
    return (
        f"proc-block {text!r} is not a built-in block; built-ins are "
        f"{', '.join(BUILTINS)} (as NAME or hotg-ai/proc-blocks@vX#NAME), or reference "
        "your own ./block.wasm"
    )


@cache
def builtin_wasm(name: str) -> bytes:
    """The compiled module of built-in `name` (compiled once per process)."""
    if name not in BUILTINS:
        raise KeyError(name)
    folder = resources.files("ota.rune.blocks").joinpath("wat")
    prelude = folder.joinpath("prelude.wat").read_text(encoding="utf-8")
    body = folder.joinpath(f"{name}.wat").read_text(encoding="utf-8")
    return bytes(wasmtime.wat2wasm(f"(module\n{prelude}\n{body}\n)"))
