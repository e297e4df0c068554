"""The built-in Caffe layer types, one :class:`~fcn_jax.layer_table.LayerType` record each.

Each record says, for its type, how ``*_param`` is read (Caffe's defaults from
``caffe.proto``), its top shapes and learnable blobs (Caffe's ``Reshape``/``LayerSetUp``), its
window geometry, its Caffe-exact forward (``fcn_jax.layers``, NCHW) and, where one exists, its
fast form (``fcn_jax.nhwc``) with the rule for valid sizes in padded shape buckets. Importing
this module puts them in ``layer_table.LAYER_TYPES``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters import CaffeFormatError, UnsupportedLayerError

from . import layers as L
from . import losses
from . import nhwc as N
from .layer_table import (
    Context,
    Geo,
    LayerSpec,
    LayerType,
    Shape,
    add_layer_type,
    freeze,
    kernel_window,
    union,
    whole,
)
from .nhwc import Blob

Params = Mapping[str, Any]


def add_builtin(**kw) -> LayerType:
    return add_layer_type(LayerType(builtin=True, **kw), replace=True)


# ----------------------------------------------------------------------------- reading


def read_pair(values, h, w, default: int, has_h: bool, has_w: bool, what: str, layer: str
              ) -> tuple[int, int]:
    """Caffe's rule for kernel/pad/stride: ``*_h``/``*_w`` if given, else 1 or 2 repeated
    values, else ``default``."""
    if has_h or has_w:
        if not (has_h and has_w):
            raise CaffeFormatError(f"{what}_h and {what}_w must be given together",
                                   layer=layer, field=f"{what}_h")
        return int(h), int(w)
    vals = [int(v) for v in values]
    if not vals:
        return default, default
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise CaffeFormatError(f"only 2-D {what} is supported, got {len(vals)} values",
                           layer=layer, field=what)


def filler_of(f) -> tuple:
    return freeze({"type": f.type, "value": f.value, "min": f.min, "max": f.max,
                   "mean": f.mean, "std": f.std, "variance_norm": int(f.variance_norm),
                   "sparse": f.sparse})


def constant_filler(value: float) -> tuple:
    return freeze({"type": "constant", "value": value})


def _enum_name(msg, field: str) -> str:
    fd = msg.DESCRIPTOR.fields_by_name[field]
    return fd.enum_type.values_by_number[getattr(msg, field)].name


def _axis(axis: int, ndim: int, layer: str, field: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise CaffeFormatError(f"axis {axis} out of range for a {ndim}-D blob", layer=layer,
                               field=field)
    return axis % ndim


def need_4d(spec: LayerSpec, shape: Shape) -> None:
    if len(shape) != 4:
        raise CaffeFormatError(f"needs a 4-D bottom, got shape {tuple(shape)}",
                               layer=spec.name, field="bottom")


def same_valid(spec: LayerSpec, vs: list) -> list:
    return [vs[0]] * len(spec.tops)


def same_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    return union(geos, spec.name) if len(geos) > 1 else geos[0]


def _channel_axis(spec: LayerSpec) -> bool:
    return spec.cfg["axis"] in (1, -3)


def _channel_last(p: Any, dtype) -> Any:
    return jnp.asarray(p, dtype).reshape(-1)


# ----------------------------------------------------------------------------- inputs


def _read_input(lp) -> dict:
    if lp.type == "Input":
        return {"shapes": tuple(tuple(int(d) for d in s.dim) for s in lp.input_param.shape)}
    return {}


for _t in ("Input", "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData",
           "AnnotatedData"):
    add_builtin(name=_t, read=_read_input, out_shapes=None, is_input=True, bottoms=(0, 0),
                tops=(1, None))


# ----------------------------------------------------------------------------- convolution


def _conv_pair(p, what: str, default: int, name: str) -> tuple[int, int]:
    """base_conv_layer.cpp's rule for one of kernel/stride/pad: ``*_h``/``*_w`` (either
    alone: the other is its proto default, 0) and then no repeated values, else 1 or 2
    repeated values, else ``default``."""
    values = list(getattr(p, "kernel_size" if what == "kernel" else what))
    has_h, has_w = p.HasField(f"{what}_h"), p.HasField(f"{what}_w")
    if has_h or has_w:
        if values:
            field = "kernel_size" if what == "kernel" else what
            raise CaffeFormatError(f"either {field} or {what}_h/w should be specified; not "
                                   "both", layer=name, field=field)
        return int(getattr(p, f"{what}_h")), int(getattr(p, f"{what}_w"))
    return read_pair(values, 0, 0, default, False, False, what, name)


def read_kernel_geometry(p, name: str) -> dict:
    """Kernel, pad, stride and dilation of a ``ConvolutionParameter`` (Caffe's rules and
    defaults, ``base_conv_layer.cpp``), checked: positive kernel, stride and dilation."""
    kernel = _conv_pair(p, "kernel", 0, name)
    if min(kernel) <= 0:
        raise CaffeFormatError(f"filter dimensions must be nonzero, got {kernel}", layer=name,
                               field="kernel_size")
    pad = _conv_pair(p, "pad", 0, name)
    stride = _conv_pair(p, "stride", 1, name)
    if min(stride) <= 0 and (p.HasField("stride_h") or p.HasField("stride_w")):
        raise CaffeFormatError(f"stride {stride}: stride_h and stride_w are both needed "
                               "(Caffe reads the missing one as 0 and divides by it)",
                               layer=name, field="stride_w" if p.HasField("stride_h")
                               else "stride_h")
    dilation = read_pair(list(p.dilation), 0, 0, 1, False, False, "dilation", name)
    if min(stride) <= 0 or min(dilation) <= 0:
        raise CaffeFormatError("stride and dilation must be positive", layer=name,
                               field="stride")
    return {"kernel": kernel, "pad": pad, "stride": stride, "dilation": dilation}


def _read_conv(lp) -> dict:
    p = lp.convolution_param
    name = lp.name
    if p.axis not in (1, -3):  # the channel axis of a 4-D blob (checked with the shapes)
        raise CaffeFormatError(f"axis {p.axis}: only the channel axis (1) is supported",
                               layer=name, field="axis")
    geometry = read_kernel_geometry(p, name)
    if p.num_output <= 0:
        raise CaffeFormatError("num_output must be positive", layer=name, field="num_output")
    if p.group <= 0 or p.num_output % p.group:
        raise CaffeFormatError(f"num_output {p.num_output} is not divisible by group "
                               f"{p.group}", layer=name, field="group")
    return {"num_output": int(p.num_output), "bias_term": bool(p.bias_term), **geometry,
            "axis": int(p.axis),
            "group": int(p.group), "weight_filler": filler_of(p.weight_filler),
            "bias_filler": filler_of(p.bias_filler)}


def _conv_params(spec: LayerSpec, shapes: list[Shape]) -> dict:
    c = spec.cfg
    need_4d(spec, shapes[0])
    cin, g = shapes[0][1], c["group"]
    if cin % g:
        raise CaffeFormatError(f"input channels {cin} not divisible by group {g}",
                               layer=spec.name, field="group")
    kh, kw = c["kernel"]
    shape = ((c["num_output"], cin // g, kh, kw) if spec.type == "Convolution"
             else (cin, c["num_output"] // g, kh, kw))
    out = {"weight": (shape, c["weight_filler"])}
    if c["bias_term"]:
        out["bias"] = ((c["num_output"],), c["bias_filler"])
    return out


def conv_sizes(spec: LayerSpec, hw: Sequence[Any]) -> tuple:
    c = spec.cfg
    size = L.deconv_output_size if spec.type == "Deconvolution" else L.conv_output_size
    return tuple(size(v, k, s, q, d) for v, k, s, q, d in zip(
        hw, c["kernel"], c["stride"], c["pad"], c["dilation"], strict=True))


def _conv_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    need_4d(spec, x)
    _axis(spec.cfg.get("axis", 1), len(x), spec.name)
    hw = conv_sizes(spec, x[2:])
    if min(hw) <= 0:
        raise CaffeFormatError(f"output size {hw} is not positive for bottom {x}",
                               layer=spec.name, field="kernel_size")
    return [(x[0], spec.cfg["num_output"]) + hw]


def _conv(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    c = spec.cfg
    fn = L.convolution if spec.type == "Convolution" else L.deconvolution
    return [fn(xs[0], p["weight"], p.get("bias"), stride=c["stride"], pad=c["pad"],
               dilation=c["dilation"], group=c["group"])]


def _conv_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    c = spec.cfg
    fn = N.conv_nhwc if spec.type == "Convolution" else N.deconv_nhwc
    return [Blob(nhwc=fn(bl[0].nhwc(), p["weight"], p.get("bias"), stride=c["stride"],
                         pad=c["pad"], dilation=c["dilation"], group=c["group"],
                         precision=ctx.precision, valid=vs[0]))]


def conv_workspace(spec: LayerSpec, shapes: list[Shape], tops: list[Shape]) -> int:
    """The zero-padded input (convolution), or the full uncropped output (deconvolution)."""
    c, (n, ch, h, w) = spec.cfg, shapes[0]
    if spec.type != "Deconvolution":
        pads = L.conv_padding((h, w), c["kernel"], c["stride"], c["pad"], c["dilation"])
        return n * ch * (h + sum(pads[0])) * (w + sum(pads[1]))
    ext = [d * (k - 1) + 1 for k, d in zip(c["kernel"], c["dilation"], strict=True)]
    full = [s * (v + -(-e // s) - 1) for v, e, s in zip((h, w), ext, c["stride"], strict=True)]
    return n * tops[0][1] * full[0] * full[1]


def conv_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    c = spec.cfg
    return kernel_window(geos[0], c["kernel"], c["stride"], c["pad"], c["dilation"])


def _deconv_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    raise ValueError(f"{spec.name}: receptive fields through Deconvolution are not supported")


for _t, _win in (("Convolution", conv_window), ("Deconvolution", _deconv_window)):
    add_builtin(name=_t, read=_read_conv, out_shapes=_conv_shapes, param_shapes=_conv_params,
                forward=_conv, forward_nhwc=_conv_nhwc, window=_win, workspace=conv_workspace,
                valid_sizes=lambda spec, vs: [conv_sizes(spec, vs[0])])


# ----------------------------------------------------------------------------- InnerProduct


def _read_ip(lp) -> dict:
    p = lp.inner_product_param
    if p.num_output <= 0:
        raise CaffeFormatError("num_output must be positive", layer=lp.name, field="num_output")
    return {"num_output": int(p.num_output), "bias_term": bool(p.bias_term),
            "axis": int(p.axis), "transpose": bool(p.transpose),
            "weight_filler": filler_of(p.weight_filler), "bias_filler": filler_of(p.bias_filler)}


def _ip_params(spec: LayerSpec, shapes: list[Shape]) -> dict:
    c = spec.cfg
    axis = _axis(c["axis"], len(shapes[0]), spec.name)
    k, n = math.prod(shapes[0][axis:]), c["num_output"]
    out = {"weight": ((k, n) if c["transpose"] else (n, k), c["weight_filler"])}
    if c["bias_term"]:
        out["bias"] = ((n,), c["bias_filler"])
    return out


def _ip_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    axis = _axis(spec.cfg["axis"], len(x), spec.name)
    return [tuple(x[:axis]) + (spec.cfg["num_output"],)]


def _ip(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    c = spec.cfg
    return [L.inner_product(xs[0], p["weight"], p.get("bias"), axis=c["axis"],
                            transpose=c["transpose"])]


def _ip_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    if spec.cfg["axis"] != 1 or len(bl[0].shape) < 2:
        return None
    x = bl[0].nchw()  # Caffe flattens in (C, H, W) order
    return [Blob(nchw=N.inner_product_nhwc(x.reshape(x.shape[0], -1), p["weight"],
                                           p.get("bias"), transpose=spec.cfg["transpose"],
                                           precision=ctx.precision))]


def _whole_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    return whole(geos[0], shapes[0][2:]) if len(shapes[0]) == 4 else geos[0]


add_builtin(name="InnerProduct", read=_read_ip, out_shapes=_ip_shapes, param_shapes=_ip_params,
            forward=_ip, forward_nhwc=_ip_nhwc, window=_whole_window, fast_any_rank=True)


# ----------------------------------------------------------------------------- Pooling


def _read_pool(lp) -> dict:
    p = lp.pooling_param
    name = lp.name
    if p.pool == 2:
        raise UnsupportedLayerError("STOCHASTIC pooling is not supported", layer=name,
                                    field="pool")
    glob = bool(p.global_pooling)
    has = p.HasField
    # pooling_layer.cpp LayerSetUp's checks, in its order and with its words
    if glob and (has("kernel_size") or has("kernel_h") or has("kernel_w")):
        raise CaffeFormatError("with global_pooling: true filter size cannot be specified",
                               layer=name, field="kernel_size")
    if not glob:
        if has("kernel_size") == (has("kernel_h") and has("kernel_w")):
            raise CaffeFormatError("filter size is kernel_size OR kernel_h and kernel_w; "
                                   "not both" if has("kernel_size") else "for non-square "
                                   "filters both kernel_h and kernel_w are required",
                                   layer=name, field="kernel_size")
    for what in ("pad", "stride"):
        if not ((not has(what) and has(f"{what}_h") and has(f"{what}_w"))
                or (not has(f"{what}_h") and not has(f"{what}_w"))):
            raise CaffeFormatError(f"{what} is {what} OR {what}_h and {what}_w are required",
                                   layer=name, field=what)
    kernel = (0, 0)
    if not glob:
        kernel = ((int(p.kernel_size),) * 2 if has("kernel_size")
                  else (int(p.kernel_h), int(p.kernel_w)))
        if min(kernel) <= 0:
            raise CaffeFormatError("kernel size must be positive", layer=name,
                                   field="kernel_size")
    pad = (int(p.pad_h), int(p.pad_w)) if has("pad_h") else (int(p.pad),) * 2
    stride = (int(p.stride_h), int(p.stride_w)) if has("stride_h") else (int(p.stride),) * 2
    if glob and (pad != (0, 0) or stride != (1, 1)):
        raise CaffeFormatError("with global_pooling: true only pad = 0 and stride = 1",
                               layer=name, field="pad" if pad != (0, 0) else "stride")
    if min(stride) <= 0:
        raise CaffeFormatError("stride must be positive", layer=name, field="stride")
    if not glob and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
        raise CaffeFormatError("pad must be smaller than kernel", layer=name, field="pad")
    return {"method": "MAX" if p.pool == 0 else "AVE", "kernel": kernel, "pad": pad,
            "stride": stride, "ceil_mode": p.round_mode == 0, "global_pooling": glob}


def _pool_sizes(spec: LayerSpec, hw: Sequence[Any]) -> tuple:
    c = spec.cfg
    clip = any(q > 0 for q in c["pad"])
    return tuple(L.pooling_output_size(v, k, s, q, c["ceil_mode"], clip=clip)
                 for v, k, s, q in zip(hw, c["kernel"], c["stride"], c["pad"], strict=True))


def _pool_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    need_4d(spec, x)
    if spec.cfg["global_pooling"]:
        return [(x[0], x[1], 1, 1)]
    hw = tuple(int(v) for v in _pool_sizes(spec, x[2:]))
    if min(hw) <= 0:
        raise CaffeFormatError(f"output size {hw} is not positive for bottom {x}",
                               layer=spec.name, field="kernel_size")
    return [(x[0], x[1]) + hw]


def _pool_workspace(spec: LayerSpec, shapes: list[Shape], tops: list[Shape]) -> int:
    """The input padded to cover every window, ceil-mode overhang included."""
    c, (n, ch, h, w) = spec.cfg, shapes[0]
    if c["global_pooling"]:
        return n * ch * h * w
    hp, wp = ((o - 1) * s + k for o, s, k in zip(tops[0][2:], c["stride"], c["kernel"],
                                                  strict=True))
    return n * ch * max(hp, h) * max(wp, w)


def _pool(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    c = spec.cfg
    return [L.pooling(xs[0], method=c["method"], kernel=c["kernel"], stride=c["stride"],
                      pad=c["pad"], ceil_mode=c["ceil_mode"],
                      global_pooling=c["global_pooling"])]


def _pool_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    c = spec.cfg
    return [Blob(nhwc=N.pool_nhwc(bl[0].nhwc(), method=c["method"], kernel=c["kernel"],
                                  stride=c["stride"], pad=c["pad"], ceil_mode=c["ceil_mode"],
                                  global_pooling=c["global_pooling"], valid=vs[0]))]


def _pool_valid(spec: LayerSpec, vs: list) -> list:
    v0 = vs[0]
    if spec.cfg["global_pooling"]:
        return [(jnp.ones_like(v0[0]), jnp.ones_like(v0[1]))]
    return [_pool_sizes(spec, v0)]


def _pool_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    c = spec.cfg
    if c["global_pooling"]:
        return whole(geos[0], shapes[0][2:])
    return kernel_window(geos[0], c["kernel"], c["stride"], c["pad"])


add_builtin(name="Pooling", read=_read_pool, out_shapes=_pool_shapes, forward=_pool,
            forward_nhwc=_pool_nhwc, window=_pool_window, valid_sizes=_pool_valid,
            workspace=_pool_workspace)


# ----------------------------------------------------------------------------- LRN


def _read_lrn(lp) -> dict:
    p = lp.lrn_param
    if p.local_size % 2 == 0:
        raise CaffeFormatError("local_size must be odd", layer=lp.name, field="local_size")
    return {"local_size": int(p.local_size), "alpha": float(p.alpha), "beta": float(p.beta),
            "k": float(p.k), "norm_region": _enum_name(p, "norm_region")}


def _lrn(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    c = spec.cfg
    return [L.lrn(xs[0], local_size=c["local_size"], alpha=c["alpha"], beta=c["beta"],
                  k=c["k"], norm_region=c["norm_region"])]


def _lrn_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    c = spec.cfg
    return [Blob(nhwc=N.lrn_nhwc(bl[0].nhwc(), local_size=c["local_size"], alpha=c["alpha"],
                                 beta=c["beta"], k=c["k"], norm_region=c["norm_region"],
                                 valid=vs[0]))]


def _lrn_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    c = spec.cfg
    if c["norm_region"] != "WITHIN_CHANNEL":
        return geos[0]
    r = (c["local_size"] - 1) // 2
    return tuple((s - r * j, j, z + 2 * r * j) for s, j, z in geos[0])


def _lrn_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    need_4d(spec, shapes[0])
    return [shapes[0]]


def _lrn_workspace(spec: LayerSpec, shapes: list[Shape], tops: list[Shape]) -> int:
    n, ch, h, w = shapes[0]
    pad = spec.cfg["local_size"] - 1  # the windows are clipped to the blob (2 * size - 1)
    if spec.cfg["norm_region"] == "ACROSS_CHANNELS":  # wide windows pad inside reduce_window
        return n * (ch + min(pad, 2 * (ch - 1), N.WINDOW_SLICES_MAX)) * h * w
    return n * ch * (h + min(pad, 2 * (h - 1))) * (w + min(pad, 2 * (w - 1)))


add_builtin(name="LRN", read=_read_lrn, out_shapes=_lrn_shapes, forward=_lrn,
            forward_nhwc=_lrn_nhwc, window=_lrn_window, valid_sizes=same_valid,
            workspace=_lrn_workspace)


# ----------------------------------------------------------------------------- element-wise


def _elementwise(name: str, read, fn, fast=None) -> None:
    """An element-wise type: ``fn(x, cfg)`` runs in whichever layout the bottom has."""
    fast = fast or fn

    def forward(spec, xs, p, ctx):
        return [fn(xs[0], spec.cfg)]

    def forward_nhwc(spec, bl, p, ctx, vs):
        if not bl[0].has_nhwc:
            return [Blob(nchw=fast(bl[0].nchw(), spec.cfg))]
        return [Blob(nhwc=fast(bl[0].nhwc(), spec.cfg))]

    add_builtin(name=name, read=read, forward=forward, forward_nhwc=forward_nhwc,
                window=same_window, valid_sizes=same_valid, fast_any_rank=True)


_elementwise("ReLU", lambda lp: {"negative_slope": float(lp.relu_param.negative_slope)},
             lambda x, c: L.relu(x, c["negative_slope"]),
             lambda x, c: N.relu(x, c["negative_slope"]))
_elementwise("Sigmoid", None, lambda x, c: L.sigmoid(x))
_elementwise("TanH", None, lambda x, c: L.tanh(x))
_elementwise("AbsVal", None, lambda x, c: L.absval(x))
_elementwise("BNLL", None, lambda x, c: L.bnll(x))
_elementwise("Power", lambda lp: {"power": float(lp.power_param.power),
                                  "scale": float(lp.power_param.scale),
                                  "shift": float(lp.power_param.shift)},
             lambda x, c: L.power(x, c["power"], c["scale"], c["shift"]))
_elementwise("ELU", lambda lp: {"alpha": float(lp.elu_param.alpha)},
             lambda x, c: L.elu(x, c["alpha"]))
def _read_base(lp, field: str, refuse_one: bool) -> dict:
    """exp_layer.cpp / log_layer.cpp LayerSetUp: ``log(base)`` (and for Log ``1/log(base)``)
    must be finite, else Caffe's CHECK stops; refused here naming the field."""
    p = getattr(lp, field)
    base = float(p.base)
    if base != -1.0:
        with np.errstate(all="ignore"):
            log_base = np.log(np.float32(base))
            bad = not np.isfinite(log_base) or (refuse_one and not np.isfinite(
                np.float32(1) / log_base))
        if bad:
            what = "1 / log(base)" if np.isfinite(log_base) else "log(base)"
            raise CaffeFormatError(f"base {base}: {what} is not finite (Caffe refuses it)",
                                   layer=lp.name, field=f"{field}.base")
    return {"base": base, "scale": float(p.scale), "shift": float(p.shift)}


_elementwise("Exp", lambda lp: _read_base(lp, "exp_param", False),
             lambda x, c: L.exp(x, c["base"], c["scale"], c["shift"]))
_elementwise("Log", lambda lp: _read_base(lp, "log_param", True),
             lambda x, c: L.log(x, c["base"], c["scale"], c["shift"]))
_elementwise("Threshold", lambda lp: {"threshold": float(lp.threshold_param.threshold)},
             lambda x, c: L.threshold(x, c["threshold"]))


# Dropout: identity in TEST; in training the same random mask as ``layers.dropout`` draws
# for the NCHW blob, in either layout.


def _dropout(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    ratio = spec.cfg["ratio"]
    if not ctx.train:
        return [xs[0]]
    return [L.dropout(xs[0], ratio, deterministic=False, rng=ctx.key(spec.name))]


def _dropout_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    ratio = spec.cfg["ratio"]
    if not ctx.train or ratio == 0.0:
        return [bl[0]]
    if not bl[0].has_nhwc:
        return None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dropout ratio must be in [0, 1), got {ratio}")
    x = bl[0].nhwc()
    n, h, w, ch = x.shape
    keep = N.to_nhwc(jax.random.bernoulli(ctx.key(spec.name), 1.0 - ratio, (n, ch, h, w)))
    y = jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - ratio), x.dtype), jnp.zeros_like(x))
    return [Blob(nhwc=y)]


add_builtin(name="Dropout", read=lambda lp: {"ratio": float(lp.dropout_param.dropout_ratio)},
            forward=_dropout, forward_nhwc=_dropout_nhwc, window=same_window,
            valid_sizes=same_valid, fast_any_rank=True)


def _read_prelu(lp) -> dict:
    p = lp.prelu_param
    filler = filler_of(p.filler) if p.HasField("filler") else constant_filler(0.25)
    return {"channel_shared": bool(p.channel_shared), "filler": filler}


def _prelu_params(spec: LayerSpec, shapes: list[Shape]) -> dict:
    if spec.cfg["channel_shared"]:
        return {"slope": ((), spec.cfg["filler"])}
    if len(shapes[0]) < 2:
        raise CaffeFormatError(f"needs a bottom with channels, got shape {shapes[0]}",
                               layer=spec.name, field="bottom")
    return {"slope": ((shapes[0][1],), spec.cfg["filler"])}


def _prelu(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    return [L.prelu(xs[0], p["slope"], channel_shared=spec.cfg["channel_shared"])]


def _prelu_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    nhwc = bl[0].has_nhwc
    x = bl[0].nhwc() if nhwc else bl[0].nchw()
    slope = jnp.asarray(p["slope"], x.dtype)
    slope = (slope.reshape(()) if spec.cfg["channel_shared"] else
             slope.reshape(-1) if nhwc else slope.reshape((-1,) + (1,) * (x.ndim - 2)))
    y = jnp.maximum(x, 0) + slope * jnp.minimum(x, 0)
    return [Blob(nhwc=y) if nhwc else Blob(nchw=y)]


add_builtin(name="PReLU", read=_read_prelu, param_shapes=_prelu_params, forward=_prelu,
            forward_nhwc=_prelu_nhwc, window=same_window, valid_sizes=same_valid,
            fast_any_rank=True)


# ----------------------------------------------------------------------------- Softmax


def _softmax_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    if not _channel_axis(spec):
        return None
    x = bl[0].nhwc()
    if x.dtype in (jnp.bfloat16, jnp.float16):  # exponentials in float32
        x = x.astype(jnp.float32)
    return [Blob(nhwc=L.softmax(x, axis=-1))]


def _softmax_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    if len(shapes[0]) == 4 and spec.cfg["axis"] % 4 in (2, 3):
        return whole(geos[0], shapes[0][2:])
    return geos[0]


add_builtin(name="Softmax", read=lambda lp: {"axis": int(lp.softmax_param.axis)},
            forward=lambda spec, xs, p, ctx: [L.softmax(xs[0], spec.cfg["axis"])],
            forward_nhwc=_softmax_nhwc, window=_softmax_window, valid_sizes=same_valid,
            bucketable=_channel_axis)


# ---------------------------------------------------------------------- BatchNorm, Scale, Bias


def _read_bn(lp) -> dict:
    p = lp.batch_norm_param
    return {"eps": float(p.eps),
            "use_global_stats": bool(p.use_global_stats) if p.HasField("use_global_stats")
            else None}


def _bn_params(spec: LayerSpec, shapes: list[Shape]) -> dict:
    ch = shapes[0][1] if len(shapes[0]) > 1 else 1
    zero = constant_filler(0.0)
    return {"mean": ((ch,), zero), "variance": ((ch,), zero), "scale_factor": ((1,), zero)}


def _bn_global(spec: LayerSpec, ctx: Context) -> bool:
    g = spec.cfg["use_global_stats"]
    return g if g is not None else not ctx.train


def _bn(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    return [L.batch_norm(xs[0], p["mean"], p["variance"], p["scale_factor"],
                         eps=spec.cfg["eps"], use_global_stats=_bn_global(spec, ctx))]


def _bn_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    if not _bn_global(spec, ctx):
        if vs[0] is not None:
            raise ValueError(f"{spec.name}: BatchNorm with batch statistics cannot run on "
                             "inputs padded to a bucket shape")
        return None
    x = bl[0].nhwc()
    factor = jnp.asarray(p["scale_factor"], x.dtype).reshape(-1)[0]
    s = jnp.where(factor == 0, jnp.zeros_like(factor), 1 / factor)
    mu = _channel_last(p["mean"], x.dtype) * s
    var = _channel_last(p["variance"], x.dtype) * s
    return [Blob(nhwc=(x - mu) / jnp.sqrt(var + spec.cfg["eps"]))]


add_builtin(name="BatchNorm", read=_read_bn, param_shapes=_bn_params, forward=_bn,
            forward_nhwc=_bn_nhwc, window=same_window, valid_sizes=same_valid,
            bucketable=lambda spec: spec.cfg["use_global_stats"] is not False)


def _read_scale(lp) -> dict:
    p = lp.scale_param
    filler = filler_of(p.filler) if p.HasField("filler") else constant_filler(1.0)
    return {"axis": int(p.axis), "num_axes": int(p.num_axes), "bias_term": bool(p.bias_term),
            "filler": filler, "bias_filler": filler_of(p.bias_filler)}


def _read_bias(lp) -> dict:
    p = lp.bias_param
    return {"axis": int(p.axis), "num_axes": int(p.num_axes), "filler": filler_of(p.filler)}


def _scale_params(spec: LayerSpec, shapes: list[Shape]) -> dict:
    c = spec.cfg
    if len(shapes) > 1:
        # scale_layer.cpp: with a second bottom, the bias spans bottom[1]'s axes
        if not (spec.type == "Scale" and c["bias_term"]):
            return {}
        shp, n = shapes[0], len(shapes[1])
        axis = 0 if n == 0 else _axis(c["axis"], len(shp), spec.name)
        return {"bias": (tuple(shp[axis:axis + n]), c["bias_filler"])}
    shp = shapes[0]
    axis = _axis(c["axis"], len(shp), spec.name) if shp else 0
    if c["num_axes"] < -1 or axis + c["num_axes"] > len(shp):
        raise CaffeFormatError(f"num_axes {c['num_axes']} out of range for a {len(shp)}-D "
                               f"blob from axis {axis}", layer=spec.name, field="num_axes")
    end = len(shp) if c["num_axes"] == -1 else axis + c["num_axes"]
    pshape = tuple(shp[axis:end])
    if spec.type == "Bias":
        return {"bias": (pshape, c["filler"])}
    out = {"scale": (pshape, c["filler"])}
    if c["bias_term"]:
        out["bias"] = (pshape, c["bias_filler"])
    return out


def _scale(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    axis = spec.cfg["axis"]
    if spec.type == "Scale":
        s = p["scale"] if len(xs) == 1 else xs[1]
        return [L.scale(xs[0], s, p.get("bias"), axis=axis)]
    b = p["bias"] if len(xs) == 1 else xs[1]
    return [L.bias(xs[0], b, axis=axis)]


def _scale_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    key = "scale" if spec.type == "Scale" else "bias"
    if len(bl) != 1 or not _channel_axis(spec) or len(jnp.shape(p[key])) != 1:
        return None
    x = bl[0].nhwc()
    if spec.type == "Scale":
        y = x * _channel_last(p["scale"], x.dtype)
        if "bias" in p:
            y = y + _channel_last(p["bias"], x.dtype)
    else:
        y = x + _channel_last(p["bias"], x.dtype)
    return [Blob(nhwc=y)]


def _scale_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    return geos[0]  # bottom[1] (if any) only scales


for _t, _read in (("Scale", _read_scale), ("Bias", _read_bias)):
    add_builtin(name=_t, read=_read, param_shapes=_scale_params, forward=_scale,
                forward_nhwc=_scale_nhwc, window=_scale_window, valid_sizes=same_valid,
                bucketable=lambda spec: len(spec.bottoms) == 1 and _channel_axis(spec),
                bottoms=(1, 2))


# ----------------------------------------------------------------------------- several blobs


def _eltwise(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    c = spec.cfg
    return [L.eltwise(xs, c["operation"], c["coeff"] or None)]


def _eltwise_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    c = spec.cfg
    if bl[0].has_nhwc:
        return [Blob(nhwc=L.eltwise([b.nhwc() for b in bl], c["operation"],
                                    c["coeff"] or None))]
    return [Blob(nchw=L.eltwise([b.nchw() for b in bl], c["operation"], c["coeff"] or None))]


def _eltwise_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    if any(s != shapes[0] for s in shapes):
        raise CaffeFormatError(f"bottoms have different shapes {shapes}", layer=spec.name,
                               field="bottom")
    return [shapes[0]]


add_builtin(name="Eltwise", read=lambda lp: {"operation": _enum_name(lp.eltwise_param, "operation"),
                                      "coeff": tuple(lp.eltwise_param.coeff)},
            out_shapes=_eltwise_shapes, forward=_eltwise, forward_nhwc=_eltwise_nhwc,
            window=same_window, valid_sizes=same_valid, bottoms=(2, None), fast_any_rank=True)


def _read_concat(lp) -> dict:
    p = lp.concat_param
    return {"axis": int(p.axis) if p.HasField("axis") or not p.HasField("concat_dim")
            else int(p.concat_dim)}


def _concat_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    axis = _axis(spec.cfg["axis"], len(x), spec.name)
    for s in shapes[1:]:
        if len(s) != len(x) or any(a != b for i, (a, b) in enumerate(zip(s, x, strict=True))
                                   if i != axis):
            raise CaffeFormatError(f"bottom shapes {shapes} differ off axis {axis}",
                                   layer=spec.name, field="bottom")
    return [x[:axis] + (sum(s[axis] for s in shapes),) + x[axis + 1:]]


def _concat_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    if not _channel_axis(spec):
        return None
    return [Blob(nhwc=jnp.concatenate([b.nhwc() for b in bl], axis=-1))]


def _concat_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    if spec.cfg["axis"] % len(shapes[0]) not in (0, 1):
        raise ValueError(f"{spec.name}: spatial Concat is not supported")
    return same_window(spec, geos, shapes)


add_builtin(name="Concat", read=_read_concat, out_shapes=_concat_shapes,
            forward=lambda spec, xs, p, ctx: [L.concat(xs, spec.cfg["axis"])],
            forward_nhwc=_concat_nhwc, window=_concat_window, valid_sizes=same_valid,
            bucketable=_channel_axis, bottoms=(1, None))


def _read_slice(lp) -> dict:
    p = lp.slice_param
    return {"axis": int(p.axis) if p.HasField("axis") or not p.HasField("slice_dim")
            else int(p.slice_dim), "slice_points": tuple(int(s) for s in p.slice_point)}


def _slice_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x, n = shapes[0], len(spec.tops)
    axis = _axis(spec.cfg["axis"], len(x), spec.name)
    sp = spec.cfg["slice_points"]
    if sp:
        if len(sp) != n - 1:
            raise CaffeFormatError(f"{len(sp)} slice points for {n} tops", layer=spec.name,
                                   field="slice_point")
        points = [0, *sp, x[axis]]
    else:
        if x[axis] % n:
            raise CaffeFormatError(f"axis {axis} of size {x[axis]} does not split into {n} "
                                   "equal tops", layer=spec.name, field="slice_point")
        points = [i * (x[axis] // n) for i in range(n + 1)]
    if any(b <= a for a, b in zip(points[:-1], points[1:], strict=True)):
        raise CaffeFormatError(f"slice points {list(sp)} are not increasing inside "
                               f"(0, {x[axis]})", layer=spec.name, field="slice_point")
    return [x[:axis] + (b - a,) + x[axis + 1:] for a, b in zip(points[:-1], points[1:],
                                                                strict=True)]


def _slice_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    if spec.cfg["axis"] % len(shapes[0]) not in (0, 1):
        raise ValueError(f"{spec.name}: spatial Slice is not supported")
    return geos[0]


add_builtin(name="Slice", read=_read_slice, out_shapes=_slice_shapes,
            forward=lambda spec, xs, p, ctx: list(L.slice_blob(
         xs[0], axis=spec.cfg["axis"], slice_points=spec.cfg["slice_points"],
         num_tops=len(spec.tops))),
            window=_slice_window, tops=(1, None))

add_builtin(name="Split", forward=lambda spec, xs, p, ctx: [xs[0]] * len(spec.tops),
            forward_nhwc=lambda spec, bl, p, ctx, vs: [bl[0]] * len(spec.tops),
            window=same_window, valid_sizes=same_valid, tops=(1, None), fast_any_rank=True)

add_builtin(name="Silence", out_shapes=lambda spec, shapes: [], forward=lambda spec, xs, p, ctx: [],
            window=same_window, valid_sizes=lambda spec, vs: [], bottoms=(1, None), tops=(0, 0))


# ----------------------------------------------------------------------------- reshaping


def _flatten_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    a = _axis(spec.cfg["axis"], len(x), spec.name)
    e = _axis(spec.cfg["end_axis"], len(x), spec.name, "end_axis")
    return [x[:a] + (math.prod(x[a:e + 1]),) + x[e + 1:]]


add_builtin(name="Flatten", read=lambda lp: {"axis": int(lp.flatten_param.axis),
                                      "end_axis": int(lp.flatten_param.end_axis)},
            out_shapes=_flatten_shapes,
            forward=lambda spec, xs, p, ctx: [L.flatten(xs[0], spec.cfg["axis"],
                                                 spec.cfg["end_axis"])],
            window=_whole_window)


def _reshape_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x, c = shapes[0], spec.cfg
    start = _axis(c["axis"], len(x) + 1, spec.name)
    if c["num_axes"] < -1 or start + c["num_axes"] > len(x):
        raise CaffeFormatError(f"num_axes {c['num_axes']} out of range for a {len(x)}-D blob "
                               f"from axis {start}", layer=spec.name, field="num_axes")
    end = len(x) if c["num_axes"] == -1 else start + c["num_axes"]
    dims = list(c["shape"])
    out = [x[start + i] if d == 0 else d for i, d in enumerate(dims)]
    if out.count(-1) > 1 or any(d < -1 for d in out):
        raise CaffeFormatError("at most one dim may be -1, none below it", layer=spec.name,
                               field="reshape_param.shape")
    known = math.prod(d for d in out if d != -1) * math.prod(x[:start]) * math.prod(x[end:])
    if known == 0 or math.prod(x) % known or (-1 not in out and known != math.prod(x)):
        raise CaffeFormatError(f"cannot reshape {x} to {dims}", layer=spec.name,
                               field="reshape_param.shape")
    if -1 in out:
        out[out.index(-1)] = math.prod(x) // known
    return [tuple(x[:start]) + tuple(out) + tuple(x[end:])]


def _read_reshape(lp) -> dict:
    p = lp.reshape_param
    return {"shape": tuple(int(d) for d in p.shape.dim), "axis": int(p.axis),
            "num_axes": int(p.num_axes)}


add_builtin(name="Reshape", read=_read_reshape,
            out_shapes=_reshape_shapes,
            forward=lambda spec, xs, p, ctx: [L.reshape(xs[0], spec.cfg["shape"], spec.cfg["axis"],
                                                 spec.cfg["num_axes"])])


def _crop_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    axis = _axis(spec.cfg["axis"], len(x), spec.name)
    return [x[:axis] + shapes[1][axis:]]


def _crop_valid(spec: LayerSpec, vs: list) -> list:
    if vs[0] is None or len(vs) < 2:
        return [vs[0]]
    axis = spec.cfg["axis"] % 4
    return [vs[1] if axis <= 2 else (vs[0][0], vs[1][1])]


def _crop_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    g = list(geos[0])  # bottom[1] gives the shape only
    axis = spec.cfg["axis"] % 4
    offs = spec.cfg["offset"]
    for a in range(2):
        if 2 + a >= axis and offs:
            off = offs[0] if len(offs) == 1 else offs[2 + a - axis]
            s, j, z = g[a]
            g[a] = (s + off * j, j, z)
    return tuple(g)


add_builtin(name="Crop", read=lambda lp: {"axis": int(lp.crop_param.axis),
                                   "offset": tuple(int(o) for o in lp.crop_param.offset)},
            out_shapes=_crop_shapes,
            forward=lambda spec, xs, p, ctx: [L.crop(xs[0], xs[1].shape, axis=spec.cfg["axis"],
                                              offset=spec.cfg["offset"])],
            window=_crop_window, valid_sizes=_crop_valid,
            bucketable=lambda spec: spec.cfg["axis"] % 4 != 0, bottoms=(2, 2))


def _read_argmax(lp) -> dict:
    p = lp.argmax_param
    return {"axis": int(p.axis) if p.HasField("axis") else None, "top_k": int(p.top_k),
            "out_max_val": bool(p.out_max_val)}


def _argmax_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x, c = shapes[0], spec.cfg
    if c["axis"] is not None:
        axis = _axis(c["axis"], len(x), spec.name)
        return [x[:axis] + (c["top_k"],) + x[axis + 1:]]
    out = [1] * max(len(x), 3)
    out[0], out[1], out[2] = x[0], 2 if c["out_max_val"] else 1, c["top_k"]
    return [tuple(out)]


add_builtin(name="ArgMax", read=_read_argmax, out_shapes=_argmax_shapes,
            forward=lambda spec, xs, p, ctx: [L.argmax(xs[0], axis=spec.cfg["axis"],
                                                top_k=spec.cfg["top_k"],
                                                out_max_val=spec.cfg["out_max_val"])],
            window=lambda spec, geos, shapes: (geos[0] if spec.cfg["axis"] in (1, -3)
                                        else whole(geos[0], shapes[0][2:])),
            valid_sizes=same_valid, bucketable=lambda spec: spec.cfg["axis"] in (1, -3))


# ----------------------------------------------------------------------------- losses


def _read_softmax_loss(lp) -> dict:
    lpar = lp.loss_param
    if lpar.HasField("normalization"):
        norm = _enum_name(lpar, "normalization")
    else:
        norm = "VALID" if not lpar.HasField("normalize") or lpar.normalize else "BATCH_SIZE"
    return {"axis": int(lp.softmax_param.axis),
            "ignore_label": int(lpar.ignore_label) if lpar.HasField("ignore_label") else None,
            "normalization": norm}


def _read_accuracy(lp) -> dict:
    p = lp.accuracy_param
    return {"top_k": int(p.top_k), "axis": int(p.axis),
            "ignore_label": int(p.ignore_label) if p.HasField("ignore_label") else None}


add_builtin(name="SoftmaxWithLoss", read=_read_softmax_loss,
            out_shapes=lambda spec, shapes: [()],
            forward=lambda spec, xs, p, ctx: [losses.softmax_with_loss(
         xs[0], xs[1], axis=spec.cfg["axis"], ignore_label=spec.cfg["ignore_label"],
         normalization=spec.cfg["normalization"])],
            bottoms=(2, 2))
add_builtin(name="Accuracy", read=_read_accuracy, out_shapes=lambda spec, shapes: [()],
            forward=lambda spec, xs, p, ctx: [losses.accuracy(
         xs[0], xs[1], top_k=spec.cfg["top_k"], axis=spec.cfg["axis"],
         ignore_label=spec.cfg["ignore_label"])],
            bottoms=(2, 2))

from . import fork_layers  # noqa: F401,E402  (layer types of Caffe forks)
