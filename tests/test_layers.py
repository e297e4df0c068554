"""fcn_jax.layers against real BVLC Caffe outputs and against plain float64 numpy references."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcn_jax import layers as L

DATA = Path(__file__).parent / "data"
FLT_MAX = float(np.finfo(np.float32).max)
HYP = settings(max_examples=20, deadline=None, derandomize=True)


def caffe_close(ours, ref, name: str = "", rel: float = 1e-5) -> None:
    """max |ours - ref| <= rel * max |ref| (the tolerance real float32 implementations reach)."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
    assert err <= rel * scale, f"{name}: max abs err {err:.3g} > {rel} * {scale:.3g}"


def exact(ours, ref, name: str = "") -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    np.testing.assert_array_equal(ours, ref, err_msg=name)


def close64(ours, ref, rtol: float = 2e-5) -> None:
    """float32 result against a float64 reference: relative to the output's own scale."""
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    scale = max(float(np.max(np.abs(ref))), 1.0)
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale)


# ============================================================================================
# 1. real Caffe reference nets (configs transcribed by hand from the .prototxt files)
# ============================================================================================

CASES: dict[str, tuple] = {}


def case(net: str, exact_blobs: tuple[str, ...] = ()):
    """Register ``fn(blobs) -> {blob name: our value}`` for ``tests/data/<net>_blobs.npz``."""

    def deco(fn):
        CASES[net] = (fn, set(exact_blobs))
        return fn

    return deco


# ---- layers/ -------------------------------------------------------------------------------


@case("layers/conv_group4_dil")
def _(d):
    c = L.convolution(
        d["data"], d["param:c/0"], d["param:c/1"], stride=2, pad=1, dilation=2, group=4
    )
    return {"c": c}


@case("layers/conv_nobias")
def _(d):
    return {"c": L.convolution(d["data"], d["param:c/0"])}


@case("layers/conv_rect")
def _(d):
    c = L.convolution(d["data"], d["param:c/0"], d["param:c/1"], stride=(3, 1), pad=(2, 1))
    return {"c": c}


@case("layers/dropout_test", exact_blobs=("d",))
def _(d):
    return {"d": L.dropout(d["data"], 0.5)}


@case("layers/ip_axis2")
def _(d):
    return {"ip": L.inner_product(d["data"], d["param:ip/0"], d["param:ip/1"], axis=2)}


@case("layers/ip_flatten")
def _(d):
    return {"ip": L.inner_product(d["data"], d["param:ip/0"], d["param:ip/1"])}


@case("layers/ip_transpose")
def _(d):
    return {"ip": L.inner_product(d["data"], d["param:ip/0"], d["param:ip/1"], transpose=True)}


@case("layers/lrn_across_default")
def _(d):
    return {"n": L.lrn(d["data"], local_size=5, alpha=1e-4, beta=0.75)}


@case("layers/lrn_across_k2")
def _(d):
    return {"n": L.lrn(d["data"], local_size=3, alpha=0.01, beta=0.75, k=2.0)}


@case("layers/lrn_within")
def _(d):
    n = L.lrn(d["data"], local_size=3, alpha=0.1, beta=0.75, norm_region="WITHIN_CHANNEL")
    return {"n": n}


@case("layers/pool_ceil_ave", exact_blobs=("p",))
def _(d):
    return {"p": L.pooling(d["data"], method="AVE", kernel=3, stride=2)}


@case("layers/pool_ceil_max", exact_blobs=("p",))
def _(d):
    return {"p": L.pooling(d["data"], method="MAX", kernel=3, stride=2)}


@case("layers/pool_floor_max", exact_blobs=("p",))
def _(d):
    return {"p": L.pooling(d["data"], method="MAX", kernel=3, stride=2, ceil_mode=False)}


@case("layers/pool_global_ave", exact_blobs=("p",))
def _(d):
    return {"p": L.pooling(d["data"], method="AVE", global_pooling=True)}


@case("layers/pool_pad_clip_ave", exact_blobs=("p",))
def _(d):
    return {"p": L.pooling(d["data"], method="AVE", kernel=2, stride=2, pad=1)}


@case("layers/pool_pad_clip_max", exact_blobs=("p",))
def _(d):
    return {"p": L.pooling(d["data"], method="MAX", kernel=3, stride=2, pad=1)}


@case("layers/pool_rect_ave", exact_blobs=("p",))
def _(d):
    p = L.pooling(d["data"], method="AVE", kernel=(3, 2), stride=(2, 3), pad=(1, 0))
    return {"p": p}


@case("layers/relu_leaky", exact_blobs=("r",))
def _(d):
    return {"r": L.relu(d["data"], negative_slope=0.1)}


@case("layers/softmax_4d")
def _(d):
    return {"s": L.softmax(d["data"])}


# ---- zoo/ ----------------------------------------------------------------------------------


@case("zoo/activations", exact_blobs=("abs",))
def _(d):
    x = d["data"]
    return {
        "sig": L.sigmoid(x),
        "tanh": L.tanh(x),
        "abs": L.absval(x),
        "pow": L.power(d["abs"], power=1.5, scale=2.0, shift=0.5),
        "elu": L.elu(x, alpha=0.7),
        "bnll": L.bnll(x),
        "exp": L.exp(x, base=2.0, scale=0.5, shift=0.1),
    }


@case("zoo/batchnorm_scale")
def _(d):
    # BatchNorm then an in-place Scale: the `bn` blob holds the post-Scale value.
    y = L.batch_norm(d["data"], d["param:bn/0"], d["param:bn/1"], d["param:bn/2"], eps=1e-3)
    return {"bn": L.scale(y, d["param:sc/0"], d["param:sc/1"])}


@case("zoo/bias_layer")
def _(d):
    return {"b": L.bias(d["data"], d["param:b/0"])}


@case("zoo/concat_slice_split", exact_blobs=("a", "b", "c", "cat", "cat2"))
def _(d):
    a, b, c = L.slice_blob(d["data"], axis=1, slice_points=(1, 4))
    return {
        "a": a,
        "b": b,
        "c": c,
        "cat": L.concat([c, a], axis=1),
        "cat2": L.concat([b, b], axis=3),
    }


@case("zoo/deconv_bilinear_crop")
def _(d):
    w = L.bilinear_filler((3, 1, 4, 4))
    up = L.deconvolution(d["data"], w, stride=2, group=3)
    return {"up": up, "crop": L.crop(up, d["data"].shape, axis=2, offset=1)}


@case("zoo/deconv_general")
def _(d):
    dc = L.deconvolution(d["data"], d["param:dc/0"], d["param:dc/1"], stride=2, pad=1, group=2)
    return {"dc": dc}


@case("zoo/eltwise_prod_max", exact_blobs=("p", "m"))
def _(d):
    xs = [d["data"], d["data2"]]
    return {"p": L.eltwise(xs, "PROD"), "m": L.eltwise(xs, "MAX")}


@case("zoo/eltwise_sum_coeff")
def _(d):
    return {"e": L.eltwise([d["data"], d["data2"]], "SUM", coeff=(0.5, -2.0))}


@case("zoo/flatten_reshape", exact_blobs=("f", "f2", "r"))
def _(d):
    x = d["data"]
    return {"f": L.flatten(x), "f2": L.flatten(x, axis=2), "r": L.reshape(x, (0, -1, 2))}


@case("zoo/prelu")
def _(d):
    x = d["data"]
    return {
        "pr": L.prelu(x, d["param:pr/0"]),
        "pr2": L.prelu(x, d["param:pr2/0"], channel_shared=True),
    }


@case("zoo/scale_axis_blob")
def _(d):
    return {"sc": L.scale(d["data"], d["s"], axis=1)}


@case("zoo/resnet_block")
def _(d):
    # Chained end to end from `data` with our own intermediate values.
    def p(key):
        return d[f"param:{key}"]

    c1 = L.convolution(d["data"], p("c1/0"), pad=1)
    c1 = L.batch_norm(c1, p("bn1/0"), p("bn1/1"), p("bn1/2"))  # in place on c1
    c1 = L.relu(L.scale(c1, p("s1/0"), p("s1/1")))  # in place on c1
    c2 = L.convolution(c1, p("c2/0"), p("c2/1"), pad=1)
    add = L.relu(L.eltwise([d["data"], c2]))  # in place on add
    gp = L.pooling(add, method="AVE", global_pooling=True)
    fc = L.inner_product(gp, p("fc/0"), p("fc/1"))
    return {"c1": c1, "c2": c2, "add": add, "gp": gp, "fc": fc, "prob": L.softmax(fc)}


@case("zoo/inception_block")
def _(d):
    x = d["data"]

    def conv(name, v, **kw):
        return L.convolution(v, d[f"param:{name}/0"], d[f"param:{name}/1"], **kw)

    b1 = conv("b1", x)
    b3r = conv("b3r", x)
    b3 = conv("b3", b3r, pad=1)
    bp = L.pooling(x, method="MAX", kernel=3, stride=1, pad=1)
    bpp = conv("bpp", bp)
    out = L.concat([b1, b3, bpp])
    pool = L.pooling(out, method="MAX", kernel=3, stride=2)
    return {"b1": b1, "b3r": b3r, "b3": b3, "bp": bp, "bpp": bpp, "out": out, "pool": pool}


@case("zoo/fcn_score_upsample", exact_blobs=("argmax",))
def _(d):
    x = d["data"]
    c = L.relu(L.convolution(x, d["param:c/0"], d["param:c/1"], stride=2, pad=100))
    p = L.pooling(c, method="MAX", kernel=2, stride=2)
    score = L.convolution(p, d["param:score/0"], d["param:score/1"])
    up = L.deconvolution(score, L.bilinear_filler((5, 1, 8, 8)), stride=4, group=5)
    crop = L.crop(up, x.shape, axis=2, offset=19)
    # ArgMax is checked on Caffe's own `crop` so that near-ties cannot flip an index.
    return {
        "c": c,
        "p": p,
        "score": score,
        "up": up,
        "crop": crop,
        "argmax": L.argmax(d["crop"], axis=1),
    }


def _load(net: str):
    return np.load(DATA / f"{net}_blobs.npz")


@pytest.mark.parametrize("net", sorted(CASES))
def test_against_caffe(net):
    fn, exact_blobs = CASES[net]
    d = _load(net)
    ours = fn(d)
    inputs = {"data", "data2", "s"} if net == "zoo/scale_axis_blob" else {"data", "data2"}
    computed = {k for k in d.files if not k.startswith("param:") and "_split_" not in k}
    assert set(ours) == computed - inputs, f"{net}: not every blob is checked"
    for name, value in ours.items():
        if name in exact_blobs:
            exact(value, d[name], f"{net}:{name}")
        else:
            caffe_close(value, d[name], f"{net}:{name}")


def test_every_single_layer_net_has_a_case():
    nets = {f"layers/{p.stem}" for p in (DATA / "layers").glob("*.prototxt")}
    assert nets and nets <= set(CASES), sorted(nets - set(CASES))
    zoo = {f"zoo/{p.stem}" for p in (DATA / "zoo").glob("*.prototxt")}
    assert zoo <= set(CASES), sorted(zoo - set(CASES))


@pytest.mark.parametrize(
    "net, shape",
    [("zoo/deconv_bilinear_crop", (3, 1, 4, 4)), ("zoo/fcn_score_upsample", (5, 1, 8, 8))],
)
def test_bilinear_filler_matches_caffe(net, shape):
    w = L.bilinear_filler(shape)
    assert w.dtype == np.float32
    exact(w, _load(net)["param:up/0"], net)


def test_deconv_with_stored_bilinear_weights():
    d = _load("zoo/deconv_bilinear_crop")
    up = L.deconvolution(d["data"], d["param:up/0"], stride=2, group=3)
    caffe_close(up, d["up"], "up")
    exact(L.crop(d["up"], d["data"], offset=1), d["crop"], "crop of caffe up")


# ============================================================================================
# 2. float64 numpy references, written plainly, on random configurations
# ============================================================================================


def np_conv(x, w, b, stride, pad, dil, group):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    og = o // group
    out = np.zeros((n, o, oh, ow))
    for g in range(group):
        xg = xp[:, g * cg : (g + 1) * cg]
        wg = w[g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh][
                    ..., j * dw : j * dw + sw * (ow - 1) + 1 : sw
                ]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    if b is not None:
        out += b[None, :, None, None]
    return out


def np_deconv(x, w, b, stride, pad, dil, group):
    """Scatter every input pixel through the kernel (Caffe's col2im), then drop `pad`."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    cg = c // group
    fh = sh * (h - 1) + dh * (kh - 1) + 1
    fw = sw * (wd - 1) + dw * (kw - 1) + 1
    full = np.zeros((n, og * group, fh, fw))
    for g in range(group):
        xg = x[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", xg, w[g * cg : (g + 1) * cg, :, i, j])
                full[
                    :,
                    g * og : (g + 1) * og,
                    i * dh : i * dh + sh * (h - 1) + 1 : sh,
                    j * dw : j * dw + sw * (wd - 1) + 1 : sw,
                ] += contrib
    out = full[:, :, ph : fh - ph, pw : fw - pw]
    if b is not None:
        out = out + b[None, :, None, None]
    return out


def np_pool_size(size, k, s, p, ceil_mode, clip):
    out = (math.ceil if ceil_mode else math.floor)((size + 2 * p - k) / s) + 1
    if clip and (out - 1) * s >= size + p:
        out -= 1
    return out


def np_pool(x, method, k, s, p, ceil_mode=True):
    """Caffe's PoolingLayer::Forward_cpu loops, vectorised over N and C only."""
    n, c, h, w = x.shape
    clip = p[0] > 0 or p[1] > 0
    oh = np_pool_size(h, k[0], s[0], p[0], ceil_mode, clip)
    ow = np_pool_size(w, k[1], s[1], p[1], ceil_mode, clip)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s[0] - p[0], j * s[1] - p[1]
            if method == "MAX":
                he, we = min(hs + k[0], h), min(ws + k[1], w)
                hs, ws = max(hs, 0), max(ws, 0)
                acc = np.full((n, c), -FLT_MAX)
                for y in range(hs, he):
                    for xx in range(ws, we):
                        acc = np.maximum(acc, x[:, :, y, xx])
            else:
                he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                acc = np.zeros((n, c))
                for y in range(hs, he):
                    for xx in range(ws, we):
                        acc = acc + x[:, :, y, xx]
                with np.errstate(divide="ignore", invalid="ignore"):
                    acc = acc / size
            out[:, :, i, j] = acc
    return out


def np_lrn_across(x, n, alpha, beta, k):
    c = x.shape[1]
    half = (n - 1) // 2
    out = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - half), min(c, ch + half + 1)
        s = np.sum(x[:, lo:hi] ** 2, axis=1)
        out[:, ch] = x[:, ch] * (k + alpha / n * s) ** (-beta)
    return out


def np_lrn_within(x, n, alpha, beta):
    h, w = x.shape[2:]
    half = (n - 1) // 2
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = x[:, :, max(0, i - half) : i + half + 1, max(0, j - half) : j + half + 1]
            s = np.sum(win**2, axis=(2, 3))
            out[:, :, i, j] = x[:, :, i, j] * (1 + alpha / n**2 * s) ** (-beta)
    return out


def _rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


@st.composite
def conv_configs(draw):
    group = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    size = []
    for kk, dd, pp in zip(k, d, p, strict=True):
        extent = dd * (kk - 1) + 1
        size.append(draw(st.integers(max(1, extent - 2 * pp), extent + 6)))
    n = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n, group, cg, og, tuple(size), k, s, d, p, bias, seed


@HYP
@given(conv_configs())
def test_convolution_vs_numpy(cfg):
    n, group, cg, og, size, k, s, d, p, has_bias, seed = cfg
    rng = np.random.default_rng(seed)
    x = _rand(rng, (n, cg * group) + size)
    w = _rand(rng, (og * group, cg) + k)
    b = _rand(rng, (og * group,)) if has_bias else None
    ours = L.convolution(x, w, b, stride=s, pad=p, dilation=d, group=group)
    ref = np_conv(x.astype(np.float64), w.astype(np.float64), b, s, p, d, group)
    close64(ours, ref)


def np_conv_caffe(x, w, b, s, p, d, group):
    """Caffe's forward as written in conv_layer.cpp + im2col_cpu, in float64: the output size
    uses C's truncating division, and every input read outside [0, size) is a zero."""
    def out(size, k, ss, pp, dd):
        num = size + 2 * pp - (dd * (k - 1) + 1)
        return (num // ss if num >= 0 else -(-num // ss)) + 1

    n, _, hh, ww = x.shape
    o, cg, kh, kw = w.shape
    og = o // group
    ho, wo = out(hh, kh, s[0], p[0], d[0]), out(ww, kw, s[1], p[1], d[1])
    y = np.zeros((n, o, ho, wo))
    for g in range(group):
        for oy in range(ho):
            for ox in range(wo):
                for i in range(kh):
                    for j in range(kw):
                        iy, ix = oy * s[0] - p[0] + i * d[0], ox * s[1] - p[1] + j * d[1]
                        if 0 <= iy < hh and 0 <= ix < ww:
                            wg = w[g * og:(g + 1) * og, :, i, j]
                            y[:, g * og:(g + 1) * og, oy, ox] += (
                                x[:, g * cg:(g + 1) * cg, iy, ix] @ wg.T)
    return y if b is None else y + np.asarray(b, np.float64).reshape(1, -1, 1, 1)


@st.composite
def overhanging_conv_configs(draw):
    """Sizes down to one past ``extent - 2 pad - stride``: the last window may hang past the
    padded input by up to ``stride - 1``, where Caffe's C division still makes a cell."""
    group = draw(st.integers(1, 2))
    cg, og = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = tuple(draw(st.integers(max(1, dd * (kk - 1) + 1 - 2 * pp - ss + 1),
                                  dd * (kk - 1) + 1 + 5))
                 for kk, ss, dd, pp in zip(k, s, d, p, strict=True))
    return group, cg, og, size, k, s, d, p, draw(st.integers(0, 2**16))


@HYP
@given(overhanging_conv_configs())
def test_convolution_sizes_and_overhang_as_caffe(cfg):
    group, cg, og, size, k, s, d, p, seed = cfg
    rng = np.random.default_rng(seed)
    x = _rand(rng, (2, cg * group) + size)
    w = _rand(rng, (og * group, cg) + k)
    b = _rand(rng, (og * group,))
    ref = np_conv_caffe(x.astype(np.float64), w.astype(np.float64), b, s, p, d, group)
    close64(L.convolution(x, w, b, stride=s, pad=p, dilation=d, group=group), ref)


def test_convolution_with_an_empty_output_is_refused():
    x = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="empty output"):
        L.convolution(x, np.zeros((1, 1, 5, 5), np.float32))  # (3 - 5) / 1 + 1 = -1


@HYP
@given(conv_configs())
def test_deconvolution_vs_numpy(cfg):
    n, group, cg, og, size, k, s, d, p, has_bias, seed = cfg
    size = tuple(max(1, v // 2) for v in size)  # deconv input is the small side
    full = [st_ * (v - 1) + dd * (kk - 1) + 1 for st_, v, dd, kk in zip(s, size, d, k, strict=True)]
    p = tuple(min(pp, (f - 1) // 2) for pp, f in zip(p, full, strict=True))  # keep output >= 1
    rng = np.random.default_rng(seed)
    x = _rand(rng, (n, cg * group) + size)
    w = _rand(rng, (cg * group, og) + k)
    b = _rand(rng, (og * group,)) if has_bias else None
    fn = functools.partial(L.deconvolution, stride=s, pad=p, dilation=d, group=group)
    ours = jax.jit(fn)(x, w, b)
    ref = np_deconv(x.astype(np.float64), w.astype(np.float64), b, s, p, d, group)
    close64(ours, ref)


def test_one_dimensional_conv_and_deconv():
    """The (de)convolutions take their spatial rank from the weight: 1-D equals 2-D with H=1."""
    rng = np.random.default_rng(5)
    x, w, b = _rand(rng, (2, 4, 1, 9)), _rand(rng, (6, 2, 1, 3)), _rand(rng, (6,))
    ref = np_conv(x.astype(np.float64), w.astype(np.float64), b, (1, 2), (0, 1), (1, 2), 2)
    close64(
        L.convolution(x[:, :, 0], w[:, :, 0], b, stride=2, pad=1, dilation=2, group=2), ref[:, :, 0]
    )
    wd = _rand(rng, (4, 3, 1, 5))
    ref = np_deconv(x.astype(np.float64), wd.astype(np.float64), b, (1, 3), (0, 2), (1, 2), 2)
    ours = L.deconvolution(x[:, :, 0], wd[:, :, 0], b, stride=3, pad=2, dilation=2, group=2)
    close64(ours, ref[:, :, 0])


@st.composite
def pool_configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    p = (draw(st.integers(0, k[0] - 1)), draw(st.integers(0, k[1] - 1)))  # Caffe: pad < kernel
    size = tuple(draw(st.integers(max(1, kk - 2 * pp), 11)) for kk, pp in zip(k, p, strict=True))
    method = draw(st.sampled_from(["MAX", "AVE"]))
    ceil_mode = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return method, size, k, s, p, ceil_mode, seed


@HYP
@given(pool_configs())
def test_pooling_vs_numpy(cfg):
    method, size, k, s, p, ceil_mode, seed = cfg
    x = _rand(np.random.default_rng(seed), (2, 3) + size)
    fn = functools.partial(L.pooling, method=method, kernel=k, stride=s, pad=p, ceil_mode=ceil_mode)
    ours = np.asarray(jax.jit(fn)(x))
    ref = np_pool(x.astype(np.float64), method, k, s, p, ceil_mode)
    if method == "MAX":  # a maximum of float32 values is exact
        exact(ours, ref.astype(np.float32))
    else:
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@HYP
@given(
    st.integers(1, 9),
    st.sampled_from([1, 3, 5, 7]),
    st.floats(1e-4, 2.0),
    st.floats(0.25, 1.0),
    st.floats(0.5, 3.0),
    st.integers(0, 2**16),
)
def test_lrn_across_vs_numpy(c, n, alpha, beta, k, seed):
    x = _rand(np.random.default_rng(seed), (2, c, 3, 4))
    ours = L.lrn(x, local_size=n, alpha=alpha, beta=beta, k=k)
    close64(ours, np_lrn_across(x.astype(np.float64), n, alpha, beta, k))


@HYP
@given(
    st.integers(1, 7),
    st.integers(1, 7),
    st.sampled_from([1, 3, 5]),
    st.floats(1e-4, 2.0),
    st.floats(0.25, 1.0),
    st.integers(0, 2**16),
)
def test_lrn_within_vs_numpy(h, w, n, alpha, beta, seed):
    x = _rand(np.random.default_rng(seed), (2, 3, h, w))
    fn = functools.partial(
        L.lrn, local_size=n, alpha=alpha, beta=beta, k=5.0, norm_region="WITHIN_CHANNEL"
    )
    ours = jax.jit(fn)(x)
    close64(ours, np_lrn_within(x.astype(np.float64), n, alpha, beta))


@HYP
@given(
    st.lists(st.integers(1, 4), min_size=2, max_size=5),
    st.data(),
    st.booleans(),
    st.integers(1, 5),
    st.integers(0, 2**16),
)
def test_inner_product_vs_numpy(shape, data, transpose, n_out, seed):
    axis = data.draw(st.integers(-len(shape) + 1, len(shape) - 1))
    ax = axis % len(shape)
    k = math.prod(shape[ax:])
    rng = np.random.default_rng(seed)
    x = _rand(rng, tuple(shape))
    w = _rand(rng, (k, n_out) if transpose else (n_out, k))
    b = _rand(rng, (n_out,))
    ours = L.inner_product(x, w, b, axis=axis, transpose=transpose)
    x2 = x.astype(np.float64).reshape(math.prod(shape[:ax]), k)
    w64 = w.astype(np.float64)
    ref = (x2 @ (w64 if transpose else w64.T) + b).reshape(tuple(shape[:ax]) + (n_out,))
    close64(ours, ref)


@HYP
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data(), st.integers(0, 2**16))
def test_softmax_vs_numpy(shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = _rand(np.random.default_rng(seed), tuple(shape)) * 5
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    close64(L.softmax(x, axis=axis), e / e.sum(axis=axis, keepdims=True))


# ============================================================================================
# 3. Caffe semantics spelled out
# ============================================================================================


def test_pooling_output_size():
    assert L.pooling_output_size(14, 3, 2, 0) == 7  # ceil((14-3)/2)+1
    assert L.pooling_output_size(14, 3, 2, 0, ceil_mode=False) == 6
    assert L.pooling_output_size(13, 3, 2, 0) == 6
    # the clip rule: ceil gives 3 windows, the last would start at 6 >= 4 + 1 -> 2
    assert L.pooling_output_size(4, 2, 3, 1) == 2
    assert L.pooling_output_size(4, 2, 3, 1, clip=False) == 3
    assert L.pooling_output_size(4, 2, 3, 1, ceil_mode=False) == 2


def test_pooling_clip_applies_to_both_axes_when_any_pad():
    """Caffe clips the pooled size on H and W if pad_h or pad_w is non-zero."""
    x = _rand(np.random.default_rng(0), (1, 1, 4, 5))
    y = L.pooling(x, method="MAX", kernel=(2, 1), stride=(2, 3), pad=(1, 0))
    assert y.shape == (1, 1, 3, 2)  # W: ceil(4/3)+1 = 3, clipped to 2 since pad_h > 0
    y = L.pooling(x, method="MAX", kernel=(2, 1), stride=(2, 3), pad=(0, 0))
    assert y.shape == (1, 1, 2, 3)  # no pad: no clip, the last W window starts outside


def test_pooling_empty_window_like_caffe():
    """pad 0 and stride > kernel: Caffe's last ceil-mode window holds no cell at all."""
    x = np.arange(1.0, 6.0, dtype=np.float32).reshape(1, 1, 1, 5)
    ymax = np.asarray(L.pooling(x, method="MAX", kernel=(1, 1), stride=(1, 3)))
    exact(ymax, np.array([[[[1.0, 4.0, -FLT_MAX]]]], np.float32))
    yave = np.asarray(L.pooling(x, method="AVE", kernel=(1, 1), stride=(1, 3)))
    exact(yave, np.array([[[[1.0, 4.0, 0.0]]]], np.float32))  # 0 / (5 - 6) = -0.0


def test_ave_pooling_counts_padding_not_overhang():
    x = np.ones((1, 1, 3, 3), np.float32)
    # pad 1, kernel 2, stride 2: windows [-1,1), [1,3): each has 2x2 cells, corner has 1 real
    y = np.asarray(L.pooling(x, method="AVE", kernel=2, stride=2, pad=1))
    exact(y, np.array([[[[0.25, 0.5], [0.5, 1.0]]]], np.float32))
    # no pad, ceil mode: the last window [2, 4) overhangs by one: its divisor is 1, not 2
    y = np.asarray(L.pooling(x, method="AVE", kernel=2, stride=2))
    exact(y, np.ones((1, 1, 2, 2), np.float32))


def test_argmax_ties_and_shapes():
    x = np.array([[1.0, 3.0, 3.0, 2.0]], np.float32)
    exact(L.argmax(x, axis=1), np.array([[2.0]], np.float32))  # ties go to the larger index
    exact(L.argmax(x, axis=1, top_k=3), np.array([[2.0, 1.0, 3.0]], np.float32))
    exact(L.argmax(x, axis=-1, out_max_val=True, top_k=2), np.array([[3.0, 3.0]], np.float32))
    x4 = _rand(np.random.default_rng(1), (2, 3, 4, 5))
    y = np.asarray(L.argmax(x4, top_k=2, out_max_val=True))
    assert y.shape == (2, 2, 2, 1) and y.dtype == np.float32
    flat = x4.reshape(2, -1)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :2]
    exact(y[:, 0, :, 0], order.astype(np.float32))
    exact(y[:, 1, :, 0], np.take_along_axis(flat, order, axis=1))
    assert L.argmax(x).shape == (1, 1, 1)
    assert L.argmax(x4, axis=1, top_k=2).shape == (2, 2, 4, 5)


def test_dropout_train_and_test():
    x = np.ones((64, 64), np.float32)
    exact(L.dropout(x, 0.3), x)
    y = np.asarray(L.dropout(x, 0.25, deterministic=False, rng=jax.random.key(0)))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.03
    with pytest.raises(ValueError):
        L.dropout(x, 0.5, deterministic=False)


def test_batch_norm_factor_and_batch_stats():
    rng = np.random.default_rng(2)
    x = _rand(rng, (3, 4, 2, 5))
    mean, var = _rand(rng, (4,)), np.abs(_rand(rng, (4,))) + 0.5
    y = L.batch_norm(x, mean * 4, var * 4, np.array([4.0], np.float32), eps=1e-3)
    ref = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3)
    close64(y, ref.astype(np.float64))
    # factor 0: Caffe uses scale 0, i.e. mean 0 and variance 0
    y0 = L.batch_norm(x, mean, var, np.zeros(1, np.float32))
    close64(y0, x.astype(np.float64) / np.sqrt(1e-5))
    yb = L.batch_norm(x, mean, var, np.ones(1, np.float32), use_global_stats=False)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=(0, 2, 3), keepdims=True)
    close64(yb, (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(axis=(0, 2, 3), keepdims=True) + 1e-5))


def test_scale_bias_broadcasting():
    rng = np.random.default_rng(3)
    x = _rand(rng, (2, 3, 4, 5))
    s, b = _rand(rng, (4, 5)), _rand(rng, (4, 5))
    exact(L.scale(x, s, b, axis=-2), x * s + b)
    exact(L.scale(x, np.float32(2.0)), x * 2)
    exact(L.scale(x, np.array([2.0], np.float32), axis=0), x * 2)
    exact(L.bias(x, b, axis=2), x + b)
    exact(L.bias(x, s[0], axis=3), x + s[0])


def test_shape_layers():
    x = jnp.arange(120.0).reshape(2, 3, 4, 5)
    assert L.reshape(x, (-1,), axis=1).shape == (2, 60)
    assert L.reshape(x, (1,), axis=-1, num_axes=0).shape == (2, 3, 4, 5, 1)  # Caffe doc example
    assert L.reshape(x, (3, 1), axis=1, num_axes=1).shape == (2, 3, 1, 4, 5)
    assert L.reshape(x, (0, 0, -1)).shape == (2, 3, 20)
    with pytest.raises(ValueError):
        L.reshape(x, (-1, -1))
    assert L.flatten(x, axis=1, end_axis=2).shape == (2, 12, 5)
    parts = L.slice_blob(x, axis=-1, num_tops=5)
    assert [p.shape for p in parts] == [(2, 3, 4, 1)] * 5
    exact(L.concat(parts, axis=-1), np.asarray(x))
    c = L.crop(x, (1, 1, 2, 3), axis=2, offset=(1, 2))
    exact(c, np.asarray(x)[:, :, 1:3, 2:5])
    exact(L.crop(x, (1, 2, 2, 2), axis=1, offset=1), np.asarray(x)[:, 1:3, 1:3, 1:3])
    with pytest.raises(ValueError):
        L.crop(x, (1, 1, 4, 5), offset=1)


def test_elementwise_formulas():
    x = np.linspace(-30, 30, 61, dtype=np.float32)
    x64 = x.astype(np.float64)
    close64(L.bnll(x), np.logaddexp(0, x64))
    close64(L.elu(x, 0.5), np.where(x64 > 0, x64, 0.5 * np.expm1(x64)))
    close64(L.exp(x / 10, base=3.0, scale=0.5, shift=-1.0), 3.0 ** (-1.0 + 0.5 * x64 / 10))
    close64(L.exp(x / 10), np.exp(x64 / 10))
    pos = np.abs(x) + 1
    close64(L.log(pos, base=10.0, scale=2.0, shift=1.0), np.log10(1 + 2 * pos.astype(np.float64)))
    close64(L.log(pos), np.log(pos.astype(np.float64)))
    close64(L.power(x, power=2.0, scale=-0.5, shift=1.0), (1 - 0.5 * x64) ** 2)
    close64(L.power(pos, power=-0.75), pos.astype(np.float64) ** -0.75)
    exact(L.power(x, power=0.0, scale=3.0), np.ones_like(x))
    exact(L.power(x, power=2.0, scale=0.0, shift=3.0), np.full_like(x, 9.0))
    exact(L.threshold(x, 1.5), (x > 1.5).astype(np.float32))
    close64(L.sigmoid(x), 1 / (1 + np.exp(-x64)))
    exact(L.relu(x), np.maximum(x, 0))
    exact(
        L.prelu(x.reshape(1, 61), np.float32(0.25), channel_shared=True),
        np.where(x > 0, x, 0.25 * x).reshape(1, 61),
    )


def test_eltwise_sum_default_and_errors():
    a, b, c = (np.full((2, 2), v, np.float32) for v in (1.0, 2.0, 4.0))
    exact(L.eltwise([a, b, c]), np.full((2, 2), 7.0, np.float32))
    exact(L.eltwise([a, b, c], "SUM", coeff=(1, -1, 0.5)), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError):
        L.eltwise([a, b], "SUM", coeff=(1.0,))


# ============================================================================================
# 4. everything jit-compiles with the configuration static
# ============================================================================================


def test_jit():
    rng = np.random.default_rng(4)
    x = _rand(rng, (1, 4, 9, 9))
    w = _rand(rng, (6, 2, 3, 3))
    fns = {
        "conv": (lambda v, w: L.convolution(v, w, stride=2, pad=1, group=2), (x, w)),
        "deconv": (
            lambda v, w: L.deconvolution(v, w, stride=2, group=2),
            (x, _rand(rng, (4, 3, 4, 4))),
        ),
        "pool": (lambda v: L.pooling(v, method="AVE", kernel=3, stride=2, pad=1), (x,)),
        "maxpool": (lambda v: L.pooling(v, method="MAX", kernel=3, stride=2), (x,)),
        "lrn": (lambda v: L.lrn(v, local_size=3, alpha=1e-2), (x,)),
        "lrn_within": (lambda v: L.lrn(v, local_size=3, norm_region="WITHIN_CHANNEL"), (x,)),
        "ip": (lambda v, w: L.inner_product(v, w), (x, _rand(rng, (5, 324)))),
        "bn": (
            lambda v, m, s: L.batch_norm(v, m, s, np.ones(1, np.float32)),
            (x, _rand(rng, (4,)), np.ones(4, np.float32)),
        ),
        "argmax": (lambda v: L.argmax(v, axis=1, top_k=2), (x,)),
        "crop": (lambda v: L.crop(v, (1, 4, 5, 5), offset=2), (x,)),
        "softmax": (lambda v: L.softmax(v), (x,)),
    }
    for name, (fn, args) in fns.items():
        eager = np.asarray(fn(*args))
        jitted = np.asarray(jax.jit(fn)(*args))
        caffe_close(jitted, eager, name)
    # a grad through pooling and conv works too
    g = jax.grad(lambda v: L.pooling(L.convolution(v, w, group=2), kernel=2, stride=2).sum())(x)
    assert g.shape == x.shape
