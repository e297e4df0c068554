"""Issue-6 layers and DAGs the Caffe reference zoo does not cover, through load_caffe.

Each net is prototxt text written here, loaded with ``converters.load_caffe`` (params given
as a tree, or from the prototxt fillers), run, and every blob compared with a float64 numpy
reference transcribed from BVLC Caffe's ``src/caffe/layers/*.cpp`` forward passes (indices,
shapes and defaults as there), never from fcn_jax.layers.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from conftest import caffe_close

import converters

RNG = np.random.default_rng(6)


def _randn(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _input(name: str, shape) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" ' \
           f'input_param {{ shape {{ {dims} }} }} }}\n'


def _run(text: str, inputs: dict, params=None, phase: str = "TEST"):
    """Load prototxt ``text`` (params tree or fillers), run it; every blob as numpy."""
    net = converters.parse_prototxt(text)
    module, p = converters.load_caffe(net, params, phase=phase)
    x = next(iter(inputs.values())) if len(inputs) == 1 else inputs
    blobs = module.apply({"params": p}, x)
    return {k: np.asarray(v) for k, v in blobs.items()}, p, module


def _layer_net(ltype: str, shape, body: str = "", tops=("y",), extra_inputs=()) -> str:
    bottoms = "".join(f' bottom: "{b}"' for b in ("x", *[n for n, _ in extra_inputs]))
    text = _input("x", shape) + "".join(_input(n, s) for n, s in extra_inputs)
    return text + (f'layer {{ name: "l" type: "{ltype}"{bottoms}'
                   + "".join(f' top: "{t}"' for t in tops) + f" {body} }}\n")


# ----------------------------------------------------------------------------- Log, Threshold


@pytest.mark.parametrize("base, scale, shift", [(-1.0, 1.0, 0.0), (2.0, 0.5, 2.0),
                                                (10.0, 3.0, 0.0), (-1.0, -1.0, 4.0)])
def test_log(base, scale, shift):
    """log_layer.cpp: y = log(shift + scale * x) * (base == -1 ? 1 : 1 / ln(base))."""
    x = RNG.uniform(0.05, 3.0, (2, 3, 4, 5)).astype(np.float32)
    body = f"log_param {{ base: {base} scale: {scale} shift: {shift} }}"
    blobs, _, _ = _run(_layer_net("Log", x.shape, body), {"x": x})
    inner = shift + scale * x.astype(np.float64)
    ref = np.log(inner) / (1.0 if base == -1 else math.log(base))
    caffe_close(blobs["y"], ref, "log")


def test_log_default_params():
    x = RNG.uniform(0.1, 5.0, (2, 7)).astype(np.float32)
    blobs, _, _ = _run(_layer_net("Log", x.shape), {"x": x})
    caffe_close(blobs["y"], np.log(x.astype(np.float64)), "log")


@pytest.mark.parametrize("threshold", [None, 0.25, -1.5])
def test_threshold(threshold):
    """threshold_layer.cpp: y = x > threshold ? 1 : 0 (strict; default threshold 0)."""
    t = 0.0 if threshold is None else threshold
    x = _randn(2, 3, 4, 5)
    x.flat[::7] = t  # exact ties go to 0
    body = "" if threshold is None else f"threshold_param {{ threshold: {threshold} }}"
    blobs, _, _ = _run(_layer_net("Threshold", x.shape, body), {"x": x})
    np.testing.assert_array_equal(blobs["y"], (x > np.float32(t)).astype(np.float32))
    assert blobs["y"].dtype == np.float32


# ----------------------------------------------------------------------------- ArgMax


def ref_argmax(x: np.ndarray, axis: int | None, top_k: int, out_max_val: bool) -> np.ndarray:
    """argmax_layer.cpp Reshape + Forward_cpu, transcribed (flat indexing, axis_dist)."""
    shape = list(x.shape) if axis is not None else [1] * max(x.ndim, 3)
    if axis is not None:
        axis = axis % x.ndim
        shape[axis] = top_k
        dim = x.shape[axis]
        axis_dist = math.prod(x.shape[axis:]) // dim
    else:
        shape[0], shape[2] = x.shape[0], top_k
        if out_max_val:
            shape[1] = 2
        dim = math.prod(x.shape[1:])
        axis_dist = 1
    flat = x.reshape(-1)
    top = np.zeros(math.prod(shape), np.float32)
    for i in range(x.size // dim):
        pairs = [(flat[(i // axis_dist * dim + j) * axis_dist + i % axis_dist], j)
                 for j in range(dim)]
        pairs.sort(reverse=True)  # std::greater on (value, index): ties -> larger index
        for j in range(top_k):
            value, index = pairs[j]
            pos = (i // axis_dist * top_k + j) * axis_dist + i % axis_dist
            if out_max_val and axis is not None:
                top[pos] = value
            elif out_max_val:
                top[2 * i * top_k + j] = index
                top[2 * i * top_k + top_k + j] = value
            else:
                top[pos] = index
    return top.reshape(shape)


def _tied(shape) -> np.ndarray:
    """Values from a small set, so that every row has ties."""
    return RNG.integers(-3, 4, shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 10), (2, 4, 3)])
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_without_axis(shape, top_k, out_max_val):
    x = _tied(shape)
    body = f"argmax_param {{ top_k: {top_k} out_max_val: {str(out_max_val).lower()} }}"
    blobs, _, _ = _run(_layer_net("ArgMax", shape, body), {"x": x})
    ref = ref_argmax(x, None, top_k, out_max_val)
    assert blobs["y"].shape == ref.shape
    np.testing.assert_array_equal(blobs["y"], ref)


@pytest.mark.parametrize("shape, axis", [((2, 5, 3, 4), 1), ((2, 5, 3, 4), 3),
                                         ((2, 5, 3, 4), -2), ((2, 5, 3, 4), 0), ((4, 6), 1)])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_with_axis(shape, axis, top_k, out_max_val):
    x = _tied(shape)
    body = (f"argmax_param {{ axis: {axis} top_k: {top_k} "
            f"out_max_val: {str(out_max_val).lower()} }}")
    blobs, _, _ = _run(_layer_net("ArgMax", shape, body), {"x": x})
    ref = ref_argmax(x, axis, top_k, out_max_val)
    assert blobs["y"].shape == ref.shape
    np.testing.assert_array_equal(blobs["y"], ref)


# ----------------------------------------------------------------------------- Reshape


def ref_reshape_shape(bottom, dims, axis: int, num_axes: int) -> tuple[int, ...]:
    """reshape_layer.cpp Reshape(): the top shape."""
    n = len(bottom)
    start = axis if axis >= 0 else n + axis + 1
    end = n if num_axes == -1 else start + num_axes
    top = list(bottom[:start]) + list(dims) + list(bottom[end:])
    for i, d in enumerate(dims):
        if d == 0:
            top[start + i] = bottom[start + i]
    if -1 in dims:
        explicit = math.prod(d for d in dims if d > 0)
        explicit *= math.prod(bottom[:start]) * math.prod(bottom[end:])
        explicit *= math.prod(bottom[start + i] for i, d in enumerate(dims) if d == 0)
        top[start + list(dims).index(-1)] = math.prod(bottom) // explicit
    return tuple(top)


@pytest.mark.parametrize("dims, axis, num_axes", [
    ((2, -1), 1, 1),        # split C into (2, C/2)
    ((1, 1), -1, 0),        # append two axes after the last (axis -1 = end)
    ((1,), 0, 0),           # prepend an axis
    ((0, -1), 0, 2),        # merge N and C, keep N
    ((-1,), 2, -1),         # flatten H, W
    ((3, 0), -3, 2),        # axis -3 on 4-D = start 2: (H, W) -> (3, W) with H = 3
    ((-1, 2, 2), 1, 3),     # the whole C, H, W re-cut
])
def test_reshape_axis_num_axes(dims, axis, num_axes):
    shape = (2, 6, 3, 4)
    x = _randn(*shape)
    body = (f"reshape_param {{ shape {{ {' '.join(f'dim: {d}' for d in dims)} }} "
            f"axis: {axis} num_axes: {num_axes} }}")
    blobs, _, _ = _run(_layer_net("Reshape", shape, body), {"x": x})
    ref_shape = ref_reshape_shape(shape, dims, axis, num_axes)
    assert blobs["y"].shape == ref_shape
    np.testing.assert_array_equal(blobs["y"], x.reshape(ref_shape))  # ShareData: same order


# ----------------------------------------------------------------------------- Slice, Concat


@pytest.mark.parametrize("axis, n_tops", [(1, 3), (0, 2), (-1, 2), (2, 3)])
def test_slice_without_slice_points(axis, n_tops):
    """slice_layer.cpp: no slice_point -> top.size() equal parts along the axis."""
    shape = (4, 6, 3, 4)
    x = _randn(*shape)
    tops = tuple(f"t{i}" for i in range(n_tops))
    blobs, _, _ = _run(_layer_net("Slice", shape, f"slice_param {{ axis: {axis} }}", tops),
                       {"x": x})
    for t, ref in zip(tops, np.split(x, n_tops, axis=axis), strict=True):
        np.testing.assert_array_equal(blobs[t], ref)


def test_slice_dim_legacy_field():
    x = _randn(2, 6, 3)
    blobs, _, _ = _run(_layer_net("Slice", x.shape, "slice_param { slice_dim: 1 }", ("a", "b")),
                       {"x": x})
    np.testing.assert_array_equal(blobs["b"], x[:, 3:])


def test_concat_axis_0():
    a, b, c = _randn(1, 3, 4, 5), _randn(3, 3, 4, 5), _randn(2, 3, 4, 5)
    text = _input("a", a.shape) + _input("b", b.shape) + _input("c", c.shape) + (
        'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" bottom: "c" top: "y" '
        "concat_param { axis: 0 } }\n"
        'layer { name: "cat_legacy" type: "Concat" bottom: "c" bottom: "a" top: "y2" '
        "concat_param { concat_dim: 0 } }\n")
    blobs, _, _ = _run(text, {"a": a, "b": b, "c": c})
    np.testing.assert_array_equal(blobs["y"], np.concatenate([a, b, c], axis=0))
    np.testing.assert_array_equal(blobs["y2"], np.concatenate([c, a], axis=0))


# ----------------------------------------------------------------------------- Scale, Bias


def ref_scale(x, s, b, axis: int) -> np.ndarray:
    """scale_layer.cpp Forward_cpu: outer x scale_dim x inner loops; bias via BiasLayer."""
    x = x.astype(np.float64)
    axis = 0 if s.ndim == 0 else axis % x.ndim
    outer = math.prod(x.shape[:axis])
    inner = math.prod(x.shape[axis + s.ndim:])
    y = x.reshape(outer, s.size, inner) * s.astype(np.float64).reshape(1, -1, 1)
    if b is not None:
        y = y + b.astype(np.float64).reshape(1, -1, 1)
    return y.reshape(x.shape)


@pytest.mark.parametrize("axis, num_axes, bias_term", [(1, 2, False), (1, 2, True),
                                                       (-2, 2, True), (0, 2, False),
                                                       (2, -1, True), (1, 0, True)])
def test_scale_learned_num_axes(axis, num_axes, bias_term):
    shape = (2, 3, 4, 5)
    x = _randn(*shape)
    ax = axis % 4
    pshape = shape[ax:] if num_axes == -1 else shape[ax:ax + num_axes]
    params = {"s": {"scale": _randn(*pshape)}}
    if bias_term:
        params["s"]["bias"] = _randn(*pshape)
    body = (f"scale_param {{ axis: {axis} num_axes: {num_axes} "
            f"bias_term: {str(bias_term).lower()} }}")
    text = _input("x", shape) + f'layer {{ name: "s" type: "Scale" bottom: "x" top: "y" {body} }}'
    blobs, p, _ = _run(text, {"x": x}, params)
    assert p["s"]["scale"].shape == pshape
    caffe_close(blobs["y"], ref_scale(x, params["s"]["scale"], params["s"].get("bias"), axis),
                "scale")


def test_scale_learned_from_fillers():
    """No caffemodel: the scale comes from scale_param.filler (default constant 1)."""
    text = _input("x", (2, 3, 4, 5)) + (
        'layer { name: "s" type: "Scale" bottom: "x" top: "y" scale_param { num_axes: 2 '
        'bias_term: true filler { type: "constant" value: 2.5 } '
        'bias_filler { type: "constant" value: -1 } } }\n'
        'layer { name: "s1" type: "Scale" bottom: "x" top: "y1" }\n')
    x = _randn(2, 3, 4, 5)
    blobs, p, _ = _run(text, {"x": x})
    assert p["s"]["scale"].shape == (3, 4) and p["s"]["bias"].shape == (3, 4)
    caffe_close(blobs["y"], 2.5 * x.astype(np.float64) - 1.0, "scale filler")
    np.testing.assert_array_equal(blobs["y1"], x)


@pytest.mark.parametrize("axis, sshape", [(1, (3, 4)), (2, (4, 5)), (0, (2, 3, 4, 5)),
                                          (-3, (3,)), (1, (3, 4, 5))])
def test_scale_second_bottom(axis, sshape):
    """A second bottom is the scale; its own shape decides the axes it spans (num_axes is
    ignored, as in ScaleLayer::Reshape)."""
    shape = (2, 3, 4, 5)
    x, s = _randn(*shape), _randn(*sshape)
    text = _input("x", shape) + _input("s", sshape) + (
        f'layer {{ name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" '
        f"scale_param {{ axis: {axis} num_axes: 1 }} }}\n")
    blobs, p, _ = _run(text, {"x": x, "s": s})
    assert "sc" not in p
    caffe_close(blobs["y"], ref_scale(x, s, None, axis), "scale 2 bottoms")


@pytest.mark.parametrize("axis, sshape", [(1, (3,)), (1, (3, 4)), (2, (4, 5))])
def test_scale_second_bottom_with_bias(axis, sshape):
    """ScaleLayer::LayerSetUp: with two bottoms the bias blob spans bottom[1]->num_axes()
    axes from ``axis``: shape = bottom[0].shape[axis : axis + bottom[1].ndim]."""
    shape = (2, 3, 4, 5)
    x, s, b = _randn(*shape), _randn(*sshape), _randn(*sshape)
    text = _input("x", shape) + _input("s", sshape) + (
        f'layer {{ name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" '
        f"scale_param {{ axis: {axis} bias_term: true }} }}\n")
    blobs, p, _ = _run(text, {"x": x, "s": s}, {"sc": {"bias": b}})
    assert p["sc"]["bias"].shape == sshape
    caffe_close(blobs["y"], ref_scale(x, s, b, axis), "scale 2 bottoms + bias")


@pytest.mark.parametrize("axis, bshape", [(1, (3,)), (1, (3, 4)), (0, (2, 3)),
                                          (2, (4, 5)), (-1, (5,))])
def test_bias_second_bottom(axis, bshape):
    """bias_layer.cpp: y = x + b, b = bottom[1] spanning its own axes from ``axis``."""
    shape = (2, 3, 4, 5)
    x, b = _randn(*shape), _randn(*bshape)
    text = _input("x", shape) + _input("b", bshape) + (
        f'layer {{ name: "bi" type: "Bias" bottom: "x" bottom: "b" top: "y" '
        f"bias_param {{ axis: {axis} }} }}\n")
    blobs, p, _ = _run(text, {"x": x, "b": b})
    assert "bi" not in p
    ax = axis % 4
    ref = x.astype(np.float64) + b.astype(np.float64).reshape(
        bshape + (1,) * (4 - ax - len(bshape)))
    caffe_close(blobs["y"], ref, "bias 2 bottoms")


# ----------------------------------------------------------------------------- Crop


def ref_crop(x, ref_shape, axis: int, offsets) -> np.ndarray:
    """crop_layer.cpp Reshape: axes >= axis take bottom[1]'s size at offset(0) (one value)
    or offset(i - axis) (one per axis); earlier axes are kept whole."""
    axis = axis % x.ndim
    index = []
    for i in range(x.ndim):
        if i < axis:
            index.append(slice(None))
            continue
        off = 0 if not offsets else offsets[0] if len(offsets) == 1 else offsets[i - axis]
        assert x.shape[i] - off >= ref_shape[i]
        index.append(slice(off, off + ref_shape[i]))
    return x[tuple(index)]


@pytest.mark.parametrize("axis, offsets, rshape", [
    (1, (1, 2, 3), (9, 2, 5, 4)),
    (2, (0, 3), (9, 9, 4, 5)),
    (-2, (2, 1), (1, 1, 6, 8)),
    (0, (1, 0, 2, 4), (3, 2, 4, 4)),
    (2, (2,), (1, 1, 5, 5)),
    (1, (), (1, 2, 3, 4)),
])
def test_crop_per_axis_offsets(axis, offsets, rshape):
    shape = (4, 3, 8, 9)
    x, r = _randn(*shape), _randn(*rshape)
    off = " ".join(f"offset: {o}" for o in offsets)
    text = _input("x", shape) + _input("r", rshape) + (
        f'layer {{ name: "c" type: "Crop" bottom: "x" bottom: "r" top: "y" '
        f"crop_param {{ axis: {axis} {off} }} }}\n")
    blobs, _, _ = _run(text, {"x": x, "r": r})
    np.testing.assert_array_equal(blobs["y"], ref_crop(x, rshape, axis, offsets))


# ----------------------------------------------------------------------------- Deconvolution


def ref_deconv(x, w, b, stride, pad, dil, group) -> np.ndarray:
    """deconv_layer.cpp: the transpose of convolution (col2im with dilation). Input pixel
    (h, w) adds x * W[c, o, i, j] at output (s*h - p + d*i, s*w - p + d*j); output size
    s*(H-1) + d*(k-1) + 1 - 2p per axis."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, cin, h, wd = x.shape
    _, og, kh, kw = w.shape
    full = np.zeros((n, og * group, stride[0] * (h - 1) + dil[0] * (kh - 1) + 1,
                     stride[1] * (wd - 1) + dil[1] * (kw - 1) + 1))
    cg = cin // group
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", x[:, g * cg:(g + 1) * cg],
                                    w[g * cg:(g + 1) * cg, :, i, j])
                full[:, g * og:(g + 1) * og,
                     dil[0] * i:dil[0] * i + stride[0] * (h - 1) + 1:stride[0],
                     dil[1] * j:dil[1] * j + stride[1] * (wd - 1) + 1:stride[1]] += contrib
    oh = full.shape[2] - 2 * pad[0]
    ow = full.shape[3] - 2 * pad[1]
    out = full[:, :, pad[0]:pad[0] + oh, pad[1]:pad[1] + ow]
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    return out


@pytest.mark.parametrize("k, s, p, d, g, cin, cout", [
    (3, 1, 0, 2, 1, 3, 4),
    (3, 2, 1, 2, 1, 4, 2),
    (3, 2, 1, 3, 2, 4, 6),
    (2, 3, 0, 2, 2, 2, 2),
    (3, 2, 5, 2, 1, 2, 3),   # pad beyond the dilated kernel: output cropped
    (4, 2, 2, 2, 4, 4, 4),   # depthwise
])
def test_deconvolution_with_dilation(k, s, p, d, g, cin, cout):
    x = _randn(2, cin, 5, 6)
    w = _randn(cin, cout // g, k, k)
    b = _randn(cout)
    text = _input("x", x.shape) + (
        f'layer {{ name: "up" type: "Deconvolution" bottom: "x" top: "y" convolution_param {{ '
        f"num_output: {cout} kernel_size: {k} stride: {s} pad: {p} dilation: {d} "
        f"group: {g} }} }}\n")
    blobs, params, _ = _run(text, {"x": x}, {"up": {"weight": w, "bias": b}})
    assert params["up"]["weight"].shape == (cin, cout // g, k, k)
    caffe_close(blobs["y"], ref_deconv(x, w, b, (s, s), (p, p), (d, d), g), "deconv")


def test_deconvolution_rectangular_dilation_no_bias():
    x = _randn(1, 2, 4, 7)
    w = _randn(2, 3, 3, 2)
    text = _input("x", x.shape) + (
        'layer { name: "up" type: "Deconvolution" bottom: "x" top: "y" convolution_param { '
        "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 "
        "dilation: 2 dilation: 3 bias_term: false } }\n")
    blobs, _, _ = _run(text, {"x": x}, {"up": {"weight": w}})
    caffe_close(blobs["y"], ref_deconv(x, w, None, (2, 1), (1, 0), (2, 3), 1), "deconv")


# ----------------------------------------------------------------------------- DAGs

DAG = """
name: "dag"
layer { name: "in" type: "Input" top: "a" top: "b"
        input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 }
                      shape { dim: 2 dim: 6 dim: 4 dim: 5 } } }
layer { name: "in_c" type: "Input" top: "c" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 5 } } }
layer { name: "in_s" type: "Input" top: "sc" input_param { shape { dim: 4 dim: 5 } } }
layer { name: "cat0" type: "Concat" bottom: "a" bottom: "c" top: "ac" concat_param { axis: 0 } }
layer { name: "sl" type: "Slice" bottom: "b" top: "b1" top: "b2" top: "b3" }
layer { name: "sum" type: "Eltwise" bottom: "b1" bottom: "b3" top: "bsum"
        eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "b2" bottom: "b3" top: "bprod"
        eltwise_param { operation: PROD } }
layer { name: "neg" type: "Power" bottom: "bsum" top: "neg" power_param { scale: -1 } }
layer { name: "relu" type: "ReLU" bottom: "bsum" top: "bsum" }
layer { name: "split" type: "Split" bottom: "bprod" top: "p1" top: "p2" }
layer { name: "mx" type: "Eltwise" bottom: "p1" bottom: "bsum" top: "mx"
        eltwise_param { operation: MAX } }
layer { name: "conv" type: "Convolution" bottom: "a" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }
layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv" include { phase: TRAIN } }
layer { name: "scaled" type: "Scale" bottom: "conv" bottom: "sc" top: "scaled"
        scale_param { axis: 2 } }
layer { name: "cat1" type: "Concat" bottom: "scaled" bottom: "p2" bottom: "a" top: "feat" }
layer { name: "train_only" type: "AbsVal" bottom: "feat" top: "feat" include { phase: TRAIN } }
layer { name: "test_only" type: "TanH" bottom: "ac" top: "tanh_ac" include { phase: TEST } }
layer { name: "ip" type: "InnerProduct" bottom: "feat" top: "ip"
        inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def _dag_inputs():
    return {"a": _randn(2, 3, 4, 5), "b": _randn(2, 6, 4, 5), "c": _randn(1, 3, 4, 5),
            "sc": _randn(4, 5)}


def _dag_params():
    return {"conv": {"weight": _randn(2, 3, 3, 3), "bias": _randn(2)},
            "ip": {"weight": _randn(3, (2 + 2 + 3) * 20) * 0.1, "bias": _randn(3)}}


def _conv64(x, w, b):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], w.shape[0]) + x.shape[2:])
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + x.shape[2], j:j + x.shape[3]],
                             w[:, :, i, j])
    return out + b.reshape(1, -1, 1, 1)


def ref_dag(inp, params, phase="TEST"):
    """The DAG above in float64, in Caffe's execution semantics (list order; an in-place
    layer changes its blob for the layers after it only)."""
    f = {k: v.astype(np.float64) for k, v in inp.items()}
    p = {k: {n: v.astype(np.float64) for n, v in d.items()} for k, d in params.items()}
    r = dict(f)
    r["ac"] = np.concatenate([f["a"], f["c"]], axis=0)
    r["b1"], r["b2"], r["b3"] = f["b"][:, 0:2], f["b"][:, 2:4], f["b"][:, 4:6]
    bsum = 0.5 * r["b1"] - 2 * r["b3"]
    r["bprod"] = r["b2"] * r["b3"]
    r["neg"] = -bsum  # before the in-place ReLU
    r["bsum"] = np.maximum(bsum, 0)
    r["p1"] = r["p2"] = r["bprod"]
    r["mx"] = np.maximum(r["p1"], r["bsum"])
    r["conv"] = _conv64(f["a"], p["conv"]["weight"], p["conv"]["bias"])
    r["scaled"] = r["conv"] * f["sc"].reshape(1, 1, 4, 5)
    r["feat"] = np.concatenate([r["scaled"], r["p2"], f["a"]], axis=1)
    if phase == "TRAIN":
        r["feat"] = np.abs(r["feat"])
    else:
        r["tanh_ac"] = np.tanh(r["ac"])
    r["ip"] = r["feat"].reshape(2, -1) @ p["ip"]["weight"].T + p["ip"]["bias"]
    z = np.exp(r["ip"] - r["ip"].max(axis=1, keepdims=True))
    r["prob"] = z / z.sum(axis=1, keepdims=True)
    return r


def _check_dag(blobs, ref):
    assert set(blobs) == set(ref), set(blobs) ^ set(ref)
    for name, v in ref.items():
        caffe_close(blobs[name], v, name)


def test_dag_multi_input_multi_top():
    inp, params = _dag_inputs(), _dag_params()
    blobs, _, module = _run(DAG, inp, params)
    assert set(module.inputs) == {"a", "b", "c", "sc"}
    _check_dag(blobs, ref_dag(inp, params))


def test_dag_independent_branches_in_another_order():
    """A different valid listing (independent branches swapped) computes the same blobs."""
    net = converters.parse_prototxt(DAG)
    layers = list(net.layer)
    order = [lp.name for lp in layers]
    first = ["in_s", "in", "in_c", "conv", "scaled", "sl", "prod", "split", "sum", "neg",
             "relu", "mx", "cat1", "ip", "prob", "test_only", "cat0", "drop", "train_only"]
    assert sorted(first) == sorted(order)
    by_name = {lp.name: lp for lp in layers}
    del net.layer[:]
    for name in first:
        net.layer.add().CopyFrom(by_name[name])
    inp, params = _dag_inputs(), _dag_params()
    blobs, _, _ = _run(converters.format_prototxt(net), inp, params)
    _check_dag(blobs, ref_dag(inp, params))


def test_dag_train_phase_rules():
    """include { phase: TRAIN } layers run only in TRAIN (Dropout then needs an rng, so the
    comparison uses the deterministic blobs that do not depend on it)."""
    inp, params = _dag_inputs(), _dag_params()
    net = converters.parse_prototxt(DAG)
    module, p = converters.load_caffe(net, params, phase="TRAIN")
    names = [s.name for s in module.layers]
    assert "train_only" in names and "drop" in names and "test_only" not in names
    blobs = module.apply({"params": p}, inp, train=True,
                         rngs={"dropout": jax.random.PRNGKey(0)})
    ref = ref_dag(inp, params, phase="TRAIN")
    assert "tanh_ac" not in blobs
    for name in ("ac", "bsum", "neg", "mx", "bprod"):
        caffe_close(blobs[name], ref[name], name)
    # Dropout (ratio 0.5) keeps or doubles each conv value
    conv = np.asarray(blobs["conv"], np.float64)
    kept = np.isclose(conv, 2 * ref["conv"], rtol=1e-5, atol=1e-5)
    assert np.all(kept | (conv == 0)) and 0 < kept.mean() < 1
    assert np.all(np.asarray(blobs["feat"]) >= 0)  # the TRAIN-only AbsVal ran


def test_dag_params_from_fillers():
    """Without a caffemodel, Convolution/InnerProduct params come from the prototxt fillers
    and the net still computes Caffe's function of them."""
    text = DAG.replace("num_output: 2 kernel_size: 3 pad: 1",
                       'num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" '
                       'std: 0.5 } bias_filler { type: "constant" value: 0.25 }')
    inp = _dag_inputs()
    blobs, p, _ = _run(text, inp)
    np.testing.assert_array_equal(np.asarray(p["conv"]["bias"]), np.full(2, 0.25, np.float32))
    assert np.asarray(p["conv"]["weight"]).std() > 0.1
    np.testing.assert_array_equal(np.asarray(p["ip"]["weight"]), 0)  # default filler: 0
    params = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in p.items()}
    _check_dag(blobs, ref_dag(inp, params))
