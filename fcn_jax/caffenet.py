"""CaffeNet (bvlc_reference_caffenet) as a hand-written Flax module, classifier or fully
convolutional, with Caffe's exact semantics and blob names.

``CaffeNet(fully_conv=False)`` is ``deploy.prototxt``: ``fc6`` is InnerProduct on ``pool5``
flattened in C,H,W order. ``CaffeNet(fully_conv=True)`` is the tutorial's
``bvlc_caffenet_full_conv.prototxt``: ``fc6-conv`` is a 6x6 convolution, ``fc7-conv`` and
``fc8-conv`` 1x1, and the softmax runs over channels at every location. Params have the same
tree as ``converters.load_caffe`` gives: ``params["conv1"]["weight"]`` is ``(96, 3, 11, 11)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import fast as F
from . import layers as L
from .net import fill

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


class CaffeNet(nn.Module):
    """CaffeNet: ``apply({"params": p}, x)`` with ``x`` (N, 3, H, W) BGR, mean-subtracted,
    returns ``{blob_name: array}`` like ``net.blobs`` (``conv1`` post-ReLU, ``fc6`` post-ReLU
    and post-Dropout, ``prob`` the softmax over classes; (N, 1000) for the classifier,
    (N, 1000, H', W') fully convolutional).

    ``widths`` sets conv1..5, fc6, fc7 output counts (narrow variants for tests);
    ``train=True`` applies Dropout (rngs={"dropout": key}); ``outputs`` limits the returned
    blobs (all by default). Runs the NHWC fast path of ``fcn_jax.fast``.
    """

    fully_conv: bool = False
    widths: Sequence[int] = CAFFENET_WIDTHS
    num_classes: int = 1000

    def _param(self, name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Array]:
        std, bias = _FILLERS[name.split("-")[0]]

        def init(key):
            k1, _ = jax.random.split(key)
            return {"weight": fill(k1, shapes["weight"], {"type": "gaussian", "std": std}),
                    "bias": jnp.full(shapes["bias"], bias, jnp.float32)}

        p = self.param(name, init)
        for k, shp in shapes.items():
            if tuple(p[k].shape) != tuple(shp):
                raise ValueError(f"{name}: {k} shape {tuple(p[k].shape)} does not match "
                                 f"{tuple(shp)}")
        return p

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False,
                 outputs: Sequence[str] | None = None) -> dict[str, Array]:
        x = jnp.asarray(x, jnp.float32)
        blobs = {"data": x}  # NHWC internally (fcn_jax.fast); NCHW at the boundary
        cin = x.shape[1]
        h = F.to_nhwc(x)
        for i, (k, s, pad, g) in enumerate(CONV_SPECS):
            name = f"conv{i + 1}"
            p = self._param(name, {"weight": (self.widths[i], cin // g, k, k),
                                   "bias": (self.widths[i],)})
            h = F.relu(F.conv_nhwc(h, p["weight"], p["bias"], stride=s, pad=pad, group=g))
            blobs[name] = h
            cin = self.widths[i]
            if i in (0, 1, 4):
                h = F.pool_nhwc(h, method="MAX", kernel=(3, 3), stride=(2, 2))
                blobs[f"pool{i + 1}"] = h
            if i in (0, 1):
                h = F.lrn_nhwc(h, **LRN)
                blobs[f"norm{i + 1}"] = h
        names = fc_names(self.fully_conv)
        outs = (self.widths[5], self.widths[6], self.num_classes)
        for j, (name, n) in enumerate(zip(names, outs, strict=True)):
            if self.fully_conv:
                k = 6 if j == 0 else 1
                p = self._param(name, {"weight": (n, h.shape[3], k, k), "bias": (n,)})
                h = F.conv_nhwc(h, p["weight"], p["bias"])
            else:
                if h.ndim == 4:  # Caffe flattens pool5 in (C, H, W) order
                    h = F.to_nchw(h).reshape(h.shape[0], -1)
                p = self._param(name, {"weight": (n, h.shape[1]), "bias": (n,)})
                h = F.inner_product_nhwc(h, p["weight"], p["bias"])
            if j < 2:
                h = F.relu(h)
                if train:
                    h = _dropout(h, self.make_rng("dropout"))
            blobs[name] = h
        blobs["prob"] = L.softmax(h, axis=-1)
        keep = list(blobs) if outputs is None else list(outputs)
        missing = [b for b in keep if b not in blobs]
        if missing:
            raise ValueError(f"unknown blobs {missing}; CaffeNet has {list(blobs)}")
        return {b: F.to_nchw(blobs[b]) if blobs[b].ndim == 4 and b != "data" else blobs[b]
                for b in keep}


def _dropout(h: Array, key: Array, ratio: float = 0.5) -> Array:
    """Caffe Dropout with the mask ``layers.dropout`` draws for the NCHW blob."""
    if h.ndim != 4:
        return L.dropout(h, ratio, deterministic=False, rng=key)
    n, hh, ww, c = h.shape
    keep = F.to_nhwc(jax.random.bernoulli(key, 1.0 - ratio, (n, c, hh, ww)))
    return jnp.where(keep, h * jnp.asarray(1.0 / (1.0 - ratio), h.dtype), jnp.zeros_like(h))


def caffenet_prototxt(*, fully_conv: bool = False, widths: Sequence[int] = CAFFENET_WIDTHS,
                      num_classes: int = 1000, input_shape: Sequence[int] = (10, 3, 227, 227),
                      name: str = "CaffeNet") -> str:
    """The deploy prototxt of a ``CaffeNet`` configuration (what real Caffe would load)."""
    lines = [f'name: "{name}"',
             'layer { name: "data" type: "Input" top: "data" input_param { shape { '
             + " ".join(f"dim: {d}" for d in input_shape) + " } } }"]
    bottom = "data"
    for i, (k, s, pad, g) in enumerate(CONV_SPECS):
        n = f"conv{i + 1}"
        extra = ((f" stride: {s}" if s > 1 else "") + (f" pad: {pad}" if pad else "")
                 + (f" group: {g}" if g > 1 else ""))
        lines.append(f'layer {{ name: "{n}" type: "Convolution" bottom: "{bottom}" top: "{n}" '
                     f'convolution_param {{ num_output: {widths[i]} kernel_size: {k}'
                     f'{extra} }} }}')
        lines.append(f'layer {{ name: "relu{i + 1}" type: "ReLU" bottom: "{n}" top: "{n}" }}')
        bottom = n
        if i in (0, 1, 4):
            lines.append(f'layer {{ name: "pool{i + 1}" type: "Pooling" bottom: "{bottom}" '
                         f'top: "pool{i + 1}" pooling_param {{ pool: MAX kernel_size: 3 '
                         f'stride: 2 }} }}')
            bottom = f"pool{i + 1}"
        if i in (0, 1):
            lines.append(f'layer {{ name: "norm{i + 1}" type: "LRN" bottom: "{bottom}" '
                         f'top: "norm{i + 1}" lrn_param {{ local_size: 5 alpha: 0.0001 '
                         f'beta: 0.75 }} }}')
            bottom = f"norm{i + 1}"
    for j, (n, out) in enumerate(zip(fc_names(fully_conv),
                                     (widths[5], widths[6], num_classes), strict=True)):
        if fully_conv:
            k = 6 if j == 0 else 1
            lines.append(f'layer {{ name: "{n}" type: "Convolution" bottom: "{bottom}" '
                         f'top: "{n}" convolution_param {{ num_output: {out} kernel_size: {k} '
                         f'}} }}')
        else:
            lines.append(f'layer {{ name: "{n}" type: "InnerProduct" bottom: "{bottom}" '
                         f'top: "{n}" inner_product_param {{ num_output: {out} }} }}')
        bottom = n
        if j < 2:
            lines.append(f'layer {{ name: "relu{6 + j}" type: "ReLU" bottom: "{n}" '
                         f'top: "{n}" }}')
            lines.append(f'layer {{ name: "drop{6 + j}" type: "Dropout" bottom: "{n}" '
                         f'top: "{n}" dropout_param {{ dropout_ratio: 0.5 }} }}')
    lines.append(f'layer {{ name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob" }}')
    return "\n".join(lines) + "\n"
