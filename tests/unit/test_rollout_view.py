"""`fleetctl rollout` rendering, from JSON shaped exactly as docs/rollouts-api.md says."""

from __future__ import annotations

import copy
from typing import Any

from rich.console import Console, RenderableType

from fleet.rollout_cli import (
    DEVICE_STATES,
    counts_text,
    format_eta,
    plan_table,
    progress_bar,
    rollout_view,
    rollouts_table,
    top_reasons,
)


def render(renderable: RenderableType) -> str:
    console = Console(record=True, width=120)
    console.print(renderable)
    return console.export_text()


def counts(**nonzero: int) -> dict[str, int]:
    all_states = dict.fromkeys(DEVICE_STATES, 0)
    all_states.update({state.replace("_", "-"): n for state, n in nonzero.items()})
    return all_states


OPTIONS = {
    "waves": "1,10%,50%,100%",
    "soak_s": 600,
    "success_percent": 95,
    "max_failures_percent": 5,
    "min_executed": 10,
    "rate": "500/min",
    "device_timeout_s": 900,
    "retries": 2,
    "on_failure": "pause",
    "start_at": None,
}


def wave(number: int, target: str, size: int, **states: int) -> dict[str, Any]:
    return {
        "wave": number,
        "target": target,
        "size": size,
        "counts": counts(**states),
        "failure_reasons": {},
        "started_at": "2026-11-25T10:00:00Z",
        "passed_at": None,
        "tripped_at": None,
        "waived": False,
    }


def running() -> dict[str, Any]:
    canary = wave(1, "1", 1, succeeded=1)
    canary["passed_at"] = "2026-11-25T10:00:05Z"
    second = wave(2, "10%", 2, succeeded=1, health_check=1)
    return {
        "id": "r-5f2c9a",
        "rune": "default/sine@0.1.0",
        "state": "running",
        "reason": None,
        "created_at": "2026-11-25T09:59:59Z",
        "created_by": "admin",
        "started_at": "2026-11-25T10:00:00Z",
        "finished_at": None,
        "selected": 20,
        "selector": {"model": "m4"},
        "devices": None,
        "options": OPTIONS,
        "waves": [canary, second],
        "waves_planned": 4,
        "counts": counts(succeeded=2, health_check=1),
        "failure_reasons": {},
        "rollback": {},
        "eta_s": 125.4,
    }


def test_eta_formatting() -> None:
    assert format_eta(None) == "-"
    assert format_eta(0) == "0s"
    assert format_eta(42.4) == "42s"
    assert format_eta(59.6) == "1m 00s"
    assert format_eta(125) == "2m 05s"
    assert format_eta(3600) == "1h 00m"
    assert format_eta(3 * 3600 + 125) == "3h 02m"
    assert format_eta(2 * 86400 + 4 * 3600) == "2d 04h"


def test_bar_shows_finished_over_size_and_each_outcome() -> None:
    bar = progress_bar(counts(succeeded=5, failed=1, skipped=1, notified=3), 10, width=10).plain
    assert bar.endswith(" 7/10")
    cells = bar.split(" ")[0]
    assert len(cells) == 10
    assert cells.count("█") == 5
    assert cells.count("▓") == 1  # one failure still shows
    assert cells.count("▒") == 1
    assert cells.count("░") == 3


def test_bar_of_a_tiny_failure_share_and_of_finished_and_empty_waves() -> None:
    tiny = progress_bar(counts(succeeded=999, timed_out=1), 1000, width=20).plain
    assert "▓" in tiny and "░" not in tiny and tiny.endswith("1000/1000")
    done = progress_bar(counts(succeeded=2, failed=1), 3, width=20).plain
    assert "░" not in done.split(" ")[0]
    assert len(done.split(" ")[0]) == 20
    empty = progress_bar(counts(pending=4), 4, width=8).plain
    assert empty == "░" * 8 + " 0/4"
    assert progress_bar({}, 0, width=8).plain == "░" * 8 + " 0/0"


def test_counts_list_nonzero_states_in_life_cycle_order() -> None:
    text = counts_text(counts(failed=2, succeeded=3, notified=1, health_check=4)).plain
    assert text == "notified 1 · health-check 4 · succeeded 3 · failed 2"
    assert counts_text(counts()).plain == "-"


def test_running_view_has_waves_bars_counts_and_eta() -> None:
    text = render(rollout_view(running()))
    assert "rollout r-5f2c9a  default/sine@0.1.0  running" in text
    assert "selected 20 devices · waves 2 of 4 started · ETA 2m 05s" in text
    assert "1/1" in text and "100%" in text and "passed" in text
    assert "1/2" in text and "50%" in text and "in progress" in text
    assert "health-check 1 · succeeded 1" in text
    lines = text.splitlines()
    third = next(line for line in lines if line.strip().startswith("│    3 "))
    assert "10%" not in third and "50%" in third and "not started" in third
    assert any("100%" in line and "not started" in line for line in lines)
    total = next(line for line in lines if line.startswith("│  all"))
    assert "2/3" in total and "health-check 1 · succeeded 2" in total
    assert "failure reasons" not in text


def test_failure_reasons_grouped_top_n_with_the_rest_counted() -> None:
    rollout = running()
    rollout["state"] = "paused"
    rollout["reason"] = "wave 2 tripped: 40% failed (max 5%); timed out (2)"
    rollout["waves"][1]["tripped_at"] = "2026-11-25T10:01:00Z"
    rollout["failure_reasons"] = {
        "refused: not-published": 2,
        "health check failed: accel missing": 7,
        "timed out": 3,
        "a": 1,
        "b": 1,
        "c": 1,
    }
    text = render(rollout_view(rollout, top=3))
    assert "failure reasons (15 devices)" in text
    table = text[text.index("failure reasons") :]
    order = [table.index(r) for r in ("health check failed", "timed out", "refused: not-pub")]
    assert order == sorted(order)
    assert "… 3 other reasons" in text
    assert "reason: wave 2 tripped" in text
    assert "tripped" in text and "ETA 2m 05s (paused)" in text
    shown, others, devices = top_reasons(rollout["failure_reasons"], 2)
    assert shown == [("health check failed: accel missing", 7), ("timed out", 3)]
    assert (others, devices) == (4, 5)


def test_scheduled_rollout_without_waves() -> None:
    rollout = running()
    rollout.update(state="scheduled", waves=[], counts=counts(), eta_s=None, started_at=None)
    rollout["options"] = {**OPTIONS, "start_at": "2026-11-26T08:00:00Z"}
    text = render(rollout_view(rollout))
    assert "waves 0 of 4 started · starts 2026-11-26 08:00:00" in text
    assert text.count("not started") == 4
    assert "all" not in text


def test_finished_states() -> None:
    done = running()
    done["waves"].append(wave(3, "50%", 7, succeeded=7))
    done["waves"].append(wave(4, "100%", 10, succeeded=9, skipped=1))
    done.update(
        state="completed",
        eta_s=None,
        finished_at="2026-11-25T10:20:00Z",
        counts=counts(succeeded=19, skipped=1),
    )
    done["waves"][1]["counts"] = counts(succeeded=2)
    text = render(rollout_view(done))
    assert "completed" in text and "finished 2026-11-25 10:20:00" in text
    assert "ETA" not in text and "not started" not in text
    assert "20/20" in text

    rolled = copy.deepcopy(running())
    rolled.update(state="rolled-back", reason="rolled back by the operator", eta_s=None)
    rolled["finished_at"] = "2026-11-25T10:02:00Z"
    rolled["rollback"] = {"done": 2, "sent": 1}
    text = render(rollout_view(rolled))
    assert "rolled-back" in text and "reason: rolled back by the operator" in text
    assert "rollback: sent 1 · done 2" in text
    assert "1 device(s) still in flight" in text


def test_plan_table_lists_ids_when_few() -> None:
    plan = [
        {"wave": 1, "target": "1", "devices": ["dev-a"]},
        {"wave": 2, "target": "50%", "devices": ["dev-b", "dev-c"]},
        {"wave": 3, "target": "100%", "devices": [f"dev-{i}" for i in range(20)]},
        {"wave": 4, "target": "100%", "devices": []},
    ]
    text = render(plan_table(plan))
    assert "dev-b, dev-c" in text
    assert "dev-0, dev-1, dev-2, … +17 more" in text
    row3 = next(line for line in text.splitlines() if "+17 more" in line)
    assert "20" in row3 and "23" in row3  # devices, running total
    assert "dev-19" not in text


def test_list_table() -> None:
    rollouts = [
        {
            "id": "r-2",
            "rune": "default/sine@0.2.0",
            "state": "paused",
            "reason": "wave 1 tripped",
            "created_at": "2026-11-25T11:00:00.123456+00:00",
            "selected": 5,
            "waves_planned": 4,
            "waves_started": 1,
            "counts": counts(failed=1, timed_out=1, notified=2),
        },
        {
            "id": "r-1",
            "rune": "default/sine@0.1.0",
            "state": "completed",
            "reason": None,
            "created_at": "2026-11-25T10:00:00Z",
            "selected": 20,
            "waves_planned": 3,
            "waves_started": 3,
            "counts": counts(succeeded=20),
        },
    ]
    text = render(rollouts_table(rollouts))
    r2 = next(line for line in text.splitlines() if "r-2" in line)
    assert "paused" in r2 and "1/4" in r2 and "2026-11-25 11:00" in r2
    cells = r2.split()
    assert cells[6] == "2"  # failed + timed-out
    assert cells[7] == "2"  # in flight
    assert text.index("r-2") < text.index("r-1")
