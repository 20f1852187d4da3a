"""Models run on the host: TFLite through ai-edge-litert, ONNX through onnxruntime.

Rules:
- The runtimes are optional extras; a rune that needs a missing one gets a `ModelError` naming the
  extra to install (`fleet-tinyml[tflite]` or `fleet-tinyml[onnx]`), never an ImportError.
- A model larger than the sandbox's model limit is refused before any runtime parses it.
- Inputs are checked against the model's own signature (element type and element count) and
  reshaped to it; a runtime's failure becomes a `ModelError` naming the model.
- ONNX sessions run single-threaded: a device shares its cores with the agent and the sensors.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import numpy as np

from agent.sandbox.errors import LimitExceeded, ModelError, SandboxError
from agent.sandbox.limits import SandboxLimits
from ota.rune.build import ModelSignature
from ota.rune.bundle import MIMETYPE_ONNX, MIMETYPE_TFLITE
from ota.rune.tensors import ElementType, TensorError, TensorType

ONNX_TYPES = {
    "tensor(uint8)": ElementType.U8,
    "tensor(int8)": ElementType.I8,
    "tensor(uint16)": ElementType.U16,
    "tensor(int16)": ElementType.I16,
    "tensor(uint32)": ElementType.U32,
    "tensor(int32)": ElementType.I32,
    "tensor(float)": ElementType.F32,
    "tensor(uint64)": ElementType.U64,
    "tensor(int64)": ElementType.I64,
    "tensor(double)": ElementType.F64,
}
EXTRAS = {MIMETYPE_TFLITE: ("ai_edge_litert", "tflite"), MIMETYPE_ONNX: ("onnxruntime", "onnx")}


class Model(Protocol):
    inputs: list[TensorType]
    outputs: list[TensorType]

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]: ...


def runtime_available(mimetype: str) -> bool:
    module, _ = EXTRAS[mimetype]
    return importlib.util.find_spec(module) is not None


def load_model(mimetype: str, data: bytes, limits: SandboxLimits, what: str = "model") -> Model:
    if mimetype not in EXTRAS:
        raise ModelError(
            f"{what} has unsupported type {mimetype!r}; use {MIMETYPE_TFLITE} or {MIMETYPE_ONNX}"
        )
    if len(data) > limits.model_bytes:
        raise LimitExceeded(
            f"{what} is {len(data)} bytes, over the {limits.model_bytes}-byte model limit"
        )
    module, extra = EXTRAS[mimetype]
    if not runtime_available(mimetype):
        raise ModelError(
            f"{what} is a {mimetype} and its runtime ({module}) is not installed: "
            f"pip install 'fleet-tinyml[{extra}]'"
        )
    try:
        if mimetype == MIMETYPE_TFLITE:
            return _TFLiteModel(data)
        return _OnnxModel(data)
    except (TensorError, ModelError):
        raise
    except Exception as exc:
        raise ModelError(f"{what} could not be loaded by {module}: {_first_line(exc)}") from None


def inspect_model(mimetype: str, data: bytes) -> ModelSignature | None:
    """The model's tensor signature, or None when its runtime is not installed here.

    Raises ValueError with the runtime's reason when the model cannot be read (the build's
    `ModelInspector` contract).
    """
    if mimetype not in EXTRAS or not runtime_available(mimetype):
        return None
    try:
        model = load_model(mimetype, data, SandboxLimits(model_bytes=len(data) + 1))
    except SandboxError as exc:
        raise ValueError(str(exc)) from None
    return ModelSignature(list(model.inputs), list(model.outputs))


def run_model(model: Model, inputs: list[np.ndarray], what: str) -> list[np.ndarray]:
    if len(inputs) != len(model.inputs):
        raise ModelError(f"{what} takes {len(model.inputs)} input(s), got {len(inputs)}")
    shaped = []
    for i, (array, wanted) in enumerate(zip(inputs, model.inputs, strict=True)):
        if array.dtype != wanted.element.dtype or array.size != wanted.count:
            raise ModelError(
                f"{what} input {i} must be {wanted}, got "
                f"{ElementType.from_dtype(array.dtype).type_name}{list(array.shape)}"
            )
        shaped.append(array.reshape(wanted.dimensions))
    try:
        return model.infer(shaped)
    except Exception as exc:
        raise ModelError(f"{what} failed during inference: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dims(shape: Any) -> tuple[int, ...]:
    dims = tuple(int(d) if isinstance(d, int | np.integer) and d > 0 else 1 for d in shape)
    return dims or (1,)


class _TFLiteModel:
    def __init__(self, data: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_content=data, num_threads=1)
        self._interpreter.allocate_tensors()
        self._in = self._interpreter.get_input_details()
        self._out = self._interpreter.get_output_details()
        self.inputs = [self._type(d) for d in self._in]
        self.outputs = [self._type(d) for d in self._out]

    @staticmethod
    def _type(detail: dict[str, Any]) -> TensorType:
        return TensorType(ElementType.from_dtype(np.dtype(detail["dtype"])), _dims(detail["shape"]))

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        for detail, array in zip(self._in, tensors, strict=True):
            self._interpreter.set_tensor(detail["index"], array)
        self._interpreter.invoke()
        return [np.array(self._interpreter.get_tensor(d["index"])) for d in self._out]


class _OnnxModel:
    def __init__(self, data: bytes) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            data, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._in = self._session.get_inputs()
        self._out = self._session.get_outputs()
        self.inputs = [self._type(i) for i in self._in]
        self.outputs = [self._type(o) for o in self._out]

    @staticmethod
    def _type(arg: Any) -> TensorType:
        element = ONNX_TYPES.get(arg.type)
        if element is None:
            raise ModelError(f"ONNX tensor {arg.name} has unsupported type {arg.type}")
        return TensorType(element, _dims(arg.shape))

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        feeds = {arg.name: array for arg, array in zip(self._in, tensors, strict=True)}
        results = self._session.run(None, feeds)
        return [np.asarray(r) for r in results]
