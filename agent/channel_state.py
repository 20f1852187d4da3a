"""The agent's side of the command channel that must survive restarts: sequences and results.

Kept in `state_dir/channel.json`, rewritten whole and durably (`agent.durable`) on every change
that must survive a crash.

Rules:
- Sequence numbers are reserved in blocks of `SEQ_BLOCK`: the file holds the highest number
  reserved (`sent`), written before any number of the block is used, and a new process continues
  above it. So no two messages of one stream ever share a `seq`, whatever crashes in between;
  a crash skips the rest of a block, which receivers do not mind (they want each `seq` above the
  last, not the next one), and a device writes the file once per `SEQ_BLOCK` messages instead of
  once per message.
- The last accepted command `seq` is persisted before the command is acted on: a command replayed
  after a restart is still refused.
- A command id is executed at most once: its result is kept (the last `RESULTS_KEPT`), and a
  command that arrives again is answered with that result instead of being run again. A command
  that was in flight when the agent stopped is dropped from `in_flight` by the next process
  (`abandon`), so `hello` does not claim it is running: the controller sends it again and it
  runs again; every handler is idempotent (a deploy of the active rune does nothing). Which
  phase it had reached (`progress`) is kept in memory only, since a restart abandons it
  whatever the phase.
- A file that is not this format is an error naming the file; it is never silently reset, since
  that would reopen the replay window.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.durable import write_atomically

FILE = "channel.json"
FORMAT = "fleet-channel/1"
RESULTS_KEPT = 64
SEQ_BLOCK = 64
STREAMS = ("status", "presence", "telemetry")
_ADDED_STREAMS = frozenset({"telemetry"})  # absent from the files of older agents


class ChannelStateError(Exception):
    """`channel.json` exists but cannot be used; names the file and the fix."""


@dataclass(frozen=True)
class CommandRecord:
    id: str
    type: str
    state: str
    reason: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "state": self.state,
            "reason": self.reason,
            "at": self.at,
        }


class ChannelState:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE
        self._lock = threading.Lock()
        self._sent = dict.fromkeys(STREAMS, 0)  # the last seq used, per stream
        self._reserved = dict.fromkeys(STREAMS, 0)  # the highest seq reserved (what is stored)
        self._command_seq = 0
        self._results: list[CommandRecord] = []
        self._in_flight: CommandRecord | None = None
        self._refused: dict[str, int] = {}
        self._load()

    # -- sequences ---------------------------------------------------------------------------

    def next_seq(self, stream: str) -> int:
        with self._lock:
            self._sent[stream] += 1
            if self._sent[stream] > self._reserved[stream]:
                self._reserved[stream] = self._sent[stream] + SEQ_BLOCK - 1
                self._save()
            return self._sent[stream]

    @property
    def command_seq(self) -> int:
        return self._command_seq

    def accept_command_seq(self, seq: int) -> None:
        with self._lock:
            if seq <= self._command_seq:
                raise ValueError(f"command seq {seq} is not above {self._command_seq}")
            self._command_seq = seq
            self._save()

    # -- commands ----------------------------------------------------------------------------

    def result_of(self, command_id: str) -> CommandRecord | None:
        return next((r for r in self._results if r.id == command_id), None)

    @property
    def in_flight(self) -> CommandRecord | None:
        return self._in_flight

    def begin(self, command_id: str, type_: str, state: str, now: float) -> None:
        with self._lock:
            self._in_flight = CommandRecord(command_id, type_, state, "", now)
            self._save()

    def progress(self, state: str, now: float) -> None:
        with self._lock:
            if self._in_flight is not None:
                flight = self._in_flight
                self._in_flight = CommandRecord(flight.id, flight.type, state, "", now)

    def finish(self, command_id: str, type_: str, state: str, reason: str, now: float) -> None:
        with self._lock:
            record = CommandRecord(command_id, type_, state, reason, now)
            self._results = [r for r in self._results if r.id != command_id]
            self._results.append(record)
            self._results = self._results[-RESULTS_KEPT:]
            if self._in_flight is not None and self._in_flight.id == command_id:
                self._in_flight = None
            self._save()

    def abandon(self, command_id: str) -> None:
        """Forget that `command_id` is in flight (it is not running: a restart interrupted it)."""
        with self._lock:
            if self._in_flight is not None and self._in_flight.id == command_id:
                self._in_flight = None
                self._save()

    def recent_results(self) -> list[CommandRecord]:
        return list(self._results)

    # -- refusals ----------------------------------------------------------------------------

    def count_refusal(self, kind: str) -> None:
        with self._lock:
            self._refused[kind] = self._refused.get(kind, 0) + 1
            self._save()

    @property
    def refused(self) -> dict[str, int]:
        return dict(self._refused)

    # -- file --------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ChannelStateError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            document = json.loads(raw)
            if document.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            for stream in STREAMS:
                sent = document["sent"]
                stored = sent.get(stream, 0) if stream in _ADDED_STREAMS else sent[stream]
                self._sent[stream] = self._reserved[stream] = _count(stored)
            self._command_seq = _count(document["command_seq"])
            self._results = [_record(r) for r in document["results"]][-RESULTS_KEPT:]
            flight = document.get("in_flight")
            self._in_flight = None if flight is None else _record(flight)
            self._refused = {str(k): _count(v) for k, v in document.get("refused", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ChannelStateError(
                f"{self.path} is damaged ({exc}); the agent will not reset it on its own, since "
                "that would accept replayed commands. Re-enroll the device to start over."
            ) from None

    def _save(self) -> None:
        document = {
            "format": FORMAT,
            "sent": self._reserved,
            "command_seq": self._command_seq,
            "results": [r.to_json() for r in self._results],
            "in_flight": None if self._in_flight is None else self._in_flight.to_json(),
            "refused": self._refused,
        }
        write_atomically(self.path, json.dumps(document, sort_keys=True).encode())


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _record(value: Any) -> CommandRecord:
    if not isinstance(value, dict):
        raise ValueError("a command record is not an object")
    at = value["at"]
    if not isinstance(at, int | float):
        raise ValueError("a command record has no time")
    return CommandRecord(
        str(value["id"]), str(value["type"]), str(value["state"]), str(value["reason"]), float(at)
    )
