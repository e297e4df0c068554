"""How fast do the full-size CaffeNet weights (233 MB) load from a caffemodel, a safetensors
file and an Orbax checkpoint, against just reading the same bytes?

Generates random full-size CaffeNet weights (same layers and shapes as
bvlc_reference_caffenet.caffemodel), writes them as a caffemodel, a safetensors file
(``converters.save_safetensors``) and an Orbax checkpoint (``orbax.checkpoint``
StandardCheckpointer), then times, median of several runs, all from the page cache:
  cat         : ``cat FILE > /dev/null`` of each (the floor; the Orbax folder: every file)
  read_caffemodel / load_caffemodel : protobuf parse; parse + numpy params tree
  load_safetensors : converters.load_safetensors (memory-mapped params tree); and the same
                with every byte touched (a sum over each array), as a forward pass would
  orbax restore : StandardCheckpointer.restore onto jax arrays (what a resume does)
  exact       : protobuf parse with Caffe's exact schema + numpy conversion per element (the
                slow way most converters take), once
Prints a table and writes results/bench_load.json.

    python experiments/bench_load.py [--runs 5] [--keep PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
        params = converters.load_caffemodel(path)
        st_path = Path(tmp) / "caffenet_random.safetensors"
        converters.save_safetensors(st_path, params)
        import jax
        import orbax.checkpoint as ocp

        ob_path = Path(tmp) / "caffenet_orbax"
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(ob_path, jax.tree.map(np.asarray, params))
        ckptr.wait_until_finished()
        ob_files = [str(p) for p in ob_path.rglob("*") if p.is_file()]
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        sizes = {"caffemodel": size, "safetensors": st_path.stat().st_size,
                 "orbax": sum(os.path.getsize(p) for p in ob_files)}

        def cat(*files):
            return lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL,
                                          check=True)

        def touched():
            return sum(float(a.sum()) for b in converters.load_safetensors(st_path).values()
                       for a in b.values())

        def orbax_restore():
            out = ckptr.restore(ob_path, target)
            jax.block_until_ready(out)

        def exact():
            net = caffe_pb2.NetParameter()
            with open(path, "rb") as f:
                net.ParseFromString(f.read())
            return {lp.name: [np.array(b.data, np.float32) for b in lp.blobs] for lp in net.layer}

        rows = {  # (format, step) -> seconds
            ("caffemodel", "cat > /dev/null"): timed(cat(str(path)), args.runs),
            ("caffemodel", "read_caffemodel"): timed(
                lambda: converters.read_caffemodel(path), args.runs),
            ("caffemodel", "load_caffemodel"): timed(
                lambda: converters.load_caffemodel(path), args.runs),
            ("safetensors", "cat > /dev/null"): timed(cat(str(st_path)), args.runs),
            ("safetensors", "load_safetensors"): timed(
                lambda: converters.load_safetensors(st_path), args.runs),
            ("safetensors", "load_safetensors + touch every byte"): timed(touched, args.runs),
            ("orbax", "cat > /dev/null"): timed(cat(*ob_files), args.runs),
            ("orbax", "StandardCheckpointer.restore (jax arrays)"): timed(
                orbax_restore, args.runs),
            ("caffemodel", "exact schema + per-element numpy"): timed(exact, 1),
        }
    print("random full-size CaffeNet weights: " + ", ".join(
        f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    print(f"{'format':<12} {'step':<44} {'seconds':>8} {'x cat':>8}")
    for (fmt, step), v in rows.items():
        base = rows[(fmt, "cat > /dev/null")]
        print(f"{fmt:<12} {step:<44} {v:8.3f} {v / base:8.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {"bytes": sizes, "seconds": {f"{f}: {s}": v for (f, s), v in rows.items()},
              "ratio_to_cat": {f"{f}: {s}": v / rows[(f, "cat > /dev/null")]
                               for (f, s), v in rows.items()}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
