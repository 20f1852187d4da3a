"""The wasmtime engine runes run on, and the one way to call into a rune.

Rules:
- One engine per process, with fuel and epoch interruption on. A ticker thread advances the epoch
  every `TICK_SECONDS` only while some call is in progress, so an idle device does not wake.
- Every call into wasm goes through `call_guest`: it refuels the store, sets the wall-clock
  deadline, and turns traps into `SandboxError`s that name the rune and what it did.
- Instantiation runs under the same limits (a wasm start function is code too).
- Modules are compiled only after a size check, and compile errors become `ModuleRejected`;
  compiled modules are reused by SHA-256 (a module is immutable code, so equal bytes are equal).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import wasmtime

from agent.sandbox.errors import GuestFault, LimitExceeded, ModuleRejected, SandboxError
from agent.sandbox.limits import SandboxLimits
from agent.sandbox.memory import GuestMemory

TICK_SECONDS = 0.005


class _EpochTicker:
    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._active = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wasm-epoch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._active:
                time.sleep(TICK_SECONDS)
                self._engine.increment_epoch()

    def enter(self) -> None:
        with self._lock:
            self._active += 1
            self._wake.set()

    def leave(self) -> None:
        with self._lock:
            self._active -= 1


_engine: wasmtime.Engine | None = None
_ticker: _EpochTicker | None = None
_engine_lock = threading.Lock()


def engine() -> wasmtime.Engine:
    global _engine, _ticker
    with _engine_lock:
        if _engine is None:
            config = wasmtime.Config()
            config.consume_fuel = True
            config.epoch_interruption = True
            config.wasm_threads = False
            _engine = wasmtime.Engine(config)
            _ticker = _EpochTicker(_engine)
        return _engine


_compiled: OrderedDict[str, wasmtime.Module] = OrderedDict()
COMPILED_CACHE_SIZE = 32


def compile_module(data: bytes, what: str, limits: SandboxLimits) -> wasmtime.Module:
    """Compile (or reuse, by SHA-256, the compiled form of) a module within the size limit."""
    if len(data) > limits.module_bytes:
        raise LimitExceeded(
            f"{what} is {len(data)} bytes, over the {limits.module_bytes}-byte module limit"
        )
    if data[:4] != b"\0asm":
        raise ModuleRejected(f"{what} is not a WebAssembly module (it does not start with \\0asm)")
    digest = hashlib.sha256(data).hexdigest()
    with _engine_lock:
        cached = _compiled.get(digest)
        if cached is not None:
            _compiled.move_to_end(digest)
            return cached
    try:
        module = wasmtime.Module(engine(), data)
    except wasmtime.WasmtimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ModuleRejected(f"{what} is not a valid WebAssembly module: {reason}") from None
    with _engine_lock:
        _compiled[digest] = module
        while len(_compiled) > COMPILED_CACHE_SIZE:
            _compiled.popitem(last=False)
    return module


def new_store(limits: SandboxLimits) -> wasmtime.Store:
    store = wasmtime.Store(engine())
    store.set_limits(
        memory_size=limits.memory_bytes,
        instances=limits.max_instances,
        tables=4,
        memories=1,
        table_elements=100_000,
    )
    return store


def export_func(exports: Any, name: str, what: str) -> wasmtime.Func:
    """The exported function `name`, or `ModuleRejected` if it is missing or not a function."""
    item = exports.get(name)
    if not isinstance(item, wasmtime.Func):
        raise ModuleRejected(f"{what} does not export a function {name}")
    return item


def instantiate(
    store: wasmtime.Store,
    module: wasmtime.Module,
    what: str,
    limits: SandboxLimits,
    linker: wasmtime.Linker | None = None,
) -> tuple[Any, GuestMemory]:
    """Instantiate under the call limits (a start function is a call); return exports and memory.

    The module must export a memory called `memory`.
    """

    def start(store: wasmtime.Store) -> wasmtime.Instance:
        try:
            if linker is not None:
                return linker.instantiate(store, module)
            return wasmtime.Instance(store, module, [])
        except wasmtime.WasmtimeError as exc:
            raise LimitExceeded(
                f"{what} could not start within the sandbox limits (memory "
                f"{limits.memory_bytes} bytes): {str(exc).strip().splitlines()[0]}"
            ) from None

    instance = call_guest(store, start, what=f"{what} start function", limits=limits)
    exports = instance.exports(store)
    memory = exports.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        raise ModuleRejected(f"{what} does not export a memory called memory")
    return exports, GuestMemory(memory, store)


def call_guest(
    store: wasmtime.Store,
    func: wasmtime.Func | Callable[[wasmtime.Store], Any],
    *args: Any,
    what: str,
    limits: SandboxLimits,
) -> Any:
    """Call into wasm under the per-call fuel and wall-clock limits."""
    engine()
    assert _ticker is not None
    store.set_fuel(limits.fuel_per_call)
    store.set_epoch_deadline(max(1, math.ceil(limits.wall_clock_ms / 1000 / TICK_SECONDS)))
    _ticker.enter()
    try:
        return func(store, *args)
    except SandboxError:
        raise
    except wasmtime.Trap as trap:
        raise _trap_error(trap, what, limits) from None
    except wasmtime.WasmtimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise GuestFault(f"{what} failed: {reason}") from None
    finally:
        _ticker.leave()


def _trap_error(trap: wasmtime.Trap, what: str, limits: SandboxLimits) -> SandboxError:
    code = trap.trap_code
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return LimitExceeded(
            f"{what} ran out of fuel ({limits.fuel_per_call} units per call): it loops too long "
            "or does too much work in one call"
        )
    if code == wasmtime.TrapCode.INTERRUPT:
        return LimitExceeded(f"{what} ran past the {limits.wall_clock_ms} ms wall-clock limit")
    if code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS:
        return GuestFault(f"{what} trapped: it read or wrote outside its own memory")
    if code == wasmtime.TrapCode.UNREACHABLE:
        return GuestFault(
            f"{what} trapped: it reached `unreachable` (a panic or abort in the rune)"
        )
    if code == wasmtime.TrapCode.STACK_OVERFLOW:
        return GuestFault(f"{what} trapped: stack overflow (unbounded recursion?)")
    name = code.name.lower().replace("_", " ") if code is not None else "an unknown trap"
    return GuestFault(f"{what} trapped: {name}")
