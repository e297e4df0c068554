"""How fast do the train-net data layers deliver batches, against a plain sequential loop?

Writes N random 256x256 JPEGs, an ImageData list and an LMDB of the same images as encoded
Datums (as ``convert_imageset --encoded`` makes them), then times CaffeNet's train input
(batch 32, crop 227, mirror, mean_value 104/117/123, TRAIN) through
``fcn_jax.data_layers.open_data_layer`` with 1, 2 and 4 workers, and the peer: the same work
in one Python loop (``cv2.imread`` or ``cv2.imdecode`` then the numpy transform, no threads).
Also the time to open an ImageData list of 10^6 lines. Median of ``--runs`` passes over
``--batches`` batches, interleaved; prints a table and writes results/bench_data_layers.json.

    python experiments/bench_data_layers.py [--images 256] [--batches 16] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np

from converters.caffe_io import parse_prototxt
from converters.proto import caffe_pb2
from fcn_jax import data_layers as D

TRANSFORM = "crop_size: 227 mirror: true mean_value: 104 mean_value: 117 mean_value: 123"
BATCH = 32


def make_data(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    env = lmdb.open(str(root / "db"), map_size=1 << 32)
    with env.begin(write=True) as txn, open(root / "list.txt", "w") as lst:
        for i in range(n):
            img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            img = cv2.GaussianBlur(img, (7, 7), 2)   # photo-like, so JPEG sizes are realistic
            ok, buf = cv2.imencode(".jpg", img)
            (root / f"{i}.jpg").write_bytes(buf.tobytes())
            lst.write(f"{root / f'{i}.jpg'} {i % 1000}\n")
            txn.put(b"%08d" % i, caffe_pb2.Datum(data=buf.tobytes(), encoded=True,
                                                 label=i % 1000).SerializeToString())
    env.close()


def layer(root: Path, kind: str):
    if kind == "ImageData":
        body = (f'type: "ImageData" image_data_param {{ source: "{root / "list.txt"}" '
                f'batch_size: {BATCH} }}')
    else:
        body = (f'type: "Data" data_param {{ source: "{root / "db"}" batch_size: {BATCH} '
                f'backend: LMDB }}')
    return parse_prototxt(f'layer {{ name: "data" {body} top: "data" top: "label" '
                          f'transform_param {{ {TRANSFORM} }} }}').layer[0]


def ours(lp, batches: int, workers: int) -> float:
    with D.open_data_layer(lp, workers=workers, prefetch=max(4, 2 * workers)) as src:
        src.next()                                   # setup and the first batch: not timed
        t = time.perf_counter()
        for _ in range(batches):
            src.next()
        return time.perf_counter() - t


def peer(root: Path, kind: str, batches: int, n: int) -> float:
    """One loop, no threads: read, decode, crop, mirror, subtract, as a hand-written loader."""
    tp = layer(root, kind).transform_param
    env = lmdb.open(str(root / "db"), readonly=True, lock=False) if kind == "Data" else None
    txn = env.begin() if env else None
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    k = 0
    for _ in range(batches):
        out = np.empty((BATCH, 3, 227, 227), np.float32)
        for i in range(BATCH):
            if env:
                d = caffe_pb2.Datum.FromString(txn.get(b"%08d" % (k % n)))
                img = cv2.imdecode(np.frombuffer(d.data, np.uint8), cv2.IMREAD_UNCHANGED)
            else:
                img = cv2.imread(str(root / f"{k % n}.jpg"), cv2.IMREAD_COLOR)
            out[i] = D.transform(img, tp, phase="TRAIN", rng=rng)
            k += 1
    elapsed = time.perf_counter() - t
    if env:
        env.close()
    return elapsed


def list_open(root: Path) -> float:
    (root / "big.txt").write_bytes(f"{root / '0.jpg'} 7\n".encode() * 10**6)
    lp = parse_prototxt(f'layer {{ name: "d" type: "ImageData" top: "d" top: "l" '
                        f'image_data_param {{ source: "{root / "big.txt"}" batch_size: 1 '
                        f'shuffle: true }} }}').layer[0]
    t = time.perf_counter()
    D.open_data_layer(lp).close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="results/bench_data_layers.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, args.images)
        for kind in ("ImageData", "Data"):
            lp = layer(root, kind)
            runs: dict[str, list[float]] = {}
            for _ in range(args.runs):               # interleaved: one of each per round
                runs.setdefault("peer (1 loop)", []).append(
                    peer(root, kind, args.batches, args.images))
                for w in (1, 2, 4):
                    runs.setdefault(f"ours, {w} workers", []).append(
                        ours(lp, args.batches, w))
            for name, times in runs.items():
                med = statistics.median(times)
                rows.append({"layer": kind, "run": name, "seconds": med,
                             "images_per_s": args.batches * BATCH / med})
        list_s = list_open(root)
    print(f"{'layer':10} {'run':18} {'images/s':>9}")
    for r in rows:
        print(f"{r['layer']:10} {r['run']:18} {r['images_per_s']:9.0f}")
    print(f"open an ImageData list of 10^6 lines (shuffle): {list_s:.2f} s")
    out = {"batch": BATCH, "transform": TRANSFORM, "images": args.images,
           "batches": args.batches, "cpus": os.cpu_count(), "rows": rows,
           "list_1e6_open_s": list_s, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
