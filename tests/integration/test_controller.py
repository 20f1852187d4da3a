"""The controller over HTTP: health, OpenAPI, API tokens and roles, rune admission, the signed
TUF repository and its renewal. Real `fleetctl serve` processes on SQLite and PostgreSQL, real
signatures, a real TUF client; nothing is mocked.

Tests share one controller per backend (the `controller` fixture): each uses its own rune names
and compares metadata versions before and after rather than absolute numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from tuf.api.metadata import Metadata, Timestamp

from fleet.controller import Controller
from fleet.fleetdir import FleetConfig
from fleet.metrics import Metrics
from ota.request_auth import sign_request
from tests.controller import (
    BACKEND_PARAMS,
    Device,
    RunningController,
    build_example,
    controller_for,
    is_error_body,
    write_legacy_rune,
)

REFUSED = "fleet_device_requests_refused_total"


@pytest.fixture(scope="module")
def device(controller: RunningController, tmp_path_factory: pytest.TempPathFactory) -> Device:
    """A registered device of the module's controller."""
    return controller.device(tmp_path_factory.mktemp("device"))


def blob_files(controller: RunningController) -> set[Path]:
    return {p for p in (controller.fleet_dir / "blobs").rglob("*") if p.is_file()}


def versions(controller: RunningController) -> dict[str, int]:
    status, body = controller.api("GET", "/api/v1/keys")
    assert status == 200, body
    return {role: info["version"] for role, info in body["roles"].items()}


def make_token(controller: RunningController, name: str, role: str) -> tuple[int, str]:
    status, body = controller.api("POST", "/api/v1/tokens", json={"name": name, "role": role})
    assert status == 201, body
    assert body["role"] == role and body["token"].startswith("fleet_")
    return body["id"], body["token"]


# Health, metrics, OpenAPI.


def test_health_and_metrics_need_no_token(controller: RunningController, device: Device) -> None:
    health = controller.request("GET", "/healthz")
    assert health.status == 200
    body = json.loads(health.data)
    assert body["status"] == "ok"
    assert body["checks"] == {"database": "ok", "timestamp": "ok"}
    assert body["version"]

    timestamp, snapshot, targets = device.newest()
    samples = controller.metrics()
    gauge = "fleet_tuf_metadata_version"
    assert samples[(gauge, (("role", "root"),))] >= 1
    assert samples[(gauge, (("role", "timestamp"),))] == timestamp.signed.version
    assert samples[(gauge, (("role", "snapshot"),))] == snapshot.signed.version
    assert samples[(gauge, (("role", "targets"),))] == targets.signed.version
    expiry = samples[("fleet_tuf_metadata_expiry_timestamp_seconds", (("role", "timestamp"),))]
    assert expiry == timestamp.signed.expires.timestamp()


def test_openapi_lists_every_api_route_the_app_serves(controller: RunningController) -> None:
    from fleet.api.app import OPENAPI_PATH, make_app
    from fleet.api.routes import API

    status, document = controller.api("GET", OPENAPI_PATH, token=None)
    assert status == 200
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] and document["info"]["version"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    documented = {
        (path, method.upper())
        for path, operations in document["paths"].items()
        for method in operations
    }
    for path, operations in document["paths"].items():
        assert path.startswith("/api/v1/")
        for operation in operations.values():
            assert operation["summary"]
            assert operation["x-fleet-role"] in ("viewer", "operator", "admin", "device")
            assert "200" in operation["responses"]
            for name in (p[1:-1] for p in path.split("/") if p.startswith("{")):
                assert {"name": name, "in": "path"}.items() <= next(
                    p for p in operation["parameters"] if p["name"] == name
                ).items()

    registered = {(r.path, r.method) for r in API.routes}
    assert documented == registered

    # Each documented operation is served, and only with a token.
    for path, method in sorted(documented):
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        status, body = controller.api(method, concrete, token=None)
        assert status == 401 and is_error_body(body), (method, path, status, body)

    # What the app actually routes under /api/v1, besides the document itself and the 404 catch-all.
    ctl = cast(Controller, SimpleNamespace(config=FleetConfig(), metrics=Metrics()))
    served = {
        (route.resource.canonical, route.method)
        for route in make_app(ctl).router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/v1/")
        and route.resource.canonical not in (OPENAPI_PATH, "/api/v1/{tail}")
        and route.method != "HEAD"
    }
    assert served == documented


def test_errors_outside_the_api_are_json_too(controller: RunningController, device: Device) -> None:
    for method, path, status in (
        ("GET", "/no/such/page", 404),
        ("PUT", "/healthz", 405),
        ("GET", "/tuf/nothing", 404),
    ):
        response = controller.request(method, path)
        assert response.status == status, (method, path)
        assert response.headers["Content-Type"].startswith("application/json")
        assert is_error_body(json.loads(response.data)), response.data
    assert controller.request("POST", "/metrics").headers["Allow"] == "GET,HEAD"
    missing = device.get("/tuf/metadata/99999.root.json")
    assert missing.status == 404 and is_error_body(json.loads(missing.data))


# API tokens and roles.


def test_tokens_and_roles(controller: RunningController, tmp_path: Path) -> None:
    legacy = write_legacy_rune(tmp_path, "roles.rune").read_bytes()
    push_params = {"org": "acme", "name": "roles", "version": "1.0.0"}
    refused_before = {
        reason: controller.metric("fleet_api_auth_refused_total", reason=reason)
        for reason in ("missing", "unknown", "role")
    }

    for token in (None, "fleet_not-a-token", ""):
        status, body = controller.api("GET", "/api/v1/runes", token=token)
        assert status == 401 and is_error_body(body), (token, body)
    response = controller.request(
        "GET", "/api/v1/runes", headers={"Authorization": f"Basic {controller.token}"}
    )
    assert response.status == 401 and is_error_body(json.loads(response.data))

    viewer_id, viewer = make_token(controller, "roles-viewer", "viewer")
    _, operator = make_token(controller, "roles-operator", "operator")

    assert controller.api("GET", "/api/v1/runes", token=viewer)[0] == 200
    assert controller.api("GET", "/api/v1/keys", token=viewer)[0] == 200
    status, body = controller.api(
        "POST", "/api/v1/runes", body=legacy, params=push_params, token=viewer
    )
    assert status == 403 and is_error_body(body)
    assert "operator" in body["error"]
    assert controller.api("GET", "/api/v1/runes/acme/roles/1.0.0")[0] == 404  # nothing stored

    status, body = controller.api(
        "POST", "/api/v1/runes", body=legacy, params=push_params, token=operator
    )
    assert status == 201, body
    assert body["pushed_by"] == "roles-operator"
    for method, path, payload in (
        ("POST", "/api/v1/tokens", {"name": "x", "role": "admin"}),
        ("GET", "/api/v1/tokens", None),
        ("POST", "/api/v1/devices", {"public_key": "00" * 32}),
        ("POST", "/api/v1/keys/rotations", {"role": "command"}),
    ):
        status, body = controller.api(method, path, json=payload, token=operator)
        assert status == 403 and is_error_body(body), (method, path, body)
    status, body = controller.api("DELETE", "/api/v1/runes/acme/roles/1.0.0", token=operator)
    assert status == 200 and body["state"] == "revoked" and body["revoked_by"] == "roles-operator"

    status, listed = controller.api("GET", "/api/v1/tokens")
    assert status == 200
    names = {t["name"]: t for t in listed["tokens"]}
    assert {"admin", "roles-viewer", "roles-operator"} <= set(names)
    assert all(set(t) == set(names["admin"]) for t in listed["tokens"])
    assert "token" not in names["admin"] and "token_hash" not in names["admin"]
    text = json.dumps(listed)
    for secret in (controller.token, viewer, operator):
        assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() not in text

    status, body = controller.api("DELETE", f"/api/v1/tokens/{viewer_id}")
    assert status == 200 and body["revoked"] is True
    status, body = controller.api("GET", "/api/v1/runes", token=viewer)
    assert status == 401 and is_error_body(body)
    assert controller.api("DELETE", "/api/v1/tokens/999999")[0] == 404

    for bad in ({"role": "viewer"}, {"name": "x", "role": "root"}, [1], {"name": ""}):
        status, body = controller.api("POST", "/api/v1/tokens", json=bad)
        assert status == 400 and is_error_body(body), (bad, body)
    status, body = controller.api("POST", "/api/v1/tokens", body=b"{not json")
    assert status == 400 and is_error_body(body)
    status, body = controller.api("GET", "/api/v1/no/such/thing")
    assert status == 404 and is_error_body(body)

    after = {
        reason: controller.metric("fleet_api_auth_refused_total", reason=reason)
        for reason in refused_before
    }
    assert after["missing"] >= refused_before["missing"] + 3  # no header, "", Basic
    assert after["unknown"] >= refused_before["unknown"] + 2  # unknown, revoked
    assert after["role"] >= refused_before["role"] + 5


# Runes.


def test_push_bundles_and_legacy_runes(
    controller: RunningController, device: Device, examples_dir: Path, tmp_path: Path
) -> None:
    sine = build_example(examples_dir, "sine", "1.0.0", tmp_path)
    gesture = build_example(examples_dir, "gesture", "0.3.0", tmp_path)
    legacy = write_legacy_rune(tmp_path, "blink.rune")

    pushed = controller.push(sine)
    assert pushed["created"] is True
    assert pushed["target"] == "runes/acme/sine/1.0.0"
    assert (pushed["kind"], pushed["capabilities"]) == ("bundle", ["RAND"])
    assert pushed["ref"] == "sine@1.0.0"
    assert pushed["sha256"] == hashlib.sha256(sine.read_bytes()).hexdigest()
    assert pushed["size"] == sine.stat().st_size and pushed["state"] == "published"
    assert controller.push(gesture)["capabilities"] == ["ACCEL"]

    status, body = controller.api(
        "POST", "/api/v1/runes", body=legacy.read_bytes(), params={"org": "acme"}
    )
    assert status == 400 and is_error_body(body)
    assert "--name" in body["error"] and "--version" in body["error"]
    made = controller.push(legacy, name="blink", version="2.0.0", min_agent_version="0.2.0")
    assert (made["kind"], made["capabilities"], made["min_agent_version"]) == (
        "legacy",
        ["RAND"],
        "0.2.0",
    )
    status, body = controller.api(
        "POST",
        "/api/v1/runes",
        body=sine.read_bytes(),
        params={"org": "acme", "name": "cosine"},
    )
    assert status == 400 and "'sine', not 'cosine'" in body["error"]

    status, listed = controller.api("GET", "/api/v1/runes", params={"org": "acme"})
    assert status == 200
    refs = {r["ref"] for r in listed["runes"]}
    assert {"sine@1.0.0", "gesture@0.3.0", "blink@2.0.0"} <= refs
    status, shown = controller.api("GET", "/api/v1/runes/acme/gesture/0.3.0")
    assert status == 200
    assert [c["kind"] for c in shown["description"]["capabilities"]] == ["ACCEL"]
    assert shown["description"]["models"][0]["mimetype"] == "application/onnx-model"

    # A device's TUF client sees each one, with the contract the agent checks, and gets the bytes.
    updater = device.updater("push")
    for rune_file, path, kind in (
        (sine, "runes/acme/sine/1.0.0", "bundle"),
        (legacy, "runes/acme/blink/2.0.0", "legacy"),
    ):
        info = updater.get_targetinfo(path)
        assert info is not None, path
        assert info.hashes["sha256"] == hashlib.sha256(rune_file.read_bytes()).hexdigest()
        assert info.custom["fleet"]["kind"] == kind
        downloaded = updater.download_target(info)
        assert Path(downloaded).read_bytes() == rune_file.read_bytes()


def test_versions_are_immutable(
    controller: RunningController, device: Device, tmp_path: Path
) -> None:
    first = write_legacy_rune(tmp_path, "fixed-1.rune", nbytes=4)
    other = write_legacy_rune(tmp_path, "fixed-2.rune", nbytes=8)
    published = controller.push(first, name="fixed", version="1.0.0")
    before = versions(controller)

    again = controller.api(
        "POST",
        "/api/v1/runes",
        body=first.read_bytes(),
        params={"org": "acme", "name": "fixed", "version": "1.0.0"},
    )
    assert again[0] == 200 and again[1]["created"] is False
    assert again[1]["sha256"] == published["sha256"]
    status, body = controller.api(
        "POST",
        "/api/v1/runes",
        body=other.read_bytes(),
        params={"org": "acme", "name": "fixed", "version": "1.0.0"},
    )
    assert status == 409 and is_error_body(body) and "different bytes" in body["error"]

    assert versions(controller) == before
    _, _, targets = device.newest()
    assert targets.signed.targets["runes/acme/fixed/1.0.0"].hashes["sha256"] == published["sha256"]
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    assert device.get(device.target_path("runes/acme/fixed/1.0.0", other_sha)).status == 404

    # The same bytes under another org or version are separate targets.
    assert controller.push(first, org="beta", name="fixed", version="1.0.0")["created"] is True


def _bundle_zip_without_manifest(bundle: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bundle)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            if "manifest" not in item.filename.lower():
                dst.writestr(item, src.read(item))
    return out.getvalue()


def test_malformed_runes_are_refused_and_nothing_is_stored(
    controller: RunningController, examples_dir: Path, tmp_path: Path
) -> None:
    bundle = build_example(examples_dir, "sine", "9.9.9", tmp_path, name="broken").read_bytes()
    plain_zip = io.BytesIO()
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("hello.txt", "not a rune")
    blobs = blob_files(controller)
    before = versions(controller)

    for what, data in (
        ("random bytes", os.urandom(4096)),
        ("a truncated bundle", bundle[: len(bundle) // 2]),
        ("a zip that is not a bundle", plain_zip.getvalue()),
        ("a bundle without its manifest", _bundle_zip_without_manifest(bundle)),
        ("a truncated wasm module", b"\0asm\x01\0\0\0\x01\x05"),
    ):
        status, body = controller.api(
            "POST",
            "/api/v1/runes",
            body=data,
            params={"org": "acme", "name": "broken", "version": "1.0.0"},
        )
        assert status == 422, (what, status, body)
        assert is_error_body(body) and body["error"].startswith("not a valid rune: "), body
        assert len(body["error"]) > len("not a valid rune: ") + 5, (what, body)

    status, body = controller.api("POST", "/api/v1/runes", body=b"", params={"org": "acme"})
    assert status == 400 and is_error_body(body)
    assert blob_files(controller) == blobs
    assert versions(controller) == before
    status, listed = controller.api("GET", "/api/v1/runes", params={"name": "broken"})
    assert listed["runes"] == []


@pytest.mark.parametrize(
    ("org", "name", "version"),
    [
        ("acme", "Sine", "1.0.0"),
        ("acme", "a..b", "1.0.0"),
        ("acme", "..", "1.0.0"),
        ("../etc", "sine", "1.0.0"),
        ("acme", "sine", "1/0"),
        ("acme", "sine", ""),
        ("ACME", "sine", "1.0.0"),
    ],
)
def test_names_that_cannot_be_target_paths_are_refused(
    controller: RunningController, tmp_path: Path, org: str, name: str, version: str
) -> None:
    legacy = write_legacy_rune(tmp_path, "named.rune", nbytes=12)
    before = versions(controller)
    status, body = controller.api(
        "POST",
        "/api/v1/runes",
        body=legacy.read_bytes(),
        params={"org": org, "name": name, "version": version},
    )
    assert status == 400 and is_error_body(body), body
    assert versions(controller) == before


def test_revoke_unpublishes_the_target(
    controller: RunningController, device: Device, tmp_path: Path
) -> None:
    rune = write_legacy_rune(tmp_path, "gone.rune", nbytes=16)
    pushed = controller.push(rune, name="gone", version="1.0.0")
    target = "runes/acme/gone/1.0.0"
    blob_url = device.target_path(target, pushed["sha256"])
    updater = device.updater("revoke")
    assert updater.get_targetinfo(target) is not None
    assert device.get(blob_url).status == 200
    before = versions(controller)

    status, body = controller.api("DELETE", "/api/v1/runes/acme/gone/1.0.0")
    assert status == 200 and body["state"] == "revoked" and body["revoked_at"]
    after = versions(controller)
    assert after["targets"] == before["targets"] + 1
    assert after["timestamp"] > before["timestamp"]

    _, _, targets = device.newest()
    assert targets.signed.version == after["targets"]
    assert target not in targets.signed.targets
    assert device.updater("revoke").get_targetinfo(target) is None  # the same client, refreshed
    assert device.get(blob_url).status == 404

    status, listed = controller.api("GET", "/api/v1/runes", params={"name": "gone"})
    assert [r["state"] for r in listed["runes"]] == ["revoked"]
    status, body = controller.api("DELETE", "/api/v1/runes/acme/gone/1.0.0")
    assert status == 409 and is_error_body(body)
    status, body = controller.api(
        "POST",
        "/api/v1/runes",
        body=rune.read_bytes(),
        params={"org": "acme", "name": "gone", "version": "1.0.0"},
    )
    assert status == 409 and "revoked" in body["error"]
    status, body = controller.api("DELETE", "/api/v1/runes/acme/never/1.0.0")
    assert status == 404 and is_error_body(body)
    assert versions(controller) == after


def test_concurrent_changes_are_answered_one_by_one(
    controller: RunningController, device: Device, tmp_path: Path
) -> None:
    """Pushes of one version, revocations, key rotations and renewals at once: no 5xx, no hang.

    (Regression: a push held its database transaction while waiting for the repository lock,
    a command-key rotation held that lock while waiting for the database: SQLite deadlocked.)
    """
    contenders = [write_legacy_rune(tmp_path, f"c{i}.rune", nbytes=40 + i) for i in range(4)]
    victim = write_legacy_rune(tmp_path, "victim.rune", nbytes=60)
    controller.push(victim, name="victim", version="1.0.0")

    def push(rune: Path, name: str) -> tuple[int, Any]:
        params = {"org": "acme", "name": name, "version": "1.0.0"}
        return controller.api(
            "POST", "/api/v1/runes", body=rune.read_bytes(), params=params, timeout=20
        )

    def call(method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        return controller.api(method, path, json=payload, timeout=20)

    with ThreadPoolExecutor(max_workers=10) as pool:
        pushes = [pool.submit(push, rune, "contended") for rune in contenders]
        others = [pool.submit(push, rune, f"side-{i}") for i, rune in enumerate(contenders[:2])]
        rotations = [
            pool.submit(call, "POST", "/api/v1/keys/rotations", {"role": "command"})
            for _ in range(2)
        ]
        revokes = [pool.submit(call, "DELETE", "/api/v1/runes/acme/victim/1.0.0") for _ in range(2)]
    pushed = [f.result() for f in pushes]
    assert sorted(status for status, _ in pushed) == [201, 409, 409, 409], pushed
    assert all(is_error_body(body) for status, body in pushed if status == 409)
    assert [f.result()[0] for f in others] == [201, 201]
    assert [f.result()[0] for f in rotations] == [201, 201]
    assert sorted(f.result()[0] for f in revokes) == [200, 409]

    winner = next(body for status, body in pushed if status == 201)
    updater = device.updater("concurrent")
    info = updater.get_targetinfo("runes/acme/contended/1.0.0")
    assert info is not None and info.hashes["sha256"] == winner["sha256"]
    assert updater.get_targetinfo("runes/acme/victim/1.0.0") is None
    assert controller.request("GET", "/healthz", timeout=5).status == 200


# The TUF endpoints.


def test_tuf_requests_must_be_signed_by_a_registered_device(
    controller: RunningController, device: Device, tmp_path: Path
) -> None:
    from attestation.identity import DeviceIdentity

    path = "/tuf/metadata/timestamp.json"
    stranger = DeviceIdentity.load_or_create(tmp_path / "stranger")
    now = time.time()
    attempts = {
        "unsigned": {},
        "unknown-device": sign_request(stranger.signer, stranger.device_id, "GET", path, now),
        # The device's id with another key's signature; a signature made for another path.
        "bad-signature": sign_request(stranger.signer, device.id, "GET", path, now),
        "clock": sign_request(device.identity.signer, device.id, "GET", path, now - 3600),
    }
    for reason, headers in attempts.items():
        before = controller.metric(REFUSED, reason=reason)
        response = controller.request("GET", path, headers=headers)
        assert response.status == 401, reason
        assert is_error_body(json.loads(response.data))
        assert controller.metric(REFUSED, reason=reason) == before + 1, reason

    signer = device.identity.signer
    other_path = sign_request(signer, device.id, "GET", "/tuf/metadata/1.root.json", now)
    before = controller.metric(REFUSED, reason="bad-signature")
    assert controller.request("GET", path, headers=other_path).status == 401
    assert controller.metric(REFUSED, reason="bad-signature") == before + 1

    response = device.get(path)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    timestamp = Metadata[Timestamp].from_bytes(response.data)
    assert not timestamp.signed.is_expired(datetime.now(UTC))
    assert device.get("/tuf/metadata/1.root.json").status == 200
    assert device.get("/tuf/metadata/nothing.json").status == 404


def test_targets_are_served_by_hash_with_ranges(
    controller: RunningController, device: Device, examples_dir: Path, tmp_path: Path
) -> None:
    bundle = build_example(examples_dir, "gesture", "1.1.0", tmp_path, name="ranged")
    data = bundle.read_bytes()
    pushed = controller.push(bundle)
    target = pushed["target"]
    url = device.target_path(target, pushed["sha256"])

    whole = device.get(url)
    assert whole.status == 200 and whole.data == data
    ranged = device.get(url, headers={"Range": "bytes=10-"})
    assert ranged.status == 206
    assert ranged.data == data[10:]
    assert ranged.headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"

    assert controller.request("GET", url).status == 401
    wrong = hashlib.sha256(b"something else").hexdigest()
    for bad in (
        device.target_path(target, wrong),
        device.target_path(target, "0" * 63),
        f"/tuf/targets/runes/acme/ranged/{pushed['sha256']}",  # no basename
        f"/tuf/targets/runes/acme/other/{pushed['sha256']}.1.1.0",  # another target's name
        f"/tuf/targets/runes/acme/ranged/{pushed['sha256']}.1.1.0/../../../../../fleet.yaml",
    ):
        response = device.get(bad)
        assert response.status == 404, bad
        assert is_error_body(json.loads(response.data)), response.data


# Lifecycle.


def test_sigterm_is_a_graceful_exit(controller: RunningController) -> None:
    assert controller.stop() == 0
    events = [json.loads(line)["event"] for line in controller.stderr.splitlines() if line]
    assert events[-2:] == ["controller.stopping", "controller.stopped"]
    controller.start()
    assert controller.request("GET", "/healthz").status == 200


# Metadata renewal.


@pytest.fixture(params=BACKEND_PARAMS)
def short_lived(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningController]:
    """A controller whose timestamp lives 3.6 s, snapshot 7.2 s and targets 36 s."""
    lifetimes = {"root": 24.0, "targets": 0.01, "snapshot": 0.002, "timestamp": 0.001}
    with controller_for(request.param, tmp_path, config={"lifetimes_hours": lifetimes}) as running:
        yield running


def test_short_lived_metadata_is_renewed_before_it_expires(
    short_lived: RunningController, tmp_path: Path
) -> None:
    device = short_lived.device(tmp_path / "device")
    # A push re-signs targets, snapshot and timestamp between the renewal task's wake-ups.
    short_lived.push(write_legacy_rune(tmp_path, "tick.rune"), name="tick", version="1")
    # Watch for longer than a timestamp lives (3.6 s) and until it was renewed twice and the
    # snapshot once: every fetch must be valid.
    seen: list[tuple[int, int]] = []
    started = time.monotonic()
    while True:
        timestamp: Metadata[Timestamp] = device.metadata("timestamp.json")
        assert not timestamp.signed.is_expired(datetime.now(UTC)), timestamp.signed.expires
        seen.append((timestamp.signed.version, timestamp.signed.snapshot_meta.version))
        health = short_lived.request("GET", "/healthz")
        assert health.status == 200, health.data
        timestamps = [t for t, _ in seen]
        assert timestamps == sorted(timestamps)
        renewed = len(set(timestamps)) >= 3 and seen[-1][1] > seen[0][1]
        elapsed = time.monotonic() - started
        if renewed and elapsed > 4.0:
            break
        assert elapsed < 15.0, f"not renewed in time: {seen}"
        time.sleep(0.25)

    assert short_lived.metric("fleet_tuf_resigned_total", role="timestamp") >= 2
    updater = device.updater()  # everything a client needs verifies and is fresh
    assert updater.get_targetinfo("fleet/command-key.json") is not None


def test_shortened_lifetimes_apply_from_the_next_start(tmp_path: Path) -> None:
    lifetimes = {"root": 24.0, "targets": 0.01, "snapshot": 0.002, "timestamp": 0.001}
    with controller_for("sqlite", tmp_path, config={"lifetimes_hours": lifetimes}) as running:
        device = running.device(tmp_path / "device")
        timestamp: Metadata[Timestamp] = device.metadata("timestamp.json")
        assert (timestamp.signed.expires - datetime.now(UTC)).total_seconds() <= 3.6
