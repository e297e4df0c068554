"""CaffeNet (bvlc_reference_caffenet) as a readable Flax module, classifier or fully
convolutional, with Caffe's exact semantics and blob names.

``CaffeNet(fully_conv=False)`` is ``deploy.prototxt``: ``fc6`` is InnerProduct on ``pool5``
flattened in C,H,W order. ``CaffeNet(fully_conv=True)`` is the tutorial's
``bvlc_caffenet_full_conv.prototxt``: ``fc6-conv`` is a 6x6 convolution, ``fc7-conv`` and
``fc8-conv`` 1x1, and the softmax runs over channels at every location. Params have the same
tree as ``converters.load_caffe`` gives: ``params["conv1"]["weight"]`` is ``(96, 3, 11, 11)``.

The module writes its structure once, as a ``caffe.NetParameter`` (:func:`caffenet_net`), and
runs it with the same graph executor and layer records as every other net
(``fcn_jax.net.run_graph``); ``CaffeNet(...).layers`` hands those layers to the rest of the
library (compiled inference, training, receptive fields).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from converters import caffe_pb2, format_prototxt

from .layer_table import LayerSpec, compile_net
from .net import module_params, run_graph

Array = jax.Array

#: Full-size CaffeNet widths: conv1..conv5, fc6, fc7.
CAFFENET_WIDTHS = (96, 256, 384, 384, 256, 4096, 4096)
#: conv1..conv5: (kernel, stride, pad, group); every conv is followed by ReLU.
CONV_SPECS = ((11, 4, 0, 1), (5, 1, 2, 2), (3, 1, 1, 1), (3, 1, 1, 2), (3, 1, 1, 2))
#: Pooling (3x3 stride 2, ceil) and LRN (local_size 5, alpha 1e-4, beta 0.75) follow conv1
#: and conv2; pooling alone follows conv5.
LRN = {"local_size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}
# train_val.prototxt fillers: (weight std, bias value)
_FILLERS = {"conv1": (0.01, 0.0), "conv2": (0.01, 1.0), "conv3": (0.01, 0.0),
            "conv4": (0.01, 1.0), "conv5": (0.01, 1.0), "fc6": (0.005, 1.0),
            "fc7": (0.005, 1.0), "fc8": (0.01, 0.0)}


def fc_names(fully_conv: bool) -> tuple[str, str, str]:
    """Layer (and blob) names of the three fully connected layers in each form."""
    return ("fc6-conv", "fc7-conv", "fc8-conv") if fully_conv else ("fc6", "fc7", "fc8")


def caffenet_net(*, fully_conv: bool = False, widths: Sequence[int] = CAFFENET_WIDTHS,
                 num_classes: int = 1000, input_shape: Sequence[int] = (10, 3, 227, 227),
                 name: str = "CaffeNet", fillers: bool = False):
    """The deploy ``caffe.NetParameter`` of a CaffeNet configuration (``fillers``: with the
    train_val fillers, Gaussian weights and constant biases)."""
    net = caffe_pb2.NetParameter(name=name)

    def layer(name: str, type_: str, bottom: str, top: str):
        lp = net.layer.add(name=name, type=type_, top=[top])
        if bottom:
            lp.bottom.append(bottom)
        return lp

    def fill(param, lname: str):
        if fillers:
            std, bias = _FILLERS[lname.split("-")[0]]
            param.weight_filler.type, param.weight_filler.std = "gaussian", std
            param.bias_filler.type, param.bias_filler.value = "constant", bias

    layer("data", "Input", "", "data").input_param.shape.add(dim=list(input_shape))
    bottom = "data"
    for i, (k, s, pad, g) in enumerate(CONV_SPECS):
        n = f"conv{i + 1}"
        p = layer(n, "Convolution", bottom, n).convolution_param
        p.num_output, p.kernel_size[:] = widths[i], [k]
        if s > 1:
            p.stride.append(s)
        if pad:
            p.pad.append(pad)
        if g > 1:
            p.group = g
        fill(p, n)
        layer(f"relu{i + 1}", "ReLU", n, n)
        bottom = n
        if i in (0, 1, 4):
            pp = layer(f"pool{i + 1}", "Pooling", bottom, f"pool{i + 1}").pooling_param
            pp.pool, pp.kernel_size, pp.stride = caffe_pb2.PoolingParameter.MAX, 3, 2
            bottom = f"pool{i + 1}"
        if i in (0, 1):
            lrn = layer(f"norm{i + 1}", "LRN", bottom, f"norm{i + 1}").lrn_param
            lrn.local_size, lrn.alpha, lrn.beta = LRN["local_size"], LRN["alpha"], LRN["beta"]
            bottom = f"norm{i + 1}"
    outs = (widths[5], widths[6], num_classes)
    for j, (n, out) in enumerate(zip(fc_names(fully_conv), outs, strict=True)):
        if fully_conv:
            p = layer(n, "Convolution", bottom, n).convolution_param
            p.num_output, p.kernel_size[:] = out, [6 if j == 0 else 1]
        else:
            p = layer(n, "InnerProduct", bottom, n).inner_product_param
            p.num_output = out
        fill(p, n)
        bottom = n
        if j < 2:
            layer(f"relu{6 + j}", "ReLU", n, n)
            layer(f"drop{6 + j}", "Dropout", n, n).dropout_param.dropout_ratio = 0.5
    layer("prob", "Softmax", bottom, "prob")
    return net


def caffenet_prototxt(*, fully_conv: bool = False, widths: Sequence[int] = CAFFENET_WIDTHS,
                      num_classes: int = 1000, input_shape: Sequence[int] = (10, 3, 227, 227),
                      name: str = "CaffeNet") -> str:
    """The deploy prototxt of a ``CaffeNet`` configuration (what real Caffe would load)."""
    return format_prototxt(caffenet_net(fully_conv=fully_conv, widths=widths,
                                        num_classes=num_classes, input_shape=input_shape,
                                        name=name))


class CaffeNet(nn.Module):
    """CaffeNet: ``apply({"params": p}, x)`` with ``x`` (N, 3, H, W) BGR, mean-subtracted,
    returns ``{blob_name: array}`` like ``net.blobs`` (``conv1`` post-ReLU, ``fc6`` post-ReLU
    and post-Dropout, ``prob`` the softmax over classes; (N, 1000) for the classifier,
    (N, 1000, H', W') fully convolutional).

    ``widths`` sets conv1..5, fc6, fc7 output counts (narrow variants for tests);
    ``train=True`` applies Dropout (rngs={"dropout": key}); ``outputs`` limits the returned
    blobs (all by default). Params are initialised with CaffeNet's train_val fillers.
    """

    fully_conv: bool = False
    widths: Sequence[int] = CAFFENET_WIDTHS
    num_classes: int = 1000

    @property
    def net(self):
        """This configuration as a ``caffe.NetParameter`` (with its fillers)."""
        return caffenet_net(fully_conv=self.fully_conv, widths=tuple(self.widths),
                            num_classes=self.num_classes, fillers=True)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The compiled layers the module runs (the graph executor's input)."""
        return _layers(self.fully_conv, tuple(self.widths), self.num_classes)

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False,
                 outputs: Sequence[str] | None = None) -> dict[str, Array]:
        rng = (lambda: self.make_rng("dropout")) if train else None
        out, _ = run_graph(self.layers, module_params(self),
                           {"data": jnp.asarray(x, jnp.float32)},
                           outputs=None if outputs is None else tuple(outputs), train=train,
                           rng=rng)
        return out


@functools.lru_cache(maxsize=32)
def _layers(fully_conv: bool, widths: tuple, num_classes: int) -> tuple[LayerSpec, ...]:
    """The compiled layers of one configuration (immutable, so computed once)."""
    return compile_net(caffenet_net(fully_conv=fully_conv, widths=widths,
                                    num_classes=num_classes, fillers=True))
