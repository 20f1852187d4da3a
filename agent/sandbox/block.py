"""A processing block of a bundle, instantiated in its own sandboxed store (fleet-block/1).

Rules:
- The module must be a fleet-block/1 block: no imports at all, the required exports (checked with
  the same rule `rune build` uses); otherwise `ModuleRejected` naming what is wrong.
- Args go in once, through `fleet_configure`; a block without it may not be given args.
- Each transform copies inputs into a region from `fleet_alloc` (asked for again only when the
  inputs outgrow it), crosses into wasm once, and decodes the result only after checking every
  pointer, length, type code, rank and size against the memory, the limits and the stage's
  declared outputs. A block's own error message reaches the user with the stage name.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.sandbox.engine import (
    call_guest,
    compile_module,
    export_func,
    instantiate,
    new_store,
)
from agent.sandbox.errors import (
    GuestFault,
    LimitExceeded,
    ModuleRejected,
    RuneReportedError,
)
from agent.sandbox.limits import SandboxLimits
from ota.rune.blocks.abi import (
    DESCRIPTOR,
    EXPORT_ALLOC,
    EXPORT_CONFIGURE,
    EXPORT_TRANSFORM,
    RESULT,
    STATUS_OK,
    BlockArg,
    block_module_problems,
    pack_args,
    pack_inputs,
    unpack_descriptor,
)
from ota.rune.tensors import Tensor, TensorError, TensorType

MAX_MESSAGE = 4096


class BlockInstance:
    def __init__(
        self,
        module: bytes,
        what: str,
        args: Sequence[BlockArg],
        outputs: Sequence[TensorType],
        limits: SandboxLimits,
    ) -> None:
        self.what = what
        self._limits = limits
        self._outputs = tuple(outputs)
        compiled = compile_module(module, what, limits)
        problems = block_module_problems(compiled)
        if problems:
            raise ModuleRejected(f"{what} is not a fleet-block/1 block: {'; '.join(problems)}")
        self._store = new_store(limits)
        exports, self._memory = instantiate(self._store, compiled, what, limits)
        self._alloc = export_func(exports, EXPORT_ALLOC, what)
        self._transform = export_func(exports, EXPORT_TRANSFORM, what)
        self._region = 0
        self._capacity = 0
        configure = (
            export_func(exports, EXPORT_CONFIGURE, what)
            if exports.get(EXPORT_CONFIGURE) is not None
            else None
        )
        if configure is None:
            if args:
                raise ModuleRejected(
                    f"{what} takes no args (it exports no {EXPORT_CONFIGURE}), "
                    f"but the stage gives {', '.join(a.key for a in args)}"
                )
            return
        base = self._reserve(len(pack_args(0, args)))
        self._memory.write(base, pack_args(base, args), f"{what} args")
        result = call_guest(
            self._store, configure, base, len(args), what=f"{what} configure", limits=limits
        )
        self._check_result(result, "configure")

    def _reserve(self, size: int) -> int:
        if size <= self._capacity:
            return self._region
        if size > self._limits.memory_bytes:
            raise LimitExceeded(f"{self.what}: inputs of {size} bytes exceed the memory limit")
        ptr = call_guest(
            self._store, self._alloc, size, what=f"{self.what} {EXPORT_ALLOC}", limits=self._limits
        )
        if not isinstance(ptr, int) or ptr <= 0:
            raise LimitExceeded(f"{self.what} could not allocate {size} bytes for its inputs")
        self._memory.check(ptr, size, f"{self.what} {EXPORT_ALLOC}")
        self._region, self._capacity = ptr, size
        return ptr

    def transform(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        payload = pack_inputs(self._region, inputs)
        if len(payload) > self._capacity:
            base = self._reserve(len(payload))
            payload = pack_inputs(base, inputs)
        self._memory.write(self._region, payload, f"{self.what} inputs")
        result = call_guest(
            self._store,
            self._transform,
            self._region,
            len(inputs),
            what=self.what,
            limits=self._limits,
        )
        return self._check_result(result, "transform")

    def _check_result(self, result: object, call: str) -> list[Tensor]:
        if not isinstance(result, int):
            raise GuestFault(f"{self.what}: {call} returned {result!r}, not a result pointer")
        status, count, ptr = RESULT.unpack(
            self._memory.read(result, RESULT.size, f"{self.what} {call} result")
        )
        if status != STATUS_OK:
            message = self._memory.read(ptr, min(count, MAX_MESSAGE), f"{self.what} error")
            text = message.decode("utf-8", errors="replace")
            raise RuneReportedError(f"{self.what} failed: {text}")
        if call == "configure":
            return []
        if count > self._limits.max_tensors:
            raise GuestFault(
                f"{self.what} returned {count} outputs, over the limit of "
                f"{self._limits.max_tensors}"
            )
        if count != len(self._outputs):
            raise GuestFault(
                f"{self.what} returned {count} outputs, but the stage declares {len(self._outputs)}"
            )
        raw = self._memory.read(ptr, DESCRIPTOR.size * count, f"{self.what} outputs")
        tensors: list[Tensor] = []
        total = 0
        for i, declared in enumerate(self._outputs):
            chunk = raw[i * DESCRIPTOR.size : (i + 1) * DESCRIPTOR.size]
            try:
                descriptor = unpack_descriptor(chunk)
            except TensorError as exc:
                raise GuestFault(f"{self.what} output {i}: {exc}") from None
            total += descriptor.data_len
            if total > self._limits.output_bytes:
                raise LimitExceeded(
                    f"{self.what} returned over {self._limits.output_bytes} bytes "
                    "of output, the output size limit"
                )
            if descriptor.tensor_type != declared:
                raise GuestFault(
                    f"{self.what} output {i} is {descriptor.tensor_type}, but the "
                    f"stage declares {declared}"
                )
            data = self._memory.read(
                descriptor.data_ptr, descriptor.data_len, f"{self.what} output {i} data"
            )
            try:
                tensor = Tensor.from_bytes(declared, data)
            except TensorError as exc:
                raise GuestFault(f"{self.what} output {i}: {exc}") from None
            if isinstance(tensor.data, tuple) and len(tensor.data) != declared.count:
                raise GuestFault(
                    f"{self.what} output {i} holds {len(tensor.data)} strings, but "
                    f"{declared} holds {declared.count}"
                )
            tensors.append(tensor)
        return tensors
