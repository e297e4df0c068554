"""``fcn-jax predict`` for other nets than ImageNet classifiers (issue 20 item 6): images at
their own size, numeric means, input scale and transpose (MTCNN's preprocessing), the
blob mode; and what a run leaves behind (no empty --out, no .lock, the --resume hint on an
interrupt, no traceback on a closed pipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_caffe_net
from PIL import Image

import converters
from fcn_jax import predict as P
from fcn_jax.cli import main
from fcn_jax.preprocess import caffe_transformer, imagenet_mean_bgr, load_image

ROOT = Path(__file__).resolve().parents[1]

# a 1x1 convolution and a softmax: fully convolutional, any input size
DENSE = """name: "tiny_dense"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 7 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""  # noqa: E501


@pytest.fixture
def dense(tmp_path):
    return random_caffe_net(tmp_path, DENSE, {"score": {"weight": (4, 3, 1, 1), "bias": (4,)}})


def _images(folder: Path, sizes) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / P.JOURNAL).read_text().splitlines()]


def _softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _blob(out: Path, rec: dict, kind: str) -> np.ndarray:
    with np.load(out / rec["shard"], allow_pickle=False) as z:
        return z[f"{rec['key']}_{kind}"]


def test_native_size_maps_are_at_each_images_size(tmp_path, dense):
    proto, model, params = dense
    sizes = [(13, 17), (40, 9), (13, 17), (12, 10), (31, 24), (40, 9), (5, 66)]
    images = _images(tmp_path / "imgs", sizes)
    module, p = converters.load_caffe(proto, model)
    tr = caffe_transformer((3, 9, 7), mean=imagenet_mean_bgr())
    cfg = P.PredictConfig(batch_size=3, dense=True, save_blob=True, native_size=True)
    P.run_predict(module, p, images, tmp_path / "out", tr, cfg, progress=False)
    w = params["score"]["weight"][:, :, 0, 0].astype(np.float64)
    b = params["score"]["bias"].astype(np.float64)
    recs = _records(tmp_path / "out")
    assert sorted(r["image"] for r in recs) == sorted(images)
    for rec in recs:
        img = load_image(rec["image"]).astype(np.float64)  # no resize at all
        x = (img[:, :, ::-1] * 255.0 - imagenet_mean_bgr()).transpose(2, 0, 1)
        prob = _softmax64(np.einsum("ck,khw->chw", w, x) + b[:, None, None])
        assert rec["shape"] == list(img.shape[:2])
        np.testing.assert_allclose(_blob(tmp_path / "out", rec, "blob"), prob, rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_array_equal(_blob(tmp_path / "out", rec, "argmax"),
                                      prob.argmax(axis=0))
    with pytest.raises(ValueError, match="native_size needs dense maps or the blob mode"):
        P.PredictConfig(native_size=True)


def test_mtcnn_style_preprocessing_and_the_blob_mode(tmp_path, dense, capsys):
    """--mean 127.5 --input-scale 0.0078125 --transpose 2 1 0 --save-blob: the score blob
    of each (7 x 9) image, as MTCNN's pycaffe code computes its input."""
    proto, model, params = dense
    images = _images(tmp_path / "imgs", [(7, 9), (7, 9), (7, 9)])  # the input, transposed
    out = tmp_path / "out"
    assert main(["predict", str(proto), str(model), *images, "--out", str(out),
                 "--blob", "score", "--save-blob", "--mean", "127.5", "--input-scale",
                 "0.0078125", "--transpose", "2", "1", "0", "--no-progress"]) == 0
    w = params["score"]["weight"][:, :, 0, 0].astype(np.float64)
    b = params["score"]["bias"].astype(np.float64)
    for rec in _records(out):
        assert "top_k" not in rec and rec["shape"] == [4, 9, 7]
        img = np.asarray(Image.open(rec["image"]), np.float64)[:, :, ::-1]  # BGR
        x = ((img - 127.5) * 0.0078125).transpose(2, 1, 0)  # MTCNN: swapaxes(0, 2)
        want = np.einsum("ck,khw->chw", w, x) + b[:, None, None]
        np.testing.assert_allclose(_blob(out, rec, "blob"), want, rtol=1e-5, atol=1e-6)
    assert not (out / ".lock").exists()  # a finished run leaves no lock file


@pytest.mark.parametrize("arg, want", [("104,117,123", [104.0, 117.0, 123.0]),
                                       ("127.5", [127.5] * 3)])
def test_numeric_mean(arg, want):
    from fcn_jax.commands.predict import _mean

    np.testing.assert_array_equal(_mean(arg, 3, 9, 7), want)


def test_bad_numeric_mean_and_refused_runs_leave_no_out(tmp_path, dense, capsys):
    proto, model, _ = dense
    images = _images(tmp_path / "imgs", [(9, 7)])
    out = tmp_path / "out"
    base = ["predict", str(proto), str(model), *images, "--out", str(out), "--no-progress"]
    assert main([*base, "--mean", "1,2"]) == 2
    assert "--mean 1,2: give one finite value or 3" in capsys.readouterr().err
    assert main([*base, "--dense", "--blob", "nope"]) == 2  # refused inside the run
    assert "the net has no blob 'nope'" in capsys.readouterr().err
    assert main([*base, "--native-size"]) == 2
    assert "native_size needs dense maps" in capsys.readouterr().err
    assert not out.exists()


def test_interrupt_says_how_to_resume(tmp_path, dense, capsys, monkeypatch):
    proto, model, _ = dense

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "run_predict", interrupted)
    assert main(["predict", str(proto), str(model), *_images(tmp_path / "imgs", [(9, 7)]),
                 "--out", str(tmp_path / "out"), "--dense", "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert "interrupted" in err and "with --resume to continue" in err and "\n" not in err


def test_a_closed_pipe_is_no_traceback(tmp_path, dense):
    """`fcn-jax info ... | head`: the reader is gone before fcn-jax writes."""
    proto, _, _ = dense
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "fcn_jax.cli", "info", str(proto)],
                              stdout=w, stderr=subprocess.PIPE, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err and "Exception" not in err
