"""Runs a bundle: capabilities and models on the host, each processing block in its own sandbox.

Rules:
- Everything is prepared at load: capability args parsed, each block instantiated and
  configured, each model loaded. A bundle whose capabilities the policy does not allow is refused
  before any of its code is instantiated.
- Stages run in the manifest's order (the build's topological order, checked again when the bundle
  was read); each stage gets exactly the tensors its inputs name.
- Host-made tensors are checked too: a model output that does not fit the stage's declared type is
  a `ModelError`, never passed on.
- Out stages yield records in the Rune serial format; `serial` and `tensor` outs are numbered
  from 1 in manifest order (their channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.sandbox.block import BlockInstance
from agent.sandbox.errors import CapabilityDenied, ModelError, ModuleRejected
from agent.sandbox.inputs import InputSources
from agent.sandbox.limits import SandboxLimits
from agent.sandbox.models import Model, load_model, run_model
from agent.sandbox.outputs import OutputRecord, tensor_json
from ota.rune.blocks.abi import block_args
from ota.rune.bundle import Bundle, BundleStage
from ota.rune.capabilities import CapabilityArgError, CapabilitySpec, parse_capability
from ota.rune.runefile import CapabilityKind, StageKind
from ota.rune.tensors import Tensor, TensorError


@dataclass
class _Prepared:
    entry: BundleStage
    spec: CapabilitySpec | None = None
    block: BlockInstance | None = None
    model: Model | None = None
    channel: int = 0


class BundleRune:
    def __init__(
        self,
        bundle: Bundle,
        *,
        limits: SandboxLimits | None = None,
        sources: InputSources | None = None,
        allowed: frozenset[CapabilityKind] | None = None,
    ) -> None:
        self.bundle = bundle
        self.limits = limits or SandboxLimits()
        self.sources = sources or InputSources()
        manifest = bundle.manifest
        self.name = f"{manifest.name}@{manifest.version}"
        if allowed is not None:
            denied = [k.name for k in manifest.capabilities if k not in allowed]
            if denied:
                raise CapabilityDenied(
                    f"{self.name} needs {', '.join(denied)}, which this "
                    "device's policy does not allow"
                )

        def resource_text(name: str) -> str:
            return bundle.resource(name).decode("utf-8", errors="replace")

        self._stages: list[_Prepared] = []
        channel = 0
        for entry in manifest.stages:
            stage, what = entry.stage, f"stage {entry.stage.name}"
            prepared = _Prepared(entry)
            if stage.kind is StageKind.CAPABILITY:
                try:
                    prepared.spec = parse_capability(stage.capability, stage.args)
                except CapabilityArgError as exc:
                    raise ModuleRejected(f"{self.name} {what}: {exc}") from None
            elif stage.kind is StageKind.PROC_BLOCK:
                assert entry.part is not None
                prepared.block = BlockInstance(
                    bundle.part(entry.part),
                    what,
                    block_args(stage.args, resource_text),
                    stage.outputs,
                    self.limits,
                )
            elif stage.kind is StageKind.MODEL:
                assert entry.part is not None and entry.mimetype is not None
                prepared.model = load_model(
                    entry.mimetype, bundle.part(entry.part), self.limits, f"{self.name} {what}"
                )
            else:
                channel += 1
                prepared.channel = channel
            self._stages.append(prepared)

    def call(self) -> list[OutputRecord]:
        values: dict[str, list[Tensor]] = {}
        records: list[OutputRecord] = []
        for prepared in self._stages:
            stage = prepared.entry.stage
            inputs = [values[ref.stage][ref.index] for ref in stage.inputs]
            if prepared.spec is not None:
                declared = stage.outputs[0]
                raw = self.sources.provide(
                    stage.name, prepared.spec, declared.element, declared.byte_size
                )
                values[stage.name] = [Tensor.from_bytes(declared, raw)]
            elif prepared.block is not None:
                values[stage.name] = prepared.block.transform(inputs)
            elif prepared.model is not None:
                values[stage.name] = self._infer(prepared, inputs)
            else:
                items = [tensor_json(t, prepared.channel) for t in inputs]
                records.append(
                    OutputRecord(prepared.channel, items[0] if len(items) == 1 else items)
                )
        return records

    def _infer(self, prepared: _Prepared, inputs: list[Tensor]) -> list[Tensor]:
        stage = prepared.entry.stage
        what = f"{self.name} stage {stage.name}"
        assert prepared.model is not None
        arrays = []
        for tensor in inputs:
            if isinstance(tensor.data, tuple):
                raise ModelError(f"{what}: a model cannot take utf8 input")
            arrays.append(tensor.data)
        results = run_model(prepared.model, arrays, what)
        tensors = []
        for i, (declared, result) in enumerate(zip(stage.outputs, results, strict=True)):
            if result.dtype != declared.element.dtype or result.size != declared.count:
                raise ModelError(f"{what}: model output {i} does not fit the declared {declared}")
            try:
                tensors.append(
                    Tensor(
                        declared.element,
                        declared.dimensions,
                        np.ascontiguousarray(result).reshape(declared.dimensions),
                    )
                )
            except TensorError as exc:
                raise ModelError(f"{what}: model output {i}: {exc}") from None
        return tensors
