"""`fcn-jax demo` end to end on a narrow random CaffeNet (the full-size run is the same
code with CaffeNet's widths; see experiments/net_surgery.py for timings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA

import converters
from fcn_jax import caffenet_prototxt
from fcn_jax.cli import main

NARROW = ["8", "16", "24", "24", "16", "32", "32"]
FIGURES = ["01_random_filters.png", "02_designer_filters.png", "03_prob_281.png",
           "04_overlay_281.png", "05_classification_map.png", "06_conv1_filters.png"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["demo", "--out", str(out), "--widths", *NARROW])
    return rc, out, buf.getvalue()


def test_demo_writes_figures_and_loadable_fcn(demo_run):
    rc, out, text = demo_run
    assert rc == 0
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    net = converters.read_prototxt(out / "caffenet_full_conv.prototxt")
    ref = converters.parse_prototxt(caffenet_prototxt(
        fully_conv=True, widths=tuple(int(w) for w in NARROW), input_shape=(1, 3, 451, 451)))
    assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in net.layer] == [
        (lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in ref.layer]
    module, params = converters.load_caffe(out / "caffenet_full_conv.prototxt",
                                           out / "caffenet_full_conv.caffemodel")
    assert params["fc6-conv"]["weight"].shape == (32, 16, 6, 6)
    x = np.zeros((1, 3, 451, 451), np.float32)
    prob = np.asarray(module.apply({"params": params}, x, outputs=("prob",))["prob"])
    assert prob.shape == (1, 1000, 8, 8)
    np.testing.assert_allclose(prob.sum(1), 1.0, rtol=1e-5)


def test_demo_prints_the_tutorials_tables(demo_run):
    _, out, text = demo_run
    assert "RANDOM" in text and "--weights" in text
    for line in ("pre-surgery output mean", "post-surgery output mean",
                 "fc6 weights are (32, 576) dimensional and biases are (32,) dimensional",
                 "fc6-conv weights are (32, 16, 6, 6) dimensional",
                 "coercing fc6 -> fc6-conv weight from (32, 576) to (32, 16, 6, 6)",
                 "fc_to_conv gives the same params bit for bit: True",
                 "fc8-conv  (1, 1000, 8, 8)", "classification map"):
        assert line in text, line
    summary = json.loads((out / "summary.json").read_text())
    # bias surgery: bias[0] 0 -> 1 shifts filter 0's output mean by exactly 1
    pre, post = summary["pre_surgery_mean"], summary["post_surgery_mean"]
    assert abs((post - pre) - 1.0) < 1e-5
    cmap = np.array(summary["classification_map"])
    assert cmap.shape == (8, 8) and cmap.min() >= 0 and cmap.max() < 1000
    check = summary["crop_check"]
    assert check["cells"] == 64 and 0 <= check["argmax_agreement"] <= 1


def test_demo_with_caffe_weights_gives_caffes_map(tmp_path, capsys):
    """--weights with a caffemodel real Caffe wrote (caffenet_mini) and --image cat.jpg: the
    8x8 classification map is the one real Caffe computed for the tutorial's pipeline."""
    mini = DATA / "caffenet_mini"
    rc = main(["demo", "--out", str(tmp_path), "--weights", str(mini / "caffenet_mini.caffemodel"),
               "--image", str(DATA / "source" / "cat.jpg"), "--no-crop-check", "--class", "7"])
    assert rc == 0
    text = capsys.readouterr().out
    # 1000 outputs: classes are named with ImageNet's synset words (class 7: "cock")
    assert "cat.jpg, 360x480" in text and "P(7 cock)" in text and "RANDOM" not in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    info = json.loads((mini / "caffenet_mini_info.json").read_text())
    assert summary["classification_map"] == info["classification_map"]
    assert (tmp_path / "03_prob_7.png").exists() and "crop_check" not in summary
    ours = converters.load_caffemodel(tmp_path / "caffenet_full_conv.caffemodel")
    for layer in ("conv1", "fc6-conv", "fc8-conv"):
        assert ours[layer]["weight"].size == converters.load_caffemodel(
            mini / "caffenet_mini.caffemodel")[layer.replace("-conv", "")]["weight"].size


def test_demo_designer_filters_match_the_tutorial(tmp_path):
    """The demo's designer step writes the tutorial's Gaussian + Sobel bank."""
    from fcn_jax.demo import designer_filters

    gray = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    out = designer_filters(gray, str(tmp_path), 0, lambda s: None)
    ref = np.load(DATA / "tutorial" / "tutorial_designer_filters.npz")
    np.testing.assert_array_equal(out["designer_weight"], ref["designer_weight"])


def test_demo_bad_options_are_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--size", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--size 100" in err
    assert main(["demo", "--out", str(tmp_path), "--image", str(tmp_path / "no.jpg")]) == 2
    assert "no.jpg" in capsys.readouterr().err


def test_demo_image_that_is_not_an_image_is_one_line(tmp_path, capsys):
    """The one image reader's error, not imageio's "pip install imageio[pyav]" text."""
    (tmp_path / "t.png").write_text("hello\n")
    assert main(["demo", "--image", str(tmp_path / "t.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (f"fcn-jax: error: {tmp_path / 't.png'}: not an image file (or a format "
                   "Pillow cannot read)\n")


def test_demo_checks_its_arguments_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--weights", str(tmp_path / "nosuch")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"fcn-jax demo: error: --weights {tmp_path / 'nosuch'}: no such file\n"
    assert captured.out == "" and not out.exists()  # nothing ran, nothing was written
    mini = DATA / "caffenet_mini" / "caffenet_mini.caffemodel"
    assert main(["demo", "--out", str(out), "--weights", str(mini), "--class", "1000"]) == 2
    assert "--class 1000 is out of range" in capsys.readouterr().err and not out.exists()


def test_cli_help_does_not_import_jax():
    """``fcn-jax --help`` starts without JAX (it took 2.4 s with it, 0.3 s without)."""
    import subprocess
    import sys

    code = ("import sys; from fcn_jax.cli import build_parser; build_parser(); "
            "import fcn_jax; fcn_jax.tutorial_file('cat.jpg'); "
            "print(sorted(m for m in ('jax', 'flax', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
