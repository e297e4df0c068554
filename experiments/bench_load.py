"""How fast does a full-size CaffeNet caffemodel (233 MB) load, against just reading its bytes?

Generates a random full-size CaffeNet caffemodel (same layers and shapes as
bvlc_reference_caffenet.caffemodel), then times, median of several runs:
  read   : open + read the file's bytes (the floor)
  parse  : converters.read_caffemodel (protobuf parse, fast schema)
  load   : converters.load_caffemodel (parse + numpy params tree)
  exact  : protobuf parse with Caffe's exact schema + numpy conversion per element (the slow
           way most converters take), once
Prints a table and writes results/bench_load.json.

    python experiments/bench_load.py [--runs 5] [--keep PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import converters
from converters.proto import caffe_pb2
from fcn_jax.caffenet import caffenet_prototxt


def make_model(path: Path) -> int:
    """Write a random full-size CaffeNet caffemodel; returns its size in bytes."""
    net = converters.parse_prototxt(caffenet_prototxt())
    rng = np.random.default_rng(0)
    shapes = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
              "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216),
              "fc7": (4096, 4096), "fc8": (1000, 4096)}
    params = {k: {"weight": rng.standard_normal(s, dtype=np.float32) * 0.01,
                  "bias": rng.standard_normal(s[0], dtype=np.float32)} for k, s in shapes.items()}
    converters.save_caffemodel(path, params, net)
    return path.stat().st_size


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", help="write the generated model here (default: a temp dir)")
    ap.add_argument("--out", default="results/bench_load.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "caffenet_random.caffemodel"
        size = make_model(path)

        def read():
            with open(path, "rb") as f:
                f.read()

        def exact():
            net = caffe_pb2.NetParameter()
            with open(path, "rb") as f:
                net.ParseFromString(f.read())
            return {lp.name: [np.array(b.data, np.float32) for b in lp.blobs] for lp in net.layer}

        rows = {
            "read bytes": timed(read, args.runs),
            "read_caffemodel": timed(lambda: converters.read_caffemodel(path), args.runs),
            "load_caffemodel": timed(lambda: converters.load_caffemodel(path), args.runs),
            "exact schema + per-element numpy": timed(exact, 1),
        }
    base = rows["read bytes"]
    print(f"caffemodel: {size / 1e6:.1f} MB (random full-size CaffeNet)")
    print(f"{'step':<36} {'seconds':>8} {'x read':>8}")
    for k, v in rows.items():
        print(f"{k:<36} {v:8.3f} {v / base:8.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {"bytes": size, "seconds": rows,
              "ratio_load_to_read": rows["load_caffemodel"] / base}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"load/read = {result['ratio_load_to_read']:.2f}x (goal: within 3x); "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
