"""The tutorial's sliding-window fine-tuning as a Caffe recipe, run by ``fcn-jax train``.

Writes ``train_val.prototxt`` (fully convolutional CaffeNet, HDF5Data, SoftmaxWithLoss over the
score map with ignore_label 255, Accuracy over the cells in TEST), ``solver.prototxt`` and the
HDF5 data (the embedded synthetic task of ``fcn-jax finetune --demo``: crops and cell labels as
finetune draws them) into ``--out``, then runs ``fcn-jax train --solver solver.prototxt`` there
(``--no-run`` to only write it; real ``caffe train`` runs the same folder).

    python experiments/caffe_recipe.py --out recipe/ [--iters 200] [--no-run]

Writes ``results/caffe_recipe.json``: the test net's accuracy and loss at each test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="recipe")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=200)
    ap.add_argument("--val-images", type=int, default=48)
    ap.add_argument("--input-size", type=int, default=355)
    ap.add_argument("--no-run", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "results" / "caffe_recipe.json"))
    args = ap.parse_args(argv)

    from fcn_jax import data as D
    from fcn_jax import solver as S
    from fcn_jax.commands.finetune import DEMO_WIDTHS
    from fcn_jax.recipes import write_sliding_window_recipe

    train = D.SyntheticDataset(max(args.train_images, 1), seed=0)
    val = D.SyntheticDataset(args.val_images, seed=1)
    t0 = time.perf_counter()
    write_sliding_window_recipe(args.out, train, val, num_classes=train.num_classes(),
                                widths=DEMO_WIDTHS, input_size=(args.input_size,) * 2,
                                batch_size=args.batch_size, train_images=args.train_images,
                                max_iter=args.iters, test_interval=max(args.iters // 4, 1),
                                display=max(args.iters // 10, 1))
    print(f"wrote {args.out}/ (train_val.prototxt, solver.prototxt, train.h5, val.h5) in "
          f"{time.perf_counter() - t0:.0f} s")
    if args.no_run:
        return 0
    cwd = os.getcwd()
    os.chdir(args.out)
    tests = []
    try:
        solver = S.get_solver("solver.prototxt", log=print)
        plain = solver.test

        def record(i: int = 0):
            res = plain(i)
            tests.append({"iter": solver.iter, **{k: float(v) for k, v in res.items()}})
            return res

        solver.test = record
        t0 = time.perf_counter()
        solver.solve()
        wall = time.perf_counter() - t0
        solver.close()
    finally:
        os.chdir(cwd)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"iters": args.iters, "tests": tests,
                                           "wall_s": wall, "date": time.strftime("%Y-%m-%d")},
                                          indent=1))
    print("| iteration | test accuracy (cells) | test loss |\n|---|---|---|")
    for t in tests:
        print(f"| {t['iter']} | {t['accuracy']:.3f} | {t.get('loss', float('nan')):.3f} |")
    print(f"{args.iters} iterations in {wall / 60:.1f} min; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
