"""The `rune` command as an author uses it: build, run and inspect, with meaningful exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNE = str(Path(sys.executable).parent / "rune")


def rune(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RUNE, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_build_run_and_inspect_the_gesture_example(examples_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "gesture.runebundle"
    built = rune("build", examples_dir / "gesture" / "Runefile.yml", "-o", bundle, "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["path"] == str(bundle)

    ran = rune("run", bundle, "--accel", examples_dir / "gesture" / "gesture.csv", "-n", "4")
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [line[0]["elements"][0] for line in lines] == ["wave", "tilt", "lift", "rest"]
    label, scores = lines[0]
    assert label == {"type_name": "utf8", "channel": 1, "elements": ["wave"], "dimensions": [1]}
    assert scores["type_name"] == "f32" and abs(sum(scores["elements"]) - 1) < 1e-5

    as_json = rune("run", bundle, "--accel", examples_dir / "gesture" / "gesture.csv", "-o", "json")
    document = json.loads(as_json.stdout)
    assert document["rune"] == "gesture@0.1.0"
    assert document["inferences"][0]["outputs"][0][0]["elements"] == ["wave"]

    inspected = json.loads(rune("inspect", bundle, "-o", "json").stdout)
    assert inspected["kind"] == "bundle"
    assert [c["kind"] for c in inspected["capabilities"]] == ["ACCEL"]
    assert inspected["models"][0]["mimetype"] == "application/onnx-model"
    assert {b["source"] for b in inspected["blocks"]} == {
        "builtin:normalize",
        "builtin:softmax",
        "builtin:most_confident_indices",
        "builtin:label",
    }
    table = rune("inspect", bundle)
    assert table.returncode == 0 and "capabilities" in table.stdout and "ACCEL" in table.stdout


def test_the_sine_example_runs_its_tflite_model(examples_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "sine.runebundle"
    assert rune("build", examples_dir / "sine" / "Runefile.yml", "-o", bundle).returncode == 0
    ran = rune("run", bundle, "--random", "7", "-n", "3", "-o", "json")
    assert ran.returncode == 0, ran.stderr
    import math

    for inference in json.loads(ran.stdout)["inferences"]:
        degrees, sine = inference["outputs"][0]
        expected = math.sin(math.radians(degrees["elements"][0]))
        assert abs(sine["elements"][0] - expected) < 0.05


def test_errors_are_one_clear_line_with_a_meaningful_exit_code(
    examples_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "Runefile.yml"
    broken.write_text(
        "version: 1\npipeline:\n  x:\n    proc-block: fft\n    inputs: [y]\n"
        "    outputs: [{type: f32, dimensions: [1]}]\n"
    )
    result = rune("build", broken)
    assert result.returncode == 3
    assert "stage x: input y names no stage" in result.stderr
    assert "Traceback" not in result.stderr

    bundle = tmp_path / "g.runebundle"
    rune("build", examples_dir / "gesture" / "Runefile.yml", "-o", bundle)
    missing = rune("run", bundle)
    assert missing.returncode == 1
    assert "this rune reads ACCEL: pass a file with --accel FILE" in missing.stderr

    denied = rune(
        "run", bundle, "--accel", examples_dir / "gesture" / "gesture.csv", "--allow", "RAND"
    )
    assert denied.returncode == 3
    assert "needs ACCEL, which this device's policy does not allow" in denied.stderr

    junk = tmp_path / "junk.rune"
    junk.write_bytes(b"\0asm\x01\0\0\0\xff\xff")
    for command in (("run", junk), ("inspect", junk)):
        outcome = rune(*command)
        assert outcome.returncode == 3 and "Traceback" not in outcome.stderr
    assert rune("run", bundle, "-o", "yaml").returncode == 2
    assert rune("run", tmp_path / "nope.rune").returncode == 3


def test_build_writes_a_statement_that_keygen_and_sign_turn_into_a_signed_one(
    examples_dir: Path, tmp_path: Path
) -> None:
    from attestation.keys import load_public_key_file
    from attestation.provenance import verify_statement
    from ota.rune.bundle import sha256_hex

    bundle = tmp_path / "sine.runebundle"
    built = json.loads(
        rune("build", examples_dir / "sine" / "Runefile.yml", "-o", bundle, "--json").stdout
    )
    statement = json.loads(Path(built["statement"]).read_text())
    digest = sha256_hex(bundle.read_bytes())
    assert statement["subject"] == [{"name": "sine.runebundle", "digest": {"sha256": digest}}]
    predicate = statement["predicate"]
    inputs = {d["name"] for d in predicate["buildDefinition"]["resolvedDependencies"]}
    assert "Runefile.yml" in inputs and any(name.endswith(".tflite") for name in inputs), inputs
    assert predicate["runDetails"]["builder"]["id"] == "urn:fleet:builder:rune"

    key = tmp_path / "publisher.pem"
    assert rune("keygen", "-o", key).returncode == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = rune("keygen", "-o", key)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr

    signed = rune("sign", bundle, "--key", key)
    assert signed.returncode == 0, signed.stderr
    envelope = tmp_path / "sine.runebundle.intoto.jsonl"
    public = load_public_key_file(key.with_suffix(".pub"))
    verified = verify_statement(envelope.read_bytes(), digest, {public.keyid: public})
    assert verified.sha256 == digest and verified.dependencies

    other = tmp_path / "other.runebundle"
    other.write_bytes(bundle.read_bytes() + b"changed")
    wrong = rune("sign", other, "--key", key, "--statement", Path(built["statement"]))
    assert wrong.returncode == 3 and "is about sine.runebundle" in wrong.stderr, wrong.stderr
    no_key = rune("sign", bundle, "--key", tmp_path / "missing.pem")
    assert no_key.returncode == 3 and "Traceback" not in no_key.stderr, no_key.stderr
