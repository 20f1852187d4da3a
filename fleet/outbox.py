"""The command outbox: every command is stored before it is published, and followed to its end.

Rules:
- A command is a `Command` row first (state `queued`); only then is it signed and published. A
  publish that fails leaves it to be sent again; nothing is sent that is not stored.
- Each (re)send is a fresh envelope: the device's next `command_seq` (allocated and stored before
  signing), a new `iat`, and `exp` = now + `COMMAND_TTL_S`, never past the command's deadline.
  Devices run a command id at most once, so re-sending is always safe.
- A send first claims the command: its `attempts` is advanced only if it is still what the
  sender read, so two senders holding the same copy (a rollout publishing the wave it just
  queued, and `resend_due` finding it queued) publish it once.
- A command that was published but not acknowledged (`received` or later) is sent again
  `RESEND_AFTER` after its last send, then after twice as long each time, up to `RESEND_MAX`:
  a device that is offline gets nothing from these sends (its session is clean, so the broker
  keeps nothing for it, and each envelope expires after `COMMAND_TTL_S` anyway), so it should cost
  a few envelopes an hour, not one every 30 s. Every unfinished command is sent again when the
  broker link reconnects and when the device says `hello` without knowing it, which is what
  reaches a device that comes back. Together with the device answering a command it already ran
  with its recorded result, this is how a result lost on the way (the broker or the controller
  restarted, the device was offline) still arrives.
- Time is the outbox's `clock` and nothing else: the deadline, the envelope's `iat` and `exp`,
  when a resend is due.
- A quarantined device (`fleet.attestation`) gets no command but `attest`: the others are
  refused when they are created.
- States only move forward: a terminal state (`TERMINAL`) is never changed, and a device can only
  report on its own commands. Every state change is a conditional UPDATE on the state the row has
  in the database, never a save of a copy read earlier, so concurrent handlers (a re-send, a
  report, a time-out) cannot move a command back. A command whose deadline passes unfinished
  becomes `timed-out`, so every command ends.
- Many commands are sent, and many reports applied, with a few statements per `sql.CHUNK`
  commands, whatever their number (`send_many`, `report_many`); `on_change` hears of each change
  once it is committed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tortoise.transactions import in_transaction

from attestation.keys import load_key_file
from fleet.db import sql
from fleet.db.models import Command, Device
from fleet.logs import log
from ota.protocol import (
    COMMAND_TTL_S,
    CONTROLLER,
    TERMINAL_STATES,
    Channel,
    CommandState,
    Message,
    MessageType,
    seal_message,
    topic,
)

QUEUED = "queued"
SENT = "sent"
TIMED_OUT = "timed-out"
TERMINAL = frozenset({*(s.value for s in TERMINAL_STATES), TIMED_OUT})
UNACKED = frozenset({QUEUED, SENT})
DEVICE_STATES = frozenset(s.value for s in CommandState)
RESEND_AFTER = timedelta(seconds=30)
RESEND_MAX = timedelta(minutes=10)
DEFAULT_DEADLINE = timedelta(hours=6)
DEADLINE_PASSED = "the deadline passed before the device finished"
_ORDER = {QUEUED: 0, SENT: 1, **{s.value: 2 + i for i, s in enumerate(CommandState)}}
_TERMINAL_LIST = sorted(TERMINAL)

Publish = Callable[[str, bytes], Awaitable[None]]


def resend_interval(attempts: int) -> timedelta:
    """How long after its last send an unacknowledged command is sent again."""
    interval: timedelta = RESEND_AFTER * 2 ** min(max(attempts - 1, 0), 10)
    return min(interval, RESEND_MAX)


@dataclass(frozen=True)
class CommandRequest:
    """A command to store: for whom, what, by whom, how long it may take, and its id if fixed."""

    device_id: str
    type: MessageType
    body: dict[str, Any]
    created_by: str
    deadline: timedelta = DEFAULT_DEADLINE
    command_id: str | None = None


@dataclass(frozen=True)
class Report:
    """What a device said about one of its commands."""

    device_id: str
    command_id: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class CommandChange:
    """A command that moved to `state` (what `on_change` hears, after the change committed)."""

    id: str
    device_id: str
    state: str
    reason: str


class OutboxError(Exception):
    """A command that cannot be created (unknown or not enrolled device)."""


class CommandKey:
    """The command key in its file, loaded again when the file is replaced (a rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: tuple[tuple[int, int], Signer] | None = None

    def __call__(self) -> Signer:
        stat = self.path.stat()
        stamp = (stat.st_ino, stat.st_mtime_ns)
        if self._loaded is None or self._loaded[0] != stamp:
            self._loaded = (stamp, load_key_file(self.path))
        return self._loaded[1]


class Outbox:
    def __init__(self, signer: Callable[[], Signer], clock: Callable[[], datetime]) -> None:
        self.signer = signer
        self.clock = clock
        self.publish: Publish | None = None
        self.on_change: Callable[[CommandChange], None] = lambda _change: None

    async def enqueue(
        self,
        device_id: str,
        type_: MessageType,
        body: dict[str, Any],
        created_by: str,
        deadline: timedelta = DEFAULT_DEADLINE,
        *,
        command_id: str | None = None,
        send: bool = True,
    ) -> Command:
        """Store a command and (with `send`) publish it; the stored command.

        With `command_id`, enqueueing is idempotent: when a command with that id exists it is
        returned as it is (not sent again), so a caller that restarts between deciding and
        recording never sends a command twice. Without `send` the command stays `queued` (the
        caller sends it once its transaction committed; `resend_due` sends it otherwise).
        """
        request = CommandRequest(device_id, type_, body, created_by, deadline, command_id)
        made, refused = await self.enqueue_many([request])
        if refused:
            raise OutboxError(refused[0][1])
        command = made[0]
        if send and command.state == QUEUED:
            await self.send(command)
        return command

    async def enqueue_many(
        self, requests: Sequence[CommandRequest]
    ) -> tuple[list[Command], list[tuple[CommandRequest, str]]]:
        """Store many commands, none sent, with a few statements whatever their number: the
        commands (an existing one for a `command_id` already used, as `enqueue`), and the
        requests refused with why (the device is not enrolled)."""
        wanted = [r.command_id for r in requests if r.command_id is not None]
        existing = {c.id: c for c in await Command.filter(id__in=wanted)} if wanted else {}
        device_ids = list({r.device_id for r in requests})
        rows = await Device.filter(id__in=device_ids, state="enrolled").values_list(
            "id", "quarantined_at", "quarantine_reason"
        )
        enrolled = {str(device_id) for device_id, _, _ in rows}
        quarantined = {str(device_id): str(why) for device_id, at, why in rows if at is not None}
        now = self.clock()
        made: list[Command] = []
        new: list[Command] = []
        refused: list[tuple[CommandRequest, str]] = []
        for request in requests:
            found = existing.get(request.command_id or "")
            if found is not None:
                made.append(found)
            elif request.device_id not in enrolled:
                refused.append((request, f"device {request.device_id} is not enrolled"))
            elif request.device_id in quarantined and request.type is not MessageType.ATTEST:
                refused.append((request, _quarantined(request.device_id, quarantined)))
            else:
                command = Command(
                    id=request.command_id or uuid.uuid4().hex,
                    device_id=request.device_id,
                    type=request.type.value,
                    body=request.body,
                    state=QUEUED,
                    created_by=request.created_by,
                    deadline=now + request.deadline,
                    reason="",
                    attempts=0,
                    last_seq=0,
                )
                made.append(command)
                new.append(command)
        if new:
            await Command.bulk_create(new)
            for command in new:
                command._saved_in_db = True  # bulk_create leaves it unset; a save() must UPDATE
        for command in new:
            log("command.queued", command=command.id, device=command.device_id, type=command.type)
        return made, refused

    async def send(self, command: Command) -> bool:
        """Sign and publish `command` now; False (and still pending) if it was not published."""
        return await self.send_many([command]) == 1

    async def send_many(self, commands: Iterable[Command]) -> int:
        """Sign and publish `commands` now, each device's in the order given; how many were
        published. Nothing is sent without a broker link; a command past its deadline times out;
        one another sender claimed since it was read is left to that sender."""
        publish = self.publish
        if publish is None:
            return 0
        now = self.clock()
        pending: list[Command] = []
        for command in commands:
            if command.state in TERMINAL:
                continue
            if command.deadline <= now:
                await self._finish(command, TIMED_OUT, DEADLINE_PASSED)
            else:
                pending.append(command)
        published = 0
        while pending:
            # One command per device in a round: each takes the device's next seq.
            chunk: list[Command] = []
            later: list[Command] = []
            devices: set[str] = set()
            for command in pending:
                fits = command.device_id not in devices and len(chunk) < sql.CHUNK
                (chunk if fits else later).append(command)
                devices.add(command.device_id)
            pending = later
            published += await self._publish(await self._claim(chunk, now), now, publish)
        return published

    async def _claim(self, commands: Sequence[Command], now: datetime) -> list[tuple[Command, int]]:
        """Claim `commands` for one send each (one device each) and give each its seq."""
        by_attempts: dict[int, list[str]] = {}
        for command in commands:
            by_attempts.setdefault(command.attempts, []).append(command.id)
        claimed: set[str] = set()
        async with in_transaction():
            for attempts, ids in by_attempts.items():
                rows = await sql.fetch(
                    "UPDATE command SET attempts = attempts + 1, sent_at = ?, updated_at = ?, "  # noqa: S608
                    "state = CASE WHEN state = ? THEN ? ELSE state END "
                    f"WHERE id IN ({sql.marks(len(ids))}) AND attempts = ? "
                    f"AND state NOT IN ({sql.marks(len(_TERMINAL_LIST))}) RETURNING id",
                    [now, _wall_clock(), QUEUED, SENT, *ids, attempts, *_TERMINAL_LIST],
                )
                claimed.update(str(row["id"]) for row in rows)
            mine = [command for command in commands if command.id in claimed]
            if not mine:
                return []
            rows = await sql.fetch(
                "UPDATE device SET command_seq = command_seq + 1 "  # noqa: S608
                f"WHERE id IN ({sql.marks(len(mine))}) RETURNING id, command_seq",
                [command.device_id for command in mine],
            )
            seqs = {str(row["id"]): int(row["command_seq"]) for row in rows}
            await sql.execute_many(
                "UPDATE command SET last_seq = ? WHERE id = ?",
                [(seqs[c.device_id], c.id) for c in mine if c.device_id in seqs],
            )
        out = []
        for command in mine:
            command.attempts += 1
            command.sent_at = now
            if command.state == QUEUED:
                command.state = SENT
            seq = seqs.get(command.device_id)
            if seq is None:
                log("command.publish_failed", command=command.id, error="the device was removed")
                continue
            command.last_seq = seq
            out.append((command, seq))
        return out

    async def _publish(
        self, claimed: Sequence[tuple[Command, int]], now: datetime, publish: Publish
    ) -> int:
        signer = self.signer()
        envelopes = []
        for command, seq in claimed:
            expires = min(now + timedelta(seconds=COMMAND_TTL_S), command.deadline)
            message = Message(
                CONTROLLER,
                command.device_id,
                seq,
                now.timestamp(),
                expires.timestamp(),
                MessageType(command.type),
                {**command.body, "command_id": command.id},
            )
            envelopes.append((command, seal_message(message, signer)))
        results = await asyncio.gather(
            *(publish(topic(c.device_id, Channel.CMD), data) for c, data in envelopes),
            return_exceptions=True,
        )
        published = 0
        for (command, _), result in zip(envelopes, results, strict=True):
            if isinstance(result, BaseException):  # the broker link reports it; sent again later
                log("command.publish_failed", command=command.id, error=str(result))
            else:
                published += 1
        return published

    async def resend_due(self) -> int:
        """Re-send what was not acknowledged in time and time out what passed its deadline."""
        now = self.clock()
        unacked = await Command.filter(state=SENT, sent_at__lt=now - RESEND_AFTER)
        due = [
            command
            for command in unacked
            if command.sent_at is None or command.sent_at <= now - resend_interval(command.attempts)
        ]
        count = await self.send_many(due)
        count += await self.send_many(await Command.filter(state=QUEUED).order_by("created_at"))
        for command in await Command.filter(state__not_in=_TERMINAL_LIST, deadline__lte=now):
            await self._finish(command, TIMED_OUT, DEADLINE_PASSED)
        return count

    async def resend_all(self, device_id: str | None = None) -> int:
        """Send every unfinished command again (after a reconnect, or for one device's hello)."""
        query = Command.filter(state__not_in=_TERMINAL_LIST)
        if device_id is not None:
            query = query.filter(device_id=device_id)
        return await self.send_many(await query.order_by("created_at"))

    async def report(self, device_id: str, command_id: str, state: str, reason: str) -> bool:
        """A device's report on one of its commands; False if it was ignored."""
        return bool(await self.report_many([Report(device_id, command_id, state, reason)]))

    async def report_many(self, reports: Sequence[Report]) -> list[CommandChange]:
        """Devices' reports, in the order they arrived; the changes they made.

        A command moves to the furthest state its reports name (the first terminal one ends it),
        with one statement per new state and reason, whatever the number of commands.
        """
        wanted = [r for r in reports if r.state in DEVICE_STATES]
        ids = list(dict.fromkeys(r.command_id for r in wanted))
        stored: dict[str, tuple[str, str]] = {}
        for chunk in sql.chunks(ids):
            for cid, device_id, state in await Command.filter(id__in=list(chunk)).values_list(
                "id", "device_id", "state"
            ):
                stored[str(cid)] = (str(device_id), str(state))
        outcome: dict[str, tuple[str, str]] = {}
        for report in wanted:
            known = stored.get(report.command_id)
            if known is None or known[0] != report.device_id:
                continue
            state = outcome.get(report.command_id, (known[1], ""))[0]
            if state in TERMINAL:
                continue
            if report.state in TERMINAL:
                outcome[report.command_id] = (report.state, report.reason[:2000])
            elif _ORDER[report.state] > _ORDER.get(state, 0):
                outcome[report.command_id] = (report.state, "")
        groups: dict[tuple[str, str], list[str]] = {}
        for cid, change in outcome.items():
            groups.setdefault(change, []).append(cid)
        devices = {cid: stored[cid][0] for cid in outcome}
        changes: list[CommandChange] = []
        if not groups:
            return changes
        async with in_transaction():
            for (state, reason), group in groups.items():
                if state in TERMINAL:
                    changes += await self._end(group, devices, state, reason)
                else:
                    changes += await self._advance(group, devices, state)
        self._changed(changes)
        return changes

    async def reconcile(self, device_id: str, hello: dict[str, Any]) -> int:
        """Bring this device's commands in line with its `hello`; returns how many were re-sent.

        Only the device's unfinished commands are looked at (one query, however many results the
        hello lists): a result ends its command, the command in flight advances, and every
        unfinished command the device does not mention is sent again.
        """
        pending = Command.filter(device_id=device_id, state__not_in=_TERMINAL_LIST)
        unfinished = await pending.order_by("created_at")
        if not unfinished:
            return 0
        ids = {command.id for command in unfinished}
        reports: list[Report] = []
        for result in hello.get("results") or []:
            if isinstance(result, dict) and result.get("id") in ids:
                state, reason = str(result.get("state")), str(result.get("reason", ""))
                reports.append(Report(device_id, result["id"], state, reason))
        flight = hello.get("in_flight")
        if isinstance(flight, dict) and flight.get("id") in ids:
            reports.append(Report(device_id, flight["id"], str(flight.get("state"))))
        await self.report_many(reports)
        known = {report.command_id for report in reports}
        return await self.send_many(c for c in unfinished if c.id not in known)

    async def _finish(self, command: Command, state: str, reason: str) -> bool:
        """End `command` in `state`, unless it has ended already; whether this ended it."""
        async with in_transaction():
            changes = await self._end([command.id], {command.id: command.device_id}, state, reason)
        if not changes:
            return False
        command.state = state
        command.reason = reason[:2000]
        command.finished_at = self.clock()
        self._changed(changes)
        return True

    async def _end(
        self, ids: Sequence[str], devices: dict[str, str], state: str, reason: str
    ) -> list[CommandChange]:
        """End the unfinished ones of `ids` in `state` (in the caller's transaction)."""
        changes = []
        for chunk in sql.chunks(ids):
            rows = await sql.fetch(
                "UPDATE command SET state = ?, reason = ?, finished_at = ?, updated_at = ? "  # noqa: S608
                f"WHERE id IN ({sql.marks(len(chunk))}) "
                f"AND state NOT IN ({sql.marks(len(_TERMINAL_LIST))}) RETURNING id",
                [state, reason[:2000], self.clock(), _wall_clock(), *chunk, *_TERMINAL_LIST],
            )
            for row in rows:
                cid = str(row["id"])
                changes.append(CommandChange(cid, devices[cid], state, reason[:2000]))
        return changes

    async def _advance(
        self, ids: Sequence[str], devices: dict[str, str], state: str
    ) -> list[CommandChange]:
        """Move those of `ids` that are in an earlier state to `state` (not a terminal one)."""
        earlier = [known for known, order in _ORDER.items() if order < _ORDER[state]]
        changes = []
        for chunk in sql.chunks(ids):
            rows = await sql.fetch(
                f"UPDATE command SET state = ?, updated_at = ? WHERE id IN "  # noqa: S608
                f"({sql.marks(len(chunk))}) AND state IN ({sql.marks(len(earlier))}) RETURNING id",
                [state, _wall_clock(), *chunk, *earlier],
            )
            changes += [CommandChange(str(r["id"]), devices[str(r["id"])], state, "") for r in rows]
        return changes

    def _changed(self, changes: Sequence[CommandChange]) -> None:
        for change in changes:
            if change.state in TERMINAL:
                log(
                    "command.finished",
                    command=change.id,
                    device=change.device_id,
                    state=change.state,
                    reason=change.reason[:200],
                )
            self.on_change(change)


def _quarantined(device_id: str, reasons: dict[str, str]) -> str:
    return (
        f"device {device_id} is quarantined ({reasons[device_id][:300]}): it gets no command but "
        f"`attest` until it attests clean or an admin runs `fleetctl devices release {device_id}`"
    )


def _wall_clock() -> datetime:
    """When a row is written (`updated_at`, as Tortoise's `auto_now`), whatever `clock` says."""
    return datetime.now(UTC)
