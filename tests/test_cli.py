"""``fcn-jax`` commands blame the right file: ``info`` checks weights against the net and
reads V1 caffemodels that declare no input; ``run`` says when the input does not fit the net;
``finetune --model`` says how to cast a classifier."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA

from fcn_jax.cli import main

MINI = DATA / "caffenet_mini"


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fcn-jax: error: ") and "\n" not in err, err
    return err


def test_info_refuses_weights_of_another_net(tmp_path, capsys):
    from fcn_jax import caffenet_prototxt

    proto = tmp_path / "narrow.prototxt"
    proto.write_text(caffenet_prototxt(widths=(16, 64, 96, 96, 64, 256, 256)))
    model = MINI / "caffenet_mini.caffemodel"  # conv1 is 24 wide there
    assert main(["info", str(proto), "--weights", str(model)]) == 2
    assert _err(capsys).endswith(f"{model}: layer 'conv1': weight: shape (24, 3, 11, 11) "
                                 "does not match the net's (16, 3, 11, 11)")
    assert main(["info", str(MINI / "caffenet_mini_deploy.prototxt"), "--weights",
                 str(model), "--check"]) == 0
    assert "check: ok (0 problems)" in capsys.readouterr().out


def test_info_check_on_a_v1_caffemodel_without_input(capsys):
    v1 = str(MINI / "caffenet_mini_v1.caffemodel")
    assert main(["info", v1, "--check"]) == 0
    out = capsys.readouterr().out
    assert "blobs: unknown (the net declares no input for ['data']: pass --input-shape" in out
    assert "fc6          weight (256, 2304)" in out and "check: ok (0 problems)" in out
    assert main(["info", v1, "--check", "--input-shape", "1", "3", "227", "227"]) == 0
    out = capsys.readouterr().out
    assert "  data   (1, 3, 227, 227)" in out and "  prob   (1, 1000)" in out
    assert "check: ok" in out


@pytest.mark.parametrize("shape, message", [
    ((1, 4, 227, 227), "input 'data' of shape (1, 4, 227, 227) does not fit the net, which "
     "takes 'data' (N, 3, 227, 227) (at this input, layer 'conv1': weight: shape "
     "(24, 3, 11, 11) does not match the net's (24, 4, 11, 11))"),
    ((1, 3, 50, 50), "input 'data' of shape (1, 3, 50, 50) does not fit the net, which takes "
     "'data' (N, 3, 227, 227) (at this input, layer 'fc6'"),
    ((3, 227, 227), "input 'data' has shape (3, 227, 227) (3-D) but the net's input is 4-D, "
     "like (2, 3, 227, 227) (N, C, H, W)"),
])
def test_run_blames_the_input_not_the_caffemodel(tmp_path, capsys, shape, message):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros(shape, np.float32))
    assert main(["run", str(MINI / "caffenet_mini_deploy.prototxt"),
                 str(MINI / "caffenet_mini.caffemodel"), "--input", str(x), "--blobs",
                 str(tmp_path / "b.npz")]) == 2
    err = _err(capsys)
    assert err.startswith(f"fcn-jax: error: {x}: {message}"), err
    assert "caffemodel:" not in err and "zip()" not in err


def test_finetune_with_a_classifier_says_to_cast_it(tmp_path, capsys):
    proto = MINI / "caffenet_mini_deploy.prototxt"
    assert main(["finetune", "--demo", "--model", str(proto), "--steps", "1", "--out",
                 str(tmp_path / "ft")]) == 2
    err = _err(capsys)
    assert f"{proto}: layer 'fc6': type: InnerProduct: a classifier" in err
    assert f"fcn-jax fcn {proto} WEIGHTS.caffemodel -o caffenet_mini_deploy_fc" in err
    assert "WindowGeometry" not in err and not (tmp_path / "ft").exists()


def test_finetune_a_cast_classifier_on_fewer_classes(tmp_path, capsys):
    """Issue 20 items 2-3: `fcn` then `finetune --model --weights` on 3 classes re-initialises
    the 1000-way score layer (one line) and prints a one-line transplant summary."""
    import json

    import converters
    from fcn_jax import data as D

    ann = D.write_synthetic_dataset(tmp_path / "ds", 4, seed=1, size=(240, 240),
                                    object_size=(60, 120))
    cast = str(tmp_path / "cast")
    assert main(["fcn", str(MINI / "caffenet_mini_deploy.prototxt"),
                 str(MINI / "caffenet_mini.caffemodel"), "-o", cast]) == 0
    capsys.readouterr()
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(ann), "--model", cast + ".prototxt", "--weights",
                 cast + ".caffemodel", "--steps", "1", "--out", str(out), "--input-size",
                 "227", "227", "--batch-size", "2", "--no-progress", "--solver", "SGD"]) == 0
    text = capsys.readouterr().out
    assert ("score layer 'fc8-conv': 1000 -> 3 outputs for the data's classes, "
            "re-initialised") in text
    summary = [line for line in text.splitlines() if line.startswith("transplant: ")]
    assert summary == ["transplant: 14 blobs copied, 2 dropped (fc8-conv), 1 layer keeps "
                       f"its init (fc8-conv); full report in {out / 'transplant.txt'}"], text
    assert "copying" not in text  # the full report is in the file, not on the screen
    full = (out / "transplant.txt").read_text()
    assert "copying conv1 -> conv1 weight" in full and "dropping fc8-conv weight" in full
    exported = converters.read_prototxt(out / "finetuned.prototxt")
    fc8 = next(lp for lp in exported.layer if lp.name == "fc8-conv")
    assert fc8.convolution_param.num_output == 3
    assert json.loads((out / "metrics.json").read_text())["classes"][0] == "background"
    from fcn_jax.commands.finetune import OUTPUTS

    for name in OUTPUTS:  # what the README and the final line say it writes
        assert list(out.glob(name.rstrip("/"))), name
    assert (out / "checkpoints" / "1").is_dir()


def test_fcn_num_classes_reinitialises_the_score_layer(tmp_path, capsys):
    import converters

    cast = str(tmp_path / "cast")
    assert main(["fcn", str(MINI / "caffenet_mini_deploy.prototxt"),
                 str(MINI / "caffenet_mini.caffemodel"), "-o", cast, "--num-classes", "3"]) == 0
    assert "score layer fc8-conv: 1000 -> 3 outputs, re-initialised" in capsys.readouterr().out
    src = converters.load_caffemodel(MINI / "caffenet_mini.caffemodel")
    new = converters.load_caffemodel(cast + ".caffemodel")
    assert new["fc8-conv"]["weight"].shape == (3, 256, 1, 1)
    np.testing.assert_array_equal(new["fc8-conv"]["bias"], np.zeros(3))
    assert 0.005 < float(np.std(new["fc8-conv"]["weight"])) < 0.02  # std 0.01 filler
    np.testing.assert_array_equal(new["fc7-conv"]["weight"].reshape(256, 256),
                                  src["fc7"]["weight"])  # the rest is the classifier's
    net = converters.read_prototxt(cast + ".prototxt")
    assert next(lp for lp in net.layer if lp.name == "fc8-conv"
                ).convolution_param.num_output == 3
    assert main(["fcn", str(MINI / "caffenet_mini_deploy.prototxt"),
                 str(MINI / "caffenet_mini.caffemodel"), "-o", str(tmp_path / "c2"),
                 "--num-classes", "0"]) == 2
    assert "--num-classes must be >= 1" in _err(capsys)


def _training_caffemodel(tmp_path, nan: bool = False):
    """caffenet_mini's caffemodel as a training net would store it: a custom data layer
    (unknown here) feeding data and label, and a label Slice."""
    import converters

    net = converters.read_net(MINI / "caffenet_mini.caffemodel")
    new = type(net)()
    new.CopyFrom(net)
    del new.layer[:]
    new.layer.add(name="input", type="MTCNNData", top=["data", "label"])
    new.layer.add(name="slice", type="Slice", bottom=["label"], top=["l1", "l2"])
    new.layer.extend(net.layer[1:])
    path = tmp_path / ("nan.caffemodel" if nan else "train.caffemodel")
    path.write_bytes(new.SerializeToString())
    if nan:
        params = converters.load_caffemodel(path)
        params["conv1"]["bias"] = np.array(params["conv1"]["bias"])
        params["conv1"]["bias"][3] = np.nan
        converters.save_caffemodel(path, params, new, like=path)
    return path


def test_info_check_lists_the_weights_of_a_training_net(tmp_path, capsys):
    """Issue 20 item 5: a caffemodel storing its training net (custom data layer) cannot be
    built, but its weights are listed and checked, with one line saying why."""
    path = _training_caffemodel(tmp_path)
    assert main(["info", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("blobs: unknown"))
    assert "the stored net is not runnable (layer 'input')" in line and "MTCNNData" in line
    assert "conv1        weight (24, 3, 11, 11)  bias (24,)" in out
    assert "fc8          weight (1000, 256)" in out and "check: ok (0 problems)" in out
    assert main(["info", str(_training_caffemodel(tmp_path, nan=True)), "--check"]) == 1
    assert "check: conv1/bias: 1 non-finite values (1 NaN, 0 Inf), first at (3,)" in (
        capsys.readouterr().out)
