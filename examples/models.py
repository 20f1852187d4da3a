"""Make the example models (and sample sensor data) from code, so no binary lives in git.

- `sine.tflite`: the Rune project's classic sine model: f32[1, 1] degrees -> f32[1, 1] sine. A
  two-layer ReLU network (16 hinges every 22.5 degrees) whose output weights are fitted by least
  squares; written as a TFLite flatbuffer with the `tflite` schema package (no TensorFlow).
- `gesture.onnx`: f32[1, 128, 3] normalized accelerometer window -> f32[1, 4] scores for wave,
  tilt, lift and rest: a linear layer over each axis's variance, built with `onnx.helper`.
- `gesture.csv`: 512 rows of X, Y, Z: four synthetic gestures, 128 rows each.
Deterministic: the same bytes on every machine. Run `python -m examples.models` to write them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GESTURES = ["wave", "tilt", "lift", "rest"]


def sine_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    knots = np.arange(16, dtype=np.float64) * 22.5
    w1 = np.ones((16, 1), dtype=np.float32)
    b1 = (-knots).astype(np.float32)
    grid = np.linspace(0.0, 360.0, 721)
    hidden = np.maximum(grid[:, None] - knots[None, :], 0.0)
    design = np.hstack([hidden, np.ones((len(grid), 1))])
    solution, *_ = np.linalg.lstsq(design, np.sin(np.radians(grid)), rcond=None)
    w2 = solution[:16].reshape(1, 16).astype(np.float32)
    b2 = solution[16:].astype(np.float32)
    return w1, b1, w2, b2


def sine_tflite() -> bytes:
    import flatbuffers
    import tflite

    w1, b1, w2, b2 = sine_weights()
    builder = flatbuffers.Builder(4096)

    def vector(start: object, items: list[int], *, uoffset: bool = True) -> int:
        start(builder, len(items))  # type: ignore[operator]
        for item in reversed(items):
            if uoffset:
                builder.PrependUOffsetTRelative(item)
            else:
                builder.PrependInt32(item)
        return int(builder.EndVector())

    def buffer(data: bytes | None) -> int:
        raw = builder.CreateByteVector(data) if data else None
        tflite.BufferStart(builder)
        if raw is not None:
            tflite.BufferAddData(builder, raw)
        return int(tflite.BufferEnd(builder))

    buffers = [
        buffer(None),
        buffer(w1.tobytes()),
        buffer(b1.tobytes()),
        buffer(w2.tobytes()),
        buffer(b2.tobytes()),
    ]

    def tensor(name: str, shape: list[int], buffer_index: int) -> int:
        label = builder.CreateString(name)
        dims = vector(tflite.TensorStartShapeVector, shape, uoffset=False)
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, dims)
        tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(builder, buffer_index)
        tflite.TensorAddName(builder, label)
        return int(tflite.TensorEnd(builder))

    tensors = [
        tensor("degrees", [1, 1], 0),
        tensor("w1", [16, 1], 1),
        tensor("b1", [16], 2),
        tensor("hidden", [1, 16], 0),
        tensor("w2", [1, 16], 3),
        tensor("b2", [1], 4),
        tensor("sine", [1, 1], 0),
    ]

    def fully_connected(inputs: list[int], output: int, activation: int) -> int:
        tflite.FullyConnectedOptionsStart(builder)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(builder, activation)
        options = tflite.FullyConnectedOptionsEnd(builder)
        ins = vector(tflite.OperatorStartInputsVector, inputs, uoffset=False)
        outs = vector(tflite.OperatorStartOutputsVector, [output], uoffset=False)
        tflite.OperatorStart(builder)
        tflite.OperatorAddOpcodeIndex(builder, 0)
        tflite.OperatorAddInputs(builder, ins)
        tflite.OperatorAddOutputs(builder, outs)
        tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
        tflite.OperatorAddBuiltinOptions(builder, options)
        return int(tflite.OperatorEnd(builder))

    operators = [
        fully_connected([0, 1, 2], 3, tflite.ActivationFunctionType.RELU),
        fully_connected([3, 4, 5], 6, tflite.ActivationFunctionType.NONE),
    ]
    tensor_vec = vector(tflite.SubGraphStartTensorsVector, tensors)
    op_vec = vector(tflite.SubGraphStartOperatorsVector, operators)
    in_vec = vector(tflite.SubGraphStartInputsVector, [0], uoffset=False)
    out_vec = vector(tflite.SubGraphStartOutputsVector, [6], uoffset=False)
    graph_name = builder.CreateString("sine")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensor_vec)
    tflite.SubGraphAddInputs(builder, in_vec)
    tflite.SubGraphAddOutputs(builder, out_vec)
    tflite.SubGraphAddOperators(builder, op_vec)
    tflite.SubGraphAddName(builder, graph_name)
    subgraph = tflite.SubGraphEnd(builder)

    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(builder, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode = tflite.OperatorCodeEnd(builder)

    codes = vector(tflite.ModelStartOperatorCodesVector, [opcode])
    graphs = vector(tflite.ModelStartSubgraphsVector, [subgraph])
    buffer_vec = vector(tflite.ModelStartBuffersVector, buffers)
    description = builder.CreateString("Fleet example: sine of degrees")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, codes)
    tflite.ModelAddSubgraphs(builder, graphs)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffer_vec)
    builder.Finish(tflite.ModelEnd(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def gesture_weights() -> tuple[np.ndarray, np.ndarray]:
    # Scores from each axis's variance (x, y, z): wave is x-heavy, tilt y-heavy, lift z-heavy,
    # rest is what wins when no axis moves much.
    weights = np.array(
        [[4.0, -1.0, -1.0, 0.0], [-1.0, 4.0, -1.0, 0.0], [-1.0, -1.0, 4.0, 0.0]], dtype=np.float32
    )
    bias = np.array([0.0, 0.0, 0.0, 0.9], dtype=np.float32)
    return weights, bias


def gesture_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weights, bias = gesture_weights()
    nodes = [
        helper.make_node("ReduceMean", ["accel"], ["axis_mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["accel", "axis_mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["axis_variance"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["axis_variance", "gain"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "weights"], ["raw_scores"]),
        helper.make_node("Add", ["raw_scores", "bias"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gesture",
        [helper.make_tensor_value_info("accel", TensorProto.FLOAT, [1, 128, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4])],
        initializer=[
            numpy_helper.from_array(np.array([8.0], dtype=np.float32), "gain"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="fleet-examples"
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())


def gesture_csv(rows_per_gesture: int = 128) -> str:
    rng = np.random.default_rng(7)
    t = np.linspace(0, 4 * np.pi, rows_per_gesture)
    blocks = []
    for axis in (0, 1, 2, None):
        data = rng.normal(0.0, 0.05, size=(rows_per_gesture, 3))
        data[:, 2] += 9.81
        if axis is not None:
            data[:, axis] += 6.0 * np.sin(t)
        blocks.append(data)
    lines = ["x,y,z"] + [f"{x:.4f},{y:.4f},{z:.4f}" for x, y, z in np.vstack(blocks)]
    return "\n".join(lines) + "\n"


def write_all(folder: Path = HERE) -> list[Path]:
    written = []
    for path, content in (
        (folder / "sine" / "sine.tflite", sine_tflite()),
        (folder / "gesture" / "gesture.onnx", gesture_onnx()),
        (folder / "gesture" / "gesture.csv", gesture_csv().encode()),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(written_path)
