"""The audit log's hash chain (`fleet.audit`): every kind of tampering is named, and an intact
chain has no break.

- Edited contents (any field, the details text, the hash itself), a deleted record (first,
  middle), re-ordered records, a truncated tail the writer knows about: each is a break naming
  the record.
- A chain rebuilt with another key (what someone with the database but not the key can do) does
  not check under the fleet's key.
- Details are stored as canonical text with long strings cut, so what is hashed is what is kept.
"""

from __future__ import annotations

import dataclasses
import secrets
from datetime import UTC, datetime, timedelta

from fleet.audit import GENESIS, MAX_TEXT, Entry, Record, check_chain, link

KEY = secrets.token_bytes(32)
START = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)


def chain(count: int, key: bytes = KEY) -> list[Record]:
    records, prev = [], GENESIS
    for n in range(1, count + 1):
        entry = Entry(
            START + timedelta(seconds=n, microseconds=n),
            "ops (operator)",
            "POST /api/v1/rollouts/{id}/pause",
            f"/api/v1/rollouts/r{n}/pause",
            "ok",
            {"status": 200, "peer": "127.0.0.1"},
        )
        record = link(key, prev, n, entry)
        records.append(record)
        prev = record.hash
    return records


def test_an_intact_chain_has_no_break() -> None:
    check = check_chain(KEY, chain(5), expected_head=5)
    assert check.intact
    assert (check.records, check.head_seq) == (5, 5)
    assert check_chain(KEY, []).intact


def test_every_edited_field_is_named() -> None:
    for name, value in [
        ("actor", "someone (admin)"),
        ("action", "DELETE /api/v1/devices/{id}"),
        ("target", "/elsewhere"),
        ("outcome", "refused"),
        ("details", '{"peer":"10.0.0.1","status":200}'),
        ("at", START - timedelta(days=1)),
    ]:
        records = chain(4)
        records[2] = dataclasses.replace(records[2], **{name: value})
        check = check_chain(KEY, records)
        assert [str(b) for b in check.breaks] == [
            "record 3: edited: its hash does not match its contents"
        ], name


def test_an_edited_hash_breaks_its_record_and_the_next_link() -> None:
    records = chain(4)
    records[1] = dataclasses.replace(records[1], hash="f" * 64)
    problems = [(b.seq, b.problem.split(":")[0]) for b in check_chain(KEY, records).breaks]
    assert problems == [(2, "edited"), (3, "reordered or replaced")]


def test_deleted_records_are_named() -> None:
    records = chain(6)
    middle = check_chain(KEY, records[:2] + records[4:])
    assert [str(b) for b in middle.breaks] == ["record 3: deleted (records 3 to 4 are missing)"]
    first = check_chain(KEY, records[1:])
    assert [str(b) for b in first.breaks] == ["record 1: deleted (record 1 is missing)"]


def test_a_swapped_record_is_named() -> None:
    records = chain(4)
    # Swap the contents of 2 and 3, keeping their numbers: both links break.
    two, three = records[1], records[2]
    records[1] = dataclasses.replace(three, seq=2)
    records[2] = dataclasses.replace(two, seq=3)
    check = check_chain(KEY, records)
    assert not check.intact
    assert {b.seq for b in check.breaks} >= {2, 3}


def test_a_truncated_tail_is_named_when_the_writer_knows_its_head() -> None:
    records = chain(5)
    assert check_chain(KEY, records[:3]).intact  # on its own, a shorter chain is a chain
    check = check_chain(KEY, records[:3], expected_head=5)
    assert [str(b) for b in check.breaks] == [
        "record 4: truncated: the log ends at record 3, but record 5 was written"
    ]


def test_a_chain_rebuilt_without_the_key_does_not_check() -> None:
    forged = chain(3, key=secrets.token_bytes(32))
    check = check_chain(KEY, forged)
    assert [b.seq for b in check.breaks] == [1, 2, 3]


def test_details_are_stored_as_the_canonical_text_that_was_hashed() -> None:
    details = {"z": 1, "a": "x" * 1000, "n": None}
    entry = Entry(START, "a", "b", "c" * (MAX_TEXT + 50), "ok", details)
    record = link(KEY, GENESIS, 1, entry)
    assert record.details == '{"a":"' + "x" * MAX_TEXT + '","n":null,"z":1}'
    assert len(record.target) == MAX_TEXT
    assert check_chain(KEY, [record]).intact
    assert record.to_json()["details"]["z"] == 1
    assert record.to_json()["at"] == "2026-12-07T03:00:00.000000Z"
