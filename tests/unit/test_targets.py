"""ota.targets: rune target names, references, version order and the `custom["fleet"]` contract."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ota.targets import (
    COMMAND_KEY_TARGET,
    KINDS,
    RUNES_PREFIX,
    RuneTarget,
    TargetNameError,
    check_part,
    parse_rune_ref,
    parse_target_path,
    rune_target_path,
    version_key,
)

GOOD_PARTS = ["a", "0", "sine", "acme-corp", "my_rune", "1.0.0", "1.0.0-rc1", "v2", "a" * 64, "9x"]
BAD_PARTS = [
    "",
    "Sine",
    "SINE",
    "sinE",
    "..",
    ".",
    "a..b",
    "1..0",
    "a/b",
    "/a",
    "a/",
    "a\\b",
    "a" * 65,
    ".hidden",
    "-flag",
    "_private",
    "a b",
    "a@b",
    "a:b",
    "a%2fb",
    "é",
    "\n",
]


@pytest.mark.parametrize("part", GOOD_PARTS)
def test_check_part_accepts_good_names(part: str) -> None:
    assert check_part("name", part) == part


@pytest.mark.parametrize("part", BAD_PARTS)
def test_check_part_refuses_bad_names(part: str) -> None:
    with pytest.raises(TargetNameError, match=r"^name "):
        check_part("name", part)


def test_target_name_error_is_a_value_error() -> None:
    assert issubclass(TargetNameError, ValueError)


@pytest.mark.parametrize("part", ["sine\n", "1.0.0\n"])
def test_check_part_refuses_a_trailing_newline(part: str) -> None:
    with pytest.raises(TargetNameError):
        check_part("name", part)


def test_rune_target_path() -> None:
    assert rune_target_path("acme", "sine", "1.0.0") == "runes/acme/sine/1.0.0"
    assert RUNES_PREFIX == "runes"
    assert not COMMAND_KEY_TARGET.startswith(RUNES_PREFIX + "/")


@pytest.mark.parametrize("part", BAD_PARTS)
@pytest.mark.parametrize("what", ["org", "name", "version"])
def test_rune_target_path_refuses_bad_parts(what: str, part: str) -> None:
    parts = {"org": "acme", "name": "sine", "version": "1.0.0", what: part}
    with pytest.raises(TargetNameError, match=rf"^{what} "):
        rune_target_path(parts["org"], parts["name"], parts["version"])


def test_parse_rune_ref() -> None:
    assert parse_rune_ref("sine@1.0.0") == ("sine", "1.0.0")
    assert parse_rune_ref("my_rune@2") == ("my_rune", "2")


@pytest.mark.parametrize(
    "ref", ["sine", "sine@", "@1.0.0", "@", "", "Sine@1.0", "sine@1@2", "sine@../1", "a/b@1"]
)
def test_parse_rune_ref_refuses(ref: str) -> None:
    with pytest.raises(TargetNameError):
        parse_rune_ref(ref)


def test_parse_target_path_inverts_rune_target_path() -> None:
    assert parse_target_path("runes/acme/sine/1.0.0") == ("acme", "sine", "1.0.0")
    assert parse_target_path(rune_target_path("o", "n", "1.10.2-rc1")) == ("o", "n", "1.10.2-rc1")


@pytest.mark.parametrize(
    "path",
    [
        "runes/acme/sine",
        "runes/acme/sine/1.0.0/extra",
        "/runes/acme/sine/1.0.0",
        "other/acme/sine/1.0.0",
        "Runes/acme/sine/1.0.0",
        "runes/acme/../1.0.0",
        "runes//sine/1.0.0",
        "runes/acme/sine/",
        "runes/Acme/sine/1.0.0",
        COMMAND_KEY_TARGET,
        "",
    ],
)
def test_parse_target_path_refuses(path: str) -> None:
    with pytest.raises(TargetNameError):
        parse_target_path(path)


def test_version_key_orders_numerically() -> None:
    assert version_key("1.10") > version_key("1.9")
    assert version_key("1.10.0") > version_key("1.9.99")
    assert version_key("2") > version_key("1.99.99")
    assert version_key("1.0.1") > version_key("1.0")
    assert version_key("1.0.0") > version_key("1.0")
    versions = ["1.9", "1.10", "0.1", "10.0", "1.9.1", "2.0.0"]
    assert sorted(versions, key=version_key) == ["0.1", "1.9", "1.9.1", "1.10", "2.0.0", "10.0"]


def test_version_key_takes_the_numeric_prefix() -> None:
    assert version_key("1.0.0-rc1") == (1, 0, 0)
    assert version_key("1.10.2-rc1") == (1, 10, 2)
    assert version_key("1.0.0-rc1") == version_key("1.0.0")  # suffixes do not order
    assert version_key("007") == (7,)
    assert version_key("1.") == (1,)


@pytest.mark.parametrize("version", ["", "v1.0", "latest", ".1", "-1"])
def test_version_key_without_a_numeric_prefix_sorts_first(version: str) -> None:
    assert version_key(version) == ()
    assert version_key(version) < version_key("0")


def _target(**changes: Any) -> RuneTarget:
    fields: dict[str, Any] = {
        "org": "acme",
        "name": "sine",
        "version": "1.0.0",
        "kind": "bundle",
        "capabilities": ("accel", "rand"),
        "min_agent_version": "0.1.0",
    }
    fields.update(changes)
    return RuneTarget(**fields)


@pytest.mark.parametrize("kind", KINDS)
def test_rune_target_round_trips_through_custom(kind: str) -> None:
    target = _target(kind=kind)
    assert target.path == "runes/acme/sine/1.0.0"
    assert target.ref == "sine@1.0.0"
    custom = target.to_custom()
    assert custom == {
        "fleet": {
            "org": "acme",
            "name": "sine",
            "version": "1.0.0",
            "kind": kind,
            "capabilities": ["accel", "rand"],
            "min_agent_version": "0.1.0",
        }
    }
    # As the agent receives it: through JSON in TUF metadata.
    received = json.loads(json.dumps(custom))
    assert RuneTarget.from_custom(target.path, received) == target


def test_no_capabilities_round_trips() -> None:
    target = _target(capabilities=())
    assert RuneTarget.from_custom(target.path, target.to_custom()) == target


def test_from_custom_ignores_other_custom_keys() -> None:
    target = _target()
    custom = {**target.to_custom(), "provenance": "sha256:abc"}
    custom["fleet"]["future_field"] = 1
    assert RuneTarget.from_custom(target.path, custom) == target


@pytest.mark.parametrize("custom", [None, [], "fleet", {}, {"fleet": None}, {"fleet": []}])
def test_from_custom_refuses_a_target_without_fleet_metadata(custom: Any) -> None:
    with pytest.raises(TargetNameError, match="no fleet metadata"):
        RuneTarget.from_custom("runes/acme/sine/1.0.0", custom)


@pytest.mark.parametrize(
    "field", ["org", "name", "version", "kind", "capabilities", "min_agent_version"]
)
def test_from_custom_refuses_missing_fields(field: str) -> None:
    custom = _target().to_custom()
    del custom["fleet"][field]
    with pytest.raises(TargetNameError, match=f"incomplete.*{field}"):
        RuneTarget.from_custom("runes/acme/sine/1.0.0", custom)


def test_from_custom_refuses_capabilities_that_are_not_a_list() -> None:
    custom = _target().to_custom()
    custom["fleet"]["capabilities"] = None
    with pytest.raises(TargetNameError, match="malformed.*capabilities"):
        RuneTarget.from_custom("runes/acme/sine/1.0.0", custom)


def test_from_custom_refuses_capabilities_given_as_a_string() -> None:
    custom = _target().to_custom()
    custom["fleet"]["capabilities"] = "accel"
    with pytest.raises(TargetNameError):
        RuneTarget.from_custom("runes/acme/sine/1.0.0", custom)


@pytest.mark.parametrize(
    ("field", "value"),
    [("org", "other"), ("name", "cosine"), ("version", "1.0.1"), ("version", "1.0")],
)
def test_from_custom_refuses_metadata_for_another_path(field: str, value: str) -> None:
    custom = _target().to_custom()
    custom["fleet"][field] = value
    with pytest.raises(TargetNameError, match="carries metadata for"):
        RuneTarget.from_custom("runes/acme/sine/1.0.0", custom)


def test_from_custom_refuses_metadata_naming_an_invalid_target() -> None:
    custom = _target().to_custom()
    custom["fleet"]["name"] = "../sine"
    with pytest.raises(TargetNameError):
        RuneTarget.from_custom("runes/acme/../sine/1.0.0", custom)


@pytest.mark.parametrize("kind", ["wasm", "", "Bundle", "legacy "])
def test_from_custom_refuses_an_unknown_kind(kind: str) -> None:
    custom = _target().to_custom()
    custom["fleet"]["kind"] = kind
    with pytest.raises(TargetNameError, match="unknown kind"):
        RuneTarget.from_custom("runes/acme/sine/1.0.0", custom)
