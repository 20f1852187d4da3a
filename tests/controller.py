"""A real controller for tests: `fleetctl init` + `fleetctl serve` in a subprocess, and clients.

Everything here drives the shipped console script against a real database, so a test sees what an
operator or a device sees: exit codes, HTTP statuses, signed TUF metadata.

- `start_controller(tmp_path, db_url)` makes a fleet in `tmp_path / "fleet"` (3 root keys,
  threshold 2; `config` overrides settings in fleet.yaml before the first start) and serves it on
  a free port on 127.0.0.1. It returns a `RunningController`; stop it with `stop()`, which asserts
  the graceful shutdown (exit 0 within `STOP_TIMEOUT_S` of SIGTERM).
- `controller_for(backend, tmp_path)` is the same as a context manager over a backend name
  (`"sqlite"` or `"postgres"`): for PostgreSQL it makes a fresh database on the server named by
  FLEET_TEST_POSTGRES_URL (skipped when unset, failed when CI requires it) and drops it afterwards.
- `RunningController.cli(...)` runs `fleetctl` against it; `api(...)` calls its REST API (admin
  token by default, `token=None` for no token at all); `device(state_dir)` registers a new device
  and returns a `Device` that makes signed requests and runs a real TUF client (`ngclient`)
  bootstrapped from the fleet's first root.json; `enroll(state_dir, ...)` runs
  `fleet-agent enroll -o json` against it (`fleet_agent(...)` runs any agent command).
- `fresh_postgres_database(server_url)` gives a private database (`fleet_test_<hex>`) and drops it.
- `fleetctl(...)` runs the command without a controller (init, serve failures); `init_fleet` and
  `spawn_serve` are the two halves of `start_controller` for tests that need only one.
- `build_example` and `write_legacy_rune` make runes to push.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
import urllib3
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent.attester import StoredResult, attester_for
from attestation.identity import DeviceIdentity
from attestation.keys import raw_public_bytes
from ota.request_auth import PASSPORT_HEADER, sign_request

_json = json  # `RunningController.api` takes a parameter called json

FLEETCTL = str(Path(sys.executable).parent / "fleetctl")
FLEET_AGENT = str(Path(sys.executable).parent / "fleet-agent")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 60.0
BACKENDS = ("sqlite", "postgres")
# For `@pytest.fixture(params=BACKEND_PARAMS)`: PostgreSQL is a `service` test.
BACKEND_PARAMS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.service),
]
POSTGRES_ENV = "FLEET_TEST_POSTGRES_URL"
# Variables that would point a fleetctl child at some other fleet, server or database.
_SCRUBBED_ENV = ("FLEET_DIR", "FLEET_DB_URL", "FLEET_SERVER", "FLEET_TOKEN")
# ... and a fleet-agent child at another state dir or enrollment token, or crash it.
_SCRUBBED_AGENT_ENV = ("FLEET_AGENT_STATE_DIR", "FLEET_ENROLL_TOKEN", "FLEET_AGENT_KILL_AT")


class _Admin(Enum):
    TOKEN = "admin"


AS_ADMIN = _Admin.TOKEN
"""The default for every `token=` argument: use the fleet's admin token. `None` sends no token."""

TokenArg = str | None | _Admin


def _env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["COLUMNS"] = "200"  # rich tables: wide enough that values are not wrapped or cut
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def fleetctl(
    *args: str | Path,
    env: Mapping[str, str | None] | None = None,
    timeout: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run `fleetctl ARGS` with a clean environment (plus `env`; a None value unsets)."""
    return subprocess.run(
        [FLEETCTL, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(env),
        check=False,
    )


def fleet_agent(
    *args: str | Path,
    env: Mapping[str, str | None] | None = None,
    timeout: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run `fleet-agent ARGS` with a clean environment (plus `env`; a None value unsets)."""
    scrubbed = {name: None for name in _SCRUBBED_AGENT_ENV}
    return subprocess.run(
        [FLEET_AGENT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env({**scrubbed, **(env or {})}),
        check=False,
    )


def init_fleet(fleet_dir: Path, db_url: str | None = None) -> dict[str, Any]:
    """`fleetctl init -o json` with 3 root keys, threshold 2; the parsed JSON it prints."""
    command: list[str | Path] = ["init", "--dir", fleet_dir, "-o", "json"]
    command += ["--root-keys", "3", "--root-threshold", "2"]
    if db_url:
        command += ["--db-url", db_url]
    result = fleetctl(*command)
    assert result.returncode == 0, f"fleetctl init failed ({result.returncode}): {result.stderr}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# PostgreSQL.


def postgres_server_url() -> str:
    """FLEET_TEST_POSTGRES_URL, with the skip/fail rules of the `postgres_url` fixture."""
    from tests.conftest import _service  # the same rules, usable from module-scoped fixtures

    return _service(POSTGRES_ENV)


async def _admin_sql(server_url: str, statement: str) -> None:
    connection = await asyncpg.connect(server_url, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty database `fleet_test_<hex>` on `server_url`'s server, dropped afterwards.

    Its URL is `server_url` with the database name replaced. Call it from synchronous code (it
    runs its own event loop); the drop forces out leftover connections (PostgreSQL 13+).
    """
    name = f"fleet_test_{secrets.token_hex(6)}"
    asyncio.run(_admin_sql(server_url, f'CREATE DATABASE "{name}"'))
    try:
        parts = urlsplit(server_url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        asyncio.run(_admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# The controller.


@dataclass
class RunningController:
    """A `fleetctl serve` process and what `fleetctl init` made for it.

    `offline_keys` are the *current* root key files: a test that rotates the root keys replaces
    them here, so later rotations sign with the right keys.
    """

    url: str
    token: str = field(repr=False)
    fleet_dir: Path
    root_json: Path
    offline_keys: list[Path]
    db_url: str | None
    process: subprocess.Popen[bytes]
    serve_args: tuple[str, ...] = ()
    _http: urllib3.PoolManager = field(
        default_factory=lambda: urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0), retries=False, maxsize=8
        ),
        repr=False,
    )
    _starts: int = field(default=1, repr=False)
    _killed: bool = field(default=False, repr=False)

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def stderr(self) -> str:
        """Everything the current serve process has logged so far."""
        return self._logs.with_suffix(".stderr").read_text(errors="replace")

    @property
    def _logs(self) -> Path:
        return self.fleet_dir.parent / f"serve-{self._starts}"

    def _token(self, token: TokenArg) -> str | None:
        return self.token if token is AS_ADMIN else token

    # Clients.

    def cli(
        self,
        *args: str | Path,
        check: bool = True,
        token: TokenArg = AS_ADMIN,
        timeout: float = CLI_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run `fleetctl ARGS` with FLEET_SERVER and FLEET_TOKEN set for this controller.

        With `check`, a non-zero exit fails the test with fleetctl's stderr.
        """
        result = fleetctl(
            *args,
            env={"FLEET_SERVER": self.url, "FLEET_TOKEN": self._token(token)},
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, (
                f"fleetctl {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}"
            )
        return result

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """A raw HTTP request to the controller (no token, nothing added); `timeout` in s."""
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = urllib3.Timeout(connect=5.0, read=timeout)
        return self._http.request(
            method, self.url + path, body=body, headers=dict(headers or {}), **extra
        )

    def api(
        self,
        method: str,
        path: str,
        json: Any = None,
        body: bytes | None = None,
        token: TokenArg = AS_ADMIN,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """Call the REST API; (status, the JSON body parsed, or the raw bytes if not JSON)."""
        headers: dict[str, str] = {}
        bearer = self._token(token)
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        if json is not None:
            body = _json.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        if params:
            from urllib.parse import urlencode

            path = f"{path}?{urlencode(params)}"
        response = self.request(method, path, body=body, headers=headers, timeout=timeout)
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return response.status, _json.loads(response.data)
        return response.status, response.data

    def push(self, path: Path, org: str = "acme", **params: str) -> dict[str, Any]:
        """POST a rune file (params: name, version, min_agent_version); the 200/201 JSON."""
        status, body = self.api(
            "POST", "/api/v1/runes", body=path.read_bytes(), params={"org": org, **params}
        )
        assert status in (200, 201), f"pushing {path} gave {status}: {body}"
        result: dict[str, Any] = body
        return result

    def register_device(self, public_key_hex: str, labels: Mapping[str, str] | None = None) -> str:
        """Register a device key (hex); its device id."""
        status, body = self.api(
            "POST",
            "/api/v1/devices",
            json={"public_key": public_key_hex, "labels": dict(labels or {})},
        )
        assert status in (200, 201), f"registering a device gave {status}: {body}"
        device_id: str = body["id"]
        return device_id

    def device(self, state_dir: Path) -> Device:
        """A new device identity in `state_dir`, registered with this controller and attested."""
        identity = DeviceIdentity.load_or_create(state_dir)
        registered = self.register_device(raw_public_bytes(identity.public_key).hex())
        assert registered == identity.device_id
        device = Device(self, identity, state_dir)
        device.attest()
        return device

    def enroll(
        self, state_dir: Path, *args: str | Path, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`fleet-agent enroll -o json` of the device in `state_dir` (made if new) with this
        controller and its first root.json, plus `args` (`--label k=v`, `--wait S`...)."""
        command: list[str | Path] = ["enroll", "--server", self.url, "--root", self.root_json]
        command += ["--state-dir", state_dir, "-o", "json", *args]
        if token is not None:
            command += ["--token", token]
        return fleet_agent(*command)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample on /metrics, keyed by (name, sorted labels)."""
        response = self.request("GET", "/metrics")
        assert response.status == 200
        samples = {}
        for family in text_string_to_metric_families(response.data.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 when the series does not exist yet)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def root(self) -> Metadata[Root]:
        """The current root, as the API hands it out for provisioning."""
        status, body = self.api("GET", "/api/v1/keys/root.json")
        assert status == 200, body
        return Metadata[Root].from_bytes(_json.dumps(body).encode())

    # Lifecycle.

    def stop(self) -> int:
        """SIGTERM, and assert a graceful exit (code 0 within STOP_TIMEOUT_S); the exit code.

        Idempotent; after `kill()` (and no `start()`) it only returns the kill's exit code.
        """
        if self._killed:
            return self.process.wait()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"fleetctl serve ignored SIGTERM for {STOP_TIMEOUT_S}s; stderr:\n{self.stderr}"
                ) from None
        code = self.process.returncode
        assert code == 0, f"fleetctl serve exited {code} on SIGTERM; stderr:\n{self.stderr}"
        return code

    def kill(self) -> None:
        """SIGKILL: the crash case (no shutdown code runs)."""
        if self.process.poll() is None:
            self.process.kill()
            self._killed = True
        self.process.wait()

    def start(self) -> None:
        """Serve again on the same fleet dir, database and port (after `stop` or `kill`)."""
        assert self.process.poll() is not None, "the controller is still running"
        self._starts += 1
        self._killed = False
        self.process, self.url = spawn_serve(
            self.fleet_dir, self.db_url, f"127.0.0.1:{self.port}", self._logs, self.serve_args
        )

    def restart(self) -> None:
        """`stop()` (asserting a graceful exit), then `start()`."""
        self.stop()
        self.start()


def spawn_serve(
    fleet_dir: Path,
    db_url: str | None,
    listen: str,
    logs: Path,
    serve_args: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `fleetctl serve`; the process and its URL once it says it is listening.

    The broker is an embedded one on a free port unless `serve_args` name one (`--mqtt-url ...`,
    `--mqtt-listen ...`). Its stdout and stderr go to `{logs}.stdout` and `{logs}.stderr` (`logs`
    has no suffix). The caller owns the process: send it SIGTERM and wait when done.
    """
    stdout = logs.with_suffix(".stdout")
    stderr = logs.with_suffix(".stderr")
    command = [FLEETCTL, "serve", "--dir", str(fleet_dir), "--listen", listen]
    if not any(
        arg.startswith("--mqtt-url") or arg.startswith("--mqtt-listen") for arg in serve_args
    ):
        command += ["--mqtt-listen", "127.0.0.1:0"]
    command += serve_args
    if db_url:
        command += ["--db-url", db_url]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env()
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    prefix = "listening on "
    while True:
        first, newline, _ = stdout.read_text(errors="replace").partition("\n")
        if newline:
            assert first.startswith(prefix), f"unexpected first line from serve: {first!r}"
            return process, first[len(prefix) :].strip()
        code = process.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                process.kill()
                process.wait()
            why = f"exited {code}" if code is not None else f"no answer in {START_TIMEOUT_S}s"
            raise AssertionError(
                f"fleetctl serve did not come up ({why}); stderr:\n"
                + stderr.read_text(errors="replace")
            )
        time.sleep(0.02)


def start_controller(
    tmp_path: Path,
    db_url: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    serve_args: Sequence[str] = (),
    before_serve: Callable[[Path], Sequence[str]] | None = None,
) -> RunningController:
    """`fleetctl init` a fleet in `tmp_path / "fleet"` and serve it on a free local port.

    `config` is merged into fleet.yaml before the first start (e.g. short `lifetimes_hours`);
    `serve_args` are added to every `fleetctl serve` of it (see `spawn_serve`), and so are those
    `before_serve(fleet_dir)` returns: it runs between init and the first start (to issue
    certificates from the new fleet CA and start a broker with them, say).
    """
    fleet_dir = tmp_path / "fleet"
    made = init_fleet(fleet_dir, db_url)
    if config:
        settings = yaml.safe_load((fleet_dir / "fleet.yaml").read_text())
        settings.update(config)
        (fleet_dir / "fleet.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    if before_serve is not None:
        serve_args = (*serve_args, *before_serve(fleet_dir))
    process, url = spawn_serve(fleet_dir, db_url, "127.0.0.1:0", tmp_path / "serve-1", serve_args)
    return RunningController(
        url=url,
        token=made["admin_token"],
        fleet_dir=fleet_dir,
        root_json=Path(made["root"]),
        offline_keys=[Path(p) for p in made["offline_root_keys"]],
        db_url=db_url,
        process=process,
        serve_args=tuple(serve_args),
    )


@contextlib.contextmanager
def controller_for(
    backend: str,
    tmp_path: Path,
    *,
    config: Mapping[str, Any] | None = None,
    serve_args: Sequence[str] = (),
    before_serve: Callable[[Path], Sequence[str]] | None = None,
) -> Iterator[RunningController]:
    """A running controller on `backend` ("sqlite" or "postgres", in a fresh database).

    On exit it is stopped (asserting a graceful exit unless the test killed it) and a PostgreSQL
    database is dropped.
    """
    with contextlib.ExitStack() as stack:
        db_url = None
        if backend == "postgres":
            db_url = stack.enter_context(fresh_postgres_database(postgres_server_url()))
        elif backend != "sqlite":
            raise ValueError(f"unknown backend {backend!r}")
        running = start_controller(
            tmp_path, db_url, config=config, serve_args=serve_args, before_serve=before_serve
        )
        try:
            yield running
        finally:
            running.stop()


# Devices.


class _SignedFetcher(FetcherInterface):
    """ngclient's fetcher for tests: every GET signed by the device, errors as HTTP statuses."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self.device.get(urlsplit(url).path)
        if response.status != 200:
            raise DownloadHTTPError(f"GET {url}: {response.status}", response.status)
        return iter([response.data])


@dataclass
class Device:
    """A registered device: signed requests to the controller's TUF endpoints, and a TUF client.

    `attest()` attests it the way the agent does (`agent.attester`) and keeps the result, which
    every rune download then presents (the controller serves runes only to attested devices).
    """

    controller: RunningController
    identity: DeviceIdentity
    state_dir: Path
    passport: str | None = None

    @property
    def id(self) -> str:
        return self.identity.device_id

    def attest(self) -> StoredResult:
        result = attester_for(self.state_dir, self.controller.url).attest()
        self.passport = result.passport(time.time())
        return result

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        """GET `path` (with its query) signed by this device, plus `headers` (and the passport
        for a rune)."""
        signed = sign_request(self.identity.signer, self.id, "GET", path, time.time())
        if self.passport and path.startswith("/tuf/targets/runes/"):
            signed[PASSPORT_HEADER] = self.passport
        return self.controller.request("GET", path, headers={**signed, **(headers or {})})

    def metadata(self, filename: str) -> Metadata[Any]:
        """`/tuf/metadata/{filename}`, parsed (not verified; see `updater` for that)."""
        response = self.get(f"/tuf/metadata/{filename}")
        assert response.status == 200, f"{filename}: {response.status} {response.data!r}"
        return Metadata.from_bytes(response.data)

    def newest(self) -> tuple[Metadata[Timestamp], Metadata[Snapshot], Metadata[Targets]]:
        """The newest timestamp, the snapshot it names and the targets that snapshot names."""
        timestamp: Metadata[Timestamp] = self.metadata("timestamp.json")
        snapshot_version = timestamp.signed.snapshot_meta.version
        snapshot: Metadata[Snapshot] = self.metadata(f"{snapshot_version}.snapshot.json")
        targets_version = snapshot.signed.meta["targets.json"].version
        targets: Metadata[Targets] = self.metadata(f"{targets_version}.targets.json")
        return timestamp, snapshot, targets

    def target_path(self, target: str, sha256: str) -> str:
        """The consistent-snapshot URL path of `target` with content `sha256`."""
        directory, _, basename = target.rpartition("/")
        return f"/tuf/targets/{directory}/{sha256}.{basename}"

    def updater(self, name: str = "tuf") -> Updater:
        """A real ngclient `Updater`, refreshed: it trusts only what verifies from root.json.

        Each `name` keeps its own trusted metadata in the device's state dir.
        """
        metadata_dir = self.state_dir / name / "metadata"
        target_dir = self.state_dir / name / "targets"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        target_dir.mkdir(parents=True, exist_ok=True)
        updater = Updater(
            str(metadata_dir),
            f"{self.controller.url}/tuf/metadata/",
            str(target_dir),
            f"{self.controller.url}/tuf/targets/",
            fetcher=_SignedFetcher(self),
            bootstrap=self.controller.root_json.read_bytes(),
        )
        updater.refresh()
        return updater


def wait_for(
    condition: Any, timeout: float, interval: float = 0.1, message: str = "condition"
) -> Any:
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s")
        time.sleep(interval)


def one_line_error(stderr: str) -> str:
    """Assert fleetctl's stderr is one `error:` line without a traceback; that line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def is_error_body(body: Any) -> bool:
    """Whether an API response body is exactly `{"error": "<non-empty string>"}`."""
    return (
        isinstance(body, dict)
        and set(body) == {"error"}
        and isinstance(body["error"], str)
        and bool(body["error"])
    )


def files_digest(root: Path, exclude: Sequence[str] = ()) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hex), to compare before/after."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


# Runes to push.


def build_example(
    examples_dir: Path, example: str, version: str, out_dir: Path, name: str | None = None
) -> Path:
    """Build `examples_dir/example` as bundle `name or example` at `version`; the file."""
    from ota.rune.build import build_bundle

    name = name or example
    built = build_bundle(examples_dir / example / "Runefile.yml", name=name, version=version)
    path = out_dir / f"{name}-{version}.runebundle"
    path.write_bytes(built.data)
    return path


def write_legacy_rune(out_dir: Path, filename: str, nbytes: int = 4) -> Path:
    """A legacy `.rune` reading RAND (`nbytes` per call: a different size, different bytes)."""
    from ota.rune.runefile import CapabilityKind
    from tests.legacy_runes import capability_rune

    path = out_dir / filename
    path.write_bytes(capability_rune(CapabilityKind.RAND, nbytes))
    return path
