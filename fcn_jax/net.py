"""Run any Caffe net definition as a Flax module: ``load_caffe(prototxt, caffemodel)``.

A prototxt is compiled once into a tuple of frozen ``LayerSpec`` (``fcn_jax.layer_table``:
each layer read through its type's record). :func:`run_graph`, the one forward engine,
executes them in a valid order and returns every blob by its Caffe name, as ``net.blobs``
would hold it after ``net.forward()`` (in-place layers overwrite their blob). ``CaffeGraph``
(what ``load_caffe`` builds), ``fcn_jax.CaffeNet``, compiled inference and training all run
it.

Params are ``params[layer_name][blob_name]`` in Caffe's shapes (see ``converters.PARAM_NAMES``).
"""

from __future__ import annotations

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
from converters import CaffeFormatError, ParamMismatchError

from . import layers as L
from .layer_table import (
    Context,
    LayerSpec,
    blob_shapes,
    check_layer,
    compile_net,
    given_input_shapes,
    layer_type,
    param_names,
    param_shapes,
    starting_at,
    supported_types,
)
from .nhwc import Blob

Array = jax.Array
PathLike = str | os.PathLike


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_TYPES":  # the table can grow (register_layer): computed on access
        return supported_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


# ----------------------------------------------------------------------------- params


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
    raise ParamMismatchError(f"shape {tuple(arr.shape)} does not match the net's "
                           f"{tuple(shape)}", path=path, layer=layer, field=name)


# ----------------------------------------------------------------------------- execution


def run_graph(layers: Sequence[LayerSpec], get_params: Callable[[LayerSpec, list], Mapping],
              inputs: Mapping[str, Array], *, outputs: Sequence[str] | None = None,
              train: bool = False, rng: Callable[[], Array] | None = None,
              valid: Mapping[str, tuple[Array, Array]] | None = None,
              precision: Any = lax.Precision.HIGHEST, fast: bool = True
              ) -> tuple[dict[str, Array], dict[str, Any]]:
    """Execute compiled layers: ``({blob: NCHW array}, {blob: valid size or None})``.

    ``get_params(spec, bottom_shapes)`` returns the layer's params (Caffe shapes). Each layer
    runs its record's fast form (``fcn_jax.nhwc``: 4-D blobs live in NHWC, only returned
    blobs are converted to NCHW) where it has one, else its Caffe-exact NCHW forward;
    ``fast=False`` runs the NCHW forwards only. ``valid``: per input, ``(h, w)`` int32
    arrays of shape (N,) giving each example's true size when the batch was zero-padded to
    a bucket shape; cells beyond it are masked so that the cells inside are exactly those
    of the unpadded input. A layer that fails raises ``CaffeFormatError`` naming it.
    """
    blobs = {n: Blob(nchw=a) for n, a in inputs.items()}
    valids: dict[str, Any] = {n: (None if valid is None else valid.get(n)) for n in inputs}
    ctx = Context(train=train, rng=rng, precision=precision)
    budget = converters.resolve_memory_budget()
    for spec in layers:
        rec = layer_type(spec.type, layer=spec.name)
        if rec.is_input:
            continue
        try:
            bl = [blobs[b] for b in spec.bottoms]
        except KeyError as e:
            raise CaffeFormatError(f"bottom blob {e.args[0]!r} is not computed: give it as "
                                   "an input", layer=spec.name, field="bottom") from None
        vs = [valids[b] for b in spec.bottoms]
        padded = any(v is not None for v in vs)
        if padded and not rec.can_pad(spec):
            raise CaffeFormatError(f"a {spec.type} layer cannot run on inputs padded to a "
                                   "bucket shape", layer=spec.name, field="type")
        try:
            check_layer(spec, [b.shape for b in bl], budget)
            p = get_params(spec, [b.shape for b in bl])
            tops = None
            if fast and rec.forward_nhwc is not None and (
                    rec.fast_any_rank or all(b.is_4d for b in bl)):
                tops = rec.forward_nhwc(spec, bl, p, ctx, vs)
            if tops is None:
                tops = [Blob(nchw=a) for a in rec.forward(spec, [b.nchw() for b in bl], p,
                                                          ctx)]
        except CaffeFormatError as e:
            raise e.with_context(layer=spec.name) from None
        except (ValueError, TypeError, IndexError) as e:
            raise CaffeFormatError(str(e), layer=spec.name) from e
        if len(tops) != len(spec.tops):
            raise CaffeFormatError(f"gives {len(tops)} tops, the layer names {len(spec.tops)}",
                                   layer=spec.name, field="top")
        tvalids = rec.valid_sizes(spec, vs) if padded else [None] * len(tops)
        for name, blob, v in zip(spec.tops, tops, tvalids, strict=True):
            blobs[name] = blob
            valids[name] = v
    names = list(blobs) if outputs is None else list(outputs)
    missing = [k for k in names if k not in blobs]
    if missing:
        raise CaffeFormatError(f"unknown blobs {missing}; the net has {list(blobs)}",
                               field="outputs")
    return {k: blobs[k].nchw() for k in names}, {k: valids.get(k) for k in names}


def _any_batch(shape: Sequence[int]) -> str:
    return "(" + ", ".join(["N"] + [str(int(d)) for d in shape[1:]]) + ")"


def check_inputs(layers: Sequence[LayerSpec], blobs: Mapping[str, Array],
                 declared: Mapping[str, tuple[int, ...] | None],
                 params: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Before anything is traced: every input real (a single input a float array), not
    empty, and, where its shape
    differs from the prototxt's, one the net's layers (and ``params``) take; else one line,
    ``input 'data' of shape (1, 48, 48, 3) does not fit the net, which takes (N, 3, 48,
    48) (at this input, layer 'fc6': ...)``."""
    for name, x in blobs.items():
        shape = tuple(x.shape)
        # an integer array is refused as a single-input net's image (a raw uint8 image);
        # beside other inputs it may be a label blob
        kind = np.dtype(x.dtype).kind
        if kind in "bc" or (kind in "iu" and len(blobs) == 1):
            raise CaffeFormatError(f"input {name!r} is {x.dtype}: the net takes float arrays "
                                   "(Caffe's blobs are float; convert and preprocess first)",
                                   field="inputs")
        if any(isinstance(d, int) and d == 0 for d in shape):
            raise CaffeFormatError(f"input {name!r} of shape {shape} is empty", field="inputs")
    sizes = {k: tuple(v.shape) for k, v in blobs.items()}
    if not all(isinstance(d, int) for s in sizes.values() for d in s):
        return  # symbolic dimensions (jax.export): checked by tracing
    if all(declared.get(k) is not None and s[1:] == tuple(declared[k])[1:]
           and len(s) == len(declared[k]) for k, s in sizes.items()):
        return  # the prototxt's own shapes (any batch): the layers were checked at load
    try:
        shapes = blob_shapes(layers, sizes)
        for spec in layers:
            if params is None or spec.name not in params or not all(
                    b in shapes for b in spec.bottoms):
                continue
            _check_shapes(spec.name, params[spec.name],
                          param_shapes(spec, [shapes[b] for b in spec.bottoms]))
    except (ValueError, TypeError, IndexError, KeyError) as e:
        got = ", ".join(f"{k!r} of shape {s}" for k, s in sizes.items())
        known = {k: v for k, v in declared.items() if v is not None and k in sizes}
        want = (_any_batch(next(iter(known.values()))) if len(known) == 1 == len(sizes)
                else ", ".join(f"{k!r} {_any_batch(v)}" for k, v in known.items()))
        layer, field = getattr(e, "layer", None), getattr(e, "field", None)
        where = "".join(f"{k}: " for k in (layer and f"layer {layer!r}", field) if k)
        reason = getattr(e, "reason", None) or str(e)
        takes = f", which takes {want}" if want else ""
        raise CaffeFormatError(f"input {got} does not fit the net{takes} (at this input, "
                               f"{where}{reason})") from None


class CaffeGraph(nn.Module):
    """A Caffe net as a Flax module. ``apply({"params": p}, x)`` returns ``{blob: array}``.

    ``x`` is one NCHW array (single-input nets) or ``{blob_name: array}``: the net's inputs,
    or any intermediate blobs to start from (pycaffe's ``forward(start=...)``: the layers
    that write a given blob, and everything only needed for them, are skipped). Any spatial
    size works where the net allows it. ``train=True`` activates Dropout (needs
    ``rngs={"dropout": key}``) and batch statistics in BatchNorm layers without
    ``use_global_stats``. ``outputs`` limits the returned blobs (all by default).
    """

    layers: tuple[LayerSpec, ...]
    name_: str = "net"

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(given_input_shapes(self.layers))

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...] | None]:
        return given_input_shapes(self.layers)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The net's output blobs, pycaffe's ``net.outputs``: blobs no later layer reads (an
        in-place layer's top stays an output), in net order (Caffe lists the same blobs
        sorted by name). ``apply`` returns a dict sorted by name under ``jit``, so take
        ``out[module.outputs[-1]]``, never ``list(out)[-1]``."""
        available: dict[str, None] = {}
        for s in self.layers:
            for b in s.bottoms:
                available.pop(b, None)
            for t in s.tops:
                available.pop(t, None)  # a top written again moves to its new place
                available[t] = None
        return tuple(available)

    @nn.compact
    def __call__(self, x: Array | Mapping[str, Array], *, train: bool = False,
                 outputs: tuple[str, ...] | None = None) -> dict[str, Array]:
        names = self.inputs
        layers = self.layers
        if isinstance(x, Mapping):
            blobs = {n: jnp.asarray(v) for n, v in x.items()}
            starts = [n for n in blobs if n not in names]
            if starts:
                known = {t for s in layers for t in s.tops}
                unknown = [n for n in starts if n not in known]
                if unknown:
                    raise CaffeFormatError(f"no blob named {unknown[0]!r} to start from; the "
                                           f"net's inputs are {list(names)}", field="inputs")
                layers = starting_at(layers, starts)
            else:
                missing = [n for n in names if n not in blobs]
                if missing:
                    raise CaffeFormatError(f"missing inputs {missing}; the net takes "
                                           f"{list(names)}", field="inputs")
        else:
            if len(names) != 1:
                raise CaffeFormatError(f"the net takes inputs {list(names)}: pass a dict "
                                       "{name: array}", field="inputs")
            blobs = {names[0]: jnp.asarray(x)}
        check_inputs(layers, blobs, self.input_shapes,
                     None if self.is_mutable_collection("params")
                     else self.variables.get("params"))
        if isinstance(outputs, str):
            outputs = (outputs,)
        rng = (lambda: self.make_rng("dropout")) if train and self.has_rng("dropout") else None
        out, _ = run_graph(layers, module_params(self), blobs, outputs=outputs, train=train,
                           rng=rng)
        return out


def module_params(module: nn.Module) -> Callable[[LayerSpec, list], Mapping[str, Array]]:
    """``run_graph``'s ``get_params`` inside a Flax module: each layer's blobs declared with
    ``module.param`` (initialised from the layer's fillers) and checked against the shapes
    its bottoms need."""

    def get_params(spec: LayerSpec, bottom_shapes: list) -> Mapping[str, Array]:
        shapes = param_shapes(spec, bottom_shapes)
        if not shapes:
            return {}
        if module.has_variable("params", spec.name):  # our check, before Flax's
            p = module.get_variable("params", spec.name)
            _check_shapes(spec.name, p, shapes)
            return p
        p = module.param(spec.name, _init_layer(spec.name, shapes))
        _check_shapes(spec.name, p, shapes)
        return p

    return get_params


def _init_layer(layer: str, shapes: Mapping[str, tuple]) -> Callable:
    def init(key: Array) -> dict[str, Array]:
        keys = jax.random.split(key, len(shapes))
        return {n: fill(k, shp, dict(f) if f else {}).astype(jnp.float32).reshape(shp)
                for k, (n, (shp, f)) in zip(keys, shapes.items(), strict=True)}
    return init


def _check_shapes(layer: str, p: Mapping[str, Array], shapes: Mapping[str, tuple]) -> None:
    if set(p) != set(shapes):
        raise ParamMismatchError(f"params {sorted(p)} but the layer needs {sorted(shapes)}",
                                 layer=layer, field="params")
    for n, (shp, _) in shapes.items():
        if tuple(p[n].shape) != tuple(shp):
            raise ParamMismatchError(f"shape {tuple(p[n].shape)} does not match the "
                                     f"{tuple(shp)} its bottom blob needs", layer=layer, field=n)


# ----------------------------------------------------------------------------- loading


def build_module(net, *, phase: str = "TEST", stages: Sequence[str] | None = (),
                 level: int | None = None, path: PathLike = "<net>",
                 outputs: Sequence[str] | None = None) -> CaffeGraph:
    """A ``CaffeGraph`` for a NetParameter (already read and upgraded); ``outputs``: only
    the layers these blobs need."""
    return CaffeGraph(layers=compile_net(net, phase=phase, path=path, outputs=outputs,
                                         stages=stages, level=level),
                      name_=net.name or "net")


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
    """The parameter shapes the net needs, by the layer records' shape rules: ``{layer:
    {blob: shape}}``, blobs in Caffe's order."""
    xs = example_inputs(module, input_shape)
    shapes = blob_shapes(module.layers, {k: v.shape for k, v in xs.items()})
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for spec in module.layers:
        if spec.bottoms and all(b in shapes for b in spec.bottoms):
            need = param_shapes(spec, [shapes[b] for b in spec.bottoms])
            if need:
                out[spec.name] = {k: tuple(v[0]) for k, v in need.items()}
    return out


def _by_position(layer_type_name: str, blobs: Mapping[str, Any]) -> list[Any]:
    """A layer's stored blobs in Caffe's order (names as ``converters.param_names`` gives)."""
    order = param_names(layer_type_name, len(blobs))
    rank = {n: i for i, n in enumerate(order)}
    return [blobs[k] for k in sorted(blobs, key=lambda k: rank.get(k, len(rank)))]


def load_caffe(prototxt: PathLike | Any, caffemodel: PathLike | Mapping | None = None, *,
               phase: str = "TEST", input_shape: Any = None, strict: bool = True,
               seed: int = 0, outputs: Sequence[str] | None = None,
               stages: Sequence[str] | None = (), level: int | None = None
               ) -> tuple[CaffeGraph, dict[str, dict[str, jax.Array]]]:
    """Load a Caffe net as ``(module, params)``.

    ``prototxt``: a path or a NetParameter. ``caffemodel``: a path, a params pytree, or None
    (then params come from the prototxt fillers). Blobs are matched to each layer's by
    position (Caffe's order) and fitted to the net's shapes like Caffe does (legacy 4-D
    dims); a mismatch, or a layer of the net with no weights in the caffemodel (unless
    ``strict=False``, which fills it), raises ``CaffeFormatError``. ``outputs``: build only
    the layers these blobs need (an unsupported head elsewhere is never read); a string is
    one blob. ``stages``/``level``: the NetState of Caffe's include/exclude rules, like
    pycaffe's ``Net(..., stages=, level=)`` (stages add to the net's own ``state``; level
    None keeps the net's).

    The params are placed on JAX's default device once (``jax.Array`` leaves), so that
    ``jax.jit(module.apply)({"params": params}, x)`` does not copy every weight to the
    device on each call; ``np.asarray(params[layer][blob])`` gives the NumPy view.
    """
    path = prototxt if isinstance(prototxt, (str, os.PathLike)) else "<net>"
    net = converters.read_prototxt(prototxt) if isinstance(prototxt, (str, os.PathLike)) \
        else converters.upgrade_net(prototxt)
    if isinstance(outputs, str):
        outputs = (outputs,)
    module = build_module(net, phase=phase, path=path, outputs=outputs, stages=stages,
                          level=level)
    if caffemodel is None:
        return module, on_device(init_params(module, seed, input_shape))
    mpath = caffemodel if isinstance(caffemodel, (str, os.PathLike)) else None
    stored = converters.load_caffemodel(caffemodel) if mpath is not None else caffemodel
    try:
        example_inputs(module, input_shape)
    except ValueError:
        # no input shape known: shapes are checked at apply time
        return module, on_device({s.name: dict(stored[s.name]) for s in module.layers
                                  if s.name in stored})
    expected = expected_param_shapes(module, input_shape)
    params: dict[str, dict[str, np.ndarray]] = {}
    filled = None
    types = {s.name: s.type for s in module.layers}
    for layer, blobs in expected.items():
        if layer not in stored:
            if strict:
                raise ParamMismatchError("the net needs weights for this layer but the "
                                       "caffemodel has none", path=mpath, layer=layer,
                                       field="blobs")
            if filled is None:
                filled = init_params(module, seed, input_shape)
            params[layer] = filled[layer]
            continue
        src = stored[layer]
        if len(src) != len(blobs) or (set(src) != set(blobs) and not all(
                k.startswith("blob") for k in src)):
            raise ParamMismatchError(f"has blobs {sorted(src)} but the net needs "
                                   f"{list(blobs)}", path=mpath, layer=layer, field="blobs")
        arrays = _by_position(types[layer], src) if set(src) != set(blobs) else [
            src[n] for n in blobs]
        params[layer] = {n: _reconcile(layer, n, a, shp, mpath)
                         for (n, shp), a in zip(blobs.items(), arrays, strict=True)}
    return module, on_device(params)


def on_device(params: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``params`` with every NumPy array leaf placed on JAX's default device once, in one
    transfer (a leaf already a ``jax.Array``, or of a dtype JAX would change, such as float64
    without x64, is passed through). A new tree; the input is not modified."""
    tree = {k: dict(v) for k, v in params.items()}
    keys = [(k, n) for k, v in tree.items() for n, a in v.items()
            if isinstance(a, np.ndarray) and a.dtype == jax.dtypes.canonicalize_dtype(a.dtype)]
    if keys:
        moved = jax.device_put([tree[k][n] for k, n in keys])
        for (k, n), a in zip(keys, moved, strict=True):
            tree[k][n] = a
    return tree


def blob_names(module: CaffeGraph) -> list[str]:
    """Every blob name the module returns, in execution order."""
    out: list[str] = []
    for s in module.layers:
        for t in s.tops:
            if t not in out:
                out.append(t)
    return out


__all__ = ["CaffeGraph", "LayerSpec", "blob_names", "build_module", "compile_net",
           "expected_param_shapes", "fill", "init_params", "load_caffe", "module_params",
           "on_device",
           "param_names", "param_shapes", "run_graph"]
