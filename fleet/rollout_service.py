"""Rollouts in the database: create, show, list, operator actions, and carrying out decisions.

The state machine is `fleet.rollouts` (pure); the plan is `fleet.rollout_plan`; the scheduler that
drives running rollouts is `fleet.scheduler`; the REST contract is docs/rollouts-api.md.

Rules:
- A rollout is a `Rollout` row whose `machine` column is the state machine's `to_dict()`. Every
  write of it goes through `persist`: one transaction that checks and bumps the row's `version`
  (optimistic concurrency: the scheduler and an operator action never overwrite each other; the
  loser reloads and tries again) and creates the commands its decisions call for. Commands are
  created `queued` inside the transaction and published after it committed (a crash in between
  leaves them queued, and the outbox sends queued commands on its next pass).
- A deploy's command id is `{rollout id}.{device id}.{attempt}`, a rollback's
  `{rollout id}.{device id}.rollback`; the outbox returns the existing command for an id it has,
  so deciding twice (a restart between deciding and recording) never sends twice.
- The selection is the enrolled devices whose labels match every `k=v` of the selector,
  restricted to `devices` when given, minus devices of other unfinished (scheduled, running,
  paused) rollouts. At creation every selected device gets a `RolloutDevice` row, and so does
  every device a wave draws later; these rows are what the overlap refusal looks at: creating a
  rollout that selects a device with a row in another unfinished rollout is refused (409).
- Before a device is first notified, what it runs (`Device.active_rune`) is recorded in its
  `RolloutDevice` row. A rollback sends the device a `rollback` command back to its previous
  slot, naming that rune (`to`): the agent switches only if its previous slot holds it, and
  answers `done` if it is already active (a device whose deploy failed). A deploy of the older
  version would be refused by the agent's anti-rollback check.
- A device the fleet cannot notify now: `ineligible` when it is no longer enrolled or has no fresh
  affirming attestation result (the reason says which), `quarantined` when a contraindicated
  result quarantined it, `offline` when `Device.online` is false.
- Times in the JSON are ISO 8601 UTC; the state machine's times are POSIX seconds of the same
  clock as the outbox's.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tortoise.transactions import in_transaction

from attestation.policy import Status
from fleet.db import sql
from fleet.db.models import Command, Device, RolloutDevice, Rune
from fleet.db.models import Rollout as RolloutRow
from fleet.logs import log
from fleet.outbox import CommandChange, CommandRequest, Outbox, OutboxError
from fleet.rollout_metrics import RolloutMetrics
from fleet.rollout_plan import (
    DEFAULT_WAVES,
    OnFailure,
    Options,
    PlanError,
    Rate,
    Selection,
    WaveSpec,
    parse_duration,
    parse_percent,
    parse_rate,
    plan_waves,
)
from fleet.rollouts import (
    Decision,
    DeviceState,
    InvalidAction,
    Notify,
    Rollout,
    RolloutChanged,
    RolloutError,
    SendRollback,
    Skip,
    SkipReason,
    Unavailable,
    WaveStarted,
)
from ota.protocol import MessageType
from ota.targets import DEFAULT_ORG, TargetNameError, check_part, parse_rune_ref

ACTIVE = ("scheduled", "running", "paused")
ACTIONS = ("pause", "resume", "abort", "rollback")
ROLLBACK_SUFFIX = "rollback"
MAX_DEVICES_LISTED = 10_000
PERSIST_ATTEMPTS = 5


class RolloutRefused(Exception):
    """A request the service refuses: `status` (400, 404, 409) and one clear sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# Command ids.


def command_id(rollout_id: str, device_id: str, attempt: int | str) -> str:
    return f"{rollout_id}.{device_id}.{attempt}"


def parse_command_id(value: str) -> tuple[str, str, int | None] | None:
    """(rollout id, device id, attempt or None for the rollback) of a rollout's command id."""
    if not value.startswith("r-"):
        return None
    parts = value.split(".")
    if len(parts) != 3:
        return None
    rollout_id, device_id, tail = parts
    if tail == ROLLBACK_SUFFIX:
        return rollout_id, device_id, None
    if not tail.isdigit():
        return None
    return rollout_id, device_id, int(tail)


# The command states, as the state machine sees them (docs/rollouts-api.md's table).

_DEVICE_STATE = {
    "queued": DeviceState.NOTIFIED,
    "sent": DeviceState.NOTIFIED,
    "received": DeviceState.NOTIFIED,
    "downloading": DeviceState.DOWNLOADING,
    "verifying": DeviceState.VERIFYING,
    "installing": DeviceState.INSTALLING,
    "health-check": DeviceState.HEALTH_CHECK,
    "succeeded": DeviceState.SUCCEEDED,
    "failed": DeviceState.FAILED,
    "refused": DeviceState.FAILED,
    "rolled-back": DeviceState.ROLLED_BACK,
    "timed-out": DeviceState.TIMED_OUT,
}


def device_state(command_state: str) -> DeviceState | None:
    """The device state a deploy command's state means (None for a state it cannot have)."""
    return _DEVICE_STATE.get(command_state)


def rollback_result(command_state: str) -> bool | None:
    """A rollback command's outcome: True (done), False (failed), None (not finished)."""
    if command_state in ("succeeded", "done", "rolled-back"):
        return True
    if command_state in ("failed", "refused", "timed-out"):
        return False
    return None


def feed_command(machine: Rollout, command: CommandChange, now: float) -> list[Decision]:
    """Give the machine what a command's state says about its device (nothing if stale)."""
    parsed = parse_command_id(command.id)
    if parsed is None:
        return []
    _, device_id, attempt = parsed
    reason = command.reason or None
    if attempt is None:
        ok = rollback_result(command.state)
        if ok is None:
            return []
        return machine.on_rollback_report(device_id, ok, now, reason=reason)
    state = device_state(command.state)
    if state is None or state is DeviceState.TIMED_OUT:
        # A command's deadline is the machine's: its own tick times the device out.
        return []
    if state is DeviceState.SUCCEEDED:
        reason = None
    elif state is DeviceState.FAILED and command.state == "refused":
        reason = f"refused: {command.reason}" if command.reason else "refused"
    return machine.on_report(device_id, state, now, reason=reason, attempt=attempt)


def change_of(command: Command) -> CommandChange:
    """A stored command as the change that brought it to its state."""
    return CommandChange(command.id, command.device_id, command.state, command.reason)


# The fleet as a rollout sees it.


@dataclass
class FleetData:
    """The enrolled devices (labels, online, attestation, quarantine) at `now`, and which devices
    unfinished rollouts hold."""

    now: datetime
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    online: dict[str, bool] = field(default_factory=dict)
    held: dict[str, list[str]] = field(default_factory=dict)  # device id -> rollout ids
    # device id -> why it cannot take a rollout now: quarantined, or no fresh affirming result
    quarantined: dict[str, str] = field(default_factory=dict)
    not_attested: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def load(cls, now: datetime) -> FleetData:
        data = cls(now)
        rows = await Device.filter(state="enrolled").values_list(
            "id",
            "labels",
            "online",
            "attestation_status",
            "attestation_expires_at",
            "quarantined_at",
            "quarantine_reason",
        )
        for device_id, labels, online, status, expires, quarantined, why in rows:
            device = str(device_id)
            data.labels[device] = dict(labels or {})
            data.online[device] = bool(online)
            if quarantined is not None:
                data.quarantined[device] = str(why or "no reason recorded")
            elif (problem := _attestation_problem(status, expires, now)) is not None:
                data.not_attested[device] = problem
        active = await RolloutRow.filter(state__in=ACTIVE).values_list("id", flat=True)
        if active:
            for rollout_id, device_id in await RolloutDevice.filter(
                rollout_id__in=list(active)
            ).values_list("rollout_id", "device_id"):
                data.held.setdefault(str(device_id), []).append(str(rollout_id))
        return data

    def select(
        self, selector: Mapping[str, str], devices: Sequence[str] | None, rollout_id: str | None
    ) -> dict[str, dict[str, str]]:
        only = set(devices) if devices is not None else None
        return {
            device_id: labels
            for device_id, labels in self.labels.items()
            if (only is None or device_id in only)
            and all(labels.get(key) == value for key, value in selector.items())
            and (rollout_id is None or set(self.held.get(device_id, [rollout_id])) == {rollout_id})
        }


@dataclass
class View:
    """The `FleetView` of one rollout over a `FleetData` snapshot."""

    fleet: FleetData
    selector: Mapping[str, str]
    devices: Sequence[str] | None
    rollout_id: str
    _selection: Selection | None = None

    def selection(self) -> Selection:
        if self._selection is None:
            self._selection = self.fleet.select(self.selector, self.devices, self.rollout_id)
        return self._selection

    def unavailable(self, device_id: str) -> Unavailable | None:
        fleet = self.fleet
        if device_id not in fleet.labels:
            return Unavailable(SkipReason.INELIGIBLE, "no longer enrolled")
        if device_id in fleet.quarantined:
            return Unavailable(SkipReason.QUARANTINED, fleet.quarantined[device_id])
        if not fleet.online.get(device_id, False):
            return Unavailable(SkipReason.OFFLINE)
        if device_id in fleet.not_attested:
            return Unavailable(SkipReason.INELIGIBLE, fleet.not_attested[device_id])
        return None


def _attestation_problem(status: str | None, expires: datetime | None, now: datetime) -> str | None:
    """Why a device's last attestation result does not let it take a rollout, or None."""
    if status is None or expires is None:
        return "it has not attested yet"
    if status != Status.AFFIRMING.label:
        return f"its last attestation result is {status}"
    if expires <= now:
        minutes = (now - expires).total_seconds() / 60
        return f"its attestation result expired {minutes:.0f} min ago"
    return None


def view_for(row: RolloutRow, fleet: FleetData) -> View:
    return View(fleet, dict(row.selector or {}), _devices(row), row.id)


def _devices(row: RolloutRow) -> list[str] | None:
    return list(row.devices) if row.devices is not None else None


# Creating.


@dataclass(frozen=True)
class CreateRequest:
    org: str
    name: str
    version: str
    selector: dict[str, str]
    devices: list[str] | None
    spec: WaveSpec
    options: Options
    dry_run: bool


def parse_request(body: Mapping[str, Any]) -> CreateRequest:
    """The create request's fields, validated; `RolloutRefused(400)` naming the bad one."""
    try:
        return _parse_request(body)
    except (PlanError, TargetNameError) as exc:
        raise RolloutRefused(400, str(exc)) from None


def _parse_request(body: Mapping[str, Any]) -> CreateRequest:
    ref, org = body.get("rune"), body.get("org", DEFAULT_ORG)
    if not isinstance(ref, str) or not isinstance(org, str):
        raise RolloutRefused(400, "a rollout needs `rune` (NAME@VERSION) and optionally `org`")
    name, version = parse_rune_ref(ref)
    check_part("org", org)
    selector = body.get("selector") or {}
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise RolloutRefused(400, "selector must be an object of label names to values")
    devices = body.get("devices")
    if devices is not None and (
        not isinstance(devices, list) or not all(isinstance(d, str) for d in devices)
    ):
        raise RolloutRefused(400, "devices must be a list of device ids")
    waves = body.get("waves", DEFAULT_WAVES)
    if not isinstance(waves, str):
        raise RolloutRefused(400, f"waves must be a wave spec such as {DEFAULT_WAVES}")
    spec = WaveSpec.parse(waves)
    defaults = Options()
    on_failure = body.get("on_failure", defaults.on_failure.value)
    if on_failure not in [policy.value for policy in OnFailure]:
        raise RolloutRefused(400, "on_failure must be pause, abort or rollback")
    options = Options(
        soak_s=_duration(body, "soak", defaults.soak_s),
        success_percent=_percent(body, "success", defaults.success_percent),
        max_failures_percent=_percent(body, "max_failures", defaults.max_failures_percent),
        min_executed=_count(body, "min_executed", defaults.min_executed),
        rate=_rate(body, defaults.rate),
        device_timeout_s=_duration(body, "device_timeout", defaults.device_timeout_s),
        retries=_count(body, "retries", defaults.retries),
        on_failure=OnFailure(on_failure),
        start_at=_start_at(body.get("start_at")),
    )
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RolloutRefused(400, "dry_run must be true or false")
    return CreateRequest(org, name, version, selector, devices, spec, options, dry_run)


def _option_name(key: str) -> str:
    return key.replace("_", "-")


def _duration(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise PlanError(f"--{_option_name(key)} must be a duration such as 90s, 10m or 1h")
    return parse_duration(str(value), _option_name(key))


def _percent(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise PlanError(f"--{_option_name(key)} must be a percentage such as 95%")
    return parse_percent(str(value), _option_name(key))


def _count(body: Mapping[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"--{_option_name(key)} must be a whole number")
    return value


def _rate(body: Mapping[str, Any], default: Rate) -> Rate:
    value = body.get("rate")
    if value is None:
        return default
    if not isinstance(value, str):
        raise PlanError("--rate must be a rate such as 500/min, 10/s or 1000/h")
    return parse_rate(value)


def _start_at(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PlanError("--start-at must be an ISO 8601 time such as 2026-11-25T10:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PlanError(
            f"--start-at {value!r} is not an ISO 8601 time such as 2026-11-25T10:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _selector_text(selector: Mapping[str, str], devices: Sequence[str] | None) -> str:
    text = ",".join(f"{k}={v}" for k, v in selector.items()) or "the empty selector"
    if devices is not None:
        shown = ", ".join(devices[:5]) + (", ..." if len(devices) > 5 else "")
        text += f" among the devices {shown}" if devices else " among no devices"
    return text


async def create(body: Mapping[str, Any], created_by: str, now: datetime) -> dict[str, Any]:
    """Validate, plan and (unless `dry_run`) store a rollout; the contract's JSON."""
    request = parse_request(body)
    label = f"{request.org}/{request.name}@{request.version}"
    rune = await Rune.get_or_none(org=request.org, name=request.name, version=request.version)
    if rune is None:
        raise RolloutRefused(404, f"rune {label} is not published; push it first")
    if rune.revoked_at is not None:
        raise RolloutRefused(409, f"rune {label} is revoked")
    fleet = await FleetData.load(now)
    selection = fleet.select(request.selector, request.devices, None)
    if not selection:
        raise RolloutRefused(
            400,
            "the selection is empty: no enrolled device matches "
            + _selector_text(request.selector, request.devices),
        )
    for device_id in sorted(selection):
        holders = fleet.held.get(device_id)
        if holders:
            other_id = holders[0]
            other = await RolloutRow.get(id=other_id)
            raise RolloutRefused(
                409,
                f"device {device_id} is already in {other.state} rollout {other_id} "
                f"({other.rune_name}@{other.rune_version}); wait for it, or abort it",
            )
    rollout_id = "r-" + secrets.token_hex(5)
    plan = [
        {"wave": number, "target": str(target), "devices": devices}
        for number, (target, devices) in enumerate(
            zip(request.spec.targets, plan_waves(request.spec, selection, rollout_id), strict=True),
            start=1,
        )
    ]
    if request.dry_run:
        return {"plan": plan, "selected": len(selection)}
    machine = Rollout(request.spec, request.options, rollout_id, now.timestamp())
    async with in_transaction():
        row = await RolloutRow.create(
            id=rollout_id,
            org=request.org,
            rune_name=request.name,
            rune_version=request.version,
            rune_target=rune.target_path,
            selector=request.selector,
            devices=request.devices,
            options=options_json(machine),
            selected=len(selection),
            state=machine.state.value,
            reason=None,
            machine=machine.to_dict(),
            created_by=created_by[:64],
        )
        await RolloutDevice.bulk_create(
            [RolloutDevice(rollout_id=rollout_id, device_id=d) for d in sorted(selection)]
        )
    log("rollout.created", rollout=rollout_id, rune=label, selected=len(selection), by=created_by)
    return rollout_json(row, machine, now) | {"plan": plan}


# Reading.


def iso(value: float | datetime | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return datetime.fromtimestamp(value, UTC).isoformat()


def options_json(machine: Rollout) -> dict[str, Any]:
    options = machine.options
    return {
        "waves": str(machine.spec),
        "soak_s": options.soak_s,
        "success_percent": options.success_percent,
        "max_failures_percent": options.max_failures_percent,
        "min_executed": options.min_executed,
        "rate": str(options.rate),
        "device_timeout_s": options.device_timeout_s,
        "retries": options.retries,
        "on_failure": options.on_failure.value,
        "start_at": iso(options.start_at),
    }


def load_machine(row: RolloutRow) -> Rollout:
    try:
        return Rollout.from_dict(row.machine)
    except RolloutError as exc:
        raise RolloutError(f"rollout {row.id}: {exc}") from exc


def rollout_json(row: RolloutRow, machine: Rollout, now: datetime) -> dict[str, Any]:
    summary = machine.summary(now.timestamp())
    selected = machine.waves[-1].selected if machine.waves else row.selected
    return {
        "id": row.id,
        "rune": f"{row.org}/{row.rune_name}@{row.rune_version}",
        "state": summary.state,
        "reason": summary.reason,
        "created_at": iso(row.created_at),
        "created_by": row.created_by,
        "started_at": iso(summary.started_at),
        "finished_at": iso(summary.finished_at),
        "selector": dict(row.selector or {}),
        "devices": _devices(row),
        "selected": selected,
        "options": options_json(machine),
        "waves": [
            {
                "wave": wave.number,
                "target": wave.target,
                "size": wave.size,
                "counts": wave.counts,
                "failure_reasons": wave.failure_reasons,
                "started_at": iso(wave.started_at),
                "passed_at": iso(wave.passed_at),
                "tripped_at": iso(wave.tripped_at),
                "waived": wave.waived,
            }
            for wave in summary.waves
        ],
        "waves_planned": summary.waves_planned,
        "counts": summary.counts,
        "failure_reasons": summary.failure_reasons,
        "rollback": summary.rollback,
        "eta_s": summary.eta_s,
    }


async def get_row(rollout_id: str) -> RolloutRow:
    row = await RolloutRow.get_or_none(id=rollout_id)
    if row is None:
        raise RolloutRefused(404, f"no rollout {rollout_id}; `fleetctl rollout list` shows them")
    return row


async def show(rollout_id: str, now: datetime) -> dict[str, Any]:
    row = await get_row(rollout_id)
    return rollout_json(row, load_machine(row), now)


async def list_rollouts(state: str | None, now: datetime) -> dict[str, Any]:
    query = RolloutRow.all()
    if state is not None:
        query = query.filter(state=state)
    items = []
    for row in await query.order_by("-created_at", "-id"):
        full = rollout_json(row, load_machine(row), now)
        items.append(
            {key: full[key] for key in ("id", "rune", "state", "reason", "created_at", "selected")}
            | {
                "waves_planned": full["waves_planned"],
                "waves_started": len(full["waves"]),
                "counts": full["counts"],
            }
        )
    return {"rollouts": items}


async def device_list(rollout_id: str) -> dict[str, Any]:
    row = await get_row(rollout_id)
    machine = load_machine(row)
    ids = {
        target.id: command_id(row.id, target.id, target.attempts)
        for target in machine.targets.values()
        if target.attempts
    }
    updated: dict[str, datetime] = {}
    for chunk in sql.chunks(list(ids.values())):
        for cid, when in await Command.filter(id__in=chunk).values_list("id", "updated_at"):
            updated[str(cid)] = when
    devices = []
    for wave in machine.waves:
        for device_id in wave.devices:
            target = machine.targets[device_id]
            cid = ids.get(device_id)
            devices.append(
                {
                    "id": device_id,
                    "wave": wave.number,
                    "state": target.state.value,
                    "reason": target.reason,
                    "attempt": target.attempts,
                    "command_id": cid,
                    "updated_at": iso(updated.get(cid)) if cid else iso(wave.started_at),
                }
            )
    return {"devices": devices}


# Writing.


@dataclass
class Persisted:
    """What a `persist` did: the commands it created (to publish), and the notifications that
    could not be made (device no longer enrolled: to report as failed)."""

    commands: list[Command] = field(default_factory=list)
    unreachable: list[tuple[str, int, str]] = field(default_factory=list)


def _mirror(machine: Rollout) -> dict[str, Any]:
    return {
        "machine": machine.to_dict(),
        "state": machine.state.value,
        "reason": machine.reason,
        "started_at": _dt(machine.started_at),
        "finished_at": _dt(machine.finished_at),
    }


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


async def persist(
    row: RolloutRow,
    machine: Rollout,
    decisions: Sequence[Decision],
    outbox: Outbox,
    now: datetime,
    metrics: RolloutMetrics | None = None,
) -> Persisted | None:
    """Save `machine` and carry out `decisions` in one transaction; None (nothing written) if
    the row changed since `row.version` was read. On success `row` is updated in place, the
    decisions are counted in `metrics` and the created commands are published."""
    done = Persisted()
    async with in_transaction():
        fields = _mirror(machine)
        changed = await RolloutRow.filter(id=row.id, version=row.version).update(
            **fields, version=row.version + 1, updated_at=now
        )
        if not changed:
            return None
        notify: list[Notify] = []
        for decision in decisions:
            if isinstance(decision, Notify):
                notify.append(decision)
                continue
            await _notify(row, machine, notify, outbox, now, done)
            notify = []
            await _execute(row, machine, decision, outbox, now, done)
        await _notify(row, machine, notify, outbox, now, done)
    row.version += 1
    for name, value in fields.items():
        setattr(row, name, value)
    if metrics is not None:
        metrics.record(decisions)
    # A concurrent `resend_due` may have sent one since: the outbox's claim sends each once.
    await outbox.send_many(command for command in done.commands if command.state == "queued")
    return done


async def _notify(
    row: RolloutRow,
    machine: Rollout,
    decisions: Sequence[Notify],
    outbox: Outbox,
    now: datetime,
    done: Persisted,
) -> None:
    """Make the deploy commands of `decisions`, in a few statements per chunk of devices, after
    recording what each device ran before the rollout first notified it."""
    for chunk in sql.chunks(decisions):
        devices = list(dict.fromkeys(decision.device for decision in chunk))
        links = {
            str(link.device_id): link
            for link in await RolloutDevice.filter(rollout_id=row.id, device_id__in=devices)
        }
        missing = [d for d in devices if d not in links]
        if missing:
            await RolloutDevice.bulk_create(
                [RolloutDevice(rollout_id=row.id, device_id=d) for d in missing]
            )
        first = [d for d in devices if d not in links or links[d].notified_at is None]
        previous: dict[str | None, list[str]] = {}
        if first:
            active = dict(await Device.filter(id__in=first).values_list("id", "active_rune"))
            for device_id in first:
                previous.setdefault(active.get(device_id), []).append(device_id)
        for rune, group in previous.items():
            await RolloutDevice.filter(rollout_id=row.id, device_id__in=group).update(
                previous_rune=rune, notified_at=now
            )
        body = {"org": row.org, "name": row.rune_name, "version": row.rune_version}
        deadline = timedelta(seconds=machine.options.device_timeout_s)
        requests = [
            CommandRequest(
                decision.device,
                MessageType.DEPLOY,
                body,
                f"rollout {row.id}",
                deadline,
                command_id(row.id, decision.device, decision.attempt),
            )
            for decision in chunk
        ]
        made, refused = await outbox.enqueue_many(requests)
        done.commands += made
        attempt = {r.command_id: d.attempt for r, d in zip(requests, chunk, strict=True)}
        for request, why in refused:
            done.unreachable.append((request.device_id, attempt[request.command_id], why))


async def _execute(
    row: RolloutRow,
    machine: Rollout,
    decision: Decision,
    outbox: Outbox,
    now: datetime,
    done: Persisted,
) -> None:
    deadline = timedelta(seconds=machine.options.device_timeout_s)
    by = f"rollout {row.id}"
    if isinstance(decision, SendRollback):
        link = await RolloutDevice.get_or_none(rollout_id=row.id, device_id=decision.device)
        previous = link.previous_rune if link is not None else None
        cid = command_id(row.id, decision.device, ROLLBACK_SUFFIX)
        # The device's own A/B rollback, to the slot that still holds what it ran before: an
        # agent refuses a deploy of an older version (anti-rollback), and the slot is verified.
        rollback = {"reason": f"rollout {row.id} rolled back"}
        if previous is not None and _rune_parts(previous) is not None:
            rollback["to"] = previous
        try:
            command = await outbox.enqueue(
                decision.device,
                MessageType.ROLLBACK,
                rollback,
                by,
                deadline,
                command_id=cid,
                send=False,
            )
        except OutboxError as exc:
            done.unreachable.append((decision.device, 0, str(exc)))
            return
        done.commands.append(command)
    elif isinstance(decision, WaveStarted):
        existing = {
            str(device_id)
            for device_id in await RolloutDevice.filter(
                rollout_id=row.id, device_id__in=list(decision.devices)
            ).values_list("device_id", flat=True)
        }
        new = [d for d in decision.devices if d not in existing]
        await RolloutDevice.bulk_create(
            [RolloutDevice(rollout_id=row.id, device_id=d, wave=decision.wave) for d in new]
        )
        if existing:
            await RolloutDevice.filter(rollout_id=row.id, device_id__in=list(existing)).update(
                wave=decision.wave
            )
        log(
            "rollout.wave_started",
            rollout=row.id,
            wave=decision.wave,
            devices=len(decision.devices),
        )
    elif isinstance(decision, RolloutChanged):
        log("rollout.state", rollout=row.id, state=decision.state.value, reason=decision.reason)
    elif isinstance(decision, Skip):
        log("rollout.skipped", rollout=row.id, device=decision.device, reason=decision.reason.value)
    else:
        log("rollout.decision", rollout=row.id, decision=type(decision).__name__)


def _rune_parts(ref: str | None) -> tuple[str, str, str] | None:
    """`org/name@version` as its parts, or None."""
    if not ref:
        return None
    org, sep, rest = ref.partition("/")
    if not sep:
        return None
    try:
        name, version = parse_rune_ref(rest)
        check_part("org", org)
    except TargetNameError:
        return None
    return org, name, version


async def act(
    rollout_id: str,
    action: str,
    outbox: Outbox,
    now: datetime,
    metrics: RolloutMetrics | None = None,
) -> dict[str, Any]:
    """An operator action (pause, resume, abort, rollback); the rollout after it."""
    if action not in ACTIONS:
        raise RolloutRefused(404, f"no rollout action {action!r}; one of {', '.join(ACTIONS)}")
    for _ in range(PERSIST_ATTEMPTS):
        row = await get_row(rollout_id)
        machine = load_machine(row)
        try:
            decisions: list[Decision] = getattr(machine, action)(now.timestamp())
        except InvalidAction as exc:
            raise RolloutRefused(409, str(exc)) from None
        if await persist(row, machine, decisions, outbox, now, metrics) is not None:
            log("rollout.action", rollout=rollout_id, action=action, state=machine.state.value)
            return rollout_json(row, machine, now)
    raise RolloutRefused(409, f"rollout {rollout_id} is changing quickly; try {action} again")
