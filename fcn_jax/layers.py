"""Caffe layer operations as pure JAX functions on NCHW arrays.

Every function reproduces the forward pass of the BVLC Caffe layer of the same name (the CPU
implementation in ``src/caffe/layers/*.cpp``), including Caffe's rounding rules for output
shapes. Arrays are the only traced inputs; every configuration argument is a plain Python value,
so all functions can be wrapped in :func:`jax.jit` with the configuration bound statically.

Layout conventions are Caffe's: activations are ``(N, C, H, W)`` (or N-D with the channel axis
at 1), convolution weights are ``(C_out, C_in / group, kh, kw)`` and deconvolution weights are
``(C_in, C_out / group, kh, kw)``.

Matrix products (convolution, deconvolution, inner product) default to
``lax.Precision.HIGHEST`` so that accelerators do not silently drop to TF32/bfloat16 passes;
pass ``precision=None`` to let XLA choose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
IntOrSeq = int | Sequence[int]

__all__ = [
    "absval",
    "argmax",
    "batch_norm",
    "bias",
    "bilinear_filler",
    "bnll",
    "concat",
    "conv_output_size",
    "conv_padding",
    "convolution",
    "crop",
    "deconv_output_size",
    "deconvolution",
    "dropout",
    "eltwise",
    "elu",
    "exp",
    "flatten",
    "inner_product",
    "log",
    "lrn",
    "pooling",
    "pooling_output_size",
    "power",
    "prelu",
    "relu",
    "reshape",
    "scale",
    "sigmoid",
    "slice_blob",
    "softmax",
    "tanh",
    "threshold",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _ntuple(value: IntOrSeq, n: int, name: str) -> tuple[int, ...]:
    """Expand an int (or a length-1 sequence) to an n-tuple of ints, as Caffe expands
    ``kernel_size``/``stride``/``pad``/``dilation`` to every spatial axis."""
    if isinstance(value, int | np.integer):
        return (int(value),) * n
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name} must have 1 or {n} entries, got {values}")
    return values


def _canonical_axis(axis: int, ndim: int) -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: negative axes count from the end."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-D blob")
    return axis + ndim if axis < 0 else axis


def _broadcast_param(param: Array, ndim: int, axis: int) -> Array:
    """Reshape ``param`` (shape = blob dims ``[axis, axis + param.ndim)``) so that it
    broadcasts against an ``ndim``-D blob."""
    return param.reshape(param.shape + (1,) * (ndim - axis - param.ndim))


def _channel_param(param: Array, ndim: int) -> Array:
    """Reshape a per-channel vector ``(C,)`` to broadcast over axis 1 of an ``ndim``-D blob."""
    return param.reshape((-1,) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------------------------
# convolution family
# --------------------------------------------------------------------------------------------


def conv_output_size(n: Any, kernel: int, stride: int, pad: int, dilation: int = 1) -> Any:
    """Caffe's convolution output size ``(n + 2p - (d(k-1)+1)) / s + 1`` with C's integer
    division, which truncates toward zero: when the kernel overhangs the padded input by less
    than a stride, Caffe still makes one cell (ints or int arrays)."""
    num = n + 2 * pad - (dilation * (kernel - 1) + 1)
    if isinstance(num, int | np.integer):
        return (num // stride if num >= 0 else -(-num // stride)) + 1
    return jnp.where(num >= 0, num // stride, -(-num // stride)) + 1


def conv_padding(spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                 pad: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """``(low, high)`` zero padding per spatial axis that gives Caffe's output size: ``pad`` on
    both sides, plus on the high side what a last window hanging past the input needs. Raises
    ValueError when the output would be empty."""
    out = []
    for n, k, s, p, d in zip(spatial, kernel, stride, pad, dilation, strict=True):
        o = conv_output_size(n, k, s, p, d)
        if o < 1:
            raise ValueError(f"convolution of size {tuple(spatial)} with kernel "
                             f"{tuple(kernel)} (stride {tuple(stride)}, pad {tuple(pad)}, "
                             f"dilation {tuple(dilation)}) gives an empty output")
        over = (o - 1) * s + d * (k - 1) + 1 - (n + 2 * p)
        out.append((p, p + max(over, 0)))
    return out


def convolution(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    stride: IntOrSeq = (1, 1),
    pad: IntOrSeq = (0, 0),
    dilation: IntOrSeq = (1, 1),
    group: int = 1,
    precision: lax.PrecisionLike = lax.Precision.HIGHEST,
) -> Array:
    """Caffe ``Convolution`` (cross-correlation, zero padding, optional groups/dilation).

    ``y[n, o] = b[o] + sum_{c in group(o), i, j} w[o, c, i, j] * x_pad[n, c, s*y + d*i, s*x + d*j]``
    with ``weight`` of shape ``(O, C/group, kh, kw)`` (N-D kernels work the same way).
    Output size per spatial axis: :func:`conv_output_size`, Caffe's ``(H + 2p - (d*(k-1) + 1))
    / s + 1`` with C's division; a last window hanging past the padded input reads zeros there,
    as Caffe's im2col does. Caffe defaults: stride 1, pad 0, dilation 1, group 1, bias present.
    """
    x = jnp.asarray(x)
    weight = jnp.asarray(weight)
    nsp = weight.ndim - 2
    strides = _ntuple(stride, nsp, "stride")
    pads = _ntuple(pad, nsp, "pad")
    dils = _ntuple(dilation, nsp, "dilation")
    if x.shape[1] != weight.shape[1] * group:
        raise ValueError(
            f"input has {x.shape[1]} channels, weight expects {weight.shape[1]} x group {group}"
        )
    padding = conv_padding(x.shape[2:], weight.shape[2:], strides, pads, dils)
    y = lax.conv_general_dilated(
        x,
        weight.astype(x.dtype),
        window_strides=strides,
        padding=padding,
        rhs_dilation=dils,
        feature_group_count=group,
        precision=precision,
    )
    if bias is not None:
        y = y + _channel_param(jnp.asarray(bias, y.dtype), y.ndim)
    return y


def deconvolution(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    stride: IntOrSeq = (1, 1),
    pad: IntOrSeq = (0, 0),
    dilation: IntOrSeq = (1, 1),
    group: int = 1,
    precision: lax.PrecisionLike = lax.Precision.HIGHEST,
) -> Array:
    """Caffe ``Deconvolution``: the gradient of ``Convolution`` w.r.t. its input.

    Each input pixel ``x[n, c, h, w]`` scatters ``x * weight[c, o, i, j]`` onto output position
    ``(s*h - p + d*i, s*w - p + d*j)`` of every output channel ``o`` in its group; positions
    outside the output are dropped. ``weight`` has shape ``(C_in, C_out/group, kh, kw)``.
    Output size per spatial axis: ``s*(H - 1) + d*(k - 1) + 1 - 2p``.
    """
    x = jnp.asarray(x)
    weight = jnp.asarray(weight)
    nsp = weight.ndim - 2
    strides = _ntuple(stride, nsp, "stride")
    pads = _ntuple(pad, nsp, "pad")
    dils = _ntuple(dilation, nsp, "dilation")
    c_in, c_out_g = weight.shape[:2]
    ks = weight.shape[2:]
    if x.shape[1] != c_in or c_in % group:
        raise ValueError(f"input has {x.shape[1]} channels, weight {weight.shape}, group {group}")
    n, c_in_g, c_out = x.shape[0], c_in // group, group * c_out_g
    # Sub-pixel formulation (no zero-stuffed input, so no s^2 wasted work): write each kernel
    # tap as i = a*s + r. Output row s*Y + r of the full (uncropped) deconvolution is then
    # sum_a x[Y - a] * w[a*s + r], an ordinary full convolution of x with a kernel of A taps,
    # A = ceil(extent / s), producing s outputs ("phases" r) per input row; the phases are
    # interleaved afterwards (depth-to-space). Dilation is folded into the kernel as zeros.
    exts = tuple(d * (k - 1) + 1 for k, d in zip(ks, dils, strict=True))
    taps = tuple(-(-e // s) for e, s in zip(exts, strides, strict=True))
    w = weight.astype(x.dtype)
    if any(d > 1 for d in dils):
        w = (
            jnp.zeros((c_in, c_out_g) + exts, x.dtype)
            .at[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dils)]
            .set(w)
        )
    w = jnp.pad(
        w, [(0, 0), (0, 0)] + [(0, a * s - e) for a, s, e in zip(taps, strides, exts, strict=True)]
    )
    split = sum(((a, s) for a, s in zip(taps, strides, strict=True)), ())
    w = w.reshape((group, c_in_g, c_out_g) + split)  # g, c, o, (a_0, r_0), (a_1, r_1), ...
    w = w.transpose(
        (0, 2) + tuple(4 + 2 * i for i in range(nsp)) + (1,) + tuple(3 + 2 * i for i in range(nsp))
    )  # g, o, r_0, r_1, ..., c, a_0, a_1, ...
    w = w.reshape((c_out * math.prod(strides), c_in_g) + taps)
    w = jnp.flip(w, axis=tuple(range(2, 2 + nsp)))
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=(1,) * nsp,
        padding=[(a - 1, a - 1) for a in taps],
        feature_group_count=group,
        precision=precision,
    )  # (N, C_out * prod(s), H + A_h - 1, ...)
    rows = y.shape[2:]
    y = y.reshape((n, c_out) + strides + rows)
    y = y.transpose((0, 1) + sum(((2 + nsp + i, 2 + i) for i in range(nsp)), ()))
    y = y.reshape((n, c_out) + tuple(r * s for r, s in zip(rows, strides, strict=True)))
    index = [slice(None), slice(None)]
    for size, s, e, p in zip(x.shape[2:], strides, exts, pads, strict=True):
        out = s * (size - 1) + e - 2 * p
        if out < 1:
            raise ValueError(f"deconvolution output size {out} < 1")
        index.append(slice(p, p + out))
    y = y[tuple(index)]
    if bias is not None:
        y = y + _channel_param(jnp.asarray(bias, y.dtype), y.ndim)
    return y


def inner_product(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    axis: int = 1,
    transpose: bool = False,
    precision: lax.PrecisionLike = lax.Precision.HIGHEST,
) -> Array:
    """Caffe ``InnerProduct``: ``y = flat(x) @ W^T + b``.

    ``flat`` collapses axes ``[axis:]`` in row-major (C, H, W) order into ``K`` features.
    ``weight`` is ``(N_out, K)``, or ``(K, N_out)`` when ``transpose`` (Caffe's
    ``inner_product_param.transpose``). Output shape ``x.shape[:axis] + (N_out,)``.
    Defaults: axis 1, transpose false, bias present.
    """
    x = jnp.asarray(x)
    weight = jnp.asarray(weight, x.dtype)
    axis = _canonical_axis(axis, x.ndim)
    flat = x.reshape(x.shape[:axis] + (-1,))
    w = weight if transpose else weight.T
    if flat.shape[-1] != w.shape[0]:
        raise ValueError(f"input has {flat.shape[-1]} features, weight {weight.shape}")
    y = jnp.matmul(flat, w, precision=precision)
    if bias is not None:
        y = y + jnp.asarray(bias, y.dtype).reshape(-1)
    return y


def bilinear_filler(shape: Sequence[int]) -> np.ndarray:
    """Caffe's ``"bilinear"`` FillerParameter, as float32 numpy.

    For a square ``k x k`` kernel with ``f = ceil(k / 2)`` and
    ``c = (2f - 1 - f % 2) / (2f)``: ``w[..., y, x] = (1 - |x/f - c|) * (1 - |y/f - c|)``,
    the same kernel for every ``(C_in, C_out/group)`` pair. With ``stride = f`` and
    ``kernel = 2f - f % 2`` a Deconvolution using it is bilinear upsampling.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ValueError(f"bilinear filler needs a 4-D blob with a square kernel, got {shape}")
    k = shape[3]
    f = math.ceil(k / 2.0)
    c = np.float32((2 * f - 1 - f % 2) / (2.0 * f))
    t = np.arange(k, dtype=np.float32)
    # Caffe evaluates in float: x / f - c, fabs, 1 - ..., product.
    w1 = np.float32(1) - np.abs(t / np.float32(f) - c)
    kernel = w1[:, None] * w1[None, :]
    return np.ascontiguousarray(np.broadcast_to(kernel, shape), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# pooling and normalisation
# --------------------------------------------------------------------------------------------


def pooling_output_size(
    size: Any,
    kernel: int,
    stride: int,
    pad: int,
    ceil_mode: bool = True,
    *,
    clip: bool | None = None,
) -> Any:
    """Caffe's pooled size along one axis (ints or int arrays).

    ``out = ceil((size + 2*pad - kernel) / stride) + 1`` (``floor`` when ``ceil_mode`` is false,
    i.e. ``round_mode: FLOOR``). Then, if padding is present, the last window must start
    strictly inside ``[0, size + pad)``: if ``(out - 1) * stride >= size + pad``: ``out -= 1``.

    Caffe applies that clip to *both* axes when either ``pad_h`` or ``pad_w`` is non-zero;
    ``clip`` lets the caller say so (default: ``pad > 0``).
    """
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if clip is None:
        clip = pad > 0
    if clip:
        out = out - ((out - 1) * stride >= size + pad)
    return out


def deconv_output_size(n: Any, kernel: int, stride: int, pad: int, dilation: int = 1) -> Any:
    """Caffe's deconvolution output size ``s(n-1) + d(k-1) + 1 - 2p`` (ints or arrays)."""
    return stride * (n - 1) + dilation * (kernel - 1) + 1 - 2 * pad


def _ave_pool_counts(size: int, out: int, kernel: int, stride: int, pad: int) -> np.ndarray:
    """Caffe's per-window AVE divisor along one axis: the window clipped to
    ``[-pad, size + pad)`` (padding counts, the ceil-mode overhang does not)."""
    start = np.arange(out) * stride - pad
    end = np.minimum(start + kernel, size + pad)
    return end - start


def pooling(
    x: Array,
    *,
    method: str = "MAX",
    kernel: IntOrSeq = (2, 2),
    stride: IntOrSeq = (1, 1),
    pad: IntOrSeq = (0, 0),
    ceil_mode: bool = True,
    global_pooling: bool = False,
) -> Array:
    """Caffe ``Pooling`` over the last two axes (``MAX`` or ``AVE``).

    Output size: :func:`pooling_output_size` (ceil by default, Caffe's ``round_mode: CEIL``).
    Window ``(i, j)`` covers rows ``[i*s - p, i*s - p + k)``.
    MAX: maximum over the part of the window inside the image (padding never wins); a window
    with no image cell yields ``-FLT_MAX`` like Caffe.
    AVE: sum over the image cells divided by the window size clipped to ``[-p, H + p)``
    (zero padding is counted, the ceil-mode overhang beyond ``H + p`` is not).
    ``global_pooling``: kernel = (H, W), stride 1, pad 0. Caffe default stride is 1, pad 0.
    """
    x = jnp.asarray(x)
    method = method.upper()
    if method not in ("MAX", "AVE"):
        raise NotImplementedError(f"pooling method {method!r} (STOCHASTIC is train-only)")
    h, w = x.shape[-2:]
    if global_pooling:
        ks, ss, ps = (h, w), (1, 1), (0, 0)
    else:
        ks = _ntuple(kernel, 2, "kernel")
        ss = _ntuple(stride, 2, "stride")
        ps = _ntuple(pad, 2, "pad")
    clip = any(p > 0 for p in ps)
    outs = tuple(
        pooling_output_size(n, k, s, p, ceil_mode, clip=clip)
        for n, k, s, p in zip((h, w), ks, ss, ps, strict=True)
    )
    if min(outs) < 1:
        raise ValueError(f"pooling of {(h, w)} with kernel {ks} gives empty output {outs}")
    lead = x.ndim - 2
    # Pad low by `pad` and high so that exactly `out` windows fit; a negative high pad (floor
    # mode leaving trailing cells unused) crops.
    cfg = [(0, 0, 0)] * lead + [
        (p, (o - 1) * s + k - n - p, 0)
        for n, k, s, p, o in zip((h, w), ks, ss, ps, outs, strict=True)
    ]
    window = (1,) * lead + ks
    strides = (1,) * lead + ss
    if method == "MAX":
        lowest = jnp.finfo(x.dtype).min  # Caffe initialises every output to -FLT_MAX
        xp = lax.pad(x, jnp.array(lowest, x.dtype), cfg)
        return lax.reduce_window(xp, -jnp.inf, lax.max, window, strides, "VALID")
    xp = lax.pad(x, jnp.array(0, x.dtype), cfg)
    # Sum the k_h * k_w strided shifts in Caffe's loop order (rows, then columns) so that the
    # float32 rounding is bit-identical to Caffe; the zero padding adds exact zeros.
    sums = None
    for i in range(ks[0]):
        for j in range(ks[1]):
            start = (0,) * lead + (i, j)
            limit = xp.shape[:lead] + (i + (outs[0] - 1) * ss[0] + 1, j + (outs[1] - 1) * ss[1] + 1)
            term = lax.slice(xp, start, limit, strides)
            sums = term if sums is None else sums + term
    ch = _ave_pool_counts(h, outs[0], ks[0], ss[0], ps[0])
    cw = _ave_pool_counts(w, outs[1], ks[1], ss[1], ps[1])
    counts = jnp.broadcast_to((ch[:, None] * cw[None, :]).astype(np.dtype(x.dtype)), sums.shape)
    # XLA rewrites division by a constant or a broadcast as multiplication by the reciprocal,
    # which is off by an ulp from Caffe's true division; the barrier hides both.
    return sums / lax.optimization_barrier(counts)


def lrn(
    x: Array,
    *,
    local_size: int = 5,
    alpha: float = 1.0,
    beta: float = 0.75,
    k: float = 1.0,
    norm_region: str = "ACROSS_CHANNELS",
) -> Array:
    """Caffe ``LRN`` (local response normalisation) on an ``(N, C, H, W)`` blob.

    ACROSS_CHANNELS: ``y = x * (k + alpha/n * sum_{c' in [c - (n-1)/2, c + (n-1)/2]} x_c'^2)^-beta``
    with zero padding beyond the channel range.
    WITHIN_CHANNEL: Caffe builds Power(2) -> Pooling(AVE, kernel n, stride 1, pad (n-1)/2) ->
    Power(shift 1, scale alpha, power -beta) -> Eltwise PROD. The AVE window always lies inside
    ``[-pad, H + pad)`` so its divisor is always ``n^2``:
    ``y = x * (1 + alpha/n^2 * sum_{n x n window, zero padded} x^2)^-beta`` (``k`` is unused).
    Defaults: local_size 5, alpha 1, beta 0.75, k 1, ACROSS_CHANNELS. ``local_size`` must be odd.
    """
    x = jnp.asarray(x)
    if local_size % 2 != 1:
        raise ValueError("LRN only supports odd values for local_size")
    pre_pad = (local_size - 1) // 2
    region = norm_region.upper()
    sq = x * x
    if region == "ACROSS_CHANNELS":
        # a window wider than the channels sums them all: clipped to 2C - 1 (same sums)
        pre = min(pre_pad, max(x.shape[1] - 1, 0))
        window = (1, 2 * pre + 1) + (1,) * (x.ndim - 2)
        padding = ((0, 0), (pre, pre)) + ((0, 0),) * (x.ndim - 2)
        sums = lax.reduce_window(sq, 0.0, lax.add, window, (1,) * x.ndim, padding)
        scale_ = k + (alpha / local_size) * sums
        return x * jnp.power(scale_, -beta)
    if region == "WITHIN_CHANNEL":
        # the window clipped to the blob (2H - 1, 2W - 1: the same sums); Caffe's divisor
        # stays local_size^2 (the padded window always fits)
        ph, pw = (min(pre_pad, max(d - 1, 0)) for d in x.shape[2:4])
        if ph == pw == pre_pad:
            pooled = pooling(sq, method="AVE", kernel=local_size, stride=1, pad=pre_pad)
            return x * power(pooled, power=-beta, scale=alpha, shift=1.0)
        sums = lax.reduce_window(sq, 0.0, lax.add, (1, 1, 2 * ph + 1, 2 * pw + 1),
                                 (1, 1, 1, 1), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        pooled = sums / jnp.asarray(float(local_size) * float(local_size), sq.dtype)
        return x * power(pooled, power=-beta, scale=alpha, shift=1.0)
    raise ValueError(f"unknown LRN norm_region {norm_region!r}")


def batch_norm(
    x: Array,
    mean: Array,
    variance: Array,
    scale_factor: Array,
    *,
    eps: float = 1e-5,
    use_global_stats: bool = True,
) -> Array:
    """Caffe ``BatchNorm`` (normalisation only; the affine part is a separate ``Scale`` layer).

    Caffe stores running sums: blob 0 = mean * factor, blob 1 = variance * factor, blob 2 =
    factor (shape ``(1,)``). With ``use_global_stats``:
    ``s = 0 if factor == 0 else 1/factor``; ``y = (x - s*mean) / sqrt(s*variance + eps)``
    per channel (axis 1). Otherwise mean and biased variance are computed over every axis but
    axis 1 of ``x`` and the stored blobs are ignored. Default eps 1e-5.
    """
    x = jnp.asarray(x)
    if use_global_stats:
        factor = jnp.asarray(scale_factor, x.dtype).reshape(-1)[0]
        s = jnp.where(factor == 0, jnp.zeros_like(factor), 1 / factor)
        mu = _channel_param(jnp.asarray(mean, x.dtype) * s, x.ndim)
        var = _channel_param(jnp.asarray(variance, x.dtype) * s, x.ndim)
    else:
        axes = (0,) + tuple(range(2, x.ndim))
        mu = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=axes, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps)


def scale(x: Array, scale: Array, bias: Array | None = None, *, axis: int = 1) -> Array:
    """Caffe ``Scale``: ``y = x * scale (+ bias)``.

    ``scale`` (learned blob or second bottom) has the shape of ``x`` axes
    ``[axis, axis + scale.ndim)`` and is broadcast over the rest; ``axis`` may be negative.
    A 0-d scale multiplies everything (Caffe ignores ``axis`` then). ``bias`` (``bias_term``)
    has the same shape as ``scale``. Defaults: axis 1, no bias.
    """
    x = jnp.asarray(x)
    s = jnp.asarray(scale, x.dtype)
    ax = 0 if s.ndim == 0 else _canonical_axis(axis, x.ndim)
    y = x * _broadcast_param(s, x.ndim, ax)
    if bias is not None:
        b = jnp.asarray(bias, x.dtype)
        y = y + _broadcast_param(b.reshape(s.shape) if b.size == s.size else b, x.ndim, ax)
    return y


def bias(x: Array, b: Array, *, axis: int = 1) -> Array:
    """Caffe ``Bias``: ``y = x + b`` with ``b`` spanning ``x`` axes ``[axis, axis + b.ndim)``
    (broadcast like :func:`scale`). Default axis 1."""
    x = jnp.asarray(x)
    b = jnp.asarray(b, x.dtype)
    ax = 0 if b.ndim == 0 else _canonical_axis(axis, x.ndim)
    return x + _broadcast_param(b, x.ndim, ax)


# --------------------------------------------------------------------------------------------
# element-wise activations
# --------------------------------------------------------------------------------------------


def relu(x: Array, negative_slope: float = 0.0) -> Array:
    """Caffe ``ReLU``: ``y = max(x, 0) + negative_slope * min(x, 0)`` (default slope 0)."""
    x = jnp.asarray(x)
    if negative_slope == 0.0:
        return jnp.maximum(x, 0)
    return jnp.maximum(x, 0) + negative_slope * jnp.minimum(x, 0)


def prelu(x: Array, slope: Array, *, channel_shared: bool = False) -> Array:
    """Caffe ``PReLU``: ``y = max(x, 0) + a_c * min(x, 0)`` with one learned slope per channel
    (axis 1), or a single slope for every channel when ``channel_shared``."""
    x = jnp.asarray(x)
    a = jnp.asarray(slope, x.dtype)
    a = a.reshape(()) if channel_shared else _channel_param(a, x.ndim)
    return jnp.maximum(x, 0) + a * jnp.minimum(x, 0)


def dropout(
    x: Array,
    ratio: float = 0.5,
    *,
    deterministic: bool = True,
    rng: Array | None = None,
) -> Array:
    """Caffe ``Dropout`` (inverted): at test time (``deterministic``) the identity; in
    training each unit is kept with probability ``1 - ratio`` and scaled by
    ``1 / (1 - ratio)``, otherwise zeroed. Default ratio 0.5."""
    x = jnp.asarray(x)
    if deterministic or ratio == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout in training mode needs an rng key")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dropout ratio must be in [0, 1), got {ratio}")
    keep = jax.random.bernoulli(rng, 1.0 - ratio, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - ratio), x.dtype), jnp.zeros_like(x))


def sigmoid(x: Array) -> Array:
    """Caffe ``Sigmoid``: ``1 / (1 + exp(-x))`` (evaluated as ``0.5 * tanh(0.5 x) + 0.5``)."""
    x = jnp.asarray(x)
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def tanh(x: Array) -> Array:
    """Caffe ``TanH``: ``tanh(x)``."""
    return jnp.tanh(jnp.asarray(x))


def absval(x: Array) -> Array:
    """Caffe ``AbsVal``: ``|x|``."""
    return jnp.abs(jnp.asarray(x))


def bnll(x: Array) -> Array:
    """Caffe ``BNLL`` (binomial normal log likelihood, softplus) in its overflow-safe form:
    ``x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x))``."""
    x = jnp.asarray(x)
    return jnp.maximum(x, 0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def power(x: Array, power: float = 1.0, scale: float = 1.0, shift: float = 0.0) -> Array:
    """Caffe ``Power``: ``y = (shift + scale * x) ^ power`` (defaults 1, 1, 0).

    As in Caffe, ``power * scale == 0`` gives the constant ``1`` (power 0) or ``shift^power``.
    """
    x = jnp.asarray(x)
    if power * scale == 0:  # Caffe's float pow: NaN for a negative base, inf past the range
        with np.errstate(all="ignore"):
            value = 1.0 if power == 0 else float(np.power(np.float32(shift), np.float32(power)))
        return jnp.full_like(x, value)
    y = x
    if scale != 1:
        y = y * jnp.asarray(scale, x.dtype)
    if shift != 0:
        y = y + jnp.asarray(shift, x.dtype)
    if power == 1:
        return y
    if float(power).is_integer() and abs(power) <= 4:
        return lax.integer_pow(y, int(power))
    return jnp.power(y, jnp.asarray(power, x.dtype))


def elu(x: Array, alpha: float = 1.0) -> Array:
    """Caffe ``ELU``: ``y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)`` (default alpha 1)."""
    x = jnp.asarray(x)
    return jnp.maximum(x, 0) + alpha * jnp.expm1(jnp.minimum(x, 0))


def exp(x: Array, base: float = -1.0, scale: float = 1.0, shift: float = 0.0) -> Array:
    """Caffe ``Exp``: ``y = base ^ (shift + scale * x)``; ``base = -1`` (default) means ``e``.

    Caffe evaluates it as ``base^shift * exp(ln(base) * scale * x)``; base must be positive.
    """
    x = jnp.asarray(x)
    if base != -1.0 and base <= 0:
        raise ValueError(f"Exp base must be positive (or -1 for e), got {base}")
    log_base = 1.0 if base == -1.0 else math.log(base)
    inner = log_base * scale
    with np.errstate(all="ignore"):  # Caffe's float pow/exp: inf past the range
        outer = 1.0 if shift == 0 else float(np.exp(np.float32(shift)) if base == -1.0
                                             else np.power(np.float32(base), np.float32(shift)))
    y = jnp.exp(x if inner == 1 else x * jnp.asarray(inner, x.dtype))
    return y if outer == 1 else y * jnp.asarray(outer, x.dtype)


def log(x: Array, base: float = -1.0, scale: float = 1.0, shift: float = 0.0) -> Array:
    """Caffe ``Log``: ``y = log_base(shift + scale * x)``; ``base = -1`` (default) means ``e``."""
    x = jnp.asarray(x)
    if base != -1.0 and (base <= 0 or base == 1):
        raise ValueError(f"Log base must be positive and not 1 (or -1 for e), got {base}")
    y = x
    if scale != 1:
        y = y * jnp.asarray(scale, x.dtype)
    if shift != 0:
        y = y + jnp.asarray(shift, x.dtype)
    y = jnp.log(y)
    if base != -1.0:
        y = y * jnp.asarray(1.0 / math.log(base), x.dtype)
    return y


def threshold(x: Array, threshold: float = 0.0) -> Array:
    """Caffe ``Threshold``: ``y = 1 if x > threshold else 0`` (default threshold 0)."""
    x = jnp.asarray(x)
    return (x > threshold).astype(x.dtype)


def softmax(x: Array, axis: int = 1) -> Array:
    """Caffe ``Softmax`` along ``axis`` (default 1, the channels):
    ``exp(x - max) / sum(exp(x - max))``."""
    x = jnp.asarray(x)
    axis = _canonical_axis(axis, x.ndim)
    z = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
    return z / jnp.sum(z, axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------
# multi-blob and shape layers
# --------------------------------------------------------------------------------------------


#: Up to this many bottoms ``eltwise`` reduces in Caffe's order, one after the other;
#: beyond, as a pairwise tree (log depth).
ELTWISE_CHAIN_MAX = 16


def eltwise(
    xs: Sequence[Array], operation: str = "SUM", coeff: Sequence[float] | None = None
) -> Array:
    """Caffe ``Eltwise`` over equally shaped blobs: ``SUM`` (``sum_i coeff_i * x_i``, coeff
    default all 1), ``PROD`` (element-wise product) or ``MAX`` (element-wise maximum).
    Default operation SUM."""
    xs = [jnp.asarray(v) for v in xs]
    if len(xs) < 2:
        raise ValueError("Eltwise needs at least two bottoms")
    op = operation.upper()
    if op not in ("SUM", "PROD", "MAX"):
        raise ValueError(f"unknown Eltwise operation {operation!r}")
    if coeff and op != "SUM":
        raise ValueError("Eltwise coefficients only apply to SUM")
    if coeff and len(coeff) != len(xs):
        raise ValueError("Eltwise SUM needs one coefficient per bottom")
    if len(xs) > ELTWISE_CHAIN_MAX:
        # a pairwise tree, log2(n) deep: a chain of 30,000 adds overflows XLA's stack and
        # compiles super-linearly, one stack of them compiles slowly (not Caffe's order)
        if op == "SUM" and coeff:
            xs = [v if c == 1 else v * jnp.asarray(c, v.dtype)
                  for c, v in zip(coeff, xs, strict=True)]
        fn = {"SUM": jnp.add, "PROD": jnp.multiply, "MAX": jnp.maximum}[op]
        while len(xs) > 1:
            xs = [fn(xs[i], xs[i + 1]) if i + 1 < len(xs) else xs[i]
                  for i in range(0, len(xs), 2)]
        return xs[0]
    if op == "SUM":
        if coeff is None or len(coeff) == 0:
            coeff = [1.0] * len(xs)
        out = None
        for c, v in zip(coeff, xs, strict=True):
            term = v if c == 1 else v * jnp.asarray(c, v.dtype)
            out = term if out is None else out + term
        return out
    if coeff:
        raise ValueError("Eltwise coefficients only apply to SUM")
    out = xs[0]
    for v in xs[1:]:
        if op == "PROD":
            out = out * v
        elif op == "MAX":
            out = jnp.maximum(out, v)
        else:
            raise ValueError(f"unknown Eltwise operation {operation!r}")
    return out


def concat(xs: Sequence[Array], axis: int = 1) -> Array:
    """Caffe ``Concat``: join the bottoms along ``axis`` (default 1, the channels)."""
    xs = [jnp.asarray(v) for v in xs]
    return jnp.concatenate(xs, axis=_canonical_axis(axis, xs[0].ndim))


def slice_blob(
    x: Array, *, axis: int = 1, slice_points: Sequence[int] = (), num_tops: int = 2
) -> list[Array]:
    """Caffe ``Slice``: cut ``x`` along ``axis`` at ``slice_points`` (giving
    ``len(slice_points) + 1`` tops), or, with no slice points, into ``num_tops`` equal parts."""
    x = jnp.asarray(x)
    axis = _canonical_axis(axis, x.ndim)
    n = x.shape[axis]
    if slice_points:
        bounds = [0, *(int(p) for p in slice_points), n]
        if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"slice points {tuple(slice_points)} invalid for size {n}")
    else:
        if n % num_tops:
            raise ValueError(f"cannot split size {n} evenly into {num_tops} tops")
        step = n // num_tops
        bounds = [i * step for i in range(num_tops + 1)]
    pairs = list(zip(bounds, bounds[1:], strict=False))
    if len(pairs) <= 64:
        return [lax.slice_in_dim(x, b0, b1, axis=axis) for b0, b1 in pairs]
    # many tops: the start as an array, so that op-by-op dispatch compiles one slice per
    # distinct size, not one per top (5,000 compiles took 50 s and 4.6 GB)
    return [lax.dynamic_slice_in_dim(x, jnp.asarray(b0, jnp.int32), b1 - b0, axis=axis)
            for b0, b1 in pairs]


def flatten(x: Array, axis: int = 1, end_axis: int = -1) -> Array:
    """Caffe ``Flatten``: merge axes ``[axis, end_axis]`` (inclusive, negative allowed) into
    one. Defaults axis 1, end_axis -1: ``(N, C, H, W) -> (N, C*H*W)``."""
    x = jnp.asarray(x)
    start = _canonical_axis(axis, x.ndim)
    end = _canonical_axis(end_axis, x.ndim)
    merged = math.prod(x.shape[start : end + 1])
    return x.reshape(x.shape[:start] + (merged,) + x.shape[end + 1 :])


def reshape(x: Array, shape: Sequence[int], axis: int = 0, num_axes: int = -1) -> Array:
    """Caffe ``Reshape``: replace axes ``[axis, axis + num_axes)`` (``num_axes = -1``: to the
    end) by ``shape``, where a ``0`` copies the corresponding bottom dim and one ``-1`` is
    inferred. A negative ``axis`` counts from the end with ``-1`` meaning *after* the last axis
    (Caffe: ``start = ndim + axis + 1``). Defaults axis 0, num_axes -1."""
    x = jnp.asarray(x)
    ndim = x.ndim
    start = axis if axis >= 0 else ndim + axis + 1
    if not 0 <= start <= ndim:
        raise ValueError(f"reshape axis {axis} out of range for a {ndim}-D blob")
    end = ndim if num_axes == -1 else start + num_axes
    if end > ndim or num_axes < -1:
        raise ValueError(f"reshape num_axes {num_axes} out of range")
    new = [int(d) for d in shape]
    if new.count(-1) > 1:
        raise ValueError("at most one -1 dim in a Reshape shape")
    for i, d in enumerate(new):
        if d == 0:
            if start + i >= ndim:
                raise ValueError(f"reshape dim {i} copies a missing bottom axis")
            new[i] = x.shape[start + i]
    top = list(x.shape[:start]) + new + list(x.shape[end:])
    if -1 in top:
        known = math.prod(d for d in top if d != -1)
        if known == 0 or x.size % known:
            raise ValueError(f"cannot infer the -1 dim of {shape} for {x.shape}")
        top[top.index(-1)] = x.size // known
    if math.prod(top) != x.size:
        raise ValueError(f"reshape of {x.shape} to {tuple(top)} changes the count")
    return x.reshape(top)


def crop(
    x: Array,
    reference_shape: Sequence[int] | Array,
    *,
    axis: int = 2,
    offset: int | Sequence[int] = (),
) -> Array:
    """Caffe ``Crop``: crop every axis ``>= axis`` of ``x`` to the size of the reference
    blob's axis, starting at ``offset`` (none: 0; one value: every cropped axis; else one
    per cropped axis). Default axis 2 (spatial). ``reference_shape`` may be the shape or
    the reference array itself."""
    x = jnp.asarray(x)
    ref = tuple(getattr(reference_shape, "shape", reference_shape))
    start = _canonical_axis(axis, x.ndim)
    n_crop = x.ndim - start
    offsets = (offset,) if isinstance(offset, int | np.integer) else tuple(offset)
    if len(offsets) == 0:
        offsets = (0,) * n_crop
    elif len(offsets) == 1:
        offsets = offsets * n_crop
    elif len(offsets) != n_crop:
        raise ValueError(f"crop needs 0, 1 or {n_crop} offsets, got {offsets}")
    index = [slice(None)] * start
    for i, off in enumerate(offsets):
        size = ref[start + i]
        if off + size > x.shape[start + i]:
            raise ValueError(f"crop axis {start + i}: offset {off} + {size} > {x.shape[start + i]}")
        index.append(slice(int(off), int(off) + size))
    return x[tuple(index)]


def argmax(
    x: Array, *, axis: int | None = None, top_k: int = 1, out_max_val: bool = False
) -> Array:
    """Caffe ``ArgMax``, as float32 indices (or values), ties broken towards the larger index
    (Caffe sorts ``(value, index)`` pairs in descending order).

    ``axis`` given: that axis is replaced by the ``top_k`` indices, or by the ``top_k`` values
    when ``out_max_val``. ``axis`` None: per example over the flattened ``x[n]``; the output has
    ``max(x.ndim, 3)`` axes, shape ``(N, 1, top_k, 1...)`` holding indices, or
    ``(N, 2, top_k, 1...)`` holding indices in ``[:, 0]`` and values in ``[:, 1]``.
    """
    x = jnp.asarray(x)
    if axis is None:
        flat = x.reshape(x.shape[0], -1)
        vals, idx = _top_k_last_index(flat, top_k)
        parts = [idx.astype(jnp.float32)]
        if out_max_val:
            parts.append(vals.astype(jnp.float32))
        out = jnp.stack(parts, axis=1)  # (N, 1 or 2, top_k)
        return out.reshape(out.shape + (1,) * (max(x.ndim, 3) - 3))
    ax = _canonical_axis(axis, x.ndim)
    moved = jnp.moveaxis(x, ax, -1)
    vals, idx = _top_k_last_index(moved, top_k)
    res = vals if out_max_val else idx
    return jnp.moveaxis(res.astype(jnp.float32), -1, ax)


def _top_k_last_index(x: Array, k: int) -> tuple[Array, Array]:
    """Top-k along the last axis with ties going to the larger index first."""
    n = x.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"top_k {k} must be in [1, {n}]")
    flipped = jnp.flip(x, axis=-1)
    if k == 1:
        idx = jnp.argmax(flipped, axis=-1)[..., None]
        vals = jnp.take_along_axis(flipped, idx, axis=-1)
    else:
        vals, idx = lax.top_k(flipped, k)  # stable: equal values keep the lower flipped index
    return vals, (n - 1) - idx
