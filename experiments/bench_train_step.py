"""One training iteration of the full CaffeNet ``train_val.prototxt`` (batch 32, 227x227, CPU):
``fcn_jax.Solver.step(1)`` against the same step in PyTorch, interleaved in one process.

The Solver runs Caffe's train net as the prototxt defines it (Dropout active, SoftmaxWithLoss,
``lr_mult``/``decay_mult``: biases at twice the rate and without decay), with CaffeNet's solver
settings (SGD, momentum 0.9, weight decay 5e-4, base_lr 0.01); its data layers are replaced by
``Input`` layers fed the same random batch (the data pipeline is measured apart, by
``experiments/bench_data_layers.py``). The PyTorch twin is the same net and update: the same
weights, ``torch.optim.SGD`` with per-blob learning rates and decays in param groups. Before
timing, both nets' TEST-mode loss on the batch are compared (equal within 1e-4).

    python experiments/bench_train_step.py [--rounds 5] [--steps 3] [--out FILE.json]

Prints a table (median seconds per iteration, ratio to PyTorch) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_VAL = ROOT / "tests" / "data" / "source" / "train_val.prototxt"
SOLVER = """net: "train_val.prototxt"
type: "SGD"
base_lr: 0.01
lr_policy: "step"
gamma: 0.1
stepsize: 100000
momentum: 0.9
weight_decay: 0.0005
max_iter: 1000
random_seed: 1
"""


def input_train_val(batch: int) -> str:
    """CaffeNet's train_val with its two Data layers replaced by one Input layer."""
    import converters
    from converters.proto import caffe_pb2

    net = converters.read_prototxt(TRAIN_VAL)
    out = caffe_pb2.NetParameter()
    out.name = net.name
    inp = out.layer.add()
    inp.name, inp.type = "data", "Input"
    inp.top.extend(["data", "label"])
    inp.input_param.shape.add().dim.extend([batch, 3, 227, 227])
    inp.input_param.shape.add().dim.extend([batch])
    for lp in net.layer:
        if lp.type != "Data":
            out.layer.add().CopyFrom(lp)
    return converters.format_prototxt(out)


def torch_twin(params: dict, lr_mults: dict, decay_mults: dict):
    """The train net in PyTorch (logits with Dropout) and its SGD optimizer."""
    import torch
    import torch.nn.functional as F

    tensors = {(l, b): torch.tensor(np.asarray(v, np.float32), requires_grad=True)
               for l, bl in params.items() for b, v in bl.items()}
    groups = [{"params": [t], "lr": 0.01 * lr_mults[l][b],
               "weight_decay": 5e-4 * decay_mults[l][b]} for (l, b), t in tensors.items()]
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    convs = (("conv1", 4, 0, 1), ("conv2", 1, 2, 2), ("conv3", 1, 1, 1), ("conv4", 1, 1, 2),
             ("conv5", 1, 1, 2))

    def forward(x: torch.Tensor, train: bool) -> torch.Tensor:
        h = x
        for i, (n, s, pad, g) in enumerate(convs):
            h = F.relu(F.conv2d(h, tensors[n, "weight"], tensors[n, "bias"], stride=s,
                                padding=pad, groups=g))
            if i in (0, 1, 4):
                h = F.max_pool2d(h, 3, 2, ceil_mode=True)
            if i in (0, 1):
                h = F.local_response_norm(h, 5, alpha=1e-4, beta=0.75, k=1.0)
        h = h.flatten(1)
        for j, n in enumerate(("fc6", "fc7", "fc8")):
            h = F.linear(h, tensors[n, "weight"], tensors[n, "bias"])
            if j < 2:
                h = F.dropout(F.relu(h), 0.5, training=train)
        return h

    return forward, opt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="iterations per peer per round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_train_step.json"))
    args = ap.parse_args(argv)

    import jax
    import torch
    import torch.nn.functional as F

    import fcn_jax
    from fcn_jax import losses

    rng = np.random.default_rng(0)
    x = rng.normal(0, 50, (args.batch, 3, 227, 227)).astype(np.float32)
    y = rng.integers(0, 1000, args.batch).astype(np.float32)
    tmp = tempfile.mkdtemp()
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        Path("train_val.prototxt").write_text(input_train_val(args.batch))
        Path("solver.prototxt").write_text(SOLVER)
        solver = fcn_jax.get_solver("solver.prototxt")
    finally:
        os.chdir(cwd)
    solver.set_feed(lambda: {"data": x, "label": y})
    host = {l: {b: np.asarray(v) for b, v in bl.items()} for l, bl in solver.params.items()}
    forward, opt = torch_twin(host, solver.lr_mults, solver.decay_mults)

    # the same net: TEST-mode loss on the batch (Dropout off), JAX vs PyTorch
    blobs = jax.jit(solver.net.apply)({"params": solver.params},
                                      {"data": x, "label": y})
    jax_loss = float(losses.softmax_with_loss(blobs["fc8"], y))
    with torch.no_grad():
        t_loss = float(F.cross_entropy(forward(torch.as_tensor(x), False),
                                       torch.as_tensor(y).long()))
    assert abs(jax_loss - t_loss) <= 1e-4 * abs(t_loss), (jax_loss, t_loss)

    tx, ty = torch.as_tensor(x), torch.as_tensor(y).long()

    def torch_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(tx, True), ty)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    solver.step(1)
    compile_s = time.perf_counter() - t0
    torch_step()
    times: dict[str, list[float]] = {"fcn_jax Solver.step": [], "PyTorch": []}
    for _ in range(args.rounds):
        for name, fn in (("fcn_jax Solver.step", lambda: solver.step(1)),
                         ("PyTorch", torch_step)):
            for _ in range(args.steps):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fcn_jax Solver.step"] / med["PyTorch"]
    print(f"CaffeNet train_val, batch {args.batch}, 227x227, CPU ({os.cpu_count()} cores), "
          f"JAX {jax.__version__}, PyTorch {torch.__version__}; TEST-mode loss JAX "
          f"{jax_loss:.6f} vs PyTorch {t_loss:.6f}")
    print("| peer | median s / iteration | images/s | ratio to PyTorch |\n|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {args.batch / v:.1f} | {v / med['PyTorch']:.2f} |")
    print(f"first Solver.step (compile) {compile_s:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "batch": args.batch, "median_s": med, "ratio_fcn_jax_to_pytorch": ratio,
        "compile_s": compile_s, "samples": times, "jax": jax.__version__,
        "torch": torch.__version__, "loss_test_mode": {"jax": jax_loss, "torch": t_loss},
        "date": time.strftime("%Y-%m-%d")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
