"""Enrollment end to end: `fleet-agent enroll` against a real `fleetctl serve` on SQLite and
PostgreSQL, tokens and approval through `fleetctl`, certificates from the fleet CA checked with
`cryptography` (and accepted by a real Mosquitto), renewal, and the schema migration.

Tests share one controller per backend (the `controller` fixture); each enrolls devices of its own
(new state dirs) and makes its own tokens, so none depends on another.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import socket
import ssl
import subprocess
import time
from datetime import UTC, datetime, timedelta
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.enroll import EnrollRefused, load_enrollment, poll, renew_if_due
from attestation.identity import DeviceIdentity, device_id_for
from attestation.keys import key_from_raw, raw_public_bytes
from fleet.ca import BACKDATE, FleetCA
from tests.controller import (
    BACKEND_PARAMS,
    FLEET_AGENT,
    Device,
    RunningController,
    controller_for,
    fleetctl,
    fresh_postgres_database,
    is_error_body,
    one_line_error,
    postgres_server_url,
    wait_for,
)

EXIT_REFUSED = 1  # fleetctl: the controller refused
EXIT_USAGE = 2
EXIT_UNAUTHORIZED = 5
AGENT_REFUSED = 3
AGENT_PENDING = 6


def cli_json(controller: RunningController, *args: str, **kwargs: Any) -> Any:
    return json.loads(controller.cli(*args, "-o", "json", **kwargs).stdout)


def make_token(controller: RunningController, *args: str) -> dict[str, Any]:
    token: dict[str, Any] = cli_json(controller, "tokens", "create", *args)
    return token


def enrolled(controller: RunningController, state_dir: Path, *args: str, **kw: Any) -> Any:
    """`fleet-agent enroll` that must succeed; its JSON."""
    result = controller.enroll(state_dir, *args, **kw)
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def device_of(controller: RunningController, state_dir: Path) -> Device:
    return Device(controller, DeviceIdentity.load_or_create(state_dir), state_dir)


def can_fetch(controller: RunningController, state_dir: Path) -> bool:
    status = device_of(controller, state_dir).get("/tuf/metadata/timestamp.json").status
    assert status in (200, 401), status
    return status == 200


def show(controller: RunningController, device_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = cli_json(controller, "devices", "show", device_id)
    return shown


def tokens(controller: RunningController) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in cli_json(controller, "tokens", "list")["tokens"]}


def serve_error(stderr: str) -> str:
    """`fleetctl serve`'s one `error:` line (its JSON log lines aside), and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def assert_certificate(controller: RunningController, state_dir: Path) -> x509.Certificate:
    """The device's mqtt/device.crt: issued by the fleet CA, for its key, CN = its id."""
    identity = DeviceIdentity.load_or_create(state_dir)
    ca_pem = (controller.fleet_dir / "keys" / "ca.crt").read_bytes()
    assert (state_dir / "mqtt" / "ca.crt").read_bytes() == ca_pem
    cert = x509.load_pem_x509_certificate((state_dir / "mqtt" / "device.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    assert cert.subject.rfc4514_string() == f"CN={identity.device_id}"
    public = cert.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert public == raw_public_bytes(identity.public_key)
    return cert


# Tokens.


def test_token_enrollment_end_to_end(controller: RunningController, tmp_path: Path) -> None:
    made = make_token(controller, "--uses", "2", "--ttl", "1h", "--label", "site=lab")
    assert made["token"].startswith("fleet_enroll_")
    assert (made["uses"], made["used"], made["state"], made["labels"]) == (
        2,
        0,
        "active",
        {"site": "lab"},
    )
    expires = datetime.fromisoformat(made["expires_at"])
    assert abs(expires - datetime.now(UTC) - timedelta(hours=1)) < timedelta(minutes=1)

    state_dir = tmp_path / "device"
    answer = enrolled(
        controller,
        state_dir,
        "--label",
        "site=home",
        "--label",
        "tier=canary",
        token=made["token"],
    )
    identity = DeviceIdentity.load_or_create(state_dir)
    assert answer["device_id"] == identity.device_id and answer["state"] == "enrolled"
    assert answer["labels"] == {"site": "lab", "tier": "canary"}  # the token's labels win
    assert answer["server"] == controller.url

    # What the device keeps.
    assert (state_dir / "identity.pem").stat().st_mode & 0o777 == 0o600
    assert (state_dir / "tuf" / "root.json").read_bytes() == controller.root_json.read_bytes()
    cert = assert_certificate(controller, state_dir)
    saved = load_enrollment(state_dir)
    assert saved is not None and saved.enrolled and saved.server == controller.url
    assert saved.cert_not_after == cert.not_valid_after_utc.timestamp()
    assert saved.cert_serial == format(cert.serial_number, "x")
    assert answer["cert_not_after"] == cert.not_valid_after_utc.isoformat()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(hours=24) + BACKDATE  # the default device_cert_lifetime

    # What the controller knows.
    shown = show(controller, identity.device_id)
    assert shown["state"] == "enrolled" and shown["labels"] == answer["labels"]
    assert shown["agent_version"] == dist_version("fleet-tinyml")
    assert shown["cert_serial"] == saved.cert_serial
    assert shown["enrollment_token_id"] == made["id"] and shown["enrolled_at"]
    assert set(shown["facts"]) >= {"agent_version", "platform", "python", "boot_id", "hostname"}
    assert shown["public_key"] == raw_public_bytes(identity.public_key).hex()
    listed = tokens(controller)[made["id"]]
    assert (listed["used"], listed["state"]) == (1, "active")
    text = json.dumps(cli_json(controller, "tokens", "list"))
    assert made["token"] not in text and "hash" not in text
    assert can_fetch(controller, state_dir)

    # Enrolling again (a provisioning script run at every boot) consumes nothing: a new
    # certificate for the same key.
    again = enrolled(controller, state_dir, token=made["token"])
    assert again["state"] == "enrolled"
    assert assert_certificate(controller, state_dir).serial_number != cert.serial_number
    assert tokens(controller)[made["id"]]["used"] == 1

    # The second use, then the token is exhausted: a third device is refused, and not created.
    enrolled(controller, tmp_path / "second", token=made["token"])
    assert tokens(controller)[made["id"]]["state"] == "exhausted"
    third = controller.enroll(tmp_path / "third", token=made["token"])
    assert third.returncode == AGENT_REFUSED, third
    assert one_line_error(third.stderr) == (
        f"error: enrollment refused: enrollment token {made['id']} has no uses left"
    )
    third_id = DeviceIdentity.load_or_create(tmp_path / "third").device_id
    missing = controller.cli("devices", "show", third_id, check=False)
    assert missing.returncode == EXIT_REFUSED
    assert one_line_error(missing.stderr) == f"error: no device {third_id}"
    assert not (tmp_path / "third" / "mqtt" / "device.crt").exists()
    assert not (tmp_path / "third" / "enrollment.json").exists()


def test_tokens_cli(controller: RunningController) -> None:
    made = make_token(controller, "--ttl", "30m")
    assert made["uses"] == 1 and made["labels"] == {}
    table = controller.cli("tokens", "list").stdout
    assert f"{made['id']}" in table and "active" in table and "0/1" in table
    assert made["token"] not in table

    revoked = cli_json(controller, "tokens", "revoke", str(made["id"]))
    assert revoked["state"] == "revoked" and revoked["revoked_at"]
    assert "revoked" in controller.cli("tokens", "revoke", str(made["id"])).stdout  # idempotent
    assert tokens(controller)[made["id"]]["state"] == "revoked"

    for args, code, message in (
        (("create", "--ttl", "soon"), EXIT_USAGE, "--ttl: 'soon' is not a duration"),
        (("create", "--uses", "0"), EXIT_USAGE, "--uses must be at least 1"),
        (("create", "--label", "nolabel"), EXIT_USAGE, "--label 'nolabel' is not k=v"),
        (("create", "--label", "bad key=x"), EXIT_REFUSED, "label key 'bad key'"),
        (("create", "--ttl", "400d"), EXIT_REFUSED, "ttl_s must be from 1 second to 365 days"),
        (("revoke", "999999"), EXIT_REFUSED, "no enrollment token 999999"),
    ):
        result = controller.cli("tokens", *args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert message in one_line_error(result.stderr), (args, result.stderr)

    status, viewer = controller.api(
        "POST", "/api/v1/tokens", json={"name": "enroll-viewer", "role": "viewer"}
    )
    assert status == 201
    for command in (["create"], ["list"], ["revoke", str(made["id"])]):
        result = controller.cli("tokens", *command, token=viewer["token"], check=False)
        assert result.returncode == EXIT_UNAUTHORIZED, (command, result.stderr)
        assert "needs the operator role" in one_line_error(result.stderr)


# Approval.


def test_a_device_without_a_token_waits_until_approved(
    controller: RunningController, tmp_path: Path
) -> None:
    state_dir = tmp_path / "device"
    result = controller.enroll(state_dir, "--label", "site=field")
    assert result.returncode == AGENT_PENDING, result
    answer = json.loads(result.stdout)
    device_id = answer["device_id"]
    assert answer["state"] == "pending" and answer["cert_not_after"] is None
    assert not (state_dir / "mqtt" / "device.crt").exists()
    assert (state_dir / "mqtt" / "ca.crt").exists()
    assert not can_fetch(controller, state_dir)
    text = controller.enroll(state_dir).stdout  # enrolling again: still pending
    assert json.loads(text)["state"] == "pending"

    pending = cli_json(controller, "devices", "list", "--state", "pending")["devices"]
    assert device_id in {d["id"] for d in pending}
    enrolled_ids = {
        d["id"] for d in cli_json(controller, "devices", "list", "--state", "enrolled")["devices"]
    }
    assert device_id not in enrolled_ids
    row = next(
        line for line in controller.cli("devices", "list").stdout.splitlines() if device_id in line
    )
    assert "pending" in row and "site=field" in row
    shown = show(controller, device_id)
    assert shown["cert_serial"] is None and shown["labels"] == {"site": "field"}

    # `--wait` polls (GET /api/v1/enroll) until an operator approves.
    waiting = subprocess.Popen(
        [
            *(FLEET_AGENT, "enroll", "--server", controller.url, "--root", controller.root_json),
            *("--state-dir", state_dir, "--wait", "60", "-o", "json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: show(controller, device_id)["last_seen_at"] != shown["last_seen_at"],
            timeout=30,
            message="the waiting agent enrolled again",
        )
        approved = cli_json(controller, "devices", "approve", device_id)
        assert approved["state"] == "enrolled" and approved["enrolled_at"]
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, stderr
    assert json.loads(stdout)["state"] == "enrolled"
    cert = assert_certificate(controller, state_dir)
    assert show(controller, device_id)["cert_serial"] == format(cert.serial_number, "x")
    assert can_fetch(controller, state_dir)
    # Approving twice changes nothing.
    assert cli_json(controller, "devices", "approve", device_id)["state"] == "enrolled"


def test_rejected_and_removed_devices_are_refused(
    controller: RunningController, tmp_path: Path
) -> None:
    made = make_token(controller, "--uses", "5")
    state_dir = tmp_path / "device"
    device_id = enrolled(controller, state_dir, token=made["token"])["device_id"]
    assert can_fetch(controller, state_dir)

    assert controller.cli("devices", "reject", device_id).stdout.strip() == (
        f"device {device_id} is rejected"
    )
    assert not can_fetch(controller, state_dir)  # the cached key is gone too
    again = controller.enroll(state_dir, token=made["token"])
    assert again.returncode == AGENT_REFUSED, again
    assert "was rejected by an operator" in one_line_error(again.stderr)
    assert tokens(controller)[made["id"]]["used"] == 1  # the token was not consumed
    with pytest.raises(EnrollRefused, match="rejected"):  # the controller will not renew
        renew_if_due(state_dir, time.time() + 10 * 86400)
    polled = poll(state_dir)  # what the daemon calls: the state, and no certificate kept
    assert polled.state == "rejected" and polled.cert_not_after is None
    assert not (state_dir / "mqtt" / "device.crt").exists()
    assert renew_if_due(state_dir, time.time() + 10 * 86400) is False  # nothing to renew

    # An operator may change their mind.
    controller.cli("devices", "approve", device_id)
    assert can_fetch(controller, state_dir)
    assert poll(state_dir).state == "enrolled"
    assert_certificate(controller, state_dir)

    # A pending device can be rejected too; a token does not get it in.
    pending_dir = tmp_path / "pending"
    pending_id = json.loads(controller.enroll(pending_dir).stdout)["device_id"]
    controller.cli("devices", "reject", pending_id)
    refused = controller.enroll(pending_dir, token=made["token"])
    assert refused.returncode == AGENT_REFUSED, refused
    assert tokens(controller)[made["id"]]["used"] == 1

    # Removing forgets the device: no downloads, and enrolling again starts over as pending.
    removed = cli_json(controller, "devices", "remove", device_id)
    assert removed == {"id": device_id, "removed": True}
    assert not can_fetch(controller, state_dir)
    with pytest.raises(EnrollRefused, match="not a device of this fleet"):
        poll(state_dir)
    gone = controller.cli("devices", "remove", device_id, check=False)
    assert gone.returncode == EXIT_REFUSED and "no device" in one_line_error(gone.stderr)
    anew = controller.enroll(state_dir)
    assert anew.returncode == AGENT_PENDING, anew
    assert show(controller, device_id)["state"] == "pending"


# Labels and listing.


def test_labels_and_filters(controller: RunningController, tmp_path: Path) -> None:
    device = controller.device(tmp_path / "registered")  # the registered-by-key path still works
    other = controller.device(tmp_path / "other")
    assert show(controller, device.id)["state"] == "enrolled"

    labelled = cli_json(controller, "devices", "label", device.id, "ring=canary", "room=b12")
    assert labelled["labels"] == {"ring": "canary", "room": "b12"}
    text = controller.cli("devices", "label", device.id, "room-", "zone=eu").stdout
    assert text.strip() == f"device {device.id} labels: ring=canary,zone=eu"
    controller.cli("devices", "label", other.id, "ring=stable", "zone=eu")

    def ids(*args: str) -> set[str]:
        return {d["id"] for d in cli_json(controller, "devices", "list", *args)["devices"]}

    assert device.id in ids("--label", "ring=canary") and other.id not in ids(
        "--label", "ring=canary"
    )
    assert {device.id, other.id} <= ids("--label", "zone=eu", "--state", "enrolled")
    assert ids("--label", "zone=eu", "--label", "ring=stable") & {device.id, other.id} == {other.id}
    assert ids("--label", "ring=nothing") & {device.id, other.id} == set()

    status, body = controller.api(
        "GET", "/api/v1/devices", params={"label": "ring=canary", "state": "enrolled"}
    )
    assert status == 200 and {d["id"] for d in body["devices"]} & {device.id, other.id} == {
        device.id
    }
    for params in ({"state": "sleeping"}, {"label": "nolabel"}):
        status, body = controller.api("GET", "/api/v1/devices", params=params)
        assert status == 400 and is_error_body(body), (params, body)

    for args, code, message in (
        (("label", device.id, "nolabel"), EXIT_USAGE, "neither k=v (set) nor k- (remove)"),
        (("label", device.id, "bad key=x"), EXIT_REFUSED, "label key 'bad key'"),
        (("label", device.id, "k=bad value"), EXIT_REFUSED, "the value must be"),
        (("label", "dnosuchdevice", "a=b"), EXIT_REFUSED, "no device dnosuchdevice"),
        (("approve", "dnosuchdevice"), EXIT_REFUSED, "no device dnosuchdevice"),
        (("show", "../../etc"), EXIT_REFUSED, "no device"),
        (("list", "--state", "sleeping"), EXIT_REFUSED, "state must be one of"),
        (("list", "--label", "nolabel"), EXIT_USAGE, "--label 'nolabel' is not k=v"),
    ):
        result = controller.cli("devices", *args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert message in one_line_error(result.stderr), (args, result.stderr)

    # Viewers see devices; changing them needs an operator.
    status, viewer = controller.api(
        "POST", "/api/v1/tokens", json={"name": "devices-viewer", "role": "viewer"}
    )
    assert status == 201
    assert controller.cli("devices", "list", token=viewer["token"]).returncode == 0
    assert controller.cli("devices", "show", device.id, token=viewer["token"]).returncode == 0
    for args in (("approve", device.id), ("reject", device.id), ("label", device.id, "a=b")):
        result = controller.cli("devices", *args, token=viewer["token"], check=False)
        assert result.returncode == EXIT_UNAUTHORIZED, (args, result.stderr)
    assert show(controller, device.id)["state"] == "enrolled"


# Certificates.


def test_renewal_before_expiry(controller: RunningController, tmp_path: Path) -> None:
    made = make_token(controller)
    state_dir = tmp_path / "device"
    enrolled(controller, state_dir, token=made["token"])
    first = load_enrollment(state_dir)
    assert first is not None and first.cert_not_after and first.cert_not_before
    lifetime = first.cert_not_after - first.cert_not_before
    due_at = first.cert_not_after - lifetime / 3

    assert renew_if_due(state_dir, time.time()) is False
    assert renew_if_due(state_dir, due_at - 60) is False
    assert load_enrollment(state_dir) == first

    assert renew_if_due(state_dir, due_at + 60) is True
    renewed = load_enrollment(state_dir)
    assert renewed is not None and renewed.cert_serial != first.cert_serial
    assert renewed.cert_not_after is not None and renewed.cert_not_after >= first.cert_not_after
    cert = assert_certificate(controller, state_dir)
    assert format(cert.serial_number, "x") == renewed.cert_serial
    assert show(controller, renewed.device_id)["cert_serial"] == renewed.cert_serial

    # The daemon may call it as often as it likes: a fresh certificate is not renewed again.
    assert renew_if_due(state_dir, time.time()) is False


def test_api_shapes_for_a_device(controller: RunningController, tmp_path: Path) -> None:
    made = make_token(controller)
    state_dir = tmp_path / "device"
    enrolled(controller, state_dir, token=made["token"])
    device = device_of(controller, state_dir)
    response = device.get("/api/v1/enroll")
    assert response.status == 200
    body = json.loads(response.data)
    assert set(body) == {
        "device_id",
        "state",
        "labels",
        "certificate",
        "cert_serial",
        "cert_not_after",
        "ca_certificate",
        "broker_url",
        "poll_after_s",
    }
    assert body["device_id"] == device.id and body["state"] == "enrolled"
    assert body["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert body["poll_after_s"] is None

    status, document = controller.api("GET", "/api/v1/openapi.json", token=None)
    assert status == 200
    for method, path in (("post", "/api/v1/enroll"), ("get", "/api/v1/enroll")):
        operation = document["paths"][path][method]
        assert operation["x-fleet-role"] == "device"
        assert operation["security"] == [{"device": []}]
    assert document["components"]["securitySchemes"]["device"]["name"] == "Fleet-Signature"
    assert document["paths"]["/api/v1/enrollment-tokens"]["post"]["x-fleet-role"] == "operator"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_cert_lifetime_from_config_and_a_ca_made_at_start(backend: str, tmp_path: Path) -> None:
    with controller_for(backend, tmp_path, config={"device_cert_lifetime": "2h"}) as controller:
        made = make_token(controller, "--uses", "2")
        enrolled(controller, tmp_path / "a", token=made["token"])
        cert = assert_certificate(controller, tmp_path / "a")
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(hours=2) + BACKDATE

        # A fleet made before the CA existed gets one when the controller starts.
        controller.stop()
        old_ca = (controller.fleet_dir / "keys" / "ca.crt").read_bytes()
        for name in ("ca.pem", "ca.crt"):
            (controller.fleet_dir / "keys" / name).unlink()
        controller.start()
        new_ca = (controller.fleet_dir / "keys" / "ca.crt").read_bytes()
        assert new_ca != old_ca
        assert (controller.fleet_dir / "keys" / "ca.pem").stat().st_mode & 0o777 == 0o600
        enrolled(controller, tmp_path / "b", token=made["token"])
        assert_certificate(controller, tmp_path / "b")

        # An unusable CA key, or a bad setting, stops the controller with one line naming it.
        controller.stop()
        serve = ("serve", "--dir", controller.fleet_dir, "--listen", "127.0.0.1:0")
        db = ("--db-url", controller.db_url) if controller.db_url else ()
        ca_key = controller.fleet_dir / "keys" / "ca.pem"
        key_bytes = ca_key.read_bytes()
        ca_key.write_bytes(b"garbage")
        result = fleetctl(*serve, *db)
        assert result.returncode == 3
        assert f"{ca_key} is not an unencrypted PEM private key" in serve_error(result.stderr)
        ca_key.write_bytes(key_bytes)
        config = controller.fleet_dir / "fleet.yaml"
        config.write_text(config.read_text() + "device_cert_lifetime: forever\n")
        result = fleetctl(*serve, *db)
        assert result.returncode == 3
        assert "device_cert_lifetime" in serve_error(result.stderr)


# The schema.


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_migration_adds_the_new_columns_to_existing_devices(backend: str, tmp_path: Path) -> None:
    from tortoise import Tortoise, connections
    from tortoise.migrations.api import migrate

    from fleet.db import close_database, open_database, tortoise_config
    from fleet.db.models import Command, Device, EnrollmentToken

    async def run(url: str) -> Device:
        await migrate(config=tortoise_config(url), target="fleet.0001_initial")
        await connections.get("default").execute_query(
            "INSERT INTO device (id, public_key, state, labels, created_at) "
            "VALUES ('dold', 'ab', 'enrolled', '{\"site\":\"lab\"}', '2025-01-01 00:00:00+00:00')"
        )
        await Tortoise.close_connections()
        await open_database(url)
        try:
            device = await Device.get(id="dold")
            assert await Command.all().count() == 0
            assert await EnrollmentToken.all().count() == 0
            return device
        finally:
            await close_database()

    if backend == "postgres":
        with fresh_postgres_database(postgres_server_url()) as url:
            device = asyncio.run(run(url))
    else:
        device = asyncio.run(run(f"sqlite://{tmp_path / 'old.sqlite3'}"))
    assert device.labels == {"site": "lab"} and device.state == "enrolled"
    assert (device.facts, device.online, device.command_seq) == ({}, False, 0)
    assert (device.status_seq, device.presence_seq) == (0, 0) and device.last_hello is None
    assert device.cert_serial is None and device.agent_version is None


# The broker.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _mqtt_connect(port: int, context: ssl.SSLContext, client_id: str) -> bytes:
    """A raw MQTT 3.1.1 CONNECT over TLS; the CONNACK bytes."""
    payload = len(client_id).to_bytes(2, "big") + client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x1e"
    packet = bytes([0x10, len(variable) + len(payload)]) + variable + payload
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(packet)
        return tls.recv(4)


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs the mosquitto binary")
def test_mosquitto_accepts_fleet_ca_certificates(
    controller: RunningController, tmp_path: Path
) -> None:
    made = make_token(controller)
    state_dir = tmp_path / "device"
    device_id = enrolled(controller, state_dir, token=made["token"])["device_id"]
    ca = FleetCA.load_or_create(controller.fleet_dir / "keys", "unused")
    server_key = Ed25519PrivateKey.generate()
    server = ca.issue_server(
        ["127.0.0.1"], server_key.public_key(), datetime.now(UTC), timedelta(hours=1)
    )
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    (broker_dir / "server.crt").write_bytes(server.pem)
    (broker_dir / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    port = _free_port()
    (broker_dir / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {controller.fleet_dir / 'keys' / 'ca.crt'}\n"
        f"certfile {broker_dir / 'server.crt'}\nkeyfile {broker_dir / 'server.key'}\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
        "tls_version tlsv1.2\n"
        f"user {getpass.getuser()}\n"  # root would switch to a user who cannot read these files
    )
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(broker_dir / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        device_tls = ssl.create_default_context(cafile=str(state_dir / "mqtt" / "ca.crt"))
        device_tls.load_cert_chain(state_dir / "mqtt" / "device.crt", state_dir / "identity.pem")

        def connack() -> bytes | None:
            if broker.poll() is not None:
                raise AssertionError(f"mosquitto exited: {broker.communicate()[1]!r}")
            try:
                return _mqtt_connect(port, device_tls, device_id)
            except ConnectionRefusedError:
                return None

        assert wait_for(connack, timeout=15, message="mosquitto is up") == b"\x20\x02\x00\x00"

        # A certificate from another CA is refused in the handshake.
        stranger_dir = tmp_path / "stranger"
        stranger_ca = FleetCA.load_or_create(stranger_dir, "stranger")
        stranger_key = Ed25519PrivateKey.generate()
        stranger_id = device_id_for(key_from_raw(stranger_key.public_key().public_bytes_raw()))
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stranger_id)]))
            .sign(stranger_key, None)
            .public_bytes(serialization.Encoding.PEM)
        )
        issued = stranger_ca.issue_device(csr, stranger_id, datetime.now(UTC), timedelta(hours=1))
        (stranger_dir / "device.crt").write_bytes(issued.pem)
        (stranger_dir / "device.key").write_bytes(
            stranger_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        stranger_tls = ssl.create_default_context(cafile=str(state_dir / "mqtt" / "ca.crt"))
        stranger_tls.load_cert_chain(stranger_dir / "device.crt", stranger_dir / "device.key")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            _mqtt_connect(port, stranger_tls, stranger_id)
    finally:
        broker.terminate()
        broker.wait(10)
