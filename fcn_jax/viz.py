"""Matplotlib figures for filters, filter outputs and class-probability maps.

All functions build a :class:`matplotlib.figure.Figure` on an Agg canvas
directly (no pyplot state, no ``plt.show``), return it, and save it atomically
(:func:`fcn_jax.io_utils.atomic_savefig`) when ``path`` is given.  Figures
created this way are not registered with pyplot, so they need no
``plt.close``; they are freed when no longer referenced.

Images are ``H x W x 3`` RGB (float in [0, 1] or uint8), ``H x W x 1`` or
``H x W`` gray.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fcn_jax.io_utils import atomic_savefig

__all__ = [
    "before_after_heatmaps",
    "class_colors",
    "classification_map_figure",
    "filter_grid",
    "IGNORE_COLOR",
    "heatmap",
    "loss_curve",
    "overlay",
    "show_filter_outputs",
    "training_curves",
]

PathLike = str | os.PathLike


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: PathLike | None, dpi: int = 100) -> Figure:
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


def _display_image(image: Any) -> tuple[np.ndarray, str | None]:
    """Return an array imshow can draw and the colormap to use (gray for 2-D)."""
    im = np.asarray(image)
    if im.ndim == 3 and im.shape[2] == 1:
        im = im[:, :, 0]
    if im.ndim == 2:
        return im, "gray"
    if im.ndim != 3 or im.shape[2] not in (3, 4):
        raise ValueError(f"expected an H x W [x 1|3|4] image, got shape {im.shape}")
    if im.dtype == np.uint8:
        return im, None
    return np.clip(im.astype(np.float32), 0.0, 1.0), None


def _as_map(prob_map: Any, name: str = "prob_map") -> np.ndarray:
    m = np.asarray(prob_map, dtype=np.float64)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"{name} must be H x W, got shape {np.shape(prob_map)}")
    return m


def _upsample(m: np.ndarray, shape: tuple[int, int], interp: str) -> np.ndarray:
    if m.shape == shape:
        return m
    from skimage.transform import resize

    order = {"nearest": 0, "bilinear": 1}.get(interp)
    if order is None:
        raise ValueError(f"interp must be 'nearest' or 'bilinear', got {interp!r}")
    return resize(m, shape, order=order, mode="edge", anti_aliasing=False, preserve_range=True)


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- filters


def show_filter_outputs(
    image: Any,
    outputs: Any,
    titles: Sequence[str] | None = None,
    path: PathLike | None = None,
) -> Figure:
    """The net-surgery tutorial figure: the input and each filter's output side by side.

    ``outputs`` is ``(K, H, W)``, ``(1, K, H, W)`` or a list of ``H x W`` maps.
    Outputs share one gray color scale (the global min/max), as in Caffe's
    ``show_filters``.  ``titles`` gives one title per output.
    """
    maps = [np.asarray(o, dtype=np.float64) for o in _split_outputs(outputs)]
    if titles is not None and len(titles) != len(maps):
        raise ValueError(f"{len(titles)} titles for {len(maps)} outputs")
    vmin = min(float(m.min()) for m in maps)
    vmax = max(float(m.max()) for m in maps)
    n = 1 + len(maps)
    fig = _new_figure((3.0 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)[0]
    im, cmap = _display_image(image)
    axes[0].imshow(im, cmap=cmap)
    axes[0].set_title("input")
    _off(axes[0])
    for i, (ax, m) in enumerate(zip(axes[1:], maps, strict=True)):
        ax.imshow(m, cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_title(titles[i] if titles is not None else f"filter #{i} output")
        _off(ax)
    return _finish(fig, path)


def _split_outputs(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, np.ndarray) or hasattr(outputs, "__array__"):
        arr = np.asarray(outputs)
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        if arr.ndim != 3:
            raise ValueError(f"outputs must be (K, H, W), got shape {np.shape(outputs)}")
        maps = list(arr)
    else:
        maps = [np.asarray(o) for o in outputs]
    if not maps:
        raise ValueError("no outputs to show")
    for m in maps:
        if m.ndim != 2:
            raise ValueError(f"each output must be H x W, got shape {m.shape}")
    return maps


def filter_grid(
    weights: Any,
    path: PathLike | None = None,
    *,
    bgr_to_rgb: bool = True,
    ncols: int | None = None,
    title: str | None = None,
) -> Figure:
    """Grid of conv filters ``(O, I, kh, kw)``, each min/max-normalised on its own.

    Filters with I == 3 are drawn in color (Caffe's BGR flipped to RGB unless
    ``bgr_to_rgb`` is false); otherwise the first input channel is drawn in gray.
    The figure has one axes per filter.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4 or w.shape[0] < 1:
        raise ValueError(f"weights must be (O, I, kh, kw), got shape {w.shape}")
    o, i = w.shape[:2]
    ncols = ncols or math.ceil(math.sqrt(o))
    nrows = math.ceil(o / ncols)
    fig = _new_figure((1.2 * ncols + 0.4, 1.2 * nrows + (0.5 if title else 0.2)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k >= o:
            ax.remove()
            continue
        f = w[k]
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else np.full_like(f, 0.5)
        if i == 3:
            rgb = f.transpose(1, 2, 0)
            ax.imshow(rgb[:, :, ::-1] if bgr_to_rgb else rgb, interpolation="nearest")
        else:
            ax.imshow(f[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        _off(ax)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


# --------------------------------------------------------------------------- maps


def heatmap(
    prob_map: Any,
    title: str | None = None,
    path: PathLike | None = None,
    cmap: str = "viridis",
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """A class-probability map ``H x W`` with a colorbar (2 axes)."""
    m = _as_map(prob_map)
    fig = _new_figure((5.0, 4.0))
    ax = fig.subplots()
    art = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if title:
        ax.set_title(title)
    _off(ax)
    fig.colorbar(art, ax=ax)
    return _finish(fig, path)


def overlay(
    image: Any,
    prob_map: Any,
    alpha: float = 0.5,
    path: PathLike | None = None,
    *,
    windows: Any = None,
    interp: str = "bilinear",
    cmap: str = "jet",
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    show_window: bool = True,
) -> Figure:
    """``prob_map`` over the image (``interp``: nearest/bilinear).

    With ``windows`` (a :class:`fcn_jax.dense.CellWindows`: ``dense.classifier_window``,
    ``dense.receptive_field`` or ``train.window_geometry``) each cell is drawn at its input
    window: a ``stride``-sized tile centred on the window's centre, so the map covers only
    where cells are (CaffeNet at 451 px: pixels 97 .. 352), and, with ``show_window``, the
    window of the highest cell is outlined. Without ``windows`` the map is stretched over
    the whole image, which misplaces the cells of any net whose windows do not tile it.
    Two axes: the image with the map on top, and the map's colorbar.
    """
    im, im_cmap = _display_image(image)
    m = _as_map(prob_map)
    if interp not in ("nearest", "bilinear"):
        raise ValueError(f"interp must be 'nearest' or 'bilinear', got {interp!r}")
    fig = _new_figure((6.0, 6.0 * im.shape[0] / im.shape[1] + 0.6))
    ax = fig.subplots()
    ax.imshow(im, cmap=im_cmap)
    if windows is None:
        art = ax.imshow(_upsample(m, im.shape[:2], interp), cmap=cmap, alpha=alpha,
                        vmin=vmin, vmax=vmax, interpolation="nearest")
    else:
        (sy, sx), (ty, tx), (oy, ox) = windows.size, windows.stride, windows.offset
        # cell (0, 0)'s tile, centred on its window; pixel k spans [k - 0.5, k + 0.5]
        top, left = oy + sy / 2 - ty / 2 - 0.5, ox + sx / 2 - tx / 2 - 0.5
        extent = (left, left + tx * m.shape[1], top + ty * m.shape[0], top)
        art = ax.imshow(m, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=extent,
                        interpolation=interp)
        if show_window:
            from matplotlib.patches import Rectangle

            i, j = np.unravel_index(int(np.argmax(m)), m.shape)
            y0, x0, y1, x1 = windows.window(int(i), int(j))
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="white", linestyle="--", linewidth=1.5,
                                   label=f"window of cell ({i}, {j})"))
            ax.legend(loc="lower right", fontsize="small", framealpha=0.6)
        ax.set_xlim(-0.5, im.shape[1] - 0.5)
        ax.set_ylim(im.shape[0] - 0.5, -0.5)
    if title:
        ax.set_title(title, wrap=True, fontsize="medium")
    _off(ax)
    cbar = fig.colorbar(art, ax=ax, shrink=0.8)
    cbar.solids.set_alpha(1.0)  # an opaque scale even though the overlay is translucent
    return _finish(fig, path)


#: The color of ignored cells (``classification_map_figure(ignore_label=...)``): a neutral
#: grey that no class gets.
IGNORE_COLOR = (0.62, 0.62, 0.62, 1.0)


def classification_map_figure(
    image: Any,
    class_map: Any,
    labels: Sequence[str] | Mapping[int, str] | None = None,
    path: PathLike | None = None,
    *,
    title: str | None = None,
    ignore_label: int | None = None,
) -> Figure:
    """The image and its argmax class map, with a discrete colormap and a legend.

    ``class_map`` is an integer ``H x W`` map, or ``(K, H, W)`` scores whose
    argmax over K is taken.  Only the classes present get a color and a legend
    entry (named by ``labels[c]`` when given, e.g. ``fcn_jax.imagenet_labels()``); the
    colors of the classes shown are pairwise distinct (:func:`class_colors`). Cells equal
    to ``ignore_label`` (a training target's "don't care") are drawn in neutral grey
    (:data:`IGNORE_COLOR`), named "ignore" unless ``labels`` names them.
    """
    cm = np.asarray(class_map)
    while cm.ndim > 3 and cm.shape[0] == 1:
        cm = cm[0]
    if cm.ndim == 3:
        cm = cm.argmax(axis=0)
    if cm.ndim != 2:
        raise ValueError(f"class_map must be H x W or (K, H, W), got shape {np.shape(class_map)}")
    cm = cm.astype(np.int64)
    present = np.unique(cm)
    ignored = ignore_label is not None and int(ignore_label) in present
    palette = class_colors(len(present) - int(ignored))
    if ignored:
        palette.insert(int(np.searchsorted(present, int(ignore_label))), IGNORE_COLOR)
    index = np.searchsorted(present, cm)
    cmap = ListedColormap(palette)
    norm = BoundaryNorm(np.arange(len(present) + 1) - 0.5, len(present))

    im, im_cmap = _display_image(image)
    fig = _new_figure((10.0, 4.5))
    ax_im, ax_map = fig.subplots(1, 2)
    ax_im.imshow(im, cmap=im_cmap)
    ax_im.set_title("image")
    ax_map.imshow(index, cmap=cmap, norm=norm, interpolation="nearest")
    ax_map.set_title(title or "argmax class")
    for ax in (ax_im, ax_map):
        _off(ax)

    def name(c: int) -> str:
        try:
            if labels is not None:
                return f"{c}: {labels[c]}"
        except (IndexError, KeyError):
            pass
        return f"{c}: ignore" if ignored and c == int(ignore_label) else str(c)

    handles = [Patch(color=palette[k], label=name(int(c))) for k, c in enumerate(present)]
    ax_map.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize="small",
        frameon=False,
    )
    return _finish(fig, path)


def class_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` pairwise distinct RGBA colors for the classes of one map, in legend order:
    matplotlib's ``tab10``/``tab20`` for up to 20 classes, beyond that hues spread by the
    golden angle at three lightness levels (distinct by construction, not by class id mod a
    palette size, which gave classes 54 and 314 one color)."""
    import colorsys

    from matplotlib import colormaps

    if n <= 10:
        return [tuple(colormaps["tab10"](k)) for k in range(n)]
    if n <= 20:
        # tab20 lists each hue dark then light: all 10 dark hues first, then the light ones
        order = [2 * k for k in range(10)] + [2 * k + 1 for k in range(10)]
        return [tuple(colormaps["tab20"](order[k])) for k in range(n)]
    out = []
    for k in range(n):
        hue = (k * 0.618033988749895) % 1.0
        light, sat = (0.45, 0.6, 0.32)[k % 3], (0.75, 0.6, 0.9)[k % 3]
        out.append((*colorsys.hls_to_rgb(hue, light, sat), 1.0))
    return out


# --------------------------------------------------------------------------- training


def loss_curve(
    values: Sequence[float] | np.ndarray | Mapping[str, Sequence[float]],
    path: PathLike | None = None,
    title: str | None = None,
    *,
    smooth: int | None = None,
    log_y: bool = False,
    xlabel: str = "iteration",
) -> Figure:
    """Plot a loss curve (one axes); a mapping ``name -> values`` gives several curves.

    ``smooth`` adds a moving average over that many points.
    """
    series = dict(values) if isinstance(values, Mapping) else {"loss": values}
    fig = _new_figure((6.0, 4.0))
    ax = fig.subplots()
    for name, ys in series.items():
        y = np.asarray(ys, dtype=np.float64).ravel()
        x = np.arange(y.size)
        (line,) = ax.plot(x, y, label=name, alpha=0.4 if smooth and smooth > 1 else 1.0)
        if smooth and smooth > 1 and y.size >= smooth:
            avg = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            ax.plot(x[smooth - 1 :], avg, color=line.get_color(), label=f"{name} (avg {smooth})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if len(series) > 1 or (smooth and smooth > 1):
        ax.legend()
    return _finish(fig, path)


def training_curves(
    train_loss: Sequence[float] | np.ndarray,
    eval_curve: Sequence[Mapping[str, Any]],
    path: PathLike | None = None,
    *,
    title: str | None = None,
    smooth: int | None = None,
) -> Figure:
    """The training loss per step with the held-out evaluations at their steps (two axes):
    left, the train loss and the held-out loss; right, held-out mean IoU and cell accuracy.
    ``eval_curve``: ``{"step", "loss", "mean_iou", "cell_accuracy"}`` points, as
    ``fcn-jax finetune`` writes in ``metrics.json``."""
    fig = _new_figure((11.0, 4.0))
    ax_loss, ax_eval = fig.subplots(1, 2)
    y = np.asarray(train_loss, dtype=np.float64).ravel()
    x = np.arange(1, y.size + 1)  # the loss of step s is reported after s steps
    (line,) = ax_loss.plot(x, y, label="train loss", alpha=0.4 if smooth else 1.0)
    if smooth and smooth > 1 and y.size >= smooth:
        avg = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        ax_loss.plot(x[smooth - 1:], avg, color=line.get_color(),
                     label=f"train loss (avg {smooth})")
    steps = [int(p["step"]) for p in eval_curve]
    if eval_curve:
        ax_loss.plot(steps, [p["loss"] for p in eval_curve], "o-", label="held-out loss")
        ax_eval.plot(steps, [p["mean_iou"] for p in eval_curve], "o-", label="mean IoU")
        ax_eval.plot(steps, [p["cell_accuracy"] for p in eval_curve], "s-",
                     label="cell accuracy")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel("held-out")
    ax_eval.set_ylim(0.0, 1.0)
    for ax in (ax_loss, ax_eval):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax_loss.set_title(title or "training loss")
    ax_eval.set_title("held-out evaluation")
    return _finish(fig, path)


def before_after_heatmaps(
    image: Any,
    before: Any,
    after: Any,
    path: PathLike | None = None,
    *,
    titles: Sequence[str] = ("image", "before", "after"),
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """The image and two maps (e.g. before/after fine-tuning) on one shared color scale.

    Four axes: image, before, after, and the shared colorbar.
    """
    if len(titles) != 3:
        raise ValueError("titles needs 3 entries: image, before, after")
    b, a = _as_map(before, "before"), _as_map(after, "after")
    lo = min(b.min(), a.min()) if vmin is None else vmin
    hi = max(b.max(), a.max()) if vmax is None else vmax
    im, im_cmap = _display_image(image)
    fig = _new_figure((13.0, 4.0))
    axes = fig.subplots(1, 3)
    axes[0].imshow(im, cmap=im_cmap)
    art = None
    for ax, m in zip(axes[1:], (b, a), strict=True):
        art = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    for ax, t in zip(axes, titles, strict=True):
        ax.set_title(t)
        _off(ax)
    fig.colorbar(art, ax=list(axes[1:]), shrink=0.9)
    return _finish(fig, path)
