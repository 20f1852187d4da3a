"""Shared fixtures: example runes with generated models, and external services from the env.

Services (MQTT broker, PostgreSQL) are named by FLEET_TEST_MQTT_URL / FLEET_TEST_POSTGRES_URL.
A test that needs one is skipped with the reason when the variable is unset; with
FLEET_TEST_REQUIRE_SERVICES=1 (as CI sets it) an unset or unreachable service fails instead.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from examples.models import write_all

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session", autouse=True)
def _sigstore_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Sigstore's offline verifier copies its trusted roots into $XDG_CACHE_HOME: a temporary one
    here (inherited by the controllers the tests start), never the user's."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ with its models and sample data generated."""
    target = tmp_path_factory.mktemp("examples")
    for name in ("sine", "gesture"):
        shutil.copytree(
            EXAMPLES / name,
            target / name,
            ignore=shutil.ignore_patterns("*.onnx", "*.tflite", "*.csv", "*.runebundle"),
        )
    write_all(target)
    return target


def _service(variable: str) -> str:
    url = os.environ.get(variable)
    required = os.environ.get("FLEET_TEST_REQUIRE_SERVICES") == "1"
    if not url:
        if required:
            pytest.fail(f"{variable} is not set, and FLEET_TEST_REQUIRE_SERVICES=1 requires it")
        pytest.skip(f"set {variable} to run tests against a real service")
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), 2):
            pass
    except OSError as exc:
        message = f"{variable}={url} is not reachable: {exc}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def mqtt_url() -> str:
    return _service("FLEET_TEST_MQTT_URL")


@pytest.fixture
def postgres_url() -> str:
    return _service("FLEET_TEST_POSTGRES_URL")
