"""`fleetctl` as an operator uses it: init a fleet, serve it, publish runes, manage tokens and keys.

Real processes throughout: the console script against a real `fleetctl serve` on SQLite and on
PostgreSQL (fresh database each), real keys and signatures, verified with TUF's metadata API and
a real TUF client. Exit codes: 0 done, 1 refused, 2 bad command line, 3 bad local file, 4
unreachable, 5 not allowed.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root

from attestation.keys import load_key_file, public_key_of
from tests.controller import (
    AS_ADMIN,
    BACKEND_PARAMS,
    RunningController,
    TokenArg,
    build_example,
    controller_for,
    files_digest,
    fleetctl,
    init_fleet,
    one_line_error,
    spawn_serve,
    write_legacy_rune,
)

EXIT_REFUSED, EXIT_USAGE, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED = 1, 2, 3, 4, 5

# For tests of the command line itself (output, exit codes), which the database cannot change:
# they run against the SQLite controller only. State (rotation, restarts) is tested on both.
SQLITE_ONLY = pytest.mark.parametrize("controller", ["sqlite"], indirect=True)


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def controller(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningController]:
    """One controller per backend for this module; tests use their own rune names and tokens."""
    backend: str = request.param
    with controller_for(backend, tmp_path_factory.mktemp(f"fleetctl-{backend}")) as running:
        yield running


def keyid(path: Path) -> str:
    return public_key_of(load_key_file(path)).keyid


def cli_json(controller: RunningController, *args: str | Path, token: TokenArg = AS_ADMIN) -> Any:
    return json.loads(controller.cli(*args, "-o", "json", token=token).stdout)


def refused(result: Any, code: int) -> str:
    """Assert fleetctl exited `code` with one error line; that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return one_line_error(result.stderr)


# fleetctl init.


def test_init_lists_what_it_made(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "fleet"
    made = init_fleet(fleet_dir)
    assert made["fleet_dir"] == str(fleet_dir)
    assert made["config"] == str(fleet_dir / "fleet.yaml")
    assert made["root"] == str(fleet_dir / "root.json")
    assert made["database"] == f"sqlite://{fleet_dir / 'fleet.sqlite3'}"
    assert made["root_threshold"] == 2
    assert made["admin_token"].startswith("fleet_") and len(made["admin_token"]) > 40

    offline = [Path(p) for p in made["offline_root_keys"]]
    assert len(offline) == 3
    assert all(p.parent == fleet_dir / "offline" for p in offline)
    online = {role: Path(p) for role, p in made["online_keys"].items()}
    assert set(online) == {"targets", "snapshot", "timestamp", "command"}
    assert all(p.parent == fleet_dir / "keys" for p in online.values())
    for key_file in (*offline, *online.values()):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    for folder in ("keys", "offline"):
        assert stat.S_IMODE((fleet_dir / folder).stat().st_mode) == 0o700

    root = Metadata[Root].from_file(made["root"])
    assert root.signed.version == 1 and root.signed.consistent_snapshot
    assert root.signed.roles["root"].threshold == 2
    assert set(root.signed.roles["root"].keyids) == {keyid(p) for p in offline}
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    for role in ("targets", "snapshot", "timestamp"):
        assert root.signed.roles[role].keyids == [keyid(online[role])]


def test_init_text_output_warns_to_move_the_root_keys(tmp_path: Path) -> None:
    result = fleetctl(
        "init", "--dir", tmp_path / "fleet", "--root-keys", "5", "--root-threshold", "3"
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "the 5 root keys (3 needed to sign)" in text
    assert f"are in {tmp_path / 'fleet' / 'offline'}" in text
    assert "Move them off this machine" in text
    assert "admin API token (shown once, stored hashed): fleet_" in text
    root = Metadata[Root].from_file(str(tmp_path / "fleet" / "root.json"))
    assert (len(root.signed.roles["root"].keyids), root.signed.roles["root"].threshold) == (5, 3)


def test_the_admin_token_is_not_stored_in_clear(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "fleet"
    token = init_fleet(fleet_dir)["admin_token"]
    secret = token.removeprefix("fleet_")
    files = [p for p in fleet_dir.rglob("*") if p.is_file()]
    assert fleet_dir / "fleet.sqlite3" in files
    for path in files:
        data = path.read_bytes()
        assert token.encode() not in data and secret.encode() not in data, path


def test_init_refuses_to_overwrite_a_fleet(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "fleet"
    init_fleet(fleet_dir)
    before = files_digest(fleet_dir)

    again = fleetctl("init", "--dir", fleet_dir, "--root-keys", "1", "--root-threshold", "1")
    assert "already a fleet" in refused(again, EXIT_INVALID)
    assert files_digest(fleet_dir) == before

    # A new directory pointed at the first fleet's database: refused, and nothing left behind.
    other = tmp_path / "other"
    result = fleetctl("init", "--dir", other, "--db-url", f"sqlite://{fleet_dir / 'fleet.sqlite3'}")
    assert "already holds a fleet" in refused(result, EXIT_INVALID)
    assert not other.exists()
    assert files_digest(fleet_dir) == before


@pytest.mark.parametrize(("keys", "threshold"), [("2", "3"), ("3", "0"), ("0", "0")])
def test_init_refuses_a_bad_threshold(tmp_path: Path, keys: str, threshold: str) -> None:
    fleet_dir = tmp_path / "fleet"
    result = fleetctl(
        "init", "--dir", fleet_dir, "--root-keys", keys, "--root-threshold", threshold
    )
    assert "--root-threshold" in refused(result, EXIT_INVALID)
    assert not fleet_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_init_that_fails_at_the_database_leaves_an_existing_dir_as_it_was(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "fleet"
    fleet_dir.mkdir()
    (fleet_dir / "notes.txt").write_text("the operator's own file")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgres://fleet@127.0.0.1:{port}/fleet"
    result = fleetctl("init", "--dir", fleet_dir, "--db-url", url)
    assert "cannot reach the database" in refused(result, EXIT_INVALID)
    assert sorted(p.name for p in fleet_dir.iterdir()) == ["notes.txt"]


# fleetctl serve, when it cannot.


@pytest.fixture(scope="module")
def idle_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet that is never served for long: for serve's refusals."""
    fleet_dir = tmp_path_factory.mktemp("idle") / "fleet"
    init_fleet(fleet_dir)
    return fleet_dir


def test_serve_refuses_a_bad_listen_address(idle_fleet: Path) -> None:
    for listen in ("nope", "127.0.0.1:99999"):
        result = fleetctl("serve", "--dir", idle_fleet, "--listen", listen)
        assert "is not HOST:PORT" in refused(result, EXIT_USAGE)


def test_serve_refuses_a_directory_that_is_not_a_fleet(tmp_path: Path) -> None:
    result = fleetctl("serve", "--dir", tmp_path, "--listen", "127.0.0.1:0")
    assert "is not a fleet" in refused(result, EXIT_INVALID)
    assert "fleetctl init" in result.stderr


def test_serve_names_an_unreachable_database(idle_fleet: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgres://fleet:s3cret@127.0.0.1:{port}/fleet"
    result = fleetctl("serve", "--dir", idle_fleet, "--listen", "127.0.0.1:0", "--db-url", url)
    line = refused(result, EXIT_INVALID)
    assert "cannot reach the database" in line and f"127.0.0.1:{port}" in line
    assert "s3cret" not in result.stderr


def test_serve_says_when_the_port_is_taken(idle_fleet: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fleetctl("serve", "--dir", idle_fleet, "--listen", f"127.0.0.1:{port}")
    assert result.returncode == EXIT_REFUSED and "Traceback" not in result.stderr
    # The database was opened, so serve's JSON log has started; the error is the one other line.
    *logged, last = result.stderr.splitlines()
    assert all(json.loads(line)["event"] for line in logged)
    assert last.startswith("error: cannot listen: ") and "address already in use" in last


def test_serve_prints_a_usable_url_for_an_ipv6_address(idle_fleet: Path, tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    process, url = spawn_serve(idle_fleet, None, "[::1]:0", tmp_path / "serve")
    try:
        assert url.startswith("http://[::1]:")
        assert urllib3.request("GET", f"{url}/healthz", timeout=10).status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


# Who may do what.


@SQLITE_ONLY
def test_tokens_and_roles_on_the_command_line(
    controller: RunningController, tmp_path: Path
) -> None:
    rune = write_legacy_rune(tmp_path, "cli-roles.rune")
    push = ("runes", "push", rune, "--org", "acme", "--name", "cli-roles", "--version", "1.0.0")

    no_token = controller.cli("runes", "list", token=None, check=False)
    assert "missing API token" in refused(no_token, EXIT_UNAUTHORIZED)
    unknown = controller.cli("runes", "list", token="fleet_nobody", check=False)
    assert "unknown or revoked" in refused(unknown, EXIT_UNAUTHORIZED)

    viewer = cli_json(controller, "api-tokens", "create", "cli-viewer", "--role", "viewer")
    operator = cli_json(controller, "api-tokens", "create", "cli-operator", "--role", "operator")
    created = controller.cli("api-tokens", "create", "cli-admin", "--role", "admin")
    assert created.stdout.startswith("token ") and "(admin) for cli-admin: fleet_" in created.stdout

    assert controller.cli("runes", "list", token=viewer["token"]).returncode == 0
    assert controller.cli("keys", "status", token=viewer["token"]).returncode == 0
    denied = controller.cli(*push, token=viewer["token"], check=False)
    assert "needs the operator role" in refused(denied, EXIT_UNAUTHORIZED)

    controller.cli(*push, token=operator["token"])
    for args in (
        ("api-tokens", "create", "sneaky", "--role", "admin"),
        ("api-tokens", "list"),
        ("keys", "rotate", "command"),
    ):
        result = controller.cli(*args, token=operator["token"], check=False)
        assert "needs the admin role" in refused(result, EXIT_UNAUTHORIZED), args
    controller.cli("runes", "revoke", "cli-roles@1.0.0", "--org", "acme", token=operator["token"])

    listed = cli_json(controller, "api-tokens", "list")["tokens"]
    assert {"cli-viewer", "cli-operator", "cli-admin"} <= {t["name"] for t in listed}
    table = controller.cli("api-tokens", "list").stdout
    assert "cli-operator" in table and viewer["token"] not in table

    assert controller.cli("api-tokens", "revoke", str(viewer["id"])).stdout.strip() == (
        f"token {viewer['id']} revoked"
    )
    gone = controller.cli("runes", "list", token=viewer["token"], check=False)
    refused(gone, EXIT_UNAUTHORIZED)
    missing = controller.cli("api-tokens", "revoke", "999999", check=False)
    assert "no token 999999" in refused(missing, EXIT_REFUSED)

    unreachable = fleetctl("runes", "list", "--server", "http://127.0.0.1:1", "--token", "x")
    assert "cannot reach the controller" in refused(unreachable, EXIT_UNREACHABLE)


# Runes.


@SQLITE_ONLY
def test_runes_push_list_show_and_revoke(
    controller: RunningController, examples_dir: Path, tmp_path: Path
) -> None:
    sine = build_example(examples_dir, "sine", "2.0.0", tmp_path)
    gesture = build_example(examples_dir, "gesture", "2.0.0", tmp_path)
    legacy = write_legacy_rune(tmp_path, "blink.rune")
    changed = write_legacy_rune(tmp_path, "blink-changed.rune", nbytes=32)

    published = controller.cli("runes", "push", sine, "--org", "acme")
    assert published.stdout.startswith("sine@2.0.0 published as runes/acme/sine/2.0.0")
    digest = hashlib.sha256(sine.read_bytes()).hexdigest()
    assert digest in published.stdout
    pushed = cli_json(controller, "runes", "push", gesture, "--org", "acme")
    assert (pushed["created"], pushed["capabilities"]) == (True, ["ACCEL"])
    same = controller.cli("runes", "push", sine, "--org", "acme")
    assert "already published (same bytes)" in same.stdout

    unnamed = controller.cli("runes", "push", legacy, "--org", "acme", check=False)
    line = refused(unnamed, EXIT_REFUSED)
    assert "legacy .rune carries no name or version" in line and "--name" in line
    named = ("--org", "acme", "--name", "blink", "--version", "1.0.0")
    controller.cli("runes", "push", legacy, *named)
    conflict = controller.cli("runes", "push", changed, *named, check=False)
    assert "already published with different bytes" in refused(conflict, EXIT_REFUSED)
    shown = cli_json(controller, "runes", "show", "blink@1.0.0", "--org", "acme")
    assert shown["sha256"] == hashlib.sha256(legacy.read_bytes()).hexdigest()

    junk = tmp_path / "junk.rune"
    junk.write_bytes(b"\x00" * 100)
    bad = controller.cli("runes", "push", junk, *named, check=False)
    assert "not a valid rune" in refused(bad, EXIT_REFUSED)
    missing = controller.cli("runes", "push", tmp_path / "nowhere.rune", check=False)
    assert "cannot read" in refused(missing, EXIT_INVALID)
    bad_name = controller.cli(
        "runes", "push", legacy, "--org", "acme", "--name", "Blink", "--version", "1", check=False
    )
    assert "must be 1-64 lowercase" in refused(bad_name, EXIT_REFUSED)

    table = controller.cli("runes", "list", "--org", "acme").stdout
    rows = {line.split("│")[2].strip(): line for line in table.splitlines() if "│" in line}
    assert {"sine@2.0.0", "gesture@2.0.0", "blink@1.0.0"} <= set(rows)
    assert "RAND" in rows["sine@2.0.0"] and "bundle" in rows["sine@2.0.0"]
    assert "legacy" in rows["blink@1.0.0"] and "published" in rows["blink@1.0.0"]
    assert digest[:12] in rows["sine@2.0.0"]
    listed = cli_json(controller, "runes", "list", "--org", "acme")["runes"]
    assert {r["ref"] for r in listed} == set(rows)
    assert all(r["org"] == "acme" for r in listed)

    text = controller.cli("runes", "show", "gesture@2.0.0", "--org", "acme").stdout
    assert "gesture@2.0.0" in text and "capabilities: accel" in text and "models: " in text
    detail = cli_json(controller, "runes", "show", "sine@2.0.0", "--org", "acme")
    assert detail["target"] == "runes/acme/sine/2.0.0"
    assert detail["description"]["capabilities"][0]["kind"] == "RAND"
    nothing = controller.cli("runes", "show", "sine@9.9.9", "--org", "acme", check=False)
    assert "no rune sine@9.9.9" in refused(nothing, EXIT_REFUSED)
    not_a_ref = controller.cli("runes", "show", "sine", check=False)
    assert "is not NAME@VERSION" in refused(not_a_ref, EXIT_USAGE)

    revoked = controller.cli("runes", "revoke", "blink@1.0.0", "--org", "acme")
    assert "blink@1.0.0 revoked" in revoked.stdout
    table = controller.cli("runes", "list", "--org", "acme").stdout
    assert "revoked" in next(line for line in table.splitlines() if "blink@1.0.0" in line)
    twice = controller.cli("runes", "revoke", "blink@1.0.0", "--org", "acme", check=False)
    assert "already revoked" in refused(twice, EXIT_REFUSED)


@SQLITE_ONLY
def test_devices_register_and_list(controller: RunningController, tmp_path: Path) -> None:
    from attestation.identity import DeviceIdentity
    from attestation.keys import raw_public_bytes

    identity = DeviceIdentity.load_or_create(tmp_path)
    key = raw_public_bytes(identity.public_key).hex()
    registered = cli_json(controller, "devices", "register", key, "--label", "site=lab")
    assert registered["id"] == identity.device_id and registered["labels"] == {"site": "lab"}
    listed = cli_json(controller, "devices", "list")["devices"]
    assert identity.device_id in {d["id"] for d in listed}
    bad = controller.cli("devices", "register", "abcd", check=False)
    assert "64 hex digits" in refused(bad, EXIT_REFUSED)
    bad_label = controller.cli("devices", "register", key, "--label", "nolabel", check=False)
    refused(bad_label, EXIT_USAGE)


# Keys.


@SQLITE_ONLY
def test_keys_status_and_root(controller: RunningController) -> None:
    status = cli_json(controller, "keys", "status")
    assert set(status["roles"]) == {"root", "targets", "snapshot", "timestamp"}
    assert status["roles"]["root"]["threshold"] == 2
    table = controller.cli("keys", "status").stdout
    assert "2 of 3" in table and "timestamp" in table
    root = Metadata[Root].from_bytes(controller.cli("keys", "root").stdout.encode())
    assert root.signed.version == status["roles"]["root"]["version"]


def test_rotating_the_targets_key(controller: RunningController, tmp_path: Path) -> None:
    device = controller.device(tmp_path / "device")
    old = controller.root()
    first, second = controller.offline_keys[:2]
    targets_key = controller.fleet_dir / "keys" / "targets.pem"
    old_keyid = keyid(targets_key)
    assert old.signed.roles["targets"].keyids == [old_keyid]

    result = cli_json(
        controller, "keys", "rotate", "targets", "--root-key", first, "--root-key", second
    )
    assert result["root_version"] == old.signed.version + 1
    new: Metadata[Root] = device.metadata(f"{result['root_version']}.root.json")
    old.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    new.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    new_keyid = keyid(targets_key)  # the controller moved the new key into place
    assert new.signed.roles["targets"].keyids == [new_keyid] != [old_keyid]
    assert not list(targets_key.parent.glob("targets.next-*"))

    targets = device.newest()[2]
    new.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    with pytest.raises(UnsignedMetadataError):
        old.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    device.updater()  # a TUF client from root v1 follows the rotation and verifies everything

    text = controller.cli("keys", "rotate", "snapshot", "--root-key", second, "--root-key", first)
    assert text.stdout.strip() == (
        f"snapshot key rotated: root is now version {result['root_version'] + 1}"
    )


@SQLITE_ONLY
def test_rotation_needs_a_threshold_of_real_root_keys(
    controller: RunningController, tmp_path: Path
) -> None:
    version = controller.root().signed.version
    first = controller.offline_keys[0]
    one = controller.cli("keys", "rotate", "targets", "--root-key", first, check=False)
    assert "threshold of the current root keys" in refused(one, EXIT_REFUSED)
    same_twice = controller.cli(
        "keys", "rotate", "timestamp", "--root-key", first, "--root-key", first, check=False
    )
    refused(same_twice, EXIT_REFUSED)

    stranger = tmp_path / "stranger.pem"
    controller.cli("keys", "generate", stranger)
    online = controller.fleet_dir / "keys" / "targets.pem"
    for wrong in (stranger, online):
        result = controller.cli(
            "keys", "rotate", "targets", "--root-key", first, "--root-key", wrong, check=False
        )
        assert f"{wrong} is not one of this fleet's current root keys" in refused(
            result, EXIT_INVALID
        )
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("hello")
    for args, message in (
        (("targets",), "needs the offline root keys"),
        (("targets", "--root-key", tmp_path / "missing.pem"), "no such key file"),
        (("targets", "--root-key", not_a_key), "is not an unencrypted PEM private key"),
        (("frobnicate", "--root-key", first), "cannot rotate 'frobnicate'"),
        (("targets", "--root-key", first, "--new-root-key", stranger), "only for rotating root"),
        (("root", "--root-key", first), "needs --new-root-key"),
    ):
        result = controller.cli("keys", "rotate", *args, check=False)
        assert message in refused(result, EXIT_INVALID), args
    assert controller.root().signed.version == version


def test_rotating_the_command_key(controller: RunningController, tmp_path: Path) -> None:
    device = controller.device(tmp_path / "device")
    before = device.newest()[2].signed.targets["fleet/command-key.json"]
    result = cli_json(controller, "keys", "rotate", "command")
    assert result["keyid"] == keyid(controller.fleet_dir / "keys" / "command.pem")

    updater = device.updater()
    after = updater.get_targetinfo("fleet/command-key.json")
    assert after is not None and after.hashes != before.hashes
    document = json.loads(Path(updater.download_target(after)).read_bytes())
    assert document["keyid"] == result["keyid"]
    version = cli_json(controller, "keys", "status")["roles"]["targets"]["version"]
    assert controller.metric("fleet_tuf_metadata_version", role="targets") == version
    text = controller.cli("keys", "rotate", "command").stdout
    assert text.startswith("command key rotated (key id ")


def test_rotating_the_root_keys(controller: RunningController, tmp_path: Path) -> None:
    device = controller.device(tmp_path / "device")
    old = controller.root()
    new_keys = [tmp_path / f"new-root-{i}.pem" for i in range(4)]
    for path in new_keys:
        made = controller.cli("keys", "generate", path)
        assert made.stdout.strip() == f"wrote {path} (key id {keyid(path)})"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = controller.cli("keys", "generate", new_keys[0], check=False)
    assert "refusing to overwrite" in refused(again, EXIT_INVALID)

    args: list[str | Path] = ["keys", "rotate", "root", "--root-threshold", "3"]
    for path in controller.offline_keys[1:]:
        args += ["--root-key", path]
    for path in new_keys:
        args += ["--new-root-key", path]
    result = cli_json(controller, *args)
    assert result["root_version"] == old.signed.version + 1

    new: Metadata[Root] = device.metadata(f"{result['root_version']}.root.json")
    assert set(new.signed.roles["root"].keyids) == {keyid(p) for p in new_keys}
    assert new.signed.roles["root"].threshold == 3
    old.signed.verify_delegate("root", new.signed_bytes, new.signatures)  # the old keys agree
    new.signed.verify_delegate("root", new.signed_bytes, new.signatures)  # and so do the new
    for role in ("targets", "snapshot", "timestamp"):
        assert new.signed.roles[role].keyids == old.signed.roles[role].keyids
    device.updater()
    old_keys, controller.offline_keys = controller.offline_keys, new_keys

    # From now on the old root keys are strangers and three of the new ones are needed.
    stale = controller.cli(
        "keys", "rotate", "timestamp", "--root-key", old_keys[0], "--root-key", old_keys[1],
        check=False,
    )  # fmt: skip
    assert "is not one of this fleet's current root keys" in refused(stale, EXIT_INVALID)
    short = controller.cli(
        "keys", "rotate", "timestamp", "--root-key", new_keys[0], "--root-key", new_keys[1],
        check=False,
    )  # fmt: skip
    refused(short, EXIT_REFUSED)
    three = [a for p in new_keys[1:] for a in ("--root-key", str(p))]
    rotated = cli_json(controller, "keys", "rotate", "timestamp", *three)
    assert rotated["root_version"] == result["root_version"] + 1
    device.updater("after-root-rotation")


def test_the_rotated_state_survives_a_restart(
    controller: RunningController, tmp_path: Path
) -> None:
    before = cli_json(controller, "keys", "status")
    controller.restart()
    after = cli_json(controller, "keys", "status")
    for role, info in before["roles"].items():
        assert after["roles"][role]["keyids"] == info["keyids"], role
        assert after["roles"][role]["threshold"] == info["threshold"], role
    assert after["roles"]["root"]["version"] == before["roles"]["root"]["version"]

    # The restarted controller signs with the rotated keys: push, then verify as a device would.
    rune = write_legacy_rune(tmp_path, "after-restart.rune", nbytes=24)
    controller.push(rune, name="after-restart", version="1.0.0")
    device = controller.device(tmp_path / "device")
    root = controller.root()
    timestamp, snapshot, targets = device.newest()
    for role, md in (("timestamp", timestamp), ("snapshot", snapshot), ("targets", targets)):
        root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
    assert "runes/acme/after-restart/1.0.0" in targets.signed.targets
    assert device.updater().get_targetinfo("runes/acme/after-restart/1.0.0") is not None

    three = [a for p in controller.offline_keys[:3] for a in ("--root-key", str(p))]
    rotated = cli_json(controller, "keys", "rotate", "targets", *three)
    assert rotated["root_version"] == root.signed.version + 1


# Persistence.


def test_runes_and_tokens_survive_a_crash(
    controller: RunningController, examples_dir: Path, tmp_path: Path
) -> None:
    bundle = build_example(examples_dir, "sine", "3.0.0", tmp_path, name="kept")
    controller.cli("runes", "push", bundle, "--org", "acme")
    kept = cli_json(controller, "api-tokens", "create", "kept", "--role", "viewer")
    dropped = cli_json(controller, "api-tokens", "create", "dropped", "--role", "operator")
    controller.cli("api-tokens", "revoke", str(dropped["id"]))

    controller.kill()  # not even a graceful stop: what was acknowledged was committed
    controller.start()

    listed = cli_json(controller, "runes", "list", "--org", "acme", token=kept["token"])
    kept_rune = next(r for r in listed["runes"] if r["ref"] == "kept@3.0.0")
    assert kept_rune["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert kept_rune["state"] == "published"
    refused(controller.cli("runes", "list", token=dropped["token"], check=False), EXIT_UNAUTHORIZED)
    tokens = {t["name"]: t for t in cli_json(controller, "api-tokens", "list")["tokens"]}
    assert tokens["kept"]["revoked"] is False and tokens["dropped"]["revoked"] is True
    assert tokens["kept"]["last_used_at"] is not None

    if controller.db_url is None:  # SQLite: the database is a file we can read
        data = b"".join(p.read_bytes() for p in controller.fleet_dir.glob("fleet.sqlite3*"))
        for secret in (controller.token, kept["token"], dropped["token"]):
            assert secret.encode() not in data
