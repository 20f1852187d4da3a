"""The command outbox: every command is stored before it is published, and followed to its end.

Rules:
- A command is a `Command` row first (state `queued`); only then is it signed and published. A
  publish that fails leaves it queued for the next attempt; nothing is sent that is not stored.
- Each (re)send is a fresh envelope: the device's next `command_seq` (allocated and stored in one
  `UPDATE ... RETURNING` before signing), a new `iat`, and `exp` = now + `COMMAND_TTL_S`, never
  past the command's deadline. Devices run a command id at most once, so re-sending is always safe.
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
- States only move forward: a terminal state (`TERMINAL`) is never changed, and a device can only
  report on its own commands. Every state change is a conditional UPDATE on the state the row has
  in the database, never a save of a copy read earlier, so concurrent handlers (a re-send, a
  report, a time-out) cannot move a command back. A command whose deadline passes unfinished
  becomes `timed-out`, so every command ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tortoise import connections
from tortoise.expressions import Case, F, When

from attestation.keys import load_key_file
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
_ORDER = {QUEUED: 0, SENT: 1, **{s.value: 2 + i for i, s in enumerate(CommandState)}}

Publish = Callable[[str, bytes], Awaitable[None]]
_NEXT_SEQ = "UPDATE device SET command_seq = command_seq + 1 WHERE id = ? RETURNING command_seq"
_NEXT_SEQ_PG = _NEXT_SEQ.replace("?", "$1")


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
        self.on_change: Callable[[Command], None] = lambda _command: None

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
        enrolled = {
            str(device_id)
            for device_id in await Device.filter(id__in=device_ids, state="enrolled").values_list(
                "id", flat=True
            )
        }
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
        """Sign and publish `command` now; False (and still pending) if there is no broker link."""
        if self.publish is None or command.state in TERMINAL:
            return False
        now = self.clock()
        if command.deadline <= now:
            await self._finish(command, TIMED_OUT, "the deadline passed before the device finished")
            return False
        seq = await self._next_seq(command.device_id)
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
        data = seal_message(message, self.signer())
        # Field by field, and the state only from queued: a report may have moved this command on
        # since `command` was read, and a stale copy must never move it back.
        await Command.filter(id=command.id).update(
            attempts=F("attempts") + 1,
            last_seq=seq,
            sent_at=now,
            updated_at=_wall_clock(),
            state=Case(When(state=QUEUED, then=SENT), default=F("state")),
        )
        command.attempts += 1
        command.last_seq = seq
        command.sent_at = now
        if command.state == QUEUED:
            command.state = SENT
        try:
            await self.publish(topic(command.device_id, Channel.CMD), data)
        except Exception as exc:  # the broker link reports it; the command stays pending
            log("command.publish_failed", command=command.id, error=str(exc))
            return False
        return True

    async def resend_due(self) -> int:
        """Re-send what was not acknowledged in time and time out what passed its deadline."""
        now = self.clock()
        count = 0
        for command in await Command.filter(
            state__in=sorted(UNACKED - {QUEUED}), sent_at__lt=now - RESEND_AFTER
        ):
            due = now - resend_interval(command.attempts)
            if command.sent_at is None or command.sent_at <= due:
                count += await self.send(command)
        for command in await Command.filter(state=QUEUED):
            count += await self.send(command)
        for command in await Command.filter(state__not_in=sorted(TERMINAL), deadline__lte=now):
            await self._finish(command, TIMED_OUT, "the deadline passed before the device finished")
        return count

    async def resend_all(self, device_id: str | None = None) -> int:
        """Send every unfinished command again (after a reconnect, or for one device's hello)."""
        query = Command.filter(state__not_in=sorted(TERMINAL))
        if device_id is not None:
            query = query.filter(device_id=device_id)
        count = 0
        for command in await query.order_by("created_at"):
            count += await self.send(command)
        return count

    async def report(self, device_id: str, command_id: str, state: str, reason: str) -> bool:
        """A device's report on one of its commands; False if it was ignored."""
        if state not in DEVICE_STATES:
            return False
        command = await Command.get_or_none(id=command_id, device_id=device_id)
        if command is None or command.state in TERMINAL:
            return False
        if state not in TERMINAL and _ORDER[state] <= _ORDER.get(command.state, 0):
            return False
        if state in TERMINAL:
            return await self._finish(command, state, reason)
        earlier = [known for known, order in _ORDER.items() if order < _ORDER[state]]
        moved = await Command.filter(id=command.id, state__in=earlier).update(
            state=state, updated_at=_wall_clock()
        )
        if not moved:
            return False
        command.state = state
        self.on_change(command)
        return True

    async def reconcile(self, device_id: str, hello: dict[str, Any]) -> int:
        """Bring this device's commands in line with its `hello`; returns how many were re-sent.

        Only the device's unfinished commands are looked at (one query, however many results the
        hello lists): a result ends its command, the command in flight advances, and every
        unfinished command the device does not mention is sent again.
        """
        pending = Command.filter(device_id=device_id, state__not_in=sorted(TERMINAL))
        unfinished = await pending.order_by("created_at")
        if not unfinished:
            return 0
        ids = {command.id for command in unfinished}
        known: set[str] = set()
        for result in hello.get("results") or []:
            if isinstance(result, dict) and result.get("id") in ids:
                known.add(result["id"])
                await self.report(
                    device_id, result["id"], str(result.get("state")), str(result.get("reason", ""))
                )
        flight = hello.get("in_flight")
        if isinstance(flight, dict) and flight.get("id") in ids:
            known.add(flight["id"])
            await self.report(device_id, flight["id"], str(flight.get("state")), "")
        count = 0
        for command in unfinished:
            if command.id not in known:
                count += await self.send(command)
        return count

    async def _finish(self, command: Command, state: str, reason: str) -> bool:
        """End `command` in `state`, unless it has ended already; whether this ended it."""
        finished_at = self.clock()
        ended = await Command.filter(id=command.id, state__not_in=sorted(TERMINAL)).update(
            state=state, reason=reason[:2000], finished_at=finished_at, updated_at=_wall_clock()
        )
        if not ended:
            return False
        command.state = state
        command.reason = reason[:2000]
        command.finished_at = finished_at
        log(
            "command.finished",
            command=command.id,
            device=command.device_id,
            state=state,
            reason=reason[:200],
        )
        self.on_change(command)
        return True

    async def _next_seq(self, device_id: str) -> int:
        # One statement: the increment and the read cannot interleave with another send's.
        connection = connections.get("default")
        query = _NEXT_SEQ_PG if connection.capabilities.dialect == "postgres" else _NEXT_SEQ
        rows = await connection.execute_query_dict(query, [device_id])
        if not rows:
            raise OutboxError(f"device {device_id} was removed")
        return int(rows[0]["command_seq"])


def _wall_clock() -> datetime:
    """When a row is written (`updated_at`, as Tortoise's `auto_now`), whatever `clock` says."""
    return datetime.now(UTC)
