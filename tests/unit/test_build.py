"""`rune build`: type and shape checks, files, models, custom blocks, and what a bundle holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from agent.sandbox.models import inspect_model
from ota.rune.build import build_bundle
from ota.rune.bundle import read_bundle, sha256_hex
from ota.rune.runefile import RunefileError

HEADER = "version: 1\nimage: runicos/base\n"


def write(folder: Path, text: str, **files: bytes) -> Path:
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_bytes(data)
    path = folder / "Runefile.yml"
    path.write_text(HEADER + text)
    return path


def problems(path: Path) -> str:
    with pytest.raises(RunefileError) as caught:
        build_bundle(path, inspect_model=inspect_model)
    return "\n".join(str(p) for p in caught.value.problems)


def test_the_gesture_example_builds_into_a_verified_reproducible_bundle(examples_dir: Path) -> None:
    runefile = examples_dir / "gesture" / "Runefile.yml"
    first = build_bundle(runefile, inspect_model=inspect_model)
    second = build_bundle(runefile, inspect_model=inspect_model)
    assert first.data == second.data, "builds must be byte-for-byte reproducible"
    bundle = read_bundle(first.data)
    manifest = bundle.manifest
    assert (manifest.name, manifest.version) == ("gesture", "0.1.0")
    assert [s.stage.name for s in manifest.stages] == [
        "accelerometer",
        "normalize",
        "model",
        "softmax",
        "most_confident",
        "label",
        "serial",
    ]
    assert manifest.stage("model").mimetype == "application/onnx-model"
    assert manifest.stage("normalize").source == "builtin:normalize"
    model_bytes = (examples_dir / "gesture" / "gesture.onnx").read_bytes()
    part = {p.path: p for p in manifest.parts}["models/model.onnx"]
    assert part.sha256 == sha256_hex(model_bytes) and part.size == len(model_bytes)
    assert bundle.resource("LABELS") == b"wave\ntilt\nlift\nrest\n"
    assert [k.name for k in manifest.capabilities] == ["ACCEL"]


def test_block_type_and_shape_mismatches_say_what_to_change(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
pipeline:
  rand:
    capability: RAND
    outputs: [{type: u8, dimensions: [1, 4]}]
  norm:
    proc-block: hotg-ai/proc-blocks@v0.11.3#normalize
    inputs: [rand]
    outputs: [{type: u8, dimensions: [1, 4]}]
  soft:
    proc-block: softmax
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 4]}]
  top:
    proc-block: most_confident_indices
    inputs: [norm]
    outputs: [{type: u32, dimensions: [9]}]
    args: {count: 9}
  out:
    out: serial
    inputs: [top]
""",
    )
    text = problems(path)
    assert (
        "stage norm: declares output u8[1, 4], but normalize makes f32[1, 4] from u8[1, 4]; "
        "change the output to type f32, dimensions [1, 4]"
    ) in text
    assert "stage soft: softmax cannot take u8 input (u8[1, 4]); it takes f32, f64" in text
    assert "stage top: count 9 is more than the 4 values of its input u8[1, 4]" in text


def test_capability_outputs_must_hold_what_the_sensor_makes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
pipeline:
  image:
    capability: IMAGE
    outputs: [{type: u8, dimensions: [1, 96, 96, 3]}]
    args: {width: 96, height: 96, pixel-format: "@PixelFormat::GrayScale"}
  accel:
    capability: ACCEL
    outputs: [{type: i16, dimensions: [1, 128, 3]}]
    args: {n: 128, colour: red}
  out:
    out: serial
    inputs: [image, accel]
""",
    )
    text = problems(path)
    assert (
        "stage image: IMAGE with these args makes 9216 values (e.g. dimensions "
        "[1, 96, 96, 1]), but the output u8[1, 96, 96, 3] holds 27648"
    ) in text
    assert "stage accel: ACCEL takes no arg colour" in text


def test_missing_files_unknown_blocks_and_tensorflow_models_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
pipeline:
  rand:
    capability: RAND
    outputs: [{type: f32, dimensions: [1, 1]}]
  fft:
    proc-block: hotg-ai/proc-blocks@v0.11.3#fft
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 1]}]
  tf:
    model: ./saved_model.pb
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 1]}]
  tfjs:
    model: ./web/model.json
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 1]}]
  gone:
    model: ./missing.tflite
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 1]}]
  own:
    proc-block: ./my_block
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 1]}]
  out:
    out: serial
    inputs: [fft]
""",
    )
    text = problems(path)
    assert (
        "stage fft: proc-block 'hotg-ai/proc-blocks@v0.11.3#fft' is not a built-in block; "
        "built-ins are modulo, normalize, softmax, argmax, most_confident_indices, label, "
        "image_normalization" in text
    )
    assert (
        "stage tf: TensorFlow and TF.js models are not supported on devices; convert the "
        "model to TFLite (.tflite) or ONNX (.onnx)" in text
    )
    assert "stage tfjs: TensorFlow and TF.js models are not supported" in text
    assert "stage gone: cannot read ./missing.tflite: No such file or directory" in text
    assert "stage own: proc-block './my_block' is not a .wasm file" in text
    assert not list(tmp_path.glob("*.runebundle")), "a failed build writes nothing"


def test_a_model_signature_that_does_not_fit_the_runefile_is_refused(
    examples_dir: Path, tmp_path: Path
) -> None:
    onnx = (examples_dir / "gesture" / "gesture.onnx").read_bytes()
    path = write(
        tmp_path,
        """
pipeline:
  accel:
    capability: ACCEL
    outputs: [{type: f32, dimensions: [1, 64, 3]}]
    args: {n: 64}
  model:
    model: ./gesture.onnx
    inputs: [accel]
    outputs: [{type: f32, dimensions: [1, 5]}]
  out:
    out: serial
    inputs: [model]
""",
        gesture__onnx=onnx,
    )
    text = problems(path)
    assert "stage model: input 0 is f32[1, 64, 3], but the model takes f32[1, 128, 3]" in text
    assert "stage model: output 0 is declared f32[1, 5], but the model makes f32[1, 4]" in text


AUTHOR_BLOCK = """
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "fleet_alloc") (param $size i32) (result i32) (i32.const 4096))
  ;; doubles one f32 tensor in place and returns it as the output
  (func (export "fleet_transform") (param $inputs i32) (param $count i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr (i32.load offset=40 (local.get $inputs)))
    (local.set $end (i32.add (local.get $ptr) (i32.load offset=44 (local.get $inputs))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $ptr) (local.get $end)))
        (f32.store (local.get $ptr) (f32.mul (f32.load (local.get $ptr)) (f32.const 2)))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 4)))
        (br $next)))
    (i32.store (i32.const 0) (i32.const 0))
    (i32.store (i32.const 4) (i32.const 1))
    (i32.store (i32.const 8) (local.get $inputs))
    (i32.const 0)))
"""


def test_an_authors_own_wasm_block_is_bundled_and_checked(tmp_path: Path) -> None:
    runefile = """
pipeline:
  rand:
    capability: RAND
    outputs: [{type: f32, dimensions: [1, 3]}]
  double:
    proc-block: ./double.wasm
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 3]}]
  out:
    out: serial
    inputs: [double]
"""
    block = bytes(wasmtime.wat2wasm(AUTHOR_BLOCK))
    path = write(tmp_path, runefile, double__wasm=block)
    result = build_bundle(path)
    assert read_bundle(result.data).part("blocks/double.wasm") == block

    wasi = bytes(
        wasmtime.wat2wasm(
            '(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) '
            '(result i32))) (memory (export "memory") 1))'
        )
    )
    path = write(tmp_path, runefile, double__wasm=wasi)
    text = problems(path)
    assert (
        "blocks may import nothing (no WASI, no host calls), but it imports "
        "wasi_snapshot_preview1.fd_write" in text
    )
    assert "it does not export fleet_alloc, fleet_transform" in text


def test_a_model_its_runtime_cannot_read_is_a_stage_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
pipeline:
  rand:
    capability: RAND
    outputs: [{type: f32, dimensions: [1, 1]}]
  model:
    model: ./broken.onnx
    inputs: [rand]
    outputs: [{type: f32, dimensions: [1, 1]}]
  out:
    out: serial
    inputs: [model]
""",
        broken__onnx=b"not a protobuf",
    )
    assert (
        "stage model: the model cannot be read: model could not be loaded by onnxruntime"
        in problems(path)
    )
