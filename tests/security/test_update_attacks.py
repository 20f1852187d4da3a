"""Attacks on the update path (TUF's threat list and ours), end to end.

Every test drives the real `fleet-agent` console script against a real controller (`fleetctl
serve`, SQLite and PostgreSQL) through `Mirror`, a proxy that misbehaves on command, with real
runes. A refused update must exit 3 with the right `kind` (`-o json`) and one clear error line,
and must leave the device exactly as it was: `slots/state.json` and both slots byte for byte
unchanged (so no install, switch or rune load happened: each of those writes the history), no
slot holding the attacker's bytes, and no downloaded bytes left behind.

The typical device (`device` fixture) has sine@1.0.0 (org acme) installed legitimately and the
attack targets sine@2.0.0, which the controller really publishes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from attestation.keys import load_key_file
from ota.repository import ONLINE_ROLES, Repository
from ota.rune.runefile import CapabilityKind
from ota.targets import RuneTarget
from tests.controller import BACKENDS, RunningController, controller_for
from tests.legacy_runes import capability_rune
from tests.security.conftest import (
    EXIT_FAILED,
    Agent,
    Baseline,
    Runes,
    assert_nothing_installed,
    assert_refused,
    new_agent,
)
from tests.security.mirror import Mirror, metadata_path, target_url_path

TIMESTAMP = metadata_path("timestamp.json")
EVIL_TARGET = "runes/acme/sine/2.0.0"
# The attacker's rune: a real, runnable legacy rune that reads RAND like sine does.
EVIL_CUSTOM = RuneTarget("acme", "sine", "2.0.0", "legacy", ("RAND",), "0.1.0").to_custom()


@pytest.fixture(scope="module")
def evil() -> bytes:
    return capability_rune(CapabilityKind.RAND, 16)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def role_versions(controller: RunningController) -> dict[str, int]:
    status, body = controller.api("GET", "/api/v1/keys")
    assert status == 200, body
    return {role: info["version"] for role, info in body["roles"].items()}


def forged_repository(
    root: Metadata[Root],
    signers: dict[str, Signer],
    above: dict[str, int],
    evil: bytes,
) -> dict[str, bytes]:
    """Metadata an attacker signs with `signers` (keys named in `root`): timestamp, snapshot and
    targets at versions above the real ones (`above`), publishing `evil` as sine@2.0.0. Returns
    the mirror paths to serve (metadata and the evil target)."""
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=7)
    repo = Repository(
        root,
        Metadata(Targets(version=above["targets"] + 10, expires=expires)),
        Metadata(Snapshot(version=above["snapshot"] + 10, expires=expires)),
        Metadata(Timestamp(version=above["timestamp"] + 10, expires=expires)),
        signers,
    )
    files = repo.add_target(EVIL_TARGET, evil, EVIL_CUSTOM, datetime.now(UTC))
    served = {metadata_path(f.filename): f.data for f in files}
    served[target_url_path(EVIL_TARGET, sha256(evil))] = evil
    return served


def attacker_root(
    controller: RunningController, online: dict[str, Signer], root_keys: list[Signer] | None
) -> Metadata[Root]:
    """The next root version with the attacker's online keys (and root keys, if given)."""
    current = controller.root().signed
    draft = Root.from_dict(copy.deepcopy(current.to_dict()))
    draft.version = current.version + 1
    draft.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    for role, signer in online.items():
        for keyid in list(draft.roles[role].keyids):
            draft.revoke_key(keyid, role)
        draft.add_key(signer.public_key, role)
    if root_keys is not None:
        for keyid in list(draft.roles["root"].keyids):
            draft.revoke_key(keyid, "root")
        for signer in root_keys:
            draft.add_key(signer.public_key, "root")
    return Metadata(draft)


def fresh_keys() -> dict[str, Signer]:
    return {role: CryptoSigner.generate_ed25519() for role in ONLINE_ROLES}


# 1. Arbitrary software.


def test_arbitrary_software_flipped_target_bytes_are_refused(
    device: Agent, mirror: Mirror, baseline: Baseline
) -> None:
    """The mirror flips bytes in the signed target: the SHA-256 check refuses it."""
    flipped = bytearray(baseline.v2)
    for offset in (len(flipped) // 3, len(flipped) // 2, len(flipped) - 10):
        flipped[offset] ^= 0xFF
    path = target_url_path(baseline.v2_target, baseline.v2_sha256)
    mirror.replace[path] = bytes(flipped)
    before = device.snapshot()

    result = device.update(mirror.url, "sine@2.0.0")

    line = assert_refused(result, "hash-mismatch")
    assert "sine/2.0.0" in line
    assert mirror.sent(path) == len(flipped)  # it was downloaded, then refused
    assert_nothing_installed(device, before, bytes(flipped))
    assert device.active_ref() == "sine@1.0.0"


# 2. Rollback attacks.


def test_rollback_replayed_older_timestamp_is_refused(
    device: Agent, mirror: Mirror, controller: RunningController, runes: Runes
) -> None:
    """After the device saw a newer timestamp, the mirror serves an older (validly signed) one."""
    assert device.check(mirror.url).returncode == 0  # the mirror records timestamp N
    controller.push(runes.bundle("sine", "rollback-ts", "1.0.0"))  # the fleet moves to N+1
    assert device.check(mirror.url).returncode == 0  # the device trusts N+1
    old, new = (json.loads(body)["signed"]["version"] for body in mirror.recorded[TIMESTAMP])
    assert old < new == device.trusted("timestamp.json")["signed"]["version"]
    mirror.replay(TIMESTAMP, 0)
    before = device.snapshot()

    result = device.update(mirror.url, "sine@2.0.0")

    line = assert_refused(result, "rollback")
    assert f"timestamp version {old} is older than the trusted {new}" in line
    assert_nothing_installed(device, before)
    assert device.trusted("timestamp.json")["signed"]["version"] == new


def test_rollback_to_older_rune_version_is_refused(
    device: Agent, mirror: Mirror, baseline: Baseline
) -> None:
    """Both versions are properly signed, but going from 2.0.0 back to 1.0.0 is a downgrade."""
    device.install(mirror.url, "sine@2.0.0")
    before = device.snapshot()

    result = device.update(mirror.url, "sine@1.0.0")

    line = assert_refused(result, "rollback")
    assert "sine@1.0.0 is older than the active sine@2.0.0" in line
    assert_nothing_installed(device, before)
    assert device.active_ref() == "sine@2.0.0"
    assert not mirror.exchanges_for(target_url_path("runes/acme/sine/1.0.0", sha256(baseline.v1)))


# 3. Indefinite freeze.

TIMESTAMP_LIFETIME_S = 4.0


@pytest.fixture(params=BACKENDS)
def short_lived(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningController]:
    """A fleet whose timestamp is valid for only a few seconds (re-signed every ~2 s)."""
    lifetimes = {"root": 8760.0, "targets": 720.0, "snapshot": 24.0}
    lifetimes["timestamp"] = TIMESTAMP_LIFETIME_S / 3600
    with controller_for(
        request.param, tmp_path / "fleet-short", config={"lifetimes_hours": lifetimes}
    ) as running:
        yield running


def test_freeze_replayed_expired_timestamp_is_refused(
    short_lived: RunningController, runes: Runes, tmp_path: Path
) -> None:
    """The mirror keeps serving the timestamp the device last saw, after it expired."""
    short_lived.push(runes.bundle("sine", "sine", "1.0.0"))
    short_lived.push(runes.bundle("sine", "sine", "2.0.0"))
    device = new_agent(short_lived, tmp_path / "device")
    with Mirror(short_lived.url) as mirror:
        device.install(mirror.url, "sine@1.0.0")
        frozen = mirror.replay(TIMESTAMP, -1)
        assert frozen == (device.state_dir / "tuf" / "timestamp.json").read_bytes()
        expires = datetime.fromisoformat(json.loads(frozen)["signed"]["expires"])
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)
        before = device.snapshot()

        result = device.update(mirror.url, "sine@2.0.0")

        line = assert_refused(result, "expired")
        assert "timestamp metadata expired" in line
        assert "freeze attack" in line
        assert_nothing_installed(device, before)

        # The controller re-signs on time, so the same update through an honest mirror works.
        mirror.behave()
        assert device.install(mirror.url, "sine@2.0.0").json["status"] == "installed"


# 4. Fast-forward attack, and recovery by rotating the timestamp key.


def test_fast_forward_recovery_after_timestamp_key_rotation(
    device: Agent, mirror: Mirror, controller: RunningController
) -> None:
    """An attacker with the timestamp key fast-forwards the device to timestamp version 10**6,
    which freezes it; rotating the key (signed by 2 of the 3 offline root keys) lets the device
    recover, and timestamps signed by the old key are refused from then on."""
    assert device.check(mirror.url).returncode == 0
    genuine_old = mirror.last(TIMESTAMP)
    stolen = load_key_file(controller.fleet_dir / "keys" / "timestamp.pem")
    forged = Metadata[Timestamp].from_bytes(genuine_old)
    forged.signed.version = 10**6
    forged.sign(stolen)
    mirror.replace[TIMESTAMP] = forged.to_bytes()
    assert device.check(mirror.url).returncode == 0  # validly signed: the device accepts it
    assert device.trusted("timestamp.json")["signed"]["version"] == 10**6

    mirror.behave()  # the fast-forward froze the device: real timestamps look like rollbacks
    assert_refused(device.update(mirror.url, "sine@2.0.0"), "rollback")

    keys = controller.offline_keys
    controller.cli("keys", "rotate", "timestamp", "--root-key", keys[0], "--root-key", keys[1])
    assert device.install(mirror.url, "sine@2.0.0").json["status"] == "installed"
    assert device.trusted("timestamp.json")["signed"]["version"] < 10**6  # recovered
    new_keyids = set(device.trusted("root.json")["signed"]["roles"]["timestamp"]["keyids"])
    assert stolen.public_key.keyid not in new_keyids

    before = device.snapshot()
    for replayed in (forged.to_bytes(), genuine_old):
        mirror.replace[TIMESTAMP] = replayed
        line = assert_refused(device.update(mirror.url, "sine@2.0.0"), "bad-signature")
        assert "timestamp metadata has 0 valid signature(s)" in line
    assert_nothing_installed(device, before)


# 5. Endless data.

# A refused update peaks at ~70 MiB (Python, wasmtime); an agent that kept the endless body would
# pass this bound long before the mirror's 1 GiB cap. The mirror writes until the agent hangs up:
# what it got rid of is the agent's reads plus the loopback socket buffers (a few MiB), far below
# the bodies it offers (1 GiB endless, 48 MiB declared).
MAX_RSS_KIB = 200 * 1024
SENT_BOUND = 24 * 1024 * 1024


def test_endless_timestamp_is_refused_quickly(device: Agent, mirror: Mirror) -> None:
    """timestamp.json never ends: the agent stops at its 16 KiB limit, within a second."""
    mirror.endless.add(TIMESTAMP)
    before = device.snapshot()

    result = device.update(mirror.url, "sine@2.0.0")

    line = assert_refused(result, "too-long")
    assert "timestamp.json" in line and "endless-data" in line
    assert result.elapsed < 10, result.elapsed
    assert 0 < result.peak_rss_kib < MAX_RSS_KIB, result.peak_rss_kib
    assert mirror.sent(TIMESTAMP) < SENT_BOUND
    assert_nothing_installed(device, before)


@pytest.mark.parametrize("how", ["declared-length", "endless"])
def test_oversized_target_is_refused_quickly(
    device: Agent, mirror: Mirror, baseline: Baseline, how: str
) -> None:
    """The target's body is longer than its signed length: said up front (Content-Length) or
    never-ending (no length); either way the agent stops at the signed length."""
    path = target_url_path(baseline.v2_target, baseline.v2_sha256)
    oversized = baseline.v2 + b"\0" * (2 * SENT_BOUND)
    if how == "endless":
        mirror.endless.add(path)
    else:
        mirror.replace[path] = oversized
    before = device.snapshot()

    result = device.update(mirror.url, "sine@2.0.0")

    line = assert_refused(result, "too-long")
    assert f"more than the {len(baseline.v2)}" in line
    assert result.elapsed < 10, result.elapsed
    assert 0 < result.peak_rss_kib < MAX_RSS_KIB, result.peak_rss_kib
    assert mirror.sent(path) < SENT_BOUND
    assert_nothing_installed(device, before, oversized)


# 6. Mix-and-match.


def test_mix_and_match_metadata_is_refused(
    device: Agent, mirror: Mirror, controller: RunningController, runes: Runes
) -> None:
    """The timestamp names snapshot N+1 (which names targets M+1); the mirror answers with the
    older snapshot N, then with the older targets M: each is validly signed, but not the file
    its parent role names."""
    controller.push(runes.bundle("sine", "mixed", "1.0.0"))  # so the device has new files to get
    assert device.check(mirror.url).returncode == 0
    old = role_versions(controller)
    old_snapshot = mirror.last(metadata_path(f"{old['snapshot']}.snapshot.json"))
    old_targets = mirror.last(metadata_path(f"{old['targets']}.targets.json"))
    controller.push(runes.bundle("sine", "mixed", "2.0.0"))
    new = role_versions(controller)
    before = device.snapshot()

    mirror.replace[metadata_path(f"{new['snapshot']}.snapshot.json")] = old_snapshot
    line = assert_refused(device.update(mirror.url, "mixed@2.0.0"), "metadata-mismatch")
    assert "mix-and-match" in line
    assert_nothing_installed(device, before)

    mirror.behave()
    mirror.replace[metadata_path(f"{new['targets']}.targets.json")] = old_targets
    line = assert_refused(device.update(mirror.url, "mixed@2.0.0"), "metadata-mismatch")
    assert "mix-and-match" in line
    assert_nothing_installed(device, before)
    assert device.trusted("targets.json")["signed"]["version"] == old["targets"]


# 7. Wrong software.


@pytest.mark.parametrize(
    ("other", "kind"),
    [
        (("sine", "sine", "1.0.0", "acme"), "hash-mismatch"),  # same length, other version
        (("gesture", "gesture", "1.0.0", "other-org"), "too-long"),  # another rune, another org
    ],
    ids=["older-version-same-length", "other-org-rune"],
)
def test_wrong_software_bytes_of_another_target_are_refused(
    device: Agent,
    mirror: Mirror,
    controller: RunningController,
    runes: Runes,
    baseline: Baseline,
    other: tuple[str, str, str, str],
    kind: str,
) -> None:
    """Asked for sine@2.0.0, the mirror answers with the valid, signed bytes of another target."""
    example, name, version, org = other
    other_file = runes.bundle(example, name, version)
    controller.push(other_file, org=org)
    other_bytes = other_file.read_bytes()
    path = target_url_path(baseline.v2_target, baseline.v2_sha256)
    mirror.replace[path] = other_bytes
    before = device.snapshot()

    line = assert_refused(device.update(mirror.url, "sine@2.0.0"), kind)
    assert "sine/2.0.0" in line
    assert_nothing_installed(device, before, *([] if org == "acme" else [other_bytes]))
    assert device.active_ref() == "sine@1.0.0"


def test_rune_of_another_org_is_not_installable_as_ours(
    device: Agent, mirror: Mirror, controller: RunningController, runes: Runes
) -> None:
    """A rune another org publishes under our rune's name is not ours to install."""
    theirs = runes.bundle("sine", "sine", "9.0.0")
    pushed = controller.push(theirs, org="other-org")
    assert pushed["target"] == "runes/other-org/sine/9.0.0"
    before = device.snapshot()

    line = assert_refused(device.update(mirror.url, "sine@9.0.0", org="acme"), "not-published")
    assert "runes/acme/sine/9.0.0 is not in the signed targets metadata" in line
    assert_nothing_installed(device, before)
    assert not [e for e in mirror.exchanges if e.path.startswith("/tuf/targets/")]


# 8. Malicious mirror.


def test_metadata_signed_by_the_mirrors_own_keys_is_refused(
    device: Agent, mirror: Mirror, controller: RunningController, evil: bytes
) -> None:
    """The mirror runs its own repository (fresh keys) publishing its rune as sine@2.0.0, with
    versions above the real ones."""
    keys = fresh_keys()
    own_root = Metadata(Root(expires=datetime.now(UTC) + timedelta(days=30)))
    for role, signer in keys.items():
        own_root.signed.add_key(signer.public_key, role)
    served = forged_repository(own_root, keys, role_versions(controller), evil)
    mirror.replace.update(served)
    before = device.snapshot()

    line = assert_refused(device.update(mirror.url, "sine@2.0.0"), "bad-signature")
    assert "timestamp metadata has 0 valid signature(s)" in line
    assert_nothing_installed(device, before, evil)
    assert not mirror.exchanges_for(target_url_path(EVIL_TARGET, sha256(evil)))


# 9. Compromise of fewer root keys than the threshold.


def test_root_signed_by_one_stolen_root_key_is_refused(
    device: Agent, mirror: Mirror, controller: RunningController, evil: bytes, tmp_path: Path
) -> None:
    """The attacker holds one of the three offline root keys (threshold 2). It signs the next
    root version naming its own online keys, and serves it with a full repository signed by
    those keys publishing its rune as sine@2.0.0. The device keeps its root."""
    stolen = [load_key_file(path) for path in controller.offline_keys]
    online = fresh_keys()
    versions = role_versions(controller)
    takeover = attacker_root(controller, online, None)
    next_root = metadata_path(f"{takeover.signed.version}.root.json")
    served = forged_repository(takeover, online, versions, evil)
    real_root = controller.root()
    control = Agent(tmp_path / "control", device.root_json)
    shutil.copytree(device.state_dir, control.state_dir)  # the same device, for the control

    takeover.sign(stolen[0], append=True)
    mirror.replace.update(served | {next_root: takeover.to_bytes()})
    before = device.snapshot()
    line = assert_refused(device.update(mirror.url, "sine@2.0.0"), "bad-signature")
    assert "root metadata has 1 valid signature(s)" in line and "it needs 2" in line
    assert_nothing_installed(device, before, evil)
    trusted = device.trusted("root.json")
    assert trusted["signed"] == real_root.signed.to_dict()
    assert not mirror.exchanges_for(target_url_path(EVIL_TARGET, sha256(evil)))

    # Control: the same forgery with a second stolen key takes the device over. So the one
    # thing that stopped the attack above is the root threshold.
    takeover.sign(stolen[1], append=True)
    mirror.replace[next_root] = takeover.to_bytes()
    result = control.update(mirror.url, "sine@2.0.0")
    assert result.returncode == 0, result
    assert control.status()["active"]["sha256"] == sha256(evil)


# 10. Root rotation not signed by the old root.


def test_root_rotation_signed_only_by_new_keys_is_refused(
    device: Agent, mirror: Mirror, controller: RunningController, evil: bytes
) -> None:
    """A new root whose root keys are new too, signed by a threshold of those new keys only."""
    new_root_keys = [CryptoSigner.generate_ed25519() for _ in range(3)]
    online = fresh_keys()
    versions = role_versions(controller)
    takeover = attacker_root(controller, online, new_root_keys)
    for signer in new_root_keys:
        takeover.sign(signer, append=True)
    real_root = controller.root()
    mirror.replace.update(
        forged_repository(takeover, online, versions, evil)
        | {metadata_path(f"{takeover.signed.version}.root.json"): takeover.to_bytes()}
    )
    before = device.snapshot()

    line = assert_refused(device.update(mirror.url, "sine@2.0.0"), "bad-signature")
    assert "root metadata has 0 valid signature(s)" in line and "it needs 2" in line
    assert_nothing_installed(device, before, evil)
    assert device.trusted("root.json")["signed"] == real_root.signed.to_dict()


# 11. Revoked rune.


def test_revoked_rune_stops_running_and_is_not_installable(
    device: Agent, mirror: Mirror, controller: RunningController, runes: Runes
) -> None:
    """`fleetctl runes revoke` removes the target: at its next check the device stops running
    it (falling back to the previous rune while that one is still published) and refuses to
    install it again."""
    controller.push(runes.bundle("sine", "revoked", "1.0.0"))
    controller.push(runes.bundle("sine", "revoked", "2.0.0"))
    device.install(mirror.url, "revoked@1.0.0")
    device.install(mirror.url, "revoked@2.0.0")
    controller.cli("runes", "revoke", "revoked@2.0.0", "--org", "acme")

    checked = device.check(mirror.url)

    assert checked.returncode == 0, checked
    assert "revoked@2.0.0 (acme) is no longer published" in checked.stdout
    status = device.status()
    assert (status["active"]["name"], status["active"]["version"]) == ("revoked", "1.0.0")
    assert status["previous"] is None
    assert status["history"][-1]["kind"] == "revoke"
    assert device.run().returncode == 0  # the previous rune runs again

    before = device.snapshot()
    line = assert_refused(device.update(mirror.url, "revoked@2.0.0"), "not-published")
    assert "runes/acme/revoked/2.0.0 is not in the signed targets metadata" in line
    assert_nothing_installed(device, before)

    # With nothing left to fall back to, no rune runs at all.
    controller.cli("runes", "revoke", "revoked@1.0.0", "--org", "acme")
    assert device.check(mirror.url).returncode == 0
    assert device.status()["active"] is None
    stopped = device.run()
    assert stopped.returncode == EXIT_FAILED
    assert "no rune is active" in stopped.error_line()


# Unregistered devices.


def test_unregistered_device_is_unauthorized_not_refused(
    mirror: Mirror, controller: RunningController, tmp_path: Path
) -> None:
    """A device the controller does not know gets 401s: exit 1 (try again once registered)."""
    device = Agent(tmp_path / "unregistered", controller.root_json)

    result = device.update(mirror.url, "sine@2.0.0")

    assert result.returncode == EXIT_FAILED, result
    body = result.json
    assert (body["status"], body["kind"]) == ("unavailable", "unauthorized"), result
    assert "not registered" in result.error_line()
    assert {e.status for e in mirror.exchanges} == {401}
    assert device.status()["active"] is None
    assert not any((device.state_dir / "slots").glob("*/rune"))
