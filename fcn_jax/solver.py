"""Caffe's solvers in JAX: ``solver.prototxt`` in, the same weights out, step for step.

``get_solver(path)`` reads a ``SolverParameter`` and builds its TRAIN net and TEST nets from
one ``train_val.prototxt`` (``NetState`` rules: phase, stage, level) with their data layers
(``fcn_jax.data_layers``), and returns a :class:`Solver` that a pycaffe user knows
(``copy_from``, ``step``, ``solve``, ``test``, ``snapshot``, ``restore``, ``params``, ``iter``,
``lr``, ``net``, ``test_nets``).

The update is Caffe's ``SGDSolver::ApplyUpdate`` (``src/caffe/solvers/*.cpp``), exposed as an
optax transformation (:func:`caffe_update`): the learning rate of ``lr_policy`` at ``iter``;
``clip_gradients`` on the global norm of the raw (iter_size-summed) gradient; then per blob
``1/iter_size``, weight decay (L2 ``+ decay * w`` or L1 ``+ decay * sign(w)``, with
``decay = weight_decay * decay_mult``, also for frozen ``lr_mult: 0`` blobs), and the solver's
``ComputeUpdateValue`` with ``local_rate = rate * lr_mult``:

- SGD ``v = momentum v + local_rate g``, step ``v`` (the rate inside the buffer);
- Nesterov ``v' = momentum v + local_rate g``, step ``(1 + momentum) v' - momentum v``;
- AdaGrad ``h += g^2``, step ``local_rate g / (sqrt(h) + delta)``;
- RMSProp ``h = rms_decay h + (1 - rms_decay) g^2``, step as AdaGrad;
- AdaDelta ``h = m h + (1-m) g^2``, ``dx = g sqrt((h2 + delta) / (h + delta))``,
  ``h2 = m h2 + (1-m) dx^2``, step ``local_rate dx``;
- Adam ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, step
  ``local_rate sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + delta)``, ``t = iter + 1``.

All in float32, as Caffe computes. Blobs with ``lr_mult: 0`` get a zero gradient (Caffe
turns their backward off) but still decay and history.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import converters
from converters.errors import CaffeFormatError, ParamMismatchError
from converters.proto import caffe_pb2
from converters.solver_io import read_solver, read_solverstate, write_solverstate

from .layer_table import blob_shapes, param_names, param_shapes
from .net import CaffeGraph, _reconcile, build_module, fill

Array = Any
Params = dict[str, dict[str, Any]]
PathLike = str | os.PathLike

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

_f32 = np.float32


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """The fields of a ``SolverParameter`` that change the numbers, as float32 values
    (Caffe's ``Dtype``), checked as Caffe checks them."""

    type: str = "SGD"
    base_lr: float = 0.01
    lr_policy: str = "fixed"
    gamma: float = 0.0
    power: float = 0.0
    stepsize: int = 0
    stepvalue: tuple[int, ...] = ()
    max_iter: int = 0
    momentum: float = 0.0
    momentum2: float = 0.999
    delta: float = 1e-8
    rms_decay: float = 0.99
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    clip_gradients: float = -1.0
    iter_size: int = 1

    def __post_init__(self) -> None:
        bad = self.check()
        if bad:
            raise CaffeFormatError(bad[1], field=bad[0])

    def check(self) -> tuple[str, str] | None:
        """``(field, reason)`` for the first setting Caffe aborts on, else None."""
        if self.type not in SOLVER_TYPES:
            return "type", (f"unknown solver type {self.type!r}; Caffe's are "
                            f"{', '.join(SOLVER_TYPES)}")
        if self.lr_policy not in LR_POLICIES:
            return "lr_policy", (f"unknown learning rate policy {self.lr_policy!r}; Caffe's "
                                 f"are {', '.join(LR_POLICIES)}")
        if self.type in ("AdaGrad", "RMSProp") and self.momentum != 0:
            return "momentum", f"momentum cannot be used with {self.type}"
        if self.type == "RMSProp" and not 0 <= self.rms_decay < 1:
            return "rms_decay", f"rms_decay must be in [0, 1), got {self.rms_decay}"
        if self.lr_policy in ("step", "sigmoid") and self.stepsize <= 0:
            return "stepsize", f"lr_policy {self.lr_policy} needs stepsize > 0"
        if self.lr_policy in ("step", "sigmoid") and self.gamma < 0:
            return "gamma", (f"lr_policy {self.lr_policy} needs gamma >= 0, got {self.gamma}"
                             + (" (a sigmoid cannot decay)" if self.lr_policy == "sigmoid"
                                else ""))
        if self.lr_policy == "poly" and self.max_iter <= 0:
            return "max_iter", "lr_policy poly needs max_iter > 0"
        if self.regularization_type not in ("L1", "L2"):
            return "regularization_type", (f"unknown regularization type "
                                           f"{self.regularization_type!r}; Caffe's are L1, L2")
        if self.iter_size < 1:
            return "iter_size", f"iter_size must be at least 1, got {self.iter_size}"
        if any(b < a for a, b in zip(self.stepvalue, self.stepvalue[1:], strict=False)):
            return "stepvalue", "stepvalue must be increasing"
        return None

    @classmethod
    def from_proto(cls, sp, path: PathLike | None = None) -> SolverSpec:
        """From a ``caffe.SolverParameter``; a bad setting raises ``CaffeFormatError``
        naming the file and field."""
        values = dict(
            type=sp.type, base_lr=float(_f32(sp.base_lr)), lr_policy=sp.lr_policy,
            gamma=float(_f32(sp.gamma)), power=float(_f32(sp.power)),
            stepsize=int(sp.stepsize), stepvalue=tuple(int(v) for v in sp.stepvalue),
            max_iter=int(sp.max_iter), momentum=float(_f32(sp.momentum)),
            momentum2=float(_f32(sp.momentum2)), delta=float(_f32(sp.delta)),
            rms_decay=float(_f32(sp.rms_decay)), weight_decay=float(_f32(sp.weight_decay)),
            regularization_type=sp.regularization_type,
            clip_gradients=float(_f32(sp.clip_gradients)), iter_size=int(sp.iter_size))
        spec = object.__new__(cls)
        for k, v in values.items():
            object.__setattr__(spec, k, v)
        bad = spec.check()
        if bad:
            raise CaffeFormatError(bad[1], path=path, field=bad[0])
        return spec


def _spec(solver_param: Any) -> SolverSpec:
    if isinstance(solver_param, SolverSpec):
        return solver_param
    if isinstance(solver_param, Mapping):
        return SolverSpec(**solver_param)
    return SolverSpec.from_proto(solver_param)


# ----------------------------------------------------------------------------- the update


def learning_rate(spec: SolverSpec, it: Array, current_step: Array) -> tuple[Array, Array]:
    """``(rate, current_step)`` at iteration ``it``: Caffe's ``GetLearningRate`` (float32;
    step sets ``current_step = it // stepsize``, multistep advances it by at most one when
    ``it`` reaches the next ``stepvalue``). Works on traced arrays."""
    s = spec
    it = jnp.asarray(it, jnp.int32)
    cs = jnp.asarray(current_step, jnp.int32)
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    base = f(s.base_lr)
    itf = it.astype(jnp.float32)
    if s.lr_policy == "fixed":
        rate = base
    elif s.lr_policy == "step":
        cs = it // s.stepsize
        rate = base * f(s.gamma) ** cs.astype(jnp.float32)
    elif s.lr_policy == "exp":
        rate = base * f(s.gamma) ** itf
    elif s.lr_policy == "inv":
        rate = base * (f(1.0) + f(s.gamma) * itf) ** f(-s.power)
    elif s.lr_policy == "multistep":
        values = jnp.asarray(list(s.stepvalue) + [np.iinfo(np.int32).max], jnp.int32)
        n = len(s.stepvalue)
        cs = jnp.where((cs < n) & (it >= values[jnp.minimum(cs, n)]), cs + 1, cs)
        rate = base * f(s.gamma) ** cs.astype(jnp.float32)
    elif s.lr_policy == "poly":
        rate = base * (f(1.0) - itf / f(s.max_iter)) ** f(s.power)
    else:  # sigmoid
        rate = base * (f(1.0) / (f(1.0) + jnp.exp(-f(s.gamma) * (itf - f(s.stepsize)))))
    return rate.astype(jnp.float32), cs


class CaffeSolverState(NamedTuple):
    """The solver's state: ``iter``, ``current_step`` and the history blobs (``history2``:
    AdaDelta's E[dx^2] and Adam's v; empty for the other solvers), shaped like the params."""

    iter: Array
    current_step: Array
    history: Any
    history2: Any


def _needs_history2(spec: SolverSpec) -> bool:
    return spec.type in ("AdaDelta", "Adam")


def caffe_update(solver_param: Any, lr_mults: Params, decay_mults: Params
                 ) -> optax.GradientTransformation:
    """Caffe's ``ApplyUpdate`` as an optax transformation.

    ``solver_param``: a ``caffe.SolverParameter``, a :class:`SolverSpec` or its fields as a
    dict. ``lr_mults`` / ``decay_mults``: one float per blob, shaped like the params
    (:func:`param_multipliers`). ``update(grads, state, params)`` takes the raw gradient (the
    sum over the iter_size passes) and returns ``-step`` (``optax.apply_updates`` then does
    Caffe's ``w -= step``) and the next state (``iter + 1``)."""
    spec = _spec(solver_param)
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731

    def init(params):
        zeros = jax.tree_util.tree_map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)
        return CaffeSolverState(iter=jnp.zeros((), jnp.int32),
                                current_step=jnp.zeros((), jnp.int32), history=zeros,
                                history2=zeros if _needs_history2(spec) else {})

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("caffe_update needs params (weight decay reads them)")
        rate, cs = learning_rate(spec, state.iter, state.current_step)
        g = jax.tree_util.tree_map(
            lambda d, m: jnp.zeros_like(d) if m == 0 else d.astype(jnp.float32), grads, lr_mults)
        if spec.clip_gradients >= 0:
            sumsq = sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g))
            norm = jnp.sqrt(sumsq)
            clip = f(spec.clip_gradients)
            scale = jnp.where(norm > clip, clip / norm, f(1.0))
            g = jax.tree_util.tree_map(lambda x: x * scale, g)
        if spec.iter_size != 1:
            g = jax.tree_util.tree_map(lambda x: x * f(_f32(1.0) / _f32(spec.iter_size)), g)

        def regularize(d, w, m):
            decay = _f32(spec.weight_decay) * _f32(m)
            if not decay:
                return d
            w = jnp.asarray(w, jnp.float32)
            reg = w if spec.regularization_type == "L2" else jnp.sign(w)
            return d + f(decay) * reg

        g = jax.tree_util.tree_map(regularize, g, params, decay_mults)
        step, h, h2 = _compute_update(spec, rate, state, g, lr_mults)
        updates = jax.tree_util.tree_map(lambda s: -s, step)
        return updates, CaffeSolverState(iter=state.iter + 1, current_step=cs, history=h,
                                         history2=h2)

    return optax.GradientTransformation(init, update)


def _compute_update(spec: SolverSpec, rate: Array, state: CaffeSolverState, g: Any,
                    lr_mults: Params) -> tuple[Any, Any, Any]:
    """``(step, history, history2)``: the solver type's ``ComputeUpdateValue``."""
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    mom, delta = f(spec.momentum), f(spec.delta)
    tm = jax.tree_util.tree_map
    local = tm(lambda m: rate * f(m), lr_mults)
    h0, h20 = state.history, state.history2
    if spec.type == "SGD":
        h = tm(lambda d, v, lr: lr * d + mom * v, g, h0, local)
        return h, h, h20
    if spec.type == "Nesterov":
        h = tm(lambda d, v, lr: lr * d + mom * v, g, h0, local)
        step = tm(lambda v, v_old: (f(1.0) + mom) * v - mom * v_old, h, h0)
        return step, h, h20
    if spec.type in ("AdaGrad", "RMSProp"):
        if spec.type == "AdaGrad":
            h = tm(lambda d, v: d * d + v, g, h0)
        else:
            rd = f(spec.rms_decay)
            h = tm(lambda d, v: (f(1.0) - rd) * (d * d) + rd * v, g, h0)
        step = tm(lambda d, v, lr: lr * (d / (jnp.sqrt(v) + delta)), g, h, local)
        return step, h, h20
    if spec.type == "AdaDelta":
        h = tm(lambda d, v: (f(1.0) - mom) * (d * d) + mom * v, g, h0)
        dx = tm(lambda d, v, v2: d * jnp.sqrt((v2 + delta) / (v + delta)), g, h, h20)
        h2 = tm(lambda x, v2: (f(1.0) - mom) * (x * x) + mom * v2, dx, h20)
        step = tm(lambda x, lr: lr * x, dx, local)
        return step, h, h2
    # Adam
    b1, b2 = f(spec.momentum), f(spec.momentum2)
    t = (state.iter + 1).astype(jnp.float32)
    corr = jnp.sqrt(f(1.0) - b2 ** t) / (f(1.0) - b1 ** t)
    m = tm(lambda d, v: (f(1.0) - b1) * d + b1 * v, g, h0)
    v = tm(lambda d, v2: (f(1.0) - b2) * (d * d) + b2 * v2, g, h20)
    step = tm(lambda mm, vv, lr: (lr * corr) * (mm / (jnp.sqrt(vv) + delta)), m, v, local)
    return step, m, v


# ----------------------------------------------------------------------------- nets


def _merge_state(phase: int, *states) -> Any:
    out = caffe_pb2.NetState()
    out.phase = phase
    for s in states:
        if s is not None:
            out.MergeFrom(s)
    return out


def _filtered(net, state, path: PathLike) -> Any:
    """``net`` with Caffe's ``FilterNet`` applied for ``state``, the rules then dropped (so
    that building it filters nothing more)."""
    phase = "TRAIN" if state.phase == 0 else "TEST"
    out = converters.filter_net(net, phase=phase, stages=tuple(state.stage),
                                level=int(state.level))
    for lp in out.layer:
        lp.ClearField("include")
        lp.ClearField("exclude")
    out.state.CopyFrom(state)
    return out


def _read_net(value: str, field: str, solver_path: PathLike):
    if not os.path.exists(value):
        raise CaffeFormatError(f"net file {value!r} not found (Caffe opens it relative to the "
                               f"current directory, {os.getcwd()})", path=solver_path,
                               field=field)
    return converters.read_prototxt(value)


def solver_nets(sp, path: PathLike = "<solver>") -> tuple[tuple[Any, str], list[tuple[Any, str]]]:
    """``((train_net, its path), [(test_net, its path), ...])``: the NetParameters Caffe's
    ``Solver::InitTrainNet`` / ``InitTestNets`` build from the solver's net fields, each
    filtered by its ``NetState`` (TRAIN / TEST phase, merged with the net's own ``state``
    and ``train_state`` / ``test_state``)."""
    train_fields = [f for f in ("train_net_param", "train_net", "net_param", "net")
                    if sp.HasField(f)]
    if not train_fields:
        raise CaffeFormatError("no train net: set one of net, net_param, train_net, "
                               "train_net_param", path=path, field="net")
    if len(train_fields) > 1:
        raise CaffeFormatError(f"more than one train net given ({', '.join(train_fields)})",
                               path=path, field=train_fields[1])
    field = train_fields[0]
    if field.endswith("_param"):
        train, tpath = converters.upgrade_net(getattr(sp, field)), f"{path}:{field}"
    else:
        tpath = getattr(sp, field)
        train = _read_net(tpath, field, path)
    train_f = _filtered(train, _merge_state(0, train.state, sp.train_state
                                            if sp.HasField("train_state") else None), tpath)
    if sp.HasField("net_param") and sp.HasField("net"):
        raise CaffeFormatError("both net_param and net given", path=path, field="net")
    sources: list[tuple[Any, str]] = [(converters.upgrade_net(n), f"{path}:test_net_param")
                                      for n in sp.test_net_param]
    sources += [(_read_net(n, "test_net", path), n) for n in sp.test_net]
    generic = sp.HasField("net_param") or sp.HasField("net")
    if generic:
        if len(sp.test_iter) < len(sources):
            raise CaffeFormatError("test_iter must be specified for each test network",
                                   path=path, field="test_iter")
        g = (converters.upgrade_net(sp.net_param), f"{path}:net_param") if sp.HasField(
            "net_param") else (_read_net(sp.net, "net", path), sp.net)
        sources += [g] * (len(sp.test_iter) - len(sources))
    elif len(sp.test_iter) != len(sources):
        raise CaffeFormatError("test_iter must be specified for each test network",
                               path=path, field="test_iter")
    if sp.test_state and len(sp.test_state) != len(sources):
        raise CaffeFormatError("test_state must be unspecified or specified once per test net",
                               path=path, field="test_state")
    if sources and sp.test_interval <= 0:
        raise CaffeFormatError("test nets need test_interval > 0", path=path,
                               field="test_interval")
    tests = []
    for i, (n, p) in enumerate(sources):
        st = _merge_state(1, n.state, sp.test_state[i] if sp.test_state else None)
        tests.append((_filtered(n, st, p), p))
    return (train_f, tpath), tests


def net_outputs(net) -> list[str]:
    """The net's output blobs (produced and never consumed after), sorted by name as Caffe's
    ``Net::Init`` lists them."""
    available: set[str] = set()
    for lp in net.layer:
        for b in lp.bottom:
            available.discard(b)
        available.update(lp.top)
    return sorted(available)


def loss_weights(net) -> dict[str, float]:
    """``{top: loss_weight}`` for the tops that count in the objective: ``loss_weight`` where
    given, else 1 for the first top of a ``*Loss`` layer (Caffe's ``LossLayer`` default)."""
    out: dict[str, float] = {}
    for lp in net.layer:
        weights = list(lp.loss_weight)
        if not weights and lp.type.endswith("Loss") and lp.top:
            weights = [1.0]
        if len(weights) > len(lp.top):
            raise CaffeFormatError(f"{len(weights)} loss_weight values for {len(lp.top)} tops",
                                   layer=lp.name, field="loss_weight")
        for t, w in zip(lp.top, weights, strict=False):
            if w:
                out[t] = out.get(t, 0.0) + float(_f32(w))
    return out


def param_multipliers(net, params: Params) -> tuple[Params, Params]:
    """``(lr_mults, decay_mults)`` shaped like ``params``: each blob's ``param { lr_mult
    decay_mult }`` (Caffe's defaults 1 and 1 where a layer gives fewer). BatchNorm's three
    statistics blobs have ``lr_mult`` 0, as Caffe forces them."""
    lr: Params = {}
    decay: Params = {}
    layers = {lp.name: lp for lp in net.layer}
    for layer, blobs in params.items():
        lp = layers.get(layer)
        lr[layer], decay[layer] = {}, {}
        for i, blob in enumerate(_caffe_order(lp.type if lp is not None else "", blobs)):
            spec = lp.param[i] if lp is not None and i < len(lp.param) else None
            lr_m = float(_f32(spec.lr_mult)) if spec is not None else 1.0
            if lp is not None and lp.type == "BatchNorm":
                if spec is not None and spec.lr_mult != 0:
                    raise CaffeFormatError("cannot configure batch normalization statistics "
                                           "as layer parameters (lr_mult must be 0)",
                                           layer=layer, field=f"param[{i}].lr_mult")
                lr_m = 0.0
            lr[layer][blob] = lr_m
            decay[layer][blob] = float(_f32(spec.decay_mult)) if spec is not None else 1.0
    return lr, decay


def learnable_order(net, params: Params) -> list[tuple[str, str]]:
    """``(layer, blob)`` in Caffe's ``learnable_params`` order: layers in net order, blobs in
    the layer's order (the order of a ``.solverstate``'s history)."""
    return [(lp.name, b) for lp in net.layer if lp.name in params
            for b in _caffe_order(lp.type, params[lp.name])]


def _caffe_order(layer_type: str, blobs: Mapping[str, Any]) -> list[str]:
    """A layer's blob names in Caffe's order (a params dict may hold them sorted)."""
    rank = {n: i for i, n in enumerate(param_names(layer_type, len(blobs)))}
    return sorted(blobs, key=lambda b: rank.get(b, len(rank)))


def batch_stat_layers(net) -> tuple[Any, tuple[tuple[str, str, float], ...]]:
    """``(net', ((layer, bottom blob, moving_average_fraction), ...))`` for the TRAIN net's
    BatchNorm layers that use batch statistics. ``net'`` is ``net`` with each such in-place
    BatchNorm writing a renamed top (``x@layer``, and every later use of ``x`` renamed), so
    that the blob it normalises stays readable: the solver updates Caffe's running sums from
    it, as ``BatchNormLayer::Forward_cpu`` does in training."""
    out = type(net)()
    out.CopyFrom(net)
    stats = []
    rename: dict[str, str] = {}
    for lp in out.layer:
        for i, b in enumerate(lp.bottom):
            lp.bottom[i] = rename.get(b, b)
        for i, t in enumerate(lp.top):
            lp.top[i] = rename.get(t, t)
        p = lp.batch_norm_param
        if lp.type == "BatchNorm" and not (p.HasField("use_global_stats")
                                           and p.use_global_stats):
            stats.append((lp.name, lp.bottom[0], float(_f32(p.moving_average_fraction))))
            if lp.top[0] == lp.bottom[0]:
                new = f"{lp.top[0]}@{lp.name}"
                rename[lp.top[0]] = new
                lp.top[0] = new
    return out, tuple(stats)


def _update_batch_stats(params: Params, blobs: Mapping[str, Array],
                        stats: tuple[tuple[str, str, float], ...]) -> Params:
    """Caffe's running sums after one training forward: ``factor = maf * factor + 1``,
    ``mean = batch mean + maf * mean``, ``variance = m/(m-1) * batch variance + maf *
    variance`` (m = values per channel)."""
    if not stats:
        return params
    out = dict(params)
    for layer, bottom, maf in stats:
        x = jax.lax.stop_gradient(blobs[bottom]).astype(jnp.float32)
        axes = (0,) + tuple(range(2, x.ndim))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))), axis=axes)
        m = x.size // max(x.shape[1] if x.ndim > 1 else 1, 1)
        corr = _f32(m) / _f32(m - 1) if m > 1 else _f32(1)
        f = jnp.float32(maf)
        p = params[layer]
        out[layer] = {"mean": mean + f * p["mean"], "variance": jnp.float32(corr) * var
                      + f * p["variance"], "scale_factor": f * p["scale_factor"] + 1}
    return out


def _check_sharing(net, path: PathLike) -> None:
    owners: dict[str, str] = {}
    for lp in net.layer:
        for ps in lp.param:
            if ps.name:
                if ps.name in owners and owners[ps.name] != lp.name:
                    raise CaffeFormatError(
                        f"param {ps.name!r} is shared with layer {owners[ps.name]!r}: weight "
                        "sharing by param name is not supported", path=path, layer=lp.name,
                        field="param.name")
                owners[ps.name] = lp.name


def filler_params(module: CaffeGraph, input_shapes: Mapping[str, tuple[int, ...]],
                  key: Array) -> Params:
    """Each layer's blobs from its prototxt fillers (Caffe's default: constant 0), shapes by
    the layer records' rules; computed eagerly (no compile of the whole net)."""
    shapes = blob_shapes(module.layers, dict(input_shapes))
    out: Params = {}
    for i, spec in enumerate(module.layers):
        if not all(b in shapes for b in spec.bottoms):
            continue
        need = param_shapes(spec, [shapes[b] for b in spec.bottoms])
        if not need:
            continue
        keys = jax.random.split(jax.random.fold_in(key, i), len(need))
        out[spec.name] = {n: jnp.asarray(fill(k, tuple(shp), dict(f) if f else {}),
                                         jnp.float32).reshape(tuple(shp))
                          for k, (n, (shp, f)) in zip(keys, need.items(), strict=True)}
    return out


# ----------------------------------------------------------------------------- data


class _FeedSource:
    """An ``Input`` / ``MemoryData`` layer's batches: user arrays or a callable."""

    def __init__(self, layer: str, tops: Sequence[str], shapes: Mapping[str, tuple] | None):
        self.layer, self.tops = layer, tuple(tops)
        self._shapes = dict(shapes or {})
        self._feed: Callable[[], Mapping[str, Any]] | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        missing = [t for t in self.tops if t not in self._shapes]
        if missing:
            raise CaffeFormatError(f"no shape known for {missing}: feed the layer first",
                                   layer=self.layer, field="top")
        return dict(self._shapes)

    def set_feed(self, feed: Callable[[], Mapping[str, Any]]) -> None:
        self._feed = feed

    def set_arrays(self, arrays: Mapping[str, np.ndarray], batch: int) -> None:
        n = len(next(iter(arrays.values())))
        if n == 0 or n % batch:
            raise ValueError(f"{self.layer}: {n} rows is not a positive multiple of the "
                             f"batch size {batch}")
        pos = [0]

        def feed():
            i = pos[0]
            pos[0] = (i + batch) % n
            return {k: v[i:i + batch] for k, v in arrays.items()}
        self._feed = feed

    def next(self) -> dict[str, np.ndarray]:
        if self._feed is None:
            raise CaffeFormatError("no data: give the solver a feed for this layer "
                                   "(Solver.set_feed or set_input_arrays)", layer=self.layer,
                                   field="top")
        got = self._feed()
        out = {t: np.asarray(got[t], np.float32) for t in self.tops}
        for t, v in out.items():
            want = self._shapes.get(t)
            if want is not None and tuple(v.shape) != tuple(want):
                raise CaffeFormatError(f"fed {t!r} of shape {v.shape}, the layer gives "
                                       f"{tuple(want)}", layer=self.layer, field="top")
        return out

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.next()

    def close(self) -> None:
        pass


def _open_sources(net, phase: str, seed: int | None, path: PathLike,
                  share: tuple[int, int] = (0, 1)) -> list[Any]:
    from . import data_layers

    out = []
    for lp in net.layer:
        if lp.type in data_layers.DATA_LAYER_TYPES:
            out.append(data_layers.open_data_layer(lp, phase=phase, seed=seed, path=str(path),
                                                   share=share))
        elif lp.type == "Input":
            shapes = {t: tuple(int(d) for d in s.dim)
                      for t, s in zip(lp.top, lp.input_param.shape, strict=False)}
            if len(lp.input_param.shape) == 1:
                shapes = {t: shapes[lp.top[0]] for t in lp.top} if len(lp.top) == 1 else shapes
            out.append(_FeedSource(lp.name, lp.top, shapes))
        elif lp.type == "MemoryData":
            p = lp.memory_data_param
            shapes = {lp.top[0]: (p.batch_size, p.channels, p.height, p.width)}
            if len(lp.top) > 1:
                shapes[lp.top[1]] = (p.batch_size,)
            out.append(_FeedSource(lp.name, lp.top, shapes))
        elif not lp.bottom and lp.type not in ("Parameter",):
            from .layer_table import input_types
            if lp.type in input_types():
                raise CaffeFormatError(f"data layer type {lp.type} cannot feed the solver "
                                       "(HDF5Data, ImageData, Data, MemoryData and Input can)",
                                       path=path, layer=lp.name, field="type")
    return out


# ----------------------------------------------------------------------------- the solver


_UNSUPPORTED = {
    "snapshot_diff": (lambda sp: sp.snapshot_diff, "writing diffs into snapshots"),
    "snapshot_format": (lambda sp: sp.snapshot_format == caffe_pb2.SolverParameter.HDF5,
                        "HDF5 snapshots (use BINARYPROTO)"),
}


class Solver:
    """A Caffe solver over a JAX train net. Build it with :func:`get_solver`.

    ``params`` (the train net's pytree, Caffe names and shapes), ``iter``, ``lr`` (the rate of
    the last step), ``net`` / ``test_nets`` (Flax modules), ``step(n)``, ``solve()``,
    ``test()``, ``snapshot()``, ``restore(path)``, ``copy_from(weights)`` as in pycaffe. The
    step is one jitted pure function of (params, solver state, batches, iteration)."""

    def __init__(self, solver_param, *, path: PathLike = "<solver>",
                 devices: int | Sequence[Any] | None = None, mesh: Any = None,
                 log: Callable[[str], None] | None = None):
        self.param = solver_param
        self.path = path
        for field, (active, what) in _UNSUPPORTED.items():
            if active(solver_param):
                raise CaffeFormatError(f"{what} is not supported", path=path, field=field)
        if solver_param.average_loss < 1:
            raise CaffeFormatError("average_loss must be at least 1", path=path,
                                   field="average_loss")
        self.spec = SolverSpec.from_proto(solver_param, path)
        self.log = log
        if solver_param.debug_info:
            warnings.warn(f"{path}: debug_info: Caffe's per-layer debug printout is not "
                          "produced (it changes no numbers)", stacklevel=2)
        seed = int(solver_param.random_seed)
        self.seed = seed if seed >= 0 else None
        self._key = jax.random.PRNGKey(seed if seed >= 0 else 0)
        (self.train_net_param, self._train_path), tests = solver_nets(solver_param, path)
        _check_sharing(self.train_net_param, self._train_path)
        # several processes: each keeps its records of the TRAIN stream (Caffe's Skip rule)
        self._sources = _open_sources(self.train_net_param, "TRAIN", self.seed,
                                      self._train_path,
                                      share=(jax.process_index(), jax.process_count()))
        run_net, self.batch_stats = batch_stat_layers(self.train_net_param)
        self.net: CaffeGraph = build_module(run_net, phase="TRAIN", path=self._train_path)
        shapes = self._source_shapes(self._sources)
        self.params: Params = filler_params(self.net, shapes, self._key)
        self.lr_mults, self.decay_mults = param_multipliers(self.train_net_param, self.params)
        self.learnable = learnable_order(self.train_net_param, self.params)
        self.loss_weights = loss_weights(self.train_net_param)
        if not self.loss_weights:
            raise CaffeFormatError("the train net has no loss (no *Loss layer, no loss_weight)",
                                   path=self._train_path, field="loss_weight")
        self.outputs = net_outputs(run_net)
        self.test_net_params = [n for n, _ in tests]
        self._test_paths = [p for _, p in tests]
        self._test_sources = [_open_sources(n, "TEST", self.seed, p) for n, p in tests]
        self.test_nets = [build_module(n, phase="TEST", path=p) for n, p in tests]
        self._test_own = [self._own_params(m, s, i) for i, (m, s) in
                          enumerate(zip(self.test_nets, self._test_sources, strict=True))]
        self._test_fns: list[Callable | None] = [None] * len(self.test_nets)
        self._loss_fn: Callable | None = None
        self.tx = caffe_update(self.spec, self.lr_mults, self.decay_mults)
        self.mesh = mesh
        if devices is not None and mesh is None:
            from .train import make_mesh
            self.mesh = make_mesh(devices)
        #: several jax.distributed processes: this one's rank and their count
        self.rank, self.processes = jax.process_index(), jax.process_count()
        self.params = self._place(jax.tree_util.tree_map(jnp.asarray, self.params))
        self.state: CaffeSolverState = self._place(self.tx.init(self.params))
        self._step_fn = jax.jit(functools.partial(
            _train_step, module=self.net, tx=self.tx, loss_weights=tuple(
                sorted(self.loss_weights.items())), outputs=tuple(self.outputs),
            batch_stats=self.batch_stats))
        self.lr = float("nan")
        self.smoothed_loss = float("nan")
        self._losses: list[float] = []
        self._action: Callable[[], str] | None = None
        self.requested_early_exit = False
        #: called after each iteration as ``fn(solver, loss)``
        self.callbacks: list[Callable[[Solver, float], None]] = []
        if solver_param.snapshot:
            self._check_snapshot_folder()
        for w in solver_param.weights:
            for one in w.split(","):
                self.copy_from(one)

    # --------------------------------------------------------------- properties

    @property
    def iter(self) -> int:
        """Caffe's ``iter_``: the number of updates done."""
        return int(self._scalar(self.state.iter))

    @property
    def current_step(self) -> int:
        return int(self._scalar(self.state.current_step))

    def _scalar(self, x: Any) -> Any:
        if self.processes > 1:
            from .distributed import local_copy
            x = local_copy(x)
        return np.asarray(x)

    def __enter__(self) -> Solver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the data layers' threads."""
        for s in self._sources + [s for ss in self._test_sources for s in ss]:
            s.close()

    # --------------------------------------------------------------- helpers

    @staticmethod
    def _source_shapes(sources) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for s in sources:
            try:
                out.update(s.shapes())
            except CaffeFormatError:
                if not isinstance(s, _FeedSource):
                    raise
        return out

    def _own_params(self, module: CaffeGraph, sources, i: int) -> Params:
        own = filler_params(module, self._source_shapes(sources),
                            jax.random.fold_in(self._key, i + 1))
        return {k: v for k, v in own.items() if k not in self.params}

    def _place(self, tree: Any) -> Any:
        if self.mesh is None:
            return tree
        from .distributed import replicate
        return replicate(tree, self.mesh)

    def _host(self, tree: Any) -> Any:
        """``tree`` as this process's numpy copy (replicated arrays of several processes)."""
        if self.processes > 1:
            from .distributed import local_copy
            tree = local_copy(tree)
        return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)

    def _shard(self, batch: dict[str, np.ndarray], lead: int) -> dict[str, Any]:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        from jax.sharding import NamedSharding, PartitionSpec

        from .train import DATA_AXIS
        sharding = NamedSharding(self.mesh, PartitionSpec(*([None] * lead), DATA_AXIS))
        if self.processes > 1:  # each process gives its own rows of the global batch
            return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                    for k, v in batch.items()}
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}

    @staticmethod
    def _next(sources) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for s in sources:
            out.update(s.next())
        return out

    def set_feed(self, feed: Callable[[], Mapping[str, Any]], *, test_net: int | None = None
                 ) -> None:
        """Feed the ``Input`` / ``MemoryData`` layers of the train net (or test net
        ``test_net``): ``feed()`` returns the next batch ``{top: array}``."""
        for s in self._sources if test_net is None else self._test_sources[test_net]:
            if isinstance(s, _FeedSource):
                s.set_feed(feed)

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray, *,
                         test_net: int | None = None) -> None:
        """pycaffe's ``set_input_arrays`` for a ``MemoryData`` layer: batches of its
        ``batch_size`` rows in order, wrapping (the row count a multiple of it)."""
        net = self.train_net_param if test_net is None else self.test_net_params[test_net]
        sources = self._sources if test_net is None else self._test_sources[test_net]
        for lp, s in zip([lp for lp in net.layer if lp.type == "MemoryData"],
                         [s for s in sources if isinstance(s, _FeedSource)
                          and s.layer in {x.name for x in net.layer
                                          if x.type == "MemoryData"}], strict=False):
            arrays = {lp.top[0]: np.asarray(data, np.float32)}
            if len(lp.top) > 1:
                arrays[lp.top[1]] = np.asarray(labels, np.float32).reshape(len(labels))
            s.set_arrays(arrays, lp.memory_data_param.batch_size)
            return
        raise ValueError("the net has no MemoryData layer")

    def set_action_function(self, fn: Callable[[], str] | None) -> None:
        """``fn()`` is asked after each iteration: ``"stop"``, ``"snapshot"`` or ``"none"``
        (Caffe's ``SetActionFunction``; ``fcn-jax train`` maps Ctrl-C to stop)."""
        self._action = fn

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)

    # --------------------------------------------------------------- weights

    def copy_from(self, weights: PathLike | Mapping) -> None:
        """Caffe's ``CopyTrainedLayersFrom``: every layer of the train (and test) nets that
        the weights (a caffemodel, a safetensors file or a params tree) name gets its blobs;
        the blob count and shapes must match; other layers keep theirs."""
        path = weights if isinstance(weights, (str, os.PathLike)) else None
        stored = converters.load_weights(weights) if path is not None else weights
        self.params = self._place(self._copy_into(self.params, stored, path))
        self._test_own = [self._copy_into(t, stored, path) for t in self._test_own]

    @staticmethod
    def _copy_into(params: Params, stored: Mapping, path: PathLike | None) -> Params:
        out = dict(params)
        for layer, blobs in params.items():
            if layer not in stored:
                continue
            src = stored[layer]
            if len(src) != len(blobs):
                raise ParamMismatchError(f"incompatible number of blobs: {len(src)} in the "
                                         f"weights, {len(blobs)} in the net", path=path,
                                         layer=layer, field="blobs")
            names = list(blobs)
            arrays = [src[n] for n in names] if set(src) == set(names) else list(src.values())
            out[layer] = {n: jnp.asarray(_reconcile(layer, n, np.asarray(a, np.float32),
                                                    tuple(blobs[n].shape), path))
                          for n, a in zip(names, arrays, strict=True)}
        return out

    def test_params(self, i: int = 0) -> Params:
        """Test net ``i``'s params: the train net's for the layers it shares by name (Caffe's
        ``ShareTrainedLayersWith``), its own for the rest."""
        return {**self._test_own[i], **{k: v for k, v in self.params.items()}}

    # --------------------------------------------------------------- running

    def _next_batches(self) -> dict[str, np.ndarray]:
        passes = [self._next_local() for _ in range(self.spec.iter_size)]
        return {k: np.stack([p[k] for p in passes]) for k in passes[0]}

    def _next_local(self) -> dict[str, np.ndarray]:
        """This process's batch of the next pass. With N processes, Caffe's multi-GPU rule
        (the data layers' ``Skip``): process r keeps records r, r+N, r+2N, ... of the data
        stream (the others are stepped over, not decoded), so N processes of batch B see the
        records one process of batch N*B sees. Fed layers give each process's own batch."""
        return self._next(self._sources)

    def step(self, iters: int) -> np.ndarray:
        """Run ``iters`` iterations as Caffe's ``Solver::Step``: test every ``test_interval``,
        forward/backward ``iter_size`` times, update, snapshot every ``snapshot``. Returns
        each iteration's loss (the mean over its passes)."""
        sp = self.param
        start = self.iter
        stop = start + int(iters)
        out: list[float] = []
        self._losses = []
        while self.iter < stop:
            it = self.iter
            if sp.test_interval and it % sp.test_interval == 0 and (
                    it > 0 or sp.test_initialization) and self.test_nets:
                self.test_all()
            batches = self._shard(self._next_batches(), 1)
            key = jax.random.fold_in(self._key, it)
            rate, _ = learning_rate(self.spec, it, self.current_step)
            self.params, self.state, loss, outs = self._step_fn(self.params, self.state,
                                                                batches, key)
            loss = float(self._host(loss))
            self.lr = float(rate)
            out.append(loss)
            self._update_smoothed(loss, it - start)
            for fn in self.callbacks:
                fn(self, loss)
            if sp.display and it % sp.display == 0:
                self._say(f"Iteration {it}, loss = {self.smoothed_loss:.6g}")
                self._say_outputs("Train", self._host(outs), self.loss_weights)
                self._say(f"Iteration {it}, lr = {self.lr:.6g}")
            action = self._action() if self._action is not None else "none"
            if (sp.snapshot and self.iter % sp.snapshot == 0) or action == "snapshot":
                self.snapshot()
            if action == "stop":
                self.requested_early_exit = True
                break
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at iteration {it}; lower base_lr")
        return np.asarray(out, np.float32)

    def _update_smoothed(self, loss: float, k: int) -> None:
        n = int(self.param.average_loss)
        if len(self._losses) < n:
            self._losses.append(loss)
            size = len(self._losses)
            prev = 0.0 if size == 1 else self.smoothed_loss
            self.smoothed_loss = (prev * (size - 1) + loss) / size
        else:
            idx = k % n
            self.smoothed_loss += (loss - self._losses[idx]) / n
            self._losses[idx] = loss

    def _say_outputs(self, which: str, outs: Mapping[str, np.ndarray],
                     weights: Mapping[str, float]) -> None:
        k = 0
        for name in sorted(outs):
            for v in np.ravel(outs[name]):
                lw = weights.get(name, 0.0)
                extra = f" (* {lw:g} = {lw * float(v):.6g} loss)" if lw else ""
                self._say(f"    {which} net output #{k}: {name} = {float(v):.6g}{extra}")
                k += 1

    def solve(self, resume: PathLike | None = None) -> None:
        """Caffe's ``Solver::Solve``: restore ``resume`` if given, step to ``max_iter``,
        snapshot at the end (``snapshot_after_train``), then (as Caffe) one more train forward
        for the display (it reads a batch; BatchNorm sums are not updated by it) and a last
        test."""
        sp = self.param
        if resume is not None:
            self.restore(resume)
        self.step(int(sp.max_iter) - self.iter)
        if sp.snapshot_after_train and (not sp.snapshot or self.iter % sp.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            self._say("Optimization stopped early.")
            return
        if sp.display and self.iter % sp.display == 0:
            # Caffe's Solve ends with one more train forward for the display (it reads a batch)
            batch = self._shard(self._next_local(), 0)
            if self._loss_fn is None:
                weights = tuple(sorted(self.loss_weights.items()))
                module = self.net

                def loss_fn(params, batch, key):
                    blobs = module.apply({"params": params}, batch, train=True,
                                         rngs={"dropout": key})
                    return sum((jnp.float32(w) * jnp.sum(blobs[t]) for t, w in weights),
                               jnp.float32(0))
                self._loss_fn = jax.jit(loss_fn)
            key = jax.random.fold_in(jax.random.fold_in(self._key, 0xD15), self.iter)
            self._update_smoothed(float(self._host(self._loss_fn(self.params, batch, key))),
                                  len(self._losses))
            self._say(f"Iteration {self.iter}, loss = {self.smoothed_loss:.6g}")
        if sp.test_interval and self.iter % sp.test_interval == 0 and self.test_nets:
            self.test_all()
        self._say("Optimization Done.")

    def test_all(self) -> list[dict[str, Any]]:
        """Every test net's mean outputs (``test(i)`` for each)."""
        return [self.test(i) for i in range(len(self.test_nets))]

    def test(self, i: int = 0) -> dict[str, Any]:
        """Caffe's ``Solver::Test``: ``test_iter[i]`` forward passes of test net ``i`` (its
        data cursor is not rewound between tests); returns each output blob's mean over them
        (``"loss"`` too when ``test_compute_loss``)."""
        sp = self.param
        net_param = self.test_net_params[i]
        outputs = net_outputs(net_param)
        weights = loss_weights(net_param)
        if self._test_fns[i] is None:
            module = self.test_nets[i]
            w = tuple(sorted(weights.items()))

            def fwd(params, batch):
                blobs = module.apply({"params": params}, batch)
                loss = sum((jnp.float32(lw) * jnp.sum(blobs[t]) for t, lw in w),
                           jnp.float32(0))
                return {k: blobs[k] for k in outputs}, loss
            self._test_fns[i] = jax.jit(fwd)
        params = self.test_params(i)
        if self.processes > 1:  # every process runs the whole test on its own copy
            from .distributed import local_copy
            params = local_copy(params)
        n = int(sp.test_iter[i])
        sums: dict[str, np.ndarray] = {}
        total = 0.0
        for _ in range(n):
            batch = self._next(self._test_sources[i])
            batch = (self._shard(batch, 0) if self.processes == 1 else
                     {k: jnp.asarray(v) for k, v in batch.items()})
            outs, loss = self._test_fns[i](params, batch)
            total += float(loss)
            for k, v in outs.items():
                v = np.asarray(v, np.float32)
                sums[k] = v.copy() if k not in sums else sums[k] + v
        result: dict[str, Any] = {}
        self._say(f"Iteration {self.iter}, Testing net (#{i})")
        if sp.test_compute_loss:
            result["loss"] = total / max(n, 1)
            self._say(f"Test loss: {result['loss']:.6g}")
        for k, v in sums.items():
            mean = v / _f32(n)
            result[k] = float(mean) if mean.size == 1 else mean
        self._say_outputs("Test", {k: sums[k] / _f32(n) for k in sums}, weights)
        return result

    # --------------------------------------------------------------- snapshots

    def snapshot_filename(self, extension: str) -> str:
        """``{snapshot_prefix}_iter_{iter}{extension}``, as Caffe names snapshots."""
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def history(self) -> list[np.ndarray]:
        """The history blobs in ``.solverstate`` order: one per learnable blob (Caffe's
        ``learnable_params`` order), then the second history for AdaDelta and Adam."""
        hist = self._host((self.state.history, self.state.history2))
        out = [hist[0][l][b] for l, b in self.learnable]
        if _needs_history2(self.spec):
            out += [hist[1][l][b] for l, b in self.learnable]
        return out

    def _check_snapshot_folder(self) -> None:
        folder = os.path.dirname(self.param.snapshot_prefix) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise CaffeFormatError(f"cannot write to snapshot prefix "
                                   f"{self.param.snapshot_prefix!r}: make sure that the folder "
                                   "exists and is writable", path=self.path,
                                   field="snapshot_prefix")

    def snapshot(self) -> tuple[str, str]:
        """Write ``{prefix}_iter_{N}.caffemodel`` and ``.solverstate`` (Caffe's messages, each
        file atomically); returns their paths. With several processes only process 0
        writes."""
        model = self.snapshot_filename(".caffemodel")
        state = self.snapshot_filename(".solverstate")
        if self.rank != 0:
            return model, state
        self._check_snapshot_folder()
        host = self._host(self.params)
        converters.save_caffemodel(model, host, self.train_net_param)
        write_solverstate(state, self.iter, model, self.current_step, self.history())
        self._say(f"Snapshotting to binary proto file {model}")
        self._say(f"Snapshotting solver state to binary proto file {state}")
        return model, state

    def restore(self, path: PathLike) -> None:
        """Caffe's ``Restore``: ``iter``, ``current_step`` and the history from a
        ``.solverstate``, and the weights from its ``learned_net`` (a path relative to the
        current directory, as Caffe opens it)."""
        msg, history = read_solverstate(path)
        want = len(self.learnable) * (2 if _needs_history2(self.spec) else 1)
        if len(history) != want:
            raise CaffeFormatError(f"incorrect length of history blobs: {len(history)}, the "
                                   f"{self.spec.type} solver of this net needs {want}",
                                   path=path, field="history")
        if msg.HasField("learned_net") and msg.learned_net:
            if not os.path.exists(msg.learned_net):
                raise CaffeFormatError(f"learned_net {msg.learned_net!r} not found (opened "
                                       f"relative to the current directory, {os.getcwd()})",
                                       path=path, field="learned_net")
            self.copy_from(msg.learned_net)
        trees = []
        for part in range(want // len(self.learnable) if self.learnable else 0):
            tree = jax.tree_util.tree_map(lambda x: x, self.state.history)
            tree = {l: dict(b) for l, b in tree.items()}
            for j, (l, b) in enumerate(self.learnable):
                arr = history[part * len(self.learnable) + j]
                shape = tuple(self.params[l][b].shape)
                if arr.size != math.prod(shape):
                    raise CaffeFormatError(f"history blob of shape {arr.shape} for {l}/{b} of "
                                           f"shape {shape}", path=path,
                                           field=f"history[{part * len(self.learnable) + j}]")
                tree[l][b] = jnp.asarray(arr.reshape(shape))
            trees.append(tree)
        self.state = self._place(CaffeSolverState(
            iter=jnp.asarray(msg.iter, jnp.int32),
            current_step=jnp.asarray(msg.current_step, jnp.int32),
            history=trees[0] if trees else self.state.history,
            history2=trees[1] if len(trees) > 1 else self.state.history2))

    def skip_batches(self, n: int) -> None:
        """Advance the train data layers by ``n`` iterations' batches (what a restored Caffe
        solver does not do: its data layers start again at the beginning)."""
        for s in self._sources:
            s.skip(n * self.spec.iter_size)


def _train_step(params: Params, state: CaffeSolverState, batches: Mapping[str, Array],
                key: Array, *, module: CaffeGraph, tx: optax.GradientTransformation,
                loss_weights: tuple[tuple[str, float], ...], outputs: tuple[str, ...],
                batch_stats: tuple[tuple[str, str, float], ...] = ()
                ) -> tuple[Params, CaffeSolverState, Array, dict[str, Array]]:
    """One Caffe iteration: ``iter_size`` forward/backward passes (gradients summed, loss
    averaged; BatchNorm running sums updated by each forward), then the update.
    ``batches``: each input with a leading iter_size axis."""
    n = next(iter(batches.values())).shape[0]
    watch = tuple(b for _, b, _ in batch_stats)

    def objective(p, batch, k):
        blobs = module.apply({"params": p}, batch, train=True, rngs={"dropout": k})
        loss = sum((jnp.float32(w) * jnp.sum(blobs[t]) for t, w in loss_weights),
                   jnp.float32(0))
        return loss, ({o: blobs[o] for o in outputs}, {b: blobs[b] for b in watch})

    grads = None
    total = jnp.float32(0)
    outs: dict[str, Array] = {}
    for i in range(n):
        batch = {k: v[i] for k, v in batches.items()}
        (loss, (outs, seen)), g = jax.value_and_grad(objective, has_aux=True)(
            params, batch, jax.random.fold_in(key, i))
        params = _update_batch_stats(params, seen, batch_stats)
        grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
        total = total + loss
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, total / jnp.float32(n), outs


def get_solver(solver_prototxt: PathLike, *, devices: int | Sequence[Any] | None = None,
               mesh: Any = None, log: Callable[[str], None] | None = None) -> Solver:
    """pycaffe's ``caffe.get_solver``: a :class:`Solver` from a ``solver.prototxt``. Paths
    inside it (the nets, data sources, snapshot prefix) are relative to the current
    directory, as in Caffe. ``devices``: run data-parallel over that many devices (or that
    list); the batch is split over them. ``mesh``: a mesh to run on, e.g.
    ``fcn_jax.distributed.global_mesh()`` over several processes."""
    sp = read_solver(solver_prototxt)
    return Solver(sp, path=solver_prototxt, devices=devices, mesh=mesh, log=log)


__all__ = ["CaffeSolverState", "LR_POLICIES", "SOLVER_TYPES", "Solver", "SolverSpec",
           "caffe_update", "get_solver", "learnable_order", "learning_rate", "loss_weights",
           "net_outputs", "param_multipliers", "solver_nets"]

