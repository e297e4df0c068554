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
