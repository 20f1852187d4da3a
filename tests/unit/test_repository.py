"""ota.repository with real Ed25519 keys, checked by python-tuf's own metadata API and ngclient.

Every published file set is served to a real `tuf.ngclient.Updater` through an in-memory fetcher,
so "a client accepts this" means exactly what it will mean on a device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import DownloadHTTPError, ExpiredMetadataError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from ota.repository import (
    ONLINE_ROLES,
    TOP_LEVEL_ROLES,
    Lifetimes,
    PublishedFile,
    Repository,
    RepositoryError,
)

BASE = "https://tuf.invalid"
T0 = datetime(2030, 1, 1, tzinfo=UTC)
SHORT = Lifetimes(
    root=timedelta(days=365),
    targets=timedelta(days=1),
    snapshot=timedelta(hours=4),
    timestamp=timedelta(hours=1),
)


def _key() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def _public(signer: Signer) -> SSlibKey:
    key = signer.public_key
    assert isinstance(key, SSlibKey)
    return key


def _online() -> dict[str, Signer]:
    return {role: _key() for role in ONLINE_ROLES}


class Mirror(FetcherInterface):
    """An in-memory TUF server: `metadata/{filename}` and `targets/{dir}/{sha256}.{basename}`."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def publish(self, files: Iterable[PublishedFile]) -> None:
        for published in files:
            self.files[f"{BASE}/metadata/{published.filename}"] = published.data

    def put_target(self, path: str, data: bytes) -> None:
        directory, sep, basename = path.rpartition("/")
        digest = hashlib.sha256(data).hexdigest()
        self.files[f"{BASE}/targets/{directory}{sep}{digest}.{basename}"] = data

    def _fetch(self, url: str) -> Iterator[bytes]:
        data = self.files.get(url)
        if data is None:
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([data])


class Client:
    """A device's TUF client state on disk; every `updater()` is a fresh ngclient run."""

    def __init__(self, directory: Path, mirror: Mirror, root: bytes) -> None:
        self.metadata_dir = directory / "metadata"
        self.targets_dir = directory / "targets"
        self.metadata_dir.mkdir(parents=True)
        (self.metadata_dir / "root.json").write_bytes(root)
        self.mirror = mirror

    def updater(self) -> Updater:
        updater = Updater(
            str(self.metadata_dir),
            f"{BASE}/metadata/",
            str(self.targets_dir),
            f"{BASE}/targets/",
            fetcher=self.mirror,
            bootstrap=None,
        )
        updater.refresh()
        return updater

    def download(self, path: str) -> bytes:
        updater = self.updater()
        info = updater.get_targetinfo(path)
        assert info is not None, f"{path} is not a target the client sees"
        return Path(updater.download_target(info)).read_bytes()

    def trusted(self, role: str) -> Metadata[Any]:
        md: Metadata[Any] = Metadata.from_bytes((self.metadata_dir / f"{role}.json").read_bytes())
        return md


@dataclass
class Setup:
    repo: Repository
    root_signers: list[CryptoSigner]
    online: dict[str, Signer]
    created: list[PublishedFile]
    mirror: Mirror
    client: Client
    now: datetime

    def add(self, path: str, data: bytes, custom: dict[str, Any] | None = None) -> None:
        """Publish a target the way the controller does: files to the mirror, then the bytes."""
        self.mirror.publish(self.repo.add_target(path, data, custom or {}, self.now))
        self.mirror.put_target(path, data)


def _setup(tmp_path: Path, n: int = 3, k: int = 2, now: datetime | None = None) -> Setup:
    now = now or datetime.now(UTC)
    root_signers = [_key() for _ in range(n)]
    online = _online()
    repo, files = Repository.create(root_signers, k, online, now)
    mirror = Mirror()
    mirror.publish(files)
    client = Client(tmp_path / "device", mirror, files[0].data)
    return Setup(repo, root_signers, online, files, mirror, client, now)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return _setup(tmp_path)


def _roles(files: Sequence[PublishedFile]) -> list[tuple[str, int]]:
    return [(f.role, f.version) for f in files]


def _sign(md: Metadata[Root], signers: Iterable[Signer]) -> Metadata[Root]:
    for signer in signers:
        md.sign(signer, append=True)
    return md


def _latest(files: Iterable[PublishedFile]) -> dict[str, bytes]:
    latest: dict[str, PublishedFile] = {}
    for published in files:
        if published.role not in latest or published.version > latest[published.role].version:
            latest[published.role] = published
    return {role: published.data for role, published in latest.items()}


def _verify_chain(repo: Repository) -> None:
    """Every online role verifies with the root's keys and is listed by the role above it."""
    root = repo.root.signed
    for role in ONLINE_ROLES:
        md = getattr(repo, role)
        root.verify_delegate(role, md.signed_bytes, md.signatures)
    targets_meta = repo.snapshot.signed.meta["targets.json"]
    assert targets_meta.version == repo.targets.signed.version
    targets_meta.verify_length_and_hashes(repo.targets.to_bytes())
    snapshot_meta = repo.timestamp.signed.snapshot_meta
    assert snapshot_meta.version == repo.snapshot.signed.version
    snapshot_meta.verify_length_and_hashes(repo.snapshot.to_bytes())


# Create.


def test_create_signs_root_with_every_root_key_and_each_online_role_with_its_key(
    tmp_path: Path,
) -> None:
    s = _setup(tmp_path, n=3, k=2)
    assert [f.filename for f in s.created] == [
        "1.root.json",
        "1.targets.json",
        "1.snapshot.json",
        "timestamp.json",
    ]
    assert _roles(s.created) == [(role, 1) for role in TOP_LEVEL_ROLES]

    root_md = Metadata[Root].from_bytes(s.created[0].data)
    root = root_md.signed
    assert isinstance(root, Root)
    assert root.version == 1
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2
    assert set(root.roles["root"].keyids) == {_public(r).keyid for r in s.root_signers}
    # Signed by all n root keys, each signature valid on its own.
    assert set(root_md.signatures) == {_public(r).keyid for r in s.root_signers}
    for signer in s.root_signers:
        key = _public(signer)
        key.verify_signature(root_md.signatures[key.keyid], root_md.signed_bytes)
    root.verify_delegate("root", root_md.signed_bytes, root_md.signatures)

    kinds = {"targets": Targets, "snapshot": Snapshot, "timestamp": Timestamp}
    for published in s.created[1:]:
        md = Metadata[Any].from_bytes(published.data)
        assert isinstance(md.signed, kinds[published.role])
        assert md.signed.version == 1
        assert root.roles[published.role].keyids == [_public(s.online[published.role]).keyid]
        assert set(md.signatures) == {_public(s.online[published.role]).keyid}
        root.verify_delegate(published.role, md.signed_bytes, md.signatures)
    _verify_chain(s.repo)


def test_a_client_bootstrapped_with_the_new_root_refreshes(setup: Setup) -> None:
    updater = setup.client.updater()
    assert updater.get_targetinfo("runes/default/sine/1.0.0") is None
    assert setup.client.trusted("root").signed.version == 1
    assert setup.client.trusted("timestamp").signed.version == 1


@pytest.mark.parametrize("threshold", [0, -1, 4])
def test_create_refuses_a_threshold_outside_one_to_n(threshold: int) -> None:
    with pytest.raises(RepositoryError, match="threshold"):
        Repository.create([_key() for _ in range(3)], threshold, _online(), T0)


def test_create_refuses_no_root_keys() -> None:
    with pytest.raises(RepositoryError, match="threshold"):
        Repository.create([], 1, _online(), T0)


def test_create_refuses_a_threshold_above_the_number_of_distinct_root_keys() -> None:
    same = _key()
    with pytest.raises(RepositoryError):
        Repository.create([same, same], 2, _online(), T0)


@pytest.mark.parametrize("missing", ONLINE_ROLES)
def test_create_refuses_a_missing_online_signer(missing: str) -> None:
    online = _online()
    del online[missing]
    with pytest.raises(RepositoryError, match=missing):
        Repository.create([_key()], 1, online, T0)


# Targets.


def test_add_target_publishes_targets_snapshot_timestamp_each_one_version_up(
    setup: Setup,
) -> None:
    custom = {"fleet": {"org": "acme", "capabilities": ["accel"]}}
    files = setup.repo.add_target("runes/acme/sine/1.0.0", b"rune bytes", custom, setup.now)
    assert _roles(files) == [("targets", 2), ("snapshot", 2), ("timestamp", 2)]
    assert [f.filename for f in files] == ["2.targets.json", "2.snapshot.json", "timestamp.json"]

    targets = Metadata[Targets].from_bytes(files[0].data)
    target = targets.signed.targets["runes/acme/sine/1.0.0"]
    assert target.custom == custom
    assert target.length == len(b"rune bytes")
    assert target.hashes == {"sha256": hashlib.sha256(b"rune bytes").hexdigest()}
    assert setup.repo.target_files["runes/acme/sine/1.0.0"].custom == custom
    _verify_chain(setup.repo)
    # The published bytes are exactly the repository's state.
    assert files[0].data == setup.repo.targets.to_bytes()
    assert files[1].data == setup.repo.snapshot.to_bytes()
    assert files[2].data == setup.repo.timestamp.to_bytes()


def test_a_client_downloads_a_published_target(setup: Setup) -> None:
    data = b"\x00rune\xffbytes" * 100
    setup.add("runes/acme/sine/1.0.0", data, {"fleet": {"kind": "bundle"}})
    assert setup.client.download("runes/acme/sine/1.0.0") == data
    info = setup.client.updater().get_targetinfo("runes/acme/sine/1.0.0")
    assert info is not None
    assert info.custom == {"fleet": {"kind": "bundle"}}


def test_the_same_target_again_is_a_no_op(setup: Setup) -> None:
    custom = {"fleet": {"kind": "bundle"}}
    setup.repo.add_target("runes/acme/sine/1.0.0", b"x", custom, setup.now)
    again = {"fleet": {"kind": "bundle"}}  # equal, not the same object
    assert setup.repo.add_target("runes/acme/sine/1.0.0", b"x", again, setup.now) == []
    assert setup.repo.targets.signed.version == 2
    assert setup.repo.timestamp.signed.version == 2


def test_same_bytes_with_new_custom_is_republished(setup: Setup) -> None:
    setup.repo.add_target("runes/acme/sine/1.0.0", b"x", {"a": 1}, setup.now)
    files = setup.repo.add_target("runes/acme/sine/1.0.0", b"x", {"a": 2}, setup.now)
    assert _roles(files) == [("targets", 3), ("snapshot", 3), ("timestamp", 3)]
    assert setup.repo.target_files["runes/acme/sine/1.0.0"].custom == {"a": 2}


def test_a_path_cannot_be_republished_with_different_bytes(setup: Setup) -> None:
    setup.add("runes/acme/sine/1.0.0", b"original")
    before = {role: getattr(setup.repo, role).to_bytes() for role in TOP_LEVEL_ROLES}
    with pytest.raises(RepositoryError, match=r"runes/acme/sine/1\.0\.0.*different bytes"):
        setup.repo.add_target("runes/acme/sine/1.0.0", b"replaced", {}, setup.now)
    assert {role: getattr(setup.repo, role).to_bytes() for role in TOP_LEVEL_ROLES} == before
    assert setup.client.download("runes/acme/sine/1.0.0") == b"original"


def test_add_target_does_not_keep_a_reference_to_the_callers_custom(setup: Setup) -> None:
    custom: dict[str, Any] = {"fleet": {"min_agent_version": "1.0"}}
    setup.repo.add_target("runes/acme/sine/1.0.0", b"x", custom, setup.now)
    custom["fleet"]["min_agent_version"] = "2.0"
    assert setup.repo.target_files["runes/acme/sine/1.0.0"].custom == {
        "fleet": {"min_agent_version": "1.0"}
    }
    # Publishing the changed custom must publish something.
    assert setup.repo.add_target("runes/acme/sine/1.0.0", b"x", custom, setup.now) != []


def test_remove_target_hides_it_from_clients(setup: Setup) -> None:
    setup.add("runes/acme/sine/1.0.0", b"one")
    setup.add("runes/acme/sine/1.1.0", b"two")
    assert setup.client.download("runes/acme/sine/1.0.0") == b"one"

    files = setup.repo.remove_target("runes/acme/sine/1.0.0", setup.now)
    assert _roles(files) == [("targets", 4), ("snapshot", 4), ("timestamp", 4)]
    assert "runes/acme/sine/1.0.0" not in setup.repo.target_files
    setup.mirror.publish(files)
    updater = setup.client.updater()
    assert updater.get_targetinfo("runes/acme/sine/1.0.0") is None
    assert updater.get_targetinfo("runes/acme/sine/1.1.0") is not None


def test_remove_target_refuses_an_unknown_path(setup: Setup) -> None:
    with pytest.raises(RepositoryError, match="runes/acme/nope/1"):
        setup.repo.remove_target("runes/acme/nope/1", setup.now)
    assert setup.repo.targets.signed.version == 1


def test_versions_are_never_reused(setup: Setup) -> None:
    repo = setup.repo
    published = list(setup.created)
    now = setup.now
    for i in range(8):
        now += timedelta(minutes=7)
        published += repo.add_target(f"runes/acme/r{i}/1.0.0", b"r%d" % i, {"i": i}, now)
        setup.mirror.put_target(f"runes/acme/r{i}/1.0.0", b"r%d" % i)
        published += repo.refresh(now + timedelta(hours=4))
    for i in range(0, 8, 2):
        published += repo.remove_target(f"runes/acme/r{i}/1.0.0", now)
    published += repo.add_target("runes/acme/r1/1.0.0", b"r1", {"i": "changed"}, now)
    published += repo.refresh(now + timedelta(days=20))

    for role in TOP_LEVEL_ROLES:
        versions = [f.version for f in published if f.role == role]
        # One above the last, every time: never reused, never skipped.
        assert versions == list(range(1, len(versions) + 1)), role
    for f in published:
        md = Metadata[Any].from_bytes(f.data)
        assert (md.signed.type, md.signed.version) == (f.role, f.version)
        expected = "timestamp.json" if f.role == "timestamp" else f"{f.version}.{f.role}.json"
        assert f.filename == expected
    versioned = [f.filename for f in published if f.role != "timestamp"]
    assert len(versioned) == len(set(versioned))

    # Any client, old or new, ends at the same state.
    setup.mirror.publish(published)
    updater = setup.client.updater()
    for i in range(8):
        info = updater.get_targetinfo(f"runes/acme/r{i}/1.0.0")
        assert (info is None) == (i % 2 == 0)
    assert setup.client.download("runes/acme/r3/1.0.0") == b"r3"


def test_published_file_names() -> None:
    assert PublishedFile("root", 3, b"").filename == "3.root.json"
    assert PublishedFile("targets", 12, b"").filename == "12.targets.json"
    assert PublishedFile("snapshot", 5, b"").filename == "5.snapshot.json"
    assert PublishedFile("timestamp", 9, b"").filename == "timestamp.json"


# Renewal.


def test_refresh_resigns_only_what_is_due() -> None:
    repo, _ = Repository.create([_key()], 1, _online(), T0, SHORT)
    assert repo.renewal_due("timestamp") == T0 + timedelta(minutes=30)
    assert repo.renewal_due("snapshot") == T0 + timedelta(hours=2)
    assert repo.renewal_due("targets") == T0 + timedelta(hours=12)
    assert repo.next_renewal() == T0 + timedelta(minutes=30)

    assert repo.refresh(T0) == []
    assert repo.refresh(T0 + timedelta(minutes=29, seconds=59)) == []

    files = repo.refresh(T0 + timedelta(minutes=30))
    assert _roles(files) == [("timestamp", 2)]
    assert repo.timestamp.signed.expires == T0 + timedelta(minutes=90)
    assert repo.snapshot.signed.version == 1
    assert repo.next_renewal() == T0 + timedelta(hours=1)
    assert repo.refresh(T0 + timedelta(minutes=30)) == []

    files = repo.refresh(T0 + timedelta(hours=1))
    assert _roles(files) == [("timestamp", 3)]

    files = repo.refresh(T0 + timedelta(hours=2))
    assert _roles(files) == [("snapshot", 2), ("timestamp", 4)]
    assert repo.snapshot.signed.expires == T0 + timedelta(hours=6)
    assert repo.timestamp.signed.expires == T0 + timedelta(hours=3)
    assert repo.targets.signed.version == 1

    files = repo.refresh(T0 + timedelta(hours=12))
    assert _roles(files) == [("targets", 2), ("snapshot", 3), ("timestamp", 5)]
    assert repo.targets.signed.expires == T0 + timedelta(hours=36)
    assert repo.snapshot.signed.expires == T0 + timedelta(hours=16)
    assert repo.timestamp.signed.expires == T0 + timedelta(hours=13)
    assert repo.next_renewal() == T0 + timedelta(hours=12, minutes=30)
    _verify_chain(repo)


def test_next_renewal_is_the_earliest_due_role() -> None:
    # With a timestamp that outlives the snapshot's half-life, the snapshot is due first.
    lifetimes = Lifetimes(
        targets=timedelta(hours=3), snapshot=timedelta(hours=2), timestamp=timedelta(hours=10)
    )
    repo, _ = Repository.create([_key()], 1, _online(), T0, lifetimes)
    assert repo.next_renewal() == T0 + timedelta(hours=1)
    assert _roles(repo.refresh(repo.next_renewal())) == [("snapshot", 2), ("timestamp", 2)]
    assert repo.next_renewal() == T0 + timedelta(hours=1, minutes=30)
    assert _roles(repo.refresh(repo.next_renewal())) == [
        ("targets", 2),
        ("snapshot", 3),
        ("timestamp", 3),
    ]


def test_refresh_keeps_a_client_going_past_the_old_expiry(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    root_signers = [_key()]
    repo, files = Repository.create(root_signers, 1, _online(), now - timedelta(minutes=90), SHORT)
    mirror = Mirror()
    mirror.publish(files)
    client = Client(tmp_path, mirror, files[0].data)
    with pytest.raises(ExpiredMetadataError):
        client.updater()
    renewed = repo.refresh(now)
    assert _roles(renewed) == [("timestamp", 2)]
    mirror.publish(renewed)
    client.updater()
    assert client.trusted("timestamp").signed.version == 2


# Load.


def _grown(setup: Setup) -> list[PublishedFile]:
    files = list(setup.created)
    files += setup.repo.add_target("runes/acme/sine/1.0.0", b"one", {"a": 1}, setup.now)
    files += setup.repo.add_target("runes/acme/sine/1.1.0", b"two", {"a": 2}, setup.now)
    return files


def test_load_round_trips(setup: Setup) -> None:
    files = _grown(setup)
    loaded = Repository.load(_latest(files), setup.online)
    for role in TOP_LEVEL_ROLES:
        assert getattr(loaded, role).to_bytes() == getattr(setup.repo, role).to_bytes()
    assert loaded.target_files.keys() == setup.repo.target_files.keys()

    # And it carries on where the original stopped.
    more = loaded.add_target("runes/acme/sine/1.2.0", b"three", {}, setup.now)
    assert _roles(more) == [("targets", 4), ("snapshot", 4), ("timestamp", 4)]
    setup.mirror.publish(files + more)
    setup.mirror.put_target("runes/acme/sine/1.2.0", b"three")
    assert setup.client.download("runes/acme/sine/1.2.0") == b"three"


@pytest.mark.parametrize("missing", TOP_LEVEL_ROLES)
def test_load_refuses_a_missing_role(setup: Setup, missing: str) -> None:
    latest = _latest(_grown(setup))
    del latest[missing]
    with pytest.raises(RepositoryError, match=missing):
        Repository.load(latest, setup.online)


@pytest.mark.parametrize("role", ONLINE_ROLES)
def test_load_refuses_a_signer_the_root_does_not_name(setup: Setup, role: str) -> None:
    signers = {**setup.online, role: _key()}
    with pytest.raises(RepositoryError, match=role):
        Repository.load(_latest(setup.created), signers)


@pytest.mark.parametrize("role", ONLINE_ROLES)
def test_load_refuses_a_missing_signer(setup: Setup, role: str) -> None:
    signers = dict(setup.online)
    del signers[role]
    with pytest.raises(RepositoryError, match=role):
        Repository.load(_latest(setup.created), signers)


def test_load_refuses_a_root_key_as_an_online_signer(setup: Setup) -> None:
    signers = {**setup.online, "targets": setup.root_signers[0]}
    with pytest.raises(RepositoryError, match="targets"):
        Repository.load(_latest(setup.created), signers)


@pytest.mark.parametrize("role", TOP_LEVEL_ROLES)
@pytest.mark.parametrize("garbage", [b"", b"\x00\xff not json", b"{}", b'{"signed": 1}'])
def test_load_refuses_unreadable_metadata_naming_the_role(
    setup: Setup, role: str, garbage: bytes
) -> None:
    latest = _latest(setup.created)
    latest[role] = garbage
    with pytest.raises(RepositoryError, match=rf"\b{role}\b"):
        Repository.load(latest, setup.online)


def test_load_refuses_one_role_stored_as_another(setup: Setup) -> None:
    latest = _latest(setup.created)
    latest["snapshot"] = latest["targets"]
    with pytest.raises(RepositoryError, match="snapshot.*targets|targets.*snapshot"):
        Repository.load(latest, setup.online)


# Root rotation.


def test_online_key_rotation(setup: Setup) -> None:
    setup.add("runes/acme/sine/1.0.0", b"before")
    assert setup.client.download("runes/acme/sine/1.0.0") == b"before"
    old_root = setup.repo.root
    old_targets_keyids = list(old_root.signed.roles["targets"].keyids)

    new_targets = _key()
    draft = setup.repo.draft_root(setup.now, online_keys={"targets": _public(new_targets)})
    assert draft.signed.version == 2
    assert draft.signed.roles["targets"].keyids == [_public(new_targets).keyid]
    assert draft.signatures == {}
    # The current root is untouched by the draft.
    assert setup.repo.root is old_root
    assert old_root.signed.version == 1
    assert old_root.signed.roles["targets"].keyids == old_targets_keyids

    _sign(draft, setup.root_signers[:2])  # k = 2 of n = 3
    files = setup.repo.accept_root(draft, {"targets": new_targets}, setup.now)
    assert _roles(files) == [("root", 2), ("targets", 3), ("snapshot", 3), ("timestamp", 3)]
    assert files[0].filename == "2.root.json"
    assert setup.repo.root.signed.version == 2
    _verify_chain(setup.repo)
    assert set(setup.repo.targets.signatures) == {_public(new_targets).keyid}
    with pytest.raises(UnsignedMetadataError):
        old_root.signed.verify_delegate(
            "targets", setup.repo.targets.signed_bytes, setup.repo.targets.signatures
        )

    # A device that trusted root v1 (and has v1-signed targets cached) follows the rotation.
    setup.mirror.publish(files)
    assert setup.client.download("runes/acme/sine/1.0.0") == b"before"
    assert setup.client.trusted("root").signed.version == 2
    assert setup.client.trusted("targets").signed.version == 3
    assert set(setup.client.trusted("targets").signatures) == {_public(new_targets).keyid}

    # New targets are signed with the new key, and the client takes them.
    setup.add("runes/acme/sine/2.0.0", b"after")
    assert setup.client.download("runes/acme/sine/2.0.0") == b"after"


@pytest.mark.parametrize("role", ONLINE_ROLES)
def test_rotating_an_online_key_resigns_that_role_and_those_that_list_it(
    setup: Setup, role: str
) -> None:
    setup.add("runes/acme/sine/1.0.0", b"x")
    setup.client.updater()
    new = _key()
    draft = _sign(setup.repo.draft_root(setup.now, {role: _public(new)}), setup.root_signers[1:])
    files = setup.repo.accept_root(draft, {role: new}, setup.now)
    rest = ONLINE_ROLES[ONLINE_ROLES.index(role) :]
    assert [f.role for f in files] == ["root", *rest]
    assert set(getattr(setup.repo, role).signatures) == {_public(new).keyid}
    _verify_chain(setup.repo)
    setup.mirror.publish(files)
    assert setup.client.download("runes/acme/sine/1.0.0") == b"x"
    assert set(setup.client.trusted(role).signatures) == {_public(new).keyid}


def test_timestamp_rotation_recovers_a_client_from_a_fast_forward(setup: Setup) -> None:
    """A stolen timestamp key pushed a client to timestamp v999; rotating the key recovers it."""
    setup.add("runes/acme/sine/1.0.0", b"x")
    forged = Metadata[Timestamp].from_bytes(setup.repo.timestamp.to_bytes())
    forged.signed.version = 999
    forged.sign(setup.online["timestamp"])
    setup.mirror.publish([PublishedFile("timestamp", 999, forged.to_bytes())])
    setup.client.updater()
    assert setup.client.trusted("timestamp").signed.version == 999

    new = _key()
    draft = setup.repo.draft_root(setup.now, {"timestamp": _public(new)})
    files = setup.repo.accept_root(
        _sign(draft, setup.root_signers[:2]), {"timestamp": new}, setup.now
    )
    assert _roles(files) == [("root", 2), ("timestamp", 3)]
    setup.mirror.publish(files)
    assert setup.client.download("runes/acme/sine/1.0.0") == b"x"
    assert setup.client.trusted("timestamp").signed.version == 3


def _targets_rotation(setup: Setup) -> tuple[Metadata[Root], CryptoSigner]:
    new = _key()
    return setup.repo.draft_root(setup.now, {"targets": _public(new)}), new


def _assert_unchanged(setup: Setup) -> None:
    """A refused rotation left the repository on root v1 with its old keys working."""
    assert setup.repo.root.signed.version == 1
    files = setup.repo.add_target("runes/acme/check/1", b"c", {}, setup.now)
    assert [f.role for f in files] == list(ONLINE_ROLES)
    _verify_chain(setup.repo)


def test_accept_root_refuses_fewer_than_k_current_root_signatures(setup: Setup) -> None:
    draft, new = _targets_rotation(setup)
    _sign(draft, setup.root_signers[:1])
    with pytest.raises(RepositoryError, match="current root keys"):
        setup.repo.accept_root(draft, {"targets": new}, setup.now)
    _assert_unchanged(setup)


def test_accept_root_refuses_an_unsigned_root(setup: Setup) -> None:
    draft, new = _targets_rotation(setup)
    with pytest.raises(RepositoryError, match="current root keys"):
        setup.repo.accept_root(draft, {"targets": new}, setup.now)
    _assert_unchanged(setup)


def test_accept_root_refuses_signatures_by_keys_that_are_not_root_keys(setup: Setup) -> None:
    draft, new = _targets_rotation(setup)
    _sign(draft, [*setup.online.values(), new, _key(), _key(), setup.root_signers[0]])
    with pytest.raises(RepositoryError, match="current root keys"):
        setup.repo.accept_root(draft, {"targets": new}, setup.now)
    _assert_unchanged(setup)


def test_accept_root_refuses_a_signature_over_other_bytes(setup: Setup) -> None:
    draft, new = _targets_rotation(setup)
    _sign(draft, setup.root_signers)
    draft.signed.expires += timedelta(days=1)  # changed after signing
    with pytest.raises(RepositoryError, match="current root keys"):
        setup.repo.accept_root(draft, {"targets": new}, setup.now)
    _assert_unchanged(setup)


@pytest.mark.parametrize("version", [1, 3, 0])
def test_accept_root_refuses_any_version_but_the_next(setup: Setup, version: int) -> None:
    draft, new = _targets_rotation(setup)
    draft.signed.version = version
    _sign(draft, setup.root_signers)
    with pytest.raises(RepositoryError, match="version"):
        setup.repo.accept_root(draft, {"targets": new}, setup.now)
    _assert_unchanged(setup)


def test_accept_root_refuses_an_expired_root(setup: Setup) -> None:
    draft, new = _targets_rotation(setup)
    draft.signed.expires = setup.now - timedelta(days=1)
    _sign(draft, setup.root_signers)
    with pytest.raises(RepositoryError, match="expired"):
        setup.repo.accept_root(draft, {"targets": new}, setup.now)
    _assert_unchanged(setup)


def test_accept_root_refuses_turning_consistent_snapshots_off(setup: Setup) -> None:
    draft, new = _targets_rotation(setup)
    draft.signed.consistent_snapshot = False
    _sign(draft, setup.root_signers)
    with pytest.raises(RepositoryError, match="consistent"):
        setup.repo.accept_root(draft, {"targets": new}, setup.now)
    _assert_unchanged(setup)


def test_accept_root_refuses_a_new_online_key_without_its_signer(setup: Setup) -> None:
    draft, _ = _targets_rotation(setup)
    _sign(draft, setup.root_signers)
    with pytest.raises(RepositoryError, match="targets"):
        setup.repo.accept_root(draft, {}, setup.now)
    _assert_unchanged(setup)


def test_accept_root_refuses_the_wrong_signer_for_a_new_online_key(setup: Setup) -> None:
    draft, _ = _targets_rotation(setup)
    _sign(draft, setup.root_signers)
    with pytest.raises(RepositoryError, match="targets"):
        setup.repo.accept_root(draft, {"targets": _key()}, setup.now)
    _assert_unchanged(setup)


def _root_rotation(setup: Setup) -> tuple[Metadata[Root], list[CryptoSigner]]:
    new_root = [_key() for _ in range(3)]
    draft = setup.repo.draft_root(setup.now, root_keys=[_public(s) for s in new_root], threshold=2)
    return draft, new_root


def test_root_key_rotation(setup: Setup) -> None:
    setup.add("runes/acme/sine/1.0.0", b"x")
    setup.client.updater()
    draft, new_root = _root_rotation(setup)
    assert draft.signed.version == 2
    assert set(draft.signed.roles["root"].keyids) == {_public(s).keyid for s in new_root}
    assert draft.signed.roles["root"].threshold == 2
    for role in ONLINE_ROLES:
        assert draft.signed.roles[role].keyids == setup.repo.root.signed.roles[role].keyids

    _sign(draft, [*setup.root_signers[:2], *new_root[1:]])  # k old and threshold new
    files = setup.repo.accept_root(draft, {}, setup.now)
    assert _roles(files) == [("root", 2)]  # no online key changed: nothing else to re-sign
    setup.mirror.publish(files)
    setup.client.updater()
    assert setup.client.trusted("root").signed.version == 2

    # From now on the old root keys are not needed: v3 is signed by the new keys only.
    draft3 = _sign(setup.repo.draft_root(setup.now), new_root[:2])
    files = setup.repo.accept_root(draft3, {}, setup.now)
    assert _roles(files) == [("root", 3)]
    setup.mirror.publish(files)
    assert setup.client.download("runes/acme/sine/1.0.0") == b"x"
    assert setup.client.trusted("root").signed.version == 3


@pytest.mark.parametrize(
    ("old", "new", "missing"),
    [
        (0, 3, "current root keys"),  # only the new keys
        (1, 3, "current root keys"),  # fewer than k old keys
        (3, 0, "its own root keys"),  # only the old keys
        (3, 1, "its own root keys"),  # fewer than the new threshold of new keys
    ],
)
def test_root_key_rotation_needs_both_thresholds(
    setup: Setup, old: int, new: int, missing: str
) -> None:
    draft, new_root = _root_rotation(setup)
    _sign(draft, [*setup.root_signers[:old], *new_root[:new]])
    with pytest.raises(RepositoryError, match=missing):
        setup.repo.accept_root(draft, {}, setup.now)
    _assert_unchanged(setup)


def test_draft_root_does_not_touch_the_current_root(setup: Setup) -> None:
    before = setup.repo.root.to_bytes()
    keyid_lists = {role: list(r.keyids) for role, r in setup.repo.root.signed.roles.items()}
    draft = setup.repo.draft_root(
        setup.now + timedelta(days=1),
        online_keys={role: _public(_key()) for role in ONLINE_ROLES},
        root_keys=[_public(_key())],
        threshold=1,
    )
    for role in TOP_LEVEL_ROLES:
        draft.signed.roles[role].keyids.append("f" * 64)
    draft.signed.roles["root"].threshold = 7
    draft.signed.keys.clear()
    assert setup.repo.root.to_bytes() == before
    assert {role: list(r.keyids) for role, r in setup.repo.root.signed.roles.items()} == keyid_lists
    assert setup.repo.root.signed.roles["root"].threshold == 2


def test_draft_root_expiry_and_defaults(setup: Setup) -> None:
    later = setup.now + timedelta(days=100)
    draft = setup.repo.draft_root(later)
    assert draft.signed.expires == (later + Lifetimes().root).replace(microsecond=0)
    current = setup.repo.root.signed
    assert draft.signed.keys.keys() == current.keys.keys()
    for role in TOP_LEVEL_ROLES:
        assert draft.signed.roles[role].keyids == current.roles[role].keyids
        assert draft.signed.roles[role].threshold == current.roles[role].threshold
    assert draft.signed.consistent_snapshot is True


@pytest.mark.parametrize("threshold", [0, 4])
def test_draft_root_refuses_an_impossible_threshold(setup: Setup, threshold: int) -> None:
    with pytest.raises(RepositoryError, match="threshold"):
        setup.repo.draft_root(setup.now, threshold=threshold)


def test_draft_root_refuses_a_threshold_above_the_new_root_keys(setup: Setup) -> None:
    # Two new keys, and the old threshold of 2 still fits; 3 does not.
    keys = [_public(_key()) for _ in range(2)]
    assert setup.repo.draft_root(setup.now, root_keys=keys).signed.roles["root"].threshold == 2
    with pytest.raises(RepositoryError, match="threshold"):
        setup.repo.draft_root(setup.now, root_keys=keys, threshold=3)
    with pytest.raises(RepositoryError, match="threshold"):
        setup.repo.draft_root(setup.now, root_keys=keys[:1])


@pytest.mark.parametrize("role", ["root", "delegated"])
def test_draft_root_refuses_an_online_key_for_a_role_that_is_not_online(
    setup: Setup, role: str
) -> None:
    with pytest.raises(RepositoryError, match=role):
        setup.repo.draft_root(setup.now, online_keys={role: _public(_key())})
