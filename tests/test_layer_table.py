"""The layer table: user-registered types work like built-in ones; one record per type."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
import fcn_jax
from converters import CaffeFormatError, UnsupportedLayerError, caffe_pb2
from fcn_jax import dense, layer_table, netdef

RNG = np.random.default_rng(0)

GAIN_NET = """
name: "gain_net"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 4 dim: 5 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "gain" type: "ChannelGain" bottom: "conv" top: "gained" }
layer { name: "relu" type: "ReLU" bottom: "gained" top: "gained" }
"""


@pytest.fixture
def channel_gain():
    """The README's example, registered for one test and removed after it."""
    def shapes(layer, bottom_shapes):
        return {"gain": (bottom_shapes[0][1],)}

    @fcn_jax.register_layer("ChannelGain", param_shapes=shapes, pointwise=True)
    def channel_gain(bottoms, params, layer):
        return [bottoms[0] * params["gain"].reshape(1, -1, 1, 1)]

    yield channel_gain
    layer_table.remove_layer_type("ChannelGain")


def _caffemodel(tmp_path, w, b, gain):
    """Written with protobuf directly (independent of our writer): blobs by position."""
    net = caffe_pb2.NetParameter(name="gain_net")
    conv = net.layer.add(name="conv", type="Convolution")
    for a in (w, b):
        blob = conv.blobs.add()
        blob.shape.dim.extend(a.shape)
        blob.data.extend(a.ravel().tolist())
    g = net.layer.add(name="gain", type="ChannelGain").blobs.add()
    g.shape.dim.append(gain.size)
    g.data.extend(gain.tolist())
    path = tmp_path / "gain.caffemodel"
    path.write_bytes(net.SerializeToString())
    proto = tmp_path / "gain.prototxt"
    proto.write_text(GAIN_NET)
    return proto, path


def _reference(x, w, b, gain):
    """float64 numpy: valid 3x3 convolution, channel gain, ReLU."""
    n, c, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h - 2, wd - 2))
    for i in range(h - 2):
        for j in range(wd - 2):
            patch = x[:, :, i:i + 3, j:j + 3].astype(np.float64)
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w.astype(np.float64)) + b
    return np.maximum(out * gain.reshape(1, -1, 1, 1), 0), out


def test_registered_layer_works_like_a_builtin(tmp_path, channel_gain):
    x = RNG.standard_normal((2, 4, 5, 6)).astype(np.float32)
    w = RNG.standard_normal((3, 4, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(3).astype(np.float32)
    gain = np.array([0.5, -2.0, 3.0], np.float32)
    proto, model = _caffemodel(tmp_path, w, b, gain)
    module, params = converters.load_caffe(proto, model)
    np.testing.assert_array_equal(params["gain"]["gain"], gain)
    want, conv = _reference(x, w, b, gain)
    blobs = jax.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(blobs["gained"], want, rtol=1e-5, atol=1e-5)
    # grad flows into the registered layer's params
    g = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x)["gained"]))(params)
    np.testing.assert_allclose(g["gain"]["gain"],
                               np.where(want > 0, conv, 0).sum(axis=(0, 2, 3)), rtol=1e-4)
    # filled from the prototxt without a caffemodel (constant 0 by default)
    _, fresh = converters.load_caffe(proto)
    assert fresh["gain"]["gain"].shape == (3,) and not fresh["gain"]["gain"].any()
    # shapes and receptive fields go through the record
    shapes = netdef.blob_shapes(str(proto))
    assert shapes["gained"] == (2, 3, 3, 4)
    rf = dense.receptive_field(str(proto), "gained")
    assert rf.size == (3, 3) and rf.stride == (1, 1)
    # and it round-trips through our writer (one blob: its name is unambiguous)
    out = tmp_path / "again.caffemodel"
    converters.save_caffemodel(out, params, converters.read_prototxt(proto))
    _, again = converters.load_caffe(proto, out)
    np.testing.assert_array_equal(again["gain"]["gain"], gain)


def test_registered_layer_in_the_cli(tmp_path, channel_gain, capsys):
    from fcn_jax.cli import main

    x = RNG.standard_normal((2, 4, 5, 6)).astype(np.float32)
    w = RNG.standard_normal((3, 4, 3, 3)).astype(np.float32)
    proto, model = _caffemodel(tmp_path, w, np.zeros(3, np.float32),
                               np.ones(3, np.float32))
    assert main(["info", str(proto)]) == 0
    assert "gain (3,)" in capsys.readouterr().out  # its params, by the record
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(proto), str(model), "--input", str(tmp_path / "x.npy"),
                 "--blobs", str(tmp_path / "out.npz")]) == 0
    want, _ = _reference(x, w, np.zeros(3), np.ones(3))
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["gained"], want, rtol=1e-5,
                               atol=1e-5)


def test_unsupported_type_names_the_ways_forward():
    net = converters.parse_prototxt(GAIN_NET)
    with pytest.raises(UnsupportedLayerError, match="layer 'gain'.*outputs=.*register_layer"):
        converters.load_caffe(net)


def test_outputs_builds_only_what_the_blobs_need():
    """An unsupported head is never read when the outputs do not need it (forward(end=))."""
    net = converters.parse_prototxt(GAIN_NET)
    module, params = converters.load_caffe(net, outputs=["conv"])
    assert [s.name for s in module.layers] == ["data", "conv"]
    x = RNG.standard_normal((2, 4, 5, 6)).astype(np.float32)
    assert module.apply({"params": params}, x)["conv"].shape == (2, 3, 3, 4)
    with pytest.raises(CaffeFormatError, match="outputs.*no blob named 'nope'"):
        converters.load_caffe(net, outputs=["nope"])


def test_start_from_an_intermediate_blob():
    """forward(start=...): given pool1, the layers up to it are skipped; the rest equals
    the full forward."""
    net = converters.parse_prototxt(fcn_jax.caffenet_prototxt(
        widths=(4, 8, 8, 8, 8, 8, 8), num_classes=5, input_shape=(1, 3, 99, 99)))
    module, params = converters.load_caffe(net)
    x = RNG.standard_normal((1, 3, 99, 99)).astype(np.float32)
    full = module.apply({"params": params}, x)
    part = module.apply({"params": params}, {"pool2": full["pool2"]})
    assert "conv1" not in part and "conv2" not in part
    for name in ("norm2", "conv5", "fc8", "prob"):
        np.testing.assert_array_equal(part[name], full[name])
    with pytest.raises(CaffeFormatError, match="no blob named 'nope'"):
        module.apply({"params": params}, {"nope": x})


def test_bottom_and_top_counts_come_from_the_record():
    net = converters.parse_prototxt("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
        layer { name: "sum" type: "Eltwise" bottom: "data" top: "s" }""")
    with pytest.raises(CaffeFormatError, match="layer 'sum'.*at least 2 bottom"):
        converters.load_caffe(net)


def test_builtin_records_are_complete():
    """Every built-in type has a forward; its blob names are the format's names."""
    for name in layer_table.supported_types():
        rec = layer_table.layer_type(name)
        assert rec.builtin and (rec.is_input or rec.forward is not None), name
    # the format's blob names (converters.PARAM_NAMES, JAX-free) are the records' names
    params = {"Convolution": "convolution_param { num_output: 2 kernel_size: 1 }",
              "Deconvolution": "convolution_param { num_output: 2 kernel_size: 1 }",
              "ConvolutionDepthwise": "convolution_param { num_output: 3 kernel_size: 1 }",
              "InnerProduct": "inner_product_param { num_output: 2 }",
              "Scale": "scale_param { bias_term: true }", "Bias": "", "BatchNorm": "",
              "PReLU": "", "Normalize": ""}
    for kind, names in converters.PARAM_NAMES.items():
        if kind not in layer_table.supported_types():
            continue  # Embed: a format name only
        spec = layer_table.spec_of(converters.parse_prototxt(
            f'layer {{ name: "l" type: "{kind}" bottom: "x" top: "y" {params[kind]} }}'
        ).layer[0])
        assert tuple(layer_table.param_shapes(spec, [(1, 3, 4, 4)])) == names, kind
    with pytest.raises(ValueError, match="already registered"):
        fcn_jax.register_layer("ReLU")(lambda b, p, layer: b)


def test_layer_order_is_linear_in_the_net_size():
    """A long chain listed in reverse orders correctly (the order is found in one pass)."""
    n = layer_table.MAX_LAYERS - 1
    lines = ['layer { name: "data" type: "Input" top: "b0" '
             'input_param { shape { dim: 1 dim: 1 } } }']
    lines += [f'layer {{ name: "r{i}" type: "ReLU" bottom: "b{i}" top: "b{i + 1}" }}'
              for i in reversed(range(n))]
    layers = layer_table.compile_net(converters.parse_prototxt("\n".join(lines)))
    assert [s.name for s in layers[1:]] == [f"r{i}" for i in range(n)]


# ----------------------------------------------------------------------------- hostile params


def _one_layer(layer: str, shape=(1, 3, 8, 8)) -> object:
    dims = " ".join(f"dim: {d}" for d in shape)
    return converters.parse_prototxt(
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}'
        + layer)


HUGE_STRIDE = ('layer { name: "pool" type: "Pooling" bottom: "data" top: "p" '
               'pooling_param { pool: MAX kernel_size: 3 stride: 2147483648 } }')


def test_pooling_padding_beyond_the_budget_is_refused_before_xla(tmp_path):
    """A stride of 2^31 pads the input to 2^31 cells per side: refused with the layer named,
    in a subprocess so that an abort would show as a failure, not kill the test run."""
    import subprocess
    import sys

    proto = tmp_path / "p.prototxt"
    proto.write_text(converters.format_prototxt(_one_layer(HUGE_STRIDE.replace(
        "2147483648", "65536"))))
    code = ("import sys, converters\n"
            f"try:\n    converters.load_caffe({str(proto)!r})\n"
            "except converters.CaffeFormatError as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "layer 'pool'" in r.stdout and "memory budget" in r.stdout


@pytest.mark.parametrize("layer, ops_max", [
    ('layer { name: "n" type: "LRN" bottom: "data" top: "n" lrn_param { local_size: 200001 } }',
     100),
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
     'pooling_param { pool: AVE kernel_size: 200 stride: 1 pad: 10 } }', 100),
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
     'convolution_param { num_output: 30000 group: 30000 kernel_size: 1 } }', 100),
])
def test_graph_size_does_not_grow_with_a_config_number(layer, ops_max):
    shape = ((1, 30000, 4, 4) if "group" in layer else (1, 3, 210, 210) if "Pooling" in layer
             else (1, 3, 8, 8))
    module, params = converters.load_caffe(_one_layer(layer, shape))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x))(params, x)
    assert len(jaxpr.eqns) < ops_max


@pytest.mark.parametrize("case", ["lrn", "pool_max", "pool_ave", "group"])
def test_one_op_formulations_match_the_reference(case):
    """Past the slice thresholds (wide LRN, big pooling windows, many groups) the fast forms
    switch formulation; they still equal the Caffe-exact NCHW reference."""
    from fcn_jax import layers as L

    if case == "lrn":
        layer = ('layer { name: "l" type: "LRN" bottom: "data" top: "l" '
                 'lrn_param { local_size: 67 alpha: 0.5 } }')
        shape = (2, 80, 5, 5)
    elif case.startswith("pool"):
        pool = "MAX" if case == "pool_max" else "AVE"
        layer = (f'layer {{ name: "l" type: "Pooling" bottom: "data" top: "l" pooling_param '
                 f'{{ pool: {pool} kernel_size: 9 stride: 3 pad: 2 }} }}')
        shape = (2, 3, 23, 20)
    else:
        layer = ('layer { name: "l" type: "Convolution" bottom: "data" top: "l" '
                 'convolution_param { num_output: 24 group: 12 kernel_size: 3 pad: 1 '
                 'weight_filler { type: "gaussian" std: 1 } } }')
        shape = (2, 12, 9, 7)
    module, params = converters.load_caffe(_one_layer(layer, shape))
    x = RNG.standard_normal(shape).astype(np.float32)
    fast = module.apply({"params": params}, x)["l"]
    ref = {"lrn": lambda: L.lrn(x, local_size=67, alpha=0.5),
           "pool_max": lambda: L.pooling(x, method="MAX", kernel=9, stride=3, pad=2),
           "pool_ave": lambda: L.pooling(x, method="AVE", kernel=9, stride=3, pad=2),
           "group": lambda: L.convolution(x, params["l"]["weight"], params["l"]["bias"],
                                          pad=1, group=12)}[case]()
    if case == "pool_max":
        np.testing.assert_array_equal(fast, ref)
    else:
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("layer, shape, match", [
    ('layer { name: "n" type: "LRN" bottom: "data" top: "n" }', (2, 5), "layer 'n'.*4-D"),
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
     'pooling_param { kernel_size: 2 } }', (2, 5), "layer 'p'.*4-D"),
    ('layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
     'reshape_param { shape { dim: -1 } num_axes: -5 } }', (2, 5), "layer 'r'.*num_axes"),
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
     'convolution_param { num_output: 2 kernel_size: 1 dilation: 1 dilation: 1 dilation: 1 }}',
     (1, 3, 4, 4), "layer 'c'.*dilation"),
])
def test_nets_caffe_rejects_are_refused(layer, shape, match):
    with pytest.raises(CaffeFormatError, match=match):
        module, params = converters.load_caffe(_one_layer(layer, shape))
        module.apply({"params": params}, np.zeros(shape, np.float32))
