"""One verified update: TUF refresh, policy, download, checks, slot, health check, switch.

Rules:
- Nothing is written to a slot before the target is verified by TUF (signatures, versions,
  expiry, length, SHA-256), its signed `custom` metadata passes the device policy, and the
  downloaded rune's own manifest agrees with that metadata.
- The rune's provenance (`ota.rune_provenance`) is checked after its bytes are verified and
  before it is health-checked: a rune whose statement does not verify never runs, not even in
  the sandbox.
- The new rune is health-checked in the sandbox from memory before it is written, so an unhealthy
  rune never displaces the previous rune kept in the inactive slot. The active rune is never
  touched until the new one is fully written (fsynced) into the inactive slot; the switch is one
  atomic write.
- A rune older than the active version of the same org and name is refused (a rollback attack
  or a mistake); going back is `rollback`, which uses the slot that ran before.
- Every refresh also enforces revocation: an active rune whose target is no longer published is
  deactivated (falling back to the previous rune only if that one is still published).
- Attacks and policy refusals are `UpdateRefused`; transient problems (network, controller down,
  not registered) are `UpdateUnavailable`; both leave the slots exactly as they were.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path

from agent.faults import crash_point
from agent.health import HealthReport, health_check
from agent.policy import AgentPolicy
from agent.sandbox.limits import SandboxLimits
from agent.slots import SlotRune, Slots
from attestation.identity import DeviceIdentity
from attestation.policy import AllOf
from ota.fetcher import TufFetcher
from ota.rune_provenance import check_rune_provenance
from ota.target_policy import (
    CapabilitiesAllowed,
    KindSupported,
    MinimumAgentVersion,
    RequestedTarget,
    rune_matches_target,
)
from ota.targets import RuneTarget, rune_target_path, version_key
from ota.updater import TufClient, UpdateRefused

TUF_DIR = "tuf"
PARTIAL_DIR = "partial"


@functools.cache
def agent_version() -> str:
    """This agent's version; read once per process (`importlib.metadata` scans the installed
    distributions, ~0.1 ms, and the installed version does not change under a running agent)."""
    return dist_version("fleet-tinyml")


@dataclass
class UpdateReport:
    """What an update did, step by step, for the CLI (and later the status report)."""

    target: str
    status: str = "started"
    slot: str | None = None
    sha256: str | None = None
    steps: list[str] = field(default_factory=list)
    health: HealthReport | None = None

    def step(self, text: str) -> None:
        self.steps.append(text)


def tuf_client(
    state_dir: Path,
    server: str,
    identity: DeviceIdentity,
    passport: Callable[[], str | None] | None = None,
) -> TufClient:
    """The device's TUF client; `passport` gives the attestation result its rune downloads
    present (`client.fetcher.limited(s)` bounds a check that must not hold the device up when
    the repository is slow)."""
    fetcher = TufFetcher.for_device(
        identity,
        partial_dir=state_dir / PARTIAL_DIR,
        progress=lambda _url, _received: crash_point("download"),
        passport=passport,
    )
    return TufClient(state_dir / TUF_DIR, server, fetcher, state_dir / TUF_DIR / "downloads")


def provision_root(state_dir: Path, root_json: Path) -> bool:
    """Install the fleet's root.json as the device's trust anchor, once. True if installed."""
    from tuf.api.metadata import Metadata, Root

    trusted = state_dir / TUF_DIR / "root.json"
    if trusted.exists():
        return False
    try:
        data = root_json.read_bytes()
        Metadata[Root].from_bytes(data)
    except OSError as exc:
        raise ValueError(f"cannot read {root_json}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise ValueError(f"{root_json} is not TUF root metadata ({exc})") from None
    trusted.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = trusted.with_suffix(".tmp")
    temporary.write_bytes(data)
    temporary.replace(trusted)
    return True


def enforce_revocations(slots: Slots, client: TufClient, now: float) -> str | None:
    """Stop running a rune whose target was removed; returns the reason when it did."""
    state = slots.state()
    if state.active is None:
        return None
    active = slots.rune(state.active.slot)
    info = client.target_info(active.target)
    if info is not None and info.sha256 == active.sha256:
        return None

    def refused(rune: SlotRune) -> bool:
        published = client.target_info(rune.target)
        return published is None or published.sha256 != rune.sha256

    reason = f"{active.ref} ({active.org}) is no longer published: revoked by the controller"
    slots.deactivate(reason, now, refuse=refused)
    return reason


def check(state_dir: Path, server: str, *, clock: Callable[[], float] = time.time) -> str | None:
    """Refresh the signed metadata and enforce revocations; the reason if the rune was stopped."""
    identity = DeviceIdentity.load_or_create(state_dir)
    slots = Slots(state_dir, policy=AgentPolicy.load(state_dir).probation)
    slots.recover(clock())
    client = tuf_client(state_dir, server, identity)
    client.refresh()
    return enforce_revocations(slots, client, clock())


def update(
    state_dir: Path,
    server: str,
    org: str,
    name: str,
    version: str,
    *,
    policy: AgentPolicy | None = None,
    limits: SandboxLimits | None = None,
    clock: Callable[[], float] = time.time,
    slots: Slots | None = None,
    on_phase: Callable[[str], None] | None = None,
    refreshed: TufClient | None = None,
    passport: Callable[[], str | None] | None = None,
) -> UpdateReport:
    """Update to `org/name@version`. `slots` is the caller's `Slots` when it has one open (the
    daemon shares one between its rune loop and updates); `on_phase` hears each phase as it
    starts: "downloading", "verifying", "health-check", "installing". `refreshed` is a client
    the caller refreshed moments ago (the daemon's check of the command key, for this very
    command), whose metadata is used as it is instead of being fetched again. `passport` gives
    the device's attestation result, which the controller needs to see before it serves a rune."""
    policy = policy or AgentPolicy()
    path = rune_target_path(org, name, version)
    report = UpdateReport(path)
    if slots is None:
        slots = Slots(state_dir, policy=policy.probation)
        slots.recover(clock())
    phase = on_phase or (lambda _phase: None)
    if refreshed is None:
        client = tuf_client(state_dir, server, DeviceIdentity.load_or_create(state_dir), passport)
        client.refresh()
        report.step("refreshed the signed metadata (root, timestamp, snapshot, targets)")
    else:
        client = refreshed
        report.step("uses the signed metadata refreshed when the command arrived")
    if passport is not None:
        client.fetcher.passport = passport
    revoked = enforce_revocations(slots, client, clock())
    if revoked:
        report.step(f"stopped the active rune: {revoked}")

    target = client.rune_target(path)
    checks = AllOf(
        RequestedTarget(org, name, version),
        KindSupported(),
        CapabilitiesAllowed(policy.allowed_capabilities),
        MinimumAgentVersion(agent_version()),
    )
    verdict = checks.check(target)
    if not verdict:
        raise UpdateRefused(f"{target.ref}: {verdict.reason}", "policy")
    report.step(f"policy allows {target.ref} ({', '.join(target.capabilities) or 'no inputs'})")

    signed = client.target_info(path)
    current = slots.active(clock())
    if current is not None and signed is not None:
        _, active = current
        if active.sha256 == signed.sha256:
            report.status = "already-active"
            report.sha256 = active.sha256
            report.step(f"{target.ref} is already the active rune; nothing to do")
            return report
        if (
            (active.org, active.name) == (target.org, target.name)
            and version_key(target.version) < version_key(active.version)
            and not policy.allow_downgrade
        ):
            raise UpdateRefused(
                f"rollback: {target.ref} is older than the active {active.ref}; "
                "use `fleet-agent rollback` to go back to the previous rune",
                "rollback",
            )

    phase("downloading")
    verified = client.fetch_target(path)
    phase("verifying")
    report.step(f"downloaded {verified.length} bytes and verified length and SHA-256")
    crash_point("verify")
    matches = rune_matches_target(target, verified.data)
    if not matches:
        raise UpdateRefused(f"{target.ref}: {matches.reason}", "wrong-software")
    report.step("the rune's own manifest matches its signed metadata")
    provenance = check_rune_provenance(
        client,
        target,
        verified.custom,
        verified.data,
        verified.sha256,
        required=policy.require_provenance,
    )
    report.step(f"provenance: {provenance}")

    phase("health-check")
    allowed = policy.allowed_kinds()
    health = health_check(
        verified.data, target.ref, limits, policy.health_check_calls, allowed=allowed
    )
    report.health = health
    if not health.ok:
        report.status = "health-check-failed"
        report.step(f"health check failed, nothing installed: {health.reason}")
        return report
    report.step(f"health check passed: {health.reason} in {health.duration * 1000:.0f} ms")

    phase("installing")
    info = _slot_rune(target, verified.sha256, verified.length, clock())
    slot = slots.install(verified.data, info, verified=verified)
    report.slot = slot
    report.sha256 = verified.sha256
    report.step(f"wrote slot {slot} (fsynced); the active rune is untouched")

    slots.switch(slot, clock())
    report.status = "installed"
    window = policy.probation.window
    report.step(
        f"switched to slot {slot}; {target.ref} is on probation for {window:.0f} s "
        f"(rolled back after {policy.probation.max_failures} failures)"
    )
    return report


def _slot_rune(target: RuneTarget, sha256: str, length: int, now: float) -> SlotRune:
    return SlotRune(
        target=target.path,
        org=target.org,
        name=target.name,
        version=target.version,
        sha256=sha256,
        length=length,
        kind=target.kind,
        capabilities=target.capabilities,
        installed_at=now,
    )
