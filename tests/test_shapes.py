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
