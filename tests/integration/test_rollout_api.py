"""The rollout REST API against a real controller, on SQLite and PostgreSQL: refusals (unknown
rune, empty selection, bad wave spec or option, overlapping rollouts, an action the state does not
allow), dry runs that store nothing, and a rollout of devices that are all offline, which ends
`completed` with every device `skipped` (offline).

The devices are registered by key and never connect, so they are enrolled and offline. Tests
share one controller per backend, so each uses labels of its own (`suite=<test>`).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.controller import RunningController, is_error_body, wait_for, write_legacy_rune

RUNE = "rollapi@1.0.0"
FAR_FUTURE = "2099-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def published(controller: RunningController, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = write_legacy_rune(tmp_path_factory.mktemp("rune"), "rollapi.rune")
    controller.push(path, org="default", name="rollapi", version="1.0.0")
    return RUNE


def register(controller: RunningController, count: int, **labels: str) -> list[str]:
    return [controller.register_device(secrets.token_hex(32), labels) for _ in range(count)]


def create(controller: RunningController, **body: Any) -> tuple[int, Any]:
    return controller.api("POST", "/api/v1/rollouts", {"rune": RUNE, **body})


def refused(status: int, body: Any, expected: int, *fragments: str) -> None:
    assert status == expected, body
    assert is_error_body(body), body
    for fragment in fragments:
        assert fragment in body["error"], body


def count_rollouts(controller: RunningController) -> int:
    status, body = controller.api("GET", "/api/v1/rollouts")
    assert status == 200, body
    return len(body["rollouts"])


def test_unknown_rune_is_404(controller: RunningController, published: str) -> None:
    register(controller, 1, suite="unknown-rune")
    status, body = controller.api(
        "POST", "/api/v1/rollouts", {"rune": "nope@9.9.9", "selector": {"suite": "unknown-rune"}}
    )
    refused(status, body, 404, "rune default/nope@9.9.9 is not published")


def test_empty_selection_is_400(controller: RunningController, published: str) -> None:
    status, body = create(controller, selector={"suite": "nobody-has-this"})
    refused(status, body, 400, "the selection is empty", "suite=nobody-has-this")


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"waves": "1,2,100%"}, "only the first wave"),
        ({"waves": "1,50%"}, "not 100%"),
        ({"soak": "ten minutes"}, "--soak"),
        ({"success": "120%"}, "--success"),
        ({"rate": "fast"}, "--rate"),
        ({"on_failure": "explode"}, "on_failure"),
        ({"start_at": "tomorrow"}, "--start-at"),
        ({"rune": "no-version"}, "NAME@VERSION"),
    ],
)
def test_bad_wave_spec_or_option_is_400(
    controller: RunningController, published: str, fields: dict[str, Any], fragment: str
) -> None:
    register(controller, 1, suite="bad-input")
    status, body = create(controller, selector={"suite": "bad-input"}, **fields)
    refused(status, body, 400, fragment)


def test_a_dry_run_plans_and_stores_nothing(controller: RunningController, published: str) -> None:
    devices = register(controller, 4, suite="dry-run")
    before = count_rollouts(controller)
    status, body = create(
        controller, selector={"suite": "dry-run"}, waves="1,50%,100%", dry_run=True
    )
    assert status == 200, body
    assert body["selected"] == 4
    assert [(w["wave"], w["target"], len(w["devices"])) for w in body["plan"]] == [
        (1, "1", 1),
        (2, "50%", 1),
        (3, "100%", 2),
    ]
    assert sorted(d for w in body["plan"] for d in w["devices"]) == sorted(devices)
    assert count_rollouts(controller) == before
    # Nothing holds the devices: a real rollout of them is accepted.
    status, body = create(controller, selector={"suite": "dry-run"}, start_at=FAR_FUTURE)
    assert status == 201, body
    assert controller.api("POST", f"/api/v1/rollouts/{body['id']}/abort")[0] == 200


def test_overlapping_rollouts_are_409_naming_the_other(
    controller: RunningController, published: str
) -> None:
    devices = register(controller, 3, suite="overlap")
    status, first = create(controller, selector={"suite": "overlap"}, start_at=FAR_FUTURE)
    assert status == 201, first
    assert first["state"] == "scheduled" and first["selected"] == 3
    assert first["rune"] == "default/rollapi@1.0.0" and first["created_by"] == "admin"
    status, body = create(controller, devices=[devices[1]])
    refused(status, body, 409, f"device {devices[1]} is already in", first["id"], "rollapi@1.0.0")
    # Once the first one is aborted, its devices are free.
    status, aborted = controller.api("POST", f"/api/v1/rollouts/{first['id']}/abort")
    assert status == 200 and aborted["state"] == "aborted", aborted
    status, second = create(controller, devices=[devices[1]], start_at=FAR_FUTURE)
    assert status == 201, second
    assert second["selected"] == 1 and second["devices"] == [devices[1]]
    status, listed = controller.api("GET", "/api/v1/rollouts", params={"state": "scheduled"})
    assert status == 200 and second["id"] in [r["id"] for r in listed["rollouts"]], listed
    assert first["id"] not in [r["id"] for r in listed["rollouts"]]
    assert controller.api("POST", f"/api/v1/rollouts/{second['id']}/abort")[0] == 200


def test_offline_devices_end_skipped_and_a_finished_rollout_refuses_actions(
    controller: RunningController, published: str
) -> None:
    devices = register(controller, 3, suite="offline", model="m4")
    status, created = create(
        controller, selector={"suite": "offline", "model": "m4"}, waves="1,100%", soak="0"
    )
    assert status == 201, created
    assert [len(w["devices"]) for w in created["plan"]] == [1, 2]
    rid = created["id"]

    def finished() -> Any:
        status, body = controller.api("GET", f"/api/v1/rollouts/{rid}")
        assert status == 200, body
        return body if body["state"] not in ("scheduled", "running") else None

    done = wait_for(finished, timeout=30, message="the rollout finished")
    assert done["state"] == "completed", done
    assert done["counts"]["skipped"] == 3 and sum(done["counts"].values()) == 3, done
    assert set(done["counts"]) >= {"pending", "health-check", "rolled-back", "timed-out"}
    assert [w["wave"] for w in done["waves"]] == [1, 2] and done["waves_planned"] == 2
    assert done["options"]["soak_s"] == 0 and done["options"]["waves"] == "1,100%"
    assert done["started_at"] and done["finished_at"]
    status, listed = controller.api("GET", f"/api/v1/rollouts/{rid}/devices")
    assert status == 200, listed
    assert sorted(d["id"] for d in listed["devices"]) == sorted(devices)
    assert {(d["state"], d["reason"], d["attempt"]) for d in listed["devices"]} == {
        ("skipped", "offline", 0)
    }
    for action in ("pause", "resume", "abort"):
        status, body = controller.api("POST", f"/api/v1/rollouts/{rid}/{action}")
        refused(status, body, 409, f"cannot {action} the rollout: it is completed")
    status, body = controller.api("POST", f"/api/v1/rollouts/{rid}/pause")
    assert "only a scheduled or running rollout can be paused" in body["error"]


def test_unknown_rollout_is_404_and_viewers_cannot_create(
    controller: RunningController, published: str, tmp_path: Path
) -> None:
    status, body = controller.api("GET", "/api/v1/rollouts/r-doesnotexist")
    refused(status, body, 404, "no rollout r-doesnotexist")
    status, body = controller.api("POST", "/api/v1/rollouts/r-doesnotexist/pause")
    refused(status, body, 404, "no rollout r-doesnotexist")
    status, viewer = controller.api("POST", "/api/v1/tokens", {"name": "rollviewer"})
    assert status == 201, viewer
    status, body = controller.api("POST", "/api/v1/rollouts", {"rune": RUNE}, token=viewer["token"])
    refused(status, body, 403, "operator")
    status, body = controller.api("GET", "/api/v1/rollouts", token=viewer["token"])
    assert status == 200, body
