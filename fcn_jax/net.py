"""Run any Caffe net definition as a Flax module: ``load_caffe(prototxt, caffemodel)``.

A prototxt is compiled once into a tuple of frozen ``LayerSpec`` (type, bottoms, tops and
the layer's parameters with Caffe's defaults resolved). ``CaffeGraph`` executes them in a
valid order and returns every blob by its Caffe name, as ``net.blobs`` would hold it after
``net.forward()`` (in-place layers overwrite their blob).

Params are ``params[layer_name][blob_name]`` in Caffe's shapes (see ``converters.PARAM_NAMES``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import converters
from converters import CaffeFormatError, UnsupportedLayerError
from converters.caffe_io import param_names
from converters.fcn import INPUT_TYPES, topo_order

from . import fast as F
from . import layers as L
from . import losses

Array = jax.Array
PathLike = str | os.PathLike
# INPUT_TYPES (converters.fcn): layer types whose tops are the module's inputs.


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One Caffe layer, with its parameters resolved to plain Python values."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    attrs: tuple = ()
    lr_mults: tuple[float, ...] = ()
    decay_mults: tuple[float, ...] = ()

    @property
    def cfg(self) -> dict[str, Any]:
        return dict(self.attrs)


# ----------------------------------------------------------------------------- extraction


def _hw(values, h: int | None, w: int | None, default: int, has_h: bool, has_w: bool,
        what: str, layer: str) -> tuple[int, int]:
    """Caffe's rule for kernel/pad/stride: *_h/*_w if given, else 1 or 2 repeated values."""
    if has_h or has_w:
        if not (has_h and has_w):
            raise CaffeFormatError(f"{what}_h and {what}_w must be given together",
                                   layer=layer, field=f"{what}_h")
        return int(h), int(w)
    vals = [int(v) for v in values] if isinstance(values, (list, tuple)) or hasattr(
        values, "__len__") else [int(values)]
    if not vals:
        return default, default
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise CaffeFormatError(f"only 2-D {what} is supported, got {len(vals)} values",
                           layer=layer, field=what)


def _filler(f) -> tuple:
    return _freeze({"type": f.type, "value": f.value, "min": f.min, "max": f.max,
                    "mean": f.mean, "std": f.std, "variance_norm": int(f.variance_norm),
                    "sparse": f.sparse})


def _conv_attrs(lp) -> dict:
    p = lp.convolution_param
    name = lp.name
    if p.axis != 1:
        raise CaffeFormatError("only axis 1 is supported", layer=name, field="axis")
    kernel = _hw(list(p.kernel_size), p.kernel_h, p.kernel_w, 0, p.HasField("kernel_h"),
                 p.HasField("kernel_w"), "kernel", name)
    if min(kernel) <= 0:
        raise CaffeFormatError("kernel size must be positive", layer=name, field="kernel_size")
    pad = _hw(list(p.pad), p.pad_h, p.pad_w, 0, p.HasField("pad_h"), p.HasField("pad_w"),
              "pad", name)
    stride = _hw(list(p.stride), p.stride_h, p.stride_w, 1, p.HasField("stride_h"),
                 p.HasField("stride_w"), "stride", name)
    dil = list(p.dilation)
    dilation = (1, 1) if not dil else (dil[0], dil[0]) if len(dil) == 1 else tuple(dil[:2])
    if p.num_output <= 0:
        raise CaffeFormatError("num_output must be positive", layer=name, field="num_output")
    if p.group <= 0 or p.num_output % p.group:
        raise CaffeFormatError(f"num_output {p.num_output} is not divisible by group "
                               f"{p.group}", layer=name, field="group")
    if min(stride) <= 0 or min(dilation) <= 0:
        raise CaffeFormatError("stride and dilation must be positive", layer=name,
                               field="stride")
    return {"num_output": int(p.num_output), "bias_term": bool(p.bias_term), "kernel": kernel,
            "pad": pad, "stride": stride, "dilation": tuple(int(d) for d in dilation),
            "group": int(p.group), "weight_filler": _filler(p.weight_filler),
            "bias_filler": _filler(p.bias_filler)}


def _pool_attrs(lp) -> dict:
    p = lp.pooling_param
    name = lp.name
    if p.pool == 2:
        raise UnsupportedLayerError("STOCHASTIC pooling is not supported", layer=name,
                                    field="pool")
    glob = bool(p.global_pooling)
    if glob:
        kernel = (0, 0)
    else:
        kernel = _hw(p.kernel_size if p.HasField("kernel_size") else [], p.kernel_h,
                     p.kernel_w, 0, p.HasField("kernel_h"), p.HasField("kernel_w"), "kernel",
                     name)
        if min(kernel) <= 0:
            raise CaffeFormatError("kernel size must be positive", layer=name,
                                   field="kernel_size")
    pad = _hw([p.pad], p.pad_h, p.pad_w, 0, p.HasField("pad_h"), p.HasField("pad_w"), "pad",
              name)
    stride = _hw([p.stride], p.stride_h, p.stride_w, 1, p.HasField("stride_h"),
                 p.HasField("stride_w"), "stride", name)
    if min(stride) <= 0:
        raise CaffeFormatError("stride must be positive", layer=name, field="stride")
    if not glob and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
        raise CaffeFormatError("pad must be smaller than kernel", layer=name, field="pad")
    return {"method": "MAX" if p.pool == 0 else "AVE", "kernel": kernel, "pad": pad,
            "stride": stride, "ceil_mode": p.round_mode == 0, "global_pooling": glob}


def _enum_name(msg, field: str) -> str:
    fd = msg.DESCRIPTOR.fields_by_name[field]
    return fd.enum_type.values_by_number[getattr(msg, field)].name


def _attrs(lp) -> dict:
    """The resolved parameters of one layer (Caffe defaults applied)."""
    t = lp.type
    if t in ("Convolution", "Deconvolution"):
        return _conv_attrs(lp)
    if t == "Pooling":
        return _pool_attrs(lp)
    if t == "InnerProduct":
        p = lp.inner_product_param
        if p.num_output <= 0:
            raise CaffeFormatError("num_output must be positive", layer=lp.name,
                                   field="num_output")
        return {"num_output": int(p.num_output), "bias_term": bool(p.bias_term),
                "axis": int(p.axis), "transpose": bool(p.transpose),
                "weight_filler": _filler(p.weight_filler), "bias_filler": _filler(p.bias_filler)}
    if t == "LRN":
        p = lp.lrn_param
        if p.local_size % 2 == 0:
            raise CaffeFormatError("local_size must be odd", layer=lp.name, field="local_size")
        return {"local_size": int(p.local_size), "alpha": float(p.alpha), "beta": float(p.beta),
                "k": float(p.k), "norm_region": _enum_name(p, "norm_region")}
    if t == "ReLU":
        return {"negative_slope": float(lp.relu_param.negative_slope)}
    if t == "Dropout":
        return {"ratio": float(lp.dropout_param.dropout_ratio)}
    if t == "Softmax":
        return {"axis": int(lp.softmax_param.axis)}
    if t == "Input":
        return {"shapes": tuple(tuple(int(d) for d in s.dim) for s in lp.input_param.shape)}
    if t == "BatchNorm":
        p = lp.batch_norm_param
        return {"eps": float(p.eps), "use_global_stats": (bool(p.use_global_stats)
                                                          if p.HasField("use_global_stats")
                                                          else None)}
    if t == "Scale":
        p = lp.scale_param
        filler = _filler(p.filler) if p.HasField("filler") else _freeze(
            {"type": "constant", "value": 1.0})
        return {"axis": int(p.axis), "num_axes": int(p.num_axes), "bias_term": bool(p.bias_term),
                "filler": filler, "bias_filler": _filler(p.bias_filler)}
    if t == "Bias":
        p = lp.bias_param
        return {"axis": int(p.axis), "num_axes": int(p.num_axes), "filler": _filler(p.filler)}
    if t == "Eltwise":
        p = lp.eltwise_param
        return {"operation": _enum_name(p, "operation"), "coeff": tuple(p.coeff)}
    if t == "Concat":
        p = lp.concat_param
        return {"axis": int(p.axis) if p.HasField("axis") or not p.HasField("concat_dim")
                else int(p.concat_dim)}
    if t == "Slice":
        p = lp.slice_param
        return {"axis": int(p.axis) if p.HasField("axis") or not p.HasField("slice_dim")
                else int(p.slice_dim), "slice_points": tuple(int(s) for s in p.slice_point)}
    if t == "Flatten":
        return {"axis": int(lp.flatten_param.axis), "end_axis": int(lp.flatten_param.end_axis)}
    if t == "Reshape":
        p = lp.reshape_param
        return {"shape": tuple(int(d) for d in p.shape.dim), "axis": int(p.axis),
                "num_axes": int(p.num_axes)}
    if t == "Crop":
        return {"axis": int(lp.crop_param.axis),
                "offset": tuple(int(o) for o in lp.crop_param.offset)}
    if t == "PReLU":
        p = lp.prelu_param
        filler = _filler(p.filler) if p.HasField("filler") else _freeze(
            {"type": "constant", "value": 0.25})
        return {"channel_shared": bool(p.channel_shared), "filler": filler}
    if t == "Power":
        p = lp.power_param
        return {"power": float(p.power), "scale": float(p.scale), "shift": float(p.shift)}
    if t == "ELU":
        return {"alpha": float(lp.elu_param.alpha)}
    if t in ("Exp", "Log"):
        p = lp.exp_param if t == "Exp" else lp.log_param
        return {"base": float(p.base), "scale": float(p.scale), "shift": float(p.shift)}
    if t == "Threshold":
        return {"threshold": float(lp.threshold_param.threshold)}
    if t == "ArgMax":
        p = lp.argmax_param
        return {"axis": int(p.axis) if p.HasField("axis") else None, "top_k": int(p.top_k),
                "out_max_val": bool(p.out_max_val)}
    if t == "SoftmaxWithLoss":
        lpar = lp.loss_param
        return {"axis": int(lp.softmax_param.axis),
                "ignore_label": int(lpar.ignore_label) if lpar.HasField("ignore_label")
                else None,
                "normalization": _enum_name(lpar, "normalization") if lpar.HasField(
                    "normalization") else ("VALID" if not lpar.HasField("normalize")
                                           or lpar.normalize else "BATCH_SIZE")}
    if t == "Accuracy":
        p = lp.accuracy_param
        return {"top_k": int(p.top_k), "axis": int(p.axis),
                "ignore_label": int(p.ignore_label) if p.HasField("ignore_label") else None}
    return {}


SUPPORTED_TYPES = frozenset({
    "Input", "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData",
    "Convolution", "Deconvolution", "InnerProduct", "Pooling", "LRN", "ReLU", "Dropout",
    "Softmax", "BatchNorm", "Scale", "Bias", "Eltwise", "Concat", "Slice", "Split", "Flatten",
    "Reshape", "Crop", "PReLU", "Sigmoid", "TanH", "AbsVal", "Power", "ELU", "BNLL", "Exp",
    "Log", "Threshold", "ArgMax", "Silence", "SoftmaxWithLoss", "Accuracy",
})


def compile_net(net, *, phase: str = "TEST", path: PathLike = "<net>") -> tuple[LayerSpec, ...]:
    """Turn a NetParameter into executable ``LayerSpec``s in a valid order.

    Honours include/exclude rules for ``phase``; checks duplicate layer names, undefined
    bottoms, cycles and unsupported types, each a ``CaffeFormatError`` naming the layer.
    """
    net = converters.filter_net(net, phase=phase)
    specs = []
    seen: set[str] = set()
    for lp in net.layer:
        if not lp.name:
            raise CaffeFormatError("layer without a name", path=path, layer="?", field="name")
        if lp.name in seen:
            raise CaffeFormatError("duplicate layer name", path=path, layer=lp.name,
                                   field="name")
        seen.add(lp.name)
        if lp.type not in SUPPORTED_TYPES:
            raise UnsupportedLayerError(f"unsupported layer type {lp.type!r}", path=path,
                                        layer=lp.name, field="type")
        try:
            attrs = _attrs(lp)
        except CaffeFormatError as e:
            if e.path is None:
                raise type(e)(e.reason, path=path, layer=e.layer, field=e.field) from None
            raise
        specs.append(LayerSpec(
            name=lp.name, type=lp.type, bottoms=tuple(lp.bottom), tops=tuple(lp.top),
            attrs=_freeze(attrs), lr_mults=tuple(float(p.lr_mult) for p in lp.param),
            decay_mults=tuple(float(p.decay_mult) for p in lp.param)))
    return _order(specs, path)


def _order(specs: list[LayerSpec], path: PathLike) -> tuple[LayerSpec, ...]:
    """A stable topological order (``converters.fcn.topo_order``)."""
    return tuple(topo_order(specs, lambda s: s.bottoms, lambda s: s.tops, lambda s: s.name,
                            path=path))


# ----------------------------------------------------------------------------- fillers


def fill(key: Array, shape: tuple[int, ...], filler: Mapping[str, Any]) -> Array:
    """Caffe's FillerParameter as a JAX initialiser (constant, gaussian, uniform, xavier,
    msra, bilinear, positive_unitball)."""
    f = dict(filler)
    kind = f.get("type", "constant")
    count = math.prod(shape)
    fan_in = count / shape[0] if shape and shape[0] else 1
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else 1
    n = {0: fan_in, 1: fan_out, 2: (fan_in + fan_out) / 2}[int(f.get("variance_norm", 0))]
    if kind == "constant":
        return jnp.full(shape, f.get("value", 0.0), jnp.float32)
    if kind == "gaussian":
        return f.get("mean", 0.0) + f.get("std", 1.0) * jax.random.normal(key, shape)
    if kind == "uniform":
        return jax.random.uniform(key, shape, minval=f.get("min", 0.0), maxval=f.get("max", 1.0))
    if kind == "xavier":
        s = math.sqrt(3.0 / n)
        return jax.random.uniform(key, shape, minval=-s, maxval=s)
    if kind == "msra":
        return math.sqrt(2.0 / n) * jax.random.normal(key, shape)
    if kind == "bilinear":
        return jnp.asarray(L.bilinear_filler(shape))
    if kind == "positive_unitball":
        u = jax.random.uniform(key, shape)
        return u / jnp.sum(u.reshape(shape[0], -1), axis=1).reshape((-1,) + (1,) * (
            len(shape) - 1))
    raise CaffeFormatError(f"unknown filler type {kind!r}", field="filler")


# ----------------------------------------------------------------------------- shapes


def param_shapes(spec: LayerSpec, bottom_shapes: list[tuple[int, ...]]
                 ) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Caffe's parameter blob shapes (and fillers) for a layer given its bottom shapes."""
    c = spec.cfg
    t = spec.type
    if t in ("Convolution", "Deconvolution"):
        cin = bottom_shapes[0][1]
        g = c["group"]
        if cin % g:
            raise CaffeFormatError(f"input channels {cin} not divisible by group {g}",
                                   layer=spec.name, field="group")
        kh, kw = c["kernel"]
        shape = ((c["num_output"], cin // g, kh, kw) if t == "Convolution"
                 else (cin, c["num_output"] // g, kh, kw))
        out = {"weight": (shape, c["weight_filler"])}
        if c["bias_term"]:
            out["bias"] = ((c["num_output"],), c["bias_filler"])
        return out
    if t == "InnerProduct":
        axis = c["axis"] % len(bottom_shapes[0])
        k = math.prod(bottom_shapes[0][axis:])
        n = c["num_output"]
        out = {"weight": ((k, n) if c["transpose"] else (n, k), c["weight_filler"])}
        if c["bias_term"]:
            out["bias"] = ((n,), c["bias_filler"])
        return out
    if t == "BatchNorm":
        ch = bottom_shapes[0][1] if len(bottom_shapes[0]) > 1 else 1
        zero = _freeze({"type": "constant", "value": 0.0})
        return {"mean": ((ch,), zero), "variance": ((ch,), zero), "scale_factor": ((1,), zero)}
    if t in ("Scale", "Bias"):
        if len(bottom_shapes) > 1:
            # scale_layer.cpp: the bias spans the second bottom's axes of bottom[0]
            if not (t == "Scale" and c["bias_term"]):
                return {}
            shp, n = bottom_shapes[0], len(bottom_shapes[1])
            axis = 0 if n == 0 else c["axis"] % len(shp)
            return {"bias": (tuple(shp[axis:axis + n]), c["bias_filler"])}
        shp = bottom_shapes[0]
        axis = c["axis"] % len(shp) if shp else 0
        end = len(shp) if c["num_axes"] == -1 else axis + c["num_axes"]
        pshape = tuple(shp[axis:end])
        if t == "Bias":
            return {"bias": (pshape, c["filler"])}
        out = {"scale": (pshape, c["filler"])}
        if c["bias_term"]:
            out["bias"] = (pshape, c["bias_filler"])
        return out
    if t == "PReLU":
        ch = 1 if c["channel_shared"] else bottom_shapes[0][1]
        return {"slope": (() if c["channel_shared"] else (ch,), c["filler"])}
    return {}


def _reconcile(layer: str, name: str, arr: Any, shape: tuple[int, ...],
               path: PathLike | None) -> np.ndarray:
    """Fit a stored blob to the expected shape like Caffe's ``ShapeEquals`` (legacy 4-D dims
    padded with leading 1s), else raise naming the layer and blob."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape == tuple(shape):
        return arr
    def strip(s):
        s = list(s)
        while s and s[0] == 1:
            s.pop(0)
        return tuple(s)
    if strip(arr.shape) == strip(shape) and arr.size == math.prod(shape):
        return arr.reshape(shape)
    raise CaffeFormatError(f"shape {tuple(arr.shape)} does not match the net's "
                           f"{tuple(shape)}", path=path, layer=layer, field=name)


# ----------------------------------------------------------------------------- execution


def _apply_layer(spec: LayerSpec, xs: list[Array], p: Mapping[str, Array], *, train: bool,
                 rng: Callable[[], Array] | None) -> list[Array]:
    c = spec.cfg
    t = spec.type
    x = xs[0] if xs else None
    if t in ("Convolution", "Deconvolution"):
        fn = L.convolution if t == "Convolution" else L.deconvolution
        return [fn(x, p["weight"], p.get("bias"), stride=c["stride"], pad=c["pad"],
                   dilation=c["dilation"], group=c["group"])]
    if t == "InnerProduct":
        return [L.inner_product(x, p["weight"], p.get("bias"), axis=c["axis"],
                                transpose=c["transpose"])]
    if t == "Pooling":
        return [L.pooling(x, method=c["method"], kernel=c["kernel"], stride=c["stride"],
                          pad=c["pad"], ceil_mode=c["ceil_mode"],
                          global_pooling=c["global_pooling"])]
    if t == "LRN":
        return [L.lrn(x, local_size=c["local_size"], alpha=c["alpha"], beta=c["beta"], k=c["k"],
                      norm_region=c["norm_region"])]
    if t == "ReLU":
        return [L.relu(x, c["negative_slope"])]
    if t == "Dropout":
        if train and rng is None:
            raise ValueError(f"{spec.name}: Dropout in training needs rngs={{'dropout': key}}")
        return [L.dropout(x, c["ratio"], deterministic=not train,
                          rng=rng() if train else None)]
    if t == "Softmax":
        return [L.softmax(x, c["axis"])]
    if t == "BatchNorm":
        use_global = c["use_global_stats"] if c["use_global_stats"] is not None else not train
        return [L.batch_norm(x, p["mean"], p["variance"], p["scale_factor"], eps=c["eps"],
                             use_global_stats=use_global)]
    if t == "Scale":
        s = p["scale"] if len(xs) == 1 else xs[1]
        return [L.scale(x, s, p.get("bias"), axis=c["axis"])]
    if t == "Bias":
        b = p["bias"] if len(xs) == 1 else xs[1]
        return [L.bias(x, b, axis=c["axis"])]
    if t == "Eltwise":
        return [L.eltwise(xs, c["operation"], c["coeff"] or None)]
    if t == "Concat":
        return [L.concat(xs, c["axis"])]
    if t == "Slice":
        return list(L.slice_blob(x, axis=c["axis"], slice_points=c["slice_points"],
                                 num_tops=len(spec.tops)))
    if t == "Split":
        return [x] * len(spec.tops)
    if t == "Flatten":
        return [L.flatten(x, c["axis"], c["end_axis"])]
    if t == "Reshape":
        return [L.reshape(x, c["shape"], c["axis"], c["num_axes"])]
    if t == "Crop":
        return [L.crop(x, xs[1].shape, axis=c["axis"], offset=c["offset"])]
    if t == "PReLU":
        return [L.prelu(x, p["slope"], channel_shared=c["channel_shared"])]
    if t == "Sigmoid":
        return [L.sigmoid(x)]
    if t == "TanH":
        return [L.tanh(x)]
    if t == "AbsVal":
        return [L.absval(x)]
    if t == "BNLL":
        return [L.bnll(x)]
    if t == "Power":
        return [L.power(x, c["power"], c["scale"], c["shift"])]
    if t == "ELU":
        return [L.elu(x, c["alpha"])]
    if t == "Exp":
        return [L.exp(x, c["base"], c["scale"], c["shift"])]
    if t == "Log":
        return [L.log(x, c["base"], c["scale"], c["shift"])]
    if t == "Threshold":
        return [L.threshold(x, c["threshold"])]
    if t == "ArgMax":
        return [L.argmax(x, axis=c["axis"], top_k=c["top_k"], out_max_val=c["out_max_val"])]
    if t == "Silence":
        return []
    if t == "SoftmaxWithLoss":
        return [losses.softmax_with_loss(x, xs[1], axis=c["axis"], ignore_label=c["ignore_label"],
                                    normalization=c["normalization"])]
    if t == "Accuracy":
        return [losses.accuracy(x, xs[1], top_k=c["top_k"], axis=c["axis"],
                           ignore_label=c["ignore_label"])]
    raise UnsupportedLayerError(f"unsupported layer type {t!r}", layer=spec.name, field="type")


def _run_layer(spec: LayerSpec, bl: list[_Blob], vs: list, p: Mapping[str, Any], *,
               train: bool, rng: Callable[[], Array] | None, fast: bool, precision: Any
               ) -> tuple[list[_Blob], list]:
    """One layer: the NHWC fast form when it has one, else ``_apply_layer`` on NCHW arrays;
    ``(tops, their valid sizes)``."""
    done = _apply_fast(spec, bl, p, train=train, rng=rng, valid=vs,
                       precision=precision) if fast else None
    if done is not None:
        return done
    if any(v is not None for v in vs) and (
            spec.type not in _VALID_FALLBACK
            or (spec.type == "ArgMax" and spec.cfg["axis"] not in (1, -3))):
        raise ValueError(f"{spec.name}: a {spec.type} layer cannot run on inputs "
                         "padded to a bucket shape")
    arrays = _apply_layer(spec, [b.nchw() for b in bl], p, train=train, rng=rng)
    tops = [_Blob(nchw=a) for a in arrays]
    if spec.type == "Crop" and len(vs) > 1 and vs[0] is not None:
        axis = spec.cfg["axis"] % 4
        tvalid = vs[1] if axis <= 2 else (vs[0][0], vs[1][1])
    else:
        tvalid = vs[0] if vs else None
    return tops, [tvalid] * len(tops)


class _Blob:
    """One blob during execution: its NCHW array, its NHWC array, or both (converted on
    demand and cached). Blobs that are not 4-D only ever have the NCHW (Caffe) form."""

    __slots__ = ("_nchw", "_nhwc")

    def __init__(self, nchw: Array | None = None, nhwc: Array | None = None):
        self._nchw = nchw
        self._nhwc = nhwc

    @property
    def shape(self) -> tuple[int, ...]:
        if self._nchw is not None:
            return tuple(self._nchw.shape)
        n, h, w, c = self._nhwc.shape
        return (n, c, h, w)

    @property
    def is_4d(self) -> bool:
        return len(self.shape) == 4

    def nchw(self) -> Array:
        if self._nchw is None:
            self._nchw = F.to_nchw(self._nhwc)
        return self._nchw

    def nhwc(self) -> Array:
        if self._nhwc is None:
            self._nhwc = F.to_nhwc(self._nchw)
        return self._nhwc


#: Layers whose output cell (i, j) depends on input cells (i, j) only (channel-wise or
#: element-wise): they keep the valid size of their first bottom.
_POINTWISE = frozenset({"ReLU", "Dropout", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "ELU",
                        "Exp", "Log", "Threshold", "PReLU", "Split", "Eltwise"})
_ELEMENTWISE = {"Sigmoid": lambda x, c: L.sigmoid(x), "TanH": lambda x, c: L.tanh(x),
                "AbsVal": lambda x, c: L.absval(x), "BNLL": lambda x, c: L.bnll(x),
                "Power": lambda x, c: L.power(x, c["power"], c["scale"], c["shift"]),
                "ELU": lambda x, c: L.elu(x, c["alpha"]),
                "Exp": lambda x, c: L.exp(x, c["base"], c["scale"], c["shift"]),
                "Log": lambda x, c: L.log(x, c["base"], c["scale"], c["shift"]),
                "Threshold": lambda x, c: L.threshold(x, c["threshold"]),
                "ReLU": lambda x, c: F.relu(x, c["negative_slope"])}


def _channel_last(p: Array, dtype) -> Array:
    return jnp.asarray(p, dtype).reshape(-1)


def _apply_fast(spec: LayerSpec, bl: list[_Blob], p: Mapping[str, Any], *, train: bool,
                rng: Callable[[], Array] | None, valid: list, precision: Any
                ) -> tuple[list[_Blob], list] | None:
    """Run one layer in the NHWC fast path: ``(tops, their valid sizes)``, or None when the
    layer has no fast form here (the caller then runs ``_apply_layer`` on NCHW arrays)."""
    t = spec.type
    c = spec.cfg
    if t == "InnerProduct" and c["axis"] == 1 and bl and len(bl[0].shape) >= 2:
        if valid[0] is not None:
            raise ValueError(f"{spec.name}: InnerProduct flattens the spatial axes, so it "
                             "cannot run on inputs padded to a bucket shape")
        x = bl[0].nchw()
        y = F.inner_product_nhwc(x.reshape(x.shape[0], -1), p["weight"], p.get("bias"),
                                 transpose=c["transpose"], precision=precision)
        return [_Blob(nchw=y)], [None]
    if not bl or not all(b.is_4d for b in bl):
        return None
    v0 = valid[0]
    if t == "Convolution" and len(c["kernel"]) == 2:
        x = bl[0].nhwc()
        y = F.conv_nhwc(x, p["weight"], p.get("bias"), stride=c["stride"], pad=c["pad"],
                        dilation=c["dilation"], group=c["group"], precision=precision,
                        valid=v0)
        vt = None if v0 is None else tuple(
            F.conv_output_size(v, k, s, q, d) for v, k, s, q, d in zip(
                v0, c["kernel"], c["stride"], c["pad"], c["dilation"], strict=True))
        return [_Blob(nhwc=y)], [vt]
    if t == "Deconvolution" and len(c["kernel"]) == 2:
        y = F.deconv_nhwc(bl[0].nhwc(), p["weight"], p.get("bias"), stride=c["stride"],
                          pad=c["pad"], dilation=c["dilation"], group=c["group"],
                          precision=precision, valid=v0)
        vt = None if v0 is None else tuple(
            F.deconv_output_size(v, k, s, q, d) for v, k, s, q, d in zip(
                v0, c["kernel"], c["stride"], c["pad"], c["dilation"], strict=True))
        return [_Blob(nhwc=y)], [vt]
    if t == "Pooling":
        y = F.pool_nhwc(bl[0].nhwc(), method=c["method"], kernel=c["kernel"],
                        stride=c["stride"], pad=c["pad"], ceil_mode=c["ceil_mode"],
                        global_pooling=c["global_pooling"], valid=v0)
        if v0 is None:
            vt = None
        elif c["global_pooling"]:
            vt = (jnp.ones_like(v0[0]), jnp.ones_like(v0[1]))
        else:
            clip = any(q > 0 for q in c["pad"])
            vt = tuple(F.pool_output_size(v, k, s, q, c["ceil_mode"], clip) for v, k, s, q in
                       zip(v0, c["kernel"], c["stride"], c["pad"], strict=True))
        return [_Blob(nhwc=y)], [vt]
    if t == "LRN":
        y = F.lrn_nhwc(bl[0].nhwc(), local_size=c["local_size"], alpha=c["alpha"],
                       beta=c["beta"], k=c["k"], norm_region=c["norm_region"], valid=v0)
        return [_Blob(nhwc=y)], [v0]
    if t == "Softmax" and c["axis"] in (1, -3):
        x = bl[0].nhwc()
        if x.dtype in (jnp.bfloat16, jnp.float16):  # exponentials in float32
            x = x.astype(jnp.float32)
        return [_Blob(nhwc=L.softmax(x, axis=-1))], [v0]
    if t == "Concat" and c["axis"] in (1, -3):
        return [_Blob(nhwc=jnp.concatenate([b.nhwc() for b in bl], axis=-1))], [v0]
    if t in _POINTWISE:
        # element-wise: run in whichever layout the bottom already has
        use_nhwc = bl[0]._nchw is None
        get = (lambda b: b.nhwc()) if use_nhwc else (lambda b: b.nchw())
        wrap = (lambda a: _Blob(nhwc=a)) if use_nhwc else (lambda a: _Blob(nchw=a))
        x = get(bl[0])
        if t == "Split":
            return [bl[0]] * len(spec.tops), [v0] * len(spec.tops)
        if t == "Eltwise":
            y = L.eltwise([get(b) for b in bl], c["operation"], c["coeff"] or None)
        elif t == "Dropout":
            y = _dropout(x, c["ratio"], train, rng, spec.name, nhwc=use_nhwc)
        elif t == "PReLU":
            slope = jnp.asarray(p["slope"], x.dtype)
            slope = (slope.reshape(()) if c["channel_shared"] else
                     slope.reshape(-1) if use_nhwc else slope.reshape(-1, 1, 1))
            y = jnp.maximum(x, 0) + slope * jnp.minimum(x, 0)
        else:
            y = _ELEMENTWISE[t](x, c)
        return [wrap(y)], [v0]
    if t in ("BatchNorm", "Scale", "Bias") and len(bl) == 1:
        if t == "BatchNorm":
            use_global = c["use_global_stats"] if c["use_global_stats"] is not None \
                else not train
            if not use_global:
                if v0 is not None:
                    raise ValueError(f"{spec.name}: BatchNorm with batch statistics cannot "
                                     "run on inputs padded to a bucket shape")
                return None
            x = bl[0].nhwc()
            factor = jnp.asarray(p["scale_factor"], x.dtype).reshape(-1)[0]
            s = jnp.where(factor == 0, jnp.zeros_like(factor), 1 / factor)
            mu = _channel_last(p["mean"], x.dtype) * s
            var = _channel_last(p["variance"], x.dtype) * s
            return [_Blob(nhwc=(x - mu) / jnp.sqrt(var + c["eps"]))], [v0]
        pshape = tuple(jnp.shape(p["scale" if t == "Scale" else "bias"]))
        if c["axis"] not in (1, -3) or len(pshape) != 1:
            return None
        x = bl[0].nhwc()
        if t == "Scale":
            y = x * _channel_last(p["scale"], x.dtype)
            if "bias" in p:
                y = y + _channel_last(p["bias"], x.dtype)
        else:
            y = x + _channel_last(p["bias"], x.dtype)
        return [_Blob(nhwc=y)], [v0]
    return None


def _dropout(x: Array, ratio: float, train: bool, rng, name: str, *, nhwc: bool) -> Array:
    """Caffe Dropout with the same random mask as ``layers.dropout`` on the NCHW blob."""
    if not train or ratio == 0.0:
        return x
    if rng is None:
        raise ValueError(f"{name}: Dropout in training needs rngs={{'dropout': key}}")
    if not nhwc:
        return L.dropout(x, ratio, deterministic=False, rng=rng())
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dropout ratio must be in [0, 1), got {ratio}")
    n, h, w, ch = x.shape
    keep = F.to_nhwc(jax.random.bernoulli(rng(), 1.0 - ratio, (n, ch, h, w)))
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - ratio), x.dtype), jnp.zeros_like(x))


#: Layers that ``run_graph`` can run on bucket-padded inputs besides the fast-path ones.
_VALID_FALLBACK = frozenset({"Silence", "ArgMax", "Crop"})


def run_graph(layers: Sequence[LayerSpec], get_params: Callable[[LayerSpec, list], Mapping],
              inputs: Mapping[str, Array], *, outputs: Sequence[str] | None = None,
              train: bool = False, rng: Callable[[], Array] | None = None,
              valid: Mapping[str, tuple[Array, Array]] | None = None,
              precision: Any = lax.Precision.HIGHEST, fast: bool = True
              ) -> tuple[dict[str, Array], dict[str, Any]]:
    """Execute compiled layers: ``({blob: NCHW array}, {blob: valid size or None})``.

    ``get_params(spec, bottom_shapes)`` returns the layer's params (Caffe shapes).
    Internally 4-D blobs live in NHWC and use ``fcn_jax.fast``; only returned blobs are
    converted to NCHW. ``valid``: per input, ``(h, w)`` int32 arrays of shape (N,) giving each
    example's true size when the batch was zero-padded to a bucket shape; cells beyond it are
    masked so that the cells inside are exactly those of the unpadded input. ``fast=False``
    runs the NCHW reference layers of ``fcn_jax.layers`` only.
    """
    blobs = {n: _Blob(nchw=a) for n, a in inputs.items()}
    valids: dict[str, Any] = {n: (None if valid is None else valid.get(n)) for n in inputs}
    for spec in layers:
        if spec.type in INPUT_TYPES:
            continue
        bl = [blobs[b] for b in spec.bottoms]
        vs = [valids[b] for b in spec.bottoms]
        p = get_params(spec, [b.shape for b in bl])
        try:
            done = _run_layer(spec, bl, vs, p, train=train, rng=rng, fast=fast,
                              precision=precision)
        except ValueError as e:  # a size or shape the layer cannot take: name the layer
            if str(e).startswith(f"{spec.name}:"):
                raise
            raise ValueError(f"{spec.name}: {e}") from e
        tops, tvalids = done
        for name, blob, v in zip(spec.tops, tops, tvalids, strict=True):
            blobs[name] = blob
            valids[name] = v
    names = list(blobs) if outputs is None else list(outputs)
    missing = [k for k in names if k not in blobs]
    if missing:
        raise ValueError(f"unknown blobs {missing}; the net has {list(blobs)}")
    return {k: blobs[k].nchw() for k in names}, {k: valids.get(k) for k in names}


class CaffeGraph(nn.Module):
    """A Caffe net as a Flax module. ``apply({"params": p}, x)`` returns ``{blob: array}``.

    ``x`` is one NCHW array (single-input nets) or ``{input_name: array}``; any spatial size
    works where the net allows it. ``train=True`` activates Dropout (needs
    ``rngs={"dropout": key}``) and batch statistics in BatchNorm layers without
    ``use_global_stats``. ``outputs`` limits the returned blobs (all by default).
    """

    layers: tuple[LayerSpec, ...]
    name_: str = "net"

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(t for s in self.layers if s.type in INPUT_TYPES for t in s.tops)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...] | None]:
        shapes: dict[str, tuple[int, ...] | None] = {}
        for s in self.layers:
            if s.type in INPUT_TYPES:
                given = s.cfg.get("shapes", ())
                for i, top in enumerate(s.tops):
                    shapes[top] = (given[i] if i < len(given) else given[0]) if given else None
        return shapes

    @nn.compact
    def __call__(self, x: Array | Mapping[str, Array], *, train: bool = False,
                 outputs: tuple[str, ...] | None = None) -> dict[str, Array]:
        names = self.inputs
        if isinstance(x, Mapping):
            missing = [n for n in names if n not in x]
            if missing:
                raise ValueError(f"{self.name_}: missing inputs {missing}; the net takes "
                                 f"{list(names)}")
            blobs = {n: jnp.asarray(x[n]) for n in names}
        else:
            if len(names) != 1:
                raise ValueError(f"{self.name_}: the net takes inputs {list(names)}: pass a "
                                 f"dict {{name: array}}")
            blobs = {names[0]: jnp.asarray(x)}
        rng = (lambda: self.make_rng("dropout")) if train and self.has_rng("dropout") else None

        def get_params(spec: LayerSpec, bottom_shapes: list) -> Mapping[str, Array]:
            shapes = param_shapes(spec, bottom_shapes)
            if not shapes:
                return {}
            p = self.param(spec.name, _init_layer(spec.name, shapes))
            _check_shapes(spec.name, p, shapes)
            return p

        out, _ = run_graph(self.layers, get_params, blobs, outputs=outputs, train=train,
                           rng=rng)
        return out


def _init_layer(layer: str, shapes: Mapping[str, tuple]) -> Callable:
    def init(key: Array) -> dict[str, Array]:
        keys = jax.random.split(key, len(shapes))
        return {n: fill(k, shp, dict(f) if f else {}).astype(jnp.float32).reshape(shp)
                for k, (n, (shp, f)) in zip(keys, shapes.items(), strict=True)}
    return init


def _check_shapes(layer: str, p: Mapping[str, Array], shapes: Mapping[str, tuple]) -> None:
    if set(p) != set(shapes):
        raise CaffeFormatError(f"params {sorted(p)} but the layer needs {sorted(shapes)}",
                               layer=layer, field="params")
    for n, (shp, _) in shapes.items():
        if tuple(p[n].shape) != tuple(shp):
            raise CaffeFormatError(f"shape {tuple(p[n].shape)} does not match the "
                                   f"{tuple(shp)} its bottom blob needs", layer=layer, field=n)


# ----------------------------------------------------------------------------- loading


def build_module(net, *, phase: str = "TEST", path: PathLike = "<net>") -> CaffeGraph:
    """A ``CaffeGraph`` for a NetParameter (already read and upgraded)."""
    return CaffeGraph(layers=compile_net(net, phase=phase, path=path), name_=net.name or "net")


def example_inputs(module: CaffeGraph, input_shape: Any = None) -> dict[str, Any]:
    """Zero-cost ``ShapeDtypeStruct`` inputs from the prototxt shapes or ``input_shape``."""
    shapes = dict(module.input_shapes)
    if input_shape is not None:
        if isinstance(input_shape, Mapping):
            shapes.update({k: tuple(v) for k, v in input_shape.items()})
        else:
            if len(shapes) != 1:
                raise ValueError("input_shape must be a dict for nets with several inputs")
            shapes[next(iter(shapes))] = tuple(input_shape)
    missing = [k for k, v in shapes.items() if v is None]
    if missing:
        raise ValueError(f"no shape known for inputs {missing}: pass input_shape=")
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


def init_params(module: CaffeGraph, key: Array | int = 0, input_shape: Any = None
                ) -> dict[str, dict[str, np.ndarray]]:
    """Parameters from the prototxt fillers (Caffe's default filler is constant 0)."""
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    xs = example_inputs(module, input_shape)
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in xs.items()}
    variables = jax.jit(lambda k, x: module.init(k, x))(key, zeros)
    return jax.tree_util.tree_map(np.asarray, dict(variables.get("params", {})))


def expected_param_shapes(module: CaffeGraph, input_shape: Any = None
                          ) -> dict[str, dict[str, tuple[int, ...]]]:
    """The parameter shapes the net needs, from a shape-only trace."""
    xs = example_inputs(module, input_shape)
    out = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), xs)
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), dict(out.get("params", {})))


def load_caffe(prototxt: PathLike | Any, caffemodel: PathLike | Mapping | None = None, *,
               phase: str = "TEST", input_shape: Any = None, strict: bool = True,
               seed: int = 0) -> tuple[CaffeGraph, dict[str, dict[str, np.ndarray]]]:
    """Load a Caffe net as ``(module, params)``.

    ``prototxt``: a path or a NetParameter. ``caffemodel``: a path, a params pytree, or None
    (then params come from the prototxt fillers). Blobs are fitted to the net's shapes like
    Caffe does (legacy 4-D dims); a mismatch, or a layer of the net with no weights in the
    caffemodel (unless ``strict=False``, which fills it), raises ``CaffeFormatError``.
    """
    path = prototxt if isinstance(prototxt, (str, os.PathLike)) else "<net>"
    net = converters.read_prototxt(prototxt) if isinstance(prototxt, (str, os.PathLike)) \
        else converters.upgrade_net(prototxt)
    module = build_module(net, phase=phase, path=path)
    if caffemodel is None:
        return module, init_params(module, seed, input_shape)
    mpath = caffemodel if isinstance(caffemodel, (str, os.PathLike)) else None
    stored = converters.load_caffemodel(caffemodel) if mpath is not None else caffemodel
    try:
        example_inputs(module, input_shape)
    except ValueError:
        expected = None  # no input shape known: shapes are checked at apply time
    else:
        expected = expected_param_shapes(module, input_shape)
    if expected is None:
        needed = {s.name: None for s in module.layers if s.type in (
            "Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale", "Bias",
            "PReLU")}
        return module, {k: dict(stored[k]) for k in needed if k in stored}
    params: dict[str, dict[str, np.ndarray]] = {}
    filled = None
    types = {s.name: s.type for s in module.layers}
    for layer in sorted(expected, key=list(types).index):
        names = param_names(types[layer], len(expected[layer]))
        blobs = {n: expected[layer][n] for n in names if n in expected[layer]} | expected[layer]
        if layer not in stored:
            if strict:
                raise CaffeFormatError("the net needs weights for this layer but the "
                                       "caffemodel has none", path=mpath, layer=layer,
                                       field="blobs")
            if filled is None:
                filled = init_params(module, seed, input_shape)
            params[layer] = filled[layer]
            continue
        src = stored[layer]
        extra = sorted(set(src) - set(blobs))
        missing = sorted(set(blobs) - set(src))
        if missing or extra:
            raise CaffeFormatError(f"has blobs {sorted(src)} but the net needs "
                                   f"{sorted(blobs)}", path=mpath, layer=layer, field="blobs")
        params[layer] = {n: _reconcile(layer, n, src[n], shp, mpath)
                         for n, shp in blobs.items()}
    return module, params


def blob_names(module: CaffeGraph) -> list[str]:
    """Every blob name the module returns, in execution order."""
    out: list[str] = []
    for s in module.layers:
        for t in s.tops:
            if t not in out:
                out.append(t)
    return out


__all__ = ["CaffeGraph", "LayerSpec", "blob_names", "build_module", "compile_net",
           "expected_param_shapes", "fill", "init_params", "load_caffe", "param_names",
           "param_shapes", "run_graph"]
