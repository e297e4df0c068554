"""``fcn-jax train``: Caffe's ``caffe train`` over a ``solver.prototxt``."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from typing import Any

from fcn_jax import distributed

_EFFECTS = ("stop", "snapshot", "none")
_PEER_GONE = re.compile(r"gloo|connection|peer|heartbeat|coordinat|barrier", re.IGNORECASE)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train with a Caffe solver.prototxt, as `caffe train`",
        description="Run a Caffe solver: the train net (with its data layers) and test nets "
                    "of the solver's net, tests every test_interval, the smoothed loss every "
                    "display iterations, snapshots every snapshot iterations and at the end "
                    "({snapshot_prefix}_iter_N.caffemodel / .solverstate). Paths in the "
                    "solver and nets are relative to the current directory, as in Caffe.")
    p.add_argument("--solver", required=True, help="the solver.prototxt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="caffemodel(s) (or .safetensors) to fine-tune from, "
                     "comma-separated; replaces the solver's own `weights`")
    src.add_argument("--snapshot", help="a .solverstate to resume from")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="data-parallel over the first N devices (the batch is split)")
    p.add_argument("--sigint-effect", choices=_EFFECTS, default="stop",
                   help="what Ctrl-C does (Caffe's default: snapshot, then stop)")
    p.add_argument("--sighup-effect", choices=_EFFECTS, default="snapshot",
                   help="what SIGHUP does (default: snapshot and go on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_train)


class _Signals:
    """Caffe's ``SignalHandler``: a signal sets a request that the solver reads after each
    iteration."""

    def __init__(self, sigint: str, sighup: str):
        self.effects = {signal.SIGINT: sigint}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup
        self.pending = "none"
        self.old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending = self.effects.get(signum, "none")

    def action(self) -> str:
        out, self.pending = self.pending, "none"
        return out

    def __enter__(self) -> _Signals:
        for sig in self.effects:
            self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``fcn-jax train`` from parsed arguments."""
    rank, processes = distributed.initialize(args)  # first: before any JAX computation
    try:
        status = _train(args, rank, processes)
    except (RuntimeError, ValueError) as e:
        if processes > 1 and _PEER_GONE.search(str(e)):  # a collective with a dead peer
            raise distributed.peer_failure(e, "training") from None
        raise
    distributed.finish()  # several processes: wait for the others to end too
    return status


def _train(args: argparse.Namespace, rank: int, processes: int) -> int:
    from tqdm.auto import tqdm

    from converters.solver_io import read_solver
    from fcn_jax.solver import Solver
    from fcn_jax.train import DATA_AXIS

    sp = read_solver(args.solver)
    if args.weights or args.snapshot:
        sp.ClearField("weights")  # as caffe train: the command line wins
    bar = None

    def log(text: str) -> None:
        (tqdm.write if bar is not None else print)(text)

    mesh = distributed.global_mesh(DATA_AXIS) if processes > 1 else None
    if mesh is not None and args.devices is not None:
        print("fcn-jax: error: --devices: with several processes every process's devices "
              "are used", file=sys.stderr)
        return 2
    solver = Solver(sp, path=args.solver, devices=args.devices, mesh=mesh,
                    log=log if rank == 0 else None)
    try:
        if args.weights:
            for w in args.weights.split(","):
                solver.copy_from(w)
        if args.snapshot:
            solver.restore(args.snapshot)
        total = max(int(sp.max_iter) - solver.iter, 0)
        bar = tqdm(total=total, desc="train", unit="iter",
                   disable=args.no_progress or rank != 0, file=sys.stderr)
        solver.callbacks.append(
            lambda s, loss: (bar.update(1), bar.set_postfix(loss=f"{s.smoothed_loss:.4f}")))
        with _Signals(args.sigint_effect, args.sighup_effect) as sig:
            solver.set_action_function(sig.action)
            solver.solve()
        bar.close()
    except FloatingPointError as e:
        if bar is not None:
            bar.close()
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        return 2
    finally:
        solver.close()
    model = solver.snapshot_filename(".caffemodel")
    if rank == 0:
        print(f"iteration {solver.iter}: loss {solver.smoothed_loss:.6g}; weights in {model}")
    return 0
