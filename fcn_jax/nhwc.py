"""NHWC formulations of Caffe's layers: NHWC activations, convolutions as dots.

``fcn_jax.layers`` is the readable, Caffe-exact reference on NCHW arrays. The functions here
compute the same results (to float32 rounding; MAX pooling and ReLU bit for bit) in the
formulations XLA runs fastest (why: ``experiments/README.md``):

* activations are ``(N, H, W, C)`` (NHWC); weights stay in Caffe's shapes (``(O, C/g, kh, kw)``)
  and are rearranged inside the traced function, or once by :func:`prepare_conv_weight`
  (``fcn_jax.inference.prepare_params`` does it for a whole net);
* a grouped convolution runs as ``group`` ungrouped convolutions and a concatenation;
* a 1x1 convolution and ``InnerProduct`` are single dots against the untransposed weight;
* a convolution with a deep kernel (``kh * kw * C/g >= 4096``, CaffeNet's ``fc6-conv``) gathers
  its ``kh * kw`` shifted windows and runs one ``(positions, K) @ (K, O)`` dot;
* MAX pooling is the maximum of ``kh * kw`` strided slices with Caffe's ceil-mode overhang
  padded in the same fusion; AVE pooling sums the shifts in Caffe's order;
* LRN across channels sums ``local_size`` shifted channel slices.

Every function takes an optional ``valid`` pair ``(h, w)`` of traced int32 arrays of shape
``(N,)``: the true image size per example when a batch was zero-padded to a bucket shape.
Cells beyond it are masked (zero for sums, lowest float for MAX) so that the cells inside
compute exactly what the unpadded image gives; each layer's record in
``fcn_jax.builtin_layers`` says how the sizes shrink (``valid_sizes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import layers as L

Array = jax.Array
Valid = tuple[Array, Array] | None
HIGHEST = lax.Precision.HIGHEST

#: ``conv_nhwc(method="auto")`` gathers patches and runs one dot when the per-group
#: reduction depth ``kh * kw * C/g`` is at least this (fc6-conv: 9216; conv3: 2304).
PATCHES_MIN_DEPTH = 4096
#: ... and the patch matrix is at most this many bytes.
PATCHES_MAX_BYTES = 1 << 30
#: Up to this many groups a grouped convolution runs as one convolution per group (faster on
#: XLA:CPU for CaffeNet's 2); beyond, as one ``feature_group_count`` convolution, so that the
#: graph does not grow with the group count (depthwise convolutions).
GROUP_SPLIT_MAX = 8
#: Up to this many window cells, pooling and LRN sum (or max) shifted slices, one op per cell,
#: and a convolution may gather patches; beyond, one ``lax.reduce_window`` (one
#: ``conv_general_dilated``), so that the graph does not grow with the kernel.
WINDOW_SLICES_MAX = 64

__all__ = [
    "GROUP_SPLIT_MAX",
    "WINDOW_SLICES_MAX",
    "Blob",
    "PATCHES_MIN_DEPTH",
    "conv_nhwc",
    "deconv_nhwc",
    "inner_product_nhwc",
    "lrn_nhwc",
    "mask_nhwc",
    "pool_nhwc",
    "prepare_conv_weight",
    "relu",
    "to_nchw",
    "to_nhwc",
]


# ----------------------------------------------------------------------------- layout


class Blob:
    """One blob while a net runs: its NCHW array, its NHWC array, or both (converted on
    demand and cached). Blobs that are not 4-D only ever have the NCHW (Caffe) form."""

    __slots__ = ("_nchw", "_nhwc")

    def __init__(self, nchw: Array | None = None, nhwc: Array | None = None):
        self._nchw = nchw
        self._nhwc = nhwc

    @property
    def shape(self) -> tuple[int, ...]:
        """The Caffe (NCHW) shape."""
        if self._nchw is not None:
            return tuple(self._nchw.shape)
        n, h, w, c = self._nhwc.shape
        return (n, c, h, w)

    @property
    def is_4d(self) -> bool:
        return len(self.shape) == 4

    @property
    def has_nhwc(self) -> bool:
        """Whether the NHWC form exists already (element-wise layers keep the layout)."""
        return self._nchw is None

    def nchw(self) -> Array:
        if self._nchw is None:
            self._nchw = to_nchw(self._nhwc)
        return self._nchw

    def nhwc(self) -> Array:
        if self._nhwc is None:
            self._nhwc = to_nhwc(self._nchw)
        return self._nhwc


def to_nhwc(x: Array) -> Array:
    """``(N, C, H, W) -> (N, H, W, C)``."""
    return jnp.transpose(x, (0, 2, 3, 1))


def to_nchw(x: Array) -> Array:
    """``(N, H, W, C) -> (N, C, H, W)``."""
    return jnp.transpose(x, (0, 3, 1, 2))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _dot_t(a: Array, w: Array, precision: Any) -> Array:
    """``a @ w.T`` for ``a`` (M, K) and ``w`` (O, K), without materialising ``w.T``."""
    return lax.dot_general(a, w, (((1,), (1,)), ((), ())), precision=precision)


# ----------------------------------------------------------------------------- valid sizes


def mask_nhwc(x: Array, valid: Valid, fill: float) -> Array:
    """``x`` with every cell at row ``>= h[n]`` or column ``>= w[n]`` set to ``fill``."""
    if valid is None:
        return x
    vh, vw = valid
    rows = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :, None, None]
    cols = jnp.arange(x.shape[2], dtype=jnp.int32)[None, None, :, None]
    inside = (rows < vh[:, None, None, None]) & (cols < vw[:, None, None, None])
    return jnp.where(inside, x, jnp.asarray(fill, x.dtype))


# ----------------------------------------------------------------------------- activations


def relu(x: Array, negative_slope: float = 0.0) -> Array:
    """Caffe ``ReLU``, ``max(x, 0) + slope * min(x, 0)``, written as the select
    ``x < 0 ? slope * x : x`` (the same values as ``layers.relu``). A select, unlike
    ``maximum``, keeps XLA:CPU from fusing a chain of dots (fc6 -> fc7 -> fc8) into one
    library call that runs them slowly."""
    neg = jnp.zeros_like(x) if negative_slope == 0.0 else x * jnp.asarray(negative_slope,
                                                                            x.dtype)
    return jnp.where(x < 0, neg, x)


# ----------------------------------------------------------------------------- convolution


def prepare_conv_weight(weight: Array, group: int = 1) -> tuple[Array, ...]:
    """Caffe's ``(O, C/g, kh, kw)`` weight as ``group`` HWIO kernels ``(kh, kw, C/g, O/g)``,
    the layout ``conv_nhwc`` runs on (do it once, outside the jitted function, when the
    weights are fixed)."""
    og = weight.shape[0] // group
    return tuple(jnp.transpose(weight[g * og:(g + 1) * og], (2, 3, 1, 0)) for g in range(group))


def _conv_method(x_shape, w_shape, stride, pad, dilation, group) -> str:
    o, cg, kh, kw = w_shape
    if (kh, kw) == (1, 1):
        return "dot"
    n, h, w, _ = x_shape
    ho = L.conv_output_size(h, kh, stride[0], pad[0], dilation[0])
    wo = L.conv_output_size(w, kw, stride[1], pad[1], dilation[1])
    depth = kh * kw * cg
    if (depth >= PATCHES_MIN_DEPTH and kh * kw <= WINDOW_SLICES_MAX
            and n * ho * wo * depth * 4 <= PATCHES_MAX_BYTES):
        # one slice per kernel cell: past WINDOW_SLICES_MAX cells the graph, not the
        # reduction, decides (a 128x128 kernel would unroll 16,384 slices)
        return "patches"
    return "conv"


def _windows(x: Array, kh: int, kw: int, stride, dilation, ho: int, wo: int) -> list[Array]:
    """The ``kh * kw`` strided windows ``x[:, d*a + s*i, d*b + s*j, :]`` in (a, b) order."""
    out = []
    for a in range(kh):
        for b in range(kw):
            start = (0, a * dilation[0], b * dilation[1], 0)
            limit = (x.shape[0], a * dilation[0] + (ho - 1) * stride[0] + 1,
                     b * dilation[1] + (wo - 1) * stride[1] + 1, x.shape[3])
            out.append(lax.slice(x, start, limit, (1, stride[0], stride[1], 1)))
    return out


def conv_nhwc(x: Array, weight: Array | Sequence[Array], bias: Array | None = None, *,
              stride=(1, 1), pad=(0, 0), dilation=(1, 1), group: int = 1,
              precision: Any = HIGHEST, method: str = "auto", valid: Valid = None) -> Array:
    """Caffe ``Convolution`` of NHWC ``x``: ``layers.convolution`` in the NHWC layout.

    ``weight`` is Caffe's ``(O, C/g, kh, kw)``, or the tuple :func:`prepare_conv_weight`
    gives. ``method``: ``"dot"`` (1x1 kernels), ``"patches"`` (gathered windows, one dot),
    ``"conv"`` (``lax.conv_general_dilated``, one per group) or ``"auto"`` (by shape).
    Returns NHWC.
    """
    stride, pad, dilation = _pair(stride), _pair(pad), _pair(dilation)
    if any(pad) or max(stride) > 1:
        # a padded convolution, or a strided one whose last window hangs past the input
        # (see layers.conv_output_size), reads cells beyond the valid size for valid outputs:
        # they must be the zeros Caffe pads with; other windows stay inside
        x = mask_nhwc(x, valid, 0.0)
    prepared = not hasattr(weight, "ndim")
    if prepared:
        kh, kw, cg, og = weight[0].shape
        w_shape = (og * group, cg, kh, kw)
    else:
        w_shape = tuple(weight.shape)
        cg, kh, kw = w_shape[1:]
        og = w_shape[0] // group
    if x.shape[3] != cg * group:
        raise ValueError(f"input has {x.shape[3]} channels, weight expects {cg} x group {group}")
    if group > GROUP_SPLIT_MAX and not prepared:
        y = lax.conv_general_dilated(
            x, weight.astype(x.dtype), window_strides=stride,
            padding=L.conv_padding(x.shape[1:3], (kh, kw), stride, pad, dilation),
            rhs_dilation=dilation, dimension_numbers=("NHWC", "OIHW", "NHWC"),
            feature_group_count=group, precision=precision)
        return y if bias is None else y + jnp.asarray(bias, y.dtype).reshape(-1)
    if method == "auto":
        method = _conv_method(x.shape, w_shape, stride, pad, dilation, group)
    dtype = x.dtype
    padding = L.conv_padding(x.shape[1:3], (kh, kw), stride, pad, dilation)
    if method in ("dot", "patches"):
        if any(p for lo_hi in padding for p in lo_hi):
            x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
        ho = L.conv_output_size(x.shape[1], kh, stride[0], 0, dilation[0])
        wo = L.conv_output_size(x.shape[2], kw, stride[1], 0, dilation[1])
        wins = _windows(x, kh, kw, stride, dilation, ho, wo)
        outs = []
        for g in range(group):
            cs = slice(g * cg, (g + 1) * cg)
            parts = [v[..., cs] if group > 1 else v for v in wins]
            # (N, Ho, Wo, C/g, kh*kw) flattens in Caffe's (c, a, b) weight order
            cols = parts[0] if len(parts) == 1 else jnp.stack(parts, axis=-1)
            cols = cols.reshape(-1, cg * kh * kw)
            if prepared:  # HWIO (kh, kw, cg, og): contract over (a, b, c)
                w = jnp.transpose(weight[g], (3, 2, 0, 1)).reshape(og, -1)
            else:
                w = weight[g * og:(g + 1) * og].reshape(og, -1)
            outs.append(_dot_t(cols, w.astype(dtype), precision))
        y = outs[0] if group == 1 else jnp.concatenate(outs, axis=-1)
        y = y.reshape(x.shape[0], ho, wo, og * group)
    elif method == "conv":
        # prepared: HWIO kernels; else Caffe's OIHW slices, laid out by XLA as it needs
        kernels = weight if prepared else tuple(weight[g * og:(g + 1) * og]
                                                for g in range(group))
        spec = ("NHWC", "HWIO", "NHWC") if prepared else ("NHWC", "OIHW", "NHWC")
        outs = []
        for g in range(group):
            xs = x[..., g * cg:(g + 1) * cg] if group > 1 else x
            outs.append(lax.conv_general_dilated(
                xs, kernels[g].astype(dtype), window_strides=stride,
                padding=padding, rhs_dilation=dilation,
                dimension_numbers=spec, precision=precision))
        y = outs[0] if group == 1 else jnp.concatenate(outs, axis=-1)
    else:
        raise ValueError(f"unknown convolution method {method!r}")
    if bias is not None:
        y = y + jnp.asarray(bias, dtype).reshape(-1)
    return y


def deconv_nhwc(x: Array, weight: Array, bias: Array | None = None, *, stride=(1, 1),
                pad=(0, 0), dilation=(1, 1), group: int = 1, precision: Any = HIGHEST,
                valid: Valid = None) -> Array:
    """Caffe ``Deconvolution`` of NHWC ``x`` (``layers.deconvolution`` run on the NCHW view)."""
    x = mask_nhwc(x, valid, 0.0)
    y = L.deconvolution(to_nchw(x), weight, bias, stride=stride, pad=pad, dilation=dilation,
                        group=group, precision=precision)
    return to_nhwc(y)


def inner_product_nhwc(x: Array, weight: Array, bias: Array | None = None, *,
                       transpose: bool = False, precision: Any = HIGHEST) -> Array:
    """Caffe ``InnerProduct`` (axis 1) of an NHWC blob: Caffe flattens in (C, H, W) order, so
    the small activation is put back in that order; the big weight is used untransposed."""
    if x.ndim == 4:
        x = to_nchw(x)
    flat = x.reshape(x.shape[0], -1)
    w = jnp.asarray(weight, flat.dtype)
    if transpose:
        y = jnp.matmul(flat, w, precision=precision)
    else:
        if flat.shape[-1] != w.shape[1]:
            raise ValueError(f"input has {flat.shape[-1]} features, weight {w.shape}")
        y = _dot_t(flat, w, precision)
    if bias is not None:
        y = y + jnp.asarray(bias, y.dtype).reshape(-1)
    return y


# ----------------------------------------------------------------------------- pooling, LRN


def pool_nhwc(x: Array, *, method: str = "MAX", kernel=(2, 2), stride=(1, 1), pad=(0, 0),
              ceil_mode: bool = True, global_pooling: bool = False, valid: Valid = None
              ) -> Array:
    """Caffe ``Pooling`` of NHWC ``x``: ``layers.pooling`` in the NHWC layout (same output
    sizes, MAX bit for bit, AVE summed in Caffe's order and divided by Caffe's counts)."""
    method = method.upper()
    if method not in ("MAX", "AVE"):
        raise NotImplementedError(f"pooling method {method!r}")
    h, w = x.shape[1:3]
    if global_pooling:
        if valid is not None:
            return _global_pool_valid(x, method, valid)
        ks, ss, ps = (h, w), (1, 1), (0, 0)
    else:
        ks, ss, ps = _pair(kernel), _pair(stride), _pair(pad)
    clip = any(p > 0 for p in ps)
    outs = tuple(L.pooling_output_size(n, k, s, p, ceil_mode, clip=clip)
                 for n, k, s, p in zip((h, w), ks, ss, ps, strict=True))
    if min(outs) < 1:
        raise ValueError(f"pooling of {(h, w)} with kernel {ks} gives empty output {outs}")
    cfg = [(0, 0, 0)] + [(p, (o - 1) * s + k - n - p, 0)
                         for n, k, s, p, o in zip((h, w), ks, ss, ps, outs, strict=True)] + [
        (0, 0, 0)]
    if valid is not None:
        # masked once, on its own: fused into each of the kh * kw window reads below, the
        # select makes XLA compile the pooling fusion about twice as slowly
        x = lax.optimization_barrier(mask_nhwc(x, valid, jnp.finfo(x.dtype).min if
                                               method == "MAX" else 0.0))
    many = ks[0] * ks[1] > WINDOW_SLICES_MAX
    window, strides = (1, ks[0], ks[1], 1), (1, ss[0], ss[1], 1)
    if method == "MAX":
        lowest = jnp.finfo(x.dtype).min  # Caffe starts every window at -FLT_MAX
        xp = lax.pad(x, jnp.array(lowest, x.dtype), cfg)
        if many:
            return lax.reduce_window(xp, jnp.array(lowest, x.dtype), lax.max, window, strides,
                                     "VALID")
        wins = _windows(xp, ks[0], ks[1], ss, (1, 1), outs[0], outs[1])
        y = wins[0]
        for v in wins[1:]:
            y = jnp.maximum(y, v)
        return y
    xp = lax.pad(x, jnp.array(0, x.dtype), cfg)
    if many:
        sums = lax.reduce_window(xp, jnp.array(0, x.dtype), lax.add, window, strides, "VALID")
    else:
        wins = _windows(xp, ks[0], ks[1], ss, (1, 1), outs[0], outs[1])
        sums = wins[0]
        for v in wins[1:]:  # Caffe's loop order: rows, then columns
            sums = sums + v
    if valid is None:
        ch = _ave_counts(h, outs[0], ks[0], ss[0], ps[0])
        cw = _ave_counts(w, outs[1], ks[1], ss[1], ps[1])
        counts = jnp.asarray((ch[:, None] * cw[None, :]).astype(np.dtype(x.dtype)))
        counts = jnp.broadcast_to(counts[None, :, :, None], sums.shape)
    else:
        ch = _ave_counts(valid[0][:, None], outs[0], ks[0], ss[0], ps[0])
        cw = _ave_counts(valid[1][:, None], outs[1], ks[1], ss[1], ps[1])
        counts = (ch[:, :, None] * cw[:, None, :]).astype(x.dtype)
        counts = jnp.broadcast_to(counts[..., None], sums.shape)
    # a true division like Caffe's (XLA would turn division by a constant into a reciprocal
    # multiply, an ulp off); the barrier hides the constant
    return sums / lax.optimization_barrier(counts)


def _ave_counts(size: Any, out: int, kernel: int, stride: int, pad: int) -> Any:
    """Caffe's AVE divisor per window along one axis: the window clipped to
    ``[-pad, size + pad)`` (numpy for an int size, jnp for an array of sizes)."""
    start = np.arange(out) * stride - pad
    if isinstance(size, int | np.integer):
        return np.minimum(start + kernel, size + pad) - start
    return jnp.minimum(start + kernel, size + pad) - start


def _global_pool_valid(x: Array, method: str, valid: tuple[Array, Array]) -> Array:
    if method == "MAX":
        return jnp.max(mask_nhwc(x, valid, jnp.finfo(x.dtype).min), axis=(1, 2), keepdims=True)
    s = jnp.sum(mask_nhwc(x, valid, 0.0), axis=(1, 2), keepdims=True)
    return s / (valid[0] * valid[1]).astype(x.dtype)[:, None, None, None]


def lrn_nhwc(x: Array, *, local_size: int = 5, alpha: float = 1.0, beta: float = 0.75,
             k: float = 1.0, norm_region: str = "ACROSS_CHANNELS", valid: Valid = None
             ) -> Array:
    """Caffe ``LRN`` of NHWC ``x`` (``layers.lrn`` in the NHWC layout).

    ACROSS_CHANNELS: ``y = x * (k + alpha/n * sum of x^2 over n neighbouring channels)^-beta``.
    WITHIN_CHANNEL: ``y = x * (1 + alpha/n^2 * sum of x^2 over the n x n window)^-beta``.
    """
    pre = (local_size - 1) // 2
    sq = x * x
    if norm_region == "ACROSS_CHANNELS":
        # a window wider than the channels sums them all: clipped to 2C - 1 (same sums)
        pre = min(pre, max(x.shape[3] - 1, 0))
        win = 2 * pre + 1
        if win > WINDOW_SLICES_MAX:
            acc = lax.reduce_window(sq, jnp.array(0, sq.dtype), lax.add, (1, 1, 1, win),
                                    (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), (pre, pre)))
        else:
            sp = jnp.pad(sq, ((0, 0), (0, 0), (0, 0), (pre, pre)))
            c = x.shape[3]
            acc = sp[..., 0:c]
            for i in range(1, win):
                acc = acc + sp[..., i:i + c]
        scale = k + (alpha / local_size) * acc
    elif norm_region == "WITHIN_CHANNEL":
        ph, pw = (min(pre, max(d - 1, 0)) for d in x.shape[1:3])
        if ph == pw == pre:
            pooled = pool_nhwc(sq, method="AVE", kernel=local_size, stride=1, pad=pre,
                               valid=valid)
        else:  # clipped to the blob (same sums); Caffe divides by local_size^2 still
            kh, kw = 2 * ph + 1, 2 * pw + 1
            pooled = pool_nhwc(sq, method="AVE", kernel=(kh, kw), stride=1, pad=(ph, pw),
                               valid=valid) * jnp.asarray(
                kh * kw / (float(local_size) * float(local_size)), sq.dtype)
        scale = 1.0 + alpha * pooled
    else:
        raise ValueError(f"unknown LRN norm_region {norm_region!r}")
    if beta == 0.75:
        # x * s ** -0.75 as x / sqrt(s * sqrt(s)): XLA:CPU's pow does not vectorise; within
        # 3 ulp of float64 (tests/test_nhwc.py).
        # Beyond s ~ 4.9e25, s * sqrt(s) overflows: there sqrt(s) * sqrt(sqrt(s))
        s15 = scale * jnp.sqrt(scale)
        big = jnp.sqrt(scale) * jnp.sqrt(jnp.sqrt(scale))
        return x / jnp.where(jnp.isinf(s15), big, jnp.sqrt(s15))
    return x * scale ** (-beta)
