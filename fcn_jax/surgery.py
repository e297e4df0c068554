"""Net surgery as pure tree transforms (Caffe's net_surgery tutorial and FCN's ``surgery.py``).

Params are ``params[layer][blob]`` in Caffe's shapes (``converters.load_caffemodel``,
``load_caffe``). Every function returns a new tree and never modifies its input; leaves it
changes come back as ``jax.Array`` (float32), the others are passed through as they are.

The tutorial's ``net.params['conv'][0].data[1, 0, 1:-1, 1:-1] = sobel`` becomes
``set_filter(params, "conv", 1, sobel_y(), channel=0)``; its fully convolutional cast is
``fc_to_conv(params, net)`` (or ``transplant`` into a fully convolutional net's params).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters import CaffeFormatError

from . import netdef as fcn_net
from .layers import bilinear_filler

Array = Any  # numpy or JAX array
Params = Mapping[str, Mapping[str, Array]]
PathLike = str | os.PathLike

__all__ = [
    "TransplantReport", "bilinear_init", "expand_score", "fc_to_conv", "fold_batchnorm",
    "gaussian_kernel", "interp", "map_params", "set_bias", "set_filter", "sobel_x", "sobel_y",
    "transplant", "upsample_filt",
]


# ----------------------------------------------------------------------------- helpers


def _leaf(params: Params, layer: str, blob: str) -> Array:
    if layer not in params:
        raise KeyError(f"layer {layer!r} is not in the params (layers: {sorted(params)})")
    if blob not in params[layer]:
        raise KeyError(f"layer {layer!r} has no blob {blob!r} (blobs: {sorted(params[layer])})")
    return params[layer][blob]


def _replace(params: Params, layer: str, blob: str, value: Array) -> dict:
    """A new tree equal to ``params`` except ``params[layer][blob] = value``."""
    out = {k: dict(v) for k, v in params.items()}
    out[layer][blob] = value
    return out


def _f32(x: Array) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


# ----------------------------------------------------------------------------- designer filters


def gaussian_kernel(ksize: int | Sequence[int] = 5, sigma: float = 1.0) -> np.ndarray:
    """The tutorial's normalised Gaussian blur kernel, float32 ``(kh, kw)``.

    As ``net_surgery.ipynb`` builds it from ``ksize = conv.shape[2:]``:
    ``y, x = mgrid[-kh//2 + 1 : kh//2 + 1, -kw//2 + 1 : kw//2 + 1]``,
    ``g = exp(-(x**2 + y**2) / (2 sigma**2))``, ``g / g.sum()`` (float64, then float32).
    For odd sizes the peak is at the centre; for even sizes one past it, as in the tutorial.
    """
    kh, kw = (ksize, ksize) if isinstance(ksize, (int, np.integer)) else tuple(ksize)
    if kh < 1 or kw < 1 or sigma <= 0:
        raise ValueError(f"need a positive kernel size and sigma, got {ksize}, {sigma}")
    y, x = np.mgrid[-kh // 2 + 1:kh // 2 + 1, -kw // 2 + 1:kw // 2 + 1]
    g = np.exp(-((x ** 2 + y ** 2) / (2.0 * sigma ** 2)))
    return (g / g.sum()).astype(np.float32)


def sobel_y() -> np.ndarray:
    """Sobel derivative along y (rows): responds to horizontal edges. The tutorial's
    ``sobel`` ("horizontal", filter 1): ``[[-1, -2, -1], [0, 0, 0], [1, 2, 1]]``."""
    return np.array((-1, -2, -1, 0, 0, 0, 1, 2, 1), dtype=np.float32).reshape(3, 3)


def sobel_x() -> np.ndarray:
    """Sobel derivative along x (columns): responds to vertical edges. The tutorial's
    ``sobel.T`` ("vertical", filter 2)."""
    return np.ascontiguousarray(sobel_y().T)


def _centered(kernel: np.ndarray, kh: int, kw: int, layer: str) -> np.ndarray:
    h, w = kernel.shape[-2:]
    if h > kh or w > kw or (kh - h) % 2 or (kw - w) % 2:
        raise ValueError(f"{layer}: a {h}x{w} kernel cannot be centred in a {kh}x{kw} filter")
    top, left = (kh - h) // 2, (kw - w) // 2
    out = np.zeros(kernel.shape[:-2] + (kh, kw), np.float32)
    out[..., top:top + h, left:left + w] = kernel
    return out


def set_filter(params: Params, layer: str, index: int, kernel: Array,
               channel: int | None = None, *, blob: str = "weight") -> dict:
    """Make filter ``index`` of ``layer`` equal to ``kernel``.

    ``kernel``: ``(h, w)`` written to input ``channel`` (other channels untouched), or to every
    input channel when ``channel`` is None; or ``(C_in, h, w)`` with ``channel=None``. A kernel
    smaller than the filter is centred and the border zeroed (the tutorial's zeroed 5x5 filter
    with a Sobel written into ``[1:-1, 1:-1]``).
    """
    w = _f32(_leaf(params, layer, blob))
    if w.ndim != 4:
        raise ValueError(f"{layer}/{blob}: expected a 4-D filter bank, got shape {w.shape}")
    o, cin, kh, kw = w.shape
    if not -o <= index < o:
        raise IndexError(f"{layer}: filter {index} out of range (the layer has {o})")
    k = np.asarray(kernel, np.float32)
    if k.ndim == 2:
        k = _centered(k, kh, kw, layer)
        if channel is None:
            w = w.at[index].set(jnp.broadcast_to(k, (cin, kh, kw)))
        else:
            if not -cin <= channel < cin:
                raise IndexError(f"{layer}: channel {channel} out of range ({cin} inputs)")
            w = w.at[index, channel].set(k)
    elif k.ndim == 3 and channel is None:
        if k.shape[0] != cin:
            raise ValueError(f"{layer}: kernel has {k.shape[0]} channels, the filter {cin}")
        w = w.at[index].set(_centered(k, kh, kw, layer))
    else:
        raise ValueError(f"{layer}: kernel must be (h, w), or (C_in, h, w) without channel; "
                         f"got shape {k.shape}")
    return _replace(params, layer, blob, w)


def set_bias(params: Params, layer: str, index: int | None, value: float | Array, *,
             blob: str = "bias") -> dict:
    """Set ``bias[index] = value`` (every entry when ``index`` is None)."""
    b = _f32(_leaf(params, layer, blob))
    b = b.at[...].set(value) if index is None else b.at[index].set(value)
    return _replace(params, layer, blob, b)


def map_params(params: Params, fn: Callable[[Array], Array],
               predicate: Callable[[tuple[str, ...]], bool] | None = None) -> Any:
    """Apply ``fn`` to the leaves whose path (e.g. ``("conv1", "weight")``) satisfies
    ``predicate`` (every leaf when None); the others are passed through.

    ``map_params(p, lambda w: 0.9 * w, lambda path: path[1] == "weight")``: custom
    per-parameter operations, ``jax.tree_util.tree_map_with_path`` style.
    """
    def visit(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        return fn(leaf) if predicate is None or predicate(keys) else leaf
    return jax.tree_util.tree_map_with_path(visit, _plain(params))


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


# ----------------------------------------------------------------------------- FC -> conv


def fc_to_conv(params: Params, net: Any, *, classifier_shape: Any = None,
               suffix: str = "-conv") -> dict:
    """Cast every InnerProduct layer's params to the Convolution of the fully convolutional net.

    ``net`` is the classifier (NetParameter or prototxt path); each weight ``(N, C*H*W)``
    becomes ``(N, C, H, W)`` with (C, H, W) the shape of the layer's bottom blob in the
    classifier at ``classifier_shape`` (default: its Input shape) -- the same row-major
    memory, as the tutorial's ``conv.flat = fc.flat``. Keys get ``suffix`` (``fc6`` ->
    ``fc6-conv``) to match ``fcn_jax.netdef.fully_convolutional_net(net, suffix=suffix)``.
    Other layers are passed through.
    """
    plan = fcn_net.fully_conv_plan(net, classifier_shape, suffix)
    casts = {c.name: c for c in plan.casts}
    missing = sorted(n for n in casts if n not in params)
    if missing:
        raise CaffeFormatError(f"params have no InnerProduct layers {missing}", field="params")
    out: dict[str, dict[str, Array]] = {}
    for name, blobs in params.items():
        cast = casts.get(name)
        if cast is None:
            out[name] = dict(blobs)
            continue
        w = _leaf(params, name, "weight")
        if cast.transpose:
            w = jnp.asarray(w).T
        if tuple(w.shape) != (cast.num_output, math.prod(cast.weight_shape[1:])):
            raise CaffeFormatError(f"weight shape {tuple(w.shape)} does not fit the bottom: "
                                   f"needs ({cast.num_output}, "
                                   f"{math.prod(cast.weight_shape[1:])})", layer=name,
                                   field="weight")
        entry = dict(blobs)
        entry["weight"] = jnp.reshape(_f32(w), cast.weight_shape)
        out[cast.new_name] = entry
    return out


# ----------------------------------------------------------------------------- transplant


Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TransplantReport:
    """What ``transplant`` did, blob by blob.

    ``copied``: (src layer, dst layer, blob) of equal shape; ``coerced``: (src, dst, blob,
    src shape, dst shape) of equal size, reshaped in row-major order; ``dropped``: (src layer,
    blob or "*", reason); ``untouched``: dst layers that received nothing; ``renamed``: (src,
    dst) pairs matched by the ``-conv`` naming of ``fully_convolutional_net`` (``fc6`` ->
    ``fc6-conv`` or back) because the destination had no layer of the source's name.
    """

    copied: tuple[tuple[str, str, str], ...] = ()
    coerced: tuple[tuple[str, str, str, Shape, Shape], ...] = ()
    dropped: tuple[tuple[str, str, str], ...] = ()
    untouched: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()

    def lines(self) -> list[str]:
        """FCN-style lines: ``copying``, ``coercing ... from ... to ...``, ``dropping``."""
        out = [f"renaming {s} -> {d} (fully_convolutional_net's {IMPLIED_SUFFIX!r} naming, "
               "same sizes)" for s, d in self.renamed]
        out += [f"copying {s} -> {d} {b}" for s, d, b in self.copied]
        out += [f"coercing {s} -> {d} {b} from {fs} to {ts}" for s, d, b, fs, ts in self.coerced]
        out += [f"dropping {s} {b}: {why}" for s, b, why in self.dropped]
        out += [f"keeping {d} (nothing transplanted)" for d in self.untouched]
        return out

    def summary(self) -> str:
        """One line: how many blobs were copied, coerced and dropped, and which layers kept
        their init (at most 5 named)."""
        def few(names: Sequence[str]) -> str:
            names = list(dict.fromkeys(names))
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            return ", ".join(names[:5]) + more

        parts = [f"{len(self.copied)} blobs copied"]
        if self.coerced:
            parts.append(f"{len(self.coerced)} reshaped ({few([d for _, d, *_ in self.coerced])})")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped ({few([s for s, *_ in self.dropped])})")
        if self.untouched:
            n = len(self.untouched)
            parts.append(f"{n} layer{'s keep their' if n != 1 else ' keeps its'} init "
                         f"({few(self.untouched)})")
        return "transplant: " + ", ".join(parts)

    def __str__(self) -> str:
        return "\n".join(self.lines())


#: The suffix ``converters.fcn.fully_convolutional_net`` gives cast layers; ``transplant``
#: follows it when the destination lacks a source layer's name.
IMPLIED_SUFFIX = "-conv"


def transplant(dst: Params, src: Params,
               rename: Mapping[str, str] | Callable[[str], str] | None = None,
               suffix: str = "", *, implied_renames: bool = True
               ) -> tuple[dict, TransplantReport]:
    """Copy ``src`` params into ``dst`` by layer and blob name (FCN's ``surgery.transplant``).

    Source layer ``p`` goes to ``rename(p)`` (a mapping, default the same name) followed by
    ``suffix``. Blobs of the same shape are copied; of the same size but another shape
    coerced (row-major reshape, as ``new.flat = old.flat``: ``fc6 (4096, 9216)`` ->
    ``fc6-conv (4096, 256, 6, 6)``); of another size dropped (FCN would silently cycle or
    truncate them), as are layers and blobs ``dst`` lacks. Returns ``(new_params, report)``.

    A source layer whose target is not in ``dst`` goes to the target's ``-conv`` form (or,
    from an FCN, the name without ``-conv``) when ``dst`` has that layer, nothing else feeds
    it and every blob has the same element count: so ``transplant(fcn_params, clf_params)``
    is the tutorial's fc -> fc-conv transplant (``implied_renames=False`` turns this off).
    A destination layer left without weights while a source layer went nowhere is warned
    about (``UserWarning``): pass ``rename=`` for such layers.
    """
    def target(name: str) -> str:
        if rename is None:
            new = name
        elif callable(rename):
            new = rename(name)
        else:
            new = rename.get(name, name)
        return new + suffix

    out = {k: dict(v) for k, v in dst.items()}
    copied, coerced, dropped, written = [], [], [], set()
    targets = {layer: target(layer) for layer in src}
    renamed = _implied_renames(dst, src, targets) if implied_renames else {}
    for layer, blobs in src.items():
        to = renamed.get(layer, targets[layer])
        if to not in out:
            dropped.append((layer, "*", f"no layer {to!r} in the destination"))
            continue
        for blob, value in blobs.items():
            if blob not in out[to]:
                dropped.append((layer, blob, f"{to!r} has no blob {blob!r}"))
                continue
            old_shape, new_shape = tuple(np.shape(value)), tuple(np.shape(out[to][blob]))
            if old_shape == new_shape:
                out[to][blob] = _f32(value)
                copied.append((layer, to, blob))
            elif math.prod(old_shape) == math.prod(new_shape):
                out[to][blob] = jnp.reshape(_f32(value), new_shape)
                coerced.append((layer, to, blob, old_shape, new_shape))
            else:
                dropped.append((layer, blob, f"size {math.prod(old_shape)} {old_shape} != "
                                f"{math.prod(new_shape)} {new_shape} of {to!r}"))
                continue
            written.add(to)
    untouched = tuple(k for k in out if k not in written)
    lost = [s for s, b, _ in dropped if b == "*"]
    if untouched and lost:
        warnings.warn(f"transplant: destination layers {list(untouched)} received nothing "
                      f"while source layers {lost} matched no destination layer; pass "
                      "rename={source: destination} for them", UserWarning, stacklevel=2)
    return out, TransplantReport(tuple(copied), tuple(coerced), tuple(dropped), untouched,
                                 tuple(renamed.items()))


def _implied_renames(dst: Params, src: Params, targets: Mapping[str, str]) -> dict[str, str]:
    """Source layers whose target is missing from ``dst`` but whose ``-conv`` form (or the
    form without ``-conv``) is there, unclaimed, with the same blob names and sizes."""
    claimed = {t for t in targets.values() if t in dst}
    found: dict[str, str] = {}
    for layer, to in targets.items():
        if to in dst:
            continue
        options = [to + IMPLIED_SUFFIX]
        if to.endswith(IMPLIED_SUFFIX):
            options.append(to[:-len(IMPLIED_SUFFIX)])
        for cand in options:
            if cand not in dst or cand in claimed:
                continue
            blobs, there = src[layer], dst[cand]
            if set(blobs) == set(there) and all(
                    math.prod(np.shape(blobs[b])) == math.prod(np.shape(there[b]))
                    for b in blobs):
                found[layer] = cand
                claimed.add(cand)
                break
    return found


# ----------------------------------------------------------------------------- upsampling


def upsample_filt(size: int) -> np.ndarray:
    """FCN's ``upsample_filt``: a ``(size, size)`` float64 bilinear kernel.

    ``factor = (size + 1) // 2``; centre ``factor - 1`` (odd) or ``factor - 0.5`` (even);
    ``k[y, x] = (1 - |y - c| / factor) (1 - |x - c| / factor)``. With stride ``factor``
    and kernel ``2 factor - factor % 2`` a Deconvolution with it upsamples bilinearly; for
    those sizes (``size % 4`` in 0, 1) it is Caffe's ``bilinear`` filler (other sizes differ).
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def interp(params: Params, layers: Sequence[str], *, blob: str = "weight") -> dict:
    """FCN's ``interp``: bilinear upsampling weights for Deconvolution ``layers``.

    Each weight ``(m, k, h, h)`` needs ``k == m`` (channel ``i`` -> output ``i``) or
    ``k == 1`` (grouped, one filter per channel); filter ``[i, i]`` (or ``[i, 0]``) is
    ``upsample_filt(h)``. Unlike FCN, the off-diagonal filters are zeroed, so the result
    does not depend on the previous weights.
    """
    out: Any = params
    for layer in layers:
        w = _leaf(out, layer, blob)
        if np.ndim(w) != 4:
            raise ValueError(f"{layer}: expected a 4-D deconvolution weight, got {np.shape(w)}")
        m, k, h, w_ = np.shape(w)
        if m != k and k != 1:
            raise ValueError(f"{layer}: input and output channels must match or the output "
                             f"must be 1 per group, got weight {np.shape(w)}")
        if h != w_:
            raise ValueError(f"{layer}: filters must be square, got {h}x{w_}")
        new = np.zeros((m, k, h, h), np.float32)
        new[np.arange(m), np.arange(m) if k == m else 0] = upsample_filt(h)
        out = _replace(out, layer, blob, jnp.asarray(new))
    return out


def bilinear_init(params: Params, layers: Sequence[str], *, blob: str = "weight") -> dict:
    """Fill ``layers``' weights with Caffe's ``bilinear`` filler (the same kernel for every
    (input, output) pair: use with ``group = channels`` for per-channel upsampling)."""
    out: Any = params
    for layer in layers:
        shape = np.shape(_leaf(out, layer, blob))
        out = _replace(out, layer, blob, jnp.asarray(bilinear_filler(shape)))
    return out


def expand_score(dst: Params, dst_layer: str, src: Params, src_layer: str) -> dict:
    """FCN's ``expand_score``: copy a score layer's ``n`` classes into the first ``n`` outputs
    of a wider one (``weight[:n] = old weight``, ``bias[:n] = old bias``); the other
    outputs keep ``dst``'s values (their initialisation)."""
    out: Any = dst
    for blob in src[src_layer]:
        old = _f32(_leaf(src, src_layer, blob))
        new = _f32(_leaf(dst, dst_layer, blob))
        n = old.shape[0]
        if new.shape[0] < n or new.shape[1:] != old.shape[1:]:
            raise ValueError(f"{src_layer}/{blob} {tuple(old.shape)} does not fit into the "
                             f"first outputs of {dst_layer}/{blob} {tuple(new.shape)}")
        out = _replace(out, dst_layer, blob, new.at[:n].set(old))
    return out


# ----------------------------------------------------------------------------- BatchNorm


def fold_batchnorm(params: Params, net: Any) -> tuple[dict, Any]:
    """Fold each BatchNorm (+ Scale) into the Convolution / InnerProduct before it.

    With ``s = 0 if factor == 0 else 1/factor``, ``sigma = sqrt(s*variance + eps)``,
    ``g = gamma / sigma`` (gamma = 1, beta = 0 without a Scale):
    ``W' = W * g`` per output channel and ``b' = (b - s*mean) * g + beta``. Computed in
    float64, rounded once to float32. Returns ``(new_params, new_net)``: the BatchNorm and
    Scale layers are gone and the folded layer has a bias and writes the chain's last top
    (see ``fcn_jax.netdef.batchnorm_folds`` for which chains qualify).
    """
    folds = fcn_net.batchnorm_folds(net)
    new_net = fcn_net.fold_batchnorm_net(net, folds)
    gone = {f.batchnorm for f in folds} | {f.scale for f in folds if f.scale}
    missing = sorted(n for n in gone | {f.layer for f in folds} if n not in params)
    if missing:
        raise CaffeFormatError(f"params have no layers {missing}", field="params")
    out = {k: dict(v) for k, v in params.items() if k not in gone}
    for f in folds:
        w = np.asarray(_leaf(params, f.layer, "weight"), np.float64)
        b = np.asarray(params[f.layer].get("bias", np.zeros(w.shape[0])), np.float64)
        bn = params[f.batchnorm]
        factor = float(np.asarray(bn["scale_factor"]).reshape(-1)[0])
        s = 0.0 if factor == 0 else 1.0 / factor
        mean = np.asarray(bn["mean"], np.float64) * s
        sigma = np.sqrt(np.asarray(bn["variance"], np.float64) * s + f.eps)
        gamma = np.ones_like(sigma) if f.scale is None else np.asarray(
            params[f.scale]["scale"], np.float64).reshape(-1)
        beta = np.zeros_like(sigma) if f.scale is None or "bias" not in params[f.scale] \
            else np.asarray(params[f.scale]["bias"], np.float64).reshape(-1)
        if not (w.shape[0] == mean.size == gamma.size == beta.size):
            raise CaffeFormatError(f"{w.shape[0]} outputs but BatchNorm/Scale have "
                                   f"{mean.size}/{gamma.size} channels", layer=f.layer,
                                   field="weight")
        g = gamma / sigma
        out[f.layer]["weight"] = jnp.asarray((w * g.reshape((-1,) + (1,) * (w.ndim - 1)))
                                             .astype(np.float32))
        out[f.layer]["bias"] = jnp.asarray(((b - mean) * g + beta).astype(np.float32))
    return out, new_net
