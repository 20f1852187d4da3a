"""Build legacy `.rune` modules (the Rune compiler v0.11 ABI) from WebAssembly text, for tests.

Every rune here is a real wasm module made with `wasmtime.wat2wasm`, labelled the way the Rune
compiler labels its output: a `.rune_version` section, a `.rune_graph` naming its capabilities,
and `.rune_resource` records. The WAT stays small: `ENV_IMPORTS` declares the whole host ABI,
a `Layout` places strings and buffers in linear memory (and writes the data segments), and each
function below makes one kind of rune.

Output convention: runes write TENSOR outputs (type 5), which the host records as
`{"channel": id, "bytes": hex}`, so a test can compare the exact bytes the host produced.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import wasmtime

from ota.rune.legacy import (
    GRAPH_SECTION,
    RESOURCE_SECTION,
    VERSION_SECTION,
    encode_resource_records,
)
from ota.rune.runefile import CapabilityKind, OutKind
from ota.rune.tensors import TensorType
from ota.rune.wasm import with_custom_section

PAGE = 65536
TFLITE = "application/tflite-model"
ONNX = "application/onnx-model"

# The host ABI, all parameters i32. Declaring an import a rune does not call is harmless.
ENV_IMPORTS = """
  (import "env" "_debug" (func $_debug (param i32 i32)))
  (import "env" "request_capability" (func $request_capability (param i32) (result i32)))
  (import "env" "request_capability_set_param"
    (func $request_capability_set_param (param i32 i32 i32 i32 i32 i32)))
  (import "env" "request_provider_response"
    (func $request_provider_response (param i32 i32 i32)))
  (import "env" "rune_model_load"
    (func $rune_model_load (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "rune_model_infer" (func $rune_model_infer (param i32 i32 i32)))
  (import "env" "request_output" (func $request_output (param i32) (result i32)))
  (import "env" "consume_output" (func $consume_output (param i32 i32 i32)))
  (import "env" "rune_resource_open" (func $rune_resource_open (param i32 i32) (result i32)))
  (import "env" "rune_resource_read" (func $rune_resource_read (param i32 i32 i32) (result i32)))
  (import "env" "rune_resource_close" (func $rune_resource_close (param i32)))
"""

# request_capability_set_param value types: name -> (ABI code, struct format)
PARAM_TYPES = {
    "i32": (1, "<i"),
    "f32": (2, "<f"),
    "u8": (5, "<B"),
    "i16": (6, "<h"),
    "i8": (7, "<b"),
}


def wat_bytes(data: bytes) -> str:
    """`data` as a WAT string literal body: printable ASCII as is, everything else as \\xx."""
    return "".join(
        chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\{b:02x}" for b in data
    )


def data_segment(offset: int, data: bytes) -> str:
    return f'(data (i32.const {offset}) "{wat_bytes(data)}")'


@dataclass(frozen=True)
class Blob:
    """A region of the rune's memory: where it starts and how long it is."""

    ptr: int
    len: int


class Layout:
    """Places data and buffers in linear memory from `start` up; writes the data segments."""

    def __init__(self, start: int = 1024) -> None:
        self.end = start
        self._segments: list[str] = []

    def _place(self, size: int, align: int) -> int:
        self.end = -(-self.end // align) * align
        ptr = self.end
        self.end += size
        return ptr

    def data(self, content: bytes, align: int = 8) -> Blob:
        ptr = self._place(len(content), align)
        self._segments.append(data_segment(ptr, content))
        return Blob(ptr, len(content))

    def string(self, text: str) -> Blob:
        return self.data(text.encode("utf-8"), align=1)

    def buffer(self, size: int) -> Blob:
        return Blob(self._place(size, 8), size)

    def u32s(self, *values: int) -> Blob:
        return self.data(struct.pack(f"<{len(values)}I", *values), align=4)

    def segments(self) -> str:
        return "\n".join(f"  {segment}" for segment in self._segments)

    def pages(self) -> int:
        return max(1, -(-self.end // PAGE))


def graph(capabilities: dict[str, CapabilityKind | str], **extra: Any) -> dict[str, Any]:
    """A `.rune_graph` that declares `capabilities` (stage name -> kind)."""
    kinds = {
        stage: {"kind": kind.name if isinstance(kind, CapabilityKind) else kind}
        for stage, kind in capabilities.items()
    }
    return {"rune": {"name": "test-rune"}, "capabilities": kinds, **extra}


def label(
    module: bytes,
    *,
    version: Any = 1,
    capabilities: dict[str, CapabilityKind | str] | None = None,
    resources: dict[str, bytes] | None = None,
    graph_json: dict[str, Any] | None = None,
) -> bytes:
    """Add the custom sections the Rune compiler writes."""
    if version is not None:
        payload = json.dumps({"version": version}).encode()
        module = with_custom_section(module, VERSION_SECTION, payload)
    if graph_json is None and capabilities is not None:
        graph_json = graph(capabilities)
    if graph_json is not None:
        module = with_custom_section(module, GRAPH_SECTION, json.dumps(graph_json).encode())
    if resources:
        module = with_custom_section(module, RESOURCE_SECTION, encode_resource_records(resources))
    return module


def module_wat(
    body: list[str],
    layout: Layout | None = None,
    *,
    pages: int | None = None,
    extra_imports: list[str] | tuple[str, ...] = (),
) -> str:
    layout = layout or Layout()
    pages = pages if pages is not None else layout.pages()
    parts = [
        ENV_IMPORTS.strip("\n"),
        *(f"  {line}" for line in extra_imports),
        f'  (memory (export "memory") {pages})',
        layout.segments(),
        *(f"  {part}" for part in body),
    ]
    return "(module\n" + "\n".join(part for part in parts if part) + "\n)"


def build(
    body: list[str],
    layout: Layout | None = None,
    *,
    pages: int | None = None,
    extra_imports: list[str] | tuple[str, ...] = (),
    **metadata: Any,
) -> bytes:
    """Assemble a rune: the ABI imports, one exported memory, `body`, then its metadata."""
    wat = module_wat(body, layout, pages=pages, extra_imports=extra_imports)
    return label(bytes(wasmtime.wat2wasm(wat)), **metadata)


def globals_(*names: str) -> str:
    return "\n  ".join(f"(global {name} (mut i32) (i32.const 0))" for name in names)


def manifest(*lines: str) -> str:
    return _func('(func (export "_manifest") (result i32)', lines)


def call(*lines: str) -> str:
    return _func('(func (export "_call") (param i32 i32 i32) (result i32)', lines)


def _func(head: str, lines: tuple[str, ...]) -> str:
    return "\n".join([head, *(f"    {line}" for line in lines if line), "    (i32.const 0))"])


def request_capability(cap: str, kind: CapabilityKind) -> str:
    return f"(global.set {cap} (call $request_capability (i32.const {kind.value})))"


def request_output(out: str, kind: OutKind = OutKind.TENSOR) -> str:
    return f"(global.set {out} (call $request_output (i32.const {kind.value})))"


def provider_response(cap: str, buffer: Blob) -> str:
    return (
        f"(call $request_provider_response (i32.const {buffer.ptr}) (i32.const {buffer.len}) "
        f"(global.get {cap}))"
    )


def host_call(func: str, *args: int | str, drop: bool = False) -> str:
    """`(call $func ...)`: int args become i32 constants, str args are WAT expressions."""
    operands = " ".join(f"(i32.const {a})" if isinstance(a, int) else a for a in args)
    text = f"(call ${func} {operands})"
    return f"(drop {text})" if drop else text


def emit(out: str, blob: Blob, length: str | None = None) -> str:
    """WAT that writes `blob` (or its first `length` bytes, a WAT expression) to output `out`."""
    size = length or f"(i32.const {blob.len})"
    return f"(call $consume_output (global.get {out}) (i32.const {blob.ptr}) {size})"


def set_params(layout: Layout, cap: str, params: dict[str, tuple[str, float]]) -> list[str]:
    """`request_capability_set_param` calls for `params` (key -> (type name, value))."""
    lines = []
    for key, (type_name, value) in params.items():
        code, fmt = PARAM_TYPES[type_name]
        key_blob = layout.string(key)
        value_blob = layout.data(struct.pack(fmt, value), align=4)
        lines.append(
            f"(call $request_capability_set_param (global.get {cap}) "
            f"(i32.const {key_blob.ptr}) (i32.const {key_blob.len}) "
            f"(i32.const {value_blob.ptr}) (i32.const {value_blob.len}) (i32.const {code}))"
        )
    return lines


# -- well-behaved runes ------------------------------------------------------------------------


def capability_rune(
    kind: CapabilityKind,
    nbytes: int,
    params: dict[str, tuple[str, float]] | None = None,
    *,
    declare: dict[str, CapabilityKind | str] | None = None,
) -> bytes:
    """Requests `kind` with `params` in `_manifest`; each `_call` asks the host for `nbytes` of
    it and writes them to a TENSOR output. Ids: the capability is 1, the output 2."""
    layout = Layout()
    buffer = layout.buffer(nbytes)
    body = [
        globals_("$cap", "$out"),
        manifest(
            request_capability("$cap", kind),
            *set_params(layout, "$cap", params or {}),
            request_output("$out"),
        ),
        call(provider_response("$cap", buffer), emit("$out", buffer)),
    ]
    return build(body, layout, capabilities=declare if declare is not None else {"input": kind})


def serial_rune(payload: bytes) -> bytes:
    """Writes `payload` (JSON in the Rune serial format) to a SERIAL output on every call."""
    layout = Layout()
    blob = layout.data(payload)
    body = [
        globals_("$out"),
        manifest(request_output("$out", OutKind.SERIAL)),
        call(emit("$out", blob)),
    ]
    return build(body, layout, capabilities={})


def model_rune(
    model: bytes,
    mimetype: str,
    inputs: str,
    outputs: str,
    *,
    input_data: bytes | None = None,
    feed: tuple[CapabilityKind, dict[str, tuple[str, float]]] | None = None,
) -> bytes:
    """Loads `model` (embedded in a data segment) in `_manifest` with one input and one output
    descriptor such as "f32[1, 1]". Each `_call` fills the input tensor, from `input_data` (fixed)
    or from the capability `feed`, runs `rune_model_infer` and writes the output tensor out."""
    in_size, out_size = (TensorType.parse_descriptor(d).byte_size for d in (inputs, outputs))
    layout = Layout()
    mime = layout.string(mimetype)
    in_text, out_text = layout.string(inputs), layout.string(outputs)
    in_desc = layout.u32s(in_text.ptr, in_text.len)
    out_desc = layout.u32s(out_text.ptr, out_text.len)
    tensor_in = layout.data(input_data) if input_data is not None else layout.buffer(in_size)
    tensor_out = layout.buffer(out_size)
    in_pp, out_pp = layout.u32s(tensor_in.ptr), layout.u32s(tensor_out.ptr)
    blob = layout.data(model)
    setup: list[str] = []
    fill = ""
    declared: dict[str, CapabilityKind | str] = {}
    if feed is not None:
        kind, params = feed
        declared = {"input": kind}
        setup = [request_capability("$cap", kind), *set_params(layout, "$cap", params)]
        fill = provider_response("$cap", Blob(tensor_in.ptr, in_size))
    load = (
        "(global.set $model (call $rune_model_load\n"
        f"      (i32.const {mime.ptr}) (i32.const {mime.len})\n"
        f"      (i32.const {blob.ptr}) (i32.const {blob.len})\n"
        f"      (i32.const {in_desc.ptr}) (i32.const 1) (i32.const {out_desc.ptr}) (i32.const 1)))"
    )
    infer = (
        "(call $rune_model_infer (global.get $model) "
        f"(i32.const {in_pp.ptr}) (i32.const {out_pp.ptr}))"
    )
    body = [
        globals_("$cap", "$model", "$out"),
        manifest(*setup, load, request_output("$out")),
        call(fill, infer, emit("$out", tensor_out)),
    ]
    return build(body, layout, capabilities=declared)


def resource_rune(name: str, *, chunk: int = 64, room: int = 1024, **metadata: Any) -> bytes:
    """Each `_call` opens resource `name`, reads it `chunk` bytes at a time until a read returns
    0, closes it and writes what it read to a TENSOR output."""
    layout = Layout()
    name_blob, buffer = layout.string(name), layout.buffer(room + chunk)
    read_all = f"""(func (export "_call") (param i32 i32 i32) (result i32)
    (local $id i32) (local $n i32) (local $total i32)
    (local.set $id
      (call $rune_resource_open (i32.const {name_blob.ptr}) (i32.const {name_blob.len})))
    (block $done
      (loop $more
        (local.set $n (call $rune_resource_read (local.get $id)
          (i32.add (i32.const {buffer.ptr}) (local.get $total)) (i32.const {chunk})))
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $total (i32.add (local.get $total) (local.get $n)))
        (br $more)))
    (call $rune_resource_close (local.get $id))
    {emit("$out", buffer, "(local.get $total)")}
    (i32.const 0))"""
    body = [globals_("$out"), manifest(request_output("$out")), read_all]
    metadata.setdefault("capabilities", {})
    return build(body, layout, **metadata)


def debug_rune(message: bytes) -> bytes:
    """Each `_call` passes `message` to `_debug`."""
    layout = Layout()
    blob = layout.data(message)
    body = [manifest(), call(f"(call $_debug (i32.const {blob.ptr}) (i32.const {blob.len}))")]
    return build(body, layout, capabilities={})


# -- hostile or broken runes ----------------------------------------------------------------------


def looping_rune() -> bytes:
    """`_call` never returns."""
    return build([manifest(), call("(loop $forever (br $forever))")], capabilities={})


def trapping_rune(*, first_call_only: bool = False) -> bytes:
    """`_call` reaches `unreachable` (only on the first call with `first_call_only`); when it
    does not trap it writes the number of calls so far as an i32 TENSOR output."""
    layout = Layout()
    count = layout.buffer(4)
    trap = "unreachable"
    if first_call_only:
        trap = "(if (i32.eq (global.get $calls) (i32.const 1)) (then unreachable))"
    body = [
        globals_("$calls", "$out"),
        manifest(request_output("$out")),
        call(
            "(global.set $calls (i32.add (global.get $calls) (i32.const 1)))",
            trap,
            f"(i32.store (i32.const {count.ptr}) (global.get $calls))",
            emit("$out", count),
        ),
    ]
    return build(body, layout, capabilities={})


def recursing_rune() -> bytes:
    """`_call` recurses without end."""
    body = ["(func $down (call $down))", manifest(), call("(call $down)")]
    return build(body, capabilities={})


def memory_bomb_rune(*, then: str = "loop") -> bytes:
    """The first `_call` grows memory a page at a time until `memory.grow` fails, then loops
    forever (`then="loop"`) or traps (`then="trap"`). Later calls write the memory size in
    pages (an i32) to a TENSOR output."""
    layout = Layout()
    pages = layout.buffer(4)
    after = "(loop $spin (br $spin))" if then == "loop" else "unreachable"
    bomb = f"""(if (i32.eq (global.get $calls) (i32.const 1))
      (then
        (block $full
          (loop $grow
            (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
            (br $grow)))
        {after}))"""
    body = [
        globals_("$calls", "$out"),
        manifest(request_output("$out")),
        call(
            "(global.set $calls (i32.add (global.get $calls) (i32.const 1)))",
            bomb,
            f"(i32.store (i32.const {pages.ptr}) (memory.size))",
            emit("$out", pages),
        ),
    ]
    return build(body, layout, capabilities={})


def big_memory_rune(pages: int) -> bytes:
    """Asks for `pages` pages of memory up front."""
    return build([manifest(), call()], pages=pages, capabilities={})


def output_flood_rune(length: int, times: int = 1) -> bytes:
    """Each `_call` writes `length` bytes to a TENSOR output `times` times."""
    layout = Layout()
    buffer = layout.buffer(length)
    body = [
        globals_("$out"),
        manifest(request_output("$out")),
        call(*[emit("$out", buffer)] * times),
    ]
    return build(body, layout, capabilities={})


SENTINEL_LOW = bytes([0xA5]) * 64
SENTINEL_HIGH = bytes([0x5A]) * 64
PROBE_RESOURCE = bytes(range(100, 148))


def probe_rune(bad_call: str) -> bytes:
    """A one-page rune for abusing host calls from WAT (`bad_call`, which may use the globals).

    `_manifest` requests RAND ($cap, id 1), a TENSOR output ($out, id 2) and opens the resource
    "blob" ($res, id 3). The first `_call` writes an output, then runs `bad_call`. Every later
    call writes four outputs: the first and the last 64 bytes of memory (which start as
    `SENTINEL_LOW` and `SENTINEL_HIGH`), the next 16 bytes of RAND and the next 8 bytes of
    "blob" (`PROBE_RESOURCE`), so a test sees whether the bad call wrote or consumed anything."""
    layout = Layout()
    blob_name, before = layout.string("blob"), layout.data(b"before the bad call")
    noise, chunk = layout.buffer(16), layout.buffer(8)
    open_blob = (
        "(global.set $res (call $rune_resource_open "
        f"(i32.const {blob_name.ptr}) (i32.const {blob_name.len})))"
    )
    read_blob = (
        f"(drop (call $rune_resource_read (global.get $res) (i32.const {chunk.ptr}) "
        f"(i32.const {chunk.len})))"
    )
    first_call = f"""(if (i32.eq (global.get $calls) (i32.const 1))
      (then
        {emit("$out", before)}
        {bad_call}
        (return (i32.const 0))))"""
    body = [
        data_segment(0, SENTINEL_LOW),
        data_segment(PAGE - 64, SENTINEL_HIGH),
        globals_("$calls", "$cap", "$out", "$res"),
        manifest(
            request_capability("$cap", CapabilityKind.RAND),
            request_output("$out"),
            open_blob,
        ),
        call(
            "(global.set $calls (i32.add (global.get $calls) (i32.const 1)))",
            first_call,
            emit("$out", Blob(0, 64)),
            emit("$out", Blob(PAGE - 64, 64)),
            provider_response("$cap", noise),
            emit("$out", noise),
            read_blob,
            emit("$out", chunk),
        ),
    ]
    return build(
        body,
        layout,
        pages=1,
        capabilities={"noise": CapabilityKind.RAND},
        resources={"blob": PROBE_RESOURCE},
    )


def importing_rune(*imports: str) -> bytes:
    """A rune that also imports `imports` (WAT import declarations), without calling them."""
    return build([manifest(), call()], extra_imports=imports, capabilities={})


def removed_api_rune() -> bytes:
    """A pre-0.11 rune: its `_manifest` calls `tfm_model_invoke`."""
    tfm = (
        '(import "env" "tfm_model_invoke" '
        "(func $tfm_model_invoke (param i32 i32 i32 i32) (result i32)))"
    )
    invoke = (
        "(drop (call $tfm_model_invoke (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))"
    )
    return build([manifest(invoke), call()], extra_imports=[tfm], capabilities={})


def start_function_rune(start_body: str) -> bytes:
    """A rune with a wasm start function running `start_body`; its `_call` writes the i32
    global $ready (which the start function may set) to a TENSOR output."""
    layout = Layout()
    ready = layout.buffer(4)
    body = [
        globals_("$ready", "$out"),
        f"(func $start {start_body})",
        "(start $start)",
        manifest(request_output("$out")),
        call(f"(i32.store (i32.const {ready.ptr}) (global.get $ready))", emit("$out", ready)),
    ]
    return build(body, layout, capabilities={})
