"""CaffeNet's convolutions and dense GEMMs one at a time: each kernel XLA:CPU offers against
ONNX Runtime's (MLAS) on the same op, to say where the whole-net gap to ONNX Runtime lives.

For every convolution of CaffeNet at the shapes of the three ``bench_dense.py`` cases (227 at
batch 1 and 10, the 451 dense map) and for the fully convolutional fc6/fc7 GEMMs (64 rows: the
8x8 map; 1 and 10 rows: the classifier), all with bias, float32:

* ``eigen conv``: ``nhwc.conv_nhwc(method="conv")`` compiled with ``fcn_jax.xla``'s options
  (XLA's Eigen convolution; YNNPACK for dots only): what ``fcn_jax.jit`` runs;
* ``patches+dot``: ``method="patches"`` (strided windows gathered, one YNNPACK dot per group),
  the formulation fc6-conv uses;
* ``ynn conv``: ``method="conv"`` under XLA's defaults (YNNPACK convolution): what a plain
  ``jax.jit`` runs;
* for the GEMMs: YNNPACK's dot (``fcn_jax.xla`` options), Eigen's and XNNPACK's dot, NumPy's
  BLAS;
* ``onnxruntime``: the one-node ONNX graph (``Conv`` with ``group`` / ``Gemm transB=1``) with
  the weight as an initializer (prepacked at session creation), non-spinning threads so that
  its idle workers do not steal the next implementation's cores.

Interleaved rounds (one call of each per round), medians. ``ours / ORT`` is the best fcn-jax
kernel over ONNX Runtime's.

    python experiments/bench_kernels.py [--rounds 15] [--out results/bench_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
from jax import lax  # noqa: E402

from fcn_jax import nhwc as F  # noqa: E402
from fcn_jax.xla import CPU_OPTIONS  # noqa: E402

#: name: (C, O, kernel, stride, pad, group) as in CaffeNet's deploy.prototxt
CONVS = {"conv1": (3, 96, 11, 4, 0, 1), "conv2": (96, 256, 5, 1, 2, 2),
         "conv3": (256, 384, 3, 1, 1, 1), "conv4": (384, 384, 3, 1, 1, 2),
         "conv5": (384, 256, 3, 1, 1, 2)}
#: case: (batch, input side of conv1..conv5)
CASES = {"227 batch 1": (1, (227, 27, 13, 13, 13)), "227 batch 10": (10, (227, 27, 13, 13, 13)),
         "451 dense": (1, (451, 55, 27, 27, 27))}
#: GEMMs (rows, K, O): fc6/fc7 as the dense map's 64 rows, the classifier's 1 and 10
GEMMS = {"fc6 dense (64 rows)": (64, 9216, 4096), "fc7 dense (64 rows)": (64, 4096, 4096),
         "fc6 batch 10": (10, 9216, 4096), "fc6 batch 1": (1, 9216, 4096)}
DEFAULTS: dict = {}
EIGEN = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INVALID",
         "xla_cpu_use_xnnpack": False}
XNN = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INVALID",
       "xla_cpu_use_xnnpack": True}


def _compile(fun, args, options):
    return jax.jit(fun).lower(*args).compile(compiler_options=dict(options))


def _ort_session(nodes, inputs, outputs, inits):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def conv_cases(rng):
    """{(case, layer): {impl: (callable, reference check)}}."""
    out = {}
    for case, (n, sides) in CASES.items():
        for (layer, (c, o, k, s, p, g)), h in zip(CONVS.items(), sides, strict=True):
            x = rng.standard_normal((n, h, h, c), np.float32)
            w = (rng.standard_normal((o, c // g, k, k)) * np.sqrt(2 / (c // g * k * k))
                 ).astype(np.float32)
            b = rng.standard_normal(o).astype(np.float32)
            xd, wd, bd = jax.device_put(x), jax.device_put(w), jax.device_put(b)
            wp = F.prepare_conv_weight(wd, g)

            def conv(x, w, b, method, s=s, p=p, g=g):
                return F.conv_nhwc(x, w, b, stride=s, pad=p, group=g, method=method)

            impls = {
                "eigen conv": (_compile(lambda x, w, b: conv(x, w, b, "conv"), (xd, wp, bd),
                                        CPU_OPTIONS), (xd, wp, bd)),
                "patches+dot": (_compile(lambda x, w, b: conv(x, w, b, "patches"),
                                         (xd, wd, bd), CPU_OPTIONS), (xd, wd, bd)),
                "ynn conv": (_compile(lambda x, w, b: conv(x, w, b, "conv"), (xd, wp, bd),
                                      DEFAULTS), (xd, wp, bd)),
            }
            calls = {name: (lambda f=f, a=a: f(*a).block_until_ready())
                     for name, (f, a) in impls.items()}
            ys = {name: np.asarray(f(*a)) for name, (f, a) in impls.items()}
            try:
                from onnx import helper
                node = helper.make_node("Conv", ["x", "W", "B"], ["y"], group=g,
                                        kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
                run = _ort_session([node], [("x", [n, c, h, h])], ["y"], {"W": w, "B": b})
                xc = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
                calls["onnxruntime"] = lambda run=run, xc=xc: run(xc)
                ys["onnxruntime"] = run(xc).transpose(0, 2, 3, 1)
            except ImportError:
                pass
            ref = ys["eigen conv"]
            scale = float(np.abs(ref).max())
            out[(case, layer)] = (calls, {k: float(np.abs(v - ref).max()) / scale
                                          for k, v in ys.items()},
                                  2.0 * ref.size * (c // g) * k * k)
    return out


def gemm_cases(rng):
    out = {}
    for name, (m, k, o) in GEMMS.items():
        a = rng.standard_normal((m, k), np.float32)
        w = (rng.standard_normal((o, k)) / np.sqrt(k)).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        ad, wd, bd = jax.device_put(a), jax.device_put(w), jax.device_put(b)

        def fc(a, w, b):
            return lax.dot_general(a, w, (((1,), (1,)), ((), ())),
                                   precision=lax.Precision.HIGHEST) + b

        impls = {"ynn dot": CPU_OPTIONS, "eigen dot": EIGEN, "xnn dot": XNN}
        compiled = {}
        for impl, opts in impls.items():
            try:
                compiled[impl] = _compile(fc, (ad, wd, bd), opts)
            except Exception:  # an option set this jaxlib does not take  # noqa: BLE001
                continue
        calls = {impl: (lambda f=f, args=(ad, wd, bd): f(*args).block_until_ready())
                 for impl, f in compiled.items()}
        ys = {impl: np.asarray(f(ad, wd, bd)) for impl, f in compiled.items()}
        calls["numpy"] = lambda a=a, w=w, b=b: a @ w.T + b
        ys["numpy"] = a @ w.T + b
        try:
            from onnx import helper
            node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
            run = _ort_session([node], [("x", [m, k])], ["y"], {"W": w, "B": b})
            calls["onnxruntime"] = lambda run=run, a=a: run(a)
            ys["onnxruntime"] = run(a)
        except ImportError:
            pass
        ref = ys["ynn dot"]
        scale = float(np.abs(ref).max())
        out[("GEMM", name)] = (calls, {kk: float(np.abs(v - ref).max()) / scale
                                       for kk, v in ys.items()}, 2.0 * m * k * o)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_kernels.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or ''}"
          f" building ...", flush=True)
    cases = {**conv_cases(rng), **gemm_cases(rng)}
    times: dict = {key: {impl: [] for impl in calls} for key, (calls, _, _) in cases.items()}
    try:
        from tqdm import tqdm
        rounds = tqdm(range(args.rounds), desc="rounds")
    except ImportError:
        rounds = range(args.rounds)
    for _ in rounds:
        for key, (calls, _, _) in cases.items():
            for impl, call in calls.items():
                call()  # warm: the timed call finds caches as the last one left them
                t = time.perf_counter()
                call()
                times[key][impl].append(time.perf_counter() - t)
    rows = []
    for key, (_, errs, flops) in cases.items():
        med = {impl: float(np.median(ts)) * 1e3 for impl, ts in times[key].items()}
        ours = min(v for impl, v in med.items() if impl not in ("onnxruntime", "numpy"))
        rows.append({"case": key[0], "op": key[1], "ms": med, "rel_err": errs,
                     "gflop": flops / 1e9,
                     "ours_over_ort": ours / med["onnxruntime"] if "onnxruntime" in med
                     else None})
    impls = list(dict.fromkeys(i for r in rows for i in r["ms"]))
    head = ["case", "op", *impls, "ours / ORT"]
    print("\nmedian ms (GFLOP/s)\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r['ms'][i]:.2f} ({r['gflop'] / r['ms'][i] * 1e3:.0f})" if i in r["ms"]
                 else "" for i in impls]
        ratio = "" if r["ours_over_ort"] is None else f"{r['ours_over_ort']:.2f}"
        print(f"| {r['case']} | {r['op']} | " + " | ".join(cells) + f" | {ratio} |")
    worst = max(max(r["rel_err"].values()) for r in rows)
    print(f"\nlargest difference between implementations, relative to the output's max: "
          f"{worst:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rounds": args.rounds, "jax": jax.__version__,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
