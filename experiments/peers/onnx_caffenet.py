"""CaffeNet through ONNX Runtime and through OpenCV's dnn module, peers for
``experiments/bench_dense.py``.

ONNX: the graph is written with ``onnx.helper`` from a fcn-jax params tree (Caffe shapes),
node for node what Caffe runs: ``Conv`` (``group``), ``Relu``, ``MaxPool`` with
``ceil_mode=1``, ``LRN`` (ONNX's LRN divides ``alpha`` by ``size`` like Caffe's
ACROSS_CHANNELS), ``Flatten`` + ``Gemm(transB=1)`` for the classifier's fc layers (Caffe's
``(O, K)`` weight, (C, H, W) flattening) or ``Conv`` for the fully convolutional ones, and
``Softmax`` over the channel axis. The same graph ``torch.onnx.export`` gives for the PyTorch
twin, without depending on an exporter. Run by ``onnxruntime.InferenceSession`` (CPU, every
graph optimisation, the default thread count), with an optional per-node profile.

OpenCV: ``cv2.dnn.readNetFromCaffe`` of the same prototxt and the weights written as a
``.caffemodel`` (OpenCV's own Caffe importer).

onnx/onnxruntime are the ``bench`` extra, OpenCV the ``opencv`` extra; never imported by the
package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: (kernel, stride, pad, group) of conv1..conv5, as in fcn_jax.caffenet.CONV_SPECS.
CONV_SPECS = ((11, 4, 0, 1), (5, 1, 2, 2), (3, 1, 1, 1), (3, 1, 1, 2), (3, 1, 1, 2))


def caffenet_onnx(params: Mapping[str, Mapping[str, np.ndarray]], fully_conv: bool,
                  opset: int = 17) -> bytes:
    """The serialized ONNX model of CaffeNet with ``params``; input ``data`` (N, 3, H, W),
    output ``prob``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def w(layer, blob, arr=None):
        name = f"{layer}/{blob}"
        a = np.asarray(params[layer][blob] if arr is None else arr, np.float32)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    h = "data"
    for i, (k, s, pad, g) in enumerate(CONV_SPECS):
        n = f"conv{i + 1}"
        nodes.append(helper.make_node("Conv", [h, w(n, "weight"), w(n, "bias")], [n],
                                      kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4,
                                      group=g, name=n))
        nodes.append(helper.make_node("Relu", [n], [f"relu{i + 1}"], name=f"relu{i + 1}"))
        h = f"relu{i + 1}"
        if i in (0, 1, 4):
            nodes.append(helper.make_node("MaxPool", [h], [f"pool{i + 1}"], kernel_shape=[3, 3],
                                          strides=[2, 2], ceil_mode=1, name=f"pool{i + 1}"))
            h = f"pool{i + 1}"
        if i in (0, 1):
            nodes.append(helper.make_node("LRN", [h], [f"norm{i + 1}"], size=5, alpha=1e-4,
                                          beta=0.75, bias=1.0, name=f"norm{i + 1}"))
            h = f"norm{i + 1}"
    if fully_conv:
        for j, n in enumerate(("fc6-conv", "fc7-conv", "fc8-conv")):
            wt = params[n]["weight"]
            nodes.append(helper.make_node("Conv", [h, w(n, "weight"), w(n, "bias")], [n],
                                          kernel_shape=list(wt.shape[2:]), name=n))
            h = n
            if j < 2:
                nodes.append(helper.make_node("Relu", [h], [f"{n}/relu"], name=f"{n}/relu"))
                h = f"{n}/relu"
    else:
        nodes.append(helper.make_node("Flatten", [h], ["flat"], axis=1, name="flatten"))
        h = "flat"
        for j, n in enumerate(("fc6", "fc7", "fc8")):
            nodes.append(helper.make_node("Gemm", [h, w(n, "weight"), w(n, "bias")], [n],
                                          transB=1, name=n))
            h = n
            if j < 2:
                nodes.append(helper.make_node("Relu", [h], [f"{n}/relu"], name=f"{n}/relu"))
                h = f"{n}/relu"
    nodes.append(helper.make_node("Softmax", [h], ["prob"], axis=1, name="prob"))
    graph = helper.make_graph(
        nodes, "caffenet_fcn" if fully_conv else "caffenet",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT,
                                       ["N", 1000, "Ho", "Wo"] if fully_conv else ["N", 1000])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model, full_check=False)
    return model.SerializeToString()


class OrtCaffeNet:
    """CaffeNet in an ONNX Runtime CPU session; ``profile_dir``: write its per-node
    profile there (``node_times`` reads it); ``spin=False``: worker threads sleep instead of
    spinning between ops (ONNX Runtime's default spins, which a shared machine punishes)."""

    def __init__(self, params: Mapping[str, Mapping[str, np.ndarray]], fully_conv: bool,
                 profile_dir: str | Path | None = None, threads: int = 0, spin: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(profile_dir) / "ort")
        self.session = ort.InferenceSession(caffenet_onnx(params, fully_conv), opts,
                                            providers=["CPUExecutionProvider"])
        self.version = ort.__version__

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["prob"], {"data": np.ascontiguousarray(x, np.float32)})[0]

    def end_profiling(self) -> str:
        return self.session.end_profiling()


def node_times(profile_json: str | Path, skip: int = 1) -> dict[str, float]:
    """Median milliseconds per node over the runs of an ONNX Runtime profile (the first
    ``skip`` runs left out: warm-up)."""
    events = json.loads(Path(profile_json).read_text())
    per: dict[str, list[list[float]]] = {}
    run = -1
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            run += 1
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            per.setdefault(node, [])
            while len(per[node]) <= max(run, 0):
                per[node].append([])
            per[node][max(run, 0)].append(e["dur"] / 1e3)
    return {n: float(np.median([sum(r) for r in runs[skip:] if r] or [0.0]))
            for n, runs in per.items()}


class OpenCVCaffeNet:
    """CaffeNet through ``cv2.dnn.readNetFromCaffe`` (CPU, OpenCV's own backend): ``prototxt``
    and the weights written to ``workdir`` as a caffemodel by ``converters``."""

    def __init__(self, prototxt: str | Path, params: Mapping[str, Mapping[str, np.ndarray]],
                 workdir: str | Path):
        import cv2

        import converters

        model = Path(workdir) / (Path(prototxt).stem + ".caffemodel")
        converters.save_caffemodel(model, params, prototxt)
        self.net = cv2.dnn.readNetFromCaffe(str(prototxt), str(model))
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.version = cv2.__version__

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.net.setInput(np.ascontiguousarray(x, np.float32))
        return np.asarray(self.net.forward("prob"))
