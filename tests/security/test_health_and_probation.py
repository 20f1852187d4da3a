"""A rune that passes every signature check but does not work: the health check keeps it out,
and probation takes it back out when it fails only after the switch. Real controller, real
`fleet-agent`, real wasm."""

from __future__ import annotations

from tests.controller import RunningController
from tests.security.conftest import Agent, Runes
from tests.unit.test_health import failing_after_rune

EXIT_UNHEALTHY = 4


def test_a_rune_failing_its_health_check_is_not_installed(
    controller: RunningController, runes: Runes, device: Agent
) -> None:
    broken = runes.file("broken.rune", failing_after_rune(0))
    controller.push(broken, name="broken", version="1.0.0")
    before = device.snapshot()

    result = device.update(controller.url, "broken@1.0.0")

    assert result.returncode == EXIT_UNHEALTHY, result
    assert result.json["status"] == "health-check-failed", result
    assert "unreachable" in result.json["health"]["reason"], result
    after = device.snapshot()
    assert after.state == before.state and after.files == before.files
    assert device.active_ref() == "sine@1.0.0"
    assert device.run().returncode == 0


def test_a_rune_failing_on_probation_is_rolled_back(
    controller: RunningController, runes: Runes, device: Agent
) -> None:
    flaky = runes.file("flaky.rune", failing_after_rune(3))  # survives the 3 health-check calls
    controller.push(flaky, name="flaky", version="1.0.0")
    device.install(controller.url, "flaky@1.0.0")
    assert device.active_ref() == "flaky@1.0.0"

    result = device.run(count=12)  # each fresh instance fails on its 4th call

    assert result.returncode == 1, result
    assert "probation failed, rolled back" in result.stderr, result
    assert device.active_ref() == "sine@1.0.0"
    last = device.status()["history"][-1]
    assert (last["kind"], last["rune"]) == ("rollback", "flaky@1.0.0"), last
    assert "failed" in last["reason"], last
    assert device.run(count=3).returncode == 0
    again = device.update(controller.url, "flaky@1.0.0")  # its slot lost its commit mark
    assert again.json["status"] == "installed", again
