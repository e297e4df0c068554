"""Sliding-window fine-tuning of a fully convolutional net (the net surgery tutorial's
"exercise for the reader"), as pure functions around a jit-compiled ``train_step``.

- Ground truth: every output cell (i, j) looks at an input window (227 px at stride 32 for
  CaffeNet, derived from the net by :func:`window_geometry`); :func:`sliding_window_labels`
  labels it from boxes ``(x0, y0, x1, y1, label)``: the object's label when the window covers
  it well enough, background when it hardly overlaps any object, ``ignore`` in between.
- Loss: per-cell softmax cross-entropy with ignore label and class weights
  (:func:`fcn_jax.losses.sliding_window_loss`), returned with its loss map.
- Training: ``train_step(state, batch) -> (state, metrics)`` and ``eval_step``, both pure and
  jitted; optax SGD with momentum or Adam following Caffe's solver (learning-rate policies,
  per-parameter ``lr_mult``/``decay_mult`` from the prototxt ``param`` fields, L2 weight decay
  added to the gradient); layers frozen by a path predicate; Dropout active via an rng folded
  with the step.
- Checkpoints with Orbax (:class:`TrainCheckpoints`: last k and best kept, atomic,
  restorable onto another number of devices) that resume bit for bit; export to a
  caffemodel.
- Several devices: :func:`make_mesh` + ``fit(..., mesh=)`` (or :func:`replicate` and
  :func:`shard_batch` around ``train_step``) run the step data-parallel.

Batches are ``{"image": (N, C, H, W) float32, "label": (N, h, w) int32}``; ``(h, w)`` is the
size of the score map for that input (:func:`output_hw`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct

import converters
from converters import CaffeFormatError

from . import losses
from .caffenet import CaffeNet, caffenet_net, fc_names
from .dense import CellWindows, receptive_field
from .layer_table import LayerSpec, given_input_shapes, param_names

Array = jax.Array
PathLike = str | os.PathLike
Params = dict[str, dict[str, Any]]

__all__ = [
    "LabelConfig", "LossConfig", "SolverConfig", "TrainCheckpoints", "TrainState",
    "WindowGeometry", "batch_labels", "caffe_multipliers", "confusion_matrix",
    "create_train_state", "dense_metrics", "eval_step", "evaluate", "export_caffemodel", "fit",
    "frozen_paths", "learning_rate", "make_mesh", "make_optimizer", "model_net", "output_hw",
    "replicate", "restore_train_state", "save_train_state", "score_blob", "shard_batch",
    "sliding_window_labels", "train_step", "window_geometry", "window_overlap",
]


# ----------------------------------------------------------------------------- geometry


#: The training reading of ``dense.CellWindows`` (same class): cell (i, j) sees the input
#: window the classifier would (CaffeNet: 227 px every 32 px, offset 0).
WindowGeometry = CellWindows


def _specs_of(model: Any) -> tuple[LayerSpec, ...]:
    if isinstance(model, CaffeNet) and not model.fully_conv:
        raise ValueError("a classifier CaffeNet has no dense map: use fully_conv=True")
    layers = getattr(model, "layers", model)
    if isinstance(layers, (tuple, list)) and all(isinstance(s, LayerSpec) for s in layers):
        return tuple(layers)
    raise TypeError(f"cannot derive the layers of {type(model).__name__}")


def score_blob(model: Any) -> str:
    """The blob holding class scores (pre-softmax): ``fc8-conv`` for a fully convolutional
    CaffeNet; for a Caffe graph the bottom of its last Softmax, else its last top."""
    if isinstance(model, CaffeNet):
        return fc_names(model.fully_conv)[2]
    specs = _specs_of(model)
    for s in reversed(specs):
        if s.type == "Softmax":
            return s.bottoms[0]
    for s in reversed(specs):
        if s.tops and s.type not in ("Silence", "SoftmaxWithLoss", "Accuracy"):
            return s.tops[0]
    raise ValueError("the net has no layers")


def window_geometry(model: Any, blob: str | None = None) -> WindowGeometry:
    """The input window of each cell of ``blob`` (default :func:`score_blob`): the input
    size whose output is one cell (227 px for CaffeNet), at the product of the strides.

    It is ``dense.receptive_field`` without the padding: ``size + 2 * offset``."""
    specs = _specs_of(model)
    blob = blob or score_blob(model)
    inputs = {k: v or (1, 3, 1024, 1024) for k, v in given_input_shapes(specs).items()}
    try:
        rf = receptive_field(specs, blob, inputs, sliding=True)
    except (ValueError, KeyError) as e:
        raise ValueError(f"blob {blob!r} has no sliding-window geometry ({e}); a classifier "
                         "must first be cast to a fully convolutional net (fcn-jax fcn, "
                         "converters.fully_convolutional_net)") from None
    size = tuple(int(z + 2 * o) for z, o in zip(rf.size, rf.offset, strict=True))
    if min(size) < 1:
        raise ValueError(f"blob {blob!r}: padding exceeds the kernels, no window fits")
    return WindowGeometry(size=size, stride=tuple(int(j) for j in rf.stride))


def output_hw(model: nn.Module, params: Params, input_hw: tuple[int, int],
              blob: str | None = None, channels: int = 3) -> tuple[int, int]:
    """Spatial size of the score map for an input of ``input_hw`` (shape-only trace)."""
    blob = blob or score_blob(model)
    x = jax.ShapeDtypeStruct((1, channels, *input_hw), jnp.float32)
    out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x)[blob], params, x)
    return int(out.shape[-2]), int(out.shape[-1])


# ----------------------------------------------------------------------------- ground truth


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Cell labelling thresholds on the overlap ``|window & box| / min(|window|, |box|)``
    (the part of the object inside the window, or of the window filled by a larger object).

    A cell takes the label of its best-overlapping box with overlap >= ``positive`` whose
    area fills at least ``min_fill`` of the window; it is background (0) when every overlap
    is <= ``negative``, else ``ignore_label``.
    """

    positive: float = 0.7
    negative: float = 0.3
    min_fill: float = 0.0
    ignore_label: int = 255

    def __post_init__(self) -> None:
        if not 0.0 <= self.negative <= self.positive <= 1.0:
            raise ValueError("thresholds need 0 <= negative <= positive <= 1")


def window_overlap(boxes: np.ndarray, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(overlap, fill)`` of every box ``[x0, y0, x1, y1, ...]`` with every window, each
    ``(n_boxes, *windows.shape[:-1])``: ``overlap = |w & b| / min(|w|, |b|)``, ``fill =
    |w & b| / |w|``."""
    b = np.asarray(boxes, np.float64)
    b = b.reshape(-1, b.shape[-1] if b.ndim else 4)[:, :4]
    w = np.asarray(windows, np.float64)
    bs = b[(slice(None),) + (None,) * (w.ndim - 1)]
    iw = np.clip(np.minimum(w[..., 2], bs[..., 2]) - np.maximum(w[..., 0], bs[..., 0]), 0, None)
    ih = np.clip(np.minimum(w[..., 3], bs[..., 3]) - np.maximum(w[..., 1], bs[..., 1]), 0, None)
    inter = iw * ih
    area_w = (w[..., 2] - w[..., 0]) * (w[..., 3] - w[..., 1])
    area_b = (bs[..., 2] - bs[..., 0]) * (bs[..., 3] - bs[..., 1])
    overlap = inter / np.maximum(np.minimum(area_w, area_b), 1e-12)
    return overlap, inter / np.maximum(area_w, 1e-12)


def sliding_window_labels(boxes: np.ndarray, out_hw: tuple[int, int],
                          geometry: WindowGeometry, cfg: LabelConfig = LabelConfig()
                          ) -> np.ndarray:
    """``(h, w)`` int32 labels of the output cells for ``boxes`` ``(n, 5)`` in input pixels
    (see :class:`LabelConfig`); ties go to the first box."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    if len(boxes) == 0:
        return np.zeros(out_hw, np.int32)
    overlap, fill = window_overlap(boxes[:, :4], geometry.windows(out_hw))
    eligible = (overlap >= cfg.positive) & (fill >= cfg.min_fill)
    best = np.argmax(np.where(eligible, overlap, -1.0), axis=0)
    labels = boxes[:, 4].astype(np.int32)[best]
    out = np.where(overlap.max(axis=0) <= cfg.negative, 0, cfg.ignore_label).astype(np.int32)
    return np.where(eligible.any(axis=0), labels, out).astype(np.int32)


def batch_labels(boxes: Sequence[np.ndarray], out_hw: tuple[int, int],
                 geometry: WindowGeometry, cfg: LabelConfig = LabelConfig()) -> np.ndarray:
    """``(N, h, w)`` labels for a batch's boxes."""
    return np.stack([sliding_window_labels(b, out_hw, geometry, cfg) for b in boxes])


# ----------------------------------------------------------------------------- solver


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Caffe's ``SolverParameter`` subset: ``type`` SGD (momentum) or Adam (``momentum``,
    ``momentum2``, ``delta`` are beta1, beta2, eps); ``lr_policy`` fixed, step
    (``base_lr * gamma^floor(it / stepsize)``), exp, inv, poly
    (``base_lr * (1 - it / max_iter)^power``); ``weight_decay`` is L2 added to the gradient
    (times each parameter's ``decay_mult``); ``clip_gradients`` > 0 clips the global norm."""

    type: str = "SGD"
    base_lr: float = 0.01
    momentum: float = 0.9
    momentum2: float = 0.999
    delta: float = 1e-8
    weight_decay: float = 5e-4
    lr_policy: str = "fixed"
    gamma: float = 0.1
    stepsize: int = 100_000
    power: float = 1.0
    max_iter: int = 0
    clip_gradients: float = -1.0

    def __post_init__(self) -> None:
        if self.type not in ("SGD", "Adam"):
            raise ValueError(f"solver type must be SGD or Adam, got {self.type!r}")
        if self.lr_policy not in ("fixed", "step", "exp", "inv", "poly"):
            raise ValueError(f"unknown lr_policy {self.lr_policy!r}")
        if self.lr_policy == "poly" and self.max_iter <= 0:
            raise ValueError("lr_policy poly needs max_iter > 0")


def learning_rate(cfg: SolverConfig) -> Callable[[Array], Array]:
    """The learning rate at iteration ``it`` under Caffe's ``lr_policy``."""
    def schedule(it: Array) -> Array:
        it = jnp.asarray(it, jnp.float32)
        if cfg.lr_policy == "step":
            return cfg.base_lr * cfg.gamma ** jnp.floor(it / cfg.stepsize)
        if cfg.lr_policy == "exp":
            return cfg.base_lr * cfg.gamma ** it
        if cfg.lr_policy == "inv":
            return cfg.base_lr * (1.0 + cfg.gamma * it) ** (-cfg.power)
        if cfg.lr_policy == "poly":
            return cfg.base_lr * jnp.maximum(1.0 - it / cfg.max_iter, 0.0) ** cfg.power
        return jnp.asarray(cfg.base_lr, jnp.float32)
    return schedule


def _blob_index(spec: LayerSpec, blob: str, count: int) -> int:
    names = param_names(spec.type, count)
    return names.index(blob) if blob in names else -1


def caffe_multipliers(params: Params, layers: Sequence[LayerSpec] | None = None, *,
                      weight: tuple[float, float] = (1.0, 1.0),
                      bias: tuple[float, float] = (1.0, 1.0)) -> tuple[Params, Params]:
    """``(lr_mults, decay_mults)`` trees shaped like ``params`` (one float per blob).

    From the ``param { lr_mult decay_mult }`` fields of ``layers`` where a layer has them
    (Caffe's blob order; missing entries default to 1), else ``weight`` / ``bias`` defaults
    (``bias=(2.0, 0.0)`` is the CaffeNet train_val convention).
    """
    by_name = {s.name: s for s in layers or ()}
    lr: Params = {}
    decay: Params = {}
    for layer, blobs in params.items():
        spec = by_name.get(layer)
        lr[layer], decay[layer] = {}, {}
        for blob in blobs:
            default = bias if blob == "bias" else weight
            m = default
            if spec is not None and (spec.lr_mults or spec.decay_mults):
                i = _blob_index(spec, blob, len(blobs))
                m = (spec.lr_mults[i] if 0 <= i < len(spec.lr_mults) else 1.0,
                     spec.decay_mults[i] if 0 <= i < len(spec.decay_mults) else 1.0)
            lr[layer][blob], decay[layer][blob] = float(m[0]), float(m[1])
    return lr, decay


def frozen_paths(params: Params, predicate: Callable[[tuple[str, str]], bool] | None = None,
                 lr_mults: Params | None = None) -> frozenset[tuple[str, str]]:
    """The ``(layer, blob)`` paths to freeze: where ``predicate(path)`` holds or the
    ``lr_mult`` is 0 (Caffe's way of freezing a layer)."""
    out = set()
    for layer, blobs in params.items():
        for blob in blobs:
            path = (layer, blob)
            if (predicate is not None and predicate(path)) or (
                    lr_mults is not None and lr_mults.get(layer, {}).get(blob, 1.0) == 0.0):
                out.add(path)
    return frozenset(out)


def _tree_scale(updates: Any, factors: Params) -> Any:
    """``updates * factors`` leafwise; leaves masked out by optax (MaskedNode) pass through."""
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda u, f: u if is_masked(u) else u * jnp.asarray(f, u.dtype), updates, factors,
        is_leaf=is_masked)


def _caffe_weight_decay(weight_decay: float, decay_mults: Params
                        ) -> optax.GradientTransformation:
    """Caffe's L2 regularisation: ``g + weight_decay * decay_mult * w``."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs params")
        is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        out = jax.tree_util.tree_map(
            lambda g, w, m: g if is_masked(g) or m == 0.0 else
            g + jnp.asarray(weight_decay * m, g.dtype) * w, updates, params, decay_mults,
            is_leaf=is_masked)
        return out, state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _scale_by_tree(factors: Params) -> optax.GradientTransformation:
    return optax.GradientTransformation(
        lambda p: optax.EmptyState(), lambda u, s, p=None: (_tree_scale(u, factors), s))


def make_optimizer(cfg: SolverConfig, params: Params, *, lr_mults: Params | None = None,
                   decay_mults: Params | None = None,
                   frozen: frozenset[tuple[str, str]] = frozenset()
                   ) -> optax.GradientTransformation:
    """An optax transformation doing Caffe's update: clip, ``+ weight_decay * decay_mult * w``,
    then SGD (``v = momentum * v + lr * lr_mult * g; w -= v``) or Adam (step scaled by
    ``lr * lr_mult``). ``frozen`` paths get no update and no optimizer state."""
    lr_mults = lr_mults or jax.tree_util.tree_map(lambda _: 1.0, params)
    decay_mults = decay_mults or jax.tree_util.tree_map(lambda _: 1.0, params)
    schedule = learning_rate(cfg)
    parts = []
    if cfg.clip_gradients > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_gradients))
    if cfg.weight_decay:
        parts.append(_caffe_weight_decay(cfg.weight_decay, decay_mults))
    if cfg.type == "SGD":
        parts += [optax.scale_by_schedule(lambda it: -schedule(it)), _scale_by_tree(lr_mults)]
        if cfg.momentum:
            parts.append(optax.trace(decay=cfg.momentum))
    else:
        parts += [optax.scale_by_adam(b1=cfg.momentum, b2=cfg.momentum2, eps=cfg.delta),
                  optax.scale_by_schedule(lambda it: -schedule(it)), _scale_by_tree(lr_mults)]
    tx = optax.chain(*parts)
    if not frozen:
        return tx
    labels = {layer: {blob: "frozen" if (layer, blob) in frozen else "train" for blob in blobs}
              for layer, blobs in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- state & steps


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss settings: Caffe ``SoftmaxWithLoss`` normalisation, ignore label, class weights."""

    ignore_label: int = 255
    class_weights: tuple[float, ...] | None = None
    normalization: str = "VALID"


class TrainState(struct.PyTreeNode):
    """Everything a step needs. ``step``, ``params``, ``opt_state``, ``rng`` are arrays
    (checkpointed); ``module``, ``tx``, ``score``, ``loss``, ``frozen`` are static."""

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    module: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    score: str = struct.field(pytree_node=False, default="fc8-conv")
    loss: LossConfig = struct.field(pytree_node=False, default=LossConfig())
    frozen: frozenset = struct.field(pytree_node=False, default=frozenset())


def create_train_state(module: nn.Module, params: Params, tx: optax.GradientTransformation,
                       *, seed: int | Array = 0, score: str | None = None,
                       loss: LossConfig = LossConfig(),
                       frozen: frozenset[tuple[str, str]] = frozenset()) -> TrainState:
    """A fresh ``TrainState`` (step 0) for ``module`` (``CaffeNet`` or ``CaffeGraph``) and
    ``params`` (copied to device float arrays)."""
    params = jax.tree_util.tree_map(jnp.asarray, params)
    rng = jax.random.PRNGKey(seed) if isinstance(seed, int) else jnp.asarray(seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng, module=module, tx=tx, score=score or score_blob(module),
                      loss=loss, frozen=frozenset(frozen))


def _stop_frozen(params: Params, frozen: frozenset) -> Params:
    if not frozen:
        return params
    return {layer: {blob: jax.lax.stop_gradient(v) if (layer, blob) in frozen else v
                    for blob, v in blobs.items()} for layer, blobs in params.items()}


def _loss(state: TrainState, params: Params, batch: Mapping[str, Array], *, train: bool,
          key: Array | None) -> tuple[Array, tuple[Array, Array]]:
    rngs = {"dropout": key} if train and key is not None else None
    out = state.module.apply({"params": params}, batch["image"], train=train, rngs=rngs)
    logits = out[state.score]
    cw = state.loss.class_weights
    loss, loss_map = losses.sliding_window_loss(
        logits, batch["label"], ignore_label=state.loss.ignore_label,
        class_weights=None if cw is None else jnp.asarray(cw),
        normalization=state.loss.normalization)
    return loss, (loss_map, logits)


def _train_step(state: TrainState, batch: Mapping[str, Array]) -> tuple[TrainState, dict]:
    """One solver step on ``batch``; returns ``(new_state, {"loss", "loss_map", "accuracy"})``.

    ``batch["image"]``: ``(N, C, H, W)`` float32 net inputs, preprocessed as at inference
    (``fcn_jax.data.input_transformer``: BGR, x255, minus the mean). ``batch["label"]``:
    ``(N, h, w)`` int32, one class per cell of the score blob (``state.score``, whose
    ``(N, K, h, w)`` map the loss is a per-cell softmax over), made from boxes by
    :func:`batch_labels`; cells equal to ``state.loss.ignore_label`` (255) do not count.
    Pure: the dropout key is ``fold_in(state.rng, state.step)``.
    """
    key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        return _loss(state, _stop_frozen(params, state.frozen), batch, train=True, key=key)

    (loss, (loss_map, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = losses.accuracy(logits, batch["label"], ignore_label=state.loss.ignore_label)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss, "loss_map": loss_map, "accuracy": acc}


@functools.partial(jax.jit, static_argnames=("module", "score", "loss"))
def _eval_core(params: Params, batch: Mapping[str, Array], *, module: nn.Module, score: str,
               loss: LossConfig) -> dict:
    view = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                      rng=jnp.zeros((2,), jnp.uint32), module=module, tx=None, score=score,
                      loss=loss)
    value, (loss_map, logits) = _loss(view, params, batch, train=False, key=None)
    return {"loss": value, "loss_map": loss_map, "prob": jax.nn.softmax(logits, axis=1),
            "pred": jnp.argmax(logits, axis=1).astype(jnp.int32)}


#: ``train_step(state, batch) -> (state, {"loss", "loss_map", "accuracy"})``, jitted. Dropout
#: uses ``fold_in(state.rng, state.step)``, so a step depends on nothing but its arguments.
train_step = jax.jit(_train_step)


def eval_step(state: TrainState, batch: Mapping[str, Array]) -> dict:
    """``{"loss", "loss_map", "prob", "pred"}`` with Dropout off; jitted on the model alone
    (not the optimizer), so any state of the same model reuses the compiled function."""
    return _eval_core(state.params, batch, module=state.module, score=state.score,
                      loss=state.loss)


# ----------------------------------------------------------------------------- loop & metrics


def fit(state: TrainState, batch_fn: Callable[[int], Mapping[str, Any]], steps: int, *,
        progress: bool = True, on_step: Callable[[int, TrainState, dict], None] | None = None,
        desc: str = "finetune", mesh: jax.sharding.Mesh | None = None
        ) -> tuple[TrainState, list[float]]:
    """Run ``steps`` training steps from ``state.step``; ``batch_fn(step)`` makes the batch
    of that step (prepared one step ahead in a thread). Returns the state and the losses.

    With ``mesh`` (:func:`make_mesh`) the step is data-parallel: the state is replicated,
    each batch split over the devices, and the compiler sums the gradients across them (the
    same loss as one device, up to float rounding)."""
    from tqdm.auto import tqdm

    if mesh is not None:
        state = replicate(state, mesh)
        make = batch_fn
        batch_fn = lambda step: shard_batch(make(step), mesh)  # noqa: E731
    start = int(state.step)
    history: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(batch_fn, start) if steps > 0 else None
        # counts from the resumed step: "150/200" after a resume at 150, not "0/50"
        bar = tqdm(total=start + steps, initial=start, desc=desc, disable=not progress,
                   unit="step")
        for step in range(start, start + steps):
            batch = pending.result()
            if step + 1 < start + steps:
                pending = pool.submit(batch_fn, step + 1)
            state, metrics = train_step(state, batch)
            loss = float(metrics["loss"])
            history.append(loss)
            if not math.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"loss is {loss} at step {step}; lower the learning "
                                         f"rate")
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, state, metrics)
        bar.close()
    return state, history


def confusion_matrix(pred: Any, label: Any, num_classes: int, ignore_label: int = 255
                     ) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = truth, columns = prediction, ignored cells skipped."""
    p = np.asarray(pred).ravel().astype(np.int64)
    t = np.asarray(label).ravel().astype(np.int64)
    keep = (t != ignore_label) & (t >= 0) & (t < num_classes)
    return np.bincount(t[keep] * num_classes + p[keep],
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def dense_metrics(conf: np.ndarray, class_names: Sequence[str] | None = None
                  ) -> dict[str, Any]:
    """Per-cell accuracy, per-class IoU ``TP / (TP + FP + FN)`` and their mean over the
    classes present in truth or prediction (FCN's mean IU)."""
    conf = np.asarray(conf, np.float64)
    total = conf.sum()
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    names = list(class_names) if class_names else [str(i) for i in range(len(conf))]
    return {"cell_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_iou": float(np.nanmean(iou)) if np.any(denom > 0) else float("nan"),
            "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou,
                                                                          strict=True)},
            "cells": int(total)}


def evaluate(state: TrainState, batches: Iterable[Mapping[str, Any]], num_classes: int, *,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Dense-map metrics over ``batches`` (:func:`dense_metrics`) plus ``loss``, the mean
    per-cell loss over the non-ignored cells (rows of ignored cells may pad a batch)."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    loss_sum, valid = 0.0, 0
    ignore = state.loss.ignore_label
    for batch in batches:
        out = eval_step(state, batch)
        conf += confusion_matrix(out["pred"], batch["label"], num_classes, ignore)
        loss_sum += float(jnp.sum(out["loss_map"]))
        valid += int(np.sum(np.asarray(batch["label"]) != ignore))
    result = dense_metrics(conf, class_names)
    result["loss"] = loss_sum / max(valid, 1)
    return result


# ----------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def _quiet_orbax() -> Any:
    """Orbax's informational absl warnings (read-only folders, saves without metrics) off."""
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _state_tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params,
            "opt_state": serialization.to_state_dict(state.opt_state), "rng": state.rng}


class TrainCheckpoints:
    """Training checkpoints (params, optimizer state, step, rng and a JSON ``meta`` such as
    the run's config) in an Orbax ``CheckpointManager`` folder: one sub-folder per step,
    keeping the last ``keep`` and, with ``metrics={"loss": ...}`` given to :meth:`save`, the
    one of lowest loss. Each save is written to a temporary folder and renamed when complete
    (atomic: a failed or killed save leaves the earlier steps intact), asynchronously: the
    next training step runs while it is written. Arrays are restored onto the shardings of a
    template, so a checkpoint made on N devices resumes on M. Under ``jax.distributed``
    every process makes the same calls."""

    def __init__(self, directory: PathLike, *, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.isfile(self.directory):
            raise CaffeFormatError("is a file, not an Orbax checkpoint folder (checkpoints "
                                   "of fcn-jax before 0.2 cannot be resumed)",
                                   path=self.directory)
        if read_only and not os.path.isdir(self.directory):
            raise CaffeFormatError("no such checkpoint folder", path=self.directory)
        _recover_replaced(self.directory)
        policies = [cm.LatestN(n=keep)]
        if keep_best:
            policies.append(cm.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1))
        self._ocp = ocp
        with _quiet_orbax(), _unreadable(self.directory, "the folder"):
            options = ocp.CheckpointManagerOptions(
                preservation_policy=cm.AnyPreservationPolicy(policies),
                best_fn=lambda m: m["loss"], best_mode="min", read_only=read_only,
                create=not read_only, enable_async_checkpointing=async_save)
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()})

    def save(self, state: TrainState, meta: Mapping[str, Any] | None = None, *,
             metrics: Mapping[str, float] | None = None) -> None:
        """Save ``state`` at step ``state.step`` (replacing a save of the same step)."""
        ocp = self._ocp
        step = int(state.step)
        meta = dict(meta or {})
        digest = params_digest(state.params)
        if digest is not None:
            meta[DIGEST_KEY] = digest
        aside = None
        with _quiet_orbax():
            if step in self.manager.all_steps():
                self.manager.wait_until_finished()
                # the old save stays (aside, put back on open) until the new one commits;
                # several processes share the folder: process 0 moves it, every process then
                # takes the same branch (Orbax's calls are collective)
                aside = _set_aside(self.directory, step) if jax.process_index() == 0 else None
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    moved = bool(multihost_utils.broadcast_one_to_all(
                        np.int32(aside is not None)))
                else:
                    moved = aside is not None
                if not moved:
                    self.manager.delete(step)
                else:
                    self.manager.reload()
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                meta=ocp.args.JsonSave(meta)),
                metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()})
            if aside is not None:
                self.manager.wait_until_finished()
                shutil.rmtree(aside, ignore_errors=True)

    def steps(self) -> list[int]:
        """The steps saved (and kept), ascending."""
        self.manager.wait_until_finished()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The last step saved, or None."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step of lowest ``metrics["loss"]``, or None when no save had metrics."""
        self.manager.wait_until_finished()
        return self.manager.best_step()

    def _step(self, step: int | None) -> int:
        self.manager.wait_until_finished()
        with _unreadable(self.directory, "the folder"):
            steps = self.manager.all_steps()
        if not steps:
            raise CaffeFormatError("no training checkpoint in this folder", path=self.directory)
        step = self.manager.latest_step() if step is None else int(step)
        if step not in steps:
            raise CaffeFormatError(f"no step {step} (steps: {sorted(steps)})",
                                   path=self.directory, field="step")
        return step

    def _saved_tree(self, step: int) -> Any:
        try:
            with _quiet_orbax(), _unreadable(self.directory, f"step {step}"):
                tree = self.manager.item_metadata(step)["state"]
            tree = getattr(tree, "tree", tree)
        except (KeyError, ValueError, FileNotFoundError, TypeError, AttributeError) as e:
            if isinstance(e, CaffeFormatError):
                raise
            raise CaffeFormatError(f"step {step} is not a training checkpoint ({e})",
                                   path=self.directory) from None
        if not isinstance(tree, Mapping) or {"step", "params", "opt_state", "rng"} - set(tree):
            raise CaffeFormatError(f"step {step} is not a training checkpoint (needs step, "
                                   f"params, opt_state, rng)", path=self.directory)
        return tree

    def read(self, step: int | None = None) -> tuple[dict, dict]:
        """``(tree, meta)`` of a step (default: the latest) without a template: ``tree`` is
        ``{"step", "params", "opt_state", "rng"}`` as numpy arrays."""
        step = self._step(step)
        saved = self._saved_tree(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), saved)
        out = self._restore(step, target)
        tree = jax.tree_util.tree_map(np.asarray, dict(out["state"]))
        return tree, _checked_meta(out["meta"], tree["params"], self.directory, step)

    def _restore(self, step: int, target: Any) -> Any:
        """Orbax's restore with a damaged folder (truncated OCDBT files, broken JSON) as
        one ``CaffeFormatError`` naming the folder and the step."""
        ocp = self._ocp
        with _quiet_orbax(), _unreadable(self.directory, f"step {step}"):
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))

    def restore(self, template: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict]:
        """``(state, meta)`` of a step (default: the latest) into ``template`` (same model and
        optimizer; its arrays' shardings are where the restored arrays go). A checkpoint of
        another model raises ``CaffeFormatError`` naming the folder and the entry."""
        ocp = self._ocp
        step = self._step(step)
        saved = self._saved_tree(step)
        want = _state_tree(template)
        _check_like(want, saved, self.directory)
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, want)
        out = self._restore(step, target)
        tree = out["state"]
        meta = _checked_meta(out["meta"], tree["params"], self.directory, step)
        state = template.replace(
            step=tree["step"], params=tree["params"], rng=tree["rng"],
            opt_state=serialization.from_state_dict(template.opt_state, tree["opt_state"]))
        return state, meta

    def close(self) -> None:
        """Wait for a save under way and release the manager."""
        with _quiet_orbax():
            self.manager.wait_until_finished()
            self.manager.close()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def _unreadable(directory: str, what: str):
    """Orbax, tensorstore and JSON errors of a damaged checkpoint folder (truncated OCDBT
    files, broken or 100,000-deep JSON) as one ``CaffeFormatError`` naming the folder."""
    try:
        yield
    except CaffeFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - the readers raise assorted types
        reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise CaffeFormatError(f"{what} cannot be read ({type(e).__name__}: {reason})",
                               path=directory) from None


#: The ``meta`` entry holding :func:`params_digest` of the saved params.
DIGEST_KEY = "fcn_jax_params_sha256"


def params_digest(params: Any) -> str | None:
    """sha256 over every params array (name, dtype, shape, bytes), in name order; None when
    the arrays are not all addressable here (params sharded over processes)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not all(getattr(v, "is_fully_addressable", True) for _, v in leaves):
        return None
    h = hashlib.sha256()
    for key, v in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(jax.device_get(v)))
        h.update(f"{jax.tree_util.keystr(key)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()


def _checked_meta(meta: Any, params: Any, path: PathLike, step: int) -> dict:
    """The user's meta of a restored step, after the params digest recorded at save matched
    the restored params (a flipped byte in a data file is a "checksum mismatch")."""
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise CaffeFormatError(f"step {step}: meta is {type(meta).__name__}, not a JSON "
                               "object", path=path, field="meta")
    meta = dict(meta)
    want = meta.pop(DIGEST_KEY, None)
    if want is not None:
        got = params_digest(params)
        if got is not None and got != want:
            raise CaffeFormatError(f"step {step}: checksum mismatch: the params read back "
                                   "differ from those saved (a damaged data file)", path=path,
                                   field="params")
    return meta


_ASIDE = ".replaced-"


def _set_aside(directory: str, step: int) -> str | None:
    """Rename a step's folder to a hidden name (None if it is not where Orbax puts it)."""
    src = os.path.join(directory, str(step))
    if not os.path.isdir(src):
        return None
    aside = os.path.join(directory, f"{_ASIDE}{step}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(src, aside)
    return aside


def _recover_replaced(directory: str) -> None:
    """After a kill during the replacement of a step: the new save, if it committed, else
    the old one put back."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(_ASIDE) or not name[len(_ASIDE):].isdigit():
            continue
        aside = os.path.join(directory, name)
        step_dir = os.path.join(directory, name[len(_ASIDE):])
        if os.path.isdir(step_dir):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.replace(aside, step_dir)


def _check_like(want: Any, saved: Any, path: PathLike) -> None:
    """Every array of ``want`` is in ``saved`` with its shape and dtype, and nothing more."""
    flat_w = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(want)[0]}
    flat_s = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(saved)[0]}
    for name in sorted(set(flat_w) | set(flat_s), key=lambda n: (not n.startswith("['params']"),
                                                                  n)):
        if name not in flat_s or name not in flat_w:
            where = "the checkpoint lacks it" if name not in flat_s else "the model lacks it"
            raise CaffeFormatError(f"does not match the model ({where})", path=path,
                                   field=name)
        w, m = flat_w[name], flat_s[name]
        ws, wd = tuple(np.shape(w)), np.dtype(getattr(w, "dtype", np.asarray(w).dtype))
        if tuple(m.shape) != ws or np.dtype(m.dtype) != wd:
            raise CaffeFormatError(f"{np.dtype(m.dtype)}{list(m.shape)} does not match the "
                                   f"model's {wd}{list(ws)}", path=path, field=name)


def save_train_state(directory: PathLike, state: TrainState, meta: dict | None = None, *,
                     metrics: Mapping[str, float] | None = None, keep: int = 3) -> None:
    """Save step, params, optimizer state and rng (and ``meta``, JSON) into the Orbax folder
    ``directory`` for an exact resume (:class:`TrainCheckpoints`, waiting for the write)."""
    with TrainCheckpoints(directory, keep=keep) as ck:
        ck.save(state, meta, metrics=metrics)


def restore_train_state(directory: PathLike, template: TrainState, *,
                        step: int | None = None) -> tuple[TrainState, dict]:
    """Load a :func:`save_train_state` step (default: the latest) into ``template`` (same
    model and optimizer, on the devices to resume on); returns ``(state, meta)``.
    Mismatches raise ``CaffeFormatError``."""
    with TrainCheckpoints(directory, read_only=True) as ck:
        return ck.restore(template, step)


# ----------------------------------------------------------------------------- devices


DATA_AXIS = "data"


def make_mesh(devices: int | Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A 1-D ``Mesh`` with axis ``"data"`` over ``devices`` (a count of the first of
    ``jax.devices()``, a list of devices, or None for all). Under ``jax.distributed`` (after
    ``jax.distributed.initialize()`` in every process) ``jax.devices()`` spans all hosts."""
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(f"asked for {devices} devices but JAX sees {len(available)} "
                             f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
                             f"{devices} before JAX starts)")
        chosen = available[:devices]
    else:
        chosen = list(devices)
    return jax.sharding.Mesh(np.asarray(chosen), (DATA_AXIS,))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``tree`` (e.g. a ``TrainState``) copied whole onto every device of ``mesh``; with
    several processes, each gives its own copy (the same values in every process)."""
    if jax.process_count() > 1:
        from .distributed import replicate as replicate_across_processes

        return replicate_across_processes(tree, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(tree, sharding)


def shard_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict:
    """``batch`` split along its first axis over the ``"data"`` axis of ``mesh``. With
    several processes each passes its own rows (``jax.make_array_from_process_local_data``)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    n = mesh.shape[DATA_AXIS]
    out = {}
    for k, v in batch.items():
        if jax.process_count() > 1:
            out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
            continue
        if np.shape(v)[0] % n:
            raise ValueError(f"batch {k!r} of {np.shape(v)[0]} rows does not split over "
                             f"{n} devices")
        out[k] = jax.device_put(v, sharding)
    return out


def model_net(module: nn.Module, input_shape: Sequence[int] = (1, 3, 227, 227)) -> Any:
    """The NetParameter of a ``CaffeNet`` configuration (its deploy net)."""
    if not isinstance(module, CaffeNet):
        raise TypeError("model_net needs a CaffeNet; for a Caffe graph use its prototxt")
    return caffenet_net(fully_conv=module.fully_conv, widths=tuple(module.widths),
                        num_classes=module.num_classes, input_shape=tuple(input_shape))


def export_caffemodel(path: PathLike, params: Params, net: Any) -> None:
    """Write ``params`` as a caffemodel for ``net`` (NetParameter or prototxt path), which
    real Caffe loads with that prototxt."""
    host = {layer: {k: np.asarray(v, np.float32) for k, v in blobs.items()}
            for layer, blobs in params.items()}
    converters.save_caffemodel(path, host, net)
