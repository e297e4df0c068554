"""``fcn-jax predict``: results against a float64 numpy reference, skipped corrupt images,
one compiled shape, incremental results, resume after interrupt or SIGKILL, flat memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_caffe_net
from PIL import Image

import converters
from converters import CaffeFormatError
from fcn_jax import predict as P
from fcn_jax.preprocess import caffe_transformer, imagenet_mean_bgr, load_image, preprocess

ROOT = Path(__file__).resolve().parents[1]

CLASSIFIER = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 10 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""  # noqa: E501

DENSE = """name: "tiny_dense"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 7 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""  # noqa: E501
DENSE_SHAPES = {"score": {"weight": (4, 3, 1, 1), "bias": (4,)}}
CLASSIFIER_SHAPES = {"fc": {"weight": (6, 3), "bias": (6,)}}


@pytest.fixture
def classifier(tmp_path):
    return random_caffe_net(tmp_path, CLASSIFIER, CLASSIFIER_SHAPES)


def _images(folder: Path, n: int, seed: int = 1, sizes=((13, 17), (20, 9), (12, 10), (31, 24))
            ) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        p = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _transformer(shape):
    return caffe_transformer(shape, mean=imagenet_mean_bgr())


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / P.JOURNAL).read_text().splitlines()]


def _softmax64(z: np.ndarray, axis: int = 0) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------- results


def test_top_k_matches_a_float64_reference(tmp_path, classifier):
    proto, model, params = classifier
    images = _images(tmp_path / "imgs", 11)
    module, p = converters.load_caffe(proto, model)
    tr = _transformer((3, 12, 10))
    summary = P.run_predict(module, p, images, tmp_path / "out", tr,
                            P.PredictConfig(batch_size=4, top_k=3), progress=False)
    assert (summary.processed, summary.failed, summary.nonfinite) == (11, [], 0)
    w = params["fc"]["weight"].astype(np.float64)
    b = params["fc"]["bias"].astype(np.float64)
    recs = _records(tmp_path / "out")
    assert [r["image"] for r in recs] == images
    for rec in recs:
        x = preprocess(tr, load_image(rec["image"])).astype(np.float64)
        prob = _softmax64(w @ x.mean(axis=(1, 2)) + b)
        order = np.argsort(-prob)[:3]
        assert [e["class"] for e in rec["top_k"]] == list(order)
        np.testing.assert_allclose([e["score"] for e in rec["top_k"]], prob[order], rtol=1e-5)
        assert rec["nonfinite"] is False


def test_dense_maps_match_a_float64_reference(tmp_path):
    proto, model, params = random_caffe_net(tmp_path, DENSE, DENSE_SHAPES)
    images = _images(tmp_path / "imgs", 5)
    module, p = converters.load_caffe(proto, model)
    tr = _transformer((3, 9, 7))
    cfg = P.PredictConfig(batch_size=2, dense=True, save_blob=True, top_k=2)
    P.run_predict(module, p, images, tmp_path / "out", tr, cfg, progress=False)
    w = params["score"]["weight"][:, :, 0, 0].astype(np.float64)
    b = params["score"]["bias"].astype(np.float64)
    for rec in _records(tmp_path / "out"):
        x = preprocess(tr, load_image(rec["image"])).astype(np.float64)
        prob = _softmax64(np.einsum("ck,khw->chw", w, x) + b[:, None, None])
        with np.load(tmp_path / "out" / rec["shard"], allow_pickle=False) as z:
            amax, score, blob = (z[f"{rec['key']}_{k}"] for k in ("argmax", "score", "blob"))
        assert rec["shape"] == [9, 7]
        np.testing.assert_array_equal(amax, prob.argmax(axis=0))
        np.testing.assert_allclose(score, prob.max(axis=0), rtol=1e-5)
        np.testing.assert_allclose(blob, prob, rtol=1e-5, atol=1e-7)
        mean = prob.reshape(4, -1).mean(axis=1)
        assert [e["class"] for e in rec["top_k"]] == list(np.argsort(-mean)[:2])


def test_one_compiled_shape_for_images_of_many_sizes(tmp_path, classifier, monkeypatch):
    proto, model, _ = classifier
    sizes = ((5, 5), (40, 13), (12, 10), (7, 90), (33, 33))
    images = _images(tmp_path / "imgs", 11, sizes=sizes)
    seen = []
    real = P._forward

    def spy(module, params, outputs):
        fn = real(module, params, outputs)
        return lambda x: (seen.append(x.shape), fn(x))[1]

    monkeypatch.setattr(P, "_forward", spy)
    module, p = converters.load_caffe(proto, model)
    P.run_predict(module, p, images, tmp_path / "out", _transformer((3, 12, 10)),
                  P.PredictConfig(batch_size=4), progress=False)
    assert seen == [(4, 3, 12, 10)] * 3  # the last batch of 3 is padded


def test_labels_and_top_k_ties():
    got = P.top_k(np.array([0.1, 0.3, 0.3, np.nan]), 3, labels=("a", "b", "c"))
    assert got[:2] == [{"class": 1, "score": 0.3, "label": "b"},
                       {"class": 2, "score": 0.3, "label": "c"}]


def test_list_images(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.JPG", "d/a.png", "d/sub/c.jpeg", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = P.list_images([tmp_path / "x.png", tmp_path / "d" / "a.png"], tmp_path / "d")
    assert found == [str(tmp_path / p) for p in ("x.png", "d/a.png", "d/b.JPG", "d/sub/c.jpeg")]


# ----------------------------------------------------------------------------- bad images


def test_corrupt_images_are_skipped_with_a_warning_and_exit_1(tmp_path, classifier, capsys):
    from fcn_jax.cli import main

    proto, model, _ = classifier
    good = _images(tmp_path / "imgs", 6)
    raw = Path(good[0]).read_bytes()
    (tmp_path / "imgs" / "text.jpg").write_text("not an image")
    (tmp_path / "imgs" / "cut.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "dir.png").mkdir()  # not listed by --dir, but named explicitly
    rc = main(["predict", str(proto), str(model), str(tmp_path / "imgs" / "dir.png"),
               str(tmp_path / "missing.png"), "--dir", str(tmp_path / "imgs"), "--out",
               str(tmp_path / "out"), "--batch-size", "4", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    for name in ("imgs/text.jpg", "imgs/cut.png", "imgs/empty.png", "imgs/dir.png",
                 "missing.png"):
        assert f"warning: skipping {tmp_path / name}: " in err
    assert "warning: 5 images could not be read:" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (6, 5)
    recs = {r["image"]: r for r in _records(tmp_path / "out")}
    assert all("top_k" in recs[g] for g in good)
    assert "error" in recs[str(tmp_path / "imgs" / "cut.png")]


def test_oversized_images_are_skipped_from_their_header(tmp_path, classifier):
    proto, model, _ = classifier
    images = _images(tmp_path / "imgs", 3, sizes=((12, 10), (40, 40), (12, 10)))
    module, p = converters.load_caffe(proto, model)
    s = P.run_predict(module, p, images, tmp_path / "out", _transformer((3, 12, 10)),
                      P.PredictConfig(batch_size=2, max_pixels=1000), progress=False)
    assert s.failed == [images[1]]
    assert "40x40 image has more than 1000 pixels" in _records(tmp_path / "out")[1]["error"]


def test_non_finite_outputs_are_flagged(tmp_path, classifier, capsys):
    from fcn_jax.cli import main

    proto, _, params = classifier
    params["fc"]["bias"][2] = np.nan
    model = tmp_path / "nan.caffemodel"
    converters.save_caffemodel(model, params, converters.read_prototxt(proto))
    _images(tmp_path / "imgs", 3)
    rc = main(["predict", str(proto), str(model), "--dir", str(tmp_path / "imgs"), "--out",
               str(tmp_path / "out"), "--no-progress"])
    assert rc == 1
    assert "warning: 3 images gave non-finite outputs (NaN/Inf)" in capsys.readouterr().err
    assert all(r["nonfinite"] for r in _records(tmp_path / "out"))


def test_batch_over_the_memory_budget_is_refused_before_running(tmp_path, classifier):
    proto, model, _ = classifier
    module, p = converters.load_caffe(proto, model)
    with pytest.raises(CaffeFormatError, match=r"batch: a batch of shape \(64, 3, 12, 10\) "
                                               r"needs \d+ bytes of blobs, over the memory "
                                               r"budget of 10000"):
        P.run_predict(module, p, _images(tmp_path / "imgs", 2), tmp_path / "out",
                      _transformer((3, 12, 10)), P.PredictConfig(batch_size=64),
                      progress=False, memory_budget=10_000)


def test_wrong_blob_for_the_mode(tmp_path):
    proto, model, _ = random_caffe_net(tmp_path, DENSE, DENSE_SHAPES)
    module, p = converters.load_caffe(proto, model)
    with pytest.raises(CaffeFormatError, match=r"top-k needs an \(N, C\) blob; 'prob' is "
                                               r"\(2, 4, 9, 7\) \(a dense map\? use --dense\)"):
        P.run_predict(module, p, _images(tmp_path / "imgs", 1), tmp_path / "out",
                      _transformer((3, 9, 7)), P.PredictConfig(batch_size=2), progress=False)


# ----------------------------------------------------------------------------- resume


def test_existing_results_need_resume(tmp_path, classifier, capsys):
    from fcn_jax.cli import main

    proto, model, _ = classifier
    _images(tmp_path / "imgs", 2)
    argv = ["predict", str(proto), str(model), "--dir", str(tmp_path / "imgs"), "--out",
            str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "exists: pass --resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert "resumed: 2 of 2 images were already done" in capsys.readouterr().out
    assert main(argv + ["--resume", "--top-k", "2"]) == 2
    assert "different settings than the first run: top_k 5 -> 2" in capsys.readouterr().err


def test_one_run_per_output_folder(tmp_path, classifier):
    proto, model, _ = classifier
    module, p = converters.load_caffe(proto, model)
    out = tmp_path / "out"
    out.mkdir()
    with P._exclusive(out):  # as if another process were running there
        with pytest.raises(FileExistsError, match="another fcn-jax predict is writing there"):
            P.run_predict(module, p, _images(tmp_path / "imgs", 1), out,
                          _transformer((3, 12, 10)), progress=False, resume=True)


def test_interrupted_run_resumes_without_redoing_images(tmp_path, classifier, monkeypatch):
    proto, model, _ = classifier
    images = _images(tmp_path / "imgs", 14)
    module, p = converters.load_caffe(proto, model)
    tr = _transformer((3, 12, 10))
    cfg = P.PredictConfig(batch_size=3)

    def stop_after_two(n, summary):
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.run_predict(module, p, images, tmp_path / "out", tr, cfg, progress=False,
                      on_batch=stop_after_two)
    assert len(_records(tmp_path / "out")) == 6
    loaded = []
    real = P.load_and_preprocess
    monkeypatch.setattr(P, "load_and_preprocess",
                        lambda path, *a, **k: (loaded.append(path), real(path, *a, **k))[1])
    s = P.run_predict(module, p, images, tmp_path / "out", tr, cfg, progress=False,
                      resume=True)
    assert (s.done_before, s.processed) == (6, 8)
    assert sorted(loaded) == images[6:]
    assert [r["image"] for r in _records(tmp_path / "out")] == images


def test_torn_last_journal_line_is_dropped(tmp_path, classifier):
    proto, model, _ = classifier
    images = _images(tmp_path / "imgs", 4)
    module, p = converters.load_caffe(proto, model)
    tr = _transformer((3, 12, 10))
    P.run_predict(module, p, images[:2], tmp_path / "out", tr, progress=False)
    with open(tmp_path / "out" / P.JOURNAL, "ab") as f:
        f.write(b'{"image": "' + images[2].encode() + b'", "top_k": [{"cla')  # killed here
    s = P.run_predict(module, p, images, tmp_path / "out", tr, progress=False, resume=True)
    assert (s.done_before, s.processed) == (2, 2)
    assert [r["image"] for r in _records(tmp_path / "out")] == images  # every line parses


def test_dense_resume_redoes_images_whose_maps_are_missing(tmp_path):
    proto, model, _ = random_caffe_net(tmp_path, DENSE, DENSE_SHAPES)
    images = _images(tmp_path / "imgs", 6)
    module, p = converters.load_caffe(proto, model)
    tr = _transformer((3, 9, 7))
    cfg = P.PredictConfig(batch_size=2, dense=True)
    P.run_predict(module, p, images, tmp_path / "out", tr, cfg, progress=False)
    shard = _records(tmp_path / "out")[2]["shard"]
    (tmp_path / "out" / shard).unlink()  # e.g. killed after writing records of... or deleted
    s = P.run_predict(module, p, images, tmp_path / "out", tr, cfg, progress=False,
                      resume=True)
    assert (s.done_before, s.processed) == (4, 2)
    latest = {r["image"]: r for r in _records(tmp_path / "out")}
    for rec in latest.values():
        assert (tmp_path / "out" / rec["shard"]).is_file()


def test_sigkill_then_resume(tmp_path, classifier):
    """A real ``fcn-jax predict`` process killed with SIGKILL mid-run; ``--resume`` finishes
    the rest and no image is predicted twice."""
    proto, model, _ = classifier
    images = _images(tmp_path / "imgs", 40)
    out = tmp_path / "out"
    args = ["predict", str(proto), str(model), "--dir", str(tmp_path / "imgs"), "--out",
            str(out), "--batch-size", "2", "--no-progress", "--workers", "1"]
    code = ("import sys, time\nimport fcn_jax.predict as P\nreal = P._forward\n"
            "def slow(*a):\n    fn = real(*a)\n"
            "    return lambda x: (time.sleep(0.15), fn(x))[1]\n"
            "P._forward = slow\nfrom fcn_jax.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / P.JOURNAL
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 8:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(P.finished_images(out, dense=False))
    assert 8 <= done_before < 40
    from fcn_jax.cli import main

    assert main(args + ["--resume"]) == 0
    recs = [r["image"] for r in _records(out)]
    assert sorted(recs) == images  # each image exactly once: nothing redone, nothing lost
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done_before"], summary["processed"]) == (done_before, 40 - done_before)


# ----------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_memory_stays_flat_over_2000_images(tmp_path, classifier):
    """RSS after the first quarter, half and all of 2000 images: no growth with the count."""
    import tracemalloc

    proto, model, _ = classifier
    images = _images(tmp_path / "imgs", 2000, sizes=((16, 16), (20, 12)))
    module, p = converters.load_caffe(proto, model)
    marks = {}
    n_batches = 2000 // 16

    def sample(n, summary):
        if n in (1, n_batches // 4, n_batches // 2, n_batches):
            marks[n * 16] = (_rss_mb(), tracemalloc.get_traced_memory()[0] / 2**20)

    print(f"\nbefore the run: RSS {_rss_mb():.1f} MB")
    tracemalloc.start()
    try:
        s = P.run_predict(module, p, images, tmp_path / "out", _transformer((3, 12, 10)),
                          P.PredictConfig(batch_size=16), progress=False, on_batch=sample)
    finally:
        tracemalloc.stop()
    print("images  RSS MB  python-heap MB")
    for k, (rss, heap) in sorted(marks.items()):
        print(f"{k:6d}  {rss:6.1f}  {heap:6.2f}")
    print(f"{s.images_per_second:.0f} images/s")
    _, _, (rss_h, heap_h), (rss_e, heap_e) = (marks[k] for k in sorted(marks))
    assert rss_e - rss_h < 25 and heap_e - heap_h < 2


def test_a_fifo_named_png_in_dir_is_skipped_without_blocking(tmp_path, classifier, capsys):
    """``predict --dir`` over a folder holding a FIFO ``x.png`` and a text file ``t.png``:
    both skipped with one line each, the batch they are in is written, exit status 1."""
    import threading

    from fcn_jax.cli import main

    proto, model, _ = classifier
    good = _images(tmp_path / "imgs", 3)
    os.mkfifo(tmp_path / "imgs" / "x.png")
    (tmp_path / "imgs" / "t.png").write_text("not an image\n")
    rc: list[int] = []
    th = threading.Thread(target=lambda: rc.append(main([
        "predict", str(proto), str(model), "--dir", str(tmp_path / "imgs"), "--out",
        str(tmp_path / "out"), "--batch-size", "8", "--no-progress"])), daemon=True)
    th.start()
    th.join(120)
    if th.is_alive():
        with open(tmp_path / "imgs" / "x.png", "wb"):
            pass
        pytest.fail("predict blocked on a FIFO")
    assert rc == [1]
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'imgs' / 'x.png'}: cannot read: not a regular file (a FIFO)" \
        in err
    assert f"skipping {tmp_path / 'imgs' / 't.png'}: not an image file" in err
    assert "imageio" not in err and "pip install" not in err
    recs = {r["image"]: r for r in _records(tmp_path / "out")}
    assert all("top_k" in recs[g] for g in good) and len(recs) == 5


def test_resume_refuses_other_weights_or_preprocessing_naming_the_change(tmp_path, classifier,
                                                                         capsys):
    from fcn_jax.cli import main

    proto, model, _ = classifier
    _images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    argv = ["predict", str(proto), str(model), "--dir", str(tmp_path / "imgs"), "--out",
            str(out), "--no-progress"]
    assert main(argv) == 0
    journal = (out / P.JOURNAL).read_bytes()
    run = json.loads((out / "run.json").read_text())
    assert {"net_digest", "weights_digest", "preprocessing", "dtype", "blob", "top_k",
            "input_shape"} <= set(run)
    assert run["preprocessing"]["channel_swap"] == [2, 1, 0]
    other = tmp_path / "other"
    other.mkdir()
    _, model2, _ = random_caffe_net(other, CLASSIFIER, CLASSIFIER_SHAPES, seed=5)
    capsys.readouterr()
    assert main(["predict", str(proto), str(model2)] + argv[3:] + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "run.json: --resume with different settings" in err and "weights_digest" in err
    assert "preprocessing" not in err
    assert main(argv + ["--resume", "--mean", "none", "--no-channel-swap"]) == 2
    err = capsys.readouterr().err
    assert "preprocessing.mean" in err and "preprocessing.channel_swap [2, 1, 0] -> None" in err
    assert "weights_digest" not in err
    assert main(argv + ["--resume", "--input-size", "14", "10"]) == 2
    assert "input_shape [3, 12, 10] -> [3, 14, 10]" in capsys.readouterr().err
    assert (out / P.JOURNAL).read_bytes() == journal  # nothing was appended
    assert main(argv + ["--resume"]) == 0  # the same settings still resume


def test_labels_and_top_k_must_fit_the_classes(tmp_path, classifier, capsys):
    from fcn_jax.cli import main

    proto, model, _ = classifier
    _images(tmp_path / "imgs", 1)
    base = ["predict", str(proto), str(model), "--dir", str(tmp_path / "imgs"),
            "--no-progress"]
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    assert main(base + ["--out", str(tmp_path / "o1"), "--labels", str(labels)]) == 2
    assert "--labels has 3 lines but blob 'prob' has 6 classes" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o2"), "--top-k", "7"]) == 2
    assert "--top-k 7 is more than the 6 classes of blob 'prob'" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o3"), "--top-k", "6"]) == 0


def test_a_1000_class_net_is_named_with_imagenet_words(tmp_path):
    from fcn_jax.assets import imagenet_labels

    text = CLASSIFIER.replace("num_output: 6", "num_output: 1000")
    proto, model, params = random_caffe_net(tmp_path, text,
                                            {"fc": {"weight": (1000, 3), "bias": (1000,)}})
    module, p = converters.load_caffe(proto, model)
    images = _images(tmp_path / "imgs", 1)
    P.run_predict(module, p, images, tmp_path / "out", _transformer((3, 12, 10)),
                  P.PredictConfig(top_k=3), progress=False)
    rec = _records(tmp_path / "out")[0]
    names = imagenet_labels()
    assert len(names) == 1000 and names[281] == "tabby, tabby cat"
    assert [t["label"] for t in rec["top_k"]] == [names[t["class"]] for t in rec["top_k"]]
