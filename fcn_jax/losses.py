"""Caffe's loss layers as pure functions: per-location softmax cross-entropy (a loss map),
``SoftmaxWithLoss`` normalisation modes, and ``Accuracy``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def softmax_cross_entropy_map(logits: Array, labels: Array, *, axis: int = 1,
                              ignore_label: int | None = None,
                              class_weights: Array | None = None) -> Array:
    """Per-location loss ``-w[y] * log softmax(logits)[y]`` over ``axis``; 0 where ignored.

    ``logits`` (N, C, H, W) (or any shape with classes on ``axis``), ``labels`` the logits'
    shape without ``axis`` (Caffe also accepts a singleton label axis), integer-valued.
    """
    axis = axis % logits.ndim
    labels = jnp.asarray(labels)
    if labels.ndim == logits.ndim:
        labels = jnp.squeeze(labels, axis=axis)
    labels = labels.astype(jnp.int32)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 under x64
    logp = jax.nn.log_softmax(logits.astype(dtype), axis=axis)
    valid = jnp.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
    safe = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(logp, jnp.expand_dims(safe, axis), axis=axis)
    loss = -jnp.squeeze(picked, axis)
    if class_weights is not None:
        loss = loss * jnp.asarray(class_weights, dtype)[safe]
    return jnp.where(valid, loss, jnp.zeros((), dtype))


def softmax_with_loss(logits: Array, labels: Array, *, axis: int = 1,
                      ignore_label: int | None = None, normalization: str = "VALID",
                      class_weights: Array | None = None) -> Array:
    """Caffe ``SoftmaxWithLoss``: the loss map summed, then divided per ``normalization``:
    FULL (all locations), VALID (non-ignored locations, Caffe's default), BATCH_SIZE, NONE."""
    loss = softmax_cross_entropy_map(logits, labels, axis=axis, ignore_label=ignore_label,
                                     class_weights=class_weights)
    total = jnp.sum(loss)
    if normalization == "NONE":
        return total
    if normalization == "BATCH_SIZE":
        return total / logits.shape[0]
    if normalization == "FULL" or ignore_label is None:
        return total / loss.size
    labels = jnp.asarray(labels)
    if labels.ndim == logits.ndim:
        labels = jnp.squeeze(labels, axis=axis % logits.ndim)
    count = jnp.sum(labels.astype(jnp.int32) != ignore_label)
    return total / jnp.maximum(count, 1)


def sliding_window_loss(logits: Array, labels: Array, *, ignore_label: int | None = 255,
                        class_weights: Array | None = None, normalization: str = "VALID"
                        ) -> tuple[Array, Array]:
    """Sliding-window loss: ``(scalar, loss_map)`` for class scores ``(N, C, H, W)`` and cell
    labels ``(N, H, W)``.

    ``loss_map[n, i, j] = -w[y] * log softmax(logits[n, :, i, j])[y]`` (0 at ignored cells);
    the scalar is its sum divided per ``normalization`` as in Caffe's ``SoftmaxWithLoss``:
    VALID (number of non-ignored cells, at least 1), FULL (all cells), BATCH_SIZE (N), NONE.
    """
    if normalization not in ("VALID", "FULL", "BATCH_SIZE", "NONE"):
        raise ValueError(f"unknown normalization {normalization!r}")
    loss_map = softmax_cross_entropy_map(logits, labels, axis=1, ignore_label=ignore_label,
                                         class_weights=class_weights)
    total = jnp.sum(loss_map)
    if normalization == "NONE":
        return total, loss_map
    if normalization == "BATCH_SIZE":
        return total / logits.shape[0], loss_map
    if normalization == "FULL" or ignore_label is None:
        return total / loss_map.size, loss_map
    count = jnp.sum(jnp.asarray(labels).reshape(loss_map.shape) != ignore_label)
    return total / jnp.maximum(count, 1).astype(total.dtype), loss_map


def accuracy(scores: Array, labels: Array, *, top_k: int = 1, axis: int = 1,
             ignore_label: int | None = None) -> Array:
    """Caffe ``Accuracy``: fraction of (non-ignored) locations whose label is in the top k."""
    axis = axis % scores.ndim
    labels = jnp.asarray(labels)
    if labels.ndim == scores.ndim:
        labels = jnp.squeeze(labels, axis=axis)
    labels = labels.astype(jnp.int32)
    safe = jnp.clip(labels, 0, scores.shape[axis] - 1)
    own = jnp.take_along_axis(scores, jnp.expand_dims(safe, axis), axis=axis)
    rank = jnp.sum(scores > own, axis=axis)
    hit = (rank < top_k).astype(jnp.float32)
    valid = jnp.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
    return jnp.sum(jnp.where(valid, hit, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
