"""`fleetctl rollout`: what it refuses locally, before any request.

The server named is a port nothing listens on, so a command that sent a request would exit 4
(controller unreachable) instead of 2 (the command line is wrong). What it does against a real
controller is tested in tests/e2e/test_rollout_cli.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from typer.testing import CliRunner

import fleet.rollout_cli as rollout_cli
from fleet.cli import app
from fleet.rollout_plan import PlanError

runner = CliRunner()


def run(*args: str) -> Any:
    return runner.invoke(app, ["rollout", *args, "--server", "http://127.0.0.1:1"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--all", "--waves", "1,50%,40%"], "wave 3 ('40%') is not above wave 2 (50%)"),
        (["--all", "--waves", "10%,5,100%"], "only the first wave (the canary) may be a count"),
        (["--all", "--waves", "1,50%"], "the last wave is 50%, not 100%"),
        ([], "say which devices: --selector k=v[,k=v], --devices ID[,ID], or --all"),
        (["--selector", "model"], "--selector: label selector 'model' is not k=v"),
        (["--all", "--selector", "a=b"], "--all means every enrolled device"),
        (["--all", "--soak", "10x"], "--soak '10x' is not a duration"),
        (["--all", "--device-timeout", "soon"], "--device-timeout 'soon' is not a duration"),
        (["--all", "--success", "120%"], "--success '120%' is not a percentage"),
        (["--all", "--success", "0"], "--success must be above 0% and at most 100%"),
        (["--all", "--max-failures", "lots"], "--max-failures 'lots' is not a percentage"),
        (["--all", "--rate", "fast"], "--rate 'fast' is not a rate such as 500/min"),
        (["--all", "--start-at", "tomorrow"], "--start-at 'tomorrow' is neither a time"),
    ],
)
def test_local_errors_fail_before_any_request(args: list[str], message: str) -> None:
    result = run("create", "sine@0.1.0", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert result.output.count("error:") == 1
    assert "Traceback" not in result.output


def test_bad_rune_ref_and_bad_choices() -> None:
    result = run("create", "sine", "--all")
    assert result.exit_code == 2 and "is not NAME@VERSION" in result.output
    assert run("create", "sine@0.1.0", "--all", "--on-failure", "explode").exit_code == 2
    assert run("create", "sine@0.1.0", "--all", "--retries", "-1").exit_code == 2
    assert run("list", "--state", "bogus").exit_code == 2


def test_start_at() -> None:
    now = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    assert rollout_cli.parse_start_at("+10m", now) == "2026-11-25T10:10:00Z"
    assert rollout_cli.parse_start_at("2026-11-25T12:00:00+02:00") == "2026-11-25T10:00:00Z"
    assert rollout_cli.parse_start_at("2026-11-25T10:00:00Z") == "2026-11-25T10:00:00Z"
    with pytest.raises(PlanError, match="--start-at"):
        rollout_cli.parse_start_at("+soon", now)
