"""The built-in blocks, run as wasm in the sandbox through the real host, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from agent.sandbox.block import BlockInstance
from agent.sandbox.errors import ModuleRejected, RuneReportedError
from agent.sandbox.limits import SandboxLimits
from ota.rune.blocks.abi import BlockArg, block_args
from ota.rune.blocks.builtin import builtin_wasm
from ota.rune.tensors import ElementType, Tensor, TensorType


def run_block(name: str, array: np.ndarray, output: TensorType, **args: object) -> Tensor:
    block = BlockInstance(
        builtin_wasm(name),
        f"stage {name}",
        block_args(dict(args), lambda n: ""),
        [output],
        SandboxLimits(),
    )
    (result,) = block.transform([Tensor.from_array(array)])
    return result


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i2", "<i4", "<u2", "<i8"])
def test_modulo_keeps_the_sign_of_the_dividend_and_the_type(dtype: str) -> None:
    raw = np.array([[-1, 725, 370, 0, 359, 1000]])
    values = (np.abs(raw) if dtype.startswith("<u") else raw).astype(dtype)
    out = run_block(
        "modulo", values, TensorType(ElementType.from_dtype(values.dtype), (1, 6)), modulus=360
    )
    expected = np.fmod(values.astype(np.float64), 360).astype(dtype)
    assert out.element is ElementType.from_dtype(values.dtype)
    np.testing.assert_array_equal(out.data, expected)


def test_normalize_scales_any_numeric_input_to_unit_f32() -> None:
    values = np.array([[3, 7, 5, 11]], dtype="<i4")
    out = run_block("normalize", values, TensorType(ElementType.F32, (1, 4)))
    np.testing.assert_allclose(out.data, [[0.0, 0.5, 0.25, 1.0]])
    flat = run_block("normalize", np.zeros((2, 2), "<f4"), TensorType(ElementType.F32, (2, 2)))
    np.testing.assert_array_equal(flat.data, np.zeros((2, 2)))


def test_softmax_matches_the_rune_projects_reference_values() -> None:
    out = run_block("softmax", np.array([2.3, 12.4, 5.1], "<f4"), TensorType(ElementType.F32, (3,)))
    np.testing.assert_allclose(out.data, [0.000041050153, 0.99928397, 0.00067505526], atol=1e-6)
    big = run_block("softmax", np.array([1000.0, 1000.0], "<f8"), TensorType(ElementType.F64, (2,)))
    np.testing.assert_allclose(big.data, [0.5, 0.5])


def test_argmax_and_most_confident_indices_break_ties_toward_the_first() -> None:
    out = run_block("argmax", np.array([[1, 9, 9, 2]], "<i2"), TensorType(ElementType.U32, (1,)))
    assert out.elements() == [1]
    top = run_block(
        "most_confident_indices",
        np.array([[0.0, 0.5, 10.0, 3.5, -200.0]], "<f4"),
        TensorType(ElementType.U32, (3,)),
        count=3,
    )
    assert top.elements() == [2, 3, 1]


def test_label_maps_indices_to_words_from_a_wordlist_or_a_list() -> None:
    out = run_block(
        "label",
        np.array([2, 0], "<u4"),
        TensorType(ElementType.UTF8, (2,)),
        wordlist="\n  wave\ntilt\nlift\n",
    )
    assert out.elements() == ["lift", "wave"]
    listed = run_block(
        "label", np.array([1.0], "<f4"), TensorType(ElementType.UTF8, (1,)), labels=["yes", "no"]
    )
    assert listed.elements() == ["no"]


def test_label_out_of_range_is_the_blocks_own_clear_error() -> None:
    with pytest.raises(
        RuneReportedError, match="stage label failed: label: index 7 is out of range for 3 labels"
    ):
        run_block(
            "label", np.array([7], "<u1"), TensorType(ElementType.UTF8, (1,)), wordlist="a\nb\nc"
        )


def test_image_normalization_maps_the_type_range_to_unit_f32() -> None:
    pixels = np.array([0, 127, 255], "<u1").reshape(1, 1, 1, 3)
    out = run_block("image_normalization", pixels, TensorType(ElementType.F32, (1, 1, 1, 3)))
    np.testing.assert_allclose(out.data.reshape(-1), [0.0, 127 / 255, 1.0], rtol=1e-6)


def test_a_block_without_configure_refuses_args_and_bad_args_fail_at_load() -> None:
    with pytest.raises(ModuleRejected, match="takes no args .* but the stage gives colour"):
        BlockInstance(
            builtin_wasm("softmax"),
            "stage s",
            [BlockArg("colour", "red", None)],
            [TensorType(ElementType.F32, (1,))],
            SandboxLimits(),
        )
    with pytest.raises(RuneReportedError, match="modulus must be a non-zero number"):
        BlockInstance(
            builtin_wasm("modulo"),
            "stage m",
            [BlockArg("modulus", "0", 0.0)],
            [TensorType(ElementType.F32, (1,))],
            SandboxLimits(),
        )


def test_a_block_with_a_start_function_runs_it_under_the_limits() -> None:
    import wasmtime

    from agent.sandbox.errors import LimitExceeded

    def block(start_body: str) -> bytes:
        return bytes(
            wasmtime.wat2wasm(f"""
(module
  (memory (export "memory") 1)
  (func $start {start_body})
  (start $start)
  (func (export "fleet_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "fleet_transform") (param i32 i32) (result i32)
    (i32.store (i32.const 4) (i32.const 1))
    (i32.store (i32.const 8) (local.get 0))
    (i32.const 0)))""")
        )

    output = [TensorType(ElementType.F32, (1,))]
    ok = BlockInstance(block("nop"), "stage s", [], output, SandboxLimits())
    assert ok.transform([Tensor.from_array(np.array([2.5], "<f4"))])[0].elements() == [2.5]
    with pytest.raises(LimitExceeded, match="stage s start function ran out of fuel"):
        BlockInstance(
            block("(loop br 0)"), "stage s", [], output, SandboxLimits(fuel_per_call=100_000)
        )
