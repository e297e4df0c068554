"""End-to-end batch inference: ``fcn-jax predict`` over JPEGs of mixed sizes against the bare
compiled forward pass at the same batch size, measured in the same run.

Full-size CaffeNet (the classifier, random He-normal weights as in ``bench_dense.py``, written
as a ``.caffemodel``), ``N`` JPEGs of random sizes (160..640 px a side, smooth random
content) in a temporary folder. Measured, alternating so that a shared machine's load hits
both alike:

* bare forward: ``fcn_jax.predict``'s compiled forward on one fixed preprocessed batch,
  ``B`` images per call (images/s from the median call);
* predict: ``fcn_jax.predict.run_predict`` (what ``fcn-jax predict`` runs: decode, resize,
  preprocess in worker threads, forward, top-5, journal written and fsynced per batch),
  images/s after the first batch, with the first batch (compilation) reported apart;
* with ``--skimage``: each predict run is followed by one with pycaffe's resize as
  scikit-image runs it (``skimage.transform.resize`` instead of ``fcn_jax.preprocess``'s sparse
  zoom), the before of this change, in the same run;
* with ``--cli``, once: the ``fcn-jax predict`` command in a subprocess (its own process
  start, load and compilation), its ``summary.json``.

    python experiments/bench_predict.py [--images 200] [--batch-size 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import converters  # noqa: E402
from fcn_jax import predict as P  # noqa: E402
from fcn_jax.io_utils import atomic_save_json  # noqa: E402
from fcn_jax.preprocess import caffe_transformer, imagenet_mean_bgr  # noqa: E402

SOURCE = ROOT / "tests" / "data" / "source"


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` JPEGs of random sizes with smooth random content (like photos, JPEG-sized)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(160, 641, 2))
        small = rng.uniform(0, 255, (max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        noise = rng.normal(0, 8, (h, w, 3))
        arr = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
        p = folder / f"img{i:04d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    return paths


def _with_skimage_resize(fn):
    """``fn()`` with ``fcn_jax.preprocess`` resizing through ``skimage.transform.resize``."""
    from skimage.transform import resize

    from fcn_jax import preprocess as pre

    fast = pre._resize_linear
    pre._resize_linear = lambda im, dims, aa: resize(im, dims, order=1, mode="constant",
                                                     anti_aliasing=aa)
    try:
        return fn()
    finally:
        pre._resize_linear = fast


def bare_forward(forward, x: np.ndarray, rounds: int) -> dict:
    forward(x)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"median_ms": med * 1e3, "images_per_s": x.shape[0] / med}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="predict runs (each between two "
                    "bare-forward measurements)")
    ap.add_argument("--rounds", type=int, default=7, help="bare-forward calls per measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cli", action="store_true", help="also the fcn-jax predict command")
    ap.add_argument("--skimage", action="store_true",
                    help="also predict with skimage.transform.resize (the old resize)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_predict.json"))
    args = ap.parse_args(argv)

    from bench_dense import random_params

    load0 = os.getloadavg()
    cls, _ = random_params()
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    proto = SOURCE / "deploy.prototxt"
    model = tmp / "caffenet.caffemodel"
    converters.save_caffemodel(model, cls, proto)
    t = time.perf_counter()
    images = make_jpegs(tmp / "images", args.images)
    print(f"{len(images)} JPEGs written in {time.perf_counter() - t:.1f} s; load {load0}",
          flush=True)
    b = args.batch_size
    module, params = converters.load_caffe(proto, model, input_shape=(b, 3, 227, 227))
    tr = caffe_transformer((3, 227, 227), mean=imagenet_mean_bgr(), raw_scale=255.0,
                           channel_swap=(2, 1, 0))
    forward = P._forward(module, params, ("prob",))
    x = np.stack([P.load_and_preprocess(p, tr) for p in images[:b]])
    cfg = P.PredictConfig(batch_size=b, workers=args.workers)

    bare, runs, skimage_runs = [bare_forward(forward, x, args.rounds)], [], []
    for r in range(args.repeats):
        out = tmp / f"out{r}"
        s = P.run_predict(module, params, images, out, tr, cfg, progress=False)
        d = s.as_dict()
        runs.append({"images_per_s": s.images_per_second, "seconds": s.seconds,
                     "first_batch_seconds": s.first_batch_seconds, "ok": d["ok"],
                     "compile_seconds": d.get("compile_seconds")})
        bare.append(bare_forward(forward, x, args.rounds))
        around = (bare[-2]["images_per_s"] + bare[-1]["images_per_s"]) / 2
        runs[-1]["frac_of_bare"] = s.images_per_second / around
        print(f"run {r}: predict {s.images_per_second:.1f} img/s (first batch "
              f"{s.first_batch_seconds:.2f} s), bare forward {around:.1f} img/s around it: "
              f"{100 * runs[-1]['frac_of_bare']:.0f}%", flush=True)
        if args.skimage:
            s2 = _with_skimage_resize(lambda o=tmp / f"sk{r}": P.run_predict(
                module, params, images, o, tr, cfg, progress=False))
            bare.append(bare_forward(forward, x, args.rounds))
            around = (bare[-2]["images_per_s"] + bare[-1]["images_per_s"]) / 2
            skimage_runs.append({"images_per_s": s2.images_per_second,
                                 "frac_of_bare": s2.images_per_second / around})
            print(f"       with skimage's resize: {s2.images_per_second:.1f} img/s, "
                  f"{100 * skimage_runs[-1]['frac_of_bare']:.0f}% of the bare forward",
                  flush=True)
    cli = None
    if args.cli:
        out = tmp / "cli"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "fcn_jax.cli", "predict", str(proto),
                            str(model), "--dir", str(tmp / "images"), "--out", str(out),
                            "--batch-size", str(b), "--no-progress"], env=env,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t
        cli = json.loads((out / "summary.json").read_text()) if r.returncode == 0 else {
            "error": r.stderr[-2000:]}
        cli["wall_seconds_with_process_start"] = wall
        bare.append(bare_forward(forward, x, args.rounds))
        print(f"fcn-jax predict (CLI): {cli.get('images_per_second')} img/s, "
              f"{wall:.1f} s wall in all; stdout: {r.stdout.strip()[-300:]}", flush=True)
    med_frac = float(np.median([r["frac_of_bare"] for r in runs]))
    bare_ips = float(np.median([m["images_per_s"] for m in bare]))
    pred_ips = float(np.median([r["images_per_s"] for r in runs]))
    print(f"\nbatch {b}: bare forward {bare_ips:.1f} img/s, predict {pred_ips:.1f} img/s "
          f"({100 * med_frac:.0f}% of the bare forward, median of {len(runs)} runs)")
    result = {"images": len(images), "batch_size": b, "workers": args.workers,
              "load_before": load0, "load_after": os.getloadavg(), "bare_forward": bare,
              "predict_runs": runs, "predict_runs_skimage_resize": skimage_runs, "cli": cli,
              "bare_images_per_s": bare_ips,
              "predict_images_per_s": pred_ips, "predict_frac_of_bare": med_frac}
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(outp, result)
    print(f"wrote {outp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
