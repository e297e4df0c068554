"""``fcn-jax demo``: Caffe's net surgery tutorial end to end, offline, on embedded defaults.

1. Designer filters on a gray photo (scikit-image's ``chelsea`` cat unless ``--image``): the
   tutorial's one-convolution net with random filters, bias surgery (pre/post means), then a
   Gaussian blur and Sobel filters written into it.
2. CaffeNet classifier -> fully convolutional net: the prototxt cast, the params transplant
   (fc6 (4096, 9216) coerced to fc6-conv (4096, 256, 6, 6)), saved as prototxt + caffemodel.
3. Dense inference on the 451x451 photo: the 8x8 classification map, the probability map of
   one class (281, tabby cat) as heatmap and overlay, and the check of each cell against the
   classifier on its 227x227 crop.

Without ``--weights`` CaffeNet is random (seeded ``fcn_jax.CaffeNet`` init) and the maps show
the mechanics only; with ``bvlc_reference_caffenet.caffemodel`` they are the real thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import converters

from . import netdef as fcn_net
from .assets import default_labels

#: The tutorial's single-convolution net (Caffe's examples/net_surgery/conv.prototxt).
CONV_PROTOTXT = """name: "convolution"
layer { name: "data" type: "Input" top: "data"
        input_param { shape: { dim: 1 dim: 1 dim: 100 dim: 100 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 5 stride: 1
          weight_filler { type: "gaussian" std: 0.01 }
          bias_filler { type: "constant" value: 0 } } }
"""

#: A few ImageNet class names (the tutorial's cat classes); a net with 1000 outputs is named
#: from the shipped synset words (``fcn_jax.assets.imagenet_labels``).
CLASS_NAMES = {281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
               285: "Egyptian cat"}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (``widths`` other than CaffeNet's are for quick tests)."""

    out: str
    weights: str | None = None
    image: str | None = None
    class_index: int = 281
    size: int = 451
    seed: int = 0
    widths: tuple[int, ...] | None = None  # None: CaffeNet's (fcn_jax.CAFFENET_WIDTHS)
    crop_check: bool = True

    def caffenet_widths(self) -> tuple[int, ...]:
        """The widths of the random CaffeNet: ``widths`` or CaffeNet's own."""
        from .caffenet import CAFFENET_WIDTHS

        return tuple(self.widths) if self.widths else CAFFENET_WIDTHS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fcn-jax demo`` options."""
    p.add_argument("--out", required=True, metavar="DIR", help="folder for figures and files")
    p.add_argument("--weights", metavar="CAFFEMODEL",
                   help="bvlc_reference_caffenet.caffemodel (default: a seeded random CaffeNet)")
    p.add_argument("--image", metavar="PATH", help="photo to use (default: scikit-image's cat)")
    p.add_argument("--class", dest="class_index", type=int, default=281,
                   help="class whose probability map is drawn (default: 281, tabby cat)")
    p.add_argument("--size", type=int, default=451, help="FCN input size (default: 451)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--no-crop-check", dest="crop_check", action="store_false",
                   help="skip running the classifier on every cell's 227x227 crop")
    p.add_argument("--widths", type=int, nargs=7, default=None,
                   help=argparse.SUPPRESS)  # narrow random CaffeNets for tests


class DemoError(ValueError):
    """A demo option that cannot work (reported as one line by ``fcn-jax demo``)."""


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``fcn-jax demo``."""
    import sys

    cfg = DemoConfig(out=args.out, weights=args.weights, image=args.image,
                     class_index=args.class_index, size=args.size, seed=args.seed,
                     widths=tuple(args.widths) if args.widths else None,
                     crop_check=args.crop_check)
    try:
        demo(cfg)
    except DemoError as e:
        print(f"fcn-jax demo: error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- printing


def _shape(s: Sequence[int]) -> str:
    return str(tuple(int(d) for d in s))


def table(title: str, rows: Sequence[Sequence[str]], emit: Callable[[str], None]) -> None:
    """Print ``rows`` as an aligned table under ``title``."""
    emit(f"\n{title}")
    if not rows:
        return
    ncol = max(len(r) for r in rows)
    rows = [list(r) + [""] * (ncol - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    for r in rows:
        emit("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def blob_table(shapes: Mapping[str, Sequence[int]]) -> list[list[str]]:
    """Rows ``[blob, shape]``."""
    return [[k, _shape(v)] for k, v in shapes.items()]


def param_table(params: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Rows ``[layer, "weight (..)", "bias (..)"]`` in the tutorial's order."""
    return [[k] + [f"{n} {_shape(np.shape(a))}" for n, a in v.items()]
            for k, v in params.items()]


# ----------------------------------------------------------------------------- steps


def load_images(path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(RGB float32 [0, 1] H x W x 3, gray float32 H x W, description)."""
    from .preprocess import load_image

    if path is None:
        import skimage.data

        rgb = (skimage.data.chelsea().astype(np.float32) / np.float32(255.0))
        desc = "scikit-image's chelsea (a tabby cat), 300x451"
    else:
        rgb = load_image(path, color=True)
        desc = f"{path}, {rgb.shape[0]}x{rgb.shape[1]}"
    from skimage.color import rgb2gray

    gray = rgb2gray(rgb).astype(np.float32)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(gray), desc


def designer_filters(gray: np.ndarray, out: str, seed: int,
                     emit: Callable[[str], None]) -> dict[str, Any]:
    """The tutorial's first half: random filters, bias surgery, Gaussian + Sobel."""
    from . import surgery, viz, xla
    from .net import blob_names

    net = converters.parse_prototxt(CONV_PROTOTXT)
    shape = (1, 1) + gray.shape
    module, params = converters.load_caffe(net, input_shape=shape, seed=seed)
    x = gray[np.newaxis, np.newaxis]
    forward = xla.jit(lambda p: module.apply({"params": p}, x))
    blobs = forward(params)
    emit("\n== 1. designer filters: the one-convolution net (Caffe's conv.prototxt) ==")
    table("blobs", blob_table({k: blobs[k].shape for k in blob_names(module)}), emit)
    table("params", param_table(params), emit)
    viz.show_filter_outputs(gray, np.asarray(blobs["conv"][0]),
                            path=os.path.join(out, "01_random_filters.png"))

    pre = float(np.asarray(blobs["conv"][0, 0]).mean())
    biased = surgery.set_bias(params, "conv", 0, 1.0)
    post = float(np.asarray(forward(biased)["conv"][0, 0]).mean())
    emit(f"\nbias surgery: conv bias[0] = 1\n  pre-surgery output mean {pre:.2f}\n"
         f"  post-surgery output mean {post:.2f}")

    ksize = np.shape(params["conv"]["weight"])[2:]
    designed = surgery.set_filter(biased, "conv", 0, surgery.gaussian_kernel(ksize, 1.0))
    designed = surgery.set_filter(designed, "conv", 1, surgery.sobel_y(), channel=0)
    designed = surgery.set_filter(designed, "conv", 2, surgery.sobel_x(), channel=0)
    conv = np.asarray(forward(designed)["conv"][0])
    viz.show_filter_outputs(gray, conv, titles=["Gaussian blur", "Sobel y (horizontal edges)",
                                                "Sobel x (vertical edges)"],
                            path=os.path.join(out, "02_designer_filters.png"))
    emit("designer filters: filter 0 = 5x5 Gaussian (sigma 1), 1 = Sobel y, 2 = Sobel x")
    return {"pre_surgery_mean": pre, "post_surgery_mean": post,
            "designer_weight": np.asarray(designed["conv"]["weight"])}


def caffenet_params(cfg: DemoConfig, emit: Callable[[str], None]) -> tuple[Any, dict]:
    """The classifier's NetParameter and params: from ``cfg.weights`` or seeded random."""
    import jax
    import jax.numpy as jnp

    from .caffenet import CaffeNet, caffenet_prototxt

    if cfg.weights:
        stored = converters.load_caffemodel(cfg.weights)
        missing = [k for k in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7",
                               "fc8") if k not in stored]
        if missing:
            raise converters.CaffeFormatError(f"not a CaffeNet: no layers {missing}",
                                              path=cfg.weights)
        net = converters.parse_prototxt(caffenet_prototxt(
            widths=_widths(stored), num_classes=int(np.shape(stored["fc8"]["weight"])[0]),
            input_shape=(1, 3, 227, 227)))
        _, params = converters.load_caffe(net, stored)
        emit(_weights_note(cfg))
        return net, params
    widths = cfg.caffenet_widths()
    net = converters.parse_prototxt(caffenet_prototxt(widths=widths,
                                                      input_shape=(1, 3, 227, 227)))
    from .surgery import map_params

    module = CaffeNet(widths=widths)
    variables = jax.jit(module.init)(jax.random.PRNGKey(cfg.seed),
                                     jnp.zeros((1, 3, 227, 227), jnp.float32))
    # CaffeNet's training fillers (std 0.01 / 0.005) make an untrained net's outputs flat;
    # rescale the weights to He-normal variance (conv1 also divided by the input's ~64 std)
    # and zero the biases, so that the maps have structure.
    params = map_params(dict(variables["params"]), _he_rescale,
                        lambda path: path[-1] == "weight")
    params = map_params(params, lambda w: w / 64.0, lambda path: path == ("conv1", "weight"))
    params = map_params(params, lambda b: b * 0, lambda path: path[-1] == "bias")
    params = jax.tree_util.tree_map(np.asarray, params)
    emit(_weights_note(cfg))
    return net, params


def _weights_note(cfg: DemoConfig) -> str:
    """Where the CaffeNet weights come from, in one line."""
    if cfg.weights:
        return f"CaffeNet weights: {cfg.weights}"
    return (f"CaffeNet weights: RANDOM -- fcn_jax.CaffeNet init (seed {cfg.seed}), weights "
            "rescaled to He-normal variance and biases zeroed with surgery.map_params. No "
            "--weights was given, so the maps below show the mechanics, not real predictions.")


def _label(labels: Sequence[str] | Mapping[int, str], c: int) -> str:
    """The name of class ``c``, or ``class c``."""
    try:
        return labels[c]
    except (IndexError, KeyError):
        return f"class {c}"


def _he_rescale(w: Any) -> Any:
    """Gaussian weights rescaled to std sqrt(2 / fan_in)."""
    import jax.numpy as jnp

    fan_in = int(np.prod(w.shape[1:]))
    return w * (jnp.sqrt(2.0 / fan_in) / jnp.std(w))


def demo(cfg: DemoConfig, emit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole tutorial; writes figures, the FCN files and ``summary.json`` to
    ``cfg.out`` and returns the summary."""
    from tqdm.auto import tqdm

    from . import dense, surgery, viz, xla
    from .io_utils import atomic_save_json
    from .net import blob_names, build_module, expected_param_shapes
    from .preprocess import caffe_transformer, deprocess, imagenet_mean_bgr, preprocess

    emit = emit or (lambda s: tqdm.write(s))
    # every argument is checked (and the weights read) before any work or output
    if cfg.size < 227:
        raise DemoError(f"--size {cfg.size} is smaller than CaffeNet's 227x227 window")
    for option, path in (("--weights", cfg.weights), ("--image", cfg.image)):
        if path is not None and not os.path.isfile(path):
            raise DemoError(f"{option} {path}: no such file")
    t0 = time.perf_counter()
    rgb, gray, desc = load_images(cfg.image)
    clf_net, clf_params = caffenet_params(cfg, lambda _: None)
    n_classes = int(np.shape(clf_params["fc8"]["weight"])[0])
    if not 0 <= cfg.class_index < n_classes:
        raise DemoError(f"--class {cfg.class_index} is out of range: the net has {n_classes} "
                        "classes")
    labels = default_labels(n_classes, short=True) or CLASS_NAMES
    os.makedirs(cfg.out, exist_ok=True)
    summary: dict[str, Any] = {"weights": cfg.weights or f"random (seed {cfg.seed})"}
    emit(f"fcn-jax net surgery demo -- image: {desc}; output folder: {cfg.out}")
    if not cfg.weights:
        emit("NOTE: no --weights: CaffeNet is RANDOM (seeded); pass --weights "
             "bvlc_reference_caffenet.caffemodel for the real classification map.")
    summary.update({k: v for k, v in designer_filters(gray, cfg.out, cfg.seed, emit).items()
                    if k != "designer_weight"})

    steps = tqdm(total=5, desc="CaffeNet surgery", unit="step", leave=False, disable=None)
    emit("\n== 2. casting the CaffeNet classifier into a fully convolutional net ==")
    emit(_weights_note(cfg))
    steps.update()
    plan = fcn_net.fully_conv_plan(clf_net)
    for c in plan.casts:
        emit(f"{c.name} weights are {_shape(np.shape(clf_params[c.name]['weight']))} dimensional "
             f"and biases are {_shape(np.shape(clf_params[c.name]['bias']))} dimensional")

    steps.set_postfix_str("cast + transplant")
    fcn_shape = (1, 3, cfg.size, cfg.size)
    full_net = fcn_net.fully_convolutional_net(clf_net, fcn_shape)
    fcn_module = build_module(full_net)
    shapes = expected_param_shapes(fcn_module, fcn_shape)
    fresh = {k: {n: np.zeros(s, np.float32) for n, s in v.items()} for k, v in shapes.items()}
    for c in plan.casts:
        emit(f"{c.new_name} weights are {_shape(shapes[c.new_name]['weight'])} dimensional "
             f"and biases are {_shape(shapes[c.new_name]['bias'])} dimensional")
    fcn_params, report = surgery.transplant(fresh, clf_params, rename=plan.renames)
    emit("\ntransplant (classifier -> fully convolutional):")
    for line in report.lines():
        emit("  " + line)
    cast = surgery.fc_to_conv(clf_params, clf_net)
    same = all(np.array_equal(np.asarray(cast[k][n]), np.asarray(fcn_params[k][n]))
               for k in cast for n in cast[k])
    emit(f"fc_to_conv gives the same params bit for bit: {same}")
    steps.update()

    steps.set_postfix_str("save")
    proto_path = os.path.join(cfg.out, "caffenet_full_conv.prototxt")
    model_path = os.path.join(cfg.out, "caffenet_full_conv.caffemodel")
    np_params = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in fcn_params.items()}
    converters.write_prototxt(proto_path, full_net)
    converters.save_caffemodel(model_path, np_params, full_net)
    emit(f"saved {proto_path} and {model_path} "
         f"({os.path.getsize(model_path) / 2**20:.1f} MiB)")
    steps.update()

    steps.set_postfix_str(f"dense forward {cfg.size}x{cfg.size}")
    module, loaded = converters.load_caffe(proto_path, model_path)
    tf = caffe_transformer(fcn_shape, mean=imagenet_mean_bgr())
    x = preprocess(tf, rgb)[np.newaxis]
    blobs = xla.jit(module.apply)({"params": loaded}, x)
    table("blobs of the fully convolutional net",
          blob_table({k: blobs[k].shape for k in blob_names(module)}), emit)
    table("params of the fully convolutional net", param_table(loaded), emit)
    prob = np.asarray(blobs["prob"][0])
    cmap = np.asarray(dense.classification_map(prob))
    emit(f"\nclassification map (argmax class at each of the {cmap.shape[0]}x{cmap.shape[1]} "
         "locations):")
    for row in cmap:
        emit("  " + " ".join(f"{int(c):4d}" for c in row))
    ci = cfg.class_index
    pmap = np.asarray(dense.class_probability_map(prob, ci))
    name = _label(labels, ci)
    emit(f"P({ci} {name}): min {pmap.min():.3g}, max {pmap.max():.3g} "
         f"(uniform would be {1 / prob.shape[0]:.3g})")
    steps.update()

    shown = deprocess(tf, x[0])
    tag = "" if cfg.weights else " [RANDOM weights]"
    viz.heatmap(pmap, title=f"P({ci} {name}){tag}",
                path=os.path.join(cfg.out, f"03_prob_{ci}.png"))
    viz.overlay(shown, pmap, path=os.path.join(cfg.out, f"04_overlay_{ci}.png"),
                windows=dense.classifier_window(clf_net),
                title=f"P({ci} {name}) over the {cfg.size}x{cfg.size} input, each cell at "
                      f"its window{tag}")
    viz.classification_map_figure(shown, cmap, labels=labels,
                                  path=os.path.join(cfg.out, "05_classification_map.png"),
                                  title=f"argmax class{tag}")
    viz.filter_grid(np.asarray(loaded["conv1"]["weight"]),
                    path=os.path.join(cfg.out, "06_conv1_filters.png"),
                    title=f"conv1 filters{tag}")

    summary.update({"classification_map": cmap.tolist(), "class_index": ci,
                    "class_prob_min": float(pmap.min()), "class_prob_max": float(pmap.max()),
                    "transplant": report.lines(), "fc_to_conv_matches_transplant": same,
                    "prototxt": proto_path, "caffemodel": model_path})
    if cfg.crop_check:
        steps.set_postfix_str("classifier on every crop")
        summary["crop_check"] = crop_check(clf_net, clf_params, x, prob, emit)
    steps.update()
    steps.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_save_json(os.path.join(cfg.out, "summary.json"), summary)
    emit(f"\nwrote figures, FCN files and summary.json to {cfg.out} "
         f"in {summary['seconds']:.1f} s")
    return summary


def crop_check(clf_net: Any, clf_params: Mapping, x: np.ndarray, prob: np.ndarray,
               emit: Callable[[str], None], batch: int = 16) -> dict[str, float]:
    """Run the classifier on every cell's crop and compare with the dense map."""
    from tqdm.auto import tqdm

    from . import dense, xla
    from .caffenet import CaffeNet

    windows = dense.classifier_window(clf_net)
    crops = dense.cell_crops(x, windows)[0]  # (gh, gw, C, h, w)
    gh, gw = crops.shape[:2]
    flat = crops.reshape((gh * gw,) + crops.shape[2:])
    module = CaffeNet(widths=_widths(clf_params),
                      num_classes=int(np.shape(clf_params["fc8"]["weight"])[0]))
    fwd = xla.jit(lambda p, c: module.apply({"params": p}, c)["prob"])
    outs = []
    for i in tqdm(range(0, len(flat), batch), desc="classifier on crops", leave=False,
                  disable=None):
        outs.append(np.asarray(fwd(clf_params, flat[i:i + batch])))
    crop_prob = np.concatenate(outs).reshape(gh, gw, -1).transpose(2, 0, 1)
    dense_prob = prob[:, :gh, :gw]
    agree = float((crop_prob.argmax(0) == dense_prob.argmax(0)).mean())
    rel = float(np.abs(crop_prob - dense_prob).max() / np.abs(crop_prob).max())
    emit(f"\ncell (i, j) vs the classifier on the {windows.size[0]}x{windows.size[1]} crop "
         f"at ({windows.stride[0]} i, {windows.stride[1]} j), {gh}x{gw} cells: argmax agrees "
         f"at {agree:.0%} of cells, max rel diff of prob {rel:.2e}\n  (not 0: CaffeNet's "
         "padded conv2..conv5 see zeros at a crop's border where the full image has "
         "neighbours; see fcn_jax.dense)")
    return {"argmax_agreement": agree, "max_rel_diff": rel, "cells": gh * gw}


def _widths(params: Mapping) -> tuple[int, ...]:
    convs = [int(np.shape(params[f"conv{i}"]["weight"])[0]) for i in range(1, 6)]
    return tuple(convs + [int(np.shape(params["fc6"]["weight"])[0]),
                          int(np.shape(params["fc7"]["weight"])[0])])


__all__ = ["CLASS_NAMES", "CONV_PROTOTXT", "DemoConfig", "DemoError", "add_arguments", "demo",
           "designer_filters", "run_demo"]
