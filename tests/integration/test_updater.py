"""The device's TUF updater against a real HTTP server: real keys, real signatures, real runes."""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Timestamp
from tuf.api.serialization.json import JSONSerializer

from attestation.identity import DeviceIdentity
from attestation.policy import AllOf
from ota.fetcher import TufFetcher
from ota.repository import ONLINE_ROLES, Lifetimes, PublishedFile, Repository
from ota.rune.build import build_bundle
from ota.target_policy import (
    CapabilitiesAllowed,
    KindSupported,
    MinimumAgentVersion,
    RequestedTarget,
    rune_matches_target,
)
from ota.targets import COMMAND_KEY_TARGET, RuneTarget
from ota.updater import (
    TufClient,
    UpdateLimits,
    UpdateRefused,
    UpdaterSetupError,
    UpdateUnauthorized,
    UpdateUnavailable,
)
from tests.tuf_server import TufServer, target_url_path

SINE = "runes/acme/sine/1.0.0"
SINE_TARGET = RuneTarget("acme", "sine", "1.0.0", "bundle", ("RAND",), "0.1.0")


@pytest.fixture(scope="module")
def sine_bundle(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "sine" / "Runefile.yml", name="sine", version="1.0.0").data


@dataclass
class Fleet:
    """A controller's repository served over HTTP, and one enrolled device."""

    server: TufServer
    repo: Repository
    online: dict[str, Signer]
    root_json: bytes
    identity: DeviceIdentity
    state: Path
    published: list[PublishedFile] = field(default_factory=list)

    def publish(self, files: list[PublishedFile]) -> None:
        self.published += files
        self.server.publish(files)

    def add(self, path: str, data: bytes, custom: dict[str, Any]) -> str:
        self.publish(self.repo.add_target(path, data, custom, datetime.now(UTC)))
        return self.server.add_target(path, data)

    def fetcher(self, **options: Any) -> TufFetcher:
        options.setdefault("partial_dir", self.state / "partial")
        return TufFetcher.for_device(self.identity, **options)

    def client(self, fetcher: TufFetcher | None = None, **options: Any) -> TufClient:
        metadata = self.state / "tuf"
        if not (metadata / "root.json").exists():
            metadata.mkdir(parents=True, exist_ok=True)
            (metadata / "root.json").write_bytes(self.root_json)
        return TufClient(metadata, self.server.url, fetcher or self.fetcher(), **options)


def make_fleet(tmp_path: Path, now: datetime, lifetimes: Lifetimes | None = None) -> Fleet:
    root_key = CryptoSigner.generate_ed25519()
    online: dict[str, Signer] = {r: CryptoSigner.generate_ed25519() for r in ONLINE_ROLES}
    repo, files = Repository.create([root_key], 1, online, now, lifetimes)
    server = TufServer()
    identity = DeviceIdentity.load_or_create(tmp_path / "state")
    server.register(identity.device_id, identity.public_key)
    fleet = Fleet(server, repo, online, files[0].data, identity, tmp_path / "state")
    fleet.publish(files)
    return fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, datetime.now(UTC))
    with fleet.server:
        yield fleet


def bytes_sent(server: TufServer, url: str, expected: int) -> int:
    """`server.bytes_sent(url)` once it reaches `expected` (or after 2 s): the server's handler
    thread counts a body after writing it, so a client that returns as soon as the last byte
    arrives (the body is kept in memory, no file I/O follows) can look before it has counted."""
    deadline = time.monotonic() + 2
    while (sent := server.bytes_sent(url)) < expected and time.monotonic() < deadline:
        time.sleep(0.001)
    return sent


def refused(call: Any, *args: Any) -> UpdateRefused:
    with pytest.raises(UpdateRefused) as caught:
        call(*args)
    return caught.value


def test_a_signed_rune_is_fetched_verified_and_checked_end_to_end(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    command_key = b'{"keytype": "ed25519", "keyval": {"public": "00"}}'
    fleet.add(COMMAND_KEY_TARGET, command_key, {})
    progress: list[tuple[str, int]] = []
    leftover = fleet.state / "tuf" / "downloads" / ".target-from-a-crash"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a rune")
    client = fleet.client(fleet.fetcher(progress=lambda u, n: progress.append((u, n))))
    assert not leftover.exists()

    client.refresh()
    assert client.is_published(SINE)
    assert not client.is_published("runes/acme/sine/9.9.9")
    target = client.rune_target(SINE)
    assert target == SINE_TARGET
    policy = AllOf(
        RequestedTarget("acme", "sine", "1.0.0"),
        KindSupported(),
        CapabilitiesAllowed(frozenset({"RAND", "ACCEL"})),
        MinimumAgentVersion("0.1.0"),
    )
    assert policy.check(target).ok

    verified = client.fetch_target(SINE)
    assert verified.data == sine_bundle and verified.length == len(sine_bundle)
    assert verified.path == SINE and url.endswith(f"{verified.sha256}.1.0.0")
    assert verified.custom == SINE_TARGET.to_custom()
    assert rune_matches_target(target, verified.data).ok
    assert progress[-1][1] == len(sine_bundle) and progress[-1][0].endswith(url)
    assert client.command_key() == {"keytype": "ed25519", "keyval": {"public": "00"}}

    assert not list((fleet.state / "tuf" / "downloads").iterdir()), "no target copy is left"
    assert not list((fleet.state / "partial").iterdir()), "no partial is left"
    assert fleet.server.auth_failures == []
    assert all(r.device == fleet.identity.device_id for r in fleet.server.requests)


@pytest.mark.parametrize("on_disk", [True, False], ids=["partial-file", "in-memory"])
def test_a_dropped_connection_resumes_with_a_range_request(
    fleet: Fleet, sine_bundle: bytes, on_disk: bool
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    fleet.server.drop_after[url] = 1000
    fetcher = fleet.fetcher() if on_disk else fleet.fetcher(partial_dir=None)

    assert fleet.client(fetcher).fetch_target(SINE).data == sine_bundle
    first, second = fleet.server.requests_for(url)
    assert (first.range, first.sent) == (None, 1000)
    assert (second.range, second.status) == ("bytes=1000-", 206)
    assert bytes_sent(fleet.server, url, len(sine_bundle)) == len(sine_bundle), (
        "resumed, not downloaded twice"
    )


def test_a_server_that_ignores_the_range_makes_the_download_start_over(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    fleet.server.drop_after[url] = 1000
    fleet.server.ignore_range.add(url)

    assert fleet.client().fetch_target(SINE).data == sine_bundle
    assert [r.status for r in fleet.server.requests_for(url)] == [200, 200]


def test_a_download_resumes_from_its_partial_file_after_a_restart(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    fleet.server.drop_after[url] = 1500
    first = fleet.fetcher(retries=0)
    with pytest.raises(UpdateUnavailable) as caught:
        fleet.client(first).fetch_target(SINE)
    assert caught.value.kind == "network" and "dropped at byte 1500" in caught.value.reason
    digest = url.rsplit("/", 1)[1].split(".", 1)[0]
    partial = first.partial_path(digest)
    assert partial is not None and partial.read_bytes() == sine_bundle[:1500]

    progress: list[int] = []
    again = fleet.client(fleet.fetcher(progress=lambda _, n: progress.append(n)))
    assert again.fetch_target(SINE).data == sine_bundle
    assert fleet.server.requests_for(url)[-1].range == "bytes=1500-"
    assert bytes_sent(fleet.server, url, len(sine_bundle)) == len(sine_bundle)
    assert progress[0] > 1500 and progress[-1] == len(sine_bundle)
    assert not partial.exists()


def test_a_corrupt_partial_is_refused_once_then_a_clean_download_succeeds(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    fetcher = fleet.fetcher()
    digest = url.rsplit("/", 1)[1].split(".", 1)[0]
    partial = fetcher.partial_path(digest)
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(bytes(b ^ 0xFF for b in sine_bundle[:2000]))
    client = fleet.client(fetcher)

    error = refused(client.fetch_target, SINE)
    assert error.kind == "hash-mismatch"
    assert str(error) == (
        f"target hash mismatch for {SINE}: the server sent different bytes than the signed "
        "metadata says"
    )
    assert not partial.exists()
    assert client.fetch_target(SINE).data == sine_bundle
    assert [r.range for r in fleet.server.requests_for(url)] == ["bytes=2000-", None]


def test_an_oversized_partial_is_discarded_before_downloading(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    fetcher = fleet.fetcher()
    partial = fetcher.partial_path(url.rsplit("/", 1)[1].split(".", 1)[0])
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(sine_bundle + b"junk")

    assert fleet.client(fetcher).fetch_target(SINE).data == sine_bundle
    assert [r.range for r in fleet.server.requests_for(url)] == [None]


def test_unknown_devices_and_unsigned_requests_are_unauthorized_not_attacks(
    fleet: Fleet, tmp_path: Path
) -> None:
    stranger = DeviceIdentity.load_or_create(tmp_path / "stranger")
    for fetcher in (TufFetcher.for_device(stranger), TufFetcher(None)):
        with pytest.raises(UpdateUnauthorized) as caught:
            fleet.client(fetcher).refresh()
        assert isinstance(caught.value, UpdateUnavailable)
        assert caught.value.kind == "unauthorized"
        assert "refused this device's signed request (HTTP 401)" in caught.value.reason
    assert fleet.server.auth_failures == [
        f"unknown device {stranger.device_id}",
        "unsigned request",
    ]


def test_tampered_target_bytes_are_refused(fleet: Fleet, sine_bundle: bytes) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    client = fleet.client()
    flipped = bytearray(sine_bundle)
    flipped[100] ^= 1
    cases = [
        (bytes(flipped), "hash-mismatch", "target hash mismatch"),
        (sine_bundle[:-1], "length-mismatch", "target length mismatch"),
        (sine_bundle + b"x", "too-long", "more data than allowed"),
    ]
    for served, kind, text in cases:
        fleet.server.replace[url] = served
        error = refused(client.fetch_target, SINE)
        assert (error.kind, text in error.reason) == (kind, True), error.reason


def test_an_endless_body_is_cut_at_the_size_limit(fleet: Fleet, sine_bundle: bytes) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    client = fleet.client()
    client.refresh()
    fleet.server.endless.add(url)
    assert refused(client.fetch_target, SINE).kind == "too-long"

    fleet.server.endless.add("/tuf/metadata/timestamp.json")
    error = refused(client.refresh)
    assert error.kind == "too-long" and "16384 bytes" in error.reason


def test_an_oversized_target_is_refused_before_it_is_downloaded(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    client = fleet.client(limits=UpdateLimits(max_target_bytes=1024))
    error = refused(client.fetch_target, SINE)
    assert error.kind == "too-large"
    assert (
        error.reason
        == f"{SINE} is {len(sine_bundle)} bytes, more than the 1024 this device accepts"
    )
    assert fleet.server.requests_for(url) == []


def test_a_stalled_download_times_out_as_unavailable(fleet: Fleet, sine_bundle: bytes) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    fleet.server.stall.add(url)
    client = fleet.client(fleet.fetcher(read_timeout=0.2, retries=1))
    with pytest.raises(UpdateUnavailable) as caught:
        client.fetch_target(SINE)
    assert caught.value.kind == "timeout"
    assert "stalled at byte 0: no data for 0.2 s after 2 attempts" in caught.value.reason
    assert len(fleet.server.requests_for(url)) == 2


def test_an_unreachable_server_is_unavailable_not_an_attack(fleet: Fleet) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    client = fleet.client()
    client.server_url = f"http://127.0.0.1:{port}"
    with pytest.raises(UpdateUnavailable) as caught:
        client.refresh()
    assert caught.value.kind == "network"
    assert f"cannot connect to 127.0.0.1:{port}" in caught.value.reason


def test_a_listed_target_missing_from_the_server_is_unavailable(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    url = fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    del fleet.server.targets[url.removeprefix("/tuf/targets/")]
    with pytest.raises(UpdateUnavailable) as caught:
        fleet.client().fetch_target(SINE)
    assert caught.value.kind == "missing-target"


def test_an_unpublished_target_is_refused(fleet: Fleet) -> None:
    assert refused(fleet.client().fetch_target, SINE).kind == "not-published"


def test_expired_timestamp_metadata_is_refused(tmp_path: Path) -> None:
    signed_at = datetime.now(UTC) - timedelta(hours=2)
    fleet = make_fleet(tmp_path, signed_at, Lifetimes(timestamp=timedelta(hours=1)))
    with fleet.server:
        error = refused(fleet.client().refresh)
    expiry = (signed_at + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert error.kind == "expired"
    assert error.reason == (
        f"timestamp metadata expired at {expiry} (freeze attack, or the controller stopped "
        "re-signing)"
    )


def test_older_metadata_than_the_device_trusts_is_a_rollback(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    initial_timestamp = fleet.server.metadata["timestamp.json"]
    initial_snapshot = Metadata.from_bytes(fleet.server.metadata["1.snapshot.json"])
    fleet.add(SINE, sine_bundle, SINE_TARGET.to_custom())
    client = fleet.client()
    client.refresh()

    fleet.server.metadata["timestamp.json"] = initial_timestamp
    error = refused(client.refresh)
    assert (error.kind, error.reason) == (
        "rollback",
        "rollback: timestamp version 1 is older than the trusted 2",
    )

    # A freshly signed timestamp (the online key is compromised) that points at an old snapshot.
    forged: Metadata[Timestamp] = copy.deepcopy(fleet.repo.timestamp)
    forged.signed.version += 5
    forged.signed.snapshot_meta = MetaFile.from_data(
        1, initial_snapshot.to_bytes(JSONSerializer(compact=True)), ["sha256"]
    )
    forged.sign(fleet.online["timestamp"])
    fleet.server.metadata["timestamp.json"] = forged.to_bytes(JSONSerializer(compact=True))
    error = refused(client.refresh)
    assert error.reason == "rollback: snapshot version 1 is older than the trusted 2"


def test_metadata_signed_by_an_untrusted_key_is_refused(fleet: Fleet) -> None:
    forged: Metadata[Timestamp] = copy.deepcopy(fleet.repo.timestamp)
    forged.signed.version += 1
    forged.sign(CryptoSigner.generate_ed25519())
    fleet.server.metadata["timestamp.json"] = forged.to_bytes(JSONSerializer(compact=True))
    error = refused(fleet.client().refresh)
    assert error.kind == "bad-signature"
    assert error.reason.startswith("timestamp metadata has 0 valid signature(s)")


def test_a_device_without_a_trusted_root_does_not_start(fleet: Fleet, tmp_path: Path) -> None:
    with pytest.raises(UpdaterSetupError, match="provision it with the fleet's root.json"):
        TufClient(tmp_path / "empty", fleet.server.url, fleet.fetcher())


def test_target_policies_refuse_what_this_device_must_not_run(
    fleet: Fleet, sine_bundle: bytes
) -> None:
    needs_new_agent = RuneTarget("acme", "sine", "1.0.0", "bundle", ("RAND",), "2.0.0")
    fleet.add(SINE, sine_bundle, needs_new_agent.to_custom())
    other = "runes/acme/other/1.0.0"
    other_target = RuneTarget("acme", "other", "1.0.0", "bundle", ("RAND",), "0.1.0")
    fleet.add(other, sine_bundle, other_target.to_custom())
    mislabeled = "runes/acme/cosine/1.0.0"
    fleet.add(mislabeled, sine_bundle, SINE_TARGET.to_custom())
    client = fleet.client()

    target = client.rune_target(SINE)
    no_rand = CapabilitiesAllowed(frozenset({"ACCEL"})).check(target)
    assert not no_rand and "reads RAND, which this device does not allow" in no_rand.reason
    too_old = MinimumAgentVersion("1.4.2").check(target)
    assert too_old.reason == "sine@1.0.0 needs agent 2.0.0 or newer; this agent is 1.4.2"

    error = refused(client.rune_target, mislabeled)
    assert error.kind == "bad-custom" and "carries metadata for runes/acme/sine/1.0.0" in str(error)

    downloaded = client.fetch_target(other)
    verdict = rune_matches_target(client.rune_target(other), downloaded.data)
    assert not verdict.ok
    assert verdict.reason == (
        "the metadata describes other@1.0.0 but the bundle's manifest says sine@1.0.0"
    )
    assert target_url_path(other, sine_bundle).endswith(downloaded.sha256 + ".1.0.0")
