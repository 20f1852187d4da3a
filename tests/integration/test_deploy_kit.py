"""The deployment kit (`deploy/`), checked with the tools that run it.

- The systemd units pass `systemd-analyze verify` (with the install prefix pointed at this
  virtualenv, so the commands exist) and `systemd-analyze security` rates each at most
  `MAX_EXPOSURE`; each runs as its own user with `NoNewPrivileges`, `ProtectSystem=strict` and a
  state directory.
- The Prometheus config and alert rules pass `promtool check`, and `promtool test rules` proves
  every alert fires on the series that should fire it and stays quiet on a healthy fleet.
- Every metric the alerts and the Grafana dashboard query is one a real controller exports, and
  the dashboard's data source is the one the provisioning defines.
- The container definition passes hadolint; the compose file passes `docker-compose config`, and
  every file it mounts from the repository exists.

Tools come from the environment: `systemd-analyze`, `promtool` (or FLEET_TEST_PROMTOOL),
`hadolint` (a dev dependency) and `docker-compose`. A missing one skips its test with the reason,
and fails it under FLEET_TEST_REQUIRE_SERVICES=1 (CI installs them all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.controller import RunningController, controller_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALL_PREFIX = "/opt/fleet/venv/bin/"
MAX_EXPOSURE = 2.0  # systemd-analyze security's scale: 0 (locked down) to 10 (exposed)
# Files compose mounts that the operator prepares (docs/operations.md), not the repository.
OPERATOR_FILES = ("./fleet", "./controller-certs", "./mosquitto/certs/")
_METRIC = re.compile(r"\b(fleet_[a-z0-9_]+|up)\b")


def tool(name: str, variable: str | None = None) -> str:
    found = (os.environ.get(variable) if variable else None) or shutil.which(name)
    if not found:
        found = str(Path(sys.executable).with_name(name))
        if not Path(found).exists():
            message = f"{name} is not installed (.ci/run installs it)"
            if os.environ.get("FLEET_TEST_REQUIRE_SERVICES") == "1":
                pytest.fail(message)
            pytest.skip(message)
    return found


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=120,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{said}"
    return said


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_the_systemd_units_verify_and_are_hardened(unit: Path, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    text = unit.read_text()
    assert INSTALL_PREFIX in text
    local = tmp_path / unit.name
    local.write_text(text.replace(INSTALL_PREFIX, f"{Path(sys.executable).parent}/"))
    run(analyze, "verify", local)
    rated = run(
        analyze, "security", "--offline=true", f"--threshold={MAX_EXPOSURE * 10:.0f}", local
    )
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", rated).group(1))  # type: ignore[union-attr]
    assert exposure <= MAX_EXPOSURE, rated
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["User"] not in ("root", "0")
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"]


def test_the_prometheus_config_and_alerts_check_and_fire() -> None:
    promtool = tool("promtool", "FLEET_TEST_PROMTOOL")
    folder = DEPLOY / "prometheus"
    run(promtool, "check", "config", "prometheus.yml", cwd=folder)
    run(promtool, "check", "rules", "alerts.yml", cwd=folder)
    said = run(promtool, "test", "rules", "alerts_test.yml", cwd=folder)
    assert "SUCCESS" in said


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The metric names a real controller exports on /metrics (with sample suffixes)."""
    with controller_for("sqlite", tmp_path_factory.mktemp("controller")) as ctl:
        yield _names(ctl)


def _names(ctl: RunningController) -> set[str]:
    response = ctl.request("GET", "/metrics")
    assert response.status == 200
    names = {"up"}
    for family in text_string_to_metric_families(response.data.decode()):
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
    return names


def _queried(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in _METRIC.findall(expr)}


def test_the_alerts_and_the_dashboard_query_only_exported_metrics(exported: set[str]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alert_exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "fleet.json").read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(alert_exprs) >= 6 and len(panel_exprs) >= 10
    unknown = (_queried(alert_exprs) | _queried(panel_exprs)) - exported
    assert not unknown, f"queried but not exported by the controller: {sorted(unknown)}"
    for needed in ("fleet_devices_in_quarantine", "fleet_devices_attestation", "fleet_rollouts"):
        assert needed in _queried(alert_exprs)

    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "fleet.yml").read_text()
    )["datasources"][0]
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_container_definition_and_compose_file_check() -> None:
    hadolint = tool("hadolint")
    run(hadolint, DEPLOY / "container" / "Containerfile")
    compose = tool("docker-compose")
    run(compose, "-f", "compose.yaml", "config", "-q", cwd=DEPLOY, env={"POSTGRES_PASSWORD": "x"})
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(document["services"]) == {"controller", "mosquitto", "postgres", "prometheus",
                                         "grafana"}  # fmt: skip
    for service in document["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith(OPERATOR_FILES):
                assert (DEPLOY / source).exists(), f"compose mounts {source}, which is missing"
    build = document["services"]["controller"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).exists()
