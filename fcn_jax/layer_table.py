"""The table of Caffe layer types: one :class:`LayerType` record per type, in one dict.

A record holds everything the library knows about one type, in one place (as Caffe's own
``layer_factory`` registers each class once, with its ``Reshape`` and ``Forward``):

* ``read``: the layer's ``*_param`` fields, Caffe's defaults resolved, as plain values
  (the protobuf message is parsed once, into a frozen :class:`LayerSpec`);
* ``out_shapes`` and ``param_shapes``: its top shapes and its learnable blobs (names in
  Caffe's blob order, shapes, fillers), from its bottom shapes;
* ``bottoms``/``tops``: how many blobs it takes and gives (Caffe's ``ExactNumBottomBlobs``...);
* ``window``: how a cell's input window grows through it (receptive fields, cell windows);
* ``forward``: the Caffe-exact reference on NCHW arrays, and, where one exists,
  ``forward_nhwc``, the fast form (NHWC, dots, split groups, masked bucket sizes), with
  ``valid_sizes``, its rule for how the valid sizes of a zero-padded bucket shrink (no rule:
  the layer cannot run on padded buckets).

The graph executor (``fcn_jax.net.run_graph``), shape inference (:func:`blob_shapes`),
receptive fields (``fcn_jax.dense.receptive_field``), ``inference.supports_buckets``, the
list of supported types and the blob names are loops over this table. The built-in types
(``fcn_jax.builtin_layers``) go through the same door as a user's, :func:`register_layer`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from converters import CaffeFormatError, UnsupportedLayerError, caffe_pb2
from converters.caffe_io import filter_net

Shape = tuple[int, ...]
PathLike = str | os.PathLike
#: Geometry of one unit along (H, W): ``(start, jump, size)`` per axis, in input pixels:
#: where the first unit's window starts, the distance between neighbouring units' windows,
#: and a window's size. ``sliding`` is False once a layer has seen its whole bottom.
Geo = tuple[tuple[int, int, int], tuple[int, int, int]]


def freeze(value: Any) -> Any:
    """``value`` as nested tuples (dicts as sorted item tuples): hashable, for jit."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One Caffe layer as the executor runs it: type, blob names, and the parameters its
    record's ``read`` resolved (``cfg``). Frozen and hashable (a Flax module attribute)."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    attrs: tuple = ()
    lr_mults: tuple[float, ...] = ()
    decay_mults: tuple[float, ...] = ()
    #: the serialized LayerParameter (without blobs), for records that read it at run time
    message: bytes = dataclasses.field(default=b"", repr=False)

    @property
    def cfg(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def layer(self):
        """The layer's ``caffe.LayerParameter`` (a fresh copy: edits change nothing)."""
        lp = caffe_pb2.LayerParameter()
        lp.ParseFromString(self.message)
        return lp


@dataclasses.dataclass(frozen=True)
class Context:
    """What a forward needs besides its blobs and params: training mode, a dropout key
    source, and the matmul precision."""

    train: bool = False
    rng: Callable[[], Any] | None = None
    precision: Any = None

    def key(self, layer: str) -> Any:
        """A fresh PRNG key for a random layer in training, or a clear error."""
        if self.rng is None:
            raise ValueError(f"{layer}: Dropout in training needs rngs={{'dropout': key}}")
        return self.rng()


def _no_params(spec: LayerSpec, bottom_shapes: list[Shape]) -> dict:
    return {}


def _first_shape(spec: LayerSpec, bottom_shapes: list[Shape]) -> list[Shape]:
    return [bottom_shapes[0]] * len(spec.tops)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerType:
    """One Caffe layer type (see the module doc). Only ``name`` and ``forward`` are needed.

    ``forward(spec, bottoms, params, ctx) -> [tops]`` on NCHW arrays; ``read(lp) -> dict``;
    ``out_shapes(spec, bottom_shapes) -> [top shapes]`` (default: the first bottom's, or a
    shape-only trace of ``forward`` when ``traced_shapes``); ``param_shapes(spec,
    bottom_shapes) -> {blob: (shape, filler)}`` in Caffe's blob order; ``window(spec, geos,
    bottom_shapes) -> geo`` (None: receptive fields stop here with an error);
    ``forward_nhwc(spec, blobs, params, ctx, valid) -> [Blob] | None`` (None: use
    ``forward``); ``valid_sizes(spec, valid) -> [top valid sizes]`` (None: cannot run on
    padded buckets); ``bucketable(spec)`` refines that per layer; ``bottoms``/``tops``:
    ``(min, max)`` counts, ``max`` None for no limit.
    """

    name: str
    forward: Callable[..., list] | None = None
    read: Callable[[Any], dict] | None = None
    out_shapes: Callable[[LayerSpec, list[Shape]], list[Shape]] | None = _first_shape
    param_shapes: Callable[[LayerSpec, list[Shape]], dict] = _no_params
    window: Callable[[LayerSpec, list[Geo], list[Shape]], Geo] | None = None
    forward_nhwc: Callable[..., list | None] | None = None
    valid_sizes: Callable[[LayerSpec, list], list] | None = None
    bucketable: Callable[[LayerSpec], bool] | None = None
    bottoms: tuple[int, int | None] = (1, 1)
    tops: tuple[int, int | None] = (1, 1)
    #: ``workspace(spec, bottom_shapes, top_shapes) -> elements``: the largest intermediate its
    #: forward builds (padded inputs...), checked against the memory budget before tracing
    workspace: Callable[[LayerSpec, list[Shape], list[Shape]], int] | None = None
    is_input: bool = False
    #: ``forward_nhwc`` also takes bottoms that are not 4-D (they only have the NCHW form)
    fast_any_rank: bool = False
    builtin: bool = False

    def can_pad(self, spec: LayerSpec) -> bool:
        """Whether this layer runs exactly on a batch zero-padded to a bucket shape."""
        return self.valid_sizes is not None and (self.bucketable is None
                                                 or self.bucketable(spec))


#: Every known layer type by Caffe type name. Filled by ``fcn_jax.builtin_layers`` at import
#: and by :func:`register_layer`.
LAYER_TYPES: dict[str, LayerType] = {}
#: The built-in records a user's ``replace=True`` shadows, put back by ``remove_layer_type``.
_SHADOWED: dict[str, LayerType] = {}


def add_layer_type(record: LayerType, *, replace: bool = False) -> LayerType:
    """Put ``record`` in the table (``replace=True`` to override an existing type)."""
    if not record.builtin:
        _ensure_builtins()  # a user's type meets the built-in ones, never the reverse
    old = LAYER_TYPES.get(record.name)
    if old is not None and not replace:
        raise ValueError(f"layer type {record.name!r} is already registered "
                         f"({'built in' if old.builtin else 'by the user'}): pass replace=True")
    if old is not None and old.builtin and not record.builtin:
        _SHADOWED[record.name] = old
    LAYER_TYPES[record.name] = record
    return record


def remove_layer_type(type_name: str) -> None:
    """Take a user-registered type out of the table (built-in types stay): a user's
    replacement of a built-in type gives the built-in record back."""
    rec = LAYER_TYPES.get(type_name)
    if rec is not None and rec.builtin:
        raise ValueError(f"{type_name!r} is a built-in layer type")
    LAYER_TYPES.pop(type_name, None)
    if type_name in _SHADOWED:
        LAYER_TYPES[type_name] = _SHADOWED.pop(type_name)


def register_layer(type_name: str, *, param_shapes: Callable | None = None,
                   out_shapes: Callable | None = None, window: Callable | None = None,
                   bottoms: tuple[int, int | None] = (1, None),
                   tops: tuple[int, int | None] = (1, None), pointwise: bool = False,
                   replace: bool = False) -> Callable:
    """Register a Caffe layer type implemented by ``fn(bottoms, params, layer)``.

    ``fn`` takes the bottom blobs (NCHW arrays), the layer's params (``{name: array}`` in
    Caffe's shapes) and its ``caffe.LayerParameter`` (read-only), and returns the list of top
    blobs. ``param_shapes(layer, bottom_shapes)`` gives the learnable blobs in Caffe's order,
    ``{name: shape}`` or ``{name: (shape, filler_dict)}`` (filler default: constant 0);
    caffemodel blobs are matched by position. ``out_shapes(layer, bottom_shapes)``: the top
    shapes (default: a shape-only trace of ``fn``). ``pointwise=True`` says each output
    cell depends on the same input cell only (receptive fields pass through, padded
    buckets allowed); ``window(layer, geos, bottom_shapes)`` for other spatial layers.
    The type then works wherever a built-in one does (``converters.load_caffe``, ``fcn-jax
    info/run``, jit, grad, sharding). Use as a decorator; returns ``fn``."""

    def deco(fn: Callable) -> Callable:
        def forward(spec, xs, params, ctx):
            return list(fn(list(xs), dict(params), spec.layer))

        def pshapes(spec, shapes):
            out = {}
            for k, v in dict(param_shapes(spec.layer, [tuple(s) for s in shapes])).items():
                if (isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], dict)):
                    out[k] = (tuple(int(d) for d in v[0]), freeze(v[1]))
                else:
                    out[k] = (tuple(int(d) for d in v), None)
            return out

        oshapes = None
        if out_shapes is not None:
            def oshapes(spec, shapes):
                return [tuple(int(d) for d in s)
                        for s in out_shapes(spec.layer, [tuple(s) for s in shapes])]

        add_layer_type(LayerType(
            name=type_name, forward=forward, read=None, out_shapes=oshapes,
            param_shapes=pshapes if param_shapes is not None else _no_params,
            window=(lambda spec, geos, shapes: geos[0]) if pointwise else (
                (lambda spec, geos, shapes: window(spec.layer, geos, shapes))
                if window is not None else None),
            valid_sizes=(lambda spec, vs: [vs[0]] * len(spec.tops)) if pointwise else None,
            bottoms=bottoms, tops=tops), replace=replace)
        return fn

    return deco


def layer_type(type_name: str, *, layer: str | None = None,
               path: PathLike | None = None) -> LayerType:
    """The record of ``type_name``, or ``UnsupportedLayerError`` naming the layer."""
    _ensure_builtins()
    rec = LAYER_TYPES.get(type_name)
    if rec is None:
        raise UnsupportedLayerError(
            f"unsupported layer type {type_name!r} (build only what you need with "
            f"outputs=[...], or add the type with fcn_jax.register_layer)", path=path,
            layer=layer, field="type")
    return rec


def supported_types() -> frozenset[str]:
    """The names of every layer type in the table."""
    _ensure_builtins()
    return frozenset(LAYER_TYPES)


def input_types() -> frozenset[str]:
    """The layer types that feed data into a net (their tops are the module's inputs)."""
    _ensure_builtins()
    return frozenset(n for n, r in LAYER_TYPES.items() if r.is_input)


def _ensure_builtins() -> None:
    if not any(r.builtin for r in LAYER_TYPES.values()):
        from . import builtin_layers  # noqa: F401  (registers the built-in records)


# ----------------------------------------------------------------------------- compile


def topo_order(items: Iterable, bottoms: Callable, tops: Callable, name: Callable,
               path: PathLike | None = None) -> list:
    """A stable topological order: list order, a layer deferred until its bottoms exist.

    Linear in the number of layers and blobs. Undefined bottoms and cycles raise
    ``CaffeFormatError`` naming the layer."""
    items = list(items)
    producers = {t for it in items for t in tops(it)}
    waiting: dict[str, list[int]] = {}   # blob -> indices of layers waiting on it
    missing_count = [0] * len(items)
    ready: set[str] = set()
    for i, it in enumerate(items):
        need = {b for b in bottoms(it)}
        missing_count[i] = len(need)
        for b in need:
            waiting.setdefault(b, []).append(i)
    heap = [i for i, c in enumerate(missing_count) if c == 0]
    heapq.heapify(heap)
    out, done = [], [False] * len(items)
    while heap:
        i = heapq.heappop(heap)
        done[i] = True
        out.append(items[i])
        for t in tops(items[i]):
            if t in ready:
                continue
            ready.add(t)
            for j in waiting.pop(t, ()):
                missing_count[j] -= 1
                if missing_count[j] == 0 and not done[j]:
                    heapq.heappush(heap, j)
    if len(out) < len(items):
        it = next(items[i] for i in range(len(items)) if not done[i])
        missing = [b for b in bottoms(it) if b not in ready]
        bad = [b for b in missing if b not in producers]
        if bad:
            raise CaffeFormatError(f"bottom blob {bad[0]!r} is produced by no layer",
                                   path=path, layer=name(it), field="bottom")
        raise CaffeFormatError(f"cycle: bottoms {missing} can never be computed",
                               path=path, layer=name(it), field="bottom")
    return out


def _check_counts(rec: LayerType, lp, path: PathLike | None) -> None:
    for what, n, (lo, hi) in (("bottom", len(lp.bottom), rec.bottoms),
                              ("top", len(lp.top), rec.tops)):
        if n < lo or (hi is not None and n > hi):
            want = (f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None
                    else f"{lo} to {hi}")
            raise CaffeFormatError(f"a {rec.name} layer takes {want} {what} blob(s), got {n}",
                                   path=path, layer=lp.name, field=what)


def spec_of(lp, *, path: PathLike | None = None) -> LayerSpec:
    """One ``LayerParameter`` read into a :class:`LayerSpec` through its record."""
    rec = layer_type(lp.type, layer=lp.name, path=path)
    _check_counts(rec, lp, path)
    try:
        attrs = rec.read(lp) if rec.read is not None else {}
    except CaffeFormatError as e:
        raise e.with_context(path=path, layer=lp.name) from None
    bare = type(lp)()
    bare.CopyFrom(lp)
    bare.ClearField("blobs")
    return LayerSpec(name=lp.name, type=lp.type, bottoms=tuple(lp.bottom), tops=tuple(lp.top),
                     attrs=freeze(attrs), lr_mults=tuple(float(p.lr_mult) for p in lp.param),
                     decay_mults=tuple(float(p.decay_mult) for p in lp.param),
                     message=bare.SerializeToString(deterministic=True))


#: Most layers a net may have: XLA's compile time grows faster than the depth (2,000
#: in-place TanH layers take about a minute to compile), so deeper nets are refused in one
#: line rather than left compiling (the largest model-zoo nets have about 1,500).
MAX_LAYERS = 2048
#: Most bottoms or tops one layer may name (Caffe's widest real layers have a few hundred;
#: XLA:CPU compiles a program with 1,000 outputs in about a minute).
MAX_LAYER_BLOBS = 1024
#: Most bottom and top references in the whole net (bounds the graph that is traced).
MAX_GRAPH_EDGES = 1 << 15


def check_graph_size(layers: Sequence, path: PathLike | None = None) -> None:
    """Refuse a net past ``MAX_LAYERS`` layers, ``MAX_LAYER_BLOBS`` bottoms or tops in one
    layer, or ``MAX_GRAPH_EDGES`` in all, in one line naming the layer and the limit."""
    if len(layers) > MAX_LAYERS:
        raise CaffeFormatError(f"{len(layers)} layers, more than the {MAX_LAYERS} fcn-jax "
                               "builds (compile time grows faster than the depth)",
                               path=path, field="layer")
    edges = 0
    for lp in layers:
        for what, n in (("bottom", len(lp.bottom)), ("top", len(lp.top))):
            if n > MAX_LAYER_BLOBS:
                raise CaffeFormatError(f"{n} {what} blobs, more than the {MAX_LAYER_BLOBS} "
                                       "one layer may have", path=path, layer=lp.name,
                                       field=what)
            edges += n
        if edges > MAX_GRAPH_EDGES:
            raise CaffeFormatError(f"more than {MAX_GRAPH_EDGES} bottom and top blobs in all, "
                                   "past what fcn-jax builds", path=path, layer=lp.name,
                                   field="bottom")


def check_producers(layers: Sequence, path: PathLike | None = None) -> None:
    """Caffe's ``AppendTop`` rule: a blob has one producer; a layer may only rewrite a blob
    in place (top ``i`` named as its bottom ``i``). Else "produced by multiple sources"."""
    produced: set[str] = set()
    for lp in layers:
        for i, t in enumerate(lp.top):
            in_place = i < len(lp.bottom) and lp.bottom[i] == t
            if t in produced and not in_place:
                raise CaffeFormatError(f"top blob {t!r} produced by multiple sources",
                                       path=path, layer=lp.name, field="top")
            produced.add(t)


def compile_net(net, *, phase: str = "TEST", path: PathLike = "<net>",
                outputs: Sequence[str] | None = None, stages: Sequence[str] | None = (),
                level: int | None = None) -> tuple[LayerSpec, ...]:
    """A NetParameter as ``LayerSpec``s in a valid execution order.

    Honours include/exclude rules for the NetState (``phase``, the net's ``state`` stages
    plus ``stages``, ``level`` or the net's own); duplicate layer names, blobs with two
    producers, undefined bottoms, cycles, wrong bottom/top counts, graphs past the size
    limits and unsupported types raise ``CaffeFormatError`` naming the layer. ``outputs``:
    keep only the layers these blobs need (an unsupported layer elsewhere is never read),
    like pycaffe's ``forward(end=...)``."""
    try:
        net = filter_net(net, phase=phase, stages=stages, level=level)
    except CaffeFormatError as e:
        raise e.with_context(path=path) from None
    layers = list(net.layer)
    check_graph_size(layers, path)
    seen: set[str] = set()
    for lp in layers:
        if not lp.name:
            raise CaffeFormatError("layer without a name", path=path, layer="?", field="name")
        if lp.name in seen:
            raise CaffeFormatError("duplicate layer name", path=path, layer=lp.name,
                                   field="name")
        seen.add(lp.name)
    check_producers(layers, path)
    ordered = topo_order(layers, lambda lp: lp.bottom, lambda lp: lp.top, lambda lp: lp.name,
                         path=path)
    if outputs is not None:
        ordered = _needed(ordered, outputs, path)
    return tuple(spec_of(lp, path=path) for lp in ordered)


def _needed(ordered: list, outputs: Sequence[str], path: PathLike | None) -> list:
    """The layers (in order) that the blobs ``outputs`` depend on."""
    known = {t for lp in ordered for t in lp.top}
    unknown = [b for b in outputs if b not in known]
    if unknown:
        raise CaffeFormatError(f"no blob named {unknown[0]!r} (outputs=): the net has "
                               f"{sorted(known)[:20]}", path=path, field="outputs")
    need = set(outputs)
    keep = []
    for lp in reversed(ordered):
        if need & set(lp.top):
            keep.append(lp)
            need.update(lp.bottom)
            # an in-place layer's bottom is its top: earlier writers stay needed
    return keep[::-1]


def starting_at(layers: Sequence[LayerSpec], given: Iterable[str]) -> tuple[LayerSpec, ...]:
    """The layers that run when the blobs ``given`` are supplied (pycaffe's
    ``forward(start=...)``, by blob name): a given blob holds its final value, so every layer
    writing it (in place too) is skipped, and so is everything only needed before it."""
    available = set(given)
    keep = []
    for s in layers:
        if set(s.tops) & set(given) or layer_type(s.type, layer=s.name).is_input:
            continue
        if all(b in available for b in s.bottoms):
            keep.append(s)
            available.update(s.tops)
    return tuple(keep)


# ----------------------------------------------------------------------------- shapes


def param_shapes(spec: LayerSpec, bottom_shapes: Sequence[Shape]
                 ) -> dict[str, tuple[Shape, Any]]:
    """The learnable blobs of a layer for these bottom shapes: ``{name: (shape, filler)}``
    in Caffe's blob order."""
    return layer_type(spec.type, layer=spec.name).param_shapes(
        spec, [tuple(s) for s in bottom_shapes])


def param_names(type_name: str, count: int) -> tuple[str, ...]:
    """The names of a layer type's first ``count`` blobs in Caffe's order (``blob{i}``
    beyond the names the format gives them, ``converters.PARAM_NAMES``)."""
    from converters.caffe_io import param_names as format_names

    return format_names(type_name, count)


def top_shapes(spec: LayerSpec, bottom_shapes: Sequence[Shape]) -> list[Shape]:
    """The shapes of a layer's tops for these bottom shapes (Caffe's ``Reshape``)."""
    rec = layer_type(spec.type, layer=spec.name)
    shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
    if rec.out_shapes is not None:
        return [tuple(int(d) for d in s) for s in rec.out_shapes(spec, shapes)]
    return _traced_shapes(rec, spec, shapes)


def _traced_shapes(rec: LayerType, spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    """Top shapes from a shape-only trace of the record's forward (no FLOPs, no memory)."""
    import jax
    import jax.numpy as jnp

    params = {k: jax.ShapeDtypeStruct(s, jnp.float32)
              for k, (s, _) in rec.param_shapes(spec, shapes).items()}
    xs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    out = jax.eval_shape(lambda xs, p: rec.forward(spec, xs, p, Context()), xs, params)
    return [tuple(int(d) for d in o.shape) for o in out]


def blob_shapes(layers: Sequence[LayerSpec], inputs: Mapping[str, Shape]) -> dict[str, Shape]:
    """Every blob's shape after a forward pass (in-place blobs keep their last shape),
    from the inputs' shapes, by the records' shape rules."""
    shapes = {k: tuple(int(d) for d in v) for k, v in inputs.items()}
    for spec in layers:
        rec = layer_type(spec.type, layer=spec.name)
        if rec.is_input:
            continue
        tops = top_shapes(spec, [shapes[b] for b in spec.bottoms])
        if len(tops) != len(spec.tops):
            raise CaffeFormatError(f"gives {len(tops)} tops, the layer names {len(spec.tops)}",
                                   layer=spec.name, field="top")
        for t, s in zip(spec.tops, tops, strict=True):
            if any(d < 0 for d in s) or (s and math.prod(s) == 0 and spec.type != "Silence"):
                raise CaffeFormatError(f"output shape {s} is empty for bottoms "
                                       f"{[shapes[b] for b in spec.bottoms]}", layer=spec.name,
                                       field="top")
            shapes[t] = s
    return shapes


def check_layer(spec: LayerSpec, bottom_shapes: Sequence[Shape], budget: int,
                itemsize: int = 4) -> list[Shape] | None:
    """Before a layer's forward is traced: its record's shape rule (ranks, sizes; Caffe's
    ``Reshape`` checks) and its memory (tops and intermediates within ``budget`` bytes).
    Returns the top shapes, or None for a record without a shape rule."""
    rec = layer_type(spec.type, layer=spec.name)
    if rec.out_shapes is None:
        return None
    # a symbolic dimension (jax.export's batch) counts as 1 here
    shapes = [tuple(d if isinstance(d, int) else 1 for d in s) for s in bottom_shapes]
    tops = top_shapes(spec, shapes)
    elems = sum(math.prod(t) for t in tops)
    if rec.workspace is not None:
        elems = max(elems, int(rec.workspace(spec, shapes, tops)))
    if elems * itemsize > budget:
        raise CaffeFormatError(f"needs {elems * itemsize} bytes for its outputs and "
                               f"intermediates (bottoms {shapes}), over the memory budget of "
                               f"{budget} (FCN_JAX_MEMORY_BUDGET)", layer=spec.name,
                               field="top")
    return tops


def given_input_shapes(layers: Sequence[LayerSpec]) -> dict[str, Shape | None]:
    """The shapes the net's input layers declare (None where a Data layer gives none)."""
    out: dict[str, Shape | None] = {}
    for s in layers:
        if layer_type(s.type, layer=s.name).is_input:
            given = s.cfg.get("shapes", ())
            for i, top in enumerate(s.tops):
                out[top] = (given[i] if i < len(given) else given[0]) if given else None
    return out


# ----------------------------------------------------------------------------- windows


def whole(geo: Geo, hw: Sequence[int]) -> Geo:
    """The geometry of a unit that sees a whole ``hw`` bottom."""
    return tuple((s, j * hw[a], z + (hw[a] - 1) * j) for a, (s, j, z) in enumerate(geo))


def kernel_window(geo: Geo, kernel: Sequence[int], stride: Sequence[int],
                  pad: Sequence[int], dilation: Sequence[int] = (1, 1)) -> Geo:
    """Through a sliding kernel: ``size += d(k-1) jump``, ``start -= pad jump``,
    ``jump *= stride``."""
    return tuple((s - pad[a] * j, j * stride[a], z + dilation[a] * (kernel[a] - 1) * j)
                 for a, (s, j, z) in enumerate(geo))


def union(geos: Sequence[Geo], layer: str) -> Geo:
    """The window covering every bottom's window (the bottoms must share the jump)."""
    out = []
    for a in range(2):
        jumps = {g[a][1] for g in geos}
        if len(jumps) != 1:
            raise ValueError(f"{layer}: bottoms have different strides {sorted(jumps)}")
        start = min(g[a][0] for g in geos)
        end = max(g[a][0] + g[a][2] for g in geos)
        out.append((start, jumps.pop(), end - start))
    return tuple(out)


def walk_windows(layers: Sequence[LayerSpec], inputs: Mapping[str, Shape]
                 ) -> dict[str, tuple[Geo, bool]]:
    """For every blob reachable from the inputs: ``(geo, sliding)``, the input window of
    its cells and whether each cell still slides with the input (False once a layer saw its
    whole bottom: InnerProduct, Flatten, global pooling)."""
    shapes = blob_shapes(layers, inputs)
    geo: dict[str, tuple[Geo, bool]] = {}
    for spec in layers:
        rec = layer_type(spec.type, layer=spec.name)
        if rec.is_input:
            for t in spec.tops:
                geo[t] = (((0, 1, 1), (0, 1, 1)), True)
            continue
        bottoms = [geo[b] for b in spec.bottoms if b in geo]
        if not bottoms:
            continue
        if rec.window is None:
            raise ValueError(f"{spec.name}: a {spec.type} layer has no window rule "
                             "(receptive fields through it are not supported)")
        bshapes = [shapes[b] for b in spec.bottoms]
        g = rec.window(spec, [b[0] for b in bottoms], bshapes)
        sees_whole = (len(bshapes[0]) == 4 and tuple(bshapes[0][2:]) != (1, 1)
                      and g == whole(bottoms[0][0], bshapes[0][2:]))
        sliding = all(b[1] for b in bottoms) and not sees_whole
        for t in spec.tops:
            geo[t] = (g, sliding)
    return geo


__all__ = [
    "Context", "LAYER_TYPES", "LayerSpec", "LayerType", "add_layer_type", "blob_shapes",
    "check_layer",
    "compile_net", "given_input_shapes", "input_types", "kernel_window", "layer_type",
    "param_names", "param_shapes", "register_layer", "remove_layer_type", "spec_of",
    "starting_at", "supported_types", "top_shapes", "topo_order", "union", "walk_windows",
    "whole",
]
