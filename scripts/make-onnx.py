"""Builds the small ONNX graphs of kernels/tests/onnx.rs with onnx.helper (no torch), runs each
through ONNX Runtime on fixed inputs, and writes the graphs, the inputs and ONNX Runtime's
outputs for the parity tests (see scripts/make-onnx).

Output directory (argv[1]):

  NAME.onnx                   the graph; weights drawn from numpy's PCG64 with a fixed seed
  NAME.in.INPUT.bin           an input, little-endian, C order (dtype and shape in the manifest)
  NAME.out.OUTPUT.bin         ONNX Runtime's (CPUExecutionProvider) output on those inputs
  manifest.json               what each file is (read by the tests and by the benchmark)

Graphs:

  mlp          x [batch, 16] -> Gemm(transB) -> Relu -> MatMul + Add -> Tanh -> Gemm -> y [batch, 4]
  conv         image [batch, 3, 32, 32] -> Conv 3x3 -> BatchNormalization -> Relu -> MaxPool 2
               -> Conv 3x3 -> Relu -> AveragePool 16 (global) -> Flatten -> Gemm -> logits,
               Softmax -> probs [batch, 10]: a small image classifier
  refused      GlobalAveragePool and LpNormalization, which ONNX Runtime runs and candle-onnx
               does not: Quiver serves it on ONNX Runtime, and refuses it at load on
               candle-onnx, naming both
  custom_op    an op of a domain no runtime knows (com.example Frobnicate): refused at load
               on both engines
"""

import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 9 (onnx 1.15 and later): ONNX Runtime 1.31 reads it, and it is what exporters write.
IR_VERSION = 9
BATCH = "batch"


def weights(rng, name, shape, fan_in):
    bound = 1.0 / np.sqrt(fan_in)
    return numpy_helper.from_array(
        rng.uniform(-bound, bound, size=shape).astype(np.float32), name
    )


def model(graph):
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="quiver scripts/make-onnx.py",
    )
    m.ir_version = IR_VERSION
    return m


def mlp(rng):
    widths = [16, 32, 32, 4]
    init = [
        # Gemm with transB = 1: weights [out, in], as torch.nn.Linear exports them.
        weights(rng, "w0", (widths[1], widths[0]), widths[0]),
        weights(rng, "b0", (widths[1],), widths[0]),
        # MatMul + Add: weights [in, out].
        weights(rng, "w1", (widths[1], widths[2]), widths[1]),
        weights(rng, "b1", (widths[2],), widths[1]),
        # Gemm with transB = 0 and alpha, beta not 1.
        weights(rng, "w2", (widths[2], widths[3]), widths[2]),
        weights(rng, "b2", (widths[3],), widths[2]),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h0"], transB=1),
        helper.make_node("Relu", ["h0"], ["a0"]),
        helper.make_node("MatMul", ["a0", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["y"], alpha=0.5, beta=2.0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, widths[-1]])],
        init,
    )
    inputs = {"x": rng.normal(size=(64, widths[0])).astype(np.float32)}
    return model(graph), inputs


def conv(rng):
    c0, c1, c2, classes, side = 3, 8, 16, 10, 32
    init = [
        weights(rng, "conv0.w", (c1, c0, 3, 3), c0 * 9),
        weights(rng, "conv0.b", (c1,), c0 * 9),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c1).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, c1).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.normal(0, 0.1, c1).astype(np.float32), "bn.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c1).astype(np.float32), "bn.var"),
        weights(rng, "conv1.w", (c2, c1, 3, 3), c1 * 9),
        weights(rng, "conv1.b", (c2,), c1 * 9),
        weights(rng, "fc.w", (classes, c2), c2),
        weights(rng, "fc.b", (classes,), c2),
    ]
    half = side // 2
    nodes = [
        helper.make_node("Conv", ["image", "conv0.w", "conv0.b"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n0"], epsilon=1e-5),
        helper.make_node("Relu", ["n0"], ["r0"]),
        helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p0", "conv1.w", "conv1.b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        # A global average pool as AveragePool over the whole map (candle-onnx has no
        # GlobalAveragePool; see the refused graph).
        helper.make_node("AveragePool", ["r1"], ["p1"], kernel_shape=[half, half]),
        helper.make_node("Flatten", ["p1"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH, c0, side, side])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [BATCH, classes]),
        ],
        init,
    )
    inputs = {"image": rng.normal(size=(8, c0, side, side)).astype(np.float32)}
    return model(graph), inputs


def refused():
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("LpNormalization", ["flat"], ["y"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "refused",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 3])],
    )
    return model(graph)


def custom_op():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Frobnicate", ["r"], ["y"], domain="com.example"),
    ]
    graph = helper.make_graph(
        nodes,
        "custom_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 4])],
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.example", 1)],
        producer_name="quiver scripts/make-onnx.py",
    )
    m.ir_version = IR_VERSION
    return m


DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def write_case(out, name, m, inputs):
    onnx.checker.check_model(m, full_check=True)
    path = out / f"{name}.onnx"
    onnx.save(m, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, inputs)
    entry = {"model": path.name, "inputs": [], "outputs": []}
    for key, value in inputs.items():
        f = f"{name}.in.{key}.bin"
        value.astype(value.dtype.newbyteorder("<")).tofile(out / f)
        entry["inputs"].append({"name": key, "datatype": DTYPES[value.dtype], "shape": list(value.shape), "file": f})
    for key, value in zip(names, results):
        f = f"{name}.out.{key}.bin"
        value.astype(value.dtype.newbyteorder("<")).tofile(out / f)
        entry["outputs"].append({"name": key, "datatype": DTYPES[value.dtype], "shape": list(value.shape), "file": f})
    return entry


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20)
    manifest = {
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "graphs": {},
        "refused": {},
    }
    for name, build in [("mlp", mlp), ("conv", conv)]:
        m, inputs = build(rng)
        manifest["graphs"][name] = write_case(out, name, m, inputs)
    r = refused()
    onnx.checker.check_model(r, full_check=True)
    onnx.save(r, out / "refused.onnx")
    manifest["refused"]["refused"] = {"model": "refused.onnx", "ops": ["GlobalAveragePool", "LpNormalization"]}
    # The checker rejects an op of an unknown domain, which is the point: saved unchecked.
    onnx.save(custom_op(), out / "custom_op.onnx")
    manifest["refused"]["custom_op"] = {"model": "custom_op.onnx", "ops": ["com.example:Frobnicate"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
