"""Net-definition rewrites for net surgery (protobuf messages in, new messages out).

* ``blob_shapes(net, input_shape)``: every blob's shape, by the layer records' shape rules
  (``fcn_jax.layer_table``).
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
import os
from collections.abc import Mapping, Sequence

from converters import CaffeFormatError
from converters.caffe_io import filter_net, read_prototxt, upgrade_net

from . import layer_table

PathLike = str | os.PathLike
Shape = tuple[int, ...]


def as_net(net):
    """A V2 ``NetParameter`` from a path or a (possibly legacy) message, phase TEST."""
    if isinstance(net, (str, os.PathLike)):
        net = read_prototxt(net)
    else:
        net = upgrade_net(net)
    return filter_net(net, "TEST")


# ----------------------------------------------------------------------------- shapes


def input_shapes(net, input_shape=None) -> dict[str, Shape]:
    """Shapes of the net's inputs: the Input layers' shapes, overridden by ``input_shape``
    (one shape for a single-input net, or ``{name: shape}``)."""
    net = as_net(net)
    shapes: dict[str, Shape | None] = {}
    for lp in net.layer:
        if layer_table.layer_type(lp.type, layer=lp.name).is_input:
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
    """
    net = as_net(net)
    return layer_table.blob_shapes(layer_table.compile_net(net), input_shapes(net, input_shape))


def _ordered(net) -> list:
    """The layers of ``net`` in a valid execution order."""
    return layer_table.topo_order(net.layer, lambda lp: lp.bottom, lambda lp: lp.top,
                                  lambda lp: lp.name)


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
    if not plan.casts:
        raise CaffeFormatError("no InnerProduct layer: nothing to cast (the net is fully "
                               "convolutional already)", field="layer")
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
        if layer_table.layer_type(lp.type, layer=lp.name).is_input and input_shape is not None:
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
    if input_shape is not None:
        _check_input_fits(out)
    return out


def _runs(net, hw: tuple[int, int]) -> bool:
    shapes = input_shapes(net)
    name, shape = next(iter(shapes.items()))
    try:
        layer_table.blob_shapes(layer_table.compile_net(net),
                                {**shapes, name: tuple(shape[:-2]) + tuple(hw)})
    except (CaffeFormatError, ValueError):
        return False
    return True


def minimum_input_size(net) -> tuple[int, int]:
    """The smallest input (H, W) a single-input net runs on (every blob at least one cell),
    each side searched with the other at the net's own size, which must run (or be reached
    by doubling). For a cast classifier it is close to the classifier's input: CaffeNet's
    fully convolutional form needs 227 x 227 for its one output cell."""
    net = as_net(net)
    shapes = input_shapes(net)
    if len(shapes) != 1 or len(next(iter(shapes.values()))) != 4:
        raise ValueError("minimum_input_size needs a net with one 4-D input")
    h, w = next(iter(shapes.values()))[2:]
    while not _runs(net, (h, w)):
        if max(h, w) > 1 << 16:
            raise ValueError("the net runs on no input up to 65536 px")
        h, w = 2 * h, 2 * w

    def smallest(ok) -> int:  # the least s in [1, hi] with ok(s), ok monotone
        lo, hi = 1, max(h, w)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return lo

    return (smallest(lambda s: _runs(net, (s, w))), smallest(lambda s: _runs(net, (h, s))))


def _check_input_fits(net) -> None:
    """Refuse an input too small for the cast net, naming its smallest input (a net whose
    shapes cannot be computed at any size is left to the code that runs it)."""
    shapes = input_shapes(net)
    if len(shapes) != 1:
        return
    name, shape = next(iter(shapes.items()))
    try:
        layer_table.blob_shapes(layer_table.compile_net(net), shapes)
    except (CaffeFormatError, ValueError) as e:
        try:
            mh, mw = minimum_input_size(net)
        except ValueError:
            return  # not a size problem (say, a layer type not registered): cast as asked
        where = e.layer if isinstance(e, CaffeFormatError) else None
        at = f" (layer {where!r} gets no output cell)" if where else ""
        raise CaffeFormatError(
            f"input {shape[-2]}x{shape[-1]} is too small for the fully convolutional net"
            f"{at}: its smallest input is {mh}x{mw}, for one output cell",
            field="input_shape") from None


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


__all__ = ["BatchNormFold", "FcCast", "FullyConvPlan", "as_net", "batchnorm_folds",
           "blob_shapes", "fold_batchnorm_net", "fully_conv_plan", "fully_convolutional_net",
           "input_shapes", "minimum_input_size"]
