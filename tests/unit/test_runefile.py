"""Runefile parsing and graph validation: real Rune-style Runefiles parse, mistakes are named."""

from __future__ import annotations

import pytest

from ota.rune.graph import execution_order
from ota.rune.runefile import (
    CapabilityKind,
    InputRef,
    ResourceRef,
    RunefileError,
    StageKind,
    parse_runefile,
)
from ota.rune.tensors import ElementType, TensorType

SPEECH_STYLE = """
version: 1
image: runicos/base
pipeline:
  audio:
    capability: sound
    outputs:
      - type: I16
        dimensions: [1, 16000]
    args:
      hz: 16000
      sample-duration-ms: 1000
  model:
    model: "./model.tflite"
    inputs: [audio]
    outputs:
      - type: I8
        dimensions: [1, 6]
  confident:
    proc-block: "hotg-ai/proc-blocks@v0.11.3#most_confident_indices"
    inputs: [model]
    outputs:
      - type: U32
        dimensions: [1]
    args:
      count: 1
  label:
    proc-block: "hotg-ai/proc-blocks@v0.11.3#label"
    inputs: [confident]
    outputs:
      - type: UTF8
        dimensions: [1]
    args:
      wordlist: $WORDS
  serial:
    out: SERIAL
    inputs: [label, model.0]
resources:
  WORDS:
    inline: "yes\\nno"
"""


def test_a_rune_style_runefile_parses_into_typed_stages() -> None:
    runefile = parse_runefile(SPEECH_STYLE)
    audio = runefile.stages["audio"]
    assert audio.kind is StageKind.CAPABILITY and audio.capability is CapabilityKind.SOUND
    assert audio.args == {"hz": 16000, "sample_duration_ms": 1000}
    assert audio.outputs == (TensorType(ElementType.I16, (1, 16000)),)
    assert runefile.stages["label"].args["wordlist"] == ResourceRef("WORDS")
    assert runefile.stages["serial"].inputs == (InputRef("label"), InputRef("model", 0))
    assert execution_order(runefile) == ["audio", "model", "confident", "label", "serial"]


def test_pixel_format_enum_values_are_kept_for_the_capability() -> None:
    runefile = parse_runefile("""
version: 1
pipeline:
  image:
    capability: IMAGE
    outputs: [{type: u8, dimensions: [1, 96, 96, 1]}]
    args: {width: 96, height: 96, pixel-format: "@PixelFormat::GrayScale"}
  out:
    out: serial
    inputs: [image]
""")
    assert runefile.stages["image"].args["pixel_format"] == "@PixelFormat::GrayScale"


def problems_of(text: str) -> list[str]:
    with pytest.raises(RunefileError) as caught:
        runefile = parse_runefile(text)
        execution_order(runefile)
    return [str(p) for p in caught.value.problems]


def test_every_problem_is_reported_with_its_stage() -> None:
    problems = problems_of("""
version: 2
pipeline:
  cam:
    capability: CAMERA
    outputs: [{type: u8, dimensions: [1]}]
  block:
    proc-block: normalize
    outputs: [{type: f17, dimensions: [1]}]
  out:
    out: ble
    inputs: [block]
""")
    text = "\n".join(problems)
    assert "version: must be 1" in text
    assert "stage cam: unknown capability 'CAMERA'" in text
    assert "stage block: a proc-block stage needs inputs" in text
    assert "stage block output 0: unknown element type 'f17'" in text
    assert "stage out: unsupported out 'ble'" in text


def test_unknown_and_out_of_range_inputs_are_named() -> None:
    problems = problems_of("""
version: 1
pipeline:
  rand:
    capability: RAND
    outputs: [{type: f32, dimensions: [1]}]
  a:
    proc-block: normalize
    inputs: [rnd, rand.2]
    outputs: [{type: f32, dimensions: [1]}]
""")
    assert any("stage a: input rnd names no stage" in p for p in problems)
    assert any("input rand.2 asks for output 2 of rand, which declares 1" in p for p in problems)


def test_a_cycle_is_refused_naming_its_stages() -> None:
    problems = problems_of("""
version: 1
pipeline:
  a:
    proc-block: normalize
    inputs: [b]
    outputs: [{type: f32, dimensions: [1]}]
  b:
    proc-block: normalize
    inputs: [a]
    outputs: [{type: f32, dimensions: [1]}]
""")
    assert problems == [
        "pipeline: stages a, b form a cycle; every stage must only read stages "
        "that do not depend on it"
    ]


def test_undeclared_resources_and_bad_yaml_are_clear() -> None:
    problems = problems_of("""
version: 1
pipeline:
  rand:
    capability: RAND
    outputs: [{type: u32, dimensions: [1]}]
  label:
    proc-block: label
    inputs: [rand]
    outputs: [{type: utf8, dimensions: [1]}]
    args: {wordlist: $MISSING}
""")
    assert any("refers to resource $MISSING, which is not declared" in p for p in problems)
    assert problems_of("version: 1\npipeline: [\n")[0].startswith("line ")


def test_non_finite_capability_args_are_a_clear_error() -> None:
    from ota.rune.capabilities import CapabilityArgError, parse_capability

    for value in (float("nan"), float("inf"), ".nan"):
        with pytest.raises(CapabilityArgError, match="n must be a positive whole number"):
            parse_capability(CapabilityKind.ACCEL, {"n": value})
