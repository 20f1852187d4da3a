"""Run settings: the `run:` section of agent.yaml, and what a controller `config` command may
change.

Everything runs on real files in a temp state dir; refused changes must leave agent.yaml
byte-for-byte as it was, and accepted ones must keep the owner's other settings and comments.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.policy import AgentPolicy, PolicyError
from agent.runconfig import (
    DEFAULT_SINK_BYTES,
    AccelerometerInput,
    RandomInput,
    ReplayInput,
    RunConfig,
    RunConfigError,
    SampleFormat,
    apply_config,
)

OWNER_FILE = """\
# The owner's settings for this device.
allowed_capabilities: [RAND, ACCEL]   # no camera, no microphone
health_check_calls: 5

run:
  input:
    kind: random
    seed: 3
  interval_s: 2.0
  remote_replay_paths: [{replay}]

# Probation: short on this bench device.
probation: {{window: 60, max_failures: 2, min_successes: 5}}
"""


def write(state: Path, text: str) -> Path:
    path = state / "agent.yaml"
    path.write_text(text)
    return path


def owner_file(state: Path, replay: Path | None = None) -> Path:
    return write(state, OWNER_FILE.format(replay=replay or state.parent / "none.csv"))


# -- loading ------------------------------------------------------------------------------------


def test_no_file_and_no_section_mean_the_defaults(tmp_path: Path) -> None:
    config = RunConfig.load(tmp_path)
    assert config == RunConfig.defaults(tmp_path)
    assert config.input == RandomInput()
    assert config.interval_s == 1.0
    assert config.sink.path == tmp_path.absolute() / "outputs.jsonl"
    assert config.sink.max_bytes == DEFAULT_SINK_BYTES
    write(tmp_path, "health_check_calls: 2\n")
    assert RunConfig.load(tmp_path) == RunConfig.defaults(tmp_path)


def test_every_input_kind_loads(tmp_path: Path) -> None:
    write(
        tmp_path,
        "run:\n  input: {kind: accelerometer, seed: 9, hz: 50, noise: 0.1, burst_every_s: 0}\n"
        "  interval_s: 0.25\n  sink: {path: out/o.jsonl, max_bytes: 65536}\n",
    )
    config = RunConfig.load(tmp_path)
    assert config.input == AccelerometerInput(seed=9, hz=50.0, noise=0.1, burst_every_s=0.0)
    assert config.interval_s == 0.25
    assert config.sink.path == tmp_path.absolute() / "out" / "o.jsonl"
    assert config.sink.max_bytes == 65536

    write(tmp_path, "run:\n  input: {kind: replay, path: /dev/ttyACM0, format: i16le}\n")
    assert RunConfig.load(tmp_path).input == ReplayInput(Path("/dev/ttyACM0"), SampleFormat.I16LE)

    # csv / jsonl are guessed from the suffix; relative paths are in the state dir.
    write(tmp_path, "run:\n  input: {kind: replay, path: rec.csv, scale: 2, timeout_s: 0}\n")
    replay = RunConfig.load(tmp_path).input
    assert replay == ReplayInput(
        tmp_path.absolute() / "rec.csv", SampleFormat.CSV, scale=2.0, timeout_s=0.0
    )
    write(tmp_path, "run:\n  input: {kind: replay, path: /tmp/x.ndjson}\n")
    assert RunConfig.load(tmp_path).input == ReplayInput(Path("/tmp/x.ndjson"), SampleFormat.JSONL)


def test_the_owners_policy_accepts_a_run_section(tmp_path: Path) -> None:
    owner_file(tmp_path)
    policy = AgentPolicy.load(tmp_path)
    assert policy.allowed_capabilities == {"RAND", "ACCEL"}
    assert policy.health_check_calls == 5
    assert RunConfig.load(tmp_path).input == RandomInput(seed=3)


@pytest.mark.parametrize(
    ("run", "names"),
    [
        ("run: [1, 2]", "run must be a mapping"),
        ("run: {speed: 3}", "run.speed is not a setting"),
        ("run: {interval_s: 0}", "run.interval_s must be a number"),
        ("run: {interval_s: fast}", "run.interval_s must be a number"),
        ("run: {interval_s: .nan}", "run.interval_s must be a number"),
        ("run: {interval_s: true}", "run.interval_s must be a number"),
        ("run: {input: random}", "run.input must be a mapping"),
        ("run: {input: {seed: 1}}", "run.input.kind is required"),
        ("run: {input: {kind: camera}}", "run.input.kind 'camera' is not one of"),
        ("run: {input: {kind: random, hz: 5}}", "run.input.hz is not a setting of input kind"),
        ("run: {input: {kind: accelerometer, path: /x}}", "run.input.path is not a setting"),
        ("run: {input: {kind: random, seed: -1}}", "run.input.seed must be a whole number"),
        ("run: {input: {kind: random, seed: 1.5}}", "run.input.seed must be a whole number"),
        ("run: {input: {kind: accelerometer, hz: 0}}", "run.input.hz must be a number"),
        ("run: {input: {kind: accelerometer, noise: -1}}", "run.input.noise must be a number"),
        ("run: {input: {kind: replay}}", "run.input.path is required"),
        ("run: {input: {kind: replay, path: /dev/x}}", "run.input.format is required"),
        ("run: {input: {kind: replay, path: /x, format: wav}}", "run.input.format 'wav'"),
        ("run: {input: {kind: replay, path: /x.csv, scale: 0}}", "run.input.scale must not"),
        ("run: {input: {kind: replay, path: /x.csv, timeout_s: 61}}", "run.input.timeout_s"),
        ("run: {sink: out.jsonl}", "run.sink must be a mapping"),
        ("run: {sink: {path: ''}}", "run.sink.path must be a file path"),
        ("run: {sink: {max_bytes: 10}}", "run.sink.max_bytes must be a whole number"),
        ("run: {sink: {rotate: 3}}", "run.sink.rotate is not a setting"),
        ("run: {remote_replay_paths: /dev/x}", "run.remote_replay_paths must be a list"),
    ],
)
def test_bad_settings_are_errors_naming_the_key(tmp_path: Path, run: str, names: str) -> None:
    path = write(tmp_path, run + "\n")
    with pytest.raises(RunConfigError, match=names) as caught:
        RunConfig.load(tmp_path)
    assert str(path) in str(caught.value)


# -- remote changes -----------------------------------------------------------------------------


def test_a_config_change_keeps_every_other_line_and_returns_what_load_reads(
    tmp_path: Path,
) -> None:
    path = owner_file(tmp_path)
    before = path.read_text()
    config = apply_config(
        tmp_path, {"input": {"kind": "accelerometer", "seed": 1}, "interval_s": 0.5}
    )
    assert config.input == AccelerometerInput(seed=1)
    assert config.interval_s == 0.5
    assert RunConfig.load(tmp_path) == config

    after = path.read_text()
    # Everything outside the run block, comments included, is as the owner wrote it.
    kept = [line for line in before.splitlines() if not line.startswith(("run:", "  "))]
    assert [line for line in after.splitlines() if not line.startswith(("run:", "  "))] == kept
    assert "# Probation: short on this bench device." in after
    assert "# no camera, no microphone" in after
    policy = AgentPolicy.load(tmp_path)
    assert policy.probation.window == 60 and policy.health_check_calls == 5
    # Run settings the change did not name stay (the owner's allowlist too).
    data = yaml.safe_load(after)
    assert data["run"]["remote_replay_paths"] == [str(tmp_path.parent / "none.csv")]
    assert not (tmp_path / "agent.yaml.tmp").exists()


def test_a_sink_bound_change_merges_into_the_sink_section(tmp_path: Path) -> None:
    write(tmp_path, "run:\n  sink: {path: logs/out.jsonl}\n")
    config = apply_config(tmp_path, {"sink": {"max_bytes": 8192}})
    assert config.sink.path == tmp_path.absolute() / "logs" / "out.jsonl"
    assert config.sink.max_bytes == 8192
    assert yaml.safe_load((tmp_path / "agent.yaml").read_text())["run"]["sink"] == {
        "path": "logs/out.jsonl",
        "max_bytes": 8192,
    }


def test_a_config_change_creates_the_file_when_there_is_none(tmp_path: Path) -> None:
    config = apply_config(tmp_path, {"interval_s": 3})
    assert config.interval_s == 3.0
    path = tmp_path / "agent.yaml"
    assert yaml.safe_load(path.read_text()) == {"run": {"interval_s": 3}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    AgentPolicy.load(tmp_path)


def test_a_file_written_in_flow_style_is_rewritten_whole(tmp_path: Path) -> None:
    write(tmp_path, "{run: {interval_s: 2}, allow_downgrade: true}\n")
    apply_config(tmp_path, {"input": {"kind": "random", "seed": 4}})
    data = yaml.safe_load((tmp_path / "agent.yaml").read_text())
    run = {"interval_s": 2, "input": {"kind": "random", "seed": 4}}
    assert data == {"run": run, "allow_downgrade": True}
    assert AgentPolicy.load(tmp_path).allow_downgrade is True


def test_require_provenance_is_off_unless_the_owner_turns_it_on(tmp_path: Path) -> None:
    assert AgentPolicy.load(tmp_path).require_provenance is False
    write(tmp_path, "require_provenance: true\n")
    assert AgentPolicy.load(tmp_path).require_provenance is True
    write(tmp_path, "require_provenance: maybe\n")
    with pytest.raises(PolicyError, match="require_provenance must be true or false"):
        AgentPolicy.load(tmp_path)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({}, "must change at least one of"),
        ({"probation": {"window": 1}}, "probation is the device owner's policy"),
        ({"allowed_capabilities": ["RAW"]}, "allowed_capabilities is the device owner's"),
        ({"allow_downgrade": True}, "allow_downgrade is the device owner's policy"),
        ({"require_provenance": False}, "require_provenance is the device owner's policy"),
        ({"run": {"interval_s": 1}}, "run is not a run setting"),
        ({"remote_replay_paths": ["/etc/shadow"]}, "run.remote_replay_paths is the device"),
        ({"sink": {"path": "/etc/cron.d/x"}}, "run.sink.path is the device owner's"),
        ({"sink": 5}, "sink must be a mapping"),
        ({"interval_s": -1}, "config: run.interval_s must be a number"),
        ({"input": {"kind": "random", "seed": "x"}}, "config: run.input.seed"),
        ({"input": {"kind": "replay", "path": "/dev/null", "format": "u8"}}, "not a path the"),
        ({"input": {"kind": "accelerometer"}, "health_check_calls": 1}, "health_check_calls"),
    ],
)
def test_a_refused_change_changes_nothing(
    tmp_path: Path, changes: dict[str, Any], names: str
) -> None:
    path = owner_file(tmp_path)
    before = path.read_bytes(), path.stat().st_mtime_ns
    with pytest.raises(RunConfigError, match=names):
        apply_config(tmp_path, changes)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path)) == ["agent.yaml"]


def test_a_controller_may_replay_only_what_the_owner_listed_and_never_the_state_dir(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    allowed = tmp_path / "bench.csv"
    owner_file(state, allowed)
    config = apply_config(state, {"input": {"kind": "replay", "path": str(allowed)}})
    assert config.input == ReplayInput(allowed, SampleFormat.CSV)

    # Listed by the owner, but it is (or points into) the state dir: refused all the same.
    key = state / "identity.key"
    link = tmp_path / "innocent.csv"
    link.symlink_to(key)
    for path in (key, link):
        write(state, f"run:\n  remote_replay_paths: ['{path}']\n")
        before = (state / "agent.yaml").read_bytes()
        with pytest.raises(RunConfigError, match="state dir, which is never replayed"):
            apply_config(state, {"input": {"kind": "replay", "path": str(path), "format": "u8"}})
        assert (state / "agent.yaml").read_bytes() == before


def test_an_owner_replay_setting_survives_unrelated_remote_changes(tmp_path: Path) -> None:
    write(tmp_path, "run:\n  input: {kind: replay, path: /dev/ttyUSB0, format: csv}\n")
    config = apply_config(tmp_path, {"interval_s": 0.2})
    assert config.input == ReplayInput(Path("/dev/ttyUSB0"), SampleFormat.CSV)


def test_a_broken_file_is_not_overwritten(tmp_path: Path) -> None:
    path = write(tmp_path, "run: [unclosed\n")
    with pytest.raises(RunConfigError, match="cannot read it"):
        apply_config(tmp_path, {"interval_s": 1})
    assert path.read_text() == "run: [unclosed\n"
    write(tmp_path, "run: {input: {kind: nope}}\n")
    with pytest.raises(RunConfigError, match="run.input.kind 'nope'"):
        apply_config(tmp_path, {"interval_s": 1})
