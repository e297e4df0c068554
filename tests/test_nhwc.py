"""fcn_jax.nhwc (NHWC fast-path ops) against float64 numpy and the reference layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA
from test_layers import np_conv_caffe

import converters
from fcn_jax import layers as L
from fcn_jax import nhwc as F
from fcn_jax.net import run_graph

RNG = np.random.default_rng(0)


CONV_CASES = [  # (x shape NCHW, weight shape, stride, pad, dilation, group)
    ((2, 6, 17, 19), (8, 3, 3, 3), (1, 1), (1, 1), (1, 1), 2),
    ((1, 3, 31, 29), (5, 3, 11, 11), (4, 4), (0, 0), (1, 1), 1),
    ((2, 4, 15, 16), (6, 4, 3, 2), (2, 1), (1, 0), (2, 1), 1),
    ((1, 8, 9, 9), (12, 8, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((1, 8, 9, 9), (12, 2, 1, 1), (2, 2), (1, 1), (1, 1), 4),
    ((2, 16, 7, 8), (10, 8, 6, 6), (1, 1), (0, 0), (1, 1), 2),
    # the last window hangs past the input (Caffe: C division, im2col reads zeros there)
    ((1, 3, 9, 10), (4, 3, 11, 11), (4, 4), (0, 0), (1, 1), 1),
    ((2, 4, 6, 5), (6, 2, 5, 4), (3, 2), (1, 0), (1, 1), 2),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("method", ["auto", "conv", "patches", "dot"])
def test_conv_nhwc_matches_float64(case, method):
    xs, ws, stride, pad, dil, group = case
    if method == "dot" and ws[2:] != (1, 1):
        pytest.skip("dot is for 1x1 kernels")
    x = RNG.standard_normal(xs).astype(np.float32)
    w = RNG.standard_normal(ws).astype(np.float32)
    b = RNG.standard_normal(ws[0]).astype(np.float32)
    ref = np_conv_caffe(x.astype(np.float64), w.astype(np.float64), b, stride, pad, dil, group)
    conv = jax.jit(lambda x, weight: F.to_nchw(F.conv_nhwc(
        F.to_nhwc(x), weight, b, stride=stride, pad=pad, dilation=dil, group=group,
        method=method)))
    for weight in (w, F.prepare_conv_weight(jnp.asarray(w), group)):
        y = np.asarray(conv(x, weight))
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_conv_auto_picks_dot_and_patches():
    assert F._conv_method((1, 13, 13, 256), (4096, 256, 6, 6), (1, 1), (0, 0), (1, 1),
                          1) == "patches"
    assert F._conv_method((1, 8, 8, 4096), (4096, 4096, 1, 1), (1, 1), (0, 0), (1, 1),
                          1) == "dot"
    assert F._conv_method((1, 27, 27, 96), (256, 48, 5, 5), (1, 1), (2, 2), (1, 1),
                          2) == "conv"


POOL_CASES = [  # (method, kernel, stride, pad, ceil_mode, global)
    ("MAX", (3, 3), (2, 2), (0, 0), True, False),
    ("AVE", (3, 3), (2, 2), (0, 0), True, False),
    ("MAX", (3, 2), (2, 1), (1, 1), True, False),
    ("AVE", (3, 3), (2, 2), (1, 1), True, False),
    ("AVE", (2, 3), (1, 2), (0, 1), False, False),
    ("MAX", (2, 2), (2, 2), (0, 0), False, False),
    ("AVE", (1, 1), (1, 1), (0, 0), True, True),
    ("MAX", (1, 1), (1, 1), (0, 0), True, True),
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_nhwc_bit_identical_to_layers(case):
    method, k, s, p, ceil, glob = case
    x = RNG.standard_normal((2, 5, 13, 10)).astype(np.float32)
    ref = L.pooling(jnp.asarray(x), method=method, kernel=k, stride=s, pad=p, ceil_mode=ceil,
                    global_pooling=glob)
    y = jax.jit(lambda x: F.pool_nhwc(F.to_nhwc(x), method=method, kernel=k, stride=s,
                                      pad=p, ceil_mode=ceil, global_pooling=glob))(x)
    np.testing.assert_array_equal(np.asarray(F.to_nchw(y)), np.asarray(ref))


def _lrn64(x, n, alpha, beta, k, region):
    x = x.astype(np.float64)
    pre = (n - 1) // 2
    if region == "ACROSS_CHANNELS":
        sq = np.pad(x**2, ((0, 0), (pre, pre), (0, 0), (0, 0)))
        s = sum(sq[:, i:i + x.shape[1]] for i in range(n))
        return x * (k + alpha / n * s) ** -beta
    sq = np.pad(x**2, ((0, 0), (0, 0), (pre, pre), (pre, pre)))
    s = sum(sq[:, :, i:i + x.shape[2], j:j + x.shape[3]] for i in range(n) for j in range(n))
    return x * (1 + alpha / n**2 * s) ** -beta


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_nhwc_matches_float64(region):
    x = RNG.standard_normal((2, 7, 6, 5)).astype(np.float32) * 3
    ref = _lrn64(x, 5, 0.5, 0.75, 2.0, region)
    y = F.lrn_nhwc(F.to_nhwc(jnp.asarray(x)), local_size=5, alpha=0.5, beta=0.75, k=2.0,
                   norm_region=region)
    np.testing.assert_allclose(np.asarray(F.to_nchw(y)), ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_lrn_nhwc_as_close_to_exact_as_pow_over_a_wide_range_of_scales(beta):
    """beta 0.75 runs as a division by sqrt(s * sqrt(s)) instead of pow: over scales from ~1 to
    ~1e7 it stays within one ulp of what the pow formula (layers.lrn) gets from float64."""
    x = (RNG.standard_normal((1, 64, 9, 9)) * np.logspace(-2, 4, 64)[None, :, None, None]
         ).astype(np.float32)
    ref = _lrn64(x, 5, 0.5, beta, 1.0, "ACROSS_CHANNELS")
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    y = np.asarray(F.to_nchw(jax.jit(lambda x: F.lrn_nhwc(
        F.to_nhwc(x), local_size=5, alpha=0.5, beta=beta, k=1.0))(jnp.asarray(x))))
    z = np.asarray(jax.jit(lambda x: L.lrn(x, local_size=5, alpha=0.5, beta=beta, k=1.0))(
        jnp.asarray(x)))
    assert (np.abs(y - ref) / ulp).max() <= (np.abs(z - ref) / ulp).max() + 1.0


def test_lrn_nhwc_huge_scales_do_not_overflow():
    """s * sqrt(s) overflows float32 beyond s ~ 4.9e25; the result must still be pow's."""
    x = np.array([1e15, 3e15, 1e16, 1e17], np.float32).reshape(1, 1, 1, 4)
    ref = _lrn64(np.asarray(F.to_nchw(jnp.asarray(x))), 5, 1e-4, 0.75, 1.0, "ACROSS_CHANNELS")
    y = np.asarray(F.to_nchw(F.lrn_nhwc(jnp.asarray(x), local_size=5, alpha=1e-4,
                                        beta=0.75)))
    assert np.all(y > 0)
    np.testing.assert_allclose(y, ref, rtol=1e-6)


def test_inner_product_matches_float64():
    x = RNG.standard_normal((3, 4, 5, 6)).astype(np.float32)
    w = RNG.standard_normal((7, 120)).astype(np.float32)
    b = RNG.standard_normal(7).astype(np.float32)
    ref = x.reshape(3, -1).astype(np.float64) @ w.T.astype(np.float64) + b
    y = F.inner_product_nhwc(F.to_nhwc(jnp.asarray(x)), w, b)  # flattens in (C, H, W) order
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    yt = F.inner_product_nhwc(jnp.asarray(x.reshape(3, -1)), w.T, b, transpose=True)
    np.testing.assert_allclose(np.asarray(yt), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _caffe_pooled_size(n: int, k: int, s: int, p: int, ceil: bool) -> int:
    """pooling_layer.cpp, written independently: windows start at -p, every s; ceil keeps a
    last window that starts inside [-p, n + p - k] rounded up, then a window must start
    strictly inside [0, n + p) when padded."""
    span = n + 2 * p - k
    out = (math.ceil(span / s) if ceil else math.floor(span / s)) + 1
    if p > 0 and (out - 1) * s >= n + p:
        out -= 1
    return out


def test_output_sizes_match_caffe_rules():
    """One formula for Python ints (shape inference) and traced int arrays (bucket sizes)."""
    for n in range(5, 40):
        for k, s, p in ((3, 2, 0), (3, 2, 1), (2, 2, 0), (5, 3, 2)):
            for ceil in (True, False):
                want = _caffe_pooled_size(n, k, s, p, ceil)
                got = L.pooling_output_size(jnp.array([n]), k, s, p, ceil, clip=p > 0)
                assert int(got[0]) == want == L.pooling_output_size(n, k, s, p, ceil,
                                                                    clip=p > 0)
        assert L.conv_output_size(n, 3, 2, 1, 2) == (n + 2 - 5) // 2 + 1
        assert int(L.conv_output_size(jnp.array([n]), 3, 2, 1, 2)[0]) == (n + 2 - 5) // 2 + 1


@pytest.mark.parametrize("op", ["conv", "conv_nopad", "pool_max", "pool_ave_pad", "lrn_within",
                                "deconv"])
def test_valid_mask_gives_the_unpadded_result(op):
    """A batch zero-padded to a bigger shape, with each example's true size: the cells inside
    equal the forward of the unpadded example exactly (float64 truth for sums)."""
    sizes = [(11, 9), (8, 12)]
    big = (14, 15)
    xs = [RNG.standard_normal((3, h, w)).astype(np.float32) for h, w in sizes]
    xb = np.full((2, 3) + big, 7.0, np.float32)  # garbage beyond the valid region
    for i, x in enumerate(xs):
        xb[i, :, :x.shape[1], :x.shape[2]] = x
    valid = (jnp.asarray([s[0] for s in sizes]), jnp.asarray([s[1] for s in sizes]))
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    wd = RNG.standard_normal((3, 2, 4, 4)).astype(np.float32)

    @jax.jit
    def f(x, valid=None):
        x = F.to_nhwc(jnp.asarray(x))
        if op == "conv":
            y = F.conv_nhwc(x, w, None, stride=2, pad=1, valid=valid)
        elif op == "conv_nopad":
            y = F.conv_nhwc(x, w, None, stride=2, valid=valid)
        elif op == "pool_max":
            y = F.pool_nhwc(x, method="MAX", kernel=3, stride=2, valid=valid)
        elif op == "pool_ave_pad":
            y = F.pool_nhwc(x, method="AVE", kernel=3, stride=2, pad=1, valid=valid)
        elif op == "lrn_within":
            y = F.lrn_nhwc(x, local_size=3, alpha=0.5, norm_region="WITHIN_CHANNEL",
                           valid=valid)
        else:
            y = F.deconv_nhwc(x, wd, None, stride=2, pad=1, valid=valid)
        return F.to_nchw(y)

    yb = np.asarray(f(xb, valid))
    for i, x in enumerate(xs):
        y = np.asarray(f(x[None]))[0]
        got = yb[i, :, :y.shape[1], :y.shape[2]]
        if op == "pool_max":
            np.testing.assert_array_equal(got, y)
        else:
            np.testing.assert_allclose(got, y, rtol=1e-6, atol=1e-6)
    # the valid sizes the executor propagates are the unpadded output sizes
    hs = L.pooling_output_size(valid[0], 3, 2, 1, True, clip=True)
    assert [int(h) for h in hs] == [L.pooling_output_size(s[0], 3, 2, 1) for s in sizes]


def test_gradients_match_reference_layers():
    """The fast formulations are differentiable and give the reference gradients."""
    x = RNG.standard_normal((2, 6, 15, 15)).astype(np.float32)
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w6 = RNG.standard_normal((5, 8, 6, 6)).astype(np.float32) * 0.1

    def fast(x, w, w6):
        h = F.conv_nhwc(F.to_nhwc(x), w, None, pad=1, group=2)
        h = F.lrn_nhwc(F.pool_nhwc(jnp.maximum(h, 0), kernel=3, stride=2), local_size=5,
                       alpha=1e-2)
        h = F.conv_nhwc(h, w6, None, method="patches")
        return jnp.sum(jnp.sin(F.to_nchw(h)))

    def lrn_nchw(h, n=5, alpha=1e-2, beta=0.75):  # Caffe's formula, written out
        sq = jnp.pad(h * h, ((0, 0), (2, 2), (0, 0), (0, 0)))
        s = sum(sq[:, i:i + h.shape[1]] for i in range(n))
        return h * (1.0 + alpha / n * s) ** -beta

    def ref(x, w, w6):
        h = L.convolution(x, w, None, pad=1, group=2)
        h = lrn_nchw(L.pooling(L.relu(h), kernel=3, stride=2))
        h = L.convolution(h, w6, None)
        return jnp.sum(jnp.sin(h))

    g1 = jax.jit(jax.grad(fast, argnums=(0, 1, 2)))(x, w, w6)
    g2 = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(x, w, w6)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(b).max()))


def test_fast_executor_equals_reference_executor_in_training():
    """run_graph's NHWC path draws the same Dropout masks as the NCHW reference path."""
    d = DATA / "caffenet_mini"
    module, params = converters.load_caffe(d / "caffenet_mini_deploy.prototxt",
                                           d / "caffenet_mini.caffemodel")
    x = np.load(d / "caffenet_mini_classifier_blobs.npz")["data"]
    key = jax.random.PRNGKey(3)

    def run(fast):
        keys = iter(jax.random.split(key, 8))
        out, _ = run_graph(module.layers, lambda s, _: params.get(s.name, {}),
                           {"data": jnp.asarray(x)}, train=True, rng=lambda: next(keys),
                           fast=fast)
        return out

    a, b = jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()
    assert set(a) == set(b)
    for k in a:
        scale = float(np.abs(np.asarray(b[k])).max()) or 1.0
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=0,
                                   atol=1e-5 * scale, err_msg=k)
    assert np.mean(np.asarray(a["fc7"]) == 0) > 0.4  # dropout did act


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_is_bit_identical_to_layers(slope):
    x = np.concatenate([RNG.standard_normal(50).astype(np.float32) * 10,
                        np.array([0.0, -0.0, 3e38, -3e38], np.float32)])
    x64 = x.astype(np.float64)
    want = np.maximum(x64, 0) + slope * np.minimum(x64, 0)  # Caffe's formula
    got = np.asarray(F.relu(jnp.asarray(x), slope))
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)
    np.testing.assert_array_equal(got, np.asarray(L.relu(jnp.asarray(x), slope)))
