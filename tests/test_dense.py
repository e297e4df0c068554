"""fcn_jax.dense: class maps, the cell -> window mapping, and the fully convolutional
net against the classifier on crops.

The issue's property "FCN cell (i, j) == classifier on the 227 crop at (32 i, 32 j)" is only
exact when no layer pads: CaffeNet's conv2..conv5 pad, so a crop's border sees zeros where
the full image has neighbours. What is tested here is what is true:
(a) exact equality on a CaffeNet-structured net without padding (crop 355, derived);
(b) for the real padded structure, the FCN cell == the classifier's fc head on the FCN's own
    6x6 pool5 window (real Caffe's blobs), which pins down the C,H,W transplant;
(c) the border effect itself is measured in experiments/net_surgery.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, caffe_close

import converters
from converters import fcn as F
from fcn_jax import caffenet_prototxt, dense
from fcn_jax.surgery import fc_to_conv

D = DATA / "caffenet_mini"
NARROW = (16, 32, 48, 48, 32, 64, 64)


# ----------------------------------------------------------------------------- maps


def test_classification_and_probability_maps():
    rng = np.random.default_rng(0)
    prob = rng.random((2, 5, 3, 4)).astype(np.float32)
    cmap = np.asarray(dense.classification_map(prob))
    assert cmap.shape == (2, 3, 4)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                assert cmap[n, i, j] == int(np.argmax(prob[n, :, i, j]))
    np.testing.assert_array_equal(dense.classification_map(prob[1]), cmap[1])
    np.testing.assert_array_equal(dense.class_probability_map(prob, 3), prob[:, 3])
    np.testing.assert_array_equal(dense.class_probability_map(prob[0], -1), prob[0, 4])
    with pytest.raises(IndexError):
        dense.class_probability_map(prob, 5)


# ----------------------------------------------------------------------------- geometry


def test_caffenet_windows():
    rf = dense.receptive_field(DATA / "source" / "bvlc_caffenet_full_conv.prototxt")
    assert rf == dense.ReceptiveField(size=(355, 355), stride=(32, 32), offset=(-64, -64))
    assert rf.window(1, 2) == (-32, 0, 323, 355)
    win = dense.classifier_window(DATA / "source" / "deploy.prototxt")
    assert win == dense.CellWindows(size=(227, 227), stride=(32, 32))
    assert win.window_of(7, 7) == (224, 224, 451, 451)
    assert win.grid((451, 451)) == (8, 8) and win.grid((500, 227)) == (9, 1)
    assert win.grid((226, 600)) == (0, 12)


def _linearised(text: str) -> str:
    """Same geometry, every path monotone: MAX pooling -> AVE (gradients reach every pixel);
    across-channel LRN (pointwise in space) -> ReLU, as fcn_jax.layers.lrn cannot be
    differentiated under jit (reduce_window with a traced init value)."""
    text = re.sub(r'type: "LRN"(\s*bottom: "\w+"\s*top: "\w+")\s*lrn_param \{ local_size: 5 '
                  r'alpha: [\d.]+ beta: [\d.]+ \}', r'type: "ReLU"\1', text)
    return text.replace("pool: MAX", "pool: AVE")


def _grad_box(net, blob: str, cell: tuple[int, int], shape, seed=0):
    """Bounding box of the input pixels with a non-zero gradient of blob[0, :, i, j]."""
    module, params = converters.load_caffe(net, input_shape=shape)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda a: (rng.uniform(0.5, 1.5, a.shape) / max(1, a[0].size)).astype(np.float32),
        params)
    x = rng.uniform(0.5, 1.0, shape).astype(np.float32)

    def f(x):
        return module.apply({"params": params}, x, outputs=(blob,))[blob][
            0, :, cell[0], cell[1]].sum()
    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(x)))
    ys, xs = np.nonzero(np.abs(g).sum(axis=(0, 1)))
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


@pytest.mark.parametrize("cell", [(0, 0), (3, 2), (7, 7)])
def test_receptive_field_is_the_gradient_support(cell):
    """Independent truth: the input pixels a cell depends on (autodiff)."""
    text = _linearised(caffenet_prototxt(fully_conv=True, widths=(4, 8, 8, 8, 8, 8, 8),
                                         num_classes=3, input_shape=(1, 3, 451, 451)))
    net = converters.parse_prototxt(text)
    rf = dense.receptive_field(net, "fc8-conv")
    y0, x0, y1, x1 = rf.window(*cell)
    expected = (max(y0, 0), max(x0, 0), min(y1, 451), min(x1, 451))
    assert _grad_box(net, "fc8-conv", cell, (1, 3, 451, 451)) == expected


@pytest.mark.parametrize("name,blob,cell", [("conv_group4_dil", None, (2, 3)),
                                            ("inception_block", None, (1, 1)),
                                            ("lrn_within", None, (2, 2))])
def test_receptive_field_other_nets(name, blob, cell):
    path = next((DATA / sub / f"{name}.prototxt") for sub in ("layers", "zoo")
                if (DATA / sub / f"{name}.prototxt").exists())
    net = converters.parse_prototxt(_linearised(path.read_text()))
    shapes = F.blob_shapes(net)
    blob = blob or net.layer[-1].top[0]
    rf = dense.receptive_field(net, blob)
    shape = next(iter(F.input_shapes(net).values()))
    y0, x0, y1, x1 = rf.window(*cell)
    expected = (max(y0, 0), max(x0, 0), min(y1, shape[2]), min(x1, shape[3]))
    assert cell[0] < shapes[blob][2] and cell[1] < shapes[blob][3]
    assert _grad_box(net, blob, cell, shape) == expected


def test_crop_helpers():
    win = dense.CellWindows(size=(5, 4), stride=(3, 2))
    x = np.arange(2 * 1 * 11 * 9).reshape(2, 1, 11, 9)
    np.testing.assert_array_equal(dense.crop_cell(x, 1, 2, win), x[..., 3:8, 4:8])
    crops = dense.cell_crops(x, win)
    assert crops.shape == (2, 3, 3, 1, 5, 4)
    np.testing.assert_array_equal(crops[1, 2, 1], x[1, :, 6:11, 2:6])
    with pytest.raises(ValueError, match="outside"):
        dense.crop_cell(x, 3, 0, win)


# ----------------------------------------------------------------------------- (a) no padding


def _pad0_classifier(crop: int) -> str:
    text = caffenet_prototxt(widths=NARROW, num_classes=10, input_shape=(1, 3, crop, crop))
    return re.sub(r" pad: \d+", "", text)


def _random_params(net, seed=0):
    shapes = F.blob_shapes(net)
    del shapes
    _, params = converters.load_caffe(net)
    rng = np.random.default_rng(seed)
    out = {}
    for layer, blobs in params.items():
        w = blobs["weight"]
        fan_in = w[0].size
        out[layer] = {"weight": (rng.normal(size=w.shape) * np.sqrt(2 / fan_in)).astype(
            np.float32), "bias": (rng.normal(size=blobs["bias"].shape) * 0.1).astype(np.float32)}
    return out


def test_pad0_crop_size_is_derived():
    """Without padding, the classifier input whose pool5 is 6x6 is the receptive field."""
    text = caffenet_prototxt(fully_conv=True, widths=NARROW, input_shape=(1, 3, 451, 451))
    fcn = converters.parse_prototxt(re.sub(r" pad: \d+", "", text))  # fc6-conv stays 6x6
    rf = dense.receptive_field(fcn, "fc8-conv")
    assert rf.offset == (0, 0) and rf.stride == (32, 32)
    crop = rf.size[0]
    assert crop == 355
    assert F.blob_shapes(_pad0_net(crop))["pool5"] == (1, 32, 6, 6)
    assert F.blob_shapes(_pad0_net(227))["pool5"] == (1, 32, 2, 2)


def _pad0_net(crop):
    return converters.parse_prototxt(_pad0_classifier(crop))


@pytest.mark.parametrize("hw", [(419, 387), (451, 451), (404, 405)])
def test_pad0_fcn_cell_equals_classifier_on_crop(hw):
    """(a) every cell whose 355 crop lies in the image == the classifier on that crop."""
    clf_net = _pad0_net(355)
    params = _random_params(clf_net)
    fcn_net = F.fully_convolutional_net(clf_net, (1, 3) + hw)
    fmod, fparams = converters.load_caffe(fcn_net, fc_to_conv(params, clf_net))
    x = np.random.default_rng(1).normal(size=(1, 3) + hw).astype(np.float32)
    blobs = jax.jit(fmod.apply)({"params": fparams}, x)
    win = dense.classifier_window(clf_net)
    assert win == dense.CellWindows(size=(355, 355), stride=(32, 32))
    gh, gw = win.grid(hw)
    assert blobs["fc8-conv"].shape[2] >= gh and blobs["fc8-conv"].shape[3] >= gw
    crops = dense.cell_crops(x, win)[0].reshape((gh * gw, 3, 355, 355))
    cmod, cparams = converters.load_caffe(clf_net, params, input_shape=(gh * gw, 3, 355, 355))
    ref = jax.jit(cmod.apply)({"params": cparams}, crops)
    for ours, theirs in (("fc8-conv", "fc8"), ("prob", "prob")):
        cells = np.asarray(blobs[ours][0, :, :gh, :gw]).transpose(1, 2, 0).reshape(gh * gw, -1)
        caffe_close(cells, ref[theirs], theirs)


# ----------------------------------------------------------------------------- (b) padded


def test_padded_fcn_cell_is_fc_head_on_its_pool5_window():
    """(b) real Caffe's fc8-conv at (i, j) == the classifier's fc6..fc8 (float64 numpy) on
    Caffe's own pool5[:, :, i:i+6, j:j+6] flattened C,H,W; and ours equals both."""
    ref = np.load(D / "caffenet_mini_full_conv_blobs.npz")
    params = converters.load_caffemodel(D / "caffenet_mini.caffemodel")
    pool5 = ref["pool5"][0].astype(np.float64)
    gh, gw = ref["fc8-conv"].shape[2:]
    windows = np.stack([pool5[:, i:i + 6, j:j + 6].reshape(-1)
                        for i in range(gh) for j in range(gw)])

    def ip(x, layer):
        return x @ params[layer]["weight"].astype(np.float64).T + params[layer]["bias"]
    head = ip(np.maximum(ip(np.maximum(ip(windows, "fc6"), 0), "fc7"), 0), "fc8")
    head = head.reshape(gh, gw, -1).transpose(2, 0, 1)
    caffe_close(head, ref["fc8-conv"][0], "caffe fc8-conv vs fc head")
    fmod, fparams = converters.load_caffe(F.fully_convolutional_net(
        D / "caffenet_mini_deploy.prototxt", (1, 3, 451, 451)),
        fc_to_conv(params, D / "caffenet_mini_deploy.prototxt"))
    ours = jax.jit(fmod.apply)({"params": fparams}, ref["data"])
    caffe_close(ours["fc8-conv"][0], head, "ours vs fc head")


def test_dense_apply_selects_outputs():
    net = converters.parse_prototxt(caffenet_prototxt(fully_conv=True, widths=NARROW,
                                                      num_classes=10,
                                                      input_shape=(1, 3, 259, 227)))
    module, params = converters.load_caffe(net)
    out = dense.dense_apply(module)(params, np.zeros((1, 3, 259, 227), np.float32))
    assert list(out) == ["prob"] and out["prob"].shape == (1, 10, 2, 1)
