"""The agent's persisted channel state across restarts: sequences, results, the command in flight,
and what a new daemon makes of a command a restart interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.channel_state import FILE, SEQ_BLOCK, ChannelState, ChannelStateError
from agent.daemon import Daemon, SessionConfig


def test_sequences_and_results_survive_a_restart(tmp_path: Path) -> None:
    state = ChannelState(tmp_path)
    assert [state.next_seq("status") for _ in range(3)] == [1, 2, 3]
    state.accept_command_seq(7)
    state.begin("c1", "deploy", "received", 1.0)
    state.finish("c1", "deploy", "succeeded", "installed in slot a", 2.0)
    again = ChannelState(tmp_path)
    # Above every seq the first process could have used (it reserved a block), never a repeat.
    assert again.next_seq("status") == SEQ_BLOCK + 1 and again.next_seq("presence") == 1
    assert again.command_seq == 7
    with pytest.raises(ValueError):
        again.accept_command_seq(7)
    assert again.in_flight is None
    result = again.result_of("c1")
    assert result is not None and (result.state, result.reason) == (
        "succeeded",
        "installed in slot a",
    )


def test_sequence_numbers_are_reserved_in_blocks_and_never_reused(tmp_path: Path) -> None:
    state = ChannelState(tmp_path)

    def stored() -> int:
        return int(json.loads((tmp_path / FILE).read_text())["sent"]["status"])

    assert state.next_seq("status") == 1 and stored() == SEQ_BLOCK
    used = [state.next_seq("status") for _ in range(SEQ_BLOCK)]
    assert used == list(range(2, SEQ_BLOCK + 2)) and stored() == 2 * SEQ_BLOCK
    # A crash now skips the rest of the block: the next process starts above it.
    assert ChannelState(tmp_path).next_seq("status") == 2 * SEQ_BLOCK + 1


def test_abandon_forgets_only_that_command_in_flight_and_persists_it(tmp_path: Path) -> None:
    state = ChannelState(tmp_path)
    state.begin("c1", "deploy", "downloading", 1.0)
    state.abandon("other")
    assert ChannelState(tmp_path).in_flight is not None
    state.abandon("c1")
    assert state.in_flight is None and ChannelState(tmp_path).in_flight is None
    assert state.result_of("c1") is None  # not a result: it runs again when it is sent again


def test_a_damaged_file_is_an_error_not_a_reset(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text(json.dumps({"format": "fleet-channel/1", "sent": {}}))
    with pytest.raises(ChannelStateError, match="damaged"):
        ChannelState(tmp_path)


def test_a_new_daemon_does_not_claim_the_command_a_restart_interrupted(tmp_path: Path) -> None:
    before = ChannelState(tmp_path)
    before.accept_command_seq(3)
    before.begin("c1", "deploy", "installing", 1.0)
    config = SessionConfig(tmp_path, "http://127.0.0.1:9", "mqtt://127.0.0.1:9")
    daemon = Daemon(config)
    assert daemon.channel.in_flight is None
    assert ChannelState(tmp_path).in_flight is None
    hello = daemon._hello()
    assert hello["in_flight"] is None and hello["results"] == []
    assert hello["command_seq"] == 3  # a replay of an old envelope is still refused
