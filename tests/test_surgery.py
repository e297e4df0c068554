"""fcn_jax.surgery: the tutorial's designer filters against real Caffe, every transform
against float64 numpy or a property, and purity (inputs untouched)."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
from conftest import DATA, caffe_close

import converters
from converters import CaffeFormatError
from fcn_jax import layers as L
from fcn_jax import surgery as S

T = np.load(DATA / "tutorial" / "tutorial_designer_filters.npz")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tree_equal(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.asarray(x).dtype == np.asarray(y).dtype
                            and np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(la, lb, strict=True))


# ----------------------------------------------------------------------------- tutorial


@pytest.fixture(scope="module")
def conv_net():
    module, _ = converters.load_caffe(DATA / "source" / "conv.prototxt",
                                      input_shape=(1, 1, 360, 480))
    x = T["image_gray"][None, None]
    fwd = jax.jit(lambda p: module.apply({"params": p}, x)["conv"][..., ::5, ::5])
    return fwd


def test_designer_filters_reproduce_caffe(conv_net):
    """random filter -> bias[0] = 1 -> Gaussian + Sobel, each output against real Caffe."""
    p = {"conv": {"weight": T["random_weight"], "bias": np.zeros(3, np.float32)}}
    caffe_close(conv_net(p), T["random_conv_s5"], "random_conv")
    p = S.set_bias(p, "conv", 0, 1.0)
    caffe_close(conv_net(p), T["bias1_conv_s5"], "bias1_conv")
    ksize = p["conv"]["weight"].shape[2:]
    p = S.set_filter(p, "conv", 0, S.gaussian_kernel(ksize, 1.0))
    p = S.set_filter(p, "conv", 1, S.sobel_y(), channel=0)
    p = S.set_filter(p, "conv", 2, S.sobel_x(), channel=0)
    np.testing.assert_array_equal(np.asarray(p["conv"]["weight"]), T["designer_weight"])
    np.testing.assert_array_equal(np.asarray(p["conv"]["bias"]), T["designer_bias"])
    caffe_close(conv_net(p), T["designer_conv_s5"], "designer_conv")


def test_gaussian_kernel_rule():
    g = S.gaussian_kernel(5)
    assert g.dtype == np.float32 and g.shape == (5, 5)
    assert abs(float(g.sum(dtype=np.float64)) - 1) < 1e-6
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_array_equal(g, g[::-1, ::-1])
    assert g.argmax() == 12
    # float64 formula written out, sigma 2
    y, x = np.meshgrid(np.arange(-2, 3), np.arange(-2, 3), indexing="ij")
    ref = np.exp(-(x ** 2 + y ** 2) / 8.0)
    np.testing.assert_allclose(S.gaussian_kernel(5, 2.0), ref / ref.sum(), rtol=1e-6)
    # even sizes follow the tutorial's mgrid: offsets -1..2, peak one past the middle
    g4 = S.gaussian_kernel((4, 3))
    assert g4.shape == (4, 3) and np.unravel_index(g4.argmax(), g4.shape) == (1, 1)
    with pytest.raises(ValueError):
        S.gaussian_kernel(0)


def test_sobel_filters_are_derivatives():
    ramp_y = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 5), np.float32)
    # correlation (Caffe's convolution) of a ramp along y: 8 per unit of slope
    def corr(img, k):
        return float((img[1:4, 1:4] * k).sum())
    assert corr(ramp_y, S.sobel_y()) == 8.0 and corr(ramp_y, S.sobel_x()) == 0.0
    assert corr(ramp_y.T, S.sobel_x()) == 8.0 and corr(ramp_y.T, S.sobel_y()) == 0.0


# ----------------------------------------------------------------------------- small edits


def test_set_filter_centres_and_channels():
    w = _rng().normal(size=(4, 3, 5, 5)).astype(np.float32)
    p = {"c": {"weight": w, "bias": np.zeros(4, np.float32)}}
    k = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = np.asarray(S.set_filter(p, "c", 2, k, channel=1)["c"]["weight"])
    exp = w.copy()
    exp[2, 1] = 0
    exp[2, 1, 1:4, 1:4] = k
    np.testing.assert_array_equal(out, exp)
    out = np.asarray(S.set_filter(p, "c", -1, k)["c"]["weight"])
    assert np.array_equal(out[:3], w[:3]) and all(np.array_equal(out[3, c, 1:4, 1:4], k)
                                                  for c in range(3))
    k3 = _rng(1).normal(size=(3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(S.set_filter(p, "c", 0, k3)["c"]["weight"][0]), k3)
    with pytest.raises(ValueError, match="centred"):
        S.set_filter(p, "c", 0, np.ones((2, 2)))
    with pytest.raises(IndexError):
        S.set_filter(p, "c", 4, k)
    with pytest.raises(KeyError, match="no blob"):
        S.set_filter(p, "c", 0, k, blob="w")
    with pytest.raises(KeyError, match="'d'"):
        S.set_bias(p, "d", 0, 1.0)


def test_set_bias_and_map_params():
    p = {"a": {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)},
         "b": {"weight": np.ones((4,), np.float32)}}
    np.testing.assert_array_equal(np.asarray(S.set_bias(p, "a", None, 3.0)["a"]["bias"]), [3, 3])
    np.testing.assert_array_equal(np.asarray(S.set_bias(p, "a", 1, -1.0)["a"]["bias"]), [0, -1])
    seen = []
    out = S.map_params(p, lambda w: w * 0.5,
                       lambda path: seen.append(path) or path[1] == "weight")
    assert sorted(seen) == [("a", "bias"), ("a", "weight"), ("b", "weight")]
    np.testing.assert_array_equal(out["a"]["weight"], 0.5 * np.ones((2, 3)))
    assert out["a"]["bias"] is p["a"]["bias"]
    np.testing.assert_array_equal(S.map_params(p, lambda w: w + 1)["b"]["weight"], 2 * np.ones(4))


# ----------------------------------------------------------------------------- fc -> conv


def _mini_params():
    return converters.load_caffemodel(DATA / "caffenet_mini" / "caffenet_mini.caffemodel")


def test_fc_to_conv_is_the_inner_product_on_pool5():
    """conv(pool5, fc6-conv weight) at a 6x6 input == fc6 (float64 numpy), same memory."""
    params = _mini_params()
    out = S.fc_to_conv(params, DATA / "caffenet_mini" / "caffenet_mini_deploy.prototxt")
    assert list(out) == [k if not k.startswith("fc") else k + "-conv" for k in params]
    assert out["fc6-conv"]["weight"].shape == (256, 64, 6, 6)
    assert out["fc7-conv"]["weight"].shape == (256, 256, 1, 1)
    assert out["fc8-conv"]["weight"].shape == (1000, 256, 1, 1)
    for fc in ("fc6", "fc7", "fc8"):
        assert np.asarray(out[fc + "-conv"]["weight"]).tobytes() == params[fc]["weight"].tobytes()
    pool5 = _rng().normal(size=(2, 64, 6, 6))
    w6 = np.asarray(out["fc6-conv"]["weight"], np.float64)
    conv = np.einsum("nchw,ochw->no", pool5, w6)  # a 6x6 conv on a 6x6 map, float64
    ip = pool5.reshape(2, -1) @ params["fc6"]["weight"].astype(np.float64).T
    np.testing.assert_allclose(conv, ip, rtol=1e-12)


def test_fc_to_conv_transpose_and_errors():
    net = DATA / "layers" / "ip_transpose.prototxt"
    params = converters.load_caffemodel(DATA / "layers" / "ip_transpose.caffemodel")
    (cast,) = converters.fcn.fully_conv_plan(net).casts
    out = S.fc_to_conv(params, net)
    w = np.asarray(out[cast.new_name]["weight"])
    np.testing.assert_array_equal(w.reshape(w.shape[0], -1), params[cast.name]["weight"].T)
    with pytest.raises(CaffeFormatError, match="no InnerProduct"):
        S.fc_to_conv({}, net)
    bad = {cast.name: {"weight": np.zeros((3, 3), np.float32), "bias": np.zeros(3)}}
    with pytest.raises(CaffeFormatError, match="does not fit"):
        S.fc_to_conv(bad, net)


# ----------------------------------------------------------------------------- transplant


def test_transplant_reports_copy_coerce_drop():
    src = {"conv1": {"weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(2)},
           "fc": {"weight": np.arange(12, dtype=np.float32).reshape(3, 4)},
           "odd": {"weight": np.ones(5, np.float32)},
           "gone": {"weight": np.ones(1, np.float32)}}
    dst = {"conv1": {"weight": np.zeros((2, 3), np.float32)},
           "fc-conv": {"weight": np.zeros((3, 4, 1, 1), np.float32)},
           "odd": {"weight": np.zeros(4, np.float32)},
           "new": {"weight": np.full(2, 7, np.float32)}}
    with pytest.warns(UserWarning, match=r"\['odd', 'new'\] received nothing.*\['gone'\]"):
        out, rep = S.transplant(dst, src, rename={"fc": "fc-conv"})
    np.testing.assert_array_equal(out["conv1"]["weight"], src["conv1"]["weight"])
    np.testing.assert_array_equal(np.asarray(out["fc-conv"]["weight"]).ravel(), np.arange(12))
    np.testing.assert_array_equal(out["odd"]["weight"], np.zeros(4))
    np.testing.assert_array_equal(out["new"]["weight"], np.full(2, 7))
    assert rep.copied == (("conv1", "conv1", "weight"),)
    assert rep.coerced == (("fc", "fc-conv", "weight", (3, 4), (3, 4, 1, 1)),)
    assert [(s, b) for s, b, _ in rep.dropped] == [("conv1", "bias"), ("odd", "weight"),
                                                    ("gone", "*")]
    assert rep.untouched == ("odd", "new")
    text = str(rep)
    assert "coercing fc -> fc-conv weight from (3, 4) to (3, 4, 1, 1)" in text
    # FCN's suffix form and a callable rename
    out2, rep2 = S.transplant({"a-x": {"w": np.zeros(2)}}, {"a": {"w": np.ones(2)}}, suffix="-x")
    assert rep2.copied == (("a", "a-x", "w"),)
    out3, _ = S.transplant({"A": {"w": np.zeros(2)}}, {"a": {"w": np.ones(2)}}, rename=str.upper)
    np.testing.assert_array_equal(out3["A"]["w"], np.ones(2))


def test_transplant_into_full_conv_equals_fc_to_conv():
    params = _mini_params()
    net = DATA / "caffenet_mini" / "caffenet_mini_deploy.prototxt"
    shapes = {"fc6-conv": (256, 64, 6, 6), "fc7-conv": (256, 256, 1, 1),
              "fc8-conv": (1000, 256, 1, 1)}
    fresh = {k.replace("fc6", "fc6-conv").replace("fc7", "fc7-conv").replace("fc8", "fc8-conv"):
             {n: np.zeros(a.shape if n == "bias" else shapes.get(k + "-conv", a.shape),
                          np.float32) for n, a in v.items()} for k, v in params.items()}
    plan = converters.fcn.fully_conv_plan(net)
    out, rep = S.transplant(fresh, params, rename=plan.renames)
    assert not rep.dropped and not rep.untouched and len(rep.coerced) == 3
    assert _tree_equal(out, S.fc_to_conv(params, net))


def test_transplant_classifier_into_its_fcn_as_the_readme_shows():
    """README: ``new, report = surgery.transplant(dst_params, src_params)`` with the FCN's
    filler params and the classifier's weights. It used to drop fc6..fc8 (all-zero class
    map); the ``-conv`` renames are now implied, giving fc_to_conv's params and Caffe's map."""
    import json
    import warnings

    mini = DATA / "caffenet_mini"
    deploy = mini / "caffenet_mini_deploy.prototxt"
    src = _mini_params()
    module, dst = converters.load_caffe(mini / "caffenet_mini_full_conv.prototxt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to warn about
        new, report = S.transplant(dst, src)
    assert report.renamed == (("fc6", "fc6-conv"), ("fc7", "fc7-conv"), ("fc8", "fc8-conv"))
    assert not report.dropped and not report.untouched
    assert "renaming fc6 -> fc6-conv" in str(report)
    assert _tree_equal(new, S.fc_to_conv(src, deploy))
    x = np.load(mini / "caffenet_mini_full_conv_blobs.npz")["data"]
    prob = np.asarray(jax.jit(module.apply)({"params": new}, x)["prob"][0])
    cmap = prob.argmax(0)
    assert prob.max() > 10 / 1000  # not the flat softmax of all-zero fc weights
    assert cmap.tolist() == json.loads((mini / "caffenet_mini_info.json").read_text())[
        "classification_map"]
    # back from the FCN into the classifier, and the opt-out
    _, clf_fresh = converters.load_caffe(deploy)
    back, rep = S.transplant(clf_fresh, new)
    assert rep.renamed[0] == ("fc6-conv", "fc6") and _tree_equal(back, src)
    with pytest.warns(UserWarning, match=r"received nothing.*\['fc6', 'fc7', 'fc8'\]"):
        _, rep = S.transplant(dst, src, implied_renames=False)
    assert rep.untouched == ("fc6-conv", "fc7-conv", "fc8-conv")


# ----------------------------------------------------------------------------- upsampling


@pytest.mark.parametrize("k", [1, 4, 5, 8, 9, 16, 32, 64])
def test_upsample_filt_is_caffes_bilinear_filler(k):
    """FCN's float64 kernel == Caffe's float32 bilinear filler for the upsampling kernels
    k = 2f - f % 2 (f = ceil(k / 2)). Other sizes differ (k = 3: FCN [.5, 1, .5], Caffe
    [.25, .75, .75]); neither is an upsampling kernel there."""
    caffe = L.bilinear_filler((1, 1, k, k))[0, 0]
    np.testing.assert_allclose(S.upsample_filt(k), caffe, rtol=0, atol=2e-7)
    np.testing.assert_allclose(S.upsample_filt(k), S.upsample_filt(k).T)
    for other in (2, 3, 6, 7):
        assert not np.allclose(S.upsample_filt(other), L.bilinear_filler((1, 1, other, other)))


def test_interp_upsamples_linear_maps_exactly():
    """Deconvolution with interp weights, stride f, kernel 2f - f%2: a linear ramp stays
    linear (slope / f) away from the border, and channels stay separate."""
    f = 4
    k = 2 * f - f % 2
    p = {"up": {"weight": _rng().normal(size=(3, 3, k, k)).astype(np.float32)}}
    out = S.interp(p, ["up"])
    w = np.asarray(out["up"]["weight"])
    for i in range(3):
        for j in range(3):
            expected = S.upsample_filt(k).astype(np.float32) if i == j else 0
            np.testing.assert_array_equal(w[i, j], expected)
    yy, xx = np.meshgrid(np.arange(10.0), np.arange(12.0), indexing="ij")
    x = np.stack([2 * yy + 3 * xx, -xx, np.ones_like(xx)])[None].astype(np.float32)
    y = np.asarray(L.deconvolution(x, w, None, stride=(f, f), pad=(f // 2, f // 2)))
    inner = y[0, :, f:-f, f:-f]
    oy, ox = np.meshgrid(np.arange(y.shape[2]), np.arange(y.shape[3]), indexing="ij")
    # output pixel o sits at input coordinate (o + 0.5)/f - 0.5 (pad f/2)
    cy, cx = (oy + 0.5) / f - 0.5, (ox + 0.5) / f - 0.5
    np.testing.assert_allclose(inner[0], (2 * cy + 3 * cx)[f:-f, f:-f], atol=1e-4)
    np.testing.assert_allclose(inner[1], -cx[f:-f, f:-f], atol=1e-5)
    np.testing.assert_allclose(inner[2], 1.0, atol=1e-6)
    grouped = S.interp({"g": {"weight": np.zeros((3, 1, k, k))}}, ["g"])
    assert np.array_equal(np.asarray(grouped["g"]["weight"])[:, 0],
                          np.broadcast_to(S.upsample_filt(k).astype(np.float32), (3, k, k)))
    with pytest.raises(ValueError, match="channels"):
        S.interp({"b": {"weight": np.zeros((3, 2, 4, 4))}}, ["b"])
    with pytest.raises(ValueError, match="square"):
        S.interp({"b": {"weight": np.zeros((3, 3, 4, 2))}}, ["b"])


def test_bilinear_init_matches_caffe_filler_in_reference_net():
    """The zoo's Deconvolution was filled by real Caffe's bilinear filler."""
    z = DATA / "zoo"
    params = converters.load_caffemodel(z / "deconv_bilinear_crop.caffemodel")
    net = converters.read_prototxt(z / "deconv_bilinear_crop.prototxt")
    names = [lp.name for lp in net.layer if lp.type == "Deconvolution"
             and lp.convolution_param.weight_filler.type == "bilinear"]
    assert names
    zeroed = {k: {n: np.zeros_like(a) for n, a in v.items()} for k, v in params.items()}
    out = S.bilinear_init(zeroed, names)
    for n in names:
        np.testing.assert_array_equal(np.asarray(out[n]["weight"]), params[n]["weight"])


def test_expand_score():
    src = {"score": {"weight": _rng().normal(size=(21, 8, 1, 1)).astype(np.float32),
                     "bias": _rng(1).normal(size=21).astype(np.float32)}}
    dst = {"score60": {"weight": np.full((60, 8, 1, 1), 0.5, np.float32),
                       "bias": np.full(60, -1.0, np.float32)}}
    out = S.expand_score(dst, "score60", src, "score")
    w, b = np.asarray(out["score60"]["weight"]), np.asarray(out["score60"]["bias"])
    np.testing.assert_array_equal(w[:21], src["score"]["weight"])
    np.testing.assert_array_equal(w[21:], 0.5)
    np.testing.assert_array_equal(b[:21], src["score"]["bias"])
    np.testing.assert_array_equal(b[21:], -1.0)
    with pytest.raises(ValueError, match="does not fit"):
        S.expand_score(src, "score", dst, "score60")


# ----------------------------------------------------------------------------- BatchNorm


def test_fold_batchnorm_resnet_block_against_caffe():
    z = DATA / "zoo"
    module, params = converters.load_caffe(z / "resnet_block.prototxt",
                                           z / "resnet_block.caffemodel")
    ref = np.load(z / "resnet_block_blobs.npz")
    folded, net = S.fold_batchnorm(params, z / "resnet_block.prototxt")
    assert "bn1" not in folded and "s1" not in folded
    assert [lp.name for lp in net.layer if lp.type in ("BatchNorm", "Scale")] == []
    fmod, fparams = converters.load_caffe(net, folded)
    blobs = jax.jit(fmod.apply)({"params": fparams}, ref["data"])
    for name in ref.files:
        if not name.startswith("param:") and "_split_" not in name:
            caffe_close(blobs[name], ref[name], name)
    # params against the float64 formula (NumPy copies: load_caffe's leaves are jax.Arrays)
    params = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params.items()}
    bn, sc = params["bn1"], params["s1"]
    s = 1 / float(bn["scale_factor"][0])
    g = sc["scale"].astype(np.float64) / np.sqrt(bn["variance"] * s + 1e-5)
    np.testing.assert_allclose(folded["c1"]["weight"], params["c1"]["weight"] * g[:, None, None,
                                                                                None], rtol=1e-6)
    np.testing.assert_allclose(folded["c1"]["bias"], -bn["mean"] * s * g + sc["bias"],
                               rtol=1e-6, atol=1e-7)


RANDOM_BN_NET = """name: "bnnet"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 11 dim: 9 } } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 3 } }
layer { name: "a_bn" type: "BatchNorm" bottom: "a" top: "a_n" batch_norm_param { eps: 0.001 } }
layer { name: "a_sc" type: "Scale" bottom: "a_n" top: "a_s" scale_param { bias_term: false } }
layer { name: "relu" type: "ReLU" bottom: "a_s" top: "a_s" }
layer { name: "b" type: "Convolution" bottom: "a_s" top: "b"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 bias_term: false } }
layer { name: "b_bn" type: "BatchNorm" bottom: "b" top: "b" }
layer { name: "keep" type: "Convolution" bottom: "b" top: "k"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "k_bn" type: "BatchNorm" bottom: "k" top: "k_n" }
layer { name: "sum" type: "Eltwise" bottom: "k" bottom: "k_n" top: "sum" }
layer { name: "fc" type: "InnerProduct" bottom: "sum" top: "fc"
        inner_product_param { num_output: 5 } }
layer { name: "fc_bn" type: "BatchNorm" bottom: "fc" top: "fc" }
layer { name: "fc_sc" type: "Scale" bottom: "fc" top: "fc" scale_param { bias_term: true } }
"""


def _random_bn_params(module, seed):
    rng = _rng(seed)
    params = converters.load_caffe(converters.parse_prototxt(RANDOM_BN_NET))[1]
    out = {}
    for layer, blobs in params.items():
        out[layer] = {}
        for n, a in blobs.items():
            if n == "variance":
                v = rng.uniform(0.5, 3.0, a.shape)
            elif n == "scale_factor":
                v = np.array([0.0 if layer == "b_bn" else rng.uniform(0.5, 4.0)])
            else:
                v = rng.normal(size=a.shape)
            out[layer][n] = v.astype(np.float32)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_fold_batchnorm_random_net_float32_exact(seed):
    """Non-in-place chains, Scale without bias, BatchNorm alone, scale factor 0, an
    InnerProduct, and a conv whose output is also read elsewhere (not folded)."""
    net = converters.parse_prototxt(RANDOM_BN_NET)
    module = converters.load_caffe(net)[0]
    params = _random_bn_params(module, seed)
    pristine = copy.deepcopy(params)
    net_bytes = net.SerializeToString()
    folded, new_net = S.fold_batchnorm(params, net)
    assert _tree_equal(params, pristine) and net.SerializeToString() == net_bytes
    assert sorted(folded) == ["a", "b", "fc", "k_bn", "keep"]
    assert [lp.name for lp in new_net.layer] == ["data", "a", "relu", "b", "keep", "k_bn",
                                                 "sum", "fc"]
    x = _rng(seed + 10).normal(size=(2, 3, 11, 9)).astype(np.float32)
    ref = module.apply({"params": params}, x)
    fmod, fparams = converters.load_caffe(new_net, folded)
    got = fmod.apply({"params": fparams}, x)
    # float32 rounding: a few ulps of the largest value
    for name in ("a_s", "b", "k", "k_n", "sum", "fc"):
        caffe_close(got[name], ref[name], name, rel=2e-6)


# ----------------------------------------------------------------------------- purity


def test_every_transform_leaves_its_input_untouched():
    params = _mini_params()
    small = {"c": {"weight": _rng().normal(size=(3, 3, 4, 4)).astype(np.float32),
                   "bias": np.zeros(3, np.float32)}}
    z = DATA / "zoo"
    bn_params = converters.load_caffemodel(z / "resnet_block.caffemodel")
    net = DATA / "caffenet_mini" / "caffenet_mini_deploy.prototxt"
    cases = [
        (small, lambda p: S.set_filter(p, "c", 0, np.ones((2, 2)), channel=1)),
        (small, lambda p: S.set_filter(p, "c", 1, np.ones((4, 4)))),
        (small, lambda p: S.set_bias(p, "c", 0, 5.0)),
        (small, lambda p: S.map_params(p, lambda w: w * 0)),
        (small, lambda p: S.interp(p, ["c"])),
        (small, lambda p: S.bilinear_init(p, ["c"])),
        (small, lambda p: S.expand_score(p, "c", {"c": {"weight": np.ones((1, 3, 4, 4))}}, "c")),
        (small, lambda p: S.transplant(p, {"c": {"weight": np.ones((3, 3, 4, 4))}})),
        (params, lambda p: S.fc_to_conv(p, net)),
        (params, lambda p: S.transplant({"conv1": {"weight": np.zeros((24, 3, 11, 11))}}, p)),
        (bn_params, lambda p: S.fold_batchnorm(p, z / "resnet_block.prototxt")),
    ]
    for tree, fn in cases:
        before = copy.deepcopy(tree)
        result = fn(tree)
        assert _tree_equal(tree, before)
        new = result[0] if isinstance(result, tuple) else result
        assert new is not tree
    # a transform's output is independent of later edits of the input's containers
    out = S.set_bias(small, "c", 0, 5.0)
    small2 = {k: dict(v) for k, v in small.items()}
    small2["c"]["bias"] = None
    assert out["c"]["bias"] is not None
