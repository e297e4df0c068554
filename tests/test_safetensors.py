"""Caffe weights as safetensors: ``fcn-jax convert``, reading back (memory-mapped) through
``load_caffe``, PyTorch interop, refusals with the caffemodel path's errors, old files."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from conftest import DATA, legacy_weights_bytes
from safetensors.numpy import load_file, save_file

import converters
from converters import CaffeFormatError
from converters.proto import caffe_pb2
from fcn_jax.cli import main

MINI = DATA / "caffenet_mini"
PROTO = MINI / "caffenet_mini_deploy.prototxt"
MODEL = MINI / "caffenet_mini.caffemodel"
CONV = DATA / "layers"


def _raw_blobs(path) -> dict[str, list[np.ndarray]]:
    """Every layer's blobs straight from protobuf (the independent reference)."""
    net = caffe_pb2.NetParameter()
    net.ParseFromString(path.read_bytes())
    return {lp.name: [np.asarray(b.data, np.float32) for b in lp.blobs]
            for lp in (list(net.layer) or list(net.layers)) if lp.blobs}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "mini.safetensors"
    assert main(["convert", str(PROTO), str(MODEL), "-o", str(out)]) == 0
    return out


def test_convert_writes_every_blob_in_caffes_shapes_with_metadata(converted):
    tensors = load_file(converted)  # safetensors' own reader
    raw = _raw_blobs(MODEL)
    assert set(tensors) == {f"{layer}/{b}" for layer in raw for b in ("weight", "bias")}
    for layer, blobs in raw.items():
        for name, ref in zip(("weight", "bias"), blobs, strict=True):
            t = tensors[f"{layer}/{name}"]
            assert t.dtype == np.float32
            np.testing.assert_array_equal(t.ravel(), ref)
    assert tensors["fc6/weight"].shape == (256, 2304)      # Caffe's (modern) shape
    assert tensors["conv2/weight"].shape == (64, 12, 5, 5)
    with open(converted, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["source_sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert meta["source"] == MODEL.name
    net = converters.parse_prototxt(meta["prototxt"])
    assert net == converters.read_prototxt(PROTO)


def test_load_caffe_reads_it_back_like_the_caffemodel(converted):
    module, params = converters.load_caffe(PROTO, converted)
    _, ref = converters.load_caffe(PROTO, MODEL)
    assert list(params) == list(ref)
    for layer in ref:
        for blob in ref[layer]:
            np.testing.assert_array_equal(params[layer][blob], ref[layer][blob])
    blobs = np.load(MINI / "caffenet_mini_classifier_blobs.npz")
    x = blobs["data"]
    out = module.apply({"params": params}, x)["prob"]
    np.testing.assert_allclose(np.asarray(out), blobs["prob"], rtol=1e-4, atol=1e-6)


def test_pytorch_reads_the_file(converted):
    torch_st = pytest.importorskip("safetensors.torch",
                                   reason="PyTorch not installed (the [bench] extra)")
    tensors = torch_st.load_file(converted)
    raw = _raw_blobs(MODEL)
    np.testing.assert_array_equal(tensors["conv1/weight"].numpy().ravel(), raw["conv1"][0])
    assert tuple(tensors["fc6/weight"].shape) == (256, 2304)


def _message(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg.replace(str(path), "FILE")


def _raw_caffemodel(path, params, net) -> None:
    """A caffemodel holding ``params`` as they are (our writer refuses a shape Caffe would
    not give the blob; a file from elsewhere can still hold one)."""
    out = converters.caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for lp in out.layer:
        for name in converters.PARAM_NAMES.get(lp.type, ()):
            if name in params.get(lp.name, {}):
                a = np.asarray(params[lp.name][name], np.float32)
                blob = lp.blobs.add()
                blob.shape.dim.extend(a.shape)
                blob.data.extend(a.ravel().tolist())
    path.write_bytes(out.SerializeToString())


@pytest.mark.parametrize("edit", ["shape", "missing_layer", "extra_blob"])
def test_names_or_shapes_that_do_not_fit_fail_as_for_a_caffemodel(tmp_path, edit):
    net = converters.read_prototxt(CONV / "conv_rect.prototxt")
    params = converters.load_caffemodel(CONV / "conv_rect.caffemodel")
    layer = next(iter(params))
    bad = {k: dict(v) for k, v in params.items()}
    if edit == "shape":
        bad[layer]["weight"] = bad[layer]["weight"][:1]
    elif edit == "missing_layer":
        del bad[layer]
    else:
        bad[layer]["extra"] = np.zeros(3, np.float32)
    st, cm = tmp_path / "bad.safetensors", tmp_path / "bad.caffemodel"
    converters.save_safetensors(st, bad, net)
    if edit == "extra_blob":  # a caffemodel cannot name blobs: compare with the params path
        with pytest.raises(CaffeFormatError) as ref:
            converters.load_caffe(CONV / "conv_rect.prototxt", bad)
        want = str(ref.value).replace(str(CONV / "conv_rect.prototxt"), "FILE")
    else:
        _raw_caffemodel(cm, bad, net)
        with pytest.raises(CaffeFormatError) as ref:
            converters.load_caffe(CONV / "conv_rect.prototxt", cm)
        want = _message(ref, cm)
    with pytest.raises(CaffeFormatError) as got:
        converters.load_caffe(CONV / "conv_rect.prototxt", st)
    assert _message(got, st) == want
    assert f"layer {layer!r}" in want


def test_hostile_safetensors_are_one_line_errors(tmp_path):
    good = tmp_path / "g.safetensors"
    save_file({"c/weight": np.ones((2, 3), np.float32)}, good)
    raw = good.read_bytes()
    for k in range(len(raw)):
        f = tmp_path / "t.safetensors"
        f.write_bytes(raw[:k])
        with pytest.raises(CaffeFormatError) as e:
            converters.load_safetensors(f)
        assert "\n" not in str(e.value) and "t.safetensors" in str(e.value)
    f = tmp_path / "n.safetensors"
    save_file({"noslash": np.ones(2, np.float32)}, f)
    with pytest.raises(CaffeFormatError, match=r"n\.safetensors: 'noslash': tensor name is "
                                               r"not '\{layer\}/\{blob\}'"):
        converters.load_safetensors(f)
    save_file({"c/weight": np.ones(2, np.int32)}, f)
    with pytest.raises(CaffeFormatError, match=r"layer 'c': weight: dtype int32 is not a "
                                               r"float"):
        converters.load_safetensors(f)
    with pytest.raises(CaffeFormatError, match="over|exceeds"):
        converters.load_safetensors(good, memory_budget=10)
    # layer names with '/' (GoogLeNet's inception_3a/1x1) keep them
    save_file({"inception_3a/1x1/weight": np.ones(2, np.float32)}, f)
    assert list(converters.load_safetensors(f)) == ["inception_3a/1x1"]


def test_cli_info_run_and_predict_take_safetensors(converted, tmp_path, capsys):
    assert main(["info", str(converted)]) == 0  # the net from the metadata
    text = capsys.readouterr().out
    assert "fc6" in text and "(256, 2304)" in text
    assert main(["info", str(PROTO), "--weights", str(converted), "--check"]) == 0
    blobs = np.load(MINI / "caffenet_mini_classifier_blobs.npz")
    np.save(tmp_path / "x.npy", blobs["data"])
    assert main(["run", str(PROTO), str(converted), "--input", str(tmp_path / "x.npy"),
                 "--blobs", str(tmp_path / "o.npz"), "--outputs", "prob"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["prob"], blobs["prob"],
                               rtol=1e-4, atol=1e-6)


def test_old_fcn_jax_2_weights_still_load(tmp_path):
    params = converters.load_caffemodel(CONV / "conv_rect.caffemodel")
    old = tmp_path / "old.msgpack"
    old.write_bytes(legacy_weights_bytes(params, {"prototxt": "x"}))
    _, got = converters.load_caffe(CONV / "conv_rect.prototxt", old)
    for layer in params:
        for b in params[layer]:
            np.testing.assert_array_equal(got[layer][b], params[layer][b])
    old.write_bytes(legacy_weights_bytes({"c": {"w": np.arange(3)}}, {}))
    with pytest.raises(CaffeFormatError, match=r"old\.msgpack: layer 'c': not a params tree"):
        converters.load_weights(old)
