"""Readers and writers of Caffe files: V1/V2, round trips, the wire scanner, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA

import converters
from converters import CaffeFormatError
from converters.proto import caffe_pb2
from converters.wire import blob_array, scan_caffemodel

MINI = DATA / "caffenet_mini"


def test_v1_and_v2_caffemodels_hold_identical_params():
    v2 = converters.load_caffemodel(MINI / "caffenet_mini.caffemodel")
    v1 = converters.load_caffemodel(MINI / "caffenet_mini_v1.caffemodel")
    assert list(v2) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    for layer, blobs in v2.items():
        assert list(blobs) == ["weight", "bias"]
        for name, arr in blobs.items():
            assert arr.dtype == np.float32
            np.testing.assert_array_equal(v1[layer][name], arr)
    assert v2["fc6"]["weight"].shape == (256, 2304)   # legacy (1, 1, 256, 2304) squeezed
    assert v2["conv2"]["weight"].shape == (64, 12, 5, 5)


def test_v1_prototxt_upgrade_matches_v2():
    v1 = converters.read_prototxt(MINI / "caffenet_mini_deploy_v1.prototxt")
    v2 = converters.read_prototxt(MINI / "caffenet_mini_deploy.prototxt")
    assert v1.layer[0].type == "Input" and list(v1.layer[0].top) == ["data"]
    assert list(v1.layer[0].input_param.shape[0].dim) == [2, 3, 227, 227]
    strip = [(lp.type, list(lp.bottom), list(lp.top), lp.convolution_param,
              lp.pooling_param, lp.lrn_param, lp.inner_product_param) for lp in v1.layer[1:]]
    ref = [(lp.type, list(lp.bottom), list(lp.top), lp.convolution_param,
            lp.pooling_param, lp.lrn_param, lp.inner_product_param) for lp in v2.layer[1:]]
    assert strip == ref


def test_v1_blobs_lr_become_param_specs():
    net = converters.parse_prototxt(
        'layers { name: "c" type: CONVOLUTION bottom: "x" top: "c" blobs_lr: 1 blobs_lr: 2 '
        'weight_decay: 1 weight_decay: 0 convolution_param { num_output: 2 kernel_size: 1 } }')
    lp = net.layer[0]
    assert lp.type == "Convolution"
    assert [(p.lr_mult, p.decay_mult) for p in lp.param] == [(1, 1), (2, 0)]


def test_save_round_trip_is_bit_exact(tmp_path):
    params = converters.load_caffemodel(MINI / "caffenet_mini_v1.caffemodel")
    net = converters.read_prototxt(MINI / "caffenet_mini_deploy.prototxt")
    out = tmp_path / "m.caffemodel"
    converters.save_caffemodel(out, params, net)
    back = converters.load_caffemodel(out)
    for layer in params:
        for name in params[layer]:
            np.testing.assert_array_equal(back[layer][name], params[layer][name])
    # the written file is a V2 NetParameter with BlobShape and the layer definitions
    written = caffe_pb2.NetParameter()
    written.ParseFromString(out.read_bytes())
    conv2 = next(lp for lp in written.layer if lp.name == "conv2")
    assert conv2.type == "Convolution" and conv2.convolution_param.group == 2
    assert list(conv2.blobs[0].shape.dim) == [64, 12, 5, 5]
    np.testing.assert_array_equal(np.array(conv2.blobs[1].data, np.float32),
                                  params["conv2"]["bias"])


def test_our_file_equals_caffes_own_bytes_for_the_same_net():
    """Caffe's net.save wrote caffenet_mini.caffemodel; re-serialising its content with our
    writer gives a file Caffe's schema reads back to the same message."""
    ref = caffe_pb2.NetParameter()
    ref.ParseFromString((MINI / "caffenet_mini.caffemodel").read_bytes())
    params = converters.load_caffemodel(MINI / "caffenet_mini.caffemodel")
    ours = caffe_pb2.NetParameter()
    ours.ParseFromString(converters.build_caffemodel(params, ref))
    for a, b in zip(ref.layer, ours.layer, strict=True):
        assert (a.name, a.type, len(a.blobs)) == (b.name, b.type, len(b.blobs))
        for x, y in zip(a.blobs, b.blobs, strict=True):
            assert list(x.shape.dim) == list(y.shape.dim)
            assert x.data == y.data


def test_wire_scanner_agrees_with_protobuf():
    for f in ("caffenet_mini.caffemodel", "caffenet_mini_v1.caffemodel"):
        raw = (MINI / f).read_bytes()
        stripped, refs = scan_caffemodel(raw)
        full = caffe_pb2.NetParameter()
        full.ParseFromString(raw)
        layers = list(full.layer) or list(full.layers)
        assert len(refs) == len(layers)
        for lp, rr in zip(layers, refs, strict=True):
            assert len(rr) == len(lp.blobs)
            for blob, ref in zip(lp.blobs, rr, strict=True):
                np.testing.assert_array_equal(blob_array(raw, ref).ravel(),
                                              np.array(blob.data, np.float32))
        assert len(stripped) < 2000


def test_schema_field_numbers_are_caffes():
    """Spot checks against BVLC caffe.proto (numbers that real files depend on)."""
    d = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert (d["convolution_param"].number, d["pooling_param"].number, d["blobs"].number,
            d["input_param"].number, d["batch_norm_param"].number) == (106, 121, 7, 143, 139)
    b = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name
    assert (b["data"].number, b["shape"].number, b["num"].number) == (5, 7, 1)
    assert b["data"].GetOptions().packed
    n = caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name
    assert (n["layer"].number, n["layers"].number, n["input_dim"].number) == (100, 2, 4)
    p = caffe_pb2.PoolingParameter.DESCRIPTOR.fields_by_name
    assert p["round_mode"].number == 13
    assert caffe_pb2.PoolingParameter().stride == 1
    assert caffe_pb2.LRNParameter().alpha == 1.0 and caffe_pb2.LRNParameter().k == 1.0


# ----------------------------------------------------------------------------- bad input


def test_prototxt_syntax_error_names_line(tmp_path):
    f = tmp_path / "bad.prototxt"
    f.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bottom "data"\n}\n')
    with pytest.raises(CaffeFormatError, match=r"bad\.prototxt: line 5, column \d+: syntax"):
        converters.read_prototxt(f)


def test_truncated_caffemodel_is_a_clear_error(tmp_path):
    raw = (MINI / "caffenet_mini.caffemodel").read_bytes()
    f = tmp_path / "t.caffemodel"
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaffeFormatError, match=r"t\.caffemodel"):
        converters.load_caffemodel(f)


def test_not_a_caffemodel(tmp_path):
    f = tmp_path / "x.caffemodel"
    f.write_bytes(b"\xff\xfe this is not protobuf \x00\x01")
    with pytest.raises(CaffeFormatError, match=r"x\.caffemodel: "):
        converters.load_caffemodel(f)


def test_blob_length_disagrees_with_shape(tmp_path):
    net = converters.read_prototxt(MINI / "caffenet_mini_deploy.prototxt")
    params = converters.load_caffemodel(MINI / "caffenet_mini.caffemodel")
    raw = bytearray(converters.build_caffemodel(params, net))
    # rewrite conv1's BlobShape dim 24 -> 25 (the shape's first varint)
    full = caffe_pb2.NetParameter()
    full.ParseFromString(bytes(raw))
    full.layer[1].blobs[0].shape.dim[0] = 25
    f = tmp_path / "m.caffemodel"
    f.write_bytes(full.SerializeToString())
    with pytest.raises(CaffeFormatError,
                       match=r"layer 'conv1': blobs\[0\]: holds 8712 values but its shape"):
        converters.load_caffemodel(f)


def test_blob_shape_mismatch_with_prototxt(tmp_path):
    net = converters.read_prototxt(MINI / "caffenet_mini_deploy.prototxt")
    params = converters.load_caffemodel(MINI / "caffenet_mini.caffemodel")
    params["fc7"]["weight"] = params["fc7"]["weight"][:, :128]
    f = tmp_path / "m.caffemodel"
    converters.save_caffemodel(f, params, net)
    with pytest.raises(CaffeFormatError, match=r"m\.caffemodel: layer 'fc7': weight: shape "
                       r"\(256, 128\) does not match the net's \(256, 256\)"):
        converters.load_caffe(MINI / "caffenet_mini_deploy.prototxt", f)


def test_failed_save_keeps_old_file(tmp_path):
    f = tmp_path / "m.caffemodel"
    f.write_bytes(b"old")
    net = converters.read_prototxt(MINI / "caffenet_mini_deploy.prototxt")
    with pytest.raises(CaffeFormatError):
        converters.save_caffemodel(f, {"nope": {"weight": np.zeros(1)}}, net)
    assert f.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.caffemodel"]
