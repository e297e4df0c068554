"""Tests for fcn_jax.viz: every figure renders to a valid PNG with the expected axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from fcn_jax import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RNG = np.random.default_rng(0)
IMAGE = RNG.random((48, 64, 3), dtype=np.float32)
PROB = RNG.random((6, 8))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _check_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 100
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_show_filter_outputs(tmp_path):
    outputs = RNG.standard_normal((1, 3, 48, 64))
    p = tmp_path / "filters_out.png"
    fig = viz.show_filter_outputs(IMAGE[..., 0], outputs, titles=["a", "b", "c"], path=p)
    _check_png(p)
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == ["input", "a", "b", "c"]
    plt.close(fig)
    with pytest.raises(ValueError):
        viz.show_filter_outputs(IMAGE, outputs, titles=["only one"])


@pytest.mark.parametrize("shape, n_axes", [((96, 3, 11, 11), 96), ((5, 1, 5, 5), 5)])
def test_filter_grid(tmp_path, shape, n_axes):
    p = tmp_path / "grid.png"
    w = RNG.standard_normal(shape)
    w[0] = 0.0  # a constant filter must not divide by zero
    fig = viz.filter_grid(w, path=p)
    _check_png(p)
    assert len(fig.axes) == n_axes
    plt.close(fig)


def test_heatmap(tmp_path):
    p = tmp_path / "heat.png"
    fig = viz.heatmap(PROB[np.newaxis], title="p(cat)", path=p)
    _check_png(p)
    assert len(fig.axes) == 2  # map + colorbar
    plt.close(fig)


@pytest.mark.parametrize("interp", ["nearest", "bilinear"])
def test_overlay(tmp_path, interp):
    p = tmp_path / f"overlay_{interp}.png"
    fig = viz.overlay((IMAGE * 255).astype(np.uint8), PROB, alpha=0.4, path=p, interp=interp)
    _check_png(p)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_images()[1].get_array().shape == (48, 64)  # upsampled
    plt.close(fig)


def test_classification_map_figure(tmp_path):
    p = tmp_path / "classes.png"
    class_map = np.zeros((6, 8), dtype=int)
    class_map[2:, 3:] = 7
    class_map[0, 0] = 281
    labels = {0: "background", 7: "cock", 281: "tabby cat"}
    fig = viz.classification_map_figure(IMAGE, class_map, labels=labels, path=p)
    _check_png(p)
    assert len(fig.axes) == 2
    legend = fig.axes[1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "0: background",
        "7: cock",
        "281: tabby cat",
    ]
    plt.close(fig)
    # (K, H, W) scores are reduced with argmax
    fig = viz.classification_map_figure(IMAGE, RNG.random((3, 6, 8)))
    assert len(fig.axes) == 2
    plt.close(fig)


def test_loss_curve(tmp_path):
    p = tmp_path / "loss.png"
    fig = viz.loss_curve(np.exp(-np.linspace(0, 3, 50)), path=p, title="loss", smooth=5)
    _check_png(p)
    assert len(fig.axes) == 1
    plt.close(fig)
    fig = viz.loss_curve({"train": [3, 2, 1], "val": [3.5, 2.5, 2]}, log_y=True)
    assert len(fig.axes[0].get_lines()) == 2
    plt.close(fig)


def test_before_after_heatmaps(tmp_path):
    p = tmp_path / "before_after.png"
    fig = viz.before_after_heatmaps(IMAGE, PROB, PROB**2, path=p)
    _check_png(p)
    assert len(fig.axes) == 4  # image, before, after, shared colorbar
    before, after = (ax.get_images()[0] for ax in fig.axes[1:3])
    assert before.get_clim() == after.get_clim()
    plt.close(fig)


def test_no_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = viz.heatmap(PROB)
    assert list(tmp_path.iterdir()) == []
    plt.close(fig)


def test_classification_map_legend_colors_are_distinct_and_named(tmp_path):
    """Classes 54/314, 186/626 and 615/875 shared a color (id mod 20); now every class shown
    has its own, and ImageNet names label them."""
    import fcn_jax

    names = fcn_jax.imagenet_labels(short=True)
    classes = [54, 314, 186, 626, 615, 875, 281]
    class_map = np.array(classes * 6).reshape(6, 7)
    fig = viz.classification_map_figure(IMAGE, class_map, labels=names)
    legend = fig.axes[1].get_legend()
    colors = [tuple(np.round(h.get_facecolor(), 6)) for h in legend.legend_handles]
    assert len(set(colors)) == len(classes)
    assert "281: tabby" in [t.get_text() for t in legend.get_texts()]
    plt.close(fig)
    for n in (3, 12, 20, 64, 300):
        rgb = {tuple(np.round(c[:3], 6)) for c in viz.class_colors(n)}
        assert len(rgb) == n, n


def test_overlay_places_each_cell_at_its_window(tmp_path):
    """Issue 20 item 4: CaffeNet's 8x8 map on a 451 px input has cell j's window at
    [32 j, 32 j + 227): its centre is pixel 113 + 32 j, so the map spans pixels 97..352
    (stretched over the image, the edge cells landed ~85 px off)."""
    from fcn_jax.dense import CellWindows

    win = CellWindows(size=(227, 227), stride=(32, 32))
    m = np.zeros((8, 8))
    m[2, 5] = 1.0
    p = tmp_path / "o.png"
    fig = viz.overlay(np.zeros((451, 451, 3), np.float32), m, windows=win, path=p)
    _check_png(p)
    ax = fig.axes[0]
    left, right, bottom, top = ax.get_images()[1].get_extent()
    # tile j spans 113 + 32 j +- 16 in plot coordinates (pixel k's centre is at k)
    assert (left, right, top, bottom) == (97, 353, 97, 353)
    assert ax.get_xlim() == (-0.5, 450.5)  # the whole image stays in view
    (rect,) = ax.patches  # the top cell's window: rows 64..290, columns 160..386
    assert rect.get_xy() == (160 - 0.5, 64 - 0.5) and rect.get_width() == 227
    # a padded receptive field (negative offset) shifts the tiles
    fig = viz.overlay(np.zeros((100, 100)), np.ones((3, 3)), windows=CellWindows(
        size=(11, 11), stride=(4, 4), offset=(-5, -5)), show_window=False)
    # cell 0 sees pixels -5..5: its tile is 0 +- 2
    assert fig.axes[0].get_images()[1].get_extent()[0] == -2
    assert not fig.axes[0].patches


def test_classification_map_ignore_cells_are_grey():
    cm = np.array([[0, 1, 255], [255, 2, 0]])
    fig = viz.classification_map_figure(IMAGE, cm, ["bg", "a", "b"], ignore_label=255)
    legend = fig.axes[1].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["0: bg", "1: a", "2: b", "255: ignore"]
    colors = [tuple(h.get_facecolor()) for h in legend.legend_handles]
    assert colors[-1] == viz.IGNORE_COLOR and viz.IGNORE_COLOR not in colors[:-1]
    assert colors[:3] == viz.class_colors(3)  # the classes keep their usual colors


def test_training_curves_put_the_evaluations_at_their_steps(tmp_path):
    curve = [{"step": 0, "loss": 1.2, "mean_iou": 0.1, "cell_accuracy": 0.5},
             {"step": 10, "loss": 0.8, "mean_iou": 0.4, "cell_accuracy": 0.7}]
    p = tmp_path / "curves.png"
    fig = viz.training_curves(np.linspace(1.0, 0.5, 10), curve, p)
    _check_png(p)
    ax_loss, ax_eval = fig.axes
    train, held = ax_loss.get_lines()
    assert list(train.get_xdata()) == list(range(1, 11))  # loss of step s after s steps
    assert list(held.get_xdata()) == [0, 10] and list(held.get_ydata()) == [1.2, 0.8]
    iou, acc = ax_eval.get_lines()
    assert list(iou.get_ydata()) == [0.1, 0.4] and list(acc.get_ydata()) == [0.5, 0.7]
