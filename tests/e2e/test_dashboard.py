"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a real
controller with four real agents.

- An operator signs in with an API token, sees the fleet and its devices, follows a rollout as it
  advances (the page updates itself: it is never reloaded), pauses it with the button (the API
  says it is paused), and finds the pause in the audit log under their name.
- A viewer sees the same rollout with no action button and no audit log, and the API refuses the
  viewer's write made with the dashboard's session; the session cookie alone (without the
  dashboard's header, as another site would send it) is refused too.
- Every page answers with a content security policy that allows nothing from elsewhere, and loads
  nothing from outside the controller.

Screenshots of the main pages (desktop, and the rollout at a phone's width) are saved in
FLEET_TEST_ARTIFACTS (default `test-artifacts/dashboard/` in the repository).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.agents import AgentProcess, enroll_agents, get, post, wait_online
from tests.controller import RunningController, controller_for, wait_for, write_legacy_rune

playwright_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[2]
AGENTS = 4
ARTIFACTS = Path(os.environ.get("FLEET_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "dashboard"
LIVE_S = 30_000  # ms Playwright waits for a live update


def chromium_path() -> str:
    found = os.environ.get("FLEET_TEST_CHROMIUM") or shutil.which("chromium")
    if not found:
        message = "Chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("FLEET_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningController, list[AgentProcess], dict[str, str]]]:
    """A controller, four running agents, the rune `ticker` 1.0.0, and an operator's and a
    viewer's token."""
    tmp = tmp_path_factory.mktemp("dashboard")
    with contextlib.ExitStack() as stack:
        ctl = stack.enter_context(controller_for("sqlite", tmp))
        agents = enroll_agents(ctl, tmp, AGENTS, labels={"site": "lab"})
        ctl.push(write_legacy_rune(tmp, "ticker.rune"), org="default", name="ticker",
                 version="1.0.0")  # fmt: skip
        for agent in agents:
            stack.callback(agent.stop)
            agent.start()
        wait_online(ctl, agents)
        tokens = {
            role: post(ctl, "/api/v1/tokens", {"name": name, "role": role})["token"]
            for name, role in (("ops", "operator"), ("watcher", "viewer"))
        }
        yield ctl, agents, tokens


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def sign_in(browser: Any, ctl: RunningController, token: str, width: int = 1280) -> Any:
    page = browser.new_page(viewport={"width": width, "height": 900})
    outside: list[str] = []
    host = urlsplit(ctl.url).netloc

    def record(request: Any) -> None:
        if urlsplit(request.url).netloc not in (host, ""):
            outside.append(request.url)

    page.on("request", record)
    page.outside = outside
    page.goto(ctl.url + "/")
    assert urlsplit(page.url).path == "/login"
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("main button[type=submit]")
    assert urlsplit(page.url).path == "/", page.content()[:2000]
    return page


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_an_operator_follows_a_rollout_live_and_pauses_it(
    fleet: tuple[RunningController, list[AgentProcess], dict[str, str]], browser: Any
) -> None:
    ctl, agents, tokens = fleet
    expect = playwright_api.expect
    page = sign_in(browser, ctl, tokens["operator"])
    expect(page.locator('[data-stat="enrolled"]')).to_have_text(str(AGENTS))
    expect(page.locator('[data-stat="online"]')).to_have_text(str(AGENTS), timeout=LIVE_S)
    assert page.locator(".role").inner_text() == "ops · operator"
    shot(page, "overview")

    page.click("nav >> text=Devices")
    for agent in agents:
        expect(page.locator(f"#devices a:text('{agent.device_id}')")).to_be_visible()
    shot(page, "devices")
    page.goto(f"{ctl.url}/devices?label=site")  # not k=v: said on the page, nothing filtered
    playwright_api.expect(page.locator("main .error")).to_contain_text("is not k=v")
    assert page.locator("#devices tbody a").count() == AGENTS
    page.goto(f"{ctl.url}/devices?label=site=lab")
    page.click(f"#devices a:text('{agents[0].device_id}')")
    expect(page.locator("h1")).to_contain_text(agents[0].device_id)
    expect(page.locator("main")).to_contain_text("affirming")
    shot(page, "device")

    # A rollout that passes its canary, then soaks long enough to be paused by hand.
    created = post(ctl, "/api/v1/rollouts", {
        "rune": "ticker@1.0.0", "selector": {"site": "lab"}, "waves": "1,100%", "soak": "10m",
    })  # fmt: skip
    page.goto(f"{ctl.url}/rollouts/{created['id']}")
    page.evaluate("window.notReloaded = true")
    first = page.locator('#waves tr[data-wave="1"]')
    expect(first).to_contain_text("succeeded 1", timeout=LIVE_S)  # arrived without a reload
    assert page.evaluate("window.notReloaded") is True
    expect(page.locator("#rollout-state")).to_have_text("running")
    shot(page, "rollout")

    page.click("button.act-pause")
    expect(page.locator("#notice")).to_have_text("Pause: done")
    expect(page.locator("#rollout-state")).to_have_text("paused", timeout=LIVE_S)
    assert get(ctl, f"/api/v1/rollouts/{created['id']}")["state"] == "paused"
    expect(page.locator("button.act-resume")).to_be_visible()

    page.click("nav >> text=Audit")
    pause = page.locator("#audit tr", has_text=f"/api/v1/rollouts/{created['id']}/pause")
    expect(pause).to_contain_text("ops (operator)")
    expect(pause).to_contain_text("ok")
    shot(page, "audit")
    for name in ("Runes", "Telemetry", "Rollouts"):
        page.click(f"nav >> text={name}")
        shot(page, name.lower())
    assert page.outside == []

    phone = browser.new_page(viewport={"width": 375, "height": 800})
    phone.context.add_cookies(page.context.cookies())
    phone.goto(f"{ctl.url}/rollouts/{created['id']}")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 375  # tables scroll inside
    shot(phone, "rollout-phone")

    response = page.request.get(ctl.url + "/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy


def test_a_viewer_gets_no_buttons_and_the_api_refuses_its_writes(
    fleet: tuple[RunningController, list[AgentProcess], dict[str, str]], browser: Any
) -> None:
    ctl, _agents, tokens = fleet
    rollout_id = wait_for(
        lambda: next(
            (r["id"] for r in get(ctl, "/api/v1/rollouts")["rollouts"] if r["state"] == "paused"),
            None,
        ),
        timeout=30, message="a paused rollout (from the operator's test)",
    )  # fmt: skip
    page = sign_in(browser, ctl, tokens["viewer"])
    page.goto(f"{ctl.url}/rollouts/{rollout_id}")
    playwright_api.expect(page.locator("#rollout-state")).to_have_text("paused")
    assert page.locator("button[data-action]").count() == 0
    page.click("nav >> text=Audit")
    playwright_api.expect(page.locator("main")).to_contain_text("needs the operator role")

    write = f"/api/v1/rollouts/{rollout_id}/resume"
    refused = page.evaluate(
        """async (path) => {
            const headers = {"X-Fleet-Dashboard": "1"};
            const withHeader = await fetch(path, {method: "POST", headers: headers});
            const cookieOnly = await fetch(path, {method: "POST"});
            return [withHeader.status, (await withHeader.json()).error, cookieOnly.status];
        }""",
        write,
    )
    assert refused[0] == 403 and "operator" in refused[1], refused
    assert refused[2] == 401, refused
    assert get(ctl, f"/api/v1/rollouts/{rollout_id}")["state"] == "paused"
    assert page.outside == []
