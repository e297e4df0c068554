"""The two shape inferences agree: converters.fcn.blob_shapes (pure Python, used for prototxt
rewrites) and the traced shapes of the JAX module, on every reference net."""

from __future__ import annotations

import jax
import pytest
from conftest import DATA

import converters
from converters.fcn import blob_shapes
from fcn_jax.net import example_inputs

NETS = sorted(str(p.relative_to(DATA)) for d in ("layers", "zoo", "caffenet_mini", "source")
              for p in (DATA / d).glob("*.prototxt")
              if p.name not in ("train_val.prototxt",))


@pytest.mark.parametrize("name", NETS)
def test_blob_shapes_agree_with_traced_shapes(name):
    net = converters.read_prototxt(DATA / name)
    module, _ = converters.load_caffe(net)
    xs = example_inputs(module)
    params = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), xs).get("params", {})
    arg = xs[module.inputs[0]] if len(module.inputs) == 1 else xs
    traced = jax.eval_shape(lambda p, x: module.apply({"params": p}, x), params, arg)
    python = blob_shapes(net)
    for blob, s in traced.items():
        assert tuple(python[blob]) == tuple(s.shape), blob


@pytest.mark.parametrize("size, want", [(8, 1), (9, 1), (11, 1), (12, 1), (15, 2), (7, None)])
def test_strided_kernel_overhanging_a_small_input(size, want):
    """Caffe sizes a convolution with C's truncating division: (8 - 11) / 4 + 1 = 1 cell (its
    window reads zeros past the input); (7 - 11) / 4 + 1 = 0: refused, by both inferences."""
    net = converters.parse_prototxt(f"""
        input: "data"  input_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}
        layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
          convolution_param {{ num_output: 4 kernel_size: 11 stride: 4 }} }}""")
    if want is None:
        with pytest.raises(converters.CaffeFormatError, match="conv1.*not positive"):
            blob_shapes(net)
        with pytest.raises(converters.CaffeFormatError, match="conv1.*not positive"):
            converters.load_caffe(net)  # the same rule (the layer's record) on both paths
        x = jax.ShapeDtypeStruct((1, 3, size, size), "float32")
        graph, _ = converters.load_caffe(net, input_shape=(1, 3, 64, 64))
        params = {"conv1": {"weight": jax.ShapeDtypeStruct((4, 3, 11, 11), "float32"),
                            "bias": jax.ShapeDtypeStruct((4,), "float32")}}
        with pytest.raises(converters.CaffeFormatError, match="conv1.*not positive"):
            jax.eval_shape(lambda p, x: graph.apply({"params": p}, x), params, x)
        return
    module, _ = converters.load_caffe(net)
    x = jax.ShapeDtypeStruct((1, 3, size, size), "float32")
    params = {"conv1": {"weight": jax.ShapeDtypeStruct((4, 3, 11, 11), "float32"),
                        "bias": jax.ShapeDtypeStruct((4,), "float32")}}
    assert blob_shapes(net)["conv1"] == (1, 4, want, want)
    traced = jax.eval_shape(lambda p, x: module.apply({"params": p}, x), params, x)
    assert traced["conv1"].shape == (1, 4, want, want)
