"""Telemetry without raw data, end to end: real agents, a real controller, real signatures.

One fleet for the module (`fleetctl serve` on SQLite with its embedded broker) and four agents
running the `sine` example (it declares `sine/sine_mean` and `sine/sine_histogram`), each reaching
the broker through its own recording relay (`tests.relay.GatedProxy`) and the controller's HTTP
port through a shared one, so the test holds every byte each device sent:

- `granted`: its owner granted both streams before it started;
- `silent`: its owner granted nothing;
- `revoker`: granted `sine/sine_mean`, and the consent test revokes it while it runs;
- `offline`: granted both; the delivery test cuts its network, then restores it.

Tests:
- No raw output value (every number the rune wrote to the device's own sink) appears in anything
  any agent sent, envelopes' base64 payloads decoded; the noisy aggregates do, and the controller
  serves a fleet aggregate of them.
- Nothing derived from sensors is sent before a grant (`silent` sends operational reports with no
  stream) or after a revoke (the next reports of `revoker` name it `paused: revoked`, no value).
- Reports with raw samples, unbounded arrays or no noise, reports for another device and replays
  are refused or dropped by the controller, counted, and nothing of them is stored.
- `offline` keeps making reports while cut off; once back it delivers every buffered report, each
  stored exactly once, and its buffer empties.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from attestation.identity import DeviceIdentity
from ota.protocol import CONTROLLER, Channel, Message, MessageType, seal_message, topic
from tests.agents import AgentProcess, deploy, get, post, wait_online
from tests.controller import (
    RunningController,
    build_example,
    controller_for,
    fleet_agent,
    wait_for,
)
from tests.mosquitto import free_port
from tests.relay import GatedProxy

WINDOW_S = 1
NAMES = ("granted", "silent", "revoker", "offline")
GRANTS = {
    "granted": ["sine/sine_mean", "sine/sine_histogram"],
    "silent": [],
    "revoker": ["sine/sine_mean"],
    "offline": ["sine/sine_mean", "sine/sine_histogram"],
}
DB_FILE = "fleet.sqlite3"
PAYLOAD = re.compile(rb'"payload"\s*:\s*"([A-Za-z0-9+/=]+)"')


@dataclass
class Fleet:
    ctl: RunningController
    agents: dict[str, AgentProcess]
    relays: dict[str, GatedProxy]
    http: GatedProxy
    broker_port: int

    def stored_seqs(self, device_id: str) -> list[int]:
        """The seqs of the device's reports in the controller's database."""
        with contextlib.closing(sqlite3.connect(self.ctl.fleet_dir / DB_FILE)) as db:
            rows = db.execute(
                "SELECT seq FROM telemetry_report WHERE device_id = ? ORDER BY seq", (device_id,)
            ).fetchall()
        return [int(r[0]) for r in rows]


def sent_payloads(data: bytes) -> list[bytes]:
    """Every DSSE payload in `data`, decoded (what an envelope really carries)."""
    return [base64.b64decode(m.group(1)) for m in PAYLOAD.finditer(data)]


def telemetry_bodies(relay: GatedProxy, device_id: str) -> list[dict[str, Any]]:
    """The telemetry reports a device sent through its relay, in the order sent."""
    bodies = []
    for payload in sent_payloads(bytes(relay.sent)):
        try:
            message = json.loads(payload)
        except ValueError:
            continue
        if message.get("type") == "telemetry" and message.get("iss") == device_id:
            bodies.append(message)
    return bodies


def _grant(agent: AgentProcess, stream: str) -> None:
    done = fleet_agent("consent", "grant", stream, "--state-dir", agent.state_dir)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def fleet(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("telemetry")
    broker_port = free_port()
    relays = {name: GatedProxy(("127.0.0.1", broker_port)) for name in NAMES}
    with controller_for(
        "sqlite", tmp / "controller", serve_args=("--mqtt-listen", f"127.0.0.1:{broker_port}")
    ) as ctl:
        http = GatedProxy(("127.0.0.1", ctl.port))
        bundle = build_example(_roomy(examples_dir, tmp), "sine", "0.1.0", tmp)
        ctl.push(bundle, org="default")
        token = post(ctl, "/api/v1/enrollment-tokens", {"uses": len(NAMES), "ttl_s": 600})
        agents: dict[str, AgentProcess] = {}
        for name in NAMES:
            state_dir = tmp / name
            state_dir.mkdir()
            run = {"input": {"kind": "random", "seed": 7}, "interval_s": 0.2}
            settings = {"telemetry": {"window_s": WINDOW_S}, "run": run}
            (state_dir / "agent.yaml").write_text(yaml.safe_dump(settings))
            enrolled = fleet_agent(
                "enroll", "--server", http.url, "--root", ctl.root_json, "--state-dir",
                state_dir, "--token", token["token"], "-o", "json",
            )  # fmt: skip
            assert enrolled.returncode == 0, enrolled.stderr
            # Each device reaches the broker through its own relay.
            enrollment = state_dir / "enrollment.json"
            saved = json.loads(enrollment.read_text())
            saved["broker_url"] = f"mqtt://127.0.0.1:{relays[name].port}"
            enrollment.write_text(json.dumps(saved))
            agent = AgentProcess(state_dir, json.loads(enrolled.stdout)["device_id"])
            for stream in GRANTS[name]:
                _grant(agent, stream)
            agent.start()
            agents[name] = agent
        try:
            wait_online(ctl, list(agents.values()))
            for agent in agents.values():
                assert deploy(ctl, agent.device_id, "sine@0.1.0")["state"] == "succeeded"
            # Reports with streams from the two devices that granted both.
            wait_for(
                lambda: _aggregate(ctl, "sine/sine_histogram")["devices"] >= 2,
                timeout=60,
                message="noisy histograms from two devices",
            )
            wait_for(
                lambda: all(len(_raw_values(a)) >= 20 for a in agents.values()),
                timeout=60,
                message="every device running the rune for a while",
            )
            yield Fleet(ctl, agents, relays, http, broker_port)
        finally:
            for agent in agents.values():
                agent.stop()
            for relay in [*relays.values(), http]:
                relay.close()


def _roomy(examples_dir: Path, tmp: Path) -> Path:
    """The examples, with the sine rune's budget raised: reports every second would spend the
    example's daily budget (24 reports) in half a minute, and these tests run longer."""
    roomy = tmp / "examples"
    shutil.copytree(examples_dir, roomy)
    runefile = roomy / "sine" / "Runefile.yml"
    runefile.write_text(
        runefile.read_text().replace("epsilon: 4.0", "epsilon: 4.0\n    budget: 1e6")
    )
    return roomy


def _aggregate(ctl: RunningController, stream: str) -> dict[str, Any]:
    answer = get(ctl, f"/api/v1/telemetry/streams/{stream}?since=1h")
    aggregate: dict[str, Any] = answer["aggregate"]
    return aggregate


def _raw_values(agent: AgentProcess) -> set[bytes]:
    """Every number the rune output on the device, as the sink wrote it (its JSON text)."""
    values: set[bytes] = set()
    sink = agent.state_dir / "outputs.jsonl"
    for line in (sink.read_text() if sink.exists() else "").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line being written as we read
        items = record["output"] if isinstance(record["output"], list) else [record["output"]]
        for item in items:
            for element in item["elements"]:
                text = json.dumps(element).encode()
                if len(text) >= 8:  # a number with enough digits to be recognised anywhere
                    values.add(text)
    return values


def test_no_raw_output_leaves_a_device_but_its_noisy_aggregates_do(fleet: Fleet) -> None:
    for name, agent in fleet.agents.items():
        raw = _raw_values(agent)
        assert len(raw) >= 20, f"{name} ran the rune too little to test anything"
        sent = bytes(fleet.relays[name].sent) + bytes(fleet.http.sent)
        haystack = sent + b"\n".join(sent_payloads(sent))
        leaked = [value for value in raw if value in haystack]
        assert leaked == [], f"{name} sent raw outputs: {leaked[:5]}"
    # What was sent instead: noisy aggregates of the granted streams, which the controller serves.
    bodies = telemetry_bodies(fleet.relays["granted"], fleet.agents["granted"].device_id)
    streams = [s for body in bodies for s in body["body"]["streams"]]
    assert {s["stream"] for s in streams} == {"sine/sine_mean", "sine/sine_histogram"}
    assert all(s["noise_std"] > 0 and s["epsilon"] == 4.0 for s in streams)
    aggregate = _aggregate(fleet.ctl, "sine/sine_histogram")
    assert aggregate["keys"] == ["[-1,-0.5)", "[-0.5,0)", "[0,0.5)", "[0.5,1]"]
    assert len(aggregate["value"]) == 4 and all(e > 0 for e in aggregate["error"])


def test_nothing_derived_from_sensors_is_sent_without_consent(fleet: Fleet) -> None:
    silent = telemetry_bodies(fleet.relays["silent"], fleet.agents["silent"].device_id)
    assert len(silent) >= 3, "the device without consent sent no operational report"
    assert all(body["body"]["streams"] == [] for body in silent)
    assert any(body["body"]["ops"]["inferences"] > 0 for body in silent)

    revoker = fleet.agents["revoker"]
    relay = fleet.relays["revoker"]
    wait_for(
        lambda: any(b["body"]["streams"] for b in telemetry_bodies(relay, revoker.device_id)),
        timeout=30,
        message="a granted stream from the revoking device",
    )
    before = time.time()
    done = fleet_agent("consent", "revoke", "sine/sine_mean", "--state-dir", revoker.state_dir)
    assert done.returncode == 0, done.stderr
    revoked = {"stream": "sine/sine_mean", "reason": "revoked"}

    def from_revoke() -> list[dict[str, Any]]:
        """The reports from the first that says the stream was revoked on, in seq order."""
        bodies = sorted(telemetry_bodies(relay, revoker.device_id), key=lambda b: b["seq"])
        first = next((n for n, b in enumerate(bodies) if revoked in b["body"]["paused"]), None)
        return [] if first is None else bodies[first:]

    wait_for(lambda: len(from_revoke()) >= 3, timeout=30, message="reports after the revoke")
    after = from_revoke()
    assert after[0]["iat"] >= before  # said by the first report made after the revoke ...
    assert all(b["body"]["streams"] == [] for b in after), after  # ... and nothing sent since


def _publish(fleet: Fleet, items: list[tuple[str, bytes]]) -> None:
    async def send() -> None:
        async with aiomqtt.Client("127.0.0.1", fleet.broker_port, identifier="test-attacker") as c:
            for name, data in items:
                await c.publish(name, data, qos=1)

    asyncio.run(send())


def _report(identity: DeviceIdentity, seq: int, body: dict[str, Any]) -> bytes:
    now = time.time()
    message = Message(
        identity.device_id, CONTROLLER, seq, now, now + 600, MessageType.TELEMETRY, body
    )
    return seal_message(message, identity.signer)


def _refused(fleet: Fleet) -> dict[str, float]:
    samples = fleet.ctl.metrics()
    return {
        dict(labels)["kind"]: value
        for (name, labels), value in samples.items()
        if name == "fleet_telemetry_refused_total"
    }


def test_reports_with_raw_data_or_for_another_device_are_refused(fleet: Fleet) -> None:
    granted = fleet.agents["granted"]
    victim = fleet.agents["silent"]
    identity = DeviceIdentity.load_or_create(granted.state_dir)
    real = telemetry_bodies(fleet.relays["granted"], granted.device_id)[-1]["body"]
    seq = 10_000_000  # far above anything the device itself uses
    with_samples = {**real, "samples": [0.25, 0.5, 0.75]}

    def with_values(count: int) -> dict[str, Any]:
        body = json.loads(json.dumps(real))
        keys = [f"k{i}" for i in range(count)]
        body["streams"] = [{**body["streams"][0], "keys": keys, "values": [0.5] * count}]
        return body

    unbounded, huge = with_values(200), with_values(5000)
    noiseless = json.loads(json.dumps(real))
    noiseless["streams"] = [{**noiseless["streams"][0], "noise_std": 0.0}]
    before = fleet.stored_seqs(granted.device_id)
    refused_before = _refused(fleet)
    own = topic(granted.device_id, Channel.TELEMETRY)
    _publish(
        fleet,
        [
            (own, _report(identity, seq + 1, with_samples)),
            (own, _report(identity, seq + 2, unbounded)),
            (own, _report(identity, seq + 3, noiseless)),
            (own, _report(identity, seq + 5, huge)),
            # A well-formed report of `granted`'s, on the other device's topic.
            (topic(victim.device_id, Channel.TELEMETRY), _report(identity, seq + 4, real)),
        ],
    )

    def counted() -> dict[str, float]:
        now = _refused(fleet)
        kinds = ("raw-data", "spoofed", "oversized")
        return {k: now.get(k, 0) - refused_before.get(k, 0) for k in kinds}

    wait_for(
        lambda: counted() == {"raw-data": 3, "spoofed": 1, "oversized": 1},
        timeout=20,
        message="the forged reports refused",
    )
    assert set(before) <= set(fleet.stored_seqs(granted.device_id))
    assert not [s for s in fleet.stored_seqs(victim.device_id) if s >= seq]
    assert not [s for s in fleet.stored_seqs(granted.device_id) if s >= seq]


def test_an_offline_device_delivers_its_buffered_reports_once(fleet: Fleet) -> None:
    agent = fleet.agents["offline"]
    relay = fleet.relays["offline"]
    buffered = agent.state_dir / "telemetry" / "outbox"
    relay.cut()
    cut_at = time.time()
    wait_for(
        lambda: len(list(buffered.glob("*.env"))) >= 4,
        timeout=30,
        message="reports buffered while offline",
    )
    held = sorted(int(p.stem) for p in buffered.glob("*.env"))
    copies = {int(p.stem): p.read_bytes() for p in buffered.glob("*.env")}
    assert not [s for s in held if s in fleet.stored_seqs(agent.device_id)]
    relay.restore()
    wait_for(
        lambda: set(held) <= set(fleet.stored_seqs(agent.device_id)),
        timeout=90,
        message="the buffered reports stored after the device came back",
    )
    stored = fleet.stored_seqs(agent.device_id)
    assert len(stored) == len(set(stored))  # each once
    wait_for(
        lambda: not [p for p in buffered.glob("*.env") if int(p.stem) in held],
        timeout=30,
        message="the delivered reports removed from the buffer",
    )
    assert time.time() - cut_at < 300

    # A replay of one of them (as recorded) is dropped: still stored once.
    duplicates = fleet.ctl.metrics().get(("fleet_telemetry_duplicates_total", ()), 0.0)
    first = held[0]
    _publish(fleet, [(topic(agent.device_id, Channel.TELEMETRY), copies[first])])
    wait_for(
        lambda: fleet.ctl.metrics().get(("fleet_telemetry_duplicates_total", ()), 0.0) > duplicates,
        timeout=20,
        message="the replay counted as a duplicate",
    )
    assert fleet.stored_seqs(agent.device_id).count(first) == 1


def test_consent_list_shows_what_each_stream_costs(fleet: Fleet) -> None:
    done = fleet_agent(
        "consent", "list", "--state-dir", fleet.agents["granted"].state_dir, "-o", "json"
    )
    assert done.returncode == 0, done.stderr
    rows = {row["stream"]: row for row in json.loads(done.stdout)}
    assert set(rows) == {"sine/sine_mean", "sine/sine_histogram"}
    assert all(row["granted"] and row["epsilon_per_report"] == 4.0 for row in rows.values())
    assert all(0 < row["spent"] <= row["budget"] for row in rows.values())
    bad = fleet_agent(
        "consent", "grant", "not a stream", "--state-dir", fleet.agents["silent"].state_dir
    )
    assert bad.returncode == 2 and "RUNE/STREAM" in bad.stderr and "Traceback" not in bad.stderr


def test_a_rollout_shows_a_stream_per_wave(
    fleet: Fleet, examples_dir: Path, tmp_path: Path
) -> None:
    ctl = fleet.ctl
    ctl.push(
        build_example(_roomy(examples_dir, tmp_path), "sine", "0.2.0", tmp_path), org="default"
    )
    # The two devices whose owners granted the histogram: one canary, then the other.
    devices = ",".join(fleet.agents[name].device_id for name in ("granted", "offline"))
    created = ctl.cli(
        "rollout", "create", "sine@0.2.0", "--devices", devices, "--waves", "1,100%",
        "--soak", "0", "-o", "json",
    )  # fmt: skip
    rollout_id = json.loads(created.stdout)["id"]
    done = ctl.cli("rollout", "status", rollout_id, "--watch", "-o", "json", timeout=300)
    assert json.loads(done.stdout)["state"] == "completed"

    def per_wave() -> list[dict[str, Any]]:
        shown = ctl.cli(
            "rollout", "status", rollout_id, "--stream", "sine/sine_histogram", "-o", "json"
        )
        waves: list[dict[str, Any]] = json.loads(shown.stdout)["telemetry"]["waves"]
        return waves

    wait_for(
        lambda: all(w["aggregate"]["value"] is not None for w in per_wave()),
        timeout=60,
        message="the new version's histogram from both waves",
    )
    waves = per_wave()
    assert [w["wave"] for w in waves] == [1, 2]
    assert [(w["devices_drawn"], w["aggregate"]["devices"]) for w in waves] == [(1, 1), (1, 1)]
    text = ctl.cli("rollout", "status", rollout_id, "--stream", "sine/sine_histogram")
    assert "sine/sine_histogram per wave" in text.stdout
    missing = ctl.cli("telemetry", "show", "sine/sine_mean", "--rollout", "r-nothing", check=False)
    assert missing.returncode != 0 and "no rollout r-nothing" in missing.stderr


def test_a_damaged_budget_file_stops_the_agent_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "budget.json").write_text('{"format": "other"}')
    enrollment = {"device_id": "d" * 33, "server": "http://127.0.0.1:9", "state": "enrolled"}
    enrollment["broker_url"] = "mqtt://127.0.0.1:9"
    (tmp_path / "enrollment.json").write_text(json.dumps(enrollment))
    done = fleet_agent("run", "--state-dir", tmp_path)
    assert done.returncode == 5
    assert "not a privacy budget file" in done.stderr and "Traceback" not in done.stderr
