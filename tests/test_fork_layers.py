"""The layer types of Caffe forks (fcn_jax.fork_layers) against independent numpy references
written from the forks' .cpp (experiments/fork_reference.py), through the whole stack:
prototxt text -> converters.load_caffe -> jit(module.apply)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import converters
from fcn_jax import fork_layers

_SPEC = importlib.util.spec_from_file_location(
    "fcn_jax_experiments_fork_reference",
    Path(__file__).parents[1] / "experiments" / "fork_reference.py")
ref = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = ref
_SPEC.loader.exec_module(ref)


def _inputs(shapes: dict[str, tuple]) -> str:
    return "".join(
        f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in s) + " } } }\n" for n, s in shapes.items())


def run(body: str, inputs: dict[str, np.ndarray], params=None, jit: bool = True):
    """The net ``body`` (with Input layers for ``inputs``) run on ``inputs``: {blob: array}."""
    net = converters.parse_prototxt(_inputs({k: v.shape for k, v in inputs.items()}) + body)
    module, p = converters.load_caffe(net, params if params is not None else {})
    fn = jax.jit(module.apply) if jit else module.apply
    return {k: np.asarray(v) for k, v in fn({"params": p}, inputs).items()}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- SSD


@pytest.mark.parametrize("across,shared", [(False, False), (True, True), (True, False),
                                           (False, True)])
def test_normalize(across, shared):
    x = rand(2, 5, 4, 3)
    scale = (RNG.random(1 if shared else 5) + 0.5).astype(np.float32)
    body = (f'layer {{ name: "n" type: "Normalize" bottom: "x" top: "y" norm_param {{ '
            f'across_spatial: {str(across).lower()} channel_shared: {str(shared).lower()} '
            f'eps: 1e-6 }} }}')
    out = run(body, {"x": x}, {"n": {"blob0": scale.reshape(() if shared else (5,))}})
    assert rel(out["y"], ref.normalize(x, scale, across, shared, 1e-6)) < 1e-6


def test_normalize_fills_its_scale_from_the_prototxt():
    net = converters.parse_prototxt(
        _inputs({"x": (1, 3, 2, 2)}) + 'layer { name: "n" type: "Normalize" bottom: "x" '
        'top: "y" norm_param { channel_shared: false scale_filler { type: "constant" '
        'value: 20 } } }')
    _, params = converters.load_caffe(net)
    np.testing.assert_array_equal(params["n"]["scale"], np.full(3, 20, np.float32))


@pytest.mark.parametrize("order", [(0, 2, 3, 1), (0, 3, 1, 2), (1, 0), (0, 1, 2, 3), (2,)])
def test_permute(order):
    x = rand(2, 3, 4, 5)
    body = ('layer { name: "p" type: "Permute" bottom: "x" top: "y" permute_param { '
            + " ".join(f"order: {o}" for o in order) + " } }")
    # after a convolution the bottom lives in NHWC: the fast (0, 2, 3, 1) path is taken
    conv = ('layer { name: "c" type: "Convolution" bottom: "x" top: "x1" convolution_param '
            '{ num_output: 3 kernel_size: 1 bias_term: false } }\n')
    w = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    out = run(conv + body.replace('bottom: "x"', 'bottom: "x1"'), {"x": x}, {"c": {"weight": w}})
    np.testing.assert_array_equal(out["y"], ref.permute(x, list(order)))


PRIOR_CASES = [
    "min_size: 30 max_size: 60 aspect_ratio: 2 flip: true variance: 0.1 variance: 0.1 "
    "variance: 0.2 variance: 0.2 step: 8 offset: 0.5",
    "min_size: 20.5 min_size: 41 aspect_ratio: 2 aspect_ratio: 3 aspect_ratio: 2 flip: false "
    "clip: true variance: 0.1",
    "min_size: 16 max_size: 40 aspect_ratio: 3 img_h: 90 img_w: 120 step_h: 7.5 step_w: 11 "
    "offset: 0.25",
    "min_size: 50 img_size: 100",
]


@pytest.mark.parametrize("params", PRIOR_CASES)
def test_prior_box(params):
    feat, img = rand(1, 2, 5, 7), rand(1, 3, 37, 53)
    body = ('layer { name: "pb" type: "PriorBox" bottom: "f" bottom: "img" top: "p" '
            f"prior_box_param {{ {params} }} }}")
    out = run(body, {"f": feat, "img": img})["p"]
    lp = converters.parse_prototxt(body).layer[0]
    want = ref.prior_box(lp.prior_box_param, (5, 7), (37, 53))
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_flatten_as_ssd_uses_it():
    x = rand(2, 4, 3, 6)  # (N, H, W, C*k) after Permute
    out = run('layer { name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param '
              '{ axis: 1 } }', {"x": x})["y"]
    np.testing.assert_array_equal(out, x.reshape(2, -1))


def _ssd_inputs(num, priors, ncls, share, rng):
    """Random predictions over clustered priors (many overlaps, so NMS has work to do)."""
    centers = rng.random((4, 2)) * 0.6 + 0.2
    c = centers[rng.integers(0, 4, priors)] + rng.normal(0, 0.03, (priors, 2))
    wh = rng.random((priors, 2)) * 0.2 + 0.1
    boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
    var = np.tile(np.float32([0.1, 0.1, 0.2, 0.2]), (priors, 1))
    prior = np.stack([boxes.reshape(-1), var.reshape(-1)])[None].astype(np.float32)
    loc_classes = 1 if share else ncls
    loc = rng.normal(0, 0.5, (num, priors * loc_classes * 4)).astype(np.float32)
    logits = rng.normal(0, 2, (num, priors, ncls))
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return loc, conf.reshape(num, -1).astype(np.float32), prior


DET_CASES = [
    # share, background, code, var_in_target, nms, top_k, eta, keep_top_k, threshold
    (True, 0, "CENTER_SIZE", False, 0.45, 40, 1.0, 20, 0.01),
    (True, 0, "CENTER_SIZE", False, 0.3, None, 1.0, -1, 0.2),
    (False, 0, "CORNER", False, 0.5, 30, 1.0, 15, None),
    (True, 1, "CORNER_SIZE", True, 0.7, 25, 0.8, 40, 0.05),
    (False, -1, "CORNER", False, 0.55, 20, 0.7, -1, 0.05),
    (False, 2, "CENTER_SIZE", True, 0.6, None, 0.9, 10, 0.1),
    (True, 0, "CENTER_SIZE", False, 0.45, 40, 1.0, 20, 0.999),  # no detection at all
]


@pytest.mark.parametrize("case", DET_CASES)
def test_detection_output_equals_numpy_nms(case):
    share, bg, code, vit, nms, top_k, eta, keep, thr = case
    num, priors, ncls = 2, 64, 3
    loc, conf, prior = _ssd_inputs(num, priors, ncls, share, np.random.default_rng(len(str(case))))
    nms_p = f"nms_threshold: {nms} eta: {eta}" + (f" top_k: {top_k}" if top_k else "")
    body = ('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
            'bottom: "prior" top: "out" top: "count" detection_output_param { '
            f"num_classes: {ncls} share_location: {str(share).lower()} "
            f"background_label_id: {bg} nms_param {{ {nms_p} }} code_type: {code} "
            f"variance_encoded_in_target: {str(vit).lower()} keep_top_k: {keep} "
            + (f"confidence_threshold: {thr}" if thr is not None else "") + " } }")
    out = run(body, {"loc": loc, "conf": conf, "prior": prior})
    lp = converters.parse_prototxt(body).layer[0]
    want = ref.detection_output(loc, conf, prior, lp.detection_output_param)
    got = fork_layers.caffe_detections(out["out"], num)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got[..., :2], want[..., :2])  # image ids, labels, order
    np.testing.assert_allclose(got[..., 2:], want[..., 2:], rtol=0, atol=2e-6)
    # the fixed-size blob: each image's rows, then padding rows of -1; counts per image
    rows = out["out"].reshape(num, -1, 7)
    counts = out["count"].astype(int)
    for i in range(num):
        assert (rows[i, :counts[i], 0] == i).all()
        assert (rows[i, counts[i]:] == -1).all()
        assert counts[i] == int(np.sum(want[0, 0, :, 0] == i) if want[0, 0, 0, 1] != -1 else 0)


def test_detection_output_shape_is_fixed_and_documented():
    loc, conf, prior = _ssd_inputs(1, 32, 2, True, np.random.default_rng(1))
    body = ('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
            'bottom: "prior" top: "out" detection_output_param { num_classes: 2 '
            "nms_param { nms_threshold: 0.45 top_k: 10 } keep_top_k: 7 } }")
    assert run(body, {"loc": loc, "conf": conf, "prior": prior})["out"].shape == (1, 1, 7, 7)


@pytest.mark.parametrize("param,field", [("nms_param { eta: 1.5 }", "eta"),
                                         ("background_label_id: -1", "background_label_id")])
def test_detection_output_errors_name_layer_and_field(param, field):
    body = ('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
            f'bottom: "prior" top: "out" detection_output_param {{ {param} num_classes: 2 }} }}')
    loc, conf, prior = _ssd_inputs(1, 8, 2, True, np.random.default_rng(2))
    with pytest.raises(converters.CaffeFormatError) as e:
        run(body, {"loc": loc, "conf": conf, "prior": prior})
    msg = str(e.value)
    assert "det" in msg and field in msg and "\n" not in msg


# ----------------------------------------------------------------------------- other forks


def test_relu6():
    x = rand(2, 3, 4, 4) * 5
    out = run('layer { name: "r" type: "ReLU6" bottom: "x" top: "y" }', {"x": x})["y"]
    np.testing.assert_array_equal(out, ref.relu6(x))


@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel(group):
    x = rand(2, 6, 3, 2)
    body = (f'layer {{ name: "s" type: "ShuffleChannel" bottom: "x" top: "y" '
            f"shuffle_channel_param {{ group: {group} }} }}")
    np.testing.assert_array_equal(run(body, {"x": x})["y"], ref.shuffle_channel(x, group))


@pytest.mark.parametrize("conv", ["kernel_size: 3 pad: 1", "kernel_size: 3 stride: 2",
                                  "kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 dilation: 2",
                                  "kernel_size: 5 pad: 2 stride: 2 bias_term: false"])
def test_convolution_depthwise(conv):
    x = rand(2, 4, 9, 8)
    body = (f'layer {{ name: "dw" type: "ConvolutionDepthwise" bottom: "x" top: "y" '
            f"convolution_param {{ num_output: 4 {conv} }} }}")
    lp = converters.parse_prototxt(body).layer[0].convolution_param
    kh = lp.kernel_h or lp.kernel_size[0]
    kw = lp.kernel_w or lp.kernel_size[0]
    w = rand(4, 1, kh, kw)
    b = rand(4) if lp.bias_term else None
    params = {"dw": {"weight": w, **({"bias": b} if b is not None else {})}}
    pad = (lp.pad_h, lp.pad_w) if lp.HasField("pad_h") else (lp.pad[0],) * 2 if lp.pad \
        else (0, 0)
    stride = (lp.stride[0],) * 2 if lp.stride else (1, 1)
    dil = (lp.dilation[0],) * 2 if lp.dilation else (1, 1)
    want = ref.depthwise_conv(x, w, b, (kh, kw), stride, pad, dil)
    for jit in (True,):
        assert rel(run(body, {"x": x}, params, jit=jit)["y"], want) < 1e-6


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_upsample(scale):
    x = rand(1, 2, 3, 4)
    body = (f'layer {{ name: "u" type: "Upsample" bottom: "x" top: "y" '
            f"upsample_param {{ scale: {scale} }} }}")
    np.testing.assert_array_equal(run(body, {"x": x})["y"], ref.upsample(x, scale))


INTERP_CASES = [("zoom_factor: 2", (9, 13)), ("shrink_factor: 2", (3, 4)),
                ("height: 11 width: 4", (11, 4)), ("zoom_factor: 3 shrink_factor: 2", (7, 10)),
                ("zoom_factor: 2 pad_beg: -1 pad_end: -1", (5, 9)),
                ("height: 5 width: 7", (5, 7))]


@pytest.mark.parametrize("params,out_hw", INTERP_CASES)
def test_interp(params, out_hw):
    x = rand(2, 3, 5, 7)
    body = (f'layer {{ name: "i" type: "Interp" bottom: "x" top: "y" '
            f"interp_param {{ {params} }} }}")
    lp = converters.parse_prototxt(body).layer[0].interp_param
    got = run(body, {"x": x})["y"]
    assert got.shape == (2, 3) + out_hw
    assert rel(got, ref.interp(x, out_hw, lp.pad_beg, lp.pad_end)) < 1e-6


def test_interp_to_the_size_of_a_second_bottom():
    x, like = rand(1, 3, 4, 5), rand(1, 1, 10, 6)
    got = run('layer { name: "i" type: "Interp" bottom: "x" bottom: "like" top: "y" }',
              {"x": x, "like": like})["y"]
    assert rel(got, ref.interp(x, (10, 6))) < 1e-6


def test_fork_types_are_in_the_table():
    from fcn_jax.layer_table import LAYER_TYPES, supported_types

    assert set(fork_layers.FORK_TYPES) <= supported_types()
    assert all(LAYER_TYPES[t].builtin for t in fork_layers.FORK_TYPES)
