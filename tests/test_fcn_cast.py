"""The fully convolutional cast (converters.fcn + `fcn-jax fcn`) against real Caffe's
caffenet_mini_full_conv files and the tutorial's prototxt."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import DATA, caffe_close

import converters
from converters import CaffeFormatError
from converters import fcn as F
from fcn_jax.cli import main
from fcn_jax.surgery import fc_to_conv

D = DATA / "caffenet_mini"
SHARED_MODEL = (Path(__file__).resolve().parents[2] / "shared" / "caffe-reference"
                / "caffenet_mini" / "caffenet_mini_full_conv.caffemodel")


def _all_nets():
    return sorted(p for sub in ("layers", "zoo", "caffenet_mini") for p in
                  (DATA / sub).glob("*.prototxt") if p.with_name(p.stem + "_blobs.npz").exists())


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("path", _all_nets(), ids=lambda p: p.stem)
def test_blob_shapes_match_caffe(path):
    """The pure-Python shape pass gives the shape of every blob real Caffe produced."""
    ref = np.load(path.with_name(path.stem + "_blobs.npz"))
    shapes = F.blob_shapes(path)
    checked = 0
    for name in ref.files:
        if name.startswith("param:") or "_split_" in name:
            continue
        assert shapes[name] == ref[name].shape, name
        checked += 1
    assert checked >= 2


def test_blob_shapes_input_override_and_errors():
    shapes = F.blob_shapes(D / "caffenet_mini_full_conv.prototxt", (1, 3, 259, 291))
    assert shapes["prob"] == (1, 1000, 2, 3)
    with pytest.raises(ValueError, match="no shape known"):
        F.blob_shapes(DATA / "source" / "train_val.prototxt")


# ----------------------------------------------------------------------------- prototxt


def test_prototxt_equals_the_tutorials():
    """deploy.prototxt -> exactly Caffe's bvlc_caffenet_full_conv.prototxt (same message)."""
    ours = F.fully_convolutional_net(DATA / "source" / "deploy.prototxt", (1, 3, 451, 451))
    assert ours == converters.read_prototxt(DATA / "source" / "bvlc_caffenet_full_conv.prototxt")
    mini = F.fully_convolutional_net(D / "caffenet_mini_deploy.prototxt", (1, 3, 451, 451))
    assert mini == converters.read_prototxt(D / "caffenet_mini_full_conv.prototxt")


def test_input_net_untouched_and_default_shape():
    net = converters.read_prototxt(D / "caffenet_mini_deploy.prototxt")
    before = net.SerializeToString()
    out = F.fully_convolutional_net(net)
    assert net.SerializeToString() == before
    assert list(out.layer[0].input_param.shape[0].dim) == [2, 3, 227, 227]
    out = F.fully_convolutional_net(net, (300, 400))
    assert list(out.layer[0].input_param.shape[0].dim) == [2, 3, 300, 400]


def test_global_pooling_and_flatten_cast():
    """A classifier with global pooling -> fixed pooling + 1x1 conv; Flatten is removed."""
    text = """name: "g"
    layer { name: "data" type: "Input" top: "data"
            input_param { shape { dim: 1 dim: 3 dim: 12 dim: 10 } } }
    layer { name: "c" type: "Convolution" bottom: "data" top: "c"
            convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
    layer { name: "gp" type: "Pooling" bottom: "c" top: "gp"
            pooling_param { pool: AVE global_pooling: true } }
    layer { name: "fl" type: "Flatten" bottom: "gp" top: "fl" }
    layer { name: "fc" type: "InnerProduct" bottom: "fl" top: "fc"
            inner_product_param { num_output: 3 } }
    layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2"
            inner_product_param { num_output: 2 } }
    """
    net = converters.parse_prototxt(text)
    plan = F.fully_conv_plan(net)
    assert plan.removed == ("fl",)
    assert plan.pooling_kernels == (("gp", (5, 4)),)
    assert [(c.new_name, c.weight_shape) for c in plan.casts] == [
        ("fc-conv", (3, 4, 1, 1)), ("fc2-conv", (2, 3, 1, 1))]
    out = F.fully_convolutional_net(net, (1, 3, 28, 26))
    assert [lp.name for lp in out.layer] == ["data", "c", "gp", "fc-conv", "fc2-conv"]
    assert list(out.layer[3].bottom) == ["gp"]
    shapes = F.blob_shapes(out)
    assert shapes["fc2-conv"] == (1, 2, 9, 9)
    # at the classifier's size the cast net computes the classifier exactly
    module, params = converters.load_caffe(net, seed=3)
    params = jax.tree_util.tree_map(lambda a: np.random.default_rng(0).normal(
        size=a.shape).astype(np.float32), params)
    x = np.random.default_rng(1).normal(size=(1, 3, 12, 10)).astype(np.float32)
    ref = module.apply({"params": params}, x)["fc2"]
    fmod, fparams = converters.load_caffe(F.fully_convolutional_net(net), fc_to_conv(params, net))
    got = fmod.apply({"params": fparams}, x)["fc2-conv"]
    caffe_close(np.asarray(got).reshape(ref.shape), ref, "fc2")


def test_uncastable_inner_product_names_the_layer():
    with pytest.raises(CaffeFormatError, match="'ip'.*cannot cast"):
        F.fully_conv_plan(DATA / "layers" / "ip_axis2.prototxt")


def test_suffix_empty_keeps_names():
    out = F.fully_convolutional_net(D / "caffenet_mini_deploy.prototxt", suffix="")
    names = [lp.name for lp in out.layer]
    assert "fc6" in names and [lp.type for lp in out.layer if lp.name == "fc6"] == [
        "Convolution"]


# ----------------------------------------------------------------------------- fcn-jax fcn


@pytest.fixture(scope="module")
def full_conv_ref():
    return np.load(D / "caffenet_mini_full_conv_blobs.npz")


@pytest.mark.parametrize("proto,model", [
    ("caffenet_mini_deploy.prototxt", "caffenet_mini.caffemodel"),
    ("caffenet_mini_deploy_v1.prototxt", "caffenet_mini_v1.caffemodel"),
    ("caffenet_mini_deploy.prototxt", "caffenet_mini_v1.caffemodel"),
    ("caffenet_mini_deploy_v1.prototxt", "caffenet_mini.caffemodel"),
])
def test_cli_reproduces_caffe_full_conv(tmp_path, capsys, full_conv_ref, proto, model):
    prefix = tmp_path / "sub" / "mini_fcn"
    rc = main(["fcn", str(D / proto), str(D / model), "-o", str(prefix),
               "--input-size", "451", "451", "--batch", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fc6 -> fc6-conv" in out and "(256, 64, 6, 6)" in out
    module, params = converters.load_caffe(f"{prefix}.prototxt", f"{prefix}.caffemodel")
    blobs = jax.jit(module.apply)({"params": params}, full_conv_ref["data"])
    for name in full_conv_ref.files:
        # prob: Caffe's own float32 prob is 3.3e-5 from the exact answer (tests/test_net.py)
        caffe_close(blobs[name], full_conv_ref[name], name,
                    rel=1e-4 if name == "prob" else 1e-5)
    info = __import__("json").loads((D / "caffenet_mini_info.json").read_text())
    assert np.array_equal(np.asarray(blobs["prob"][0]).argmax(0),
                          np.array(info["classification_map"]))
    written = converters.read_prototxt(f"{prefix}.prototxt")
    ref_net = converters.read_prototxt(D / "caffenet_mini_full_conv.prototxt")
    assert [(lp.type, list(lp.bottom), list(lp.top)) for lp in written.layer] == [
        (lp.type, list(lp.bottom), list(lp.top)) for lp in ref_net.layer]


@pytest.mark.skipif(not SHARED_MODEL.exists(), reason="../shared/caffe-reference not present")
def test_caffemodel_params_bitwise_equal_to_caffes(tmp_path, capsys):
    prefix = tmp_path / "m"
    assert main(["fcn", str(D / "caffenet_mini_deploy_v1.prototxt"),
                 str(D / "caffenet_mini_v1.caffemodel"), "-o", str(prefix)]) == 0
    ours = converters.load_caffemodel(f"{prefix}.caffemodel")
    theirs = converters.load_caffemodel(SHARED_MODEL)
    assert list(ours) == list(theirs)
    for layer in theirs:
        assert list(ours[layer]) == list(theirs[layer])
        for blob in theirs[layer]:
            a, b = ours[layer][blob], theirs[layer][blob]
            assert a.dtype == b.dtype and a.shape == b.shape, (layer, blob)
            assert a.tobytes() == b.tobytes(), (layer, blob)


def test_cli_verify_and_global_pooling(tmp_path, capsys):
    z = DATA / "zoo"
    rc = main(["fcn", str(z / "resnet_block.prototxt"), str(z / "resnet_block.caffemodel"),
               "-o", str(tmp_path / "r"), "--input-size", "20", "24", "--verify"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "global pooling -> 9x9" in out and "verify:" in out and "ok" in out
    assert F.blob_shapes(tmp_path / "r.prototxt")["prob"] == (1, 5, 12, 16)


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = main(["fcn", str(D / "caffenet_mini_deploy.prototxt"),
               str(DATA / "zoo" / "resnet_block.caffemodel"), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "resnet_block.caffemodel" in err
    assert "fc6" in err
    rc = main(["fcn", str(DATA / "layers" / "ip_axis2.prototxt"),
               str(DATA / "layers" / "ip_axis2.caffemodel"), "-o", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "ip_axis2.prototxt" in err and "layer 'ip'" in err
    rc = main(["fcn", str(tmp_path / "missing.prototxt"), "x", "-o", str(tmp_path / "z")])
    assert rc == 2 and "missing.prototxt" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob("y.*"))


def test_global_pooling_behind_in_place_dropout():
    text = """name: "d"
    layer { name: "data" type: "Input" top: "data"
            input_param { shape { dim: 1 dim: 2 dim: 7 dim: 7 } } }
    layer { name: "gp" type: "Pooling" bottom: "data" top: "gp"
            pooling_param { pool: AVE global_pooling: true } }
    layer { name: "drop" type: "Dropout" bottom: "gp" top: "gp" }
    layer { name: "fc" type: "InnerProduct" bottom: "gp" top: "fc"
            inner_product_param { num_output: 3 } }
    """
    plan = F.fully_conv_plan(converters.parse_prototxt(text))
    assert plan.pooling_kernels == (("gp", (7, 7)),)
    out = F.fully_convolutional_net(converters.parse_prototxt(text), (1, 2, 10, 9))
    assert F.blob_shapes(out)["fc-conv"] == (1, 3, 4, 3)


def test_too_small_input_names_the_smallest_and_no_classifier_is_refused(capsys):
    """Issue 20 item 9. CaffeNet's fully convolutional form at 199 px: conv1 (199-11)/4+1 =
    48, pool1 (ceil) 24, pool2 12, pool5 6 = fc6-conv's kernel: one cell; at 198: none."""
    net = converters.read_prototxt(D / "caffenet_mini_deploy.prototxt")
    assert F.blob_shapes(F.fully_convolutional_net(net, (199, 199)))["fc8-conv"][2:] == (1, 1)
    with pytest.raises(CaffeFormatError, match=r"input_shape: input 198x230 is too small for "
                       r"the fully convolutional net \(layer 'fc6-conv' gets no output "
                       r"cell\): its smallest input is 199x199, for one output cell"):
        F.fully_convolutional_net(net, (198, 230))
    full = F.fully_convolutional_net(net, (300, 300))
    from fcn_jax.netdef import minimum_input_size

    assert minimum_input_size(full) == (199, 199)
    with pytest.raises(CaffeFormatError, match="no InnerProduct layer: nothing to cast"):
        F.fully_convolutional_net(full)
    from fcn_jax.cli import main

    assert main(["fcn", str(D / "caffenet_mini_deploy.prototxt"),
                 str(D / "caffenet_mini.caffemodel"), "-o", "/nonexistent/x",
                 "--input-size", "100", "100"]) == 2
    err = capsys.readouterr().err
    assert "input 100x100 is too small" in err and "smallest input is 199x199" in err
