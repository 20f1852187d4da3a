"""Runs a legacy `.rune` (the Rune compiler v0.11 ABI) unmodified, under the sandbox's limits.

Rules:
- Imports must all come from module `env` and be functions of the v0.11 ABI with all-i32
  parameters; anything else (WASI, unknown names, memories, globals) is refused at load, naming
  each import. The removed `tfm_preload_model` / `tfm_model_invoke` load but fail when called.
- The module exports `memory`, `_manifest` (called once at load) and `_call` (once per inference,
  with 0, 0, 0).
- Ids for capabilities, outputs, models and resources come from one counter starting at 1.
- A capability must be declared by the rune's `.rune_graph` and allowed by the caller's policy,
  or the request fails with `CapabilityDenied`.
- Every pointer and length from the rune is bounds-checked before use; output, model, resource and
  debug sizes are capped by `SandboxLimits`. The host fills exactly the bytes a rune asks for.
- A failure inside a host call stops the call with the host's error (never a raw traceback); the
  instance may be called again afterwards.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import wasmtime

from agent.sandbox.engine import (
    call_guest,
    compile_module,
    engine,
    export_func,
    instantiate,
    new_store,
)
from agent.sandbox.errors import (
    CapabilityDenied,
    GuestFault,
    LimitExceeded,
    ModelError,
    ModuleRejected,
    SandboxError,
)
from agent.sandbox.inputs import InputSources
from agent.sandbox.limits import SandboxLimits
from agent.sandbox.models import Model, load_model, run_model
from agent.sandbox.outputs import OutputRecord, serial_record
from ota.rune.capabilities import CapabilityArgError, parse_capability
from ota.rune.legacy import LegacyRuneError, LegacyRuneInfo, read_legacy_info
from ota.rune.runefile import CapabilityKind, OutKind
from ota.rune.tensors import TensorError, TensorType

log = logging.getLogger(__name__)

# name -> (parameter count, returns a value the rune uses)
HOST_FUNCTIONS: dict[str, tuple[int, bool]] = {
    "_debug": (2, False),
    "request_capability": (1, True),
    "request_capability_set_param": (6, False),
    "request_provider_response": (3, False),
    "rune_model_load": (8, True),
    "rune_model_infer": (3, False),
    "request_output": (1, True),
    "consume_output": (3, False),
    "rune_resource_open": (2, True),
    "rune_resource_read": (3, True),
    "rune_resource_close": (1, False),
}
REMOVED_FUNCTIONS = ("tfm_preload_model", "tfm_model_invoke")
PARAM_TYPES: dict[int, tuple[str, int]] = {
    1: ("<i", 4),
    2: ("<f", 4),
    5: ("<B", 1),
    6: ("<h", 2),
    7: ("<b", 1),
}
MAX_KEY = 256
MAX_DESCRIPTOR = 256


@dataclass
class _Capability:
    kind: CapabilityKind
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class _LoadedModel:
    model: Model
    inputs: list[TensorType]
    outputs: list[TensorType]


class LegacyRune:
    def __init__(
        self,
        module: bytes,
        *,
        limits: SandboxLimits | None = None,
        sources: InputSources | None = None,
        allowed: frozenset[CapabilityKind] | None = None,
        resources: dict[str, bytes] | None = None,
        name: str = "rune",
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.sources = sources or InputSources()
        self.name = name
        self._allowed = allowed
        try:
            self.info: LegacyRuneInfo = read_legacy_info(module)
        except LegacyRuneError as exc:
            raise ModuleRejected(f"{name}: {exc}") from None
        self._resources = {**self.info.resources, **(resources or {})}
        compiled = compile_module(module, name, self.limits)
        self._store = new_store(self.limits)
        linker = wasmtime.Linker(engine())
        self._define_imports(compiled, linker)
        exports = {e.name for e in compiled.exports}
        missing = [e for e in ("memory", "_manifest", "_call") if e not in exports]
        if missing:
            raise ModuleRejected(
                f"{name} is not a legacy rune: it does not export {', '.join(missing)}"
            )
        ex, self._memory = instantiate(self._store, compiled, name, self.limits, linker)
        self._manifest_fn = export_func(ex, "_manifest", name)
        self._call_fn = export_func(ex, "_call", name)
        self._next_id = 1
        self._capabilities: dict[int, _Capability] = {}
        self._outputs: dict[int, OutKind] = {}
        self._models: dict[int, _LoadedModel] = {}
        self._open: dict[int, tuple[bytes, int]] = {}
        self._pending: list[OutputRecord] = []
        self._output_bytes = 0
        call_guest(self._store, self._manifest_fn, what=f"{name} _manifest", limits=self.limits)

    def _define_imports(self, compiled: wasmtime.Module, linker: wasmtime.Linker) -> None:
        refused = []
        for item in compiled.imports:
            label = f"{item.module}.{item.name}"
            import_name = item.name or ""
            functype = item.type
            if item.module != "env" or not isinstance(functype, wasmtime.FuncType):
                refused.append(
                    label + (" (WASI is not available)" if "wasi" in item.module else "")
                )
                continue
            if import_name in REMOVED_FUNCTIONS:
                linker.define_func("env", import_name, functype, self._removed(import_name))
                continue
            expected = HOST_FUNCTIONS.get(import_name)
            i32 = wasmtime.ValType.i32()
            if expected is None:
                refused.append(label)
                continue
            params, returns = expected
            results = list(functype.results)
            if (
                len(functype.params) != params
                or any(p != i32 for p in functype.params)
                or len(results) > 1
                or (results and results[0] != i32)
                or (returns and not results)
            ):
                refused.append(f"{label} (wrong signature)")
                continue
            linker.define_func(
                "env",
                import_name,
                functype,
                self._host(getattr(self, f"_h{import_name}"), bool(results)),
            )
        if refused:
            raise ModuleRejected(
                f"{self.name} imports what this sandbox does not provide: {', '.join(refused)}"
            )

    def _host(self, fn: Callable[..., int], returns: bool) -> Callable[..., Any]:
        def call(*args: int) -> int | None:
            value = fn(*args)
            return value if returns else None

        return call

    def _removed(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> None:
            raise ModuleRejected(
                f"{self.name} calls {name}, the removed TensorFlow Lite Micro API; "
                "rebuild the rune with a Rune compiler that uses rune_model_load"
            )

        return call

    def _new_id(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    # -- host functions (names follow the ABI) -------------------------------------------------

    def _h_debug(self, ptr: int, length: int) -> int:
        self._memory.check(ptr, length, "_debug")
        raw = self._memory.read(ptr, min(length, self.limits.max_debug_bytes), "_debug")
        text = raw.decode("utf-8", errors="replace")
        try:
            record = json.loads(text)
            message = record.get("message", text) if isinstance(record, dict) else text
            level = str(record.get("level", "INFO")).upper() if isinstance(record, dict) else "INFO"
        except json.JSONDecodeError:
            message, level = text, "INFO"
        levels = logging.getLevelNamesMapping()
        log.log(levels.get(level, logging.INFO), "%s: %s", self.name, message)
        return 0

    def _hrequest_capability(self, kind_code: int) -> int:
        try:
            kind = CapabilityKind(kind_code)
        except ValueError:
            raise CapabilityDenied(
                f"{self.name} asked for unknown capability {kind_code}"
            ) from None
        if kind not in self.info.capabilities:
            raise CapabilityDenied(
                f"{self.name} asked for {kind.name}, which its manifest "
                "(.rune_graph) does not declare"
            )
        if self._allowed is not None and kind not in self._allowed:
            raise CapabilityDenied(
                f"{self.name} asked for {kind.name}, which this device's policy does not allow"
            )
        cap_id = self._new_id()
        self._capabilities[cap_id] = _Capability(kind)
        return cap_id

    def _hrequest_capability_set_param(
        self,
        cap_id: int,
        key_ptr: int,
        key_len: int,
        value_ptr: int,
        value_len: int,
        value_type: int,
    ) -> int:
        capability = self._capability(cap_id, "request_capability_set_param")
        key = self._memory.read_utf8(key_ptr, key_len, "request_capability_set_param key", MAX_KEY)
        if value_type not in PARAM_TYPES:
            raise GuestFault(
                f"{self.name}: capability param {key!r} has unknown value type {value_type}"
            )
        fmt, size = PARAM_TYPES[value_type]
        if value_len != size:
            raise GuestFault(
                f"{self.name}: capability param {key!r} of type {value_type} must be "
                f"{size} bytes, not {value_len}"
            )
        raw = self._memory.read(value_ptr, value_len, "request_capability_set_param value")
        value = struct.unpack(fmt, raw)[0]
        if isinstance(value, float) and not math.isfinite(value):
            raise GuestFault(f"{self.name}: capability param {key!r} is {value}, not a number")
        capability.params[key.replace("-", "_")] = value
        return 0

    def _capability(self, cap_id: int, call: str) -> _Capability:
        capability = self._capabilities.get(cap_id)
        if capability is None:
            raise GuestFault(
                f"{self.name}: {call} names capability {cap_id}, which it never requested"
            )
        return capability

    def _hrequest_provider_response(self, buf: int, length: int, cap_id: int) -> int:
        capability = self._capability(cap_id, "request_provider_response")
        self._memory.check(buf, length, "request_provider_response")
        try:
            spec = parse_capability(capability.kind, capability.params)
        except CapabilityArgError as exc:
            raise GuestFault(f"{self.name}: capability {capability.kind.name}: {exc}") from None
        data = self.sources.provide(f"legacy:{cap_id}", spec, None, length)
        self._memory.write(buf, data, "request_provider_response")
        return len(data)

    def _hrune_model_load(
        self,
        mime_ptr: int,
        mime_len: int,
        model_ptr: int,
        model_len: int,
        in_ptr: int,
        in_count: int,
        out_ptr: int,
        out_count: int,
    ) -> int:
        mimetype = self._memory.read_utf8(mime_ptr, mime_len, "rune_model_load mimetype", MAX_KEY)
        data = self._memory.read(
            model_ptr, model_len, "rune_model_load model", self.limits.model_bytes
        )
        inputs = self._descriptors(in_ptr, in_count, "inputs")
        outputs = self._descriptors(out_ptr, out_count, "outputs")
        model_id = self._new_id()
        what = f"{self.name} model {model_id}"
        model = load_model(mimetype, data, self.limits, what)
        for side, declared, actual in (
            ("input", inputs, model.inputs),
            ("output", outputs, model.outputs),
        ):
            if len(declared) != len(actual) or any(
                d.element is not a.element or d.count != a.count
                for d, a in zip(declared, actual, strict=False)
            ):
                raise ModelError(
                    f"{what}: the rune describes its {side}s as "
                    f"{', '.join(map(str, declared))}, but the model has "
                    f"{', '.join(map(str, actual))}"
                )
        self._models[model_id] = _LoadedModel(model, inputs, outputs)
        return model_id

    def _descriptors(self, ptr: int, count: int, what: str) -> list[TensorType]:
        if count > self.limits.max_tensors:
            raise LimitExceeded(
                f"{self.name}: rune_model_load with {count} {what}, over the "
                f"limit of {self.limits.max_tensors}"
            )
        pairs = self._memory.read_u32s(ptr, 2 * count, f"rune_model_load {what}")
        types = []
        for i in range(count):
            text = self._memory.read_utf8(
                pairs[2 * i], pairs[2 * i + 1], f"rune_model_load {what} descriptor", MAX_DESCRIPTOR
            )
            try:
                types.append(TensorType.parse_descriptor(text))
            except TensorError as exc:
                raise GuestFault(f"{self.name}: rune_model_load {what}: {exc}") from None
        return types

    def _hrune_model_infer(self, model_id: int, inputs_pp: int, outputs_pp: int) -> int:
        loaded = self._models.get(model_id)
        if loaded is None:
            raise GuestFault(
                f"{self.name}: rune_model_infer names model {model_id}, which it never loaded"
            )
        in_ptrs = self._memory.read_u32s(inputs_pp, len(loaded.inputs), "rune_model_infer inputs")
        out_ptrs = self._memory.read_u32s(
            outputs_pp, len(loaded.outputs), "rune_model_infer outputs"
        )
        arrays = []
        for ptr, tensor_type in zip(in_ptrs, loaded.inputs, strict=True):
            raw = self._memory.read(ptr, tensor_type.byte_size, "rune_model_infer input")
            arrays.append(np.frombuffer(raw, dtype=tensor_type.element.dtype))
        for out_ptr, tensor_type in zip(out_ptrs, loaded.outputs, strict=True):
            self._memory.check(out_ptr, tensor_type.byte_size, "rune_model_infer output")
        results = run_model(loaded.model, arrays, f"{self.name} model {model_id}")
        outputs = [
            np.ascontiguousarray(result, dtype=tensor_type.element.dtype).tobytes()
            for tensor_type, result in zip(loaded.outputs, results, strict=True)
        ]
        for tensor_type, data in zip(loaded.outputs, outputs, strict=True):
            if len(data) != tensor_type.byte_size:
                raise ModelError(
                    f"{self.name} model {model_id} made {len(data)} bytes for its output "
                    f"{tensor_type} ({tensor_type.byte_size} bytes); nothing was written"
                )
        for ptr, data in zip(out_ptrs, outputs, strict=True):
            self._memory.write(ptr, data, "rune_model_infer output")
        return 0

    def _hrequest_output(self, kind_code: int) -> int:
        try:
            kind = OutKind(kind_code)
        except ValueError:
            raise GuestFault(f"{self.name} asked for unknown output type {kind_code}") from None
        if kind not in (OutKind.SERIAL, OutKind.TENSOR):
            raise CapabilityDenied(
                f"{self.name} asked for output {kind.name}, which this host "
                "does not provide (SERIAL and TENSOR are)"
            )
        out_id = self._new_id()
        self._outputs[out_id] = kind
        return out_id

    def _hconsume_output(self, out_id: int, ptr: int, length: int) -> int:
        kind = self._outputs.get(out_id)
        if kind is None:
            raise GuestFault(
                f"{self.name}: consume_output names output {out_id}, which it never requested"
            )
        self._output_bytes += length
        if self._output_bytes > self.limits.output_bytes:
            raise LimitExceeded(
                f"{self.name} wrote over {self.limits.output_bytes} bytes of "
                "output in one call, the output size limit"
            )
        data = self._memory.read(ptr, length, "consume_output", self.limits.output_bytes)
        if kind is OutKind.SERIAL:
            self._pending.append(serial_record(data, out_id, self.name))
        else:
            self._pending.append(OutputRecord(out_id, {"channel": out_id, "bytes": data.hex()}))
        return 0

    def _hrune_resource_open(self, name_ptr: int, name_len: int) -> int:
        name = self._memory.read_utf8(name_ptr, name_len, "rune_resource_open", MAX_KEY)
        data = self._resources.get(name)
        if data is None:
            raise GuestFault(f"{self.name} opened resource {name!r}, which it does not have")
        if len(data) > self.limits.resource_bytes:
            raise LimitExceeded(
                f"{self.name}: resource {name!r} is {len(data)} bytes, over the "
                f"{self.limits.resource_bytes}-byte resource limit"
            )
        res_id = self._new_id()
        self._open[res_id] = (data, 0)
        return res_id

    def _hrune_resource_read(self, res_id: int, buf: int, length: int) -> int:
        if res_id not in self._open:
            raise GuestFault(f"{self.name}: rune_resource_read on {res_id}, which is not open")
        data, offset = self._open[res_id]
        chunk = data[offset : offset + length]
        self._memory.check(buf, length, "rune_resource_read")
        self._memory.write(buf, chunk, "rune_resource_read")
        self._open[res_id] = (data, offset + len(chunk))
        return len(chunk)

    def _hrune_resource_close(self, res_id: int) -> int:
        if self._open.pop(res_id, None) is None:
            raise GuestFault(f"{self.name}: rune_resource_close on {res_id}, which is not open")
        return 0

    # -- running -------------------------------------------------------------------------------

    def call(self) -> list[OutputRecord]:
        """One inference: `_call(0, 0, 0)`; returns what the rune wrote to its outputs."""
        self._pending, self._output_bytes = [], 0
        try:
            call_guest(
                self._store, self._call_fn, 0, 0, 0, what=f"{self.name} _call", limits=self.limits
            )
        except SandboxError:
            self._pending = []
            raise
        records, self._pending = self._pending, []
        return records
