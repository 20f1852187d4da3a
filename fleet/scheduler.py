"""The rollout scheduler: one asyncio task in the controller that drives every unfinished rollout.

Rules:
- Only one controller replica schedules. On PostgreSQL the scheduler holds
  `pg_try_advisory_lock(LOCK_KEY)` on a connection of its own, tries again every
  `LOCK_RETRY_S` while another replica holds it, and stops scheduling as soon as that connection
  is lost (checked every `LOCK_CHECK_S`). On SQLite there is one controller process anyway.
- It keeps each scheduled, running or paused rollout (and each rolled-back one whose rollbacks are
  still out) in memory as the state machine, with the row's `version`. Every `REFRESH_S` it looks
  at the rows' versions: a new rollout is loaded, one another writer changed (an operator action,
  maybe on another replica) is loaded again, a finished one is dropped.
- Loading is recovery: the machine is `from_dict` of the stored state, then every in-flight
  device's command (`{rollout}.{device}.{attempt}`, or `.rollback`) is looked up and its current
  state fed in, so reports that arrived while no scheduler ran (a restart, even `kill -9`) are
  not lost; an in-flight device whose command is missing gets it enqueued (same id: the outbox
  returns an existing command instead of sending a second one).
- Command state changes reach it through the outbox's `on_change` (this replica's reports) and,
  every `POLL_S`, by reading the commands of in-flight devices (reports another replica took).
  States map as docs/rollouts-api.md says (`rollout_service.device_state`); a command that timed
  out is left to the machine's own deadline, which is the same.
- Each pass feeds the events that arrived and ticks each rollout whose `next_wake()` has come
  (and at least every `TICK_S` while it runs). A pass that decided something persists the
  rollout with its decisions at once, in one transaction (`rollout_service.persist`): nothing is
  sent that is not recorded first. Progress alone (reports that moved devices on, a tick that
  decided nothing) is persisted at most every `PERSIST_EVERY_S`, since the state of a large
  rollout is a large document; what is not yet written is not lost, since loading replays the
  commands' states. Passes start at most every `PASS_MIN_S` (wall time), so a burst of reports
  is fed at once. If the row changed under it, it reloads (recovering from the command table
  again) and decides anew, so no event is lost and no device notified twice.
- It ticks only while `presence_known()` (the broker link's: `fleet.channel`) says the devices'
  `online` flags can be trusted. A broker that restarts delivers every device's last will first,
  and a tick then would skip every pending device as offline and maybe end the rollout
  `completed` without them; reports are still fed meanwhile.
- Time is the outbox's clock, as POSIX seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fleet.db import postgres_dsn, sql
from fleet.db.models import Command
from fleet.db.models import Rollout as RolloutRow
from fleet.logs import log
from fleet.outbox import CommandChange, Outbox, OutboxError
from fleet.rollout_metrics import RolloutMetrics
from fleet.rollout_service import (
    ACTIVE,
    FleetData,
    change_of,
    command_id,
    feed_command,
    load_machine,
    parse_command_id,
    persist,
    view_for,
)
from fleet.rollouts import (
    IN_FLIGHT,
    Decision,
    DeviceState,
    RollbackState,
    Rollout,
    RolloutError,
    RolloutState,
)
from ota.protocol import MessageType

LOCK_KEY = 0x666C656574_01  # "fleet" + 1: the scheduler's advisory lock
LOCK_RETRY_S = 3.0
LOCK_CHECK_S = 5.0
REFRESH_S = 1.0
TICK_S = 1.0
POLL_S = 2.0
ERROR_PAUSE_S = 2.0
OBSERVE_S = 1.0
PASS_MIN_S = 0.2
PERSIST_EVERY_S = 1.0


@dataclass
class Loaded:
    row: RolloutRow
    machine: Rollout
    events: list[CommandChange] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    last_tick: float = 0.0
    dirty: bool = False  # changed since it was last persisted
    persisted_at: float = 0.0


class Scheduler:
    def __init__(
        self,
        outbox: Outbox,
        clock: Callable[[], datetime],
        db_url: str,
        metrics: RolloutMetrics | None = None,
        presence_known: Callable[[], bool] = lambda: True,
    ) -> None:
        self.outbox = outbox
        self.metrics = metrics
        self.presence_known = presence_known
        self._last_observed = 0.0
        self._last_pass = 0.0
        self.clock = clock
        self.db_url = db_url
        self.rollouts: dict[str, Loaded] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._last_poll = 0.0
        self.leading = False
        self._lock_lost = False
        previous = outbox.on_change

        def on_change(change: CommandChange) -> None:
            previous(change)
            self.command_changed(change)

        outbox.on_change = on_change

    # Inputs.

    def command_changed(self, change: CommandChange) -> None:
        parsed = parse_command_id(change.id)
        if parsed is None:
            return
        loaded = self.rollouts.get(parsed[0])
        if loaded is not None:
            loaded.events.append(change)
            self._wake.set()

    def poke(self) -> None:
        """Something changed (a rollout was created or acted on): look at the rows now."""
        self._last_refresh = 0.0
        self._wake.set()

    # Life cycle.

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollout-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                async with self._leadership():
                    self.leading = True
                    log("rollout.scheduler_leading")
                    await self._lead()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log("rollout.scheduler_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                logging.getLogger("fleet").exception("the rollout scheduler failed")
                await asyncio.sleep(ERROR_PAUSE_S)
            finally:
                self.leading = False
                self.rollouts.clear()
                self._observe(0.0, force=True)

    @contextlib.asynccontextmanager
    async def _leadership(self) -> AsyncIterator[None]:
        dsn = postgres_dsn(self.db_url)
        if dsn is None:
            yield
            return
        import asyncpg  # type: ignore[import-untyped]  # only on PostgreSQL

        while True:
            connection = await asyncpg.connect(dsn)
            try:
                if await connection.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                    break
            except BaseException:
                await connection.close()
                raise
            await connection.close()
            await asyncio.sleep(LOCK_RETRY_S)
        self._lock_lost = False
        watcher = asyncio.create_task(self._watch_lock(connection))
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            with contextlib.suppress(Exception):
                await connection.close()

    async def _watch_lock(self, connection: object) -> None:
        """Return (which cancels the scheduling) once the lock's connection is lost."""
        while True:
            await asyncio.sleep(LOCK_CHECK_S)
            try:
                await connection.fetchval("SELECT 1")  # type: ignore[attr-defined]
            except Exception as exc:
                log("rollout.scheduler_lock_lost", logging.ERROR, error=str(exc))
                self._lock_lost = True
                self._wake.set()
                return

    # The loop.

    async def _lead(self) -> None:
        while not self._lock_lost:
            # Reports arrive in bursts (each device sends several states): gather them, since
            # every pass that changes a rollout writes its whole state.
            await asyncio.sleep(max(self._last_pass + PASS_MIN_S - time.monotonic(), 0.0))
            self._last_pass = time.monotonic()
            now = self.clock().timestamp()
            if now - self._last_refresh >= REFRESH_S:
                self._last_refresh = now
                await self._refresh()
            if now - self._last_poll >= POLL_S:
                self._last_poll = now
                await self._poll_commands()
            fleet: FleetData | None = None
            # No tick while presence is unknown (the broker away, or just back): it would skip
            # every device as offline. Events are still fed.
            ticking = self.presence_known()
            for rollout_id in list(self.rollouts):
                loaded = self.rollouts[rollout_id]
                if ticking and self._due(loaded, now) and fleet is None:
                    fleet = await FleetData.load(self.clock())
                await self._pass(loaded, fleet)
            self._observe(now)
            self._wake.clear()
            if any(loaded.events or loaded.failed for loaded in self.rollouts.values()):
                continue
            sleep = self._sleep_for(now) if ticking else min(REFRESH_S, POLL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

    def _observe(self, now: float, force: bool = False) -> None:
        """Refresh the rollout gauges, at most every `OBSERVE_S`."""
        if self.metrics is None or not (force or now - self._last_observed >= OBSERVE_S):
            return
        self._last_observed = now
        self.metrics.observe(self.leading, (loaded.machine for loaded in self.rollouts.values()))

    def _due(self, loaded: Loaded, now: float) -> bool:
        machine = loaded.machine
        wake = machine.next_wake()
        if wake is not None and wake <= now:
            return True
        return machine.state is RolloutState.RUNNING and now - loaded.last_tick >= TICK_S

    def _sleep_for(self, now: float) -> float:
        wait = min(REFRESH_S, POLL_S)
        for loaded in self.rollouts.values():
            wake = loaded.machine.next_wake()
            if loaded.dirty:
                flush = loaded.persisted_at + PERSIST_EVERY_S
                wake = flush if wake is None else min(wake, flush)
            if wake is not None:
                wait = min(wait, max(wake - now, 0.0))
        return max(wait, 0.01)

    async def _pass(self, loaded: Loaded, fleet: FleetData | None) -> None:
        """Feed one rollout its events (and a tick when due) and persist the result."""
        for _ in range(3):
            now_dt = self.clock()
            now = now_dt.timestamp()
            machine = loaded.machine
            events, loaded.events = loaded.events, []
            failed, loaded.failed = loaded.failed, []
            decisions: list[Decision] = []
            for command in events:
                decisions += feed_command(machine, command, now)
            for device_id, attempt, reason in failed:
                if attempt:
                    decisions += machine.on_report(
                        device_id, DeviceState.FAILED, now, reason=reason, attempt=attempt
                    )
                else:
                    decisions += machine.on_rollback_report(device_id, False, now, reason=reason)
            ticked = False
            if fleet is not None and self._due(loaded, now):
                decisions += machine.tick(now, view_for(loaded.row, fleet))
                loaded.last_tick, ticked = now, True
            loaded.dirty = loaded.dirty or bool(events or failed) or ticked
            flush = loaded.dirty and now - loaded.persisted_at >= PERSIST_EVERY_S
            if not decisions and not flush:
                return
            done = await persist(loaded.row, machine, decisions, self.outbox, now_dt, self.metrics)
            if done is not None:
                loaded.dirty, loaded.persisted_at = False, now
                loaded.failed += done.unreachable
                # A command that existed already (decided again after a restart) may have moved
                # on: its state is news to the machine.
                loaded.events += [
                    change_of(c) for c in done.commands if c.state not in ("queued", "sent")
                ]
                if self._finished(machine):
                    self.rollouts.pop(loaded.row.id, None)
                return
            # Another writer changed the row: start again from what is stored now.
            fresh = await self._load(loaded.row.id)
            if fresh is None:
                self.rollouts.pop(loaded.row.id, None)
                return
            loaded = fresh
        log("rollout.scheduler_contended", logging.WARNING, rollout=loaded.row.id)

    @staticmethod
    def _finished(machine: Rollout) -> bool:
        return machine.state.value not in ACTIVE and machine.settled

    # Loading and recovery.

    async def _refresh(self) -> None:
        rows = await RolloutRow.filter(state__in=[*ACTIVE, RolloutState.ROLLED_BACK.value])
        seen = set()
        for row in rows:
            seen.add(row.id)
            loaded = self.rollouts.get(row.id)
            if loaded is not None and loaded.row.version == row.version:
                continue
            machine = self._machine(row)
            if machine is None:
                continue
            if row.state not in ACTIVE and machine.settled:
                self.rollouts.pop(row.id, None)
                continue
            await self._recover(row, machine)
        for rollout_id in list(self.rollouts):
            if rollout_id not in seen:
                self.rollouts.pop(rollout_id, None)

    def _machine(self, row: RolloutRow) -> Rollout | None:
        try:
            return load_machine(row)
        except RolloutError as exc:
            log("rollout.unloadable", logging.ERROR, rollout=row.id, error=str(exc))
            return None

    async def _load(self, rollout_id: str) -> Loaded | None:
        row = await RolloutRow.get_or_none(id=rollout_id)
        if row is None:
            return None
        machine = self._machine(row)
        if machine is None:
            return None
        return await self._recover(row, machine)

    async def _recover(self, row: RolloutRow, machine: Rollout) -> Loaded:
        """Register the rollout, with the current state of each in-flight device's command as
        events (and the commands a crash left unmade enqueued)."""
        old = self.rollouts.get(row.id)
        loaded = Loaded(row, machine, last_tick=old.last_tick if old else 0.0)
        self.rollouts[row.id] = loaded
        wanted = self._in_flight_commands(row.id, machine)
        if not wanted:
            return loaded
        found = {change.id: change for change in await _changes(wanted)}
        loaded.events += found.values()
        missing = [cid for cid in wanted if cid not in found]
        if missing:
            log("rollout.recovering", rollout=row.id, missing_commands=len(missing))
        for cid in missing:
            await self._remake(loaded, cid)
        return loaded

    async def _remake(self, loaded: Loaded, cid: str) -> None:
        """Enqueue the command of an in-flight device that has none (its enqueue failed)."""
        parsed = parse_command_id(cid)
        assert parsed is not None
        _, device_id, attempt = parsed
        if attempt is None:
            loaded.failed.append((device_id, 0, "its rollback command was never made"))
            return
        row = loaded.row
        body = {"org": row.org, "name": row.rune_name, "version": row.rune_version}
        deadline = timedelta(seconds=loaded.machine.options.device_timeout_s)
        try:
            await self.outbox.enqueue(
                device_id, MessageType.DEPLOY, body, f"rollout {row.id}", deadline, command_id=cid
            )
        except OutboxError as exc:
            loaded.failed.append((device_id, attempt, str(exc)))

    @staticmethod
    def _in_flight_commands(rollout_id: str, machine: Rollout) -> list[str]:
        ids = [
            command_id(rollout_id, target.id, target.attempts)
            for target in machine.targets.values()
            if target.state in IN_FLIGHT and target.attempts
        ]
        ids += [
            command_id(rollout_id, target.id, "rollback")
            for target in machine.targets.values()
            if target.rollback is RollbackState.SENT
        ]
        return ids

    async def _poll_commands(self) -> None:
        """Feed the in-flight devices' commands that moved (reports another replica took)."""
        for loaded in list(self.rollouts.values()):
            wanted = self._in_flight_commands(loaded.row.id, loaded.machine)
            loaded.events += await _changes(wanted, moved_only=True)


async def _changes(ids: list[str], moved_only: bool = False) -> list[CommandChange]:
    """The stored state of the commands `ids` (with `moved_only`, of those past `sent`)."""
    changes = []
    for chunk in sql.chunks(ids):
        query = Command.filter(id__in=chunk)
        if moved_only:
            query = query.filter(state__not_in=["queued", "sent"])
        rows = await query.values_list("id", "device_id", "state", "reason")
        changes += [CommandChange(str(c), str(d), str(s), str(r)) for c, d, s, r in rows]
    return changes
