"""Signed update, per device: CPU of a full update check and install, against the raw crypto.

Measures, for a 100 KiB and a 1 MiB rune, the device's CPU (`time.process_time()`) for what
`agent.update.update` does minus the health check: open the slots and recover, build the TUF
client (it loads and verifies the trusted root), `TufClient.refresh()` against a fresh state dir
(so timestamp, snapshot and targets are all downloaded and verified), the target policy checks
(the signed `custom` metadata before download, the rune's own description after it),
`fetch_target()`, `Slots.install()` and `Slots.switch()`. Each iteration starts from a fresh state
dir holding only the provisioned `root.json`. Not measured: the health check, loading the device
identity (one registered identity is reused), and writing the fresh dir's `root.json`.

The baseline, measured in the same run and interleaved with the path: one `hashlib.sha256` over
the rune plus 3 Ed25519 verifies (`cryptography`, keys already loaded) of the canonical signed
bytes of timestamp, snapshot and targets, the minimum TUF needs when the root has not changed
(a changed root adds a verify per signature, by the old and the new root keys).

The update server (`tests.tuf_server.TufServer`, which also checks every request's device
signature) runs in a separate process, so `process_time()` counts the client alone; wall time
includes the server's work, the loopback network and fsync waits.

The runes are real legacy runes (`tests.legacy_runes.capability_rune`, reading RAND) padded to
size with a `.rune_resource` record, since the checks after download inspect the file.
The server speaks HTTP/1.1 with keep-alive and TCP_NODELAY, like the controller (aiohttp);
`--http10` keeps the test server's HTTP/1.0, which opens a connection per request.
Run: `.venv/bin/python -m bench.bench_update` (`--json` for one machine-readable line,
`--profile` to add a cProfile breakdown of where the CPU goes).
"""

from __future__ import annotations

import cProfile
import functools
import hashlib
import json
import multiprocessing
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from unittest import mock

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater

from agent.policy import AgentPolicy
from agent.slots import SlotRune, Slots
from agent.update import agent_version, enforce_revocations, tuf_client
from attestation.identity import DeviceIdentity
from ota.fetcher import TufFetcher
from ota.repository import ONLINE_ROLES, Repository
from ota.rune.runefile import CapabilityKind
from ota.target_policy import (
    AllOf,
    CapabilitiesAllowed,
    KindSupported,
    MinimumAgentVersion,
    RequestedTarget,
    rune_matches_target,
)
from ota.targets import RuneTarget
from ota.updater import UpdateRefused
from tests.legacy_runes import capability_rune, label
from tests.tuf_server import TARGETS, TufServer, target_url_path

SIZES = {"100 KiB": 100 * 1024, "1 MiB": 1024 * 1024}
ITERATIONS = 30
WARMUP = 2
BASELINE_PER_ITERATION = 10
TARGET_RATIO = 10.0
VERIFIES_NEEDED = ("timestamp", "snapshot", "targets")  # root unchanged: no root verify
PHASES = (
    "open slots + recover",
    "TUF client (loads trusted root)",
    "refresh: timestamp, snapshot, targets",
    "revocations + policy on signed metadata",
    "fetch_target (download + verify)",
    "rune matches target (inspect)",
    "Slots.install (fsynced)",
    "Slots.switch (fsynced)",
)
PROFILE_ITERATIONS = 10


# -- the repository and the server ----------------------------------------------------------------


def padded_rune(size: int) -> bytes:
    """A legacy rune reading RAND, exactly `size` bytes: the rest is a `weights` resource."""
    base = capability_rune(CapabilityKind.RAND, 16)
    filler = random.Random(size).randbytes(size)
    pad = size - len(base)
    for _ in range(4):
        rune = label(base, version=None, resources={"weights": filler[:pad]})
        if len(rune) == size:
            return rune
        pad -= len(rune) - size
    raise ValueError(f"cannot pad a rune to exactly {size} bytes")


@dataclass
class Fleet:
    """A signed repository with one rune per size, and the device that will fetch them."""

    metadata: dict[str, bytes]
    targets: dict[str, bytes]
    root_json: bytes
    runes: dict[str, tuple[RuneTarget, bytes]]
    identity: DeviceIdentity
    online_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)


def build_fleet(folder: Path) -> Fleet:
    now = datetime.now(UTC)
    root_key = CryptoSigner.generate_ed25519()
    online: dict[str, Signer] = {role: CryptoSigner.generate_ed25519() for role in ONLINE_ROLES}
    repo, files = Repository.create([root_key], 1, online, now)
    metadata = {f.filename: f.data for f in files}
    targets: dict[str, bytes] = {}
    runes: dict[str, tuple[RuneTarget, bytes]] = {}
    for label_, size in SIZES.items():
        name = f"weights-{size // 1024}k"
        target = RuneTarget("bench", name, "1.0.0", "legacy", ("RAND",), "0.1.0")
        data = padded_rune(size)
        for published in repo.add_target(target.path, data, target.to_custom(), now):
            metadata[published.filename] = published.data
        targets[target_url_path(target.path, data)[len(TARGETS) :]] = data
        runes[label_] = (target, data)
    root = Metadata[Root].from_bytes(metadata["1.root.json"]).signed
    keys = {
        role: Ed25519PublicKey.from_public_bytes(
            bytes.fromhex(root.get_key(root.roles[role].keyids[0]).keyval["public"])
        )
        for role in ONLINE_ROLES
    }
    identity = DeviceIdentity.load_or_create(folder / "identity")
    return Fleet(metadata, targets, metadata["1.root.json"], runes, identity, keys)


def serve(
    conn: Connection, fleet: tuple[dict[str, bytes], dict[str, bytes], str, Any], keep_alive: bool
) -> None:
    """The update server, in its own process: send back its URL, serve until told to stop."""
    metadata, targets, device_id, (keyid, key) = fleet
    server = TufServer(metadata=metadata, targets=targets)
    server.register(device_id, SSlibKey.from_dict(keyid, key))
    if keep_alive:
        # The controller (aiohttp) speaks HTTP/1.1, keeps the connection open between the
        # requests of one update and sets TCP_NODELAY; the test server's handler defaults to
        # HTTP/1.0 (one connection per request) with Nagle on, which with keep-alive stalls each
        # response body ~40 ms behind the client's delayed ACK. Every response it sends has a
        # Content-Length, so HTTP/1.1 is safe.
        handler = server._httpd.RequestHandlerClass
        if not (isinstance(handler, type) and issubclass(handler, BaseHTTPRequestHandler)):
            raise TypeError("the test server's handler is not a BaseHTTPRequestHandler")
        handler.protocol_version = "HTTP/1.1"
        handler.disable_nagle_algorithm = True
    with server:
        conn.send(server.url)
        conn.recv()


@contextmanager
def server_process(fleet: Fleet, keep_alive: bool) -> Iterator[str]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    public = fleet.identity.public_key
    args = (
        fleet.metadata,
        fleet.targets,
        fleet.identity.device_id,
        (public.keyid, public.to_dict()),
    )
    process = context.Process(target=serve, args=(theirs, args, keep_alive), daemon=True)
    process.start()
    try:
        if not ours.poll(60):
            raise RuntimeError("the update server did not start within 60 s")
        url: str = ours.recv()
        yield url
    finally:
        ours.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


# -- the measured path and the baseline -----------------------------------------------------------


class Laps:
    """CPU and wall time of each phase of one run."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def lap(self, phase: str) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - self._cpu
        self.wall[phase] = self.wall.get(phase, 0.0) + wall - self._wall
        self._cpu, self._wall = cpu, wall


def fresh_state(parent: Path, root_json: bytes) -> Path:
    state = Path(tempfile.mkdtemp(dir=parent))
    (state / "tuf").mkdir(mode=0o700)
    (state / "tuf" / "root.json").write_bytes(root_json)
    return state


def update_once(state: Path, url: str, identity: DeviceIdentity, target: RuneTarget) -> Laps:
    """`agent.update.update` without the health check, with a lap after each step."""
    policy = AgentPolicy()
    laps = Laps()
    now = time.time()
    slots = Slots(state, policy=policy.probation)
    slots.recover(now)
    laps.lap(PHASES[0])
    client = tuf_client(state, url, identity)
    laps.lap(PHASES[1])
    client.refresh()
    laps.lap(PHASES[2])
    enforce_revocations(slots, client, now)
    signed_target = client.rune_target(target.path)
    checks = AllOf(
        RequestedTarget(target.org, target.name, target.version),
        KindSupported(),
        CapabilitiesAllowed(policy.allowed_capabilities),
        MinimumAgentVersion(agent_version()),
    )
    if not checks.check(signed_target):
        raise UpdateRefused(f"{target.ref}: refused by the policy", "policy")
    if client.target_info(target.path) is None or slots.active(now) is not None:
        raise RuntimeError("the bench expects a published target and an empty device")
    laps.lap(PHASES[3])
    verified = client.fetch_target(target.path)
    laps.lap(PHASES[4])
    matches = rune_matches_target(signed_target, verified.data)
    if not matches:
        raise UpdateRefused(f"{target.ref}: {matches.reason}", "wrong-software")
    laps.lap(PHASES[5])
    info = SlotRune(
        target=signed_target.path,
        org=signed_target.org,
        name=signed_target.name,
        version=signed_target.version,
        sha256=verified.sha256,
        length=verified.length,
        kind=signed_target.kind,
        capabilities=signed_target.capabilities,
        installed_at=now,
    )
    slot = slots.install(verified.data, info, verified=verified)
    laps.lap(PHASES[6])
    slots.switch(slot, now)
    laps.lap(PHASES[7])
    return laps


@dataclass(frozen=True)
class RawCheck:
    """One signature TUF must check: the public key, the signature, the canonical signed bytes."""

    key: Ed25519PublicKey
    signature: bytes
    payload: bytes


def raw_checks(fleet: Fleet) -> list[RawCheck]:
    files = {"timestamp": fleet.metadata["timestamp.json"]}
    snapshot_version = max(
        int(n.split(".")[0]) for n in fleet.metadata if n.endswith("snapshot.json")
    )
    targets_version = max(
        int(n.split(".")[0]) for n in fleet.metadata if n.endswith("targets.json")
    )
    files["snapshot"] = fleet.metadata[f"{snapshot_version}.snapshot.json"]
    files["targets"] = fleet.metadata[f"{targets_version}.targets.json"]
    checks = []
    for role in VERIFIES_NEEDED:
        md = Metadata.from_bytes(files[role])
        (signature,) = md.signatures.values()
        check = RawCheck(
            fleet.online_keys[role], bytes.fromhex(signature.signature), md.signed_bytes
        )
        check.key.verify(check.signature, check.payload)
        checks.append(check)
    return checks


def raw_cost(data: bytes, checks: list[RawCheck]) -> tuple[float, float]:
    """CPU seconds of one SHA-256 over `data`, and of the verifies in `checks`."""
    start = time.process_time()
    hashlib.sha256(data).digest()
    hashed = time.process_time()
    for check in checks:
        check.key.verify(check.signature, check.payload)
    return hashed - start, time.process_time() - hashed


@dataclass
class Result:
    size: int
    hash_cpu: list[float] = field(default_factory=list)
    verify_cpu: list[float] = field(default_factory=list)
    runs: list[Laps] = field(default_factory=list)

    @property
    def raw_s(self) -> float:
        return statistics.median(h + v for h, v in zip(self.hash_cpu, self.verify_cpu, strict=True))

    @property
    def cpu_s(self) -> float:
        return statistics.median(sum(r.cpu.values()) for r in self.runs)

    @property
    def wall_s(self) -> float:
        return statistics.median(sum(r.wall.values()) for r in self.runs)

    @property
    def cpu_range_s(self) -> tuple[float, float]:
        totals = [sum(r.cpu.values()) for r in self.runs]
        return min(totals), max(totals)

    def phase_cpu_s(self, phase: str) -> float:
        return statistics.median(r.cpu[phase] for r in self.runs)

    def phase_wall_s(self, phase: str) -> float:
        return statistics.median(r.wall[phase] for r in self.runs)

    @property
    def ratio(self) -> float:
        return self.cpu_s / self.raw_s


def measure(fleet: Fleet, url: str, folder: Path, checks: list[RawCheck]) -> dict[str, Result]:
    results = {label_: Result(len(data)) for label_, (_, data) in fleet.runes.items()}
    for iteration in range(-WARMUP, ITERATIONS):
        for label_, (target, data) in fleet.runes.items():
            result = results[label_]
            for _ in range(BASELINE_PER_ITERATION):
                hashed, verified = raw_cost(data, checks)
                if iteration >= 0:
                    result.hash_cpu.append(hashed)
                    result.verify_cpu.append(verified)
            state = fresh_state(folder, fleet.root_json)
            laps = update_once(state, url, fleet.identity, target)
            shutil.rmtree(state)
            if iteration >= 0:
                result.runs.append(laps)
    return results


@dataclass
class Counts:
    verifies: list[str] = field(default_factory=list)
    signs: int = 0
    fsyncs: int = 0
    replaces: int = 0


def count_crypto(fleet: Fleet, url: str, folder: Path) -> Counts:
    """The Ed25519 verifies (by role) and signs, fsyncs and file replacements (`os.replace`)
    one run of the path makes, 100 KiB rune."""
    counts = Counts()
    roles = {
        keyid: role
        for role, r in Metadata[Root].from_bytes(fleet.root_json).signed.roles.items()
        for keyid in r.keyids
    }
    verify = SSlibKey.verify_signature
    sign = CryptoSigner.sign
    fsync, replace = os.fsync, os.replace

    def counted_verify(key: SSlibKey, signature: Any, data: bytes) -> None:
        counts.verifies.append(roles.get(key.keyid, key.keyid[:8]))
        verify(key, signature, data)

    def counted_sign(signer: CryptoSigner, payload: bytes) -> Any:
        counts.signs += 1
        return sign(signer, payload)

    def counted_fsync(fd: int) -> None:
        counts.fsyncs += 1
        fsync(fd)

    def counted_replace(source: Any, destination: Any) -> None:
        counts.replaces += 1
        replace(source, destination)

    target, _ = fleet.runes["100 KiB"]
    state = fresh_state(folder, fleet.root_json)
    with (
        mock.patch.object(SSlibKey, "verify_signature", autospec=True, side_effect=counted_verify),
        mock.patch.object(CryptoSigner, "sign", autospec=True, side_effect=counted_sign),
        mock.patch.object(os, "fsync", side_effect=counted_fsync),
        mock.patch.object(os, "replace", side_effect=counted_replace),
    ):
        update_once(state, url, fleet.identity, target)
    shutil.rmtree(state)
    return counts


# -- the floor: python-tuf's ngclient alone -------------------------------------------------------

FLOOR_BASE = "http://floor.invalid"


class MemoryFetcher(FetcherInterface):
    """Serves the repository from memory: no HTTP, no request signing, no disk."""

    def __init__(self, fleet: Fleet) -> None:
        self._files = {
            f"{FLOOR_BASE}/metadata/{name}": data for name, data in fleet.metadata.items()
        }
        self._files.update({f"{FLOOR_BASE}/targets/{n}": d for n, d in fleet.targets.items()})

    def _fetch(self, url: str) -> Iterator[bytes]:
        data = self._files.get(url)
        if data is None:
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter((data,))


def floor_once(fleet: Fleet, folder: Path, target: RuneTarget) -> float:
    """CPU seconds of the least any ngclient-based update check of `target` costs: build an
    `Updater` on a fresh metadata dir, refresh, look the target up, and check the rune's
    length and hashes. What ngclient does itself stays in (loading and verifying the trusted
    root, persisting each metadata file); our HTTP, request auth, policy and slots are out."""
    state = fresh_state(folder, fleet.root_json)
    fetcher = MemoryFetcher(fleet)
    start = time.process_time()
    updater = Updater(
        str(state / "tuf"),
        f"{FLOOR_BASE}/metadata/",
        str(state),
        f"{FLOOR_BASE}/targets/",
        fetcher=fetcher,
        bootstrap=None,
    )
    updater.refresh()
    info = updater.get_targetinfo(target.path)
    if info is None:
        raise RuntimeError(f"{target.path} is not published")
    directory, _, basename = target.path.rpartition("/")
    data = b"".join(
        fetcher.fetch(f"{FLOOR_BASE}/targets/{directory}/{info.hashes['sha256']}.{basename}")
    )
    info.verify_length_and_hashes(data)
    spent = time.process_time() - start
    shutil.rmtree(state)
    return spent


def measure_floor(fleet: Fleet, folder: Path) -> dict[str, float]:
    """Median CPU seconds of `floor_once` per rune size."""
    floors: dict[str, list[float]] = {label_: [] for label_ in fleet.runes}
    for iteration in range(-WARMUP, ITERATIONS):
        for label_, (target, _) in fleet.runes.items():
            spent = floor_once(fleet, folder, target)
            if iteration >= 0:
                floors[label_].append(spent)
    return {label_: statistics.median(values) for label_, values in floors.items()}


# -- profile --------------------------------------------------------------------------------------

REPO = str(Path(__file__).resolve().parent.parent)
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Ed25519 verify/sign (cryptography, Rust)", ("cryptography",)),
    ("SHA-256 (hashlib)", ("_hashlib", "/hashlib.py")),
    ("canonical JSON (securesystemslib.formats)", ("securesystemslib/formats.py",)),
    ("securesystemslib keys and signer", ("securesystemslib",)),
    ("python-tuf: metadata model, ngclient", ("/tuf/",)),
    ("HTTP: urllib3, http.client, email, socket", ("/urllib3/", "/http/", "/email/", "socket")),
    ("JSON parse/dump (stdlib)", ("/json/", "_json")),
    ("wasmtime (module validation in the inspect)", ("wasmtime",)),
    (
        "file I/O, fsync, tempfile, pathlib",
        ("posix.", "_io.", "/tempfile.py", "/shutil.py", "/pathlib.py", "/os.py", "fcntl"),
    ),
)
OURS = "ours: agent/, ota/, attestation/ (pure Python)"
HOT_SPOTS = (
    ("tuf/api/metadata.py", "signed_bytes", "Metadata.signed_bytes (canonical JSON)"),
    ("tuf/api/metadata.py", "from_bytes", "Metadata.from_bytes (JSON parse + model)"),
    ("ota/request_auth.py", "sign_request", "sign_request (device auth header)"),
    ("urllib3/poolmanager.py", "urlopen", "urllib3 request + response headers"),
    ("ota/target_policy.py", "_describe", "rune_matches_target: custom sections + validate"),
    ("agent/slots.py", "_write_file", "slots: write + fsync files"),
    ("agent/slots.py", "_check", "slots: read back + re-hash a slot"),
    ("importlib/metadata/__init__.py", "version", "importlib.metadata.version (agent version)"),
)


def category(filename: str, name: str) -> str:
    if filename.startswith(REPO) and "/.venv/" not in filename:
        return OURS if "/tests/" not in filename else "test server helpers"
    text = f"{filename} {name}"
    for label_, needles in CATEGORIES:
        if any(needle in text for needle in needles):
            return label_
    return "other stdlib and interpreter"


def profile(fleet: Fleet, url: str, folder: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for label_, (target, _) in fleet.runes.items():
        # CPU timer: the default wall clock would charge socket and fsync waits to the callee.
        profiler = cProfile.Profile(time.process_time)
        for _ in range(PROFILE_ITERATIONS):
            state = fresh_state(folder, fleet.root_json)
            profiler.enable()
            update_once(state, url, fleet.identity, target)
            profiler.disable()
            shutil.rmtree(state)
        stats: dict[Any, Any] = vars(pstats.Stats(profiler))["stats"]
        total = sum(entry[2] for entry in stats.values())
        by_category: dict[str, float] = {}
        for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
            key = category(filename, name)
            by_category[key] = by_category.get(key, 0.0) + tottime
        hot = {}
        for file_part, func, title in HOT_SPOTS:
            # The largest match: a name can also be a wrapper around itself (importlib.metadata).
            matches = [
                entry
                for (filename, _line, name), entry in stats.items()
                if filename.endswith(file_part) and name == func
            ]
            biggest: Any = max(matches, key=lambda entry: entry[3], default=(0, 0, 0.0, 0.0, {}))
            hot[title] = (biggest[1] / PROFILE_ITERATIONS, biggest[3] / total)
        top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:12]
        report[label_] = {
            "per_run_ms": total / PROFILE_ITERATIONS * 1000,
            "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "total": total,
            "hot": hot,
            "top": [
                (f"{Path(f).name}:{line} {name}", entry[1] / PROFILE_ITERATIONS, entry[2] / total)
                for (f, line, name), entry in top
            ],
        }
    return report


def cpu_ms(fn: Callable[[], object], repeat: int = 30) -> float:
    """Median CPU milliseconds of `fn()`, without a profiler."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return statistics.median(samples) * 1000


def direct_costs(fleet: Fleet, url: str, folder: Path) -> dict[str, float]:
    """The pieces the profile points at, timed alone: cProfile inflates many-small-call code."""
    roles = ["1.root.json", "timestamp.json", "3.snapshot.json", "3.targets.json"]
    parsed = [Metadata.from_bytes(fleet.metadata[name]) for name in roles]
    state = fresh_state(folder, fleet.root_json)
    fetcher = TufFetcher.for_device(fleet.identity)
    timestamp_url = f"{url}/tuf/metadata/timestamp.json"
    costs = {
        "Metadata.from_bytes of root, timestamp, snapshot, targets": cpu_ms(
            lambda: [Metadata.from_bytes(fleet.metadata[name]) for name in roles]
        ),
        "Metadata.signed_bytes (canonical JSON) of the same four": cpu_ms(
            lambda: [md.signed_bytes for md in parsed]
        ),
        "one metadata GET via TufFetcher (signed, urllib3, in memory)": cpu_ms(
            lambda: fetcher.download_bytes(timestamp_url, 16 * 1024)
        ),
        "tuf_client(): an ngclient Updater loads, verifies, persists root": cpu_ms(
            lambda: tuf_client(state, url, fleet.identity)
        ),
        "agent_version() (importlib.metadata)": cpu_ms(agent_version),
    }
    for label_, (target, data) in fleet.runes.items():
        costs[f"rune_matches_target, {label_} (custom sections + validate)"] = cpu_ms(
            functools.partial(rune_matches_target, target, data)
        )
    shutil.rmtree(state)
    return costs


def print_profile(report: dict[str, Any], results: dict[str, Result]) -> None:
    for label_, data in report.items():
        print(
            f"\ncProfile (CPU timer), {label_} rune, {PROFILE_ITERATIONS} runs: "
            f"{data['per_run_ms']:.1f} ms CPU per run under the profiler, "
            f"{results[label_].cpu_s * 1000:.1f} ms without; own time by area:"
        )
        for name, seconds in data["categories"].items():
            print(f"  {seconds / data['total']:6.1%}  {name}")
        print("  including (cumulative share; calls per run):")
        for title, (calls, share) in data["hot"].items():
            print(f"  {share:6.1%}  {title}  ({calls:g} calls)")
        print("  top functions by own time (calls per run, share):")
        for name, calls, share in data["top"]:
            print(f"  {share:6.1%}  {name}  ({calls:g})")


# -- output ---------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def main() -> None:
    as_json = "--json" in sys.argv
    keep_alive = "--http10" not in sys.argv
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        fleet = build_fleet(folder)
        checks = raw_checks(fleet)
        with server_process(fleet, keep_alive) as url:
            results = measure(fleet, url, folder, checks)
            floors = measure_floor(fleet, folder)
            counts = count_crypto(fleet, url, folder)
            report = profile(fleet, url, folder) if "--profile" in sys.argv else None
            direct = direct_costs(fleet, url, folder) if report is not None else {}

    out: dict[str, Any] = {
        "iterations": ITERATIONS,
        "http": "1.1 keep-alive" if keep_alive else "1.0, one connection per request",
        "baseline_verifies": len(checks),
        "path_verifies": counts.verifies,
        "path_signs": counts.signs,
        "path_fsyncs": counts.fsyncs,
        "path_replaces": counts.replaces,
    }
    for label_, result in results.items():
        key = label_.replace(" ", "").lower()
        out[key] = {
            "rune_bytes": result.size,
            "raw_sha256_us": round(statistics.median(result.hash_cpu) * 1e6, 1),
            "raw_verifies_us": round(statistics.median(result.verify_cpu) * 1e6, 1),
            "raw_us": round(result.raw_s * 1e6, 1),
            "update_cpu_ms": round(result.cpu_s * 1000, 2),
            "update_cpu_ms_min_max": [round(t * 1000, 2) for t in result.cpu_range_s],
            "update_wall_ms": round(result.wall_s * 1000, 2),
            "ratio": round(result.ratio, 1),
            "ngclient_floor_cpu_ms": round(floors[label_] * 1000, 2),
            "ngclient_floor_ratio": round(floors[label_] / result.raw_s, 1),
            "within_target": result.ratio <= TARGET_RATIO,
            "phases_cpu_ms": {p: round(result.phase_cpu_s(p) * 1000, 2) for p in PHASES},
            "phases_wall_ms": {p: round(result.phase_wall_s(p) * 1000, 2) for p in PHASES},
        }
    if as_json:
        if report is not None:
            out["profile"] = {
                label_: {k: round(v / data["total"], 3) for k, v in data["categories"].items()}
                for label_, data in report.items()
            }
            out["direct_cpu_ms"] = {k: round(v, 3) for k, v in direct.items()}
        print(json.dumps(out))
        return

    labels = list(results)
    http = "HTTP/1.1 keep-alive" if keep_alive else "HTTP/1.0, a connection per request"
    print(
        f"Signed update per device, medians of {ITERATIONS} runs; CPU = this process only; {http}"
    )
    print(f"{'':40}" + "".join(f"{label_:>22}" for label_ in labels))
    print(f"{'':40}" + "".join(f"{'CPU ms':>11}{'wall ms':>11}" for _ in labels))
    for phase in PHASES:
        cells = "".join(
            f"   {ms(results[x].phase_cpu_s(phase))}   {ms(results[x].phase_wall_s(phase))}"
            for x in labels
        )
        print(f"{phase:40}{cells}")
    cells = "".join(
        f"   {ms(results[label_].cpu_s)}   {ms(results[label_].wall_s)}" for label_ in labels
    )
    print(f"{'total (median of run totals)':40}{cells}")
    print()
    for label_ in labels:
        result = results[label_]
        hash_us = statistics.median(result.hash_cpu) * 1e6
        verify_us = statistics.median(result.verify_cpu) * 1e6
        verdict = "within" if result.ratio <= TARGET_RATIO else "ABOVE"
        fastest, slowest = result.cpu_range_s
        print(
            f"{label_} rune ({result.size} bytes): raw = SHA-256 {hash_us:.0f} us + "
            f"{len(checks)} Ed25519 verifies {verify_us:.0f} us = {result.raw_s * 1e6:.0f} us; "
            f"update = {result.cpu_s * 1000:.1f} ms CPU (runs {fastest * 1000:.1f}-"
            f"{slowest * 1000:.1f}) = {result.ratio:.1f}x raw "
            f"({verdict} the {TARGET_RATIO:g}x target)"
        )
    for label_ in labels:
        floor, raw = floors[label_], results[label_].raw_s
        print(
            f"{label_} rune: python-tuf ngclient alone (Updater + refresh + lookup + hash check, "
            f"in memory, no HTTP, no slots) = {floor * 1000:.2f} ms CPU = {floor / raw:.1f}x raw"
        )
    print(
        f"\nEd25519 verifies the path makes: {len(counts.verifies)} "
        f"({', '.join(counts.verifies)}); the baseline counts {len(checks)} "
        f"({', '.join(VERIFIES_NEEDED)}). Ed25519 signs (request auth): {counts.signs}. "
        f"fsyncs: {counts.fsyncs}; file replacements (os.replace): {counts.replaces}."
    )
    if report is not None:
        print_profile(report, results)
        print("\nThe same pieces timed alone, without the profiler (median CPU ms):")
        for name, value in direct.items():
            print(f"  {value:7.3f}  {name}")


if __name__ == "__main__":
    main()
