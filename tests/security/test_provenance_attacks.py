"""Attacks on rune provenance, against a real controller (SQLite and PostgreSQL), real keys made
by `rune keygen`, statements signed by `rune sign`, the real staging Sigstore bundles, and real
agents.

Admission: a rune whose statement names another digest, a statement signed by an unknown or a
revoked publisher key, a Sigstore bundle for another artifact, and a rune with no provenance in
an org that requires it are each refused by `fleetctl runes push` (exit 1, the policy's reason
on one line), counted in `fleet_runes_refused_total{kind="provenance"}`, and leave nothing
behind: no rune version, no rune target and no provenance target in the signed metadata.

Devices: a rune admitted with a statement installs with the statement checked; one whose
publisher key the org revoked after admission, and (on a device that requires provenance) one
published without any, are refused with kind `provenance` and nothing installed or run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.controller import Device, RunningController
from tests.security.conftest import (
    Agent,
    Runes,
    assert_nothing_installed,
    assert_refused,
    new_agent,
)
from tests.unit.test_provenance import SIGSTORE_DIR, signer_identity

RUNE = str(Path(sys.executable).parent / "rune")


def rune_cli(*args: str | Path) -> str:
    command = [RUNE, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"rune {' '.join(command[1:])}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Publisher keys made by `rune keygen`: `release` (accepted), `stranger` (never listed)."""
    folder = tmp_path_factory.mktemp("publisher-keys")
    made = {}
    for name in ("release", "stranger", "old"):
        rune_cli("keygen", "-o", folder / f"{name}.pem")
        made[name] = folder / f"{name}.pem"
    return made


@pytest.fixture(scope="module")
def observer(controller: RunningController, tmp_path_factory: pytest.TempPathFactory) -> Device:
    """A registered device used only to read the signed targets metadata."""
    return controller.device(tmp_path_factory.mktemp("observer"))


def published(observer: Device) -> set[str]:
    _, _, targets = observer.newest()
    return set(targets.signed.targets)


def signed_rune(runes: Runes, name: str, version: str, key: Path) -> tuple[Path, Path]:
    """A sine bundle built as NAME@VERSION and its statement signed with `key` (`rune sign`)."""
    rune = runes.bundle("sine", name, version)
    statement = rune.with_name(rune.name + f".{key.stem}.intoto.jsonl")
    rune_cli("sign", rune, "--key", key, "-o", statement)
    return rune, statement


def set_policy(controller: RunningController, org: str, *args: str | Path) -> dict[str, Any]:
    result = controller.cli("policy", "set", "--org", org, *args, "-o", "json")
    policy: dict[str, Any] = json.loads(result.stdout)
    return policy


def push(
    controller: RunningController, rune: Path, org: str, *args: str | Path
) -> tuple[int, str, str]:
    result = controller.cli("runes", "push", rune, "--org", org, *args, check=False)
    return result.returncode, result.stdout, result.stderr


def assert_admission_refused(
    controller: RunningController,
    observer: Device,
    rune: Path,
    org: str,
    args: tuple[str | Path, ...],
    reason: str,
) -> None:
    before = controller.metric("fleet_runes_refused_total", kind="provenance")
    targets_before = published(observer)
    code, _, stderr = push(controller, rune, org, *args)
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "provenance refused" in errors[0] and reason in errors[0], errors[0]
    assert controller.metric("fleet_runes_refused_total", kind="provenance") == before + 1
    status, _ = controller.api("GET", f"/api/v1/runes/{org}/sine/{rune_version(rune)}")
    assert status == 404, f"{rune.name} was stored"
    after = published(observer)
    assert after == targets_before, after - targets_before
    assert not [t for t in after if t.startswith((f"runes/{org}/", f"provenance/{org}/"))]


def rune_version(rune: Path) -> str:
    """The version of a rune that `Runes.bundle` built (EXAMPLE-NAME-VERSION.runebundle)."""
    return rune.stem.rsplit("-", 1)[1]


# Admission.


def test_a_rune_signed_by_an_accepted_key_is_published_with_its_statement(
    controller: RunningController,
    observer: Device,
    runes: Runes,
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    policy = set_policy(
        controller,
        "signed",
        "--publisher-key",
        keys["release"].with_suffix(".pub"),
        "--key-name",
        "release",
        "--require-provenance",
    )
    assert policy["require_provenance"] is True
    assert [k["name"] for k in policy["publisher_keys"]] == ["release"]
    rune, statement = signed_rune(runes, "sine", "1.0.0", keys["release"])
    code, stdout, stderr = push(controller, rune, "signed", "--attestation", statement)
    assert code == 0, stderr
    assert "provenance: signed by publisher key release" in stdout
    shown = json.loads(
        controller.cli("runes", "show", "sine@1.0.0", "--org", "signed", "-o", "json").stdout
    )
    assert shown["provenance"]["kind"] == "dsse"
    targets = published(observer)
    assert {
        "runes/signed/sine/1.0.0",
        "provenance/signed/sine/1.0.0",
        "publishers/signed.json",
    } <= targets
    text = controller.cli("policy", "show", "--org", "signed").stdout
    assert "release" in text and "required" in text

    device = new_agent(controller, tmp_path / "device")
    result = device.update(controller.url, "sine@1.0.0", org="signed")
    assert result.returncode == 0, result
    assert result.json["status"] == "installed"
    steps = " | ".join(result.json["steps"])
    assert "provenance: in-toto statement signed by publisher key" in steps, steps


@pytest.mark.parametrize("case", ["another-digest", "unknown-key", "revoked-key"])
def test_a_statement_that_does_not_vouch_for_the_rune_is_refused(
    case: str,
    controller: RunningController,
    observer: Device,
    runes: Runes,
    keys: dict[str, Path],
) -> None:
    org = f"refuse-{case}"
    set_policy(
        controller,
        org,
        "--publisher-key",
        keys["release"].with_suffix(".pub"),
        "--publisher-key",
        keys["old"].with_suffix(".pub"),
    )
    rune = runes.bundle("sine", "sine", "3.0.0")
    if case == "another-digest":
        _, statement = signed_rune(runes, "other", "3.0.0", keys["release"])
        reason = "(wrong-subject)"
    elif case == "unknown-key":
        _, statement = signed_rune(runes, "sine", "3.0.0", keys["stranger"])
        reason = "(unknown-key)"
    else:
        old_id = next(
            k["keyid"]
            for k in set_policy(controller, org, "--require-provenance")["publisher_keys"]
            if k["name"] == "old"
        )
        revoked = set_policy(controller, org, "--revoke-key", old_id[:16])
        assert revoked["revoked_keys"] == [old_id]
        _, statement = signed_rune(runes, "sine", "3.0.0", keys["old"])
        reason = "(revoked-key)"
    assert_admission_refused(controller, observer, rune, org, ("--attestation", statement), reason)


def test_a_rune_without_provenance_is_refused_where_the_org_requires_it(
    controller: RunningController, observer: Device, runes: Runes
) -> None:
    set_policy(controller, "strict", "--require-provenance")
    rune = runes.bundle("sine", "sine", "4.0.0")
    assert_admission_refused(controller, observer, rune, "strict", (), "requires provenance")
    set_policy(controller, "strict", "--no-require-provenance")
    code, _, stderr = push(controller, rune, "strict")
    assert code == 0, stderr


def test_a_sigstore_bundle_for_another_artifact_is_refused(
    controller: RunningController, observer: Device, runes: Runes
) -> None:
    bundle = SIGSTORE_DIR / "bundle_v3.txt.sigstore"
    if not bundle.exists():
        pytest.skip(f"the Sigstore test data is not at {SIGSTORE_DIR} (../shared/testdata)")
    identity, issuer = signer_identity(bundle.read_bytes())
    policy = set_policy(
        controller,
        "sigstore",
        "--sigstore-identity",
        identity,
        "--sigstore-issuer",
        issuer,
        "--trusted-root",
        "staging",
    )
    assert policy["sigstore_identities"] == [{"identity": identity, "issuer": issuer}]
    assert policy["trusted_root"] == "staging"
    rune = runes.bundle("sine", "sine", "5.0.0")
    assert_admission_refused(
        controller,
        observer,
        rune,
        "sigstore",
        ("--sigstore-bundle", bundle),
        f"Sigstore bundle for {identity} ({issuer})",
    )


def test_policy_mistakes_are_clear_errors_that_change_nothing(
    controller: RunningController, keys: dict[str, Path]
) -> None:
    before = controller.cli("policy", "show", "--org", "mistakes", "-o", "json").stdout
    cases: list[tuple[tuple[str | Path, ...], int, str]] = [
        ((), 2, "nothing to change"),
        (("--publisher-key", keys["release"]), 3, "is not a PEM public key (that is a private key"),
        (("--revoke-key", "abcdef"), 1, "no publisher key abcdef"),
        (("--sigstore-identity", "a@example.com"), 2, "one --sigstore-issuer for each"),
        (("--sigstore-identity", "a@example.com", "--sigstore-issuer", "http://x"), 1, "https://"),
        (("--trusted-root", "nowhere.json"), 3, "production, staging or a trusted root file"),
    ]
    for args, code, message in cases:
        result = controller.cli("policy", "set", "--org", "mistakes", *args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    for body, message in [
        ({"add_publisher_keys": [{"name": "x", "public_pem": "garbage"}]}, "not a PEM public"),
        ({"add_publisher_keys": [{"name": "x", "public_pem": ec_pem}]}, "not an Ed25519 key"),
        ({"add_publisher_keys": "x"}, "must be a list"),
        ({"require_provenance": "yes"}, "true or false"),
        ({"trusted_root": "{}"}, "not a Sigstore trusted root"),
    ]:
        status, answer = controller.api("PUT", "/api/v1/policy/mistakes", json=body)
        assert status == 400 and message in answer["error"], (body, status, answer)
    assert controller.cli("policy", "show", "--org", "mistakes", "-o", "json").stdout == before


# Devices.


@pytest.fixture(scope="module")
def base_rune(controller: RunningController, runes: Runes) -> str:
    """A rune every device below runs first (org `base`, no provenance required)."""
    code, _, stderr = push(controller, runes.bundle("sine", "base", "1.0.0"), "base")
    assert code == 0, stderr
    return "base@1.0.0"


@pytest.fixture
def fresh_device(controller: RunningController, base_rune: str, tmp_path: Path) -> Agent:
    """A new device running `base_rune`."""
    agent = new_agent(controller, tmp_path / "device")
    agent.install(controller.url, base_rune, org="base")
    return agent


def test_a_device_refuses_a_rune_whose_publisher_key_was_revoked_after_admission(
    controller: RunningController, runes: Runes, keys: dict[str, Path], fresh_device: Agent
) -> None:
    org = "revoked-later"
    policy = set_policy(controller, org, "--publisher-key", keys["old"].with_suffix(".pub"))
    rune, statement = signed_rune(runes, "sine", "6.0.0", keys["old"])
    code, _, stderr = push(controller, rune, org, "--attestation", statement)
    assert code == 0, stderr
    set_policy(controller, org, "--revoke-key", policy["publisher_keys"][0]["keyid"])
    before = fresh_device.snapshot()
    result = fresh_device.update(controller.url, "sine@6.0.0", org=org)
    line = assert_refused(result, "provenance")
    assert "(revoked-key)" in line, line
    assert_nothing_installed(fresh_device, before, rune.read_bytes())


def test_a_device_that_requires_provenance_refuses_a_rune_published_without_it(
    controller: RunningController, runes: Runes, fresh_device: Agent
) -> None:
    rune = runes.bundle("sine", "sine", "7.0.0")
    code, _, stderr = push(controller, rune, "unsigned")
    assert code == 0, stderr
    (fresh_device.state_dir / "agent.yaml").write_text("require_provenance: true\n")
    before = fresh_device.snapshot()
    result = fresh_device.update(controller.url, "sine@7.0.0", org="unsigned")
    line = assert_refused(result, "provenance")
    assert "without provenance" in line, line
    assert_nothing_installed(fresh_device, before, rune.read_bytes())
