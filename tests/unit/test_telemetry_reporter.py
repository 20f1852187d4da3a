"""The agent's reporter with its real parts (identity, channel state, rune loop, consent, budget,
buffer), fed the outputs the sine bundle's pipeline makes.

- Before a grant a report carries operational state only; after it, one noisy aggregate per
  granted stream, signed by the device and accepted by the controller's own check.
- A stream whose budget (the owner's cap here) is spent stops: the report names it `paused:
  budget` and carries no value for it.
- The buffer drops its oldest reports first when full, counts them, and the next report says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.channel_state import ChannelState
from agent.policy import AgentPolicy
from agent.runconfig import RunConfig
from agent.runloop import RuneLoop
from agent.sandbox.outputs import OutputRecord
from agent.slots import SlotRune, Slots
from agent.telemetry.buffer import ReportBuffer
from agent.telemetry.consent import ConsentStore
from agent.telemetry.reporter import Reporter
from attestation.identity import DeviceIdentity
from ota.protocol import CONTROLLER, Channel, open_message
from ota.rune.build import build_bundle
from ota.telemetry import check_report


@pytest.fixture
def sine(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "sine" / "Runefile.yml").data


def _reporter(state_dir: Path, buffer_reports: int = 100) -> Reporter:
    identity = DeviceIdentity.load_or_create(state_dir)
    policy = AgentPolicy(telemetry_window_s=60.0, telemetry_buffer_reports=buffer_reports)
    loop = RuneLoop(state_dir, Slots(state_dir), policy, RunConfig.load(state_dir))
    return Reporter(
        state_dir,
        identity,
        ChannelState(state_dir),
        loop,
        policy,
        agent_version="0.1.0",
        active=lambda: None,
        deployment=lambda: "idle",
    )


def _feed(reporter: Reporter, data: bytes, values: list[float]) -> None:
    rune = SlotRune.for_bytes(
        data, org="default", name="sine", version="0.1.0", kind="bundle",
        capabilities=("RAND",), installed_at=time.time(),
    )  # fmt: skip
    tensor = {"type_name": "f32", "channel": 1, "dimensions": [1, 1]}
    for value in values:
        record = OutputRecord(1, [{**tensor, "elements": [1.0]}, {**tensor, "elements": [value]}])
        reporter.observe(rune, data, [record])


def _last_report(state_dir: Path, reporter: Reporter) -> dict[str, Any]:
    newest = reporter.buffer.pending()[-1].read_bytes()
    identity = DeviceIdentity.load_or_create(state_dir)
    message = open_message(
        newest,
        audience=CONTROLLER,
        channel=Channel.TELEMETRY,
        key_for={identity.device_id: identity.public_key}.get,
        last_seq=lambda _iss: 0,
        now=time.time(),
        topic_sender=identity.device_id,
    )
    check_report(message.body)
    return message.body


def test_streams_are_sent_only_once_granted(tmp_path: Path, sine: bytes) -> None:
    reporter = _reporter(tmp_path)
    _feed(reporter, sine, [0.1, 0.9, -0.4])
    reporter.close_window()
    before = _last_report(tmp_path, reporter)
    assert before["streams"] == [] and before["paused"] == []
    assert before["ops"]["agent_version"] == "0.1.0"

    ConsentStore(tmp_path).grant("sine/sine_histogram", time.time())
    _feed(reporter, sine, [0.1, 0.9, -0.4, 0.6])
    reporter.close_window()
    after = _last_report(tmp_path, reporter)
    assert [s["stream"] for s in after["streams"]] == ["sine/sine_histogram"]
    sent = after["streams"][0]
    assert sent["rune"] == "default/sine@0.1.0" and sent["epsilon"] == 4.0
    assert len(sent["values"]) == 4 and sent["noise_std"] > 0
    # The true shares (0, 0.25, 0.25, 0.5) are not what was sent: noise was added.
    assert sent["values"] != [0.0, 0.25, 0.25, 0.5]


def test_a_spent_budget_stops_the_stream(tmp_path: Path, sine: bytes) -> None:
    reporter = _reporter(tmp_path)
    ConsentStore(tmp_path).grant("sine/sine_mean", time.time(), budget=8.0)  # two reports
    sent = []
    for _ in range(4):
        _feed(reporter, sine, [0.5, 0.25])
        reporter.close_window()
        sent.append(_last_report(tmp_path, reporter))
    assert [len(r["streams"]) for r in sent] == [1, 1, 0, 0]
    assert sent[2]["paused"] == [{"stream": "sine/sine_mean", "reason": "budget"}]
    # The spend is on disk: a new process does not get the budget back.
    again = _reporter(tmp_path)
    _feed(again, sine, [0.5])
    again.close_window()
    assert _last_report(tmp_path, again)["streams"] == []


def test_a_full_buffer_drops_the_oldest_and_says_so(tmp_path: Path, sine: bytes) -> None:
    reporter = _reporter(tmp_path, buffer_reports=3)
    seqs = [reporter.close_window() for _ in range(5)]
    held = [int(p.stem) for p in reporter.buffer.pending()]
    assert held == seqs[-3:]
    assert reporter.buffer.dropped == 2
    # A report counts the drops made before it was stored; storing it dropped one more, which
    # the next report counts.
    assert _last_report(tmp_path, reporter)["ops"]["reports_dropped"] == 1
    # The count survives a restart.
    assert ReportBuffer(tmp_path, 3).dropped == 2
    assert json.loads((tmp_path / "channel.json").read_text())["sent"]["telemetry"] >= seqs[-1]
