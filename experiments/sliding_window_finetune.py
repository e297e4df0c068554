"""Sliding-window fine-tuning on the synthetic task: a narrow fully convolutional CaffeNet from
random init learns dense maps that localise the objects (CPU, minutes).

For each solver (Adam and Caffe's SGD with momentum by default) it runs the same job as
``fcn-jax finetune --demo`` with a held-out evaluation every ``--eval-every`` steps, then
prints a table (held-out mean IoU and per-cell accuracy before/after, per-class IoU, final
training loss, time) and writes to ``--out``:

- ``results.json``: every number of the table, the evaluation curves and the environment;
- ``loss_curves.png`` (training loss per solver) and ``miou_curves.png`` (held-out mean IoU
  against the step);
- per solver, ``<solver>/``: the run's ``metrics.json``, loss curve, before/after heatmaps of
  P(object) on held-out images, the argmax class map, checkpoint and fine-tuned caffemodel.

It also runs ``fcn-jax finetune --demo --steps 200`` exactly as the command line does
(``--cli-steps``; 0 skips it). The README's fine-tuning table is these numbers; the JSON
records the date and the git commit they were made at.

    python experiments/sliding_window_finetune.py   # README table: results/sliding_window_finetune/
    python experiments/sliding_window_finetune.py --table   # the README's table from results.json

``--docs-figures`` also copies the two curves to ``docs/figures/`` for the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcn_jax.commands.finetune import (  # noqa: E402
    DEMO_WIDTHS,
    FinetuneConfig,
    config_from_args,
    finetune,
)

ROOT = Path(__file__).resolve().parents[1]

#: Learning rates per solver (Adam's default; Caffe's CaffeNet base_lr for SGD).
LEARNING_RATES = {"Adam": 1e-3, "SGD": 1e-2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/sliding_window_finetune")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--solvers", nargs="+", default=["Adam", "SGD"], choices=["Adam", "SGD"])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--val-images", type=int, default=96)
    p.add_argument("--input-size", type=int, nargs=2, default=(451, 451))
    p.add_argument("--widths", type=int, nargs=7, default=DEMO_WIDTHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show a progress bar per run")
    p.add_argument("--cli-steps", type=int, default=200,
                   help="also run `fcn-jax finetune --demo --steps N` as the CLI does (0: no)")
    p.add_argument("--table", action="store_true",
                   help="only print the README's markdown table from OUT/results.json")
    p.add_argument("--collect", nargs="+", metavar="RUN",
                   help="only rebuild OUT/results.json from the metrics.json of runs already "
                   "in OUT (cli, adam, sgd), e.g. of an interrupted experiment; its date is "
                   "the newest file's, its commit --commit")
    p.add_argument("--commit", help="with --collect: the commit the runs were made at")
    p.add_argument("--docs-figures", action="store_true",
                   help="also copy loss_curves.png and miou_curves.png to docs/figures/")
    args = p.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads((Path(args.out) / "results.json").read_text())))
        return 0
    collected = None
    if args.collect:
        collected = {}
        for name in args.collect:
            path = Path(args.out) / name.lower() / "metrics.json"
            collected["cli" if name == "cli" else name] = dict(
                json.loads(path.read_text()), wall_s=None, _mtime=path.stat().st_mtime)

    import jax

    from fcn_jax import viz
    from fcn_jax.io_utils import atomic_save_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = _git_commit()
    runs = {}
    if collected is not None:
        runs = {k: {k2: v for k2, v in r.items() if k2 != "_mtime"}
                for k, r in collected.items()}
        started = datetime.datetime.fromtimestamp(
            max(r["_mtime"] for r in collected.values()), datetime.timezone.utc
        ).isoformat(timespec="seconds")
        commit = args.commit
    if args.cli_steps and collected is None:
        from fcn_jax.cli import build_parser

        cli_args = build_parser().parse_args(
            ["finetune", "--demo", "--steps", str(args.cli_steps), "--out", str(out / "cli"),
             "--no-progress"])
        cfg = config_from_args(cli_args)
        print(f"== fcn-jax finetune --demo --steps {args.cli_steps} ({cfg.solver}, CLI "
              "defaults)", flush=True)
        t = time.perf_counter()
        runs["cli"] = finetune(cfg, log=lambda s: print("  " + s, flush=True))
        runs["cli"]["wall_s"] = round(time.perf_counter() - t, 1)
    for solver in args.solvers if collected is None else ():
        cfg = FinetuneConfig(
            out=str(out / solver.lower()), steps=args.steps, demo=True, solver=solver,
            lr=LEARNING_RATES[solver], batch_size=args.batch_size, val_images=args.val_images,
            input_size=tuple(args.input_size), widths=tuple(args.widths), seed=args.seed,
            eval_every=args.eval_every, progress=args.progress)
        print(f"== {solver}, lr {cfg.lr}, {cfg.steps} steps of {cfg.batch_size} "
              f"{cfg.input_size[0]}x{cfg.input_size[1]} images", flush=True)
        t = time.perf_counter()
        runs[solver] = finetune(cfg, log=lambda s: print("  " + s, flush=True))
        runs[solver]["wall_s"] = round(time.perf_counter() - t, 1)

    rows = []
    for solver, r in runs.items():
        b, a = r["eval"]["before"], r["eval"]["after"]
        tail = r["train_loss"][-20:]
        rows.append({
            "run": ("fcn-jax finetune --demo --steps " + str(r["steps"]) if solver == "cli"
                    else f"experiments/sliding_window_finetune.py, {solver}"),
            "solver": r["solver"].get("type", solver) if solver == "cli" else solver,
            "lr": r["solver"]["base_lr"], "steps": r["steps"],
            "miou_before": b["mean_iou"], "miou_after": a["mean_iou"],
            "acc_before": b["cell_accuracy"], "acc_after": a["cell_accuracy"],
            "iou_after": a["iou"], "train_loss_first20": float(np.mean(r["train_loss"][:20])),
            "train_loss_last20": float(np.mean(tail)) if tail else None,
            "train_s": r["time_s"]["train"], "wall_s": r["wall_s"] or r["time_s"]["total"],
            "ms_per_step": 1000 * r["time_s"]["train"] / max(len(r["train_loss"]), 1),
        })
    names = next(iter(runs.values()))["classes"]
    print()
    head = (f"{'solver':<6} {'lr':>7} {'steps':>5} {'mIoU before':>11} {'mIoU after':>10} "
            f"{'acc before':>10} {'acc after':>9} {'loss first/last 20':>19} {'ms/step':>8}  "
            + " ".join(f"{n[:9]:>9}" for n in names))
    print(head)
    print("-" * len(head))
    for row in rows:
        ious = " ".join(f"{(row['iou_after'][n] or 0.0):9.3f}" for n in names)
        print(f"{row['solver']:<6} {row['lr']:7.0e} {row['steps']:5d} {row['miou_before']:11.3f} "
              f"{row['miou_after']:10.3f} {row['acc_before']:10.3f} {row['acc_after']:9.3f} "
              f"{row['train_loss_first20']:9.3f}/{row['train_loss_last20']:<9.3f} "
              f"{row['ms_per_step']:8.0f}  {ious}")
    print("(per-class IoU after; the held-out set is the same for every solver)")

    viz.loss_curve({s: r["train_loss"] for s, r in runs.items()}, out / "loss_curves.png",
                   title="sliding-window training loss", smooth=20)
    _miou_figure(runs, out / "miou_curves.png")
    atomic_save_json(out / "results.json", {
        "experiment": "sliding-window fine-tuning, synthetic task, narrow CaffeNet from "
                      "random init",
        "date": started, "commit": commit,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "rows": rows,
        "eval_curves": {s: r["eval_curve"] for s, r in runs.items()},
        "classes": names,
        "model": next(iter(runs.values()))["model"],
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                        "cpus": os.cpu_count(), "python": platform.python_version(),
                        "machine": platform.machine()},
    })
    print(f"\nwrote {out}/results.json, loss_curves.png, miou_curves.png and one folder per "
          f"solver")
    if args.docs_figures:
        for name in ("loss_curves.png", "miou_curves.png"):
            shutil.copyfile(out / name, ROOT / "docs" / "figures" / f"finetune_{name}")
    print()
    print(markdown_table(json.loads((out / "results.json").read_text())))
    return 0


def markdown_table(results: dict) -> str:
    """The README's table of a ``results.json``, with its date, commit and machine."""
    env = results["environment"]
    lines = [f"Written {results['date'][:10]} at commit `{(results['commit'] or '?')[:7]}` "
             f"({env['cpus']} CPU cores, JAX {env['jax']}, {env['backend']}):", "",
             "| run | held-out mean IoU before → after | per-cell accuracy | train time "
             "| wall time |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        run = f"`{r['run']}`" if r["run"].startswith("fcn-jax") else r["run"]
        if not r["run"].startswith("fcn-jax"):
            run += f" {r['steps']} steps, lr {r['lr']:g}"
        lines.append(f"| {run} | {r['miou_before']:.3f} → {r['miou_after']:.3f} | "
                     f"{r['acc_before']:.3f} → {r['acc_after']:.3f} | {r['train_s']:.0f} s "
                     f"({r['ms_per_step']:.0f} ms/step) | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def _git_commit() -> str | None:
    """The checked-out commit, with ``-dirty`` when tracked files have changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _miou_figure(runs: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    from fcn_jax.io_utils import atomic_savefig

    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for solver, r in runs.items():
        pts = r["eval_curve"]
        ax.plot([p["step"] for p in pts], [p["mean_iou"] for p in pts], marker="o",
                label=solver)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out mean IoU (dense map)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
