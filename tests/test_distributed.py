"""Several processes (``jax.distributed``): 2 processes x 1 CPU device over 127.0.0.1 for
``fcn-jax predict`` (a dead peer and a peer that never joins end in one line, a resume per
process, the merged output equal to one process's) and ``finetune`` (equal to one process
with 2 devices, its checkpoint resumed in one process), and the share / row arithmetic."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_caffe_net
from PIL import Image

from fcn_jax import distributed as D
from fcn_jax import predict as P
from fcn_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for a group of child processes (they take ~10-30 s)


# ----------------------------------------------------------------------------- arithmetic


def test_process_share_gives_every_item_to_exactly_one_process():
    rng = random.Random(0)
    for n_items in range(12):
        items = [f"img{i:02d}.png" for i in range(n_items)]
        for n in range(1, 6):
            shares = []
            for pid in range(n):
                shuffled = items[:]
                rng.shuffle(shuffled)  # each process may list them in another order
                shares.append(D.process_share(shuffled, pid, n))
            assert [x for s in shares for x in s] == sorted(items)  # each once, in order
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        D.process_share(["a"], 2, 2)


def test_local_rows_split_a_global_batch_in_process_order():
    rows = [D.local_rows(6, pid, 3) for pid in range(3)]
    assert [list(range(6))[r] for r in rows] == [[0, 1], [2, 3], [4, 5]]
    assert D.local_rows(4) == slice(0, 4)  # alone: the whole batch
    with pytest.raises(ValueError, match="does not split"):
        D.local_rows(5, 0, 2)


def test_train_batch_rows_are_the_rows_of_the_whole_batch():
    from fcn_jax import data

    ds = data.SyntheticDataset(6, seed=0, size=(80, 72), object_size=(20, 40))
    cfg = data.input_transformer((48, 40))
    whole, boxes = data.train_batch(ds, 5, batch_size=4, cfg=cfg, seed=3)
    parts = [data.train_batch(ds, 5, batch_size=4, cfg=cfg, seed=3, rows=D.local_rows(4, p, 2))
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole)
    for got, want in zip([b for p in parts for b in p[1]], boxes, strict=True):
        np.testing.assert_array_equal(got, want)


def test_flags_are_checked_and_alone_is_one_process(tmp_path, capsys):
    assert D.initialize() == (0, 1)  # no flags, no cluster: one process
    assert D.initialize(D.ProcessConfig("127.0.0.1:1234", 1, 0)) == (0, 1)
    D.barrier("alone")
    D.all_equal("nothing to compare", [1])
    for bad, why in [(dict(coordinator="127.0.0.1:1234", num_processes=2), "go together"),
                     (dict(coordinator="localhost", num_processes=2, process_id=0),
                      "HOST:PORT"),
                     (dict(coordinator="h:99999", num_processes=2, process_id=0), "HOST:PORT"),
                     (dict(coordinator="h:1", num_processes=2, process_id=2), "0..1")]:
        with pytest.raises(D.DistributedError, match=why):
            D.ProcessConfig(**bad)
    # the CLI: one line, exit status 3, before any work
    assert main(["predict", "x.prototxt", "x.caffemodel", "--out", str(tmp_path / "o"),
                 "--coordinator", "127.0.0.1:1234", "--num-processes", "2"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("fcn-jax: error:") and "\n" not in err


# ----------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _start(args: list[str], cwd: Path, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fcn_jax.cli", *args], cwd=cwd,
                            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _processes(args: list[str], cwd: Path, n: int = 2, per_process=None) -> list[str]:
    """Flags for process i of n with a fresh coordinator port, as lists."""
    port = _free_port()
    out = []
    for i in range(n):
        extra = per_process(i) if per_process else []
        out.append([*args, *extra, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                    str(n), "--process-id", str(i)])
    return out


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


DENSE = """name: "tiny_dense"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 7 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""  # noqa: E501


def _dense_model(folder: Path) -> tuple[Path, Path]:
    shapes = {"score": {"weight": (4, 3, 3, 3), "bias": (4,)}}
    return random_caffe_net(folder, DENSE, shapes)[:2]


def _image_dir(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        h, w = (13, 17) if i % 2 else (20, 9)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")  # skipped, with a record
    return folder


def _by_image(out: Path) -> dict[str, dict]:
    lines = (out / P.JOURNAL).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["image"] for r in records}) == len(records)  # every image exactly once
    return {r["image"]: r for r in records}


def _maps(out: Path, rec: dict) -> dict[str, np.ndarray]:
    with np.load(out / rec["shard"]) as z:
        return {k: z[f"{rec['key']}_{k}"] for k in ("argmax", "score", "blob")}


@pytest.mark.slow
def test_predict_two_processes_failures_resume_and_merge_equal_one(tmp_path, monkeypatch):
    proto, model = _dense_model(tmp_path)
    _image_dir(tmp_path / "imgs", 7)
    common = ["predict", str(proto), "--dir", "imgs", "--dense", "--save-blob",
              "--batch-size", "2", "--no-progress", "--out", "two"]
    # process 1 dies at once (its weights are missing); process 0 does its share, then
    # stops with one line once process 1's heartbeat is missed
    flags = _processes(common, tmp_path, per_process=lambda i: [
        str(model) if i == 0 else "missing.caffemodel", "--heartbeat-timeout", "3"])
    # meanwhile, the process 0 of another run whose process 1 never starts
    lone = _processes(["predict", str(proto), str(model), "x.png", "--out", "lone",
                       "--init-timeout", "3"], tmp_path)[0]
    t0 = time.monotonic()
    (rc0, _, err0), (rc1, _, err1), (rc, _, err) = _finish(
        [_start(f, tmp_path) for f in [*flags, lone]])
    assert rc1 == 2 and "missing.caffemodel" in err1, err1[-2000:]
    assert rc0 == 3, err0[-2000:]
    last = err0.strip().splitlines()[-1]  # from the watchdog, or the last barrier
    assert last.startswith("fcn-jax: error: process 0: process(es) [1] of 2 "), err0
    assert "stopped answering for 3 s" in last or "died before" in last, last
    assert rc == 3, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fcn-jax: error: process 0 of 2 at 127.0.0.1:") and \
        "did not all join within 3 s" in last, err[-2000:]
    assert not (tmp_path / "lone").exists()
    assert time.monotonic() - t0 < TIMEOUT
    monkeypatch.chdir(tmp_path)
    share0 = D.process_share(P.list_images(directory="imgs"), 0, 2)
    assert set(_by_image(tmp_path / "two" / "process-0-of-2")) <= set(share0)
    assert not (tmp_path / "two" / P.JOURNAL).exists()  # nothing merged

    # --resume: process 0 skips its finished share, process 1 does its own, 0 merges
    flags = _processes([*common, "--resume"], tmp_path, per_process=lambda i: [str(model)])
    results = _finish([_start(f, tmp_path) for f in flags])
    # exit status 1 on process 0: the merged run has an image that could not be read
    assert [rc for rc, _, _ in results] == [1, 0], [err[-2000:] for _, _, err in results]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["total"], summary["done_before"] + summary["processed"]) == (8, 8)
    assert summary["failed_images"] == ["imgs/broken.png"]

    # the same images in one process (this one): the same records, the same maps
    assert main(["predict", str(proto), str(model), *common[2:-1], "one"]) == 1
    two, one = _by_image(tmp_path / "two"), _by_image(tmp_path / "one")
    assert list(two) == list(one)  # the 1-process order
    for image, a in one.items():
        b = two[image]
        strip = lambda r: {k: v for k, v in r.items() if k not in ("shard", "key", "top_k")}  # noqa: E731
        assert strip(a) == strip(b), image
        if "error" in a:
            continue
        assert [t["class"] for t in a["top_k"]] == [t["class"] for t in b["top_k"]]
        np.testing.assert_allclose([t["score"] for t in b["top_k"]],
                                   [t["score"] for t in a["top_k"]], rtol=1e-5, atol=1e-6)
        ma, mb = _maps(tmp_path / "one", a), _maps(tmp_path / "two", b)
        np.testing.assert_array_equal(mb["argmax"], ma["argmax"])
        for k in ("score", "blob"):
            np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, atol=1e-6)


# A tiny fully convolutional net with Dropout (the rng must agree across processes) and 4
# outputs for the demo's classes (background, cat, coffee, rocket).
TINY_FCN = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 31 dim: 31 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 5 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop1" type: "Dropout" bottom: "conv1" top: "conv1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "score" type: "Convolution" bottom: "conv1" top: "score" convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""  # noqa: E501


@pytest.mark.slow
def test_finetune_two_processes_equal_two_devices_and_resume_in_one(tmp_path, monkeypatch):
    (tmp_path / "tiny.prototxt").write_text(TINY_FCN)
    common = ["finetune", "--demo", "--model", "tiny.prototxt", "--input-size", "31", "31",
              "--val-images", "1", "--train-images", "8", "--no-progress",
              "--checkpoint-every", "1"]
    # 1 process x 2 devices, batch 4; and 2 processes x 1 device, batch 2 each: the same
    # global batches (process i takes the i-th half), run side by side
    procs = [_start([*common, "--steps", "3", "--devices", "2", "--batch-size", "4", "--out",
                     "one"], tmp_path, devices=2)]
    procs += [_start(f, tmp_path) for f in _processes(
        [*common, "--steps", "2", "--batch-size", "2", "--out", "two"], tmp_path)]
    for rc, _, err in _finish(procs):
        assert rc == 0, err[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert len(one["train_loss"]) == 3 and len(two["train_loss"]) == 2
    np.testing.assert_allclose(two["train_loss"], one["train_loss"][:2], rtol=1e-4)
    assert two["data"]["processes"] == 2 and two["data"]["global_batch_size"] == 4
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".caffemodel") \
        == ["finetuned.caffemodel"]  # written once, by process 0

    # the 2-process checkpoint resumes in one process with one device (this one)
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--steps", "3", "--batch-size", "4", "--out", "three",
                 "--resume", "two/checkpoints"]) == 0
    three = json.loads((tmp_path / "three" / "metrics.json").read_text())
    np.testing.assert_allclose(three["train_loss"], one["train_loss"], rtol=1e-4)
