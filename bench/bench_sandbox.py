"""Sandbox overhead, measured against a bare wasmtime call in the same run.

Measures: a bare call of an empty export (the baseline), one inference of a no-model legacy rune
(RAND -> serial), one inference of a three-block bundle (RAND -> normalize -> softmax -> argmax ->
serial), and a cold load (compile + `_manifest`) of a 1 MB legacy rune. Prints medians and ratios.
Run: `.venv/bin/python bench/bench_sandbox.py` (add `--json` for a machine-readable line).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime

from agent.sandbox import engine as sandbox_engine
from agent.sandbox.runner import load_rune
from ota.rune.build import build_bundle
from ota.rune.wasm import with_custom_section

LEGACY_WAT = """
(module
  (import "env" "request_capability" (func $cap (param i32) (result i32)))
  (import "env" "request_provider_response" (func $fill (param i32 i32 i32) (result i32)))
  (import "env" "request_output" (func $out (param i32) (result i32)))
  (import "env" "consume_output" (func $emit (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $rand (mut i32) (i32.const 0))
  (global $serial (mut i32) (i32.const 0))
  (data (i32.const 64) "SERIAL")
  (data (i32.const 4096) "PAYLOAD")
  (func (export "_manifest") (result i32)
    (global.set $rand (call $cap (i32.const 1)))
    (global.set $serial (call $out (i32.const 1)))
    (i32.const 0))
  (func (export "_call") (param i32 i32 i32) (result i32)
    (drop (call $fill (i32.const 1024) (i32.const 16) (global.get $rand)))
    (drop (call $emit (global.get $serial) (i32.const 64) (i32.const LENGTH)))
    (i32.const 0)))
"""
SERIAL_JSON = '{"type_name":"u8","channel":2,"elements":[1],"dimensions":[1]}'
GRAPH = b'{"capabilities": {"rand": {"kind": "RAND"}}}'

PIPELINE = """version: 1
pipeline:
  rand:
    capability: RAND
    outputs: [{type: f32, dimensions: [1, 16]}]
  normalize:
    proc-block: normalize
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 16]}]
  softmax:
    proc-block: softmax
    inputs: [normalize]
    outputs: [{type: f32, dimensions: [1, 16]}]
  argmax:
    proc-block: argmax
    inputs: [softmax]
    outputs: [{type: u32, dimensions: [1]}]
  serial:
    out: serial
    inputs: [argmax]
"""


def legacy_rune(payload_bytes: int = 0) -> bytes:
    pages = 1 + (4096 + payload_bytes) // 65536 + 1
    text = LEGACY_WAT.replace('(memory (export "memory") 1)', f'(memory (export "memory") {pages})')
    text = text.replace('"PAYLOAD"', '"' + "\\5a" * payload_bytes + '"')
    text = text.replace('"SERIAL"', json.dumps(SERIAL_JSON))
    text = text.replace("LENGTH", str(len(SERIAL_JSON)))
    return with_custom_section(bytes(wasmtime.wat2wasm(text)), ".rune_graph", GRAPH)


def median_us(fn: Callable[[], object], repeat: int, warmup: int = 50) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    store = wasmtime.Store(sandbox_engine.engine())
    store.set_fuel(10**12)
    store.set_epoch_deadline(10**9)
    module = wasmtime.Module(sandbox_engine.engine(), '(module (func (export "nop")))')
    nop = wasmtime.Instance(store, module, []).exports(store)["nop"]
    bare = median_us(lambda: nop(store), 20_000, 1000)

    legacy = load_rune(legacy_rune())
    legacy_us = median_us(legacy.call, 5_000)

    with tempfile.TemporaryDirectory() as folder:
        runefile = Path(folder) / "Runefile.yml"
        runefile.write_text(PIPELINE)
        bundle = load_rune(build_bundle(runefile, name="bench").data)
    pipeline_us = median_us(bundle.call, 3_000)

    big = legacy_rune(1024 * 1024)

    def cold_load() -> None:
        sandbox_engine._compiled.clear()  # a cold load compiles; drop the compiled-module cache
        load_rune(big)

    cold_us = median_us(cold_load, 15, warmup=2)

    results = {
        "rune_size_bytes": len(big),
        "bare_call_us": round(bare, 2),
        "legacy_inference_us": round(legacy_us, 1),
        "legacy_per_bare_call": round(legacy_us / bare, 1),
        "three_block_pipeline_us": round(pipeline_us, 1),
        "pipeline_per_bare_call": round(pipeline_us / bare, 1),
        "cold_load_1mb_ms": round(cold_us / 1000, 1),
        "cold_load_per_bare_call": round(cold_us / bare),
    }
    if "--json" in sys.argv:
        print(json.dumps(results))
        return
    print(f"bare wasmtime call (baseline)   {bare:9.2f} us")
    print(
        f"legacy rune inference           {legacy_us:9.1f} us  = {legacy_us / bare:5.1f} bare calls"
        "  (target <= 20)"
    )
    print(
        f"three-block bundle inference    {pipeline_us:9.1f} us  = {pipeline_us / bare:5.1f} "
        "bare calls  (target <= 500 us)"
    )
    print(
        f"cold load of a {len(big) / 1e6:.2f} MB rune      {cold_us / 1000:9.1f} ms  "
        "(target < 100 ms)"
    )


if __name__ == "__main__":
    main()
