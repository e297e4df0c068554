"""Caffe's net surgery tutorial (examples/net_surgery.ipynb), step by step, with fcn-jax,
checked against real Caffe's outputs where we have them; then the dense-vs-crop border effect.

Steps (each prints what the notebook prints, plus the error against real Caffe):
  1. designer filters: conv.prototxt on cat_gray.jpg, random filters, bias[0] = 1
     (pre/post-surgery means), Gaussian + Sobel; vs tutorial_designer_filters.npz
  2. casting the classifier: deploy.prototxt -> the fully convolutional prototxt (vs the
     tutorial's bvlc_caffenet_full_conv.prototxt), the fc params transplanted and saved;
  3. dense map: cat.jpg preprocessed like the tutorial at 451x451, the 8x8 classification
     map; with caffenet_mini (real Caffe's blobs exist) every blob is compared;
  4. border effect: each FCN cell vs the classifier on its 227x227 crop (CaffeNet pads, so
     they differ near crop borders), for caffenet_mini, a pad-free CaffeNet (exact) and a
     random full-size CaffeNet; plus the time of one 451 FCN pass vs 64 crops.

Without --weights the CaffeNet part uses caffenet_mini (real-Caffe-written weights of a
narrow CaffeNet, tests/data); --weights bvlc_reference_caffenet.caffemodel runs the real one.
Prints tables and writes results/net_surgery.json; --docs-figures also writes the README
figures to docs/figures/.

    python experiments/net_surgery.py [--weights CAFFEMODEL] [--no-full] [--docs-figures]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import converters
from fcn_jax import CaffeNet, caffenet_prototxt, dense, surgery, viz
from fcn_jax import netdef as F
from fcn_jax.io_utils import atomic_save_json, atomic_savefig
from fcn_jax.net import blob_names
from fcn_jax.preprocess import caffe_transformer, imagenet_mean_bgr, load_image, preprocess

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SHARED = ROOT.parent / "shared" / "caffe-reference"


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (the reference data's tolerance measure)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def source(name: str) -> Path:
    for d in (DATA / "source", SHARED / "source"):
        if (d / name).exists():
            return d / name
    raise FileNotFoundError(name)


def timed(fn, runs: int = 3) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------- 1


def designer_filters(results: dict, docs: bool) -> None:
    print("== 1. designer filters ==")
    net = converters.read_prototxt(source("conv.prototxt"))
    im = load_image(source("cat_gray.jpg"), color=False)[:, :, 0]
    x = im[np.newaxis, np.newaxis]
    module, params = converters.load_caffe(net, input_shape=x.shape)
    fwd = jax.jit(lambda p: module.apply({"params": p}, x))
    print(f"blobs {blob_names(module)}\nparams {list(params)}")
    ref_path = DATA / "tutorial" / "tutorial_designer_filters.npz"
    ref = np.load(ref_path) if ref_path.exists() else None
    if ref is not None:  # Caffe's random filler draw, to compare outputs
        params = {"conv": {"weight": ref["random_weight"], "bias": np.zeros(3, np.float32)}}
        print(f"image vs caffe.io.load_image: max abs diff "
              f"{np.abs(im - ref['image_gray']).max():.2e}")
    rows = []
    conv0 = np.asarray(fwd(params)["conv"][0, 0])
    print(f"pre-surgery output mean {conv0.mean():.2f}")
    stages = {"random_conv": params}
    params = surgery.set_bias(params, "conv", 0, 1.0)
    conv0 = np.asarray(fwd(params)["conv"][0, 0])
    print(f"post-surgery output mean {conv0.mean():.2f}")
    results["pre_post_surgery_mean"] = [float(np.asarray(fwd(stages["random_conv"])["conv"][0, 0])
                                              .mean()), float(conv0.mean())]
    stages["bias1_conv"] = params
    ksize = params["conv"]["weight"].shape[2:]
    params = surgery.set_filter(params, "conv", 0, surgery.gaussian_kernel(ksize, 1.0))
    params = surgery.set_filter(params, "conv", 1, surgery.sobel_y(), channel=0)
    params = surgery.set_filter(params, "conv", 2, surgery.sobel_x(), channel=0)
    stages["designer_conv"] = params
    if ref is not None:
        for name, p in stages.items():
            out = np.asarray(fwd(p)["conv"])[..., ::5, ::5]
            rows.append((name, rel_err(out, ref[name + "_s5"])))
        rows.append(("designer_weight (bitwise)", float(not np.array_equal(
            np.asarray(params["conv"]["weight"]), ref["designer_weight"]))))
        print("vs real Caffe (max rel err):")
        for name, err in rows:
            print(f"  {name:<28} {err:.2e}")
        results["designer_filters_vs_caffe"] = dict(rows)
    conv = np.asarray(fwd(params)["conv"][0])
    if docs:
        fig = viz.show_filter_outputs(im, conv, titles=["Gaussian blur", "Sobel y",
                                                        "Sobel x"])
        atomic_savefig(fig, ROOT / "docs" / "figures" / "designer_filters.png", dpi=80)


# ----------------------------------------------------------------------------- 2, 3


def cast_and_dense(args, results: dict, docs: bool) -> dict:
    print("\n== 2. casting a classifier into a fully convolutional network ==")
    if args.weights:
        deploy, weights, ref = source("deploy.prototxt"), Path(args.weights), None
    else:
        mini = DATA / "caffenet_mini"
        deploy, weights = mini / "caffenet_mini_deploy.prototxt", mini / "caffenet_mini.caffemodel"
        ref = np.load(mini / "caffenet_mini_full_conv_blobs.npz")
        print("(no --weights: caffenet_mini, a narrow CaffeNet whose blobs real Caffe computed)")
    net = converters.read_prototxt(deploy)
    params = converters.load_caffemodel(weights)
    for fc in ("fc6", "fc7", "fc8"):
        print(f"{fc} weights are {params[fc]['weight'].shape} dimensional and biases are "
              f"{params[fc]['bias'].shape} dimensional")
    full = F.fully_convolutional_net(net, (1, 3, 451, 451))
    if args.weights:
        same = full == converters.read_prototxt(source("bvlc_caffenet_full_conv.prototxt"))
    else:
        same = full == converters.read_prototxt(
            DATA / "caffenet_mini" / "caffenet_mini_full_conv.prototxt")
    print(f"fully convolutional prototxt identical to the tutorial's: {same}")
    results["prototxt_identical"] = bool(same)
    plan = F.fully_conv_plan(net)
    for c in plan.casts:
        print(f"{c.new_name} weights are {c.weight_shape} dimensional and biases are "
              f"({c.num_output},) dimensional")
    conv_params = surgery.fc_to_conv(params, net)
    with tempfile.TemporaryDirectory() as tmp:
        proto, model = Path(tmp) / "full_conv.prototxt", Path(tmp) / "full_conv.caffemodel"
        converters.write_prototxt(proto, full)
        converters.save_caffemodel(model, {k: {n: np.asarray(a) for n, a in v.items()}
                                           for k, v in conv_params.items()}, full)
        module, loaded = converters.load_caffe(proto, model)

    print("\n== 3. dense classification map on cat.jpg at 451x451 ==")
    tf = caffe_transformer((3, 451, 451), mean=imagenet_mean_bgr())
    x = preprocess(tf, load_image(source("cat.jpg")))[np.newaxis]
    fwd = jax.jit(module.apply)
    blobs = fwd({"params": loaded}, x)
    cmap = np.asarray(dense.classification_map(blobs["prob"][0]))
    print(cmap)
    results["classification_map"] = cmap.tolist()
    if ref is not None:
        print(f"preprocessed cat.jpg vs the reference input: max rel err "
              f"{rel_err(x, ref['data']):.2e}")
        errs = {name: rel_err(blobs[name], ref[name]) for name in ref.files}
        print("every blob vs real Caffe (max rel err):")
        for name, err in errs.items():
            print(f"  {name:<10} {err:.2e}")
        info = json.loads((DATA / "caffenet_mini" / "caffenet_mini_info.json").read_text())
        agree = float((cmap == np.array(info["classification_map"])).mean())
        print(f"classification map equal to Caffe's at {agree:.0%} of cells")
        results["dense_vs_caffe"] = errs
        results["class_map_agreement_with_caffe"] = agree
    if docs:
        docs_dense_figure(x, blobs, net)
    return {"net": net, "params": params, "x": x, "module": module, "loaded": loaded}


def docs_dense_figure(x: np.ndarray, blobs: dict, net) -> None:
    """The image with three cells' classifier windows and one cell's receptive field."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from fcn_jax.preprocess import deprocess

    tf = caffe_transformer((3, 451, 451), mean=imagenet_mean_bgr())
    img = np.clip(deprocess(tf, x[0]), 0, 1)
    win = dense.classifier_window(net)
    rf = dense.receptive_field(F.fully_convolutional_net(net, (1, 3, 451, 451)))
    fig = Figure(figsize=(4.6, 4.9), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(img)
    for (i, j), color in (((0, 0), "tab:red"), ((3, 4), "tab:orange"), ((7, 7), "tab:cyan")):
        y0, x0, y1, x1 = win.window_of(i, j)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=2,
                               ec=color))
        ax.text(x0 + 5, y0 + 18, f"cell ({i}, {j})", color=color, fontsize=8, weight="bold")
    y0, x0, y1, x1 = rf.window(3, 4)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.5,
                           ec="tab:orange", ls="--"))
    ax.set_xlim(-70, 521)
    ax.set_ylim(521, -70)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("451x451 input -> 8x8 cells. Cell (i, j) = the classifier on the\n"
                 "227 px crop at (32i, 32j); dashed: receptive field of (3, 4), 355 px", fontsize=8)
    atomic_savefig(fig, ROOT / "docs" / "figures" / "dense_windows.png", dpi=85)


# ----------------------------------------------------------------------------- 4


def border_effect(name: str, clf_net, params, x: np.ndarray, results: dict,
                  time_it: bool = False) -> None:
    """FCN cells vs the classifier on every cell's crop: argmax agreement, max rel diff."""
    full = F.fully_convolutional_net(clf_net, x.shape)
    fmod, fparams = converters.load_caffe(full, surgery.fc_to_conv(params, clf_net))
    win = dense.classifier_window(clf_net)
    gh, gw = win.grid(x.shape[2:])
    crops = dense.cell_crops(x, win)[0].reshape((gh * gw,) + (x.shape[1],) + win.size)
    cmod, cparams = converters.load_caffe(clf_net, params, input_shape=(16,) + crops.shape[1:])
    ffwd = jax.jit(lambda p, x: fmod.apply({"params": p}, x, outputs=("prob", "fc8-conv")))
    cfwd = jax.jit(lambda p, c: cmod.apply({"params": p}, c, outputs=("prob", "fc8")))
    fb = ffwd(fparams, x)
    outs = [cfwd(cparams, crops[i:i + 16]) for i in range(0, len(crops), 16)]
    cb = {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in ("prob", "fc8")}
    row = {"window": list(win.size), "stride": list(win.stride), "cells": gh * gw}
    for ours, theirs in (("fc8-conv", "fc8"), ("prob", "prob")):
        cells = np.asarray(fb[ours][0, :, :gh, :gw]).transpose(1, 2, 0).reshape(gh * gw, -1)
        row[f"{theirs}_max_rel_diff"] = rel_err(cells, cb[theirs])
    cells = np.asarray(fb["prob"][0, :, :gh, :gw]).transpose(1, 2, 0).reshape(gh * gw, -1)
    row["argmax_agreement"] = float((cells.argmax(1) == cb["prob"].argmax(1)).mean())
    if time_it:
        row["fcn_seconds"] = timed(lambda: ffwd(fparams, x)["prob"])
        row["crops_seconds"] = timed(lambda: [cfwd(cparams, crops[i:i + 16])["prob"]
                                              for i in range(0, len(crops), 16)][-1], runs=1)
    results.setdefault("border_effect", {})[name] = row
    extra = (f"  FCN {row['fcn_seconds']:.2f} s vs {gh * gw} crops {row['crops_seconds']:.2f} s"
             if time_it else "")
    print(f"  {name:<34} {row['window'][0]:>4} {gh}x{gw:<3} {row['fc8_max_rel_diff']:9.2e} "
          f"{row['prob_max_rel_diff']:9.2e} {row['argmax_agreement']:8.0%}{extra}")


def random_params(net, seed: int, he: bool = True) -> dict:
    """He-normal weights (std sqrt(2/fan_in)), zero biases, for a net's params tree."""
    _, params = converters.load_caffe(net)
    rng = np.random.default_rng(seed)
    return {k: {n: (rng.standard_normal(a.shape, dtype=np.float32) * np.float32(
        np.sqrt(2.0 / max(1, a[0].size))) if n == "weight" else np.zeros(a.shape, np.float32))
        for n, a in v.items()} for k, v in params.items()}


def border_effects(args, results: dict, ctx: dict) -> None:
    print("\n== 4. FCN cell (i, j) vs the classifier on its crop at (32 i, 32 j) ==")
    print(f"  {'net':<34} {'crop':>4} {'cells':<5} {'fc8 rel':>9} {'prob rel':>9} {'argmax':>8}")
    name = "bvlc_reference_caffenet" if args.weights else "caffenet_mini (Caffe's weights)"
    border_effect(name, ctx["net"], ctx["params"], ctx["x"], results, time_it=True)
    # the same structure without padding: the crop is the receptive field (355), exact
    text = caffenet_prototxt(widths=(24, 64, 96, 96, 64, 256, 256), input_shape=(1, 3, 355, 355))
    pad0 = converters.parse_prototxt(re.sub(r" pad: \d+", "", text))
    x0 = np.random.default_rng(1).normal(size=(1, 3, 451, 451)).astype(np.float32)
    border_effect("caffenet_mini, no padding (random)", pad0, random_params(pad0, 0), x0, results)
    if args.full:
        net = converters.parse_prototxt(caffenet_prototxt(input_shape=(1, 3, 227, 227)))
        variables = jax.jit(CaffeNet().init)(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 3, 227, 227), jnp.float32))
        params = jax.tree_util.tree_map(np.asarray, dict(variables["params"]))
        border_effect("CaffeNet, CaffeNet init (random)", net, params, ctx["x"], results,
                      time_it=True)
        border_effect("CaffeNet, He-normal (random)", net, random_params(net, 0), ctx["x"],
                      results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="bvlc_reference_caffenet.caffemodel (default: "
                    "caffenet_mini from tests/data)")
    ap.add_argument("--no-full", dest="full", action="store_false",
                    help="skip the full-size random CaffeNet in step 4")
    ap.add_argument("--docs-figures", action="store_true",
                    help="write docs/figures/designer_filters.png and dense_windows.png")
    ap.add_argument("--out", default="results/net_surgery.json")
    args = ap.parse_args()
    import datetime
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                           "--untracked-files=no"], capture_output=True, text=True).stdout:
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = None
    results: dict = {"jax": jax.__version__, "devices": str(jax.devices()), "commit": commit,
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"), "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    designer_filters(results, args.docs_figures)
    ctx = cast_and_dense(args, results, args.docs_figures)
    border_effects(args, results, ctx)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save_json(args.out, results)
    print(f"\nwrote {args.out} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
