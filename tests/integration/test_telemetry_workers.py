"""Telemetry ingest scaled out: `fleetctl telemetry ingest --workers 2` beside a controller that
runs with `--no-telemetry-ingest`, on the machine's Mosquitto (MQTT shared subscriptions) and on
SQLite and PostgreSQL.

Four registered devices publish 40 signed reports each, then the same 160 again (a redelivery):
every report is stored exactly once, both workers stored some of them (the broker split the
subscription), and the controller itself took none.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from attestation.identity import DeviceIdentity
from attestation.keys import raw_public_bytes
from ota.protocol import CONTROLLER, Channel, Message, MessageType, seal_message, topic
from ota.rune.streams import Mechanism, StreamKind
from ota.telemetry import Report, StreamValue
from tests.controller import BACKEND_PARAMS, FLEETCTL, _env, controller_for, wait_for

DEVICES = 4
REPORTS = 40


def _report(identity: DeviceIdentity, seq: int) -> bytes:
    now = time.time()
    stream = StreamValue(
        "sine/sine_mean",
        "default/sine@0.1.0",
        StreamKind.MEAN,
        ("mean",),
        (0.1 * (seq % 7),),
        Mechanism.LAPLACE,
        4.0,
        0.0,
        0.7,
    )
    ops = {
        "agent_version": "0.1.0",
        "uptime_s": 10.0,
        "active": None,
        "deployment": "idle",
        "inferences": 5,
        "failures": 0,
        "waiting": 0,
        "sandbox_errors": {},
        "latency_ms": {"p50": 1.0, "p95": 2.0},
        "cpu_s": 0.1,
        "rss_bytes": 1,
        "reports_dropped": 0,
    }
    body = Report(now - 60, now, ops, (stream,), ()).to_json()
    message = Message(
        identity.device_id, CONTROLLER, seq, now, now + 600, MessageType.TELEMETRY, body
    )
    return seal_message(message, identity.signer)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_two_workers_share_the_reports_and_store_each_once(
    backend: str, mqtt_url: str, tmp_path: Path
) -> None:
    serve_args = ("--mqtt-url", mqtt_url, "--no-telemetry-ingest")
    with controller_for(backend, tmp_path / "controller", serve_args=serve_args) as ctl:
        identities = []
        for n in range(DEVICES):
            identity = DeviceIdentity.load_or_create(tmp_path / f"device-{n}")
            ctl.register_device(raw_public_bytes(identity.public_key).hex())
            identities.append(identity)
        client_id = f"test-ingest-{uuid.uuid4().hex[:8]}"
        group = f"test-telemetry-{uuid.uuid4().hex[:8]}"
        env = {"FLEET_DB_URL": ctl.db_url} if ctl.db_url else {}
        log = (tmp_path / "ingest.log").open("wb")
        workers = subprocess.Popen(
            [FLEETCTL, "telemetry", "ingest", "--workers", "2", "--mqtt-url", mqtt_url,
             "--dir", str(ctl.fleet_dir), "--share-group", group, "--client-id", client_id],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(env),
        )  # fmt: skip
        try:
            wait_for(
                lambda: (
                    (tmp_path / "ingest.log").read_text().count("telemetry.worker_connected") == 2
                ),
                timeout=60,
                message="two workers subscribed",
            )
            reports = [
                (topic(identity.device_id, Channel.TELEMETRY), _report(identity, seq))
                for identity in identities
                for seq in range(1, REPORTS + 1)
            ]

            async def publish() -> None:
                host, port = mqtt_url.removeprefix("mqtt://").split(":")
                async with aiomqtt.Client(host, int(port), identifier=f"{client_id}-pub") as c:
                    for name, data in reports + reports:  # each twice
                        await c.publish(name, data, qos=1)

            asyncio.run(publish())

            seen: list[Any] = []

            def stored() -> int:
                status, body = ctl.api("GET", "/api/v1/telemetry/streams", params={"since": "1h"})
                assert status == 200, body
                seen[:] = [body]
                return sum(s["reports"] for s in body["streams"])

            try:
                wait_for(lambda: stored() == DEVICES * REPORTS, timeout=60, message="all stored")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the API says {seen}") from None
            time.sleep(1.0)  # the second copies are handled by now, and must not count
            assert stored() == DEVICES * REPORTS
        finally:
            workers.send_signal(signal.SIGTERM)
            workers.wait(30)
            log.close()
        lines = (tmp_path / "ingest.log").read_text()
        stops = [
            json.loads(m) for m in re.findall(r"^\{.*telemetry\.worker_stopped.*\}$", lines, re.M)
        ]
        assert len(stops) == 2, lines
        assert sum(s["stored"] for s in stops) == DEVICES * REPORTS
        assert all(s["stored"] > 0 for s in stops), stops
        assert sum(s["duplicates"] for s in stops) == DEVICES * REPORTS
        assert ctl.metrics().get(("fleet_telemetry_reports_total", ()), 0.0) == 0.0
        assert workers.returncode == 0, lines
