"""Dense inference with a fully convolutional net: class maps and the cell -> input window map.

A fully convolutional CaffeNet on a 451x451 image gives an 8x8 grid of outputs. Two windows
can be attached to output cell (i, j):

* the **classifier window** (``classifier_window``): the tutorial's reading, the input crop
  the original classifier would have to see, ``window`` = the classifier's input size
  (227 px for CaffeNet) at ``stride`` = the product of the strides (32), i.e. the crop
  ``[32 i, 32 i + 227) x [32 j, 32 j + 227)``. For a net without padding the cell equals the
  classifier on that crop exactly; CaffeNet's padded conv2..conv5 see zeros at the crop's
  border where the full image has neighbours, so there the two differ near crop borders;
* the **receptive field** (``receptive_field``): every input pixel that can influence the
  cell, composed kernel by kernel (kernel, stride, pad, dilation). For CaffeNet it is 355 px
  starting 64 px before the classifier window (padding reaches outside the crop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters import fcn as fcn_net

Array = Any

__all__ = [
    "CellWindows", "ReceptiveField", "cell_crops", "class_probability_map",
    "classification_map", "classifier_window", "crop_cell", "dense_apply", "receptive_field",
]


# ----------------------------------------------------------------------------- maps


def classification_map(scores: Array, axis: int = -3) -> jax.Array:
    """The argmax class at every location: ``(N, K, H, W)`` -> ``(N, H, W)``,
    ``(K, H, W)`` -> ``(H, W)`` (class axis ``axis``, default third from last)."""
    return jnp.argmax(jnp.asarray(scores), axis=axis)


def class_probability_map(prob: Array, class_index: int, axis: int = -3) -> jax.Array:
    """The map of one class: ``prob[..., class_index, :, :]`` (class axis ``axis``)."""
    prob = jnp.asarray(prob)
    k = prob.shape[axis]
    if not -k <= class_index < k:
        raise IndexError(f"class {class_index} out of range for {k} classes")
    return jnp.take(prob, class_index, axis=axis)


def dense_apply(module: Any, outputs: Sequence[str] | None = ("prob",)) -> Callable:
    """A jit-compiled (``fcn_jax.xla.jit``) ``f(params, x) -> {blob: array}`` for a
    ``CaffeGraph``/``CaffeNet``: ``outputs`` only, or every blob when None."""
    from .xla import jit

    names = None if outputs is None else tuple(outputs)
    return jit(lambda p, x: module.apply({"params": p}, x, outputs=names))


# ----------------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Input window of output cell (i, j): rows ``[offset + stride*i, ... + size)`` (H, W).

    ``offset`` is negative when padding reaches outside the image.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]

    def window(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``, end exclusive, in input pixels (may exceed the image)."""
        y0 = self.offset[0] + self.stride[0] * i
        x0 = self.offset[1] + self.stride[1] * j
        return y0, x0, y0 + self.size[0], x0 + self.size[1]


@dataclasses.dataclass(frozen=True)
class CellWindows:
    """The classifier-crop reading: cell (i, j) <-> crop ``[stride*i, stride*i + window)``."""

    window: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    def window_of(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of cell (i, j), end exclusive."""
        y0 = self.offset[0] + self.stride[0] * i
        x0 = self.offset[1] + self.stride[1] * j
        return y0, x0, y0 + self.window[0], x0 + self.window[1]

    def grid(self, image_hw: Sequence[int]) -> tuple[int, int]:
        """How many cells per axis have their crop fully inside an ``image_hw`` image."""
        return tuple(max(0, (int(image_hw[a]) - self.offset[a] - self.window[a])
                         // self.stride[a] + 1) for a in range(2))


# (start, jump, size) per spatial axis: input pixel of the first unit's window, distance
# between neighbouring units in input pixels, window size in input pixels.
_Geo = tuple[tuple[int, int, int], tuple[int, int, int]]


def _full(g: _Geo, hw: Sequence[int]) -> _Geo:
    """The geometry of a unit that sees a whole ``hw`` bottom."""
    return tuple((s, j * hw[a], z + (hw[a] - 1) * j) for a, (s, j, z) in enumerate(g))


def _union(geos: Sequence[_Geo], layer: str) -> _Geo:
    out = []
    for a in range(2):
        jumps = {g[a][1] for g in geos}
        if len(jumps) != 1:
            raise ValueError(f"{layer}: bottoms have different strides {sorted(jumps)}")
        start = min(g[a][0] for g in geos)
        end = max(g[a][0] + g[a][2] for g in geos)
        out.append((start, jumps.pop(), end - start))
    return tuple(out)


def receptive_field(net: Any, blob: str | None = None, input_shape: Any = None
                    ) -> ReceptiveField:
    """The receptive field of ``blob``'s cells (default: the net's last top), composed along
    every path from the input: ``size += dilation*(kernel-1)*jump``, ``start -= pad*jump``,
    ``jump *= stride``; an InnerProduct, Flatten or global pooling sees its whole bottom;
    several bottoms take the union. Deconvolution and spatial Concat/Slice are not supported.
    """
    net = fcn_net.as_net(net)
    shapes = fcn_net.blob_shapes(net, input_shape)
    geo: dict[str, _Geo] = {}
    layers = fcn_net._ordered(net)
    for lp in layers:
        if lp.type in fcn_net.INPUT_TYPES:
            for t in lp.top:
                geo[t] = ((0, 1, 1), (0, 1, 1))
            continue
        used = lp.bottom[:1] if lp.type == "Crop" else lp.bottom  # bottom[1]: shape only
        bottoms = [geo[b] for b in used if b in geo]
        if not bottoms:
            continue
        g = _union(bottoms, lp.name) if len(bottoms) > 1 else bottoms[0]
        t = lp.type
        bshape = shapes[lp.bottom[0]]
        if t in ("Convolution", "Pooling"):
            k = fcn_net.layer_geometry(lp)
            if k.global_pooling:
                g = _full(g, bshape[2:])
            else:
                g = tuple((s - k.pad[a] * j, j * k.stride[a],
                           z + k.dilation[a] * (k.kernel[a] - 1) * j)
                          for a, (s, j, z) in enumerate(g))
        elif t in ("InnerProduct", "Flatten") and len(bshape) == 4:
            g = _full(g, bshape[2:])
        elif t == "LRN" and lp.lrn_param.norm_region == 1:  # WITHIN_CHANNEL
            r = (lp.lrn_param.local_size - 1) // 2
            g = tuple((s - r * j, j, z + 2 * r * j) for s, j, z in g)
        elif t == "Crop":
            axis = lp.crop_param.axis % 4
            offs = list(lp.crop_param.offset)
            g = list(g)
            for a in range(2):
                if 2 + a >= axis and offs:
                    off = offs[0] if len(offs) == 1 else offs[2 + a - axis]
                    s, j, z = g[a]
                    g[a] = (s + off * j, j, z)
            g = tuple(g)
        elif t == "Deconvolution":
            raise ValueError(f"{lp.name}: receptive fields through Deconvolution are not "
                             "supported")
        elif t in ("Concat", "Slice"):
            p = lp.concat_param if t == "Concat" else lp.slice_param
            if p.axis % 4 not in (0, 1):
                raise ValueError(f"{lp.name}: spatial {t} is not supported")
        for top in lp.top:
            geo[top] = g
    name = blob or layers[-1].top[0]
    if name not in geo:
        raise KeyError(f"no blob {name!r} reachable from the input")
    g = geo[name]
    return ReceptiveField(size=(g[0][2], g[1][2]), stride=(g[0][1], g[1][1]),
                          offset=(g[0][0], g[1][0]))


def classifier_window(net: Any, classifier_shape: Any = None) -> CellWindows:
    """The tutorial's cell <-> crop reading for a classifier ``net``: window = its input
    (H, W) (or ``classifier_shape``), stride = the jump at the bottom of its first
    InnerProduct (CaffeNet: 227 px at stride 32)."""
    net = fcn_net.as_net(net)
    plan = fcn_net.fully_conv_plan(net, classifier_shape, suffix="")
    if not plan.casts:
        raise ValueError("the net has no InnerProduct layer: not a classifier")
    shapes = fcn_net.input_shapes(net, classifier_shape)
    (h, w) = next(iter(shapes.values()))[2:]
    rf = receptive_field(net, plan.casts[0].bottom, classifier_shape)
    return CellWindows(window=(int(h), int(w)), stride=rf.stride)


# ----------------------------------------------------------------------------- crops


def crop_cell(x: Array, i: int, j: int, windows: CellWindows) -> Array:
    """The classifier crop of cell (i, j) from an ``(..., H, W)`` image or blob."""
    y0, x0, y1, x1 = windows.window_of(i, j)
    h, w = np.shape(x)[-2:]
    if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
        raise ValueError(f"cell ({i}, {j}) window {(y0, x0, y1, x1)} is outside the "
                         f"{h}x{w} input")
    return x[..., y0:y1, x0:x1]


def cell_crops(x: Array, windows: CellWindows, grid: tuple[int, int] | None = None
               ) -> np.ndarray:
    """Every cell's crop of an ``(N, C, H, W)`` batch, stacked ``(N, gh, gw, C, wh, ww)``
    (``grid`` default: every cell whose crop fits, ``windows.grid``)."""
    x = np.asarray(x)
    gh, gw = grid or windows.grid(x.shape[-2:])
    return np.stack([np.stack([np.asarray(crop_cell(x, i, j, windows)) for j in range(gw)],
                              axis=1) for i in range(gh)], axis=1)
