"""fcn_jax.CaffeNet against real Caffe (caffenet_mini) and against load_caffe's params tree."""

from __future__ import annotations

import jax
import numpy as np
from conftest import DATA, caffe_close
from test_net import _full_conv_params

import converters
from fcn_jax import CaffeNet, caffenet_prototxt

D = DATA / "caffenet_mini"
MINI = dict(widths=(24, 64, 96, 96, 64, 256, 256))


def test_classifier_matches_caffe():
    params = converters.load_caffemodel(D / "caffenet_mini.caffemodel")
    ref = np.load(D / "caffenet_mini_classifier_blobs.npz")
    blobs = jax.jit(CaffeNet(**MINI).apply)({"params": params}, ref["data"])
    assert set(blobs) == set(ref.files)
    for name in ref.files:
        caffe_close(blobs[name], ref[name], name)


def test_full_conv_matches_caffe():
    params = _full_conv_params(converters.load_caffemodel(D / "caffenet_mini_v1.caffemodel"))
    ref = np.load(D / "caffenet_mini_full_conv_blobs.npz")
    blobs = jax.jit(CaffeNet(fully_conv=True, **MINI).apply)({"params": params}, ref["data"])
    for name in ref.files:
        # prob: see test_net.test_caffenet_mini_full_conv (Caffe's own error is 3.3e-5)
        caffe_close(blobs[name], ref[name], name, rel=1e-4 if name == "prob" else 1e-5)


def test_same_params_tree_as_load_caffe():
    for fully_conv, shape in ((False, (1, 3, 227, 227)), (True, (1, 3, 451, 451))):
        module = CaffeNet(fully_conv=fully_conv, **MINI)
        ours = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct(shape, np.float32))["params"]
        net = converters.parse_prototxt(caffenet_prototxt(fully_conv=fully_conv, input_shape=shape,
                                                          **MINI))
        graph, _ = converters.load_caffe(net, input_shape=shape)
        from fcn_jax.net import expected_param_shapes
        theirs = expected_param_shapes(graph)
        assert jax.tree_util.tree_map(lambda s: tuple(s.shape), dict(ours)) == theirs


def test_prototxt_matches_reference_structure():
    for fully_conv, ref in ((False, "caffenet_mini_deploy.prototxt"),
                            (True, "caffenet_mini_full_conv.prototxt")):
        shape = (2, 3, 227, 227) if not fully_conv else (1, 3, 451, 451)
        ours = converters.parse_prototxt(caffenet_prototxt(fully_conv=fully_conv,
                                                           input_shape=shape, **MINI))
        theirs = converters.read_prototxt(D / ref)
        assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in ours.layer] == [
            (lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in theirs.layer]
