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

from . import netdef
from .layer_table import LayerSpec, compile_net, given_input_shapes, walk_windows

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
class CellWindows:
    """The input window of every output cell: cell (i, j) sees rows
    ``[offset + stride * i, ... + size)`` and columns likewise (H, W pairs).

    One class for the three readings: a receptive field (:func:`receptive_field`; ``offset``
    negative where padding reaches outside the image), the classifier-crop reading
    (:func:`classifier_window`: the tutorial's 227 px crop every 32 px) and the training
    window (``fcn_jax.train.window_geometry``).
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    def window(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of cell (i, j), end exclusive (may exceed the image)."""
        y0 = self.offset[0] + self.stride[0] * i
        x0 = self.offset[1] + self.stride[1] * j
        return y0, x0, y0 + self.size[0], x0 + self.size[1]

    window_of = window

    def windows(self, out_hw: tuple[int, int]) -> np.ndarray:
        """Every cell's window as an ``(h, w, 4)`` float64 array ``[x0, y0, x1, y1]``."""
        h, w = out_hw
        y0 = self.offset[0] + self.stride[0] * np.arange(h, dtype=np.float64)
        x0 = self.offset[1] + self.stride[1] * np.arange(w, dtype=np.float64)
        yy, xx = np.meshgrid(y0, x0, indexing="ij")
        return np.stack([xx, yy, xx + self.size[1], yy + self.size[0]], axis=-1)

    def grid(self, image_hw: Sequence[int]) -> tuple[int, int]:
        """How many cells per axis have their window fully inside an ``image_hw`` image."""
        return tuple(max(0, (int(image_hw[a]) - self.offset[a] - self.size[a])
                         // self.stride[a] + 1) for a in range(2))


#: The receptive-field reading of :class:`CellWindows` (same class).
ReceptiveField = CellWindows


def _layers_and_inputs(net: Any, input_shape: Any) -> tuple[tuple, dict]:
    """Compiled layers and input shapes of a NetParameter, prototxt path, module or layers."""
    layers = getattr(net, "layers", net)
    if isinstance(layers, (tuple, list)) and all(isinstance(s, LayerSpec) for s in layers):
        layers = tuple(layers)
        given = given_input_shapes(layers)
        if isinstance(input_shape, dict):
            given.update(input_shape)
        elif input_shape is not None:
            given[next(iter(given))] = tuple(input_shape)
        return layers, {k: tuple(v) for k, v in given.items() if v is not None}
    net = netdef.as_net(net)
    return compile_net(net), netdef.input_shapes(net, input_shape)


def receptive_field(net: Any, blob: str | None = None, input_shape: Any = None, *,
                    sliding: bool = False) -> ReceptiveField:
    """The receptive field of ``blob``'s cells (default: the net's last top), composed along
    every path from the input by each layer record's window rule: through a kernel,
    ``size += dilation*(kernel-1)*jump``, ``start -= pad*jump``, ``jump *= stride``; an
    InnerProduct, Flatten or global pooling sees its whole bottom; several bottoms take the
    union. ``net``: a NetParameter, prototxt path, module or compiled layers. ``sliding``:
    refuse a blob whose cells have seen a whole bottom (a classifier's). Deconvolution and
    spatial Concat/Slice are not supported."""
    layers, inputs = _layers_and_inputs(net, input_shape)
    geo = walk_windows(layers, inputs)
    name = blob or next(t for s in reversed(layers) for t in s.tops)
    if name not in geo:
        raise KeyError(f"no blob {name!r} reachable from the input")
    g, slides = geo[name]
    if sliding and not slides:
        raise ValueError(f"the cells of {name!r} see a whole bottom (InnerProduct, Flatten "
                         "or global pooling on the way): they do not slide")
    return ReceptiveField(size=(g[0][2], g[1][2]), stride=(g[0][1], g[1][1]),
                          offset=(g[0][0], g[1][0]))


def classifier_window(net: Any, classifier_shape: Any = None) -> CellWindows:
    """The tutorial's cell <-> crop reading for a classifier ``net``: window = its input
    (H, W) (or ``classifier_shape``), stride = the jump at the bottom of its first
    InnerProduct (CaffeNet: 227 px at stride 32)."""
    net = netdef.as_net(net)
    plan = netdef.fully_conv_plan(net, classifier_shape, suffix="")
    if not plan.casts:
        raise ValueError("the net has no InnerProduct layer: not a classifier")
    shapes = netdef.input_shapes(net, classifier_shape)
    (h, w) = next(iter(shapes.values()))[2:]
    rf = receptive_field(net, plan.casts[0].bottom, classifier_shape)
    return CellWindows(size=(int(h), int(w)), stride=rf.stride)


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
