"""Flax NNX users: a net loaded by ``converters.load_caffe`` (a linen module + params) taken
into NNX with ``flax.nnx.bridge.ToNNX`` over the same params, fine-tuned with
``nnx.Optimizer``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import converters

TINY = """
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 4 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "score" type: "Convolution" bottom: "conv1" top: "score"
  convolution_param { num_output: 2 kernel_size: 1 } }
"""


def test_loaded_net_fine_tunes_as_an_nnx_module(tmp_path):
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY)
    module, params = converters.load_caffe(proto, seed=0)
    rng = np.random.default_rng(0)
    params = {k: {b: (rng.normal(size=v.shape) * 0.3).astype(np.float32) for b, v in d.items()}
              for k, d in params.items()}
    x = rng.normal(size=(4, 3, 12, 12)).astype(np.float32)
    labels = (x[:, :1, ::2, ::2][:, :, :5, :5] > 0).astype(np.int32)[:, 0]  # a learnable map

    model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0)).lazy_init(x)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    # the NNX model is the same function as the linen module with the loaded params
    np.testing.assert_array_equal(np.asarray(model(x)["score"]),
                                  np.asarray(module.apply({"params": params}, x)["score"]))

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        logits = jnp.moveaxis(m(x)["score"], 1, -1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses
    # the trained weights come back as a Caffe params tree, e.g. for save_caffemodel
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert trained["conv1"]["weight"].shape == (6, 3, 3, 3)
    assert not np.array_equal(np.asarray(trained["conv1"]["weight"]), params["conv1"]["weight"])
    converters.save_caffemodel(tmp_path / "t.caffemodel",
                               jax.tree.map(np.asarray, trained), proto)
