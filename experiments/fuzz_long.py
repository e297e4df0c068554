"""Long fuzzing run of every fcn-jax reader: coverage-guided with atheris when it is
installed (``pip install atheris``; an experiment tool, not a dependency), else hypothesis
with many examples.

Targets (each fed arbitrary bytes, seeded with the real reference files in tests/data):
  caffemodel  converters.parse_caffemodel + net_params, and the zero-copy wire scanner
  prototxt    converters.parse_prototxt + fcn_jax.net.compile_net (structure checks)
  checkpoint  converters.legacy_checkpoint (old fcn-jax/2 weights files)
  mean        converters.mean.parse_binaryproto (binaryproto means; packed and unpacked)
  npy         converters.npy.load_npy / load_npz
  image       fcn_jax.images.read_image (multi-frame GIF/APNG/TIFF, palette, 16-bit, JPEG,
              a 3-frame 8000x8000 GIF bomb; pixel budget 2 Mpx)
  annotations fcn_jax.data.read_annotations (JSON lines; extreme numbers spliced in)
  npzname     fcn_jax.io_utils.save_blobs / load_blobs (arbitrary blob names, NUL, ../, %)
  graph       random prototxt graphs from the input bytes (tests/fuzz_graphs.py: many
              bottoms/tops, long chains, duplicate tops, NetState rules, unknown fields),
              checked against what Caffe keeps and refuses
  ckptdir     a training checkpoint folder with one file damaged (truncated, flipped,
              emptied, deleted, bad or 100,000-deep JSON): exact params or one line

A "crash" is any exception other than the documented one (CaffeFormatError, of which
ImageError is one), a message that is not one line, or a result breaking the reader's
contract (an image over the pixel budget, a non-finite or out-of-range box, a blob name that
does not come back). Unique crashes (by type
and place) are saved under results/fuzz_crashes/. Prints a table and writes
results/fuzz_long.json.

    python experiments/fuzz_long.py [--seconds 120] [--targets caffemodel,prototxt,...]
                                    [--engine atheris|hypothesis]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
RESULTS = ROOT / "results"
TARGETS = ("caffemodel", "prototxt", "checkpoint", "mean", "npy", "image", "annotations",
           "npzname", "graph", "ckptdir")


# ----------------------------------------------------------------------------- seeds


def seeds(target: str) -> list[bytes]:
    """Real files to start from."""
    import io

    import numpy as np

    if target == "caffemodel":
        files = sorted((DATA / "layers").glob("*.caffemodel")) + sorted(
            (DATA / "zoo").glob("*.caffemodel"))
        return [p.read_bytes() for p in files]
    if target == "prototxt":
        files = sorted((DATA / "layers").glob("*.prototxt")) + sorted(
            (DATA / "zoo").glob("*.prototxt")) + sorted((DATA / "source").glob("*.prototxt"))
        files.append(DATA / "caffenet_mini" / "caffenet_mini_deploy_v1.prototxt")
        return [p.read_bytes() for p in files]
    if target == "checkpoint":
        import sys

        sys.path.insert(0, str(DATA.parent))
        from conftest import legacy_weights_bytes

        tree = {"conv": {"weight": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
                         "bias": np.zeros(2, np.float32)}, "opt": {"n": 3, "l": [1.5, "x"]}}
        return [legacy_weights_bytes(tree, {"prototxt": "name: 'n'"})]
    if target == "mean":
        from converters.proto import caffe_pb2

        mean = np.load(DATA / "source" / "ilsvrc_2012_mean_bgr.npy", allow_pickle=False)
        legacy = caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2)
        legacy.data.extend(np.repeat(mean.astype(np.float32), 4))
        shaped = caffe_pb2.BlobProto()
        shaped.shape.dim.extend([3, 1, 1])
        shaped.double_data.extend(mean)
        unpacked = caffe_pb2.BlobProto(num=1, channels=3, height=1, width=1).SerializeToString()
        unpacked += b"".join(b"\x2d" + np.float32(v).tobytes() for v in mean)
        return [legacy.SerializeToString(), shaped.SerializeToString(), unpacked]
    if target == "npy":
        mean = np.load(DATA / "source" / "ilsvrc_2012_mean_bgr.npy", allow_pickle=False)
        a, z = io.BytesIO(), io.BytesIO()
        np.save(a, mean)
        np.savez_compressed(z, mean=mean, grid=np.arange(6, dtype=np.int16).reshape(2, 3))
        return [a.getvalue(), z.getvalue()]
    if target == "image":
        sys.path.insert(0, str(ROOT / "tests"))
        from test_fuzz import _IMAGES

        return list(_IMAGES)
    if target == "annotations":
        lines = [{"image": "a.png", "boxes": [[1, 2, 30, 40, 1], [5.5, 6, 7, 8.25, 3]]},
                 {"image": "/abs/b.jpg", "boxes": []},
                 {"image": "c.png", "boxes": [[0, 0, 1e3, 2e3, 65535]]}]
        return ["\n".join(json.dumps(x) for x in lines[:k]).encode() + b"\n"
                for k in (1, 2, 3)]
    if target in ("graph", "ckptdir"):
        return [bytes([i]) * 8 for i in range(8)]
    if target == "npzname":
        return [b"conv1\0conv1/relu\0inception_3a/1x1", b"a\0a%00\0../x\0/y\0\x1b[31m",
                "é\0名前\0.\0..\0".encode(), b"file\0allow_pickle\0.npy\0a.npy"]
    raise ValueError(target)


_EXTREME = [b"0", b"-1", b"1e308", b"-1e308", b"NaN", b"Infinity", b"1000000000", b"65536",
            b"16777217", b"1e999", b"true", b"null", b'"x"', b"[]", b"1" + b"0" * 400]


def extra_mutation(target: str, data: bytes, rng) -> bytes:
    """Target-aware mutations: for annotations, a number replaced by an extreme value."""
    import re

    if target != "annotations":
        return data
    nums = list(re.finditer(rb"-?\d+(\.\d+)?(e-?\d+)?", data))
    if not nums:
        return data
    m = rng.choice(nums)
    return data[:m.start()] + rng.choice(_EXTREME) + data[m.end():]


# ----------------------------------------------------------------------------- targets


def make_target(target: str, scratch: Path):
    """``fn(data: bytes)``: run the reader; returns normally on success or on the documented
    error, raises anything else."""
    import converters
    from converters import CaffeFormatError

    def expect_one_line(e: BaseException) -> None:
        if "\n" in str(e) or len(str(e)) > 800:
            raise AssertionError(f"message not one short line: {str(e)[:200]!r}")

    if target == "caffemodel":
        from converters.wire import blob_array, scan_caffemodel

        def fn(data: bytes) -> None:
            try:
                converters.net_params(converters.parse_caffemodel(data, "f"), path="f")
            except CaffeFormatError as e:
                expect_one_line(e)
            try:
                scanned = scan_caffemodel(data)
            except CaffeFormatError as e:
                expect_one_line(e)
                return
            if scanned is not None:
                for refs in scanned[1]:
                    for ref in refs:
                        try:
                            blob_array(data, ref, memory_budget=2**30)
                        except CaffeFormatError as e:
                            expect_one_line(e)
        return fn
    if target == "prototxt":
        from fcn_jax.net import compile_net

        def fn(data: bytes) -> None:
            try:
                net = converters.parse_prototxt(data.decode("utf-8"), "f")
                compile_net(net, path="f")
            except UnicodeDecodeError:
                pass  # read_prototxt reports this itself before parsing
            except CaffeFormatError as e:
                expect_one_line(e)
        return fn
    if target == "checkpoint":
        from converters.legacy_checkpoint import parse_legacy_checkpoint as parse_checkpoint

        def fn(data: bytes) -> None:
            try:
                parse_checkpoint(data, "f")
            except CaffeFormatError as e:
                expect_one_line(e)
        return fn
    if target == "mean":
        from converters.mean import parse_binaryproto

        def fn(data: bytes) -> None:
            try:
                arr = parse_binaryproto(data, "f", memory_budget=2**30)
            except CaffeFormatError as e:
                expect_one_line(e)
                return
            if arr.dtype.kind != "f" or arr.size == 0:
                raise AssertionError(f"bad mean {arr.dtype} {arr.shape}")
        return fn
    if target == "image":
        from fcn_jax.images import ImageError, read_image

        path = scratch / "x.img"

        def fn(data: bytes) -> None:
            path.write_bytes(data)
            try:
                img = read_image(path, max_pixels=2_000_000)
            except ImageError as e:
                expect_one_line(e)
                return
            if img.dtype.name != "float32" or img.ndim != 3 or img.shape[2] != 3 \
                    or img.shape[0] * img.shape[1] > 2_000_000:
                raise AssertionError(f"bad image {img.dtype} {img.shape}")
        return fn
    if target == "annotations":
        import numpy as np

        from fcn_jax import data as D

        path = scratch / "ann.jsonl"

        def fn(data: bytes) -> None:
            path.write_bytes(data)
            try:
                records = D.read_annotations(path)
            except CaffeFormatError as e:
                expect_one_line(e)
                return
            for _, arr in records:
                b = arr.reshape(-1, 5)
                ok = (np.all(np.isfinite(b)) and np.all(np.abs(b[:, :4]) <= D.MAX_COORD)
                      and np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
                      and np.all((b[:, 4] >= 1) & (b[:, 4] <= D.MAX_LABEL))
                      and np.all(b[:, 4] == np.round(b[:, 4])))
                if not ok:
                    raise AssertionError(f"invalid boxes accepted: {b.tolist()[:3]}")
            D.label_gaps({int(v) for _, a in records for v in a[:, 4]})
        return fn
    if target == "npzname":
        import zipfile

        import numpy as np

        from fcn_jax.io_utils import load_blobs, save_blobs

        path = scratch / "b.npz"

        def fn(data: bytes) -> None:
            names = list(dict.fromkeys(data.decode("utf-8", "replace").split("\0")))[:8]
            blobs = {n: np.full(1, i, np.float32) for i, n in enumerate(names)}
            try:
                written = save_blobs(path, blobs)
            except CaffeFormatError as e:
                expect_one_line(e)
                return
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
            back = load_blobs(path)
            if written != len(names) or len(members) != len(names) or sorted(back) != sorted(
                    names) or any(m.startswith(("/", "../")) or "/../" in m for m in members):
                raise AssertionError(f"names {names!r} came back as {sorted(back)!r}")
        return fn
    if target == "graph":
        return _graph_target(expect_one_line)
    if target == "ckptdir":
        return _ckptdir_target(expect_one_line, scratch)
    if target == "npy":
        from converters.npy import load_npy, load_npz

        path = scratch / "a"

        def fn(data: bytes) -> None:
            path.write_bytes(data)
            try:
                load_npz(path) if data[:2] == b"PK" else load_npy(path)
            except CaffeFormatError as e:
                expect_one_line(e)
        return fn
    raise ValueError(target)


def _seeded(data: bytes):
    import random

    return random.Random(int.from_bytes(hashlib.sha256(data).digest()[:8], "little"))


def _graph_target(expect_one_line):
    sys.path.insert(0, str(ROOT / "tests"))
    import jax
    import numpy as np
    from fuzz_graphs import random_graph

    import converters
    from converters import CaffeFormatError
    from fcn_jax import layer_table

    def fn(data: bytes) -> None:
        g = random_graph(_seeded(data), layer_table.MAX_LAYERS)
        try:
            net = converters.parse_prototxt(g.text)
            layers = layer_table.compile_net(net, stages=g.stages, level=g.level)
        except CaffeFormatError as e:
            expect_one_line(e)
            msg = str(e)
            want = (g.unknown_field if g.unknown_field else "more than the"
                    if g.too_many_layers else "produced by multiple sources"
                    if g.duplicate is not None else None)
            if want is not None and want not in msg:
                raise AssertionError(f"expected {want!r} in {msg!r}") from None
            if want is None and ("multiple sources" in msg or "has no field" in msg):
                raise AssertionError(f"wrongly refused: {msg}") from None
            return
        if g.unknown_field or g.duplicate is not None or g.too_many_layers:
            raise AssertionError(f"accepted what Caffe refuses: {g}")
        if sorted(s.name for s in layers) != sorted(g.kept):
            raise AssertionError(f"kept {[s.name for s in layers]}, Caffe keeps {g.kept}")
        if len(layers) <= 40:
            try:
                module, params = converters.load_caffe(net, stages=g.stages, level=g.level)
                jax.eval_shape(lambda p, x: module.apply({"params": p}, x), params,
                               jax.ShapeDtypeStruct((1, 4, 3, 3), np.float32))
            except CaffeFormatError as e:
                expect_one_line(e)
    return fn


def _ckptdir_target(expect_one_line, scratch: Path):
    import shutil

    sys.path.insert(0, str(ROOT / "tests"))
    import jax.numpy as jnp
    import numpy as np
    import optax
    from fuzz_graphs import damage_checkpoint

    import converters
    from converters import CaffeFormatError
    from fcn_jax import train as T

    proto = scratch / "t.prototxt"
    proto.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
        'dim: 3 } } }\nlayer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
        'inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 1 } } }')
    module, params = converters.load_caffe(proto, seed=2)
    state = T.create_train_state(module, params, optax.adam(0.1))
    src = scratch / "ck"
    T.save_train_state(src, state.replace(step=jnp.int32(5)), {"train_loss": [0.5]}, keep=1)

    def fn(data: bytes) -> None:
        dst = scratch / "damaged"
        shutil.rmtree(dst, ignore_errors=True)
        how = damage_checkpoint(src, dst, _seeded(data))
        try:
            restored, _ = T.restore_train_state(dst, state)
        except CaffeFormatError as e:
            expect_one_line(e)
            return
        for k, v in state.params["fc"].items():
            if not np.array_equal(np.asarray(restored.params["fc"][k]), np.asarray(v)):
                raise AssertionError(f"resumed with changed weights after {how}")
    return fn


class Recorder:
    """Counts cases and keeps one input per unique crash (exception type + place)."""

    def __init__(self, target: str, fn, out: Path):
        self.target, self.fn, self.out = target, fn, out
        self.cases = 0
        self.crashes: dict[str, dict] = {}
        self.last_flush = time.monotonic()

    def __call__(self, data: bytes) -> None:
        self.cases += 1
        try:
            self.fn(data)
        except Exception as e:  # noqa: BLE001 - a crash is what we are looking for
            tb = traceback.extract_tb(e.__traceback__)
            place = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
            key = f"{type(e).__name__} at {place}"
            if key not in self.crashes:
                digest = hashlib.sha1(data).hexdigest()[:12]
                crash_dir = RESULTS / "fuzz_crashes"
                crash_dir.mkdir(parents=True, exist_ok=True)
                (crash_dir / f"{self.target}-{digest}.bin").write_bytes(data)
                self.crashes[key] = {"message": str(e)[:300], "input": f"{self.target}-{digest}"
                                     ".bin", "size": len(data), "count": 0}
                print(f"[{self.target}] new crash: {key}: {str(e)[:200]}", file=sys.stderr)
            self.crashes[key]["count"] += 1
        if time.monotonic() - self.last_flush > 2:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cases": self.cases, "crashes": self.crashes}))
        os.replace(tmp, self.out)


# ----------------------------------------------------------------------------- engines


def child_atheris(target: str, seconds: int, out: Path) -> None:
    """Run inside a fresh process: instrument our packages, then libFuzzer until time's up."""
    import atheris

    with atheris.instrument_imports(include=["converters", "fcn_jax"]):
        import converters  # noqa: F401
        import converters.legacy_checkpoint  # noqa: F401
        import converters.mean  # noqa: F401
        import converters.npy  # noqa: F401
        import converters.wire  # noqa: F401
        import fcn_jax.data  # noqa: F401
        import fcn_jax.images  # noqa: F401
        import fcn_jax.io_utils  # noqa: F401
        import fcn_jax.net  # noqa: F401
        import fcn_jax.preprocess  # noqa: F401
    scratch = Path(tempfile.mkdtemp())
    rec = Recorder(target, make_target(target, scratch), out)
    corpus = scratch / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds(target)):
        (corpus / f"seed{i}").write_bytes(s)
    import atexit

    atexit.register(rec.flush)
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-max_len=65536",
                   "-rss_limit_mb=4096", "-timeout=20", str(corpus)], rec)
    atheris.Fuzz()


def run_atheris(target: str, seconds: int) -> dict:
    out = RESULTS / f"fuzz_{target}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", target, "--seconds",
                           str(seconds)], env=env, capture_output=True, text=True,
                          timeout=seconds + 600)
    elapsed = time.monotonic() - start
    stats = json.loads(out.read_text()) if out.exists() else {"cases": 0, "crashes": {}}
    cov = ft = None
    for line in proc.stderr.splitlines():
        if " cov: " in line:
            parts = line.split()
            cov = int(parts[parts.index("cov:") + 1])
            if "ft:" in parts:
                ft = int(parts[parts.index("ft:") + 1])
    if proc.returncode not in (0,) and not stats["crashes"]:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        stats["crashes"]["fuzzer stopped"] = {"message": tail[-500:], "count": 1}
    return {"target": target, "engine": "atheris", "seconds": round(elapsed, 1),
            "cases": stats["cases"], "coverage_edges": cov, "features": ft,
            "crashes": stats["crashes"]}


def run_hypothesis(target: str, seconds: int) -> dict:
    """Fallback: random byte mutations of the seeds, as many as fit in ``seconds``."""
    import random

    scratch = Path(tempfile.mkdtemp())
    out = RESULTS / f"fuzz_{target}.json"
    rec = Recorder(target, make_target(target, scratch), out)
    pool = seeds(target)
    rng = random.Random(0)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        b = bytearray(rng.choice(pool))
        if rng.random() < 0.5:
            b = bytearray(extra_mutation(target, bytes(b), rng))
        for _ in range(rng.randint(0 if target == "annotations" else 1, 4)):
            if not b:
                break
            k, at = rng.randrange(5), rng.randrange(len(b))
            if k == 0:
                del b[at:]
            elif k == 1:
                b[at] ^= 1 << rng.randrange(8)
            elif k == 2:
                b[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
            elif k == 3:
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                src = rng.randrange(len(b))
                b[at:at + 16] = b[src:src + 16]
        rec(bytes(b))
    rec.flush()
    return {"target": target, "engine": "random mutation", "seconds": round(
        time.monotonic() - start, 1), "cases": rec.cases, "coverage_edges": None,
        "features": None, "crashes": rec.crashes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=120, help="per target (default 120)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--engine", choices=("atheris", "hypothesis"), default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.child:
        child_atheris(args.child, args.seconds, RESULTS / f"fuzz_{args.child}.json")
        return
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    rows = []
    for target in args.targets.split(","):
        print(f"fuzzing {target} with {engine} for {args.seconds} s ...", flush=True)
        run = run_atheris if engine == "atheris" else run_hypothesis
        rows.append(run(target, args.seconds))
    print(f"\n{'target':<11} {'engine':<9} {'seconds':>8} {'cases':>10} {'cases/s':>8} "
          f"{'cov':>6} {'crashes':>8}")
    for r in rows:
        rate = r["cases"] / r["seconds"] if r["seconds"] else 0
        print(f"{r['target']:<11} {r['engine'][:9]:<9} {r['seconds']:>8.0f} {r['cases']:>10,} "
              f"{rate:>8.0f} {r['coverage_edges'] or '-':>6} {len(r['crashes']):>8}")
        for key, c in r["crashes"].items():
            print(f"    {key}: {c['message'][:120]} (x{c['count']})")
    total = {"cases": sum(r["cases"] for r in rows),
             "crashes": sum(len(r["crashes"]) for r in rows)}
    print(f"\ntotal: {total['cases']:,} cases, {total['crashes']} unique crashes")
    (RESULTS / "fuzz_long.json").write_text(json.dumps(
        {"engine": engine, "seconds_per_target": args.seconds, "total": total,
         "targets": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS / 'fuzz_long.json'}")


if __name__ == "__main__":
    main()
