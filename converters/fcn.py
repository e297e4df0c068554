"""Net-definition rewrites for net surgery, in pure Python (protobuf, no JAX).

* ``blob_shapes(net, input_shape)``: every blob's shape, by Caffe's reshape rules.
* ``fully_convolutional_net(net, input_shape)``: the tutorial's cast of a classifier into a
  fully convolutional net. Every ``InnerProduct`` becomes a ``Convolution`` whose kernel covers
  the whole bottom blob it had in the classifier (CaffeNet: ``fc6`` on pool5 (256, 6, 6) ->
  6x6 kernel; ``fc7``/``fc8`` -> 1x1), renamed with ``suffix`` (``fc6`` -> ``fc6-conv``, its
  top blob too). A ``Flatten`` feeding an ``InnerProduct`` is removed, and a global pooling
  feeding one becomes a fixed-size pooling (kernel = its bottom's size, stride 1), so that a
  larger input gives a dense map. ``fully_conv_plan`` says what the cast does; the weight
  side of the cast is ``fcn_jax.surgery.fc_to_conv``.
* ``fold_batchnorm_net(net)``: the net with BatchNorm (+ Scale) layers removed after the
  Convolution / InnerProduct they are folded into (weights: ``fcn_jax.surgery.fold_batchnorm``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

from .caffe_io import filter_net, read_prototxt, upgrade_net
from .errors import CaffeFormatError, UnsupportedLayerError

PathLike = str | os.PathLike
Shape = tuple[int, ...]

#: Layer types whose tops have the shape of their first bottom.
SAME_SHAPE = frozenset({
    "ReLU", "Dropout", "LRN", "Sigmoid", "TanH", "AbsVal", "Power", "ELU", "BNLL", "Exp",
    "Log", "Threshold", "BatchNorm", "Scale", "Bias", "PReLU", "Softmax", "Eltwise", "Split",
    "MVN",
})
#: Layer types that feed data into a net.
INPUT_TYPES = frozenset({"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData",
                         "DummyData", "AnnotatedData", "Python"})


def as_net(net):
    """A V2 ``NetParameter`` from a path or a (possibly legacy) message, phase TEST."""
    if isinstance(net, (str, os.PathLike)):
        net = read_prototxt(net)
    else:
        net = upgrade_net(net)
    return filter_net(net, "TEST")


# ----------------------------------------------------------------------------- geometry


def _pair(values, h, w, has_h: bool, has_w: bool, default: int, what: str,
          layer: str) -> tuple[int, int]:
    if has_h or has_w:
        if not (has_h and has_w):
            raise CaffeFormatError(f"{what}_h and {what}_w must be given together",
                                   layer=layer, field=f"{what}_h")
        return int(h), int(w)
    vals = [int(v) for v in values]
    if not vals:
        return default, default
    if len(vals) > 2:
        raise CaffeFormatError(f"only 2-D {what} is supported, got {len(vals)} values",
                               layer=layer, field=what)
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Spatial geometry of a Convolution, Deconvolution or Pooling layer (H, W pairs)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    global_pooling: bool = False


def layer_geometry(layer) -> Geometry:
    """Kernel, stride, pad and dilation of a Convolution/Deconvolution/Pooling layer."""
    name = layer.name
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        kernel = _pair(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"),
                       p.HasField("kernel_w"), 0, "kernel", name)
        pad = _pair(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h"), p.HasField("pad_w"), 0,
                    "pad", name)
        stride = _pair(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"),
                       p.HasField("stride_w"), 1, "stride", name)
        dil = _pair(p.dilation, 0, 0, False, False, 1, "dilation", name)
        if min(kernel) <= 0:
            raise CaffeFormatError("kernel size must be positive", layer=name,
                                   field="kernel_size")
        return Geometry(kernel, stride, pad, dil)
    if layer.type == "Pooling":
        p = layer.pooling_param
        pad = _pair([p.pad], p.pad_h, p.pad_w, p.HasField("pad_h"), p.HasField("pad_w"), 0,
                    "pad", name)
        stride = _pair([p.stride], p.stride_h, p.stride_w, p.HasField("stride_h"),
                       p.HasField("stride_w"), 1, "stride", name)
        if p.global_pooling:
            return Geometry((0, 0), (1, 1), (0, 0), global_pooling=True,
                            ceil_mode=p.round_mode == 0)
        kernel = _pair([p.kernel_size] if p.HasField("kernel_size") else [], p.kernel_h,
                       p.kernel_w, p.HasField("kernel_h"), p.HasField("kernel_w"), 0,
                       "kernel", name)
        if min(kernel) <= 0:
            raise CaffeFormatError("kernel size must be positive", layer=name,
                                   field="kernel_size")
        return Geometry(kernel, stride, pad, ceil_mode=p.round_mode == 0)
    raise ValueError(f"layer {name!r} of type {layer.type} has no kernel geometry")


def _c_div(a: int, b: int) -> int:
    """C's integer division (truncates toward zero), as Caffe computes sizes."""
    return a // b if a >= 0 else -(-a // b)


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool,
                clip: bool) -> int:
    """Caffe's pooled size along one axis (ceil or floor, then the padding clip rule)."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _axis(axis: int, ndim: int, layer: str) -> int:
    if not -ndim <= axis < ndim:
        raise CaffeFormatError(f"axis {axis} out of range for a {ndim}-D blob", layer=layer,
                               field="axis")
    return axis % ndim


def _layer_shapes(lp, shapes: list[Shape]) -> list[Shape]:
    """Top shapes of one layer from its bottom shapes (Caffe's ``Reshape`` rules)."""
    t, name = lp.type, lp.name
    x = shapes[0] if shapes else ()
    n_tops = len(lp.top)
    if t in SAME_SHAPE:
        return [x] * n_tops
    if t in ("Convolution", "Deconvolution", "Pooling"):
        if len(x) != 4:
            raise CaffeFormatError(f"needs a 4-D bottom, got shape {x}", layer=name,
                                   field="bottom")
        g = layer_geometry(lp)
        if t == "Pooling":
            if g.global_pooling:
                return [(x[0], x[1], 1, 1)] * n_tops
            clip = g.pad[0] > 0 or g.pad[1] > 0
            hw = tuple(pooled_size(x[2 + i], g.kernel[i], g.stride[i], g.pad[i], g.ceil_mode,
                                   clip) for i in range(2))
            return [(x[0], x[1]) + hw] * n_tops
        ext = [g.dilation[i] * (g.kernel[i] - 1) + 1 for i in range(2)]
        if t == "Convolution":
            # C's division truncates toward zero: a kernel overhanging the padded input by
            # less than a stride still gives one cell (Caffe's conv_layer.cpp)
            hw = tuple(_c_div(x[2 + i] + 2 * g.pad[i] - ext[i], g.stride[i]) + 1
                       for i in range(2))
        else:
            hw = tuple(g.stride[i] * (x[2 + i] - 1) + ext[i] - 2 * g.pad[i] for i in range(2))
        if min(hw) <= 0:
            raise CaffeFormatError(f"output size {hw} is not positive for bottom {x}",
                                   layer=name, field="kernel_size")
        return [(x[0], int(lp.convolution_param.num_output)) + hw]
    if t == "InnerProduct":
        axis = _axis(lp.inner_product_param.axis, len(x), name)
        return [tuple(x[:axis]) + (int(lp.inner_product_param.num_output),)]
    if t == "Concat":
        p = lp.concat_param
        axis = _axis(p.axis if p.HasField("axis") or not p.HasField("concat_dim")
                     else p.concat_dim, len(x), name)
        return [x[:axis] + (sum(s[axis] for s in shapes),) + x[axis + 1:]]
    if t == "Slice":
        p = lp.slice_param
        axis = _axis(p.axis if p.HasField("axis") or not p.HasField("slice_dim")
                     else p.slice_dim, len(x), name)
        points = [0] + list(p.slice_point) + [x[axis]]
        if len(p.slice_point) == 0:
            step = x[axis] // n_tops
            points = [i * step for i in range(n_tops + 1)]
        if len(points) != n_tops + 1:
            raise CaffeFormatError(f"{len(p.slice_point)} slice points for {n_tops} tops",
                                   layer=name, field="slice_point")
        return [x[:axis] + (b - a,) + x[axis + 1:]
                for a, b in zip(points[:-1], points[1:], strict=True)]
    if t == "Flatten":
        p = lp.flatten_param
        a, e = _axis(p.axis, len(x), name), _axis(p.end_axis, len(x), name)
        return [x[:a] + (math.prod(x[a:e + 1]),) + x[e + 1:]]
    if t == "Reshape":
        p = lp.reshape_param
        start = _axis(p.axis, len(x) + 1, name)
        end = len(x) if p.num_axes == -1 else start + p.num_axes
        dims = [int(d) for d in p.shape.dim]
        out = [x[start + i] if d == 0 else d for i, d in enumerate(dims)]
        if out.count(-1) > 1 or any(d < -1 for d in out):
            raise CaffeFormatError("at most one dim may be -1, none below it", layer=name,
                                   field="reshape_param.shape")
        known = math.prod(d for d in out if d != -1) * math.prod(x[:start]) * math.prod(
            x[end:])
        if known == 0 or math.prod(x) % known or (-1 not in out and known != math.prod(x)):
            raise CaffeFormatError(f"cannot reshape {x} to {dims}", layer=name,
                                   field="reshape_param.shape")
        if -1 in out:
            out[out.index(-1)] = math.prod(x) // known
        return [tuple(x[:start]) + tuple(out) + tuple(x[end:])]
    if t == "Crop":
        axis = _axis(lp.crop_param.axis, len(x), name)
        return [x[:axis] + shapes[1][axis:]]
    if t == "ArgMax":
        p = lp.argmax_param
        if p.HasField("axis"):
            axis = _axis(p.axis, len(x), name)
            return [x[:axis] + (int(p.top_k),) + x[axis + 1:]]
        out = [1] * max(len(x), 3)
        out[0], out[1], out[2] = x[0], 2 if p.out_max_val else 1, int(p.top_k)
        return [tuple(out)]
    if t in ("SoftmaxWithLoss", "Accuracy", "EuclideanLoss", "SigmoidCrossEntropyLoss"):
        return [()] * n_tops
    if t == "Silence":
        return []
    raise UnsupportedLayerError(f"no shape rule for layer type {t!r}", layer=name,
                                field="type")


def input_shapes(net, input_shape=None) -> dict[str, Shape]:
    """Shapes of the net's inputs: the Input layers' shapes, overridden by ``input_shape``
    (one shape for a single-input net, or ``{name: shape}``)."""
    shapes: dict[str, Shape] = {}
    for lp in net.layer:
        if lp.type in INPUT_TYPES:
            given = [tuple(int(d) for d in s.dim) for s in lp.input_param.shape] \
                if lp.type == "Input" else []
            for i, top in enumerate(lp.top):
                shapes[top] = (given[i] if i < len(given) else given[0]) if given else None
    if input_shape is not None:
        if isinstance(input_shape, Mapping):
            shapes.update({k: tuple(int(d) for d in v) for k, v in input_shape.items()})
        else:
            if len(shapes) != 1:
                raise ValueError(f"the net has inputs {sorted(shapes)}: pass input_shape as "
                                 "a dict {name: shape}")
            shapes[next(iter(shapes))] = tuple(int(d) for d in input_shape)
    missing = sorted(k for k, v in shapes.items() if v is None)
    if missing:
        raise ValueError(f"no shape known for inputs {missing}: pass input_shape=")
    return shapes


def blob_shapes(net, input_shape=None) -> dict[str, Shape]:
    """The shape of every blob after a forward pass (in-place blobs keep their last shape).

    ``net``: a NetParameter or a prototxt path; ``input_shape``: as ``input_shapes``.
    Layers are visited in a valid order (a layer waits until its bottoms exist).
    """
    net = as_net(net)
    shapes = dict(input_shapes(net, input_shape))
    for lp in _ordered(net):
        if lp.type in INPUT_TYPES:
            continue
        tops = _layer_shapes(lp, [shapes[b] for b in lp.bottom])
        shapes.update(zip(lp.top, tops, strict=True))
    return shapes


def topo_order(items, bottoms, tops, name, path=None) -> list:
    """A stable topological order of layers (list order, deferring those whose bottoms are
    not ready yet); ``bottoms``/``tops``/``name`` read an item. Undefined bottoms and cycles
    raise ``CaffeFormatError`` naming the layer."""
    pending = list(items)
    producers = {t for it in pending for t in tops(it)}
    ready: set[str] = set()
    out = []
    while pending:
        for i, it in enumerate(pending):
            if all(b in ready for b in bottoms(it)):
                out.append(it)
                ready.update(tops(it))
                del pending[i]
                break
        else:
            it = pending[0]
            missing = [b for b in bottoms(it) if b not in ready]
            bad = [b for b in missing if b not in producers]
            if bad:
                raise CaffeFormatError(f"bottom blob {bad[0]!r} is produced by no layer",
                                       path=path, layer=name(it), field="bottom")
            raise CaffeFormatError(f"cycle: bottoms {missing} can never be computed",
                                   path=path, layer=name(it), field="bottom")
    return out


def _ordered(net) -> list:
    """The layers of ``net`` in a valid execution order."""
    return topo_order(net.layer, lambda lp: lp.bottom, lambda lp: lp.top, lambda lp: lp.name)


# ----------------------------------------------------------------------------- FC -> conv


@dataclasses.dataclass(frozen=True)
class FcCast:
    """One InnerProduct layer cast to a Convolution.

    ``kernel`` is the (H, W) of the bottom blob the layer saw in the classifier and
    ``channels`` its C, so the weight ``(num_output, C*H*W)`` becomes
    ``(num_output, C, H, W)`` with the same row-major memory (``transpose`` weights are
    stored ``(C*H*W, num_output)`` and must be transposed first).
    """

    name: str
    new_name: str
    bottom: str
    num_output: int
    channels: int
    kernel: tuple[int, int]
    transpose: bool = False

    @property
    def weight_shape(self) -> Shape:
        return (self.num_output, self.channels) + self.kernel


@dataclasses.dataclass(frozen=True)
class FullyConvPlan:
    """What ``fully_convolutional_net`` changes: cast layers, renamed blobs, removed Flatten
    layers and global poolings made fixed-size (name -> kernel)."""

    casts: tuple[FcCast, ...]
    blob_renames: tuple[tuple[str, str], ...]
    removed: tuple[str, ...]
    pooling_kernels: tuple[tuple[str, tuple[int, int]], ...]

    @property
    def renames(self) -> dict[str, str]:
        """Layer renames ``{"fc6": "fc6-conv", ...}`` (params keys in the new net)."""
        return {c.name: c.new_name for c in self.casts}


def fully_conv_plan(net, classifier_shape=None, suffix: str = "-conv") -> FullyConvPlan:
    """How to cast the classifier ``net`` into a fully convolutional net.

    Shapes are those of the classifier at ``classifier_shape`` (default: its Input shape).
    Raises ``CaffeFormatError`` for an InnerProduct that cannot be a convolution (``axis``
    other than 1 on a 4-D blob, or a bottom of 3 or 5+ dims).
    """
    net = as_net(net)
    shapes = blob_shapes(net, classifier_shape)
    layers = _ordered(net)
    producer: dict[str, object] = {}
    casts, removed, pools = [], [], []
    for lp in layers:
        if lp.type == "InnerProduct":
            p = lp.inner_product_param
            bottom = lp.bottom[0]
            src = producer.get(bottom)
            if src is not None and src.type == "Flatten" and _plain_flatten(
                    src, shapes[src.bottom[0]]) and _only_consumer(layers, bottom, lp):
                removed.append(src.name)
                bottom = src.bottom[0]
            shp = shapes[bottom]
            axis = p.axis % len(shp) if shp else 1
            if len(shp) == 4 and axis == 1:
                channels, kernel = shp[1], (shp[2], shp[3])
            elif len(shp) == 2 and axis == 1:
                channels, kernel = shp[1], (1, 1)
            else:
                raise CaffeFormatError(f"cannot cast to a convolution: bottom {bottom!r} has "
                                       f"shape {shp} and axis is {p.axis}", layer=lp.name,
                                       field="inner_product_param")
            pool = producer.get(bottom)
            if pool is not None and pool.type == "Pooling" and pool.pooling_param.global_pooling:
                pshape = shapes[pool.bottom[0]]
                pools.append((pool.name, (pshape[2], pshape[3])))
            casts.append(FcCast(name=lp.name, new_name=lp.name + suffix, bottom=bottom,
                                num_output=int(p.num_output), channels=int(channels),
                                kernel=tuple(int(k) for k in kernel),
                                transpose=bool(p.transpose)))
        for top in lp.top:
            if top not in lp.bottom:  # in-place layers (ReLU, Dropout) keep the origin
                producer[top] = lp
    cast_names = {c.name for c in casts}
    blob_renames = tuple((t, t + suffix) for lp in layers if lp.name in cast_names
                         for t in lp.top) if suffix else ()
    return FullyConvPlan(tuple(casts), blob_renames, tuple(removed), tuple(dict(pools).items()))


def _plain_flatten(lp, bottom_shape: Shape) -> bool:
    p = lp.flatten_param
    return len(bottom_shape) == 4 and p.axis % 4 == 1 and p.end_axis % 4 == 3


def _only_consumer(layers, blob: str, consumer) -> bool:
    return all(lp is consumer for lp in layers if blob in lp.bottom)


def fully_convolutional_net(net, input_shape: Sequence[int] | None = None,
                            suffix: str = "-conv", *, classifier_shape=None,
                            name: str | None = None):
    """The fully convolutional ``NetParameter`` of a classifier (the tutorial's cast).

    ``input_shape``: the new input, ``(N, C, H, W)`` or ``(H, W)`` (N and C kept); default:
    unchanged. ``classifier_shape``: the input the classifier was built for (default: its
    Input shape), which fixes each kernel. ``name``: default ``<name>Conv`` as the tutorial's
    ``CaffeNetConv``. The input net is not modified.
    """
    net = as_net(net)
    plan = fully_conv_plan(net, classifier_shape, suffix)
    casts = {c.name: c for c in plan.casts}
    renames = dict(plan.blob_renames)
    pools = dict(plan.pooling_kernels)
    removed = set(plan.removed)
    flatten_src = {lp.top[0]: lp.bottom[0] for lp in net.layer if lp.name in removed}
    out = type(net)()
    out.CopyFrom(net)
    del out.layer[:]
    if name is not None:
        out.name = name
    elif net.name:
        out.name = net.name + "Conv"
    for lp in net.layer:
        if lp.name in removed:
            continue
        new = out.layer.add()
        new.CopyFrom(lp)
        if lp.type in INPUT_TYPES and input_shape is not None:
            _set_input_shape(new, input_shape)
        if lp.name in casts:
            _to_convolution(new, casts[lp.name])
        if lp.name in pools:
            pp = new.pooling_param
            for f in ("global_pooling", "kernel_size", "kernel_h", "kernel_w", "stride",
                      "stride_h", "stride_w"):
                pp.ClearField(f)
            kh, kw = pools[lp.name]
            if kh == kw:
                pp.kernel_size = kh
            else:
                pp.kernel_h, pp.kernel_w = kh, kw
        bottoms = [renames.get(flatten_src.get(b, b), flatten_src.get(b, b))
                   for b in new.bottom]
        del new.bottom[:]
        new.bottom.extend(bottoms)
        tops = [renames.get(t, t) for t in new.top]
        del new.top[:]
        new.top.extend(tops)
    return out


def _set_input_shape(layer, input_shape: Sequence[int]) -> None:
    dims = [int(d) for d in input_shape]
    if layer.type != "Input":
        raise CaffeFormatError("only an Input layer's shape can be set", layer=layer.name,
                               field="input_param")
    for shape in layer.input_param.shape:
        old = list(shape.dim)
        if len(dims) == 2:
            if len(old) != 4:
                raise CaffeFormatError(f"cannot set H, W of a {len(old)}-D input",
                                       layer=layer.name, field="input_param")
            new = old[:2] + dims
        elif len(dims) == len(old) or not old:
            new = dims
        else:
            raise CaffeFormatError(f"input shape {tuple(dims)} does not fit {tuple(old)}",
                                   layer=layer.name, field="input_param")
        del shape.dim[:]
        shape.dim.extend(new)
    if not layer.input_param.shape:
        if len(dims) != 4:
            raise CaffeFormatError("the input has no shape: give N C H W", layer=layer.name,
                                   field="input_param")
        layer.input_param.shape.add().dim.extend(dims)


def _to_convolution(layer, cast: FcCast) -> None:
    ip = layer.inner_product_param
    conv = layer.convolution_param
    conv.num_output = ip.num_output
    if ip.HasField("bias_term"):
        conv.bias_term = ip.bias_term
    kh, kw = cast.kernel
    if kh == kw:
        conv.kernel_size.append(kh)
    else:
        conv.kernel_h, conv.kernel_w = kh, kw
    if ip.HasField("weight_filler"):
        conv.weight_filler.CopyFrom(ip.weight_filler)
    if ip.HasField("bias_filler"):
        conv.bias_filler.CopyFrom(ip.bias_filler)
    layer.ClearField("inner_product_param")
    layer.type = "Convolution"
    layer.name = cast.new_name


# ----------------------------------------------------------------------------- BatchNorm fold


@dataclasses.dataclass(frozen=True)
class BatchNormFold:
    """A Convolution/InnerProduct followed by a BatchNorm and maybe a Scale, foldable into it.

    ``top`` is the blob name the folded layer writes (the last folded layer's top).
    """

    layer: str
    layer_type: str
    batchnorm: str
    scale: str | None
    top: str
    eps: float


def batchnorm_folds(net) -> tuple[BatchNormFold, ...]:
    """The Conv/InnerProduct -> BatchNorm (global stats) [-> Scale] chains that can be folded.

    A chain is foldable when each intermediate value is read only by the next layer of the
    chain, the BatchNorm uses global statistics in TEST and normalises axis 1, and the Scale
    has one bottom (a learned, per-channel scale).
    """
    net = as_net(net)
    layers = _ordered(net)
    readers = _version_readers(layers)
    by_name = {lp.name: lp for lp in layers}
    folds = []
    for lp in layers:
        if lp.type not in ("Convolution", "InnerProduct") or len(lp.top) != 1:
            continue
        if lp.type == "InnerProduct" and (lp.inner_product_param.transpose
                                          or lp.inner_product_param.axis != 1):
            continue
        nxt = readers.get((lp.name, 0), [])
        if len(nxt) != 1 or by_name[nxt[0]].type != "BatchNorm":
            continue
        bn = by_name[nxt[0]]
        bp = bn.batch_norm_param
        if bp.HasField("use_global_stats") and not bp.use_global_stats:
            continue
        top, scale = bn.top[0], None
        after = readers.get((bn.name, 0), [])
        if len(after) == 1 and by_name[after[0]].type == "Scale":
            sc = by_name[after[0]]
            sp = sc.scale_param
            if len(sc.bottom) == 1 and sp.axis == 1 and sp.num_axes == 1:
                scale, top = sc.name, sc.top[0]
        folds.append(BatchNormFold(lp.name, lp.type, bn.name, scale, top, float(bp.eps)))
    return tuple(folds)


def _version_readers(layers) -> dict[tuple[str, int], list[str]]:
    """For each (producer layer, top index): the layers reading that value before any later
    layer overwrites the blob (in-place layers write a new value of the same name)."""
    current: dict[str, tuple[str, int]] = {}
    readers: dict[tuple[str, int], list[str]] = {}
    for lp in layers:
        for b in lp.bottom:
            if b in current:
                readers.setdefault(current[b], []).append(lp.name)
        for i, t in enumerate(lp.top):
            current[t] = (lp.name, i)
    return readers


def fold_batchnorm_net(net, folds: Sequence[BatchNormFold] | None = None):
    """The net without the folded BatchNorm/Scale layers; each folded layer gets a bias and
    writes the chain's last top. ``folds`` default: ``batchnorm_folds(net)``."""
    net = as_net(net)
    folds = batchnorm_folds(net) if folds is None else tuple(folds)
    gone = {f.batchnorm for f in folds} | {f.scale for f in folds if f.scale}
    target = {f.layer: f for f in folds}
    out = type(net)()
    out.CopyFrom(net)
    del out.layer[:]
    for lp in net.layer:
        if lp.name in gone:
            continue
        new = out.layer.add()
        new.CopyFrom(lp)
        f = target.get(lp.name)
        if f is not None:
            param = new.convolution_param if lp.type == "Convolution" \
                else new.inner_product_param
            param.bias_term = True
            del new.top[:]
            new.top.append(f.top)
    return out


__all__ = ["BatchNormFold", "FcCast", "FullyConvPlan", "Geometry", "as_net",
           "batchnorm_folds", "blob_shapes", "fold_batchnorm_net", "fully_conv_plan",
           "fully_convolutional_net", "input_shapes", "layer_geometry", "pooled_size"]
