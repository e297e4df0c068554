"""Dense and batch inference speed: fcn-jax against PyTorch, measured in the same run.

Full-size CaffeNet (random weights, He-normal) in both public forward paths of fcn-jax:

* ``jax.jit(module.apply)`` of ``converters.load_caffe`` (``tests/data/source/deploy.prototxt``
  and ``bvlc_caffenet_full_conv.prototxt``), every blob returned, as a user writes it, and
  ``fcn_jax.jit(module.apply)`` (the same with ``fcn_jax.xla``'s per-function kernel choice);
* the same two for ``fcn_jax.CaffeNet(...).apply``;
* ``fcn_jax.inference.compile_forward`` (weights laid out once, ``prob`` only, shape buckets,
  the kernel choice of ``fcn_jax.xla``);

against three peers, each first checked equal (max |prob difference| <= 1e-4): a PyTorch
CaffeNet with ceil-mode pooling and Caffe's LRN (``experiments/peers/torch_caffenet.py``),
the same net as an ONNX graph run by ONNX Runtime, and OpenCV's dnn module reading the
prototxt and the weights as a caffemodel (``experiments/peers/onnx_caffenet.py``). Each case
is reported as a ratio to the fastest peer of that case (``x best peer``: ours / theirs, below
1 is faster).
Cases: the 451x451 dense 8x8 map, the 227 classifier at batch 10 and 1, the 8x8 map against
its 64 crops as one batch, and a stream of images of many sizes (compile counts, exactness).

Timings are interleaved (one call of each implementation per round), so a noisy shared
machine slows all alike; the table reports medians (and minima) over rounds. Also reported:
compile time, XLA's memory plan (arguments + outputs + temporaries), GFLOP/s from the
counted multiply-adds and their fraction of the float32 GEMM peak measured here with numpy
(OpenBLAS, also with ``OPENBLAS_CORETYPE`` forced, in subprocesses) and ``jnp.dot``, and for
batch 1 the memory-bandwidth limit: the weights read once per image at the read bandwidth
measured in the same run (best of a jitted ``jnp.sum``, numpy and torch over 256 MB).
``--profile`` adds ONNX Runtime's per-node times and ours per layer (prefix differences).

    python experiments/bench_dense.py [--rounds 7] [--out results/bench_dense.json]
    python experiments/bench_dense.py --fast-flags   # with inference.FAST_CPU_XLA_FLAGS
    python experiments/bench_dense.py --layers   # + per-layer formulation experiments
    python experiments/bench_dense.py --profile  # + per-node / per-layer time breakdowns

On a GPU machine (``jax.default_backend() == "gpu"``) the same cases run on the GPU against
PyTorch CUDA, plus bfloat16 (``--bf16``). torch is a benchmark-only extra (``pip install
-e .[bench]``: torch, onnx, onnxruntime; OpenCV is the ``opencv`` extra); a peer that is
not installed is left out.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import converters  # noqa: E402
from fcn_jax import CaffeNet  # noqa: E402
from fcn_jax import compiler_options as fcn_jax_compiler_options  # noqa: E402
from fcn_jax import jit as fcn_jit  # noqa: E402
from fcn_jax.inference import compile_forward  # noqa: E402
from fcn_jax.io_utils import atomic_save_json  # noqa: E402
from fcn_jax.net import run_graph  # noqa: E402

SOURCE = ROOT / "tests" / "data" / "source"
FC_SHAPES = {"fc6": (256, 6, 6), "fc7": (4096, 1, 1), "fc8": (4096, 1, 1)}


# ----------------------------------------------------------------------------- setup


def random_params(seed: int = 0) -> tuple[dict, dict]:
    """Full CaffeNet weights, He-normal (so activations neither vanish nor explode), as the
    classifier tree and the tutorial's fully convolutional transplant (same memory)."""
    from fcn_jax.net import build_module, expected_param_shapes

    module = build_module(converters.read_prototxt(SOURCE / "deploy.prototxt"))
    shapes = expected_param_shapes(module, (1, 3, 227, 227))
    rng = np.random.default_rng(seed)
    cls = {}
    for layer, blobs in shapes.items():
        w = blobs["weight"]
        fan_in = int(np.prod(w[1:]))
        cls[layer] = {"weight": (rng.standard_normal(w, dtype=np.float32)
                                 * np.float32(np.sqrt(2.0 / fan_in))),
                      "bias": rng.uniform(0, 0.05, blobs["bias"]).astype(np.float32)}
    # scale fc8 so that the logits spread like a trained net's (std ~3 for these inputs):
    # a softmax saturated to one-hot would make the prob comparison meaningless
    g, _ = converters.load_caffe(SOURCE / "deploy.prototxt", cls)
    x = np.random.default_rng(seed + 1).standard_normal((4, 3, 227, 227), dtype=np.float32)
    logits = np.asarray(jax.jit(lambda p, x: g.apply({"params": p}, x, outputs=("fc8",)))(
        cls, x * 40)["fc8"])
    s = np.float32(3.0 / max(float(logits.std()), 1e-6))
    cls["fc8"] = {"weight": cls["fc8"]["weight"] * s, "bias": cls["fc8"]["bias"] * s}
    fcn = {k: v for k, v in cls.items() if not k.startswith("fc")}
    for fc, shp in FC_SHAPES.items():
        fcn[f"{fc}-conv"] = {"weight": cls[fc]["weight"].reshape((-1,) + shp),
                             "bias": cls[fc]["bias"]}
    return cls, fcn


def count_flops(module, x_shape) -> float:
    """2 x the multiply-adds of every Convolution and InnerProduct for input ``x_shape``."""
    shapes = {}

    def get(spec, bottom_shapes):
        from fcn_jax.net import param_shapes

        shapes[spec.name] = (bottom_shapes, param_shapes(spec, bottom_shapes))
        return {k: jnp.zeros(s, jnp.float32) for k, (s, _) in shapes[spec.name][1].items()}

    name = module.inputs[0]
    out = jax.eval_shape(lambda x: run_graph(module.layers, get, {name: x})[0],
                         jax.ShapeDtypeStruct(x_shape, jnp.float32))
    total = 0
    for spec in module.layers:
        if spec.type == "Convolution":
            w = shapes[spec.name][1]["weight"][0]
            y = out[spec.tops[0]].shape
            total += 2 * y[0] * y[2] * y[3] * int(np.prod(w))
        elif spec.type == "InnerProduct":
            w = shapes[spec.name][1]["weight"][0]
            total += 2 * x_shape[0] * int(np.prod(w))
    return float(total)


def gemm_peak_numpy(n: int = 2048, reps: int = 7) -> float:
    """Best float32 GFLOP/s of ``a @ b`` (n x n) with numpy in this process."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def gemm_peak_jax(n: int = 2048, reps: int = 7) -> float:
    """Best float32 GFLOP/s of ``jax.jit(jnp.dot)`` (n x n)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    f = jax.jit(lambda a: jnp.dot(a, a, precision="highest"))
    jax.block_until_ready(f(a))
    best = min(_timed(lambda: jax.block_until_ready(f(a))) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def gemm_peak_subprocess(coretype: str, n: int = 2048) -> float | None:
    """numpy GEMM peak with ``OPENBLAS_CORETYPE=coretype`` (read when OpenBLAS loads)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'experiments')!r}); "
            f"from bench_dense import gemm_peak_numpy; print(gemm_peak_numpy({n}))")
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
        return float(r.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def read_bandwidth(mb: int = 256, reps: int = 7) -> dict[str, float]:
    """Memory read bandwidth (GB/s) in this process: the best time to sum ``mb`` MB of
    float32 with a jitted ``jnp.sum``, numpy and (if installed) torch."""
    n = mb * 2**20 // 4
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    out = {}
    aj = jnp.asarray(a)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(aj))
    out["jnp.sum"] = a.nbytes / min(_timed(lambda: jax.block_until_ready(f(aj)))
                                    for _ in range(reps)) / 1e9
    a.sum()
    out["numpy sum"] = a.nbytes / min(_timed(a.sum) for _ in range(reps)) / 1e9
    try:
        import torch

        t = torch.from_numpy(a)
        t.sum()
        out["torch sum"] = a.nbytes / min(_timed(t.sum) for _ in range(reps)) / 1e9
    except ImportError:
        pass
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Run every function once per round, in turn; seconds per call for each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return times


def xla_memory(jitted, *args) -> tuple[float, int | None]:
    """(lower + compile seconds, XLA's planned bytes: arguments + outputs + temporaries)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    secs = time.perf_counter() - t
    try:
        m = compiled.memory_analysis()
        total = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes)
    except Exception:  # memory_analysis is not available on every backend
        total = None
    return secs, total


# ----------------------------------------------------------------------------- cases


def run_case(name: str, impls: dict, rounds: int, flops: float, peak: float,
             check: dict | None = None, images: int = 1, refs: dict | None = None
             ) -> list[dict]:
    """Time ``impls`` (label -> (call, compile_s, mem_bytes, prob_fn)) interleaved; ``images``
    per call gives the images/s column. ``refs``: {"gemm": (call, flops), "read": (call,
    bytes)}, timed in the same rounds: each row then carries the GEMM rate (GFLOP/s) and read
    bandwidth (GB/s) of its own rounds, which a shared machine's load moves with ours."""
    calls = {k: v[0] for k, v in impls.items()}
    for k, (fn, _) in (refs or {}).items():
        calls[f"ref {k}"] = fn
    for fn in calls.values():  # warm up (first call compiles the jit cache)
        fn()
    times = interleaved(calls, rounds)
    same = {k: amount / float(np.median(times.pop(f"ref {k}"))) / 1e9
            for k, (_, amount) in (refs or {}).items()}
    torch_med = next((float(np.median(t)) for k, t in times.items() if k.startswith("torch")),
                     None)
    peer_meds = {k: float(np.median(t)) for k, t in times.items() if is_peer(k)}
    best_peer = min(peer_meds, key=peer_meds.get) if peer_meds else None
    rows = []
    for k, t in times.items():
        med, best = float(np.median(t)), float(np.min(t))
        row = {"case": name, "impl": k, "median_ms": med * 1e3, "min_ms": best * 1e3,
               "images_per_s": images / med,
               "compile_s": impls[k][1], "xla_memory_mb": (impls[k][2] / 2**20
                                                           if impls[k][2] else None),
               "gflops": flops / med / 1e9, "frac_gemm_peak": flops / med / 1e9 / peak,
               "speedup_vs_torch": (torch_med / med) if torch_med else None,
               "fastest_peer": best_peer,
               "gemm_gflops_same_rounds": same.get("gemm"),
               "frac_gemm_same_rounds": (flops / med / 1e9 / same["gemm"]
                                         if "gemm" in same else None),
               "read_gbs_same_rounds": same.get("read"),
               "ratio_to_fastest_peer": (med / peer_meds[best_peer]) if best_peer else None,
               "max_abs_diff_prob_vs_torch": (check or {}).get(k)}
        rows.append(row)
    return rows


PEERS = ("torch", "onnxruntime", "opencv")


def is_peer(impl: str) -> bool:
    """Whether a row label is one of the peers (not fcn-jax)."""
    return impl.startswith(PEERS)


def print_table(rows: list[dict]) -> None:
    head = (f"{'case':<28}{'impl':<30}{'median ms':>10}{'min ms':>9}{'img/s':>8}"
            f"{'x best peer':>12}"
            f"{'GFLOP/s':>9}{'%peak':>7}{'compile s':>10}{'XLA MB':>8}{'|dprob|':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{r['case']:<28}{r['impl']:<30}{r['median_ms']:>10.1f}{r['min_ms']:>9.1f}"
              f"{r['images_per_s']:>8.1f}"
              f"{f(r.get('ratio_to_fastest_peer'), '12.2f'):>12}{r['gflops']:>9.1f}"
              f"{100 * r['frac_gemm_peak']:>7.1f}{f(r['compile_s'], '10.2f'):>10}"
              f"{f(r['xla_memory_mb'], '8.0f'):>8}{f(r['max_abs_diff_prob_vs_torch'], '9.1e'):>9}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_dense.json"))
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime peer")
    ap.add_argument("--no-opencv", action="store_true", help="skip the OpenCV dnn peer")
    ap.add_argument("--profile", action="store_true",
                    help="ONNX Runtime per node and fcn-jax per layer, batch 1 and 10")
    ap.add_argument("--bf16", action="store_true", help="also the bfloat16 engine (GPU)")
    ap.add_argument("--stream", type=int, default=24, help="images in the many-sizes stream")
    ap.add_argument("--layers", action="store_true", help="per-layer formulation experiments")
    ap.add_argument("--fast-flags", action="store_true",
                    help="opt in to fcn_jax.inference.FAST_CPU_XLA_FLAGS first")
    args = ap.parse_args(argv)
    if args.fast_flags:
        from fcn_jax.inference import use_fast_cpu_flags

        if not use_fast_cpu_flags():
            raise SystemExit("JAX backends already started: cannot set XLA flags")

    backend = jax.default_backend()
    gpu = backend == "gpu"
    load0 = os.getloadavg()
    print(f"jax {jax.__version__} backend {backend} devices {jax.devices()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load {load0}", flush=True)
    peaks = {"numpy": gemm_peak_numpy()}
    for ct in ("SkylakeX", "Zen", "Haswell"):
        peaks[f"numpy OPENBLAS_CORETYPE={ct}"] = gemm_peak_subprocess(ct)
    peaks["jnp.dot"] = gemm_peak_jax()
    peak = max(v for v in peaks.values() if v)
    print("float32 GEMM 2048^3 GFLOP/s: " + ", ".join(
        f"{k} {v:.0f}" for k, v in peaks.items() if v), flush=True)
    bandwidth = read_bandwidth()
    bw = max(bandwidth.values())
    print("read bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items()),
          flush=True)

    cls, fcn = random_params()
    g_cls, _ = converters.load_caffe(SOURCE / "deploy.prototxt", cls)
    g_fcn, _ = converters.load_caffe(SOURCE / "bvlc_caffenet_full_conv.prototxt", fcn)
    pj_cls = jax.device_put(cls)
    pj_fcn = jax.device_put(fcn)
    rng = np.random.default_rng(1)
    img451 = (rng.standard_normal((1, 3, 451, 451), dtype=np.float32) * 40)
    x10 = (rng.standard_normal((10, 3, 227, 227), dtype=np.float32) * 40)
    x1 = x10[:1].copy()
    crops = np.stack([img451[0, :, 32 * i:32 * i + 227, 32 * j:32 * j + 227]
                      for i in range(8) for j in range(8)])

    weight_bytes = sum(int(np.asarray(a).nbytes) for v in cls.values() for a in v.values())
    peers = {}
    peer_device = "cpu"
    if not args.no_torch:
        import torch

        from experiments.peers.torch_caffenet import TorchCaffeNet, torch_forward
        dev = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        peers = {"cls": TorchCaffeNet(cls, False, device=dev),
                 "fcn": TorchCaffeNet(fcn, True, device=dev)}
        peer_device = dev
        print(f"torch {torch.__version__} on {dev}, {torch.get_num_threads()} threads",
              flush=True)
    others: dict[str, dict] = {}  # label -> {"cls": fn, "fcn": fn}
    tmp = tempfile.TemporaryDirectory()
    if not args.no_onnx and not gpu:
        try:
            from experiments.peers.onnx_caffenet import OrtCaffeNet
            o = {"cls": OrtCaffeNet(cls, False), "fcn": OrtCaffeNet(fcn, True)}
            others["onnxruntime"] = o
            others["onnxruntime no-spin"] = {"cls": OrtCaffeNet(cls, False, spin=False),
                                             "fcn": OrtCaffeNet(fcn, True, spin=False)}
            print(f"onnxruntime {o['cls'].version}", flush=True)
        except ImportError as e:
            print(f"onnxruntime peer left out: {e}", flush=True)
    if not args.no_opencv and not gpu:
        try:
            from experiments.peers.onnx_caffenet import OpenCVCaffeNet
            o = {"cls": OpenCVCaffeNet(SOURCE / "deploy.prototxt", cls, tmp.name),
                 "fcn": OpenCVCaffeNet(SOURCE / "bvlc_caffenet_full_conv.prototxt", fcn,
                                       tmp.name)}
            others["opencv dnn"] = o
            print(f"opencv {o['cls'].version}", flush=True)
        except ImportError as e:
            print(f"opencv peer left out: {e}", flush=True)

    def jax_impls(graph, pj, params, fully_conv, x, with_engine=True):
        cnet = CaffeNet(fully_conv=fully_conv)
        impls = {}
        for label, module in (("load_caffe", graph), ("CaffeNet", cnet)):
            # as a user writes it (XLA's default kernels), and with fcn_jax.jit (the fast
            # kernel choice of fcn_jax.xla, per function)
            for how, jit in (("jax.jit", jax.jit), ("fcn_jax.jit", fcn_jit)):
                f = jit(module.apply)
                impls[f"{label} {how}(apply)"] = (
                    lambda f=f: jax.block_until_ready(f({"params": pj}, x)),
                    *xla_memory(f, {"params": pj}, x),
                    lambda f=f: np.asarray(f({"params": pj}, x)["prob"]))
        if with_engine:
            eng = compile_forward(graph, params, outputs=("prob",), spatial_step=1)
            t = time.perf_counter()
            eng(x)
            first = time.perf_counter() - t
            nb, c, h, w = eng.bucket(x.shape)
            args_ = (eng.params, np.zeros((nb, c, h, w), np.float32), np.full(nb, h, np.int32),
                     np.full(nb, w, np.int32))
            _, mem = xla_memory(eng._fn, *args_)
            impls["compile_forward (engine)"] = (lambda: eng(x), first, mem,
                                                 lambda: eng(x)["prob"])
        return impls

    def add_torch(impls, key, x):
        if key in peers:
            m = peers[key]
            impls[f"torch {peer_device}"] = (lambda: torch_forward(m, x, peer_device), None,
                                             None, lambda: torch_forward(m, x, peer_device))
        for label, o in others.items():
            impls[label] = (lambda f=o[key]: f(x), None, None, lambda f=o[key]: f(x))
        return impls

    def diffs(impls):
        probs = {k: v[3]() for k, v in impls.items()}
        ref_key = next((k for k in probs if k.startswith("torch")),
                       next((k for k in probs if is_peer(k)), None))
        if ref_key is None:
            return {}
        return {k: float(np.max(np.abs(probs[k] - probs[ref_key]))) for k in probs
                if k != ref_key}

    rows: list[dict] = []
    cases = [("dense 451x451 (8x8 map)", g_fcn, pj_fcn, fcn, True, img451, "fcn"),
             ("classifier 227 batch 10", g_cls, pj_cls, cls, False, x10, "cls"),
             ("classifier 227 batch 1", g_cls, pj_cls, cls, False, x1, "cls")]
    ga = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32))
    gdot = jax.jit(lambda a: jnp.dot(a, a, precision="highest"))
    ra = jnp.asarray(np.random.default_rng(0).standard_normal(64 * 2**20, dtype=np.float32))
    rsum = jax.jit(jnp.sum)
    refs = {"gemm": (lambda: jax.block_until_ready(gdot(ga)), 2 * 2048**3),
            "read": (lambda: jax.block_until_ready(rsum(ra)), ra.nbytes)}
    for name, graph, pj, params, fc, x, key in cases:
        impls = add_torch(jax_impls(graph, pj, params, fc, x), key, x)
        check = diffs(impls)
        rows += run_case(name, impls, args.rounds, count_flops(graph, x.shape), peak, check,
                         images=x.shape[0], refs=refs)
        print_table(rows[-len(impls):])
        print(flush=True)

    # dense map vs the 64 crops it stands for, as one batch
    eng_c = compile_forward(g_cls, cls, outputs=("prob",))
    eng_d = compile_forward(g_fcn, fcn, outputs=("prob",), spatial_step=1)
    t = time.perf_counter()
    eng_c(crops)
    first_c = time.perf_counter() - t
    impls = {"64 crops, engine batch 64": (lambda: eng_c(crops), first_c, None, None),
             "dense 8x8 map, engine": (lambda: eng_d(img451), None, None, None)}
    if "cls" in peers:
        m = peers["cls"]
        impls["64 crops, torch batch 64"] = (lambda: torch_forward(m, crops, peer_device),
                                             None, None, None)
    crop_rows = run_case("8x8 map vs 64 crops", impls, max(3, args.rounds // 2),
                         count_flops(g_cls, crops.shape), peak)
    for r in crop_rows:
        if r["impl"].startswith("dense"):
            r["gflops"] = count_flops(g_fcn, img451.shape) / r["median_ms"] * 1e3 / 1e9
            r["frac_gemm_peak"] = r["gflops"] / peak
    rows += crop_rows
    print_table(crop_rows)

    # a stream of many sizes: compile counts and exactness
    stream = stream_case(g_fcn, fcn, pj_fcn, args.stream)
    print(f"\nstream of {stream['images']} images, {stream['distinct_sizes']} sizes: "
          f"jit(apply) per size compiled {stream['naive_compiles']}x in "
          f"{stream['naive_s']:.1f} s; engine (step {stream['step']}) compiled "
          f"{stream['engine_compiles']}x in {stream['engine_s']:.1f} s; max |dprob| vs per-size "
          f"{stream['max_abs_diff_vs_per_size']:.1e}")

    bf16 = None
    if args.bf16:
        eng16 = compile_forward(g_fcn, fcn, outputs=("prob",), dtype=jnp.bfloat16,
                                spatial_step=1)
        eng32 = compile_forward(g_fcn, fcn, outputs=("prob",), spatial_step=1)
        t = interleaved({"bf16": lambda: eng16(img451), "f32": lambda: eng32(img451)},
                        args.rounds)
        bf16 = {k: float(np.median(v)) * 1e3 for k, v in t.items()}
        bf16["max_abs_diff_prob"] = float(np.abs(eng16(img451)["prob"]
                                                 - eng32(img451)["prob"]).max())
        print(f"bf16 engine {bf16}")

    d451 = _row(rows, "dense 451x451 (8x8 map)")
    b1 = _row(rows, "classifier 227 batch 1")
    ratios = {impl: d451[impl]["median_ms"] / b1[impl]["median_ms"] for impl in d451
              if impl in b1}
    cr = {r["impl"]: r["median_ms"] for r in crop_rows}
    summary = {
        "dense451_over_227batch1": ratios,
        "crops64_over_dense": cr["64 crops, engine batch 64"] / cr["dense 8x8 map, engine"],
    }
    bw_same = next(iter(b1.values()))["read_gbs_same_rounds"]
    bw = max(bw, bw_same or 0.0)  # the best read bandwidth seen: the strictest limit
    limit_ms = weight_bytes / (bw * 1e9) * 1e3
    summary["read_bandwidth_gbs"] = bandwidth
    summary["weight_bytes"] = weight_bytes
    summary["batch1_bandwidth_limit_ms"] = limit_ms
    summary["batch1_frac_bandwidth_limit"] = {k: limit_ms / r["median_ms"] for k, r in b1.items()}
    summary["dense451_frac_gemm_peak"] = {k: r["frac_gemm_peak"] for k, r in d451.items()}
    summary["dense451_frac_gemm_same_rounds"] = {k: r["frac_gemm_same_rounds"]
                                                 for k, r in d451.items()}
    summary["fastest_peer"] = {case: next(iter(_row(rows, case).values()))["fastest_peer"]
                               for case, *_ in cases}
    print_summary(rows, [c[0] for c in cases])
    print(f"\nbatch 1 bandwidth limit: {weight_bytes / 1e6:.0f} MB of weights at {bw:.1f} GB/s "
          f"= {limit_ms:.1f} ms; reached: " + ", ".join(
              f"{k} {100 * v:.0f}%" for k, v in summary["batch1_frac_bandwidth_limit"].items()))
    print("dense 451 fraction of the GEMM peak (measured before): " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in summary["dense451_frac_gemm_peak"].items()))
    print(f"dense 451 fraction of jnp.dot's rate in the same rounds "
          f"({next(iter(d451.values()))['gemm_gflops_same_rounds']:.0f} GFLOP/s): " + ", ".join(
              f"{k} {100 * v:.0f}%" for k, v in summary["dense451_frac_gemm_same_rounds"].items()))
    profile = None
    if args.profile:
        profile = profile_case_layers(cases, tmp.name, args.rounds)
    print("\ndense 451 time / 227 batch-1 time: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"64 crops (one batch) / dense 8x8 map: {summary['crops64_over_dense']:.1f}x")

    layers = layer_experiments(fcn, img451, args.rounds) if args.layers else None
    result = {
        "jax": jax.__version__, "backend": backend, "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": {k: str(v) for k, v in fcn_jax_compiler_options().items()},
        "machine": platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(), "load_before": load0,
        "load_after": os.getloadavg(), "rounds": args.rounds, "gemm_peak_gflops": peaks,
        "peak_used_gflops": peak, "rows": rows, "summary": summary, "stream": stream,
        "bf16": bf16, "layer_experiments": layers, "profile": profile,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(out, result)
    print(f"wrote {out}")
    return 0


def _row(rows, case):
    return {r["impl"]: r for r in rows if r["case"] == case}


def print_summary(rows: list[dict], cases: list[str]) -> None:
    """One line per case: every implementation's median ms and its ratio to the fastest
    peer of that case."""
    print("\nmedian ms (ratio to the fastest peer of the case; < 1: faster than it)")
    for case in cases:
        r = _row(rows, case)
        best = next(iter(r.values()))["fastest_peer"]
        print(f"  {case} (fastest peer: {best})")
        for k, v in r.items():
            ratio = v["ratio_to_fastest_peer"]
            print(f"    {k:<30}{v['median_ms']:9.1f} ms" + (f"  {ratio:5.2f}x" if ratio else ""))


def profile_case_layers(cases, workdir: str, rounds: int) -> dict:
    """Where the time goes: ONNX Runtime's per-node profile and fcn-jax per layer
    (``fcn_jax.jit`` of the graph cut at each layer's top, successive differences of the
    medians; noisy but ranks the layers), for every case."""
    from experiments.peers.onnx_caffenet import OrtCaffeNet, node_times

    out = {}
    for name, graph, pj, params, fc, x, _ in cases:
        res: dict = {}
        try:
            o = OrtCaffeNet(params, fc, profile_dir=workdir)
            for _ in range(rounds + 2):
                o(x)
            res["onnxruntime_ms"] = node_times(o.end_profiling(), skip=2)
        except ImportError:
            pass
        tops: list[str] = []
        for spec in graph.layers:
            for t in spec.tops:
                if t not in tops and spec.type != "Input":
                    tops.append(t)
        fns = {}
        for t in tops:
            f = fcn_jit(lambda p, x, t=t, g=graph: g.apply({"params": p}, x, outputs=(t,)))
            jax.block_until_ready(f(pj, x))
            fns[t] = lambda f=f, p=pj, x=x: jax.block_until_ready(f(p, x))
        times = interleaved(fns, rounds)
        cum = {t: float(np.median(v)) * 1e3 for t, v in times.items()}
        prev, per = 0.0, {}
        for t in tops:
            per[t] = cum[t] - prev
            prev = cum[t]
        res["fcn_jax_jit_prefix_ms"] = cum
        res["fcn_jax_jit_layer_ms"] = per
        out[name] = res
        print(f"\nprofile {name}:")
        print("  onnxruntime per node (ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in res.get("onnxruntime_ms", {}).items()))
        print("  fcn_jax.jit per layer (ms, prefix differences): " + ", ".join(
            f"{k} {v:.2f}" for k, v in per.items()))
    return out


def stream_case(graph, params, pj, n: int, step: int = 128) -> dict:
    """``n`` images of random sizes through ``jax.jit(apply)`` (compiles per size) and the
    bucketed engine (compiles per bucket): counts, wall time, largest difference."""
    rng = np.random.default_rng(7)
    sizes = [(int(rng.integers(227, 480)), int(rng.integers(227, 480))) for _ in range(n)]
    images = [rng.standard_normal((3, h, w), dtype=np.float32) * 40 for h, w in sizes]
    compiles = {"n": 0}

    def counted(p, x):
        compiles["n"] += 1
        return graph.apply({"params": p}, x, outputs=("prob",))

    naive = jax.jit(counted)
    t = time.perf_counter()
    ref = [np.asarray(naive(pj, im[None])["prob"][0]) for im in images]
    naive_s = time.perf_counter() - t
    eng = compile_forward(graph, params, outputs=("prob",), spatial_step=step)
    t = time.perf_counter()
    got = [r["prob"] for r in eng.stream(images, batch_size=1)]
    eng_s = time.perf_counter() - t
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref, strict=True))
    return {"images": n, "distinct_sizes": len(set(sizes)), "step": step,
            "naive_compiles": compiles["n"], "naive_s": naive_s,
            "engine_compiles": eng.compile_count, "engine_s": eng_s,
            "engine_shapes": [list(s) for s in eng.compiled_shapes],
            "max_abs_diff_vs_per_size": diff}


# ----------------------------------------------------------------------------- experiments


def layer_experiments(fcn: dict, img: np.ndarray, rounds: int) -> list[dict]:
    """Each CaffeNet layer at 451x451 in the formulations tried (ms, median)."""
    from jax import lax

    from fcn_jax import layers as L
    from fcn_jax import nhwc as F

    p = jax.device_put(fcn)
    x = F.to_nhwc(jnp.asarray(img))
    out = []

    def rec(layer, label, fn, *a):
        f = jax.jit(fn)
        jax.block_until_ready(f(*a))
        t = interleaved({0: lambda: jax.block_until_ready(f(*a))}, rounds)[0]
        out.append({"layer": layer, "formulation": label, "median_ms": float(np.median(t)) * 1e3})
        print(f"  {layer:<10}{label:<52}{out[-1]['median_ms']:8.1f} ms", flush=True)
        return f(*a)

    specs = ((11, 4, 0, 1), (5, 1, 2, 2), (3, 1, 1, 1), (3, 1, 1, 2), (3, 1, 1, 2))
    h = x
    for i, (_k, s, pad, g) in enumerate(specs):
        n = f"conv{i + 1}"
        w, b = p[n]["weight"], p[n]["bias"]
        rec(n, "NCHW lax.conv (feature_group_count)", lambda x, w, b, s=s, pad=pad, g=g:
            L.convolution(x, w, b, stride=s, pad=pad, group=g), F.to_nchw(h), w, b)
        if g > 1:
            rec(n, "NHWC lax.conv (feature_group_count)",
                lambda x, w, b, s=s, pad=pad, g=g: lax.conv_general_dilated(
                    x, jnp.transpose(w, (2, 3, 1, 0)), (s, s), [(pad, pad)] * 2,
                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g,
                    precision="highest") + b, h, w, b)
        rec(n, "NHWC patches + dot", lambda x, w, b, s=s, pad=pad, g=g: F.conv_nhwc(
            x, w, b, stride=s, pad=pad, group=g, method="patches"), h, w, b)
        wp = F.prepare_conv_weight(w, g)
        h = rec(n, "NHWC lax.conv per group, prepared HWIO (used)",
                lambda x, w, b, s=s, pad=pad, g=g: jnp.maximum(F.conv_nhwc(
                    x, w, b, stride=s, pad=pad, group=g, method="conv"), 0), h, wp, b)
        if i in (0, 1, 4):
            rec(f"pool{i + 1}", "reduce_window", lambda x: lax.reduce_window(
                x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID"), h)
            h = rec(f"pool{i + 1}", "max of 9 strided slices, ceil pad fused (used)",
                    lambda x: F.pool_nhwc(x, kernel=3, stride=2), h)
        if i in (0, 1):
            rec(f"norm{i + 1}", "NCHW layers.lrn", lambda x: L.lrn(
                x, local_size=5, alpha=1e-4, beta=0.75), F.to_nchw(h))
            h = rec(f"norm{i + 1}", "NHWC 5 channel shifts, 1/sqrt(s sqrt s) (used)",
                    lambda x: F.lrn_nhwc(x, local_size=5, alpha=1e-4, beta=0.75), h)
    for n, methods in (("fc6-conv", ("conv", "patches")), ("fc7-conv", ("conv", "dot")),
                       ("fc8-conv", ("conv", "dot"))):
        w, b = p[n]["weight"], p[n]["bias"]
        for m in methods:
            label = {"conv": "lax.conv", "patches": "gathered patches + one dot (used)",
                     "dot": "one dot, weight untransposed (used)"}[m]
            y = rec(n, label, lambda x, w, b, m=m: F.conv_nhwc(x, w, b, method=m), h, w, b)
        h = jnp.maximum(y, 0)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
