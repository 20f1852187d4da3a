"""A bundle altered after it was built is refused whole: nothing of it is loaded or run."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from agent.sandbox.errors import ModuleRejected
from agent.sandbox.runner import load_rune
from ota.rune.build import build_bundle
from ota.rune.bundle import BundleError, read_bundle


@pytest.fixture(scope="module")
def bundle_bytes(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "gesture" / "Runefile.yml").data


def rewrite(
    data: bytes,
    change: dict[str, bytes | None],
    add: dict[str, bytes] | None = None,
) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if info.filename in change:
                replacement = change[info.filename]
                if replacement is not None:
                    target.writestr(info.filename, replacement)
            else:
                target.writestr(info.filename, source.read(info.filename))
        for name, content in (add or {}).items():
            target.writestr(name, content)
    return out.getvalue()


def test_a_tampered_block_is_refused_before_anything_runs(bundle_bytes: bytes) -> None:
    original = zipfile.ZipFile(io.BytesIO(bundle_bytes)).read("blocks/normalize.wasm")
    evil = original[:-1] + bytes([original[-1] ^ 0xFF])
    tampered = rewrite(bundle_bytes, {"blocks/normalize.wasm": evil})
    with pytest.raises(BundleError, match="blocks/normalize.wasm does not match its SHA-256"):
        read_bundle(tampered)
    with pytest.raises(ModuleRejected, match="does not match its SHA-256"):
        load_rune(tampered)


def test_swapped_model_missing_part_and_smuggled_file_are_refused(bundle_bytes: bytes) -> None:
    with pytest.raises(BundleError, match="models/model.onnx does not match"):
        read_bundle(rewrite(bundle_bytes, {"models/model.onnx": b"\x08\x07other model"}))
    with pytest.raises(BundleError, match="lists resources/LABELS, which is missing"):
        read_bundle(rewrite(bundle_bytes, {"resources/LABELS": None}))
    with pytest.raises(BundleError, match="does not list: blocks/extra.wasm"):
        read_bundle(rewrite(bundle_bytes, {}, add={"blocks/extra.wasm": b"\0asm"}))


def test_oversized_truncated_and_foreign_files_are_refused(bundle_bytes: bytes) -> None:
    with pytest.raises(BundleError, match="over the 1000-byte limit"):
        read_bundle(bundle_bytes, max_bytes=1000)
    with pytest.raises(BundleError, match="not a readable zip archive"):
        read_bundle(bundle_bytes[: len(bundle_bytes) // 2])
    with pytest.raises(ModuleRejected, match="neither a rune bundle nor a legacy"):
        load_rune(b"#!/bin/sh\nrm -rf /\n")


def test_a_manifest_edited_to_point_elsewhere_is_refused(bundle_bytes: bytes) -> None:
    manifest = zipfile.ZipFile(io.BytesIO(bundle_bytes)).read("manifest.json")
    edited = manifest.replace(b'"format": "fleet-rune-bundle/1"', b'"format": "other/9"')
    with pytest.raises(BundleError, match="unsupported bundle format 'other/9'"):
        read_bundle(rewrite(bundle_bytes, {"manifest.json": edited}))
