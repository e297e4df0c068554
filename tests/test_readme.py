"""The README cannot drift: every name it shows imports, and its Python examples run (on the
reference nets: caffenet_mini's files stand in for the full CaffeNet's)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MINI = DATA / "caffenet_mini"

#: README text -> what the test runs instead (each must occur, so that edits are noticed).
SUBSTITUTIONS = {
    'fcn_jax.tutorial_file("deploy.prototxt")': repr(str(MINI / "caffenet_mini_deploy.prototxt")),
    'fcn_jax.tutorial_file("bvlc_caffenet_full_conv.prototxt")':
        repr(str(MINI / "caffenet_mini_full_conv.prototxt")),
    '"bvlc_reference_caffenet.caffemodel"': repr(str(MINI / "caffenet_mini.caffemodel")),
}


def _resolve(dotted: str):
    """Import ``a.b.c`` as a module or an attribute chain."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_name_the_readme_shows_imports():
    names = set(re.findall(r"`((?:converters|fcn_jax)(?:\.\w+)+)", README))
    assert "converters.fully_convolutional_net" in names and "fcn_jax.tutorial_file" in names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    # table rows "| `module` | `name`, `name` ... |": each name is in that module
    for module, cell in re.findall(r"^\| `((?:converters|fcn_jax)[\w.]*)` \| (.*) \|$", README,
                                   re.M):
        mod = _resolve(module)
        for name in re.findall(r"`(\w+)`", cell):
            if not hasattr(mod, name):
                missing.append(f"{module}.{name}")
    assert not missing, missing


def _python_blocks() -> list[str]:
    """The ```python blocks, dedented (blocks inside list items are indented)."""
    import textwrap

    return [textwrap.dedent(code) for _, code in
            re.findall(r"^( *)```python\n(.*?)^\1```", README, re.S | re.M)]


@pytest.mark.slow
def test_readme_python_examples_run(predict_output, capsys):
    from fcn_jax import layer_table

    blocks = _python_blocks()
    assert len(blocks) >= 3
    ns: dict = {}
    try:
        for code in blocks:
            for old, new in SUBSTITUTIONS.items():
                code = code.replace(old, new)
            exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
    finally:
        layer_table.remove_layer_type("ChannelGain")  # the README registers it
    used = "".join(blocks)
    assert all(old in used for old in SUBSTITUTIONS), "a substitution no longer applies"
    # the API block: the transplant is the tutorial's, and the class map is Caffe's
    assert [r for r in ns["report"].renamed] == [("fc6", "fc6-conv"), ("fc7", "fc7-conv"),
                                                 ("fc8", "fc8-conv")]
    info = json.loads((MINI / "caffenet_mini_info.json").read_text())
    assert np.asarray(ns["cmap"]).tolist() == info["classification_map"]
    assert ns["blobs"]["prob"].shape == (1, 1000)
    # the layer table block: a registered type, and a head run from an inner blob
    np.testing.assert_allclose(ns["head"]["prob"], ns["blobs"]["prob"], rtol=1e-5, atol=1e-7)
    assert "fc6" not in ns["backbone"].apply({"params": ns["bparams"]}, ns["x"])
    # the safetensors, export and NNX blocks ran on files made like the README says
    assert ns["w"]["conv1/weight"].shape == tuple(ns["params"]["conv1"]["weight"].shape)
    np.testing.assert_allclose(np.asarray(ns["probs"]), ns["blobs"]["prob"], rtol=1e-4,
                               atol=1e-6)
    assert np.isfinite(float(ns["loss"]))
    # the annotation example writes what fine-tuning reads
    assert ns["data"].read_annotations("annotations.jsonl")[1][1].shape == (2, 5)
    # the solver block: 4 Caffe steps, a snapshot Caffe's way, restored
    assert ns["step_losses"][0] == pytest.approx(1.704949, rel=1e-6)
    assert ns["resumed"].iter == 4 and ns["snap_state"] == "solver_iter_4.solverstate"
    # the Python fine-tuning example ran its two steps on the keys train_step documents
    assert len(ns["losses"]) == 2 and all(np.isfinite(ns["losses"]))
    assert ns["batch"](0)["label"].shape == (2, 2, 2) and int(ns["state"].step) == 2
    # the predict reader example reads what predict wrote
    assert "maps/000000.npz (9, 7) [9, 7]" in capsys.readouterr().out


@pytest.fixture
def predict_output(tmp_path, monkeypatch):
    """A small dense ``fcn-jax predict`` run in ``preds/`` for the README's reader example."""
    from fcn_jax.cli import main

    monkeypatch.chdir(tmp_path)
    proto = tmp_path / "fcn.prototxt"
    proto.write_text("""name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 7 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score" convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
""")  # noqa: E501
    import converters

    _, params = converters.load_caffe(proto)
    converters.save_caffemodel(tmp_path / "fcn.caffemodel", params,
                               converters.read_prototxt(proto))
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    # what the safetensors, export and NNX blocks read (fcn-jax convert / export)
    mini_deploy = MINI / "caffenet_mini_deploy.prototxt"
    mini_model = MINI / "caffenet_mini.caffemodel"
    assert main(["convert", str(mini_deploy), str(mini_model), "-o", "model.safetensors"]) == 0
    assert main(["export", str(mini_deploy), str(mini_model), "-o", "net.jaxexport",
                 "--input-size", "227", "227"]) == 0
    # what the solver block reads: the Caffe solver reference in the current directory
    import shutil

    solvers = DATA / "solvers"
    for name in ("train.prototxt", "data.h5", "data_list.txt", "init.caffemodel"):
        shutil.copy(solvers / name, tmp_path / name)
    shutil.copy(solvers / "01_sgd_fixed" / "solver.prototxt", tmp_path / "solver.prototxt")
    assert main(["predict", str(proto), str(tmp_path / "fcn.caffemodel"), "--dir", "images",
                 "--out", "preds", "--dense", "--save-blob", "--no-progress"]) == 0


# ----------------------------------------------------------------------------- names exist

#: Flags the README shows that belong to other programs (pip, XLA, pytest).
OTHER_FLAGS = {"--no-deps", "--quiet", "--xla_force_host_platform_device_count", "--upgrade"}


def _cli_flags() -> dict[str, set[str]]:
    """Every ``fcn-jax`` command's option strings."""
    from fcn_jax.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {s for a in p._actions for s in a.option_strings}
            for name, p in sub.choices.items()}


def test_every_file_and_test_the_readme_names_exists():
    """Issue 20 item 10: `experiments/x.py`, `tests/test_x.py::test_y`, `docs/...` exist."""
    missing = []
    for path, test in re.findall(
            r"((?:experiments|tests|docs|fcn_jax|converters|\.ci)/[\w./-]*\w)(?:::(\w+))?",
            README):
        f = ROOT / path
        if not f.exists():
            missing.append(path)
        elif test and not re.search(rf"^def {test}\(", f.read_text(), re.M):
            missing.append(f"{path}::{test}")
    assert not missing, missing


def test_every_flag_the_readme_shows_exists():
    """A flag after ``fcn-jax CMD`` on one line is CMD's; any other ``--flag`` is some
    fcn-jax command's, an experiment script's, or another program's (OTHER_FLAGS)."""
    flags = _cli_flags()
    scripts = {m for p in (ROOT / "experiments").glob("*.py")
               for m in re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", p.read_text())}
    known = set().union(*flags.values()) | scripts | OTHER_FLAGS
    wrong = []
    for line in README.splitlines():
        for cmd, rest in re.findall(r"fcn-jax (\w+)((?:[^`|#]|\\\n)*)", line):
            if cmd in flags:
                wrong += [f"fcn-jax {cmd} {f}" for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)",
                                                                   rest)
                          if f not in flags[cmd]]
        wrong += [f for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line) if f not in known]
    assert not wrong, sorted(set(wrong))


def test_the_finetune_outputs_the_readme_names_are_written():
    """`ft/NAME` in the README is one of the files `fcn-jax finetune` writes (OUTPUTS, each
    checked to be written in tests/test_cli.py); a checkpoint is `ft/checkpoints/<step>/`."""
    from fcn_jax.commands.finetune import OUTPUTS

    named = set(re.findall(r"\bft/([\w.*<>-]+/?)", README))
    allowed = set(OUTPUTS) | {"checkpoints/<step>/", "checkpoints"}
    assert named and not named - allowed, sorted(named - allowed)
    section = README[README.index("## Fine-tuning"):]
    section = section[:section.index("\n## ", 5)]
    files = set(re.findall(r"`(finetuned\.\w+|[\w*]+\.(?:json|png|msgpack|txt))`", section))
    assert files and not files - set(OUTPUTS), sorted(files - set(OUTPUTS))
