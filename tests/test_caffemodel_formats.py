"""Caffemodel formats: blob shape records as Caffe writes and accepts them (issue 16),
protobuf's unknown-field rules in every reader (issue 12.1) and NVIDIA Caffe's half-precision
``raw_data`` blobs (issue 12.2).

The references are independent of the code under test: Caffe's own files and parameter
shapes (``tests/data``, ``param:LAYER/i`` in the blob npz files), google.protobuf's parse of
the same bytes, a parameter shape rule written here from Caffe's ``*_layer.cpp``, numpy's
float16 decoding and OpenCV's Caffe importer.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, fld, varint
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converters
from converters import CaffeFormatError
from converters import fcn as fcn_net
from converters.proto import caffe_fast_pb2, caffe_pb2
from converters.wire import scan_caffemodel

MINI = DATA / "caffenet_mini"
#: the nets with per-blob reference outputs (the solver reference's weights are checked by
#: tests/test_solver.py)
REFERENCE_MODELS = sorted(p for p in DATA.glob("*/*.caffemodel") if p.parent.name != "solvers")
LEGACY = ("num", "channels", "height", "width")


# ----------------------------------------------------------------------------- helpers


def layer_bytes(name: str, type_: str, blobs: list[bytes] = (), extra: bytes = b"") -> bytes:
    out = fld(1, 2, name.encode()) + fld(2, 2, type_.encode()) + extra
    return fld(100, 2, out + b"".join(fld(7, 2, b) for b in blobs))


def shape_record(blob) -> tuple:
    """What a BlobProto says about its shape: the legacy fields present, and the dims."""
    legacy = tuple((f, getattr(blob, f)) for f in LEGACY if blob.HasField(f))
    return legacy, tuple(blob.shape.dim)


def blobs_by_layer(raw: bytes) -> dict[str, list]:
    net = caffe_pb2.NetParameter.FromString(raw)
    return {lp.name: list(lp.blobs) for lp in list(net.layer) + list(net.layers) if lp.blobs}


def caffe_accepts(blob, shape: tuple[int, ...]) -> bool:
    """Caffe's ``Blob::ShapeEquals``: legacy fields describe the shape padded with leading
    1s to 4 axes; otherwise ``shape.dim`` must equal the shape exactly."""
    if any(blob.HasField(f) for f in LEGACY):
        padded = (1,) * (4 - len(shape)) + tuple(shape)
        return len(shape) <= 4 and padded == tuple(getattr(blob, f) for f in LEGACY)
    return tuple(blob.shape.dim) == tuple(shape)


def caffe_param_shapes(lp, bottoms: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The parameter blob shapes Caffe's LayerSetUp gives a layer with these bottom shapes,
    written from base_conv_layer.cpp, inner_product_layer.cpp, embed_layer.cpp,
    batch_norm_layer.cpp, scale_layer.cpp, bias_layer.cpp and prelu_layer.cpp."""
    t, b = lp.type, bottoms[0]
    if t in ("Convolution", "Deconvolution"):
        p = lp.convolution_param
        axis = p.axis % len(b)
        spatial = len(b) - axis - 1
        if p.HasField("kernel_h"):
            kernel = (p.kernel_h, p.kernel_w)
        else:
            kernel = tuple(p.kernel_size) * (spatial if len(p.kernel_size) == 1 else 1)
        c = b[axis]
        w = ((p.num_output, c // p.group) if t == "Convolution"
             else (c, p.num_output // p.group)) + tuple(kernel)
        return [w, (p.num_output,)] if p.bias_term else [w]
    if t == "InnerProduct":
        p = lp.inner_product_param
        k = math.prod(b[p.axis % len(b):])
        w = (k, p.num_output) if p.transpose else (p.num_output, k)
        return [w, (p.num_output,)] if p.bias_term else [w]
    if t == "Embed":
        p = lp.embed_param
        w = (p.input_dim, p.num_output)
        return [w, (p.num_output,)] if p.bias_term else [w]
    if t == "BatchNorm":
        c = b[1] if len(b) > 1 else 1
        return [(c,), (c,), (1,)]
    if t in ("Scale", "Bias"):
        p = lp.scale_param if t == "Scale" else lp.bias_param
        axis = p.axis % len(b)
        if len(bottoms) > 1:  # the scale (or bias) is bottom[1]; Scale's bias spans it
            n = len(bottoms[1])
            axis = 0 if n == 0 else axis
            return [tuple(b[axis:axis + n])] if t == "Scale" and p.bias_term else []
        shape = tuple(b[axis:]) if p.num_axes == -1 else tuple(b[axis:axis + p.num_axes])
        return [shape, shape] if t == "Scale" and p.bias_term else [shape]
    if t == "PReLU":
        return [()] if lp.prelu_param.channel_shared else [(b[1],)]
    return []


def check_caffe_accepts(model: bytes, net, blob_shapes: dict[str, tuple[int, ...]]) -> int:
    """Every blob of ``model`` has a shape record Caffe accepts for ``net``; returns how
    many blobs were checked."""
    written = blobs_by_layer(model)
    checked = 0
    for lp in net.layer:
        if lp.name not in written:
            continue
        want = caffe_param_shapes(lp, [blob_shapes[b] for b in lp.bottom])
        assert len(written[lp.name]) == len(want), lp.name
        for i, (blob, shape) in enumerate(zip(written[lp.name], want, strict=True)):
            assert caffe_accepts(blob, shape), (lp.name, i, shape_record(blob), shape)
            checked += 1
    return checked


def prototxt_of(model: Path) -> Path:
    if model.parent.name == "caffenet_mini":
        return MINI / "caffenet_mini_deploy.prototxt"
    return model.with_suffix(".prototxt")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- shape records


@pytest.mark.parametrize("model", REFERENCE_MODELS, ids=lambda p: p.name)
def test_resaving_a_caffemodel_keeps_each_shape_record(tmp_path, model):
    """Read -> write (``like=`` the source) -> both parsed by protobuf: the same shape record
    for every blob (dims, or Caffe's legacy num/channels/height/width) and the same bits."""
    params = converters.load_caffemodel(model)
    out = tmp_path / "again.caffemodel"
    converters.save_caffemodel(out, params, converters.read_prototxt(prototxt_of(model)),
                               like=model)
    before, after = blobs_by_layer(model.read_bytes()), blobs_by_layer(out.read_bytes())
    assert list(before) == list(after)
    for layer, blobs in before.items():
        assert len(blobs) == len(after[layer])
        for x, y in zip(blobs, after[layer], strict=True):
            assert shape_record(x) == shape_record(y), layer
            assert x.HasField("shape") == y.HasField("shape"), layer
            assert same_bits(np.array(x.data, np.float32), np.array(y.data, np.float32))


@pytest.mark.parametrize("model", REFERENCE_MODELS, ids=lambda p: p.name)
def test_written_shapes_are_the_ones_caffes_net_has(model):
    """Without ``like=``, every blob's record is exactly the parameter shape real Caffe built
    (``param:LAYER/i`` in the reference npz, where recorded), and accepted by the rule
    written from the ``.cpp`` for the blob shapes Caffe computed."""
    params = converters.load_caffemodel(model)
    net = converters.read_prototxt(prototxt_of(model))
    raw = converters.build_caffemodel(params, net)
    ref = np.load(MINI / "caffenet_mini_classifier_blobs.npz" if model.parent == MINI
                  else str(model).replace(".caffemodel", "_blobs.npz"))
    for layer, blobs in blobs_by_layer(raw).items():
        for i, blob in enumerate(blobs):
            assert not any(blob.HasField(f) for f in LEGACY)
            if f"param:{layer}/{i}" in ref.files:
                assert tuple(blob.shape.dim) == ref[f"param:{layer}/{i}"].shape, (layer, i)
    assert check_caffe_accepts(raw, net, {k: ref[k].shape for k in ref.files}) == sum(
        len(v) for v in blobs_by_layer(raw).values())


def test_channel_shared_prelu_slope_has_no_shape_record():
    """prelu_layer.cpp gives a shared slope zero axes: Caffe writes no shape at all and
    refuses (aborts on) ``dim: 1``. A (1,) slope, e.g. from older code, is written right."""
    net = converters.read_prototxt(DATA / "zoo" / "prelu.prototxt")
    for slope in (np.float32(0.3), np.array([0.3], np.float32), np.full((1, 1), 0.3, np.float32)):
        raw = converters.build_caffemodel({"pr2": {"slope": slope}}, net)
        blob = blobs_by_layer(raw)["pr2"][0]
        assert not blob.HasField("shape") and shape_record(blob) == ((), ())
        assert list(blob.data) == [np.float32(0.3)]


SPECIAL_LAYERS = """
layer { name: "in" type: "Input" top: "x" top: "ids" top: "y"
  input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } shape { dim: 2 dim: 7 }
                shape { dim: 2 dim: 3 } } }
layer { name: "s0" type: "Scale" bottom: "x" top: "s0" scale_param { num_axes: 0 bias_term: true } }
layer { name: "s_all" type: "Scale" bottom: "x" top: "s_all" scale_param { axis: 1 num_axes: -1 } }
layer { name: "s2" type: "Scale" bottom: "x" bottom: "y" top: "s2"
  scale_param { axis: 0 bias_term: true } }
layer { name: "b0" type: "Bias" bottom: "x" top: "b0" bias_param { num_axes: 0 } }
layer { name: "b2" type: "Bias" bottom: "x" top: "b2" bias_param { axis: 2 num_axes: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "bn" }
layer { name: "em" type: "Embed" bottom: "ids" top: "em"
  embed_param { num_output: 6 input_dim: 10 } }
layer { name: "dc" type: "Deconvolution" bottom: "x" top: "dc"
  convolution_param { num_output: 4 group: 2 kernel_h: 3 kernel_w: 2 stride: 2 } }
layer { name: "ipt" type: "InnerProduct" bottom: "x" top: "ipt"
  inner_product_param { num_output: 7 transpose: true } }
layer { name: "ip2" type: "InnerProduct" bottom: "x" top: "ip2"
  inner_product_param { num_output: 7 axis: 2 bias_term: false } }
layer { name: "pr" type: "PReLU" bottom: "x" top: "pr" prelu_param { channel_shared: true } }
"""

#: parameters as a user might hold them: Caffe's shape up to leading axes of size 1
SPECIAL_PARAMS = {
    "s0": {"scale": np.float32(2.0), "bias": np.ones((1,), np.float32)},
    "s_all": {"scale": np.arange(60, dtype=np.float32).reshape(3, 4, 5)},
    "s2": {"bias": np.ones((2, 3), np.float32)},
    "b0": {"bias": np.ones((1, 1), np.float32)},
    "b2": {"bias": np.ones((4, 5), np.float32)},
    "bn": {"mean": np.zeros(3, np.float32), "variance": np.ones(3, np.float32),
           "scale_factor": np.float32(1.0)},
    "em": {"weight": np.zeros((10, 6), np.float32), "bias": np.zeros(6, np.float32)},
    "dc": {"weight": np.zeros((3, 2, 3, 2), np.float32), "bias": np.zeros(4, np.float32)},
    "ipt": {"weight": np.zeros((1, 1, 60, 7), np.float32), "bias": np.zeros(7, np.float32)},
    "ip2": {"weight": np.zeros((7, 20), np.float32)},
    "pr": {"slope": np.full((1,), 0.25, np.float32)},
}


def test_layer_types_with_their_own_shape_rules():
    """Scale/Bias with num_axes 0 and -1 and a second bottom, BatchNorm's (1,) factor,
    Embed, grouped Deconvolution, transposed and axis-2 InnerProduct, shared PReLU: each
    blob written as the .cpp rule gives it."""
    net = converters.parse_prototxt(SPECIAL_LAYERS)
    raw = converters.build_caffemodel(SPECIAL_PARAMS, net)
    shapes = {"x": (2, 3, 4, 5), "ids": (2, 7), "y": (2, 3)}
    assert check_caffe_accepts(raw, net, shapes) == 17
    written = blobs_by_layer(raw)
    assert not written["s0"][0].HasField("shape") and not written["b0"][0].HasField("shape")
    assert not written["pr"][0].HasField("shape")
    assert list(written["bn"][2].shape.dim) == [1]
    assert list(written["ipt"][0].shape.dim) == [60, 7]
    for layer, blobs in SPECIAL_PARAMS.items():  # values untouched, in Caffe's blob order
        kind = next(lp.type for lp in net.layer if lp.name == layer)
        order = [n for n in converters.PARAM_NAMES[kind] if n in blobs]
        for blob, name in zip(written[layer], order, strict=True):
            np.testing.assert_array_equal(np.array(blob.data, np.float32),
                                          np.ravel(blobs[name]))


@pytest.mark.parametrize("layer, blob, value, message", [
    ("dc", "weight", np.zeros((3, 4, 3, 2), np.float32), r"\(\?, 2, 3, 2\)"),
    ("ipt", "weight", np.zeros((2, 60, 7), np.float32), r"\(\?, 7\)"),
    ("em", "weight", np.zeros((6, 10), np.float32), r"\(10, 6\)"),
    ("pr", "slope", np.zeros(3, np.float32), r"\(\)"),
    ("s0", "scale", np.zeros(2, np.float32), r"\(\)"),
])
def test_an_array_that_cannot_be_the_blob_is_refused_by_the_writer(tmp_path, layer, blob, value,
                                                                   message):
    net = converters.parse_prototxt(SPECIAL_LAYERS)
    params = {layer: dict(SPECIAL_PARAMS[layer], **{blob: value})}
    f = tmp_path / "m.caffemodel"
    with pytest.raises(CaffeFormatError, match=rf"m\.caffemodel: layer '{layer}': {blob}: "
                       rf"shape .* cannot be Caffe's {message} for this"):
        converters.save_caffemodel(f, params, net)
    assert not f.exists()


def test_legacy_records_kept_only_where_they_still_describe_the_blob():
    """``like=`` a V1 file: unchanged blobs keep num/channels/height/width; a blob whose shape
    changed gets the shape Caffe gives it."""
    params = converters.load_caffemodel(MINI / "caffenet_mini_v1.caffemodel")
    params = {k: dict(v) for k, v in params.items()}
    params["fc8"]["weight"] = params["fc8"]["weight"][:10]
    params["fc8"]["bias"] = params["fc8"]["bias"][:10]
    net = converters.read_prototxt(MINI / "caffenet_mini_deploy.prototxt")
    net.layer[-2].inner_product_param.num_output = 10
    assert net.layer[-2].name == "fc8"
    written = blobs_by_layer(converters.build_caffemodel(
        params, net, like=MINI / "caffenet_mini_v1.caffemodel"))
    legacy_fc7 = tuple(zip(LEGACY, (1, 1, 256, 256), strict=True))
    assert shape_record(written["fc7"][0]) == (legacy_fc7, ())
    assert shape_record(written["fc8"][0]) == ((), (10, 256))
    assert shape_record(written["fc8"][1]) == ((), (10,))


# ----------------------------------------------------------------------------- commands


def test_fcn_command_writes_shapes_caffe_accepts(tmp_path):
    from fcn_jax.cli import main

    for source in ("caffenet_mini_v1.caffemodel", "caffenet_mini.caffemodel"):
        prefix = tmp_path / source.split(".")[0]
        assert main(["fcn", str(MINI / "caffenet_mini_deploy_v1.prototxt"), str(MINI / source),
                     "-o", str(prefix), "--input-size", "451", "451", "--batch", "1"]) == 0
        net = converters.read_prototxt(f"{prefix}.prototxt")
        raw = Path(f"{prefix}.caffemodel").read_bytes()
        assert check_caffe_accepts(raw, net, fcn_net.blob_shapes(net)) == 16
        # values: the V2 reference's, bit for bit, wherever the layer kept its name
        ref = blobs_by_layer((MINI / "caffenet_mini.caffemodel").read_bytes())
        for layer, blobs in blobs_by_layer(raw).items():
            old = ref[layer.removesuffix("-conv")]
            for x, y in zip(blobs, old, strict=True):
                assert same_bits(np.array(x.data, np.float32), np.array(y.data, np.float32))


@pytest.mark.slow
def test_finetune_export_writes_shapes_caffe_accepts(tmp_path):
    from fcn_jax.cli import main

    out = tmp_path / "run"
    assert main(["finetune", "--demo", "--out", str(out), "--input-size", "227", "227",
                 "--widths", "4", "8", "8", "8", "8", "8", "8", "--batch-size", "1",
                 "--val-images", "1", "--train-images", "2", "--no-progress",
                 "--steps", "1"]) == 0
    net = converters.read_prototxt(out / "finetuned.prototxt")
    raw = (out / "finetuned.caffemodel").read_bytes()
    assert check_caffe_accepts(raw, net, fcn_net.blob_shapes(net)) == 16


def test_fold_batchnorm_output_has_shapes_caffe_accepts():
    from fcn_jax.surgery import fold_batchnorm

    zoo = DATA / "zoo"
    net = converters.read_prototxt(zoo / "resnet_block.prototxt")
    params, new_net = fold_batchnorm(converters.load_caffemodel(zoo / "resnet_block.caffemodel"),
                                     net)
    raw = converters.build_caffemodel({k: {n: np.asarray(a) for n, a in v.items()}
                                       for k, v in params.items()}, new_net)
    assert not any(lp.type == "BatchNorm" for lp in new_net.layer)
    assert check_caffe_accepts(raw, new_net, fcn_net.blob_shapes(new_net)) == 6


# ----------------------------------------------------------------------------- wire rules


def readers(raw: bytes, tmp_path: Path) -> dict[str, object]:
    """Each reader's params (or its CaffeFormatError) for the same bytes: the zero-copy
    scanner, ``parse_caffemodel`` (fast or exact schema as it chooses), the fast schema
    forced (where the scanner says it can hold the file) and Caffe's exact schema."""
    f = tmp_path / "x.caffemodel"
    f.write_bytes(raw)
    runs = {"scanner": lambda: converters.load_caffemodel(f),
            "parse": lambda: converters.net_params(converters.parse_caffemodel(raw)),
            "exact": lambda: converters.net_params(converters.upgrade_net(
                caffe_pb2.NetParameter.FromString(raw)))}
    if scan_caffemodel(raw) is not None:
        runs["fast"] = lambda: converters.net_params(converters.upgrade_net(
            caffe_fast_pb2.NetParameter.FromString(raw)))
    out = {}
    for name, run in runs.items():
        try:
            out[name] = run()
        except CaffeFormatError as e:
            out[name] = e
        except DecodeError as e:  # google.protobuf refuses the bytes (the forced schemas)
            out[name] = CaffeFormatError(f"protobuf: {e}")
    return out


def assert_readers_agree(raw: bytes, tmp_path: Path, expected) -> None:
    """All readers give ``expected`` (params, or an exception type)."""
    for name, got in readers(raw, tmp_path).items():
        if isinstance(expected, type):
            assert isinstance(got, expected), (name, got)
            continue
        assert not isinstance(got, Exception), (name, got)
        assert list(got) == list(expected), name
        for layer in expected:
            assert list(got[layer]) == list(expected[layer]), (name, layer)
            for k, v in expected[layer].items():
                assert same_bits(got[layer][k], v), (name, layer, k, got[layer][k], v)


def test_fork_param_at_a_bvlc_field_number_with_another_wire_type_is_skipped(tmp_path):
    """The real case: a fork's loss layer stores its param at embed_param's number (137)
    with wire type 5. Protobuf (and so Caffe, OpenCV) skips it; so do all our readers."""
    w = np.arange(6, dtype="<f4")
    blob = fld(7, 2, fld(1, 2, varint(2) + varint(3))) + fld(5, 2, w.tobytes())
    raw = (layer_bytes("conv", "Convolution", [blob])
           + layer_bytes("loss", "SoftmaxWithLoss", extra=fld(137, 5, b"\x00\x00\x80\x3f")))
    ref = caffe_pb2.NetParameter.FromString(raw)  # google.protobuf's own reading
    assert not ref.layer[1].HasField("embed_param")
    assert ref.layer[1].embed_param.num_output == 0
    assert_readers_agree(raw, tmp_path, {"conv": {"weight": w.reshape(2, 3)}})
    info = converters.read_caffemodel(tmp_path / "x.caffemodel")
    assert [lp.name for lp in info.layer] == ["conv", "loss"]


def test_two_shape_messages_merge_as_in_protobuf(tmp_path):
    """An embedded message given twice merges: the second BlobShape's dims are appended."""
    w = np.arange(24, dtype="<f4")
    blob = (fld(7, 2, fld(1, 2, varint(2) + varint(3))) + fld(5, 2, w.tobytes())
            + fld(7, 2, fld(1, 0, 4)))
    ref = caffe_pb2.BlobProto.FromString(blob)
    assert list(ref.shape.dim) == [2, 3, 4]
    assert_readers_agree(layer_bytes("c", "Convolution", [blob]), tmp_path,
                         {"c": {"weight": w.reshape(2, 3, 4)}})


def test_mismatched_wire_types_inside_a_blob_are_skipped(tmp_path):
    """num sent length-delimited, a dim as fixed32, data as a varint: all unknown fields
    for protobuf; what remains decides the blob."""
    w = np.arange(6, dtype="<f4")
    blob = (fld(1, 2, b"\x05") + fld(7, 2, fld(1, 2, varint(6)) + fld(1, 5, b"\x02\0\0\0"))
            + fld(5, 0, 7) + fld(5, 2, w.tobytes()) + fld(12, 0, 3))
    ref = caffe_pb2.BlobProto.FromString(blob)
    assert not ref.HasField("num") and list(ref.shape.dim) == [6] and len(ref.data) == 6
    assert_readers_agree(layer_bytes("c", "Convolution", [blob]), tmp_path,
                         {"c": {"weight": w}})


def test_legacy_int32_dims_keep_the_low_32_bits_as_protobuf(tmp_path):
    w = np.arange(6, dtype="<f4")
    blob = b"".join(fld(i + 1, 0, d) for i, d in enumerate((2**32 + 1, 1, 2, 3)))
    blob += fld(5, 2, w.tobytes())
    ref = caffe_pb2.BlobProto.FromString(blob)
    assert (ref.num, ref.channels, ref.height, ref.width) == (1, 1, 2, 3)
    assert_readers_agree(layer_bytes("c", "Convolution", [blob]), tmp_path,
                         {"c": {"weight": w.reshape(1, 1, 2, 3)}})


@pytest.mark.parametrize("blob", [
    fld(7, 2, fld(1, 2, varint(3))) + fld(5, 0, 1),                     # data skipped: 0 values
    fld(7, 2, fld(1, 2, varint(3))) + fld(5, 2, b"\0" * 12)[:-2],       # truncated payload
    fld(7, 2, fld(1, 2, varint(3))) + varint(5 << 3 | 2) + varint(99) + b"\0" * 12,  # past end
    fld(7, 2, fld(1, 2, varint(3))) + fld(5, 2, b"\0" * 10),            # not whole floats
], ids=["wrong-wire-type-weights", "truncated", "length-past-end", "ragged"])
def test_strict_where_caffe_is_strict(tmp_path, blob):
    raw = layer_bytes("c", "Convolution", [blob])
    try:
        caffe_pb2.NetParameter.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf refuses the file: so must every reader
        pass
    assert_readers_agree(raw, tmp_path, CaffeFormatError)


def test_enum_value_outside_the_type_enum_is_named(tmp_path):
    blob = fld(7, 2, fld(1, 2, varint(1))) + fld(10, 0, 9) + fld(12, 2, b"\0\0")
    got = readers(layer_bytes("c", "Convolution", [blob]), tmp_path)
    for name in ("scanner", "parse"):  # the public readers (the forced schemas skip checks)
        assert "layer 'c': blobs[0].raw_data_type: value 9 is not a valid Type" in str(
            got[name]), name


def reference_params(raw: bytes):
    """Caffe's Blob::FromProto (and NVCaffe's raw_data branch) applied, in this test, to
    google.protobuf's parse of the bytes: the expected weight, or CaffeFormatError."""
    try:
        blob = caffe_pb2.NetParameter.FromString(raw).layer[0].blobs[0]
    except Exception:  # noqa: BLE001
        return CaffeFormatError
    if any(blob.HasField(f) for f in LEGACY):
        dims = tuple(getattr(blob, f) for f in LEGACY)
    else:
        dims = tuple(blob.shape.dim)
    if any(d <= 0 for d in dims):
        return CaffeFormatError
    if len(blob.double_data):
        values = np.array(blob.double_data, np.float64)
    elif len(blob.data):
        values = np.array(blob.data, np.float32)
    elif blob.HasField("raw_data"):
        kinds = {0: "<f8", 1: "<f4", 2: "<f2"}
        if blob.raw_data_type not in kinds or not blob.HasField("raw_data_type"):
            return CaffeFormatError
        size = np.dtype(kinds[blob.raw_data_type]).itemsize
        if len(blob.raw_data) % size:
            return CaffeFormatError
        values = np.frombuffer(blob.raw_data, kinds[blob.raw_data_type])
    else:
        values = np.zeros(0, np.float32)
    if values.size != math.prod(dims):
        return CaffeFormatError
    return {"c": {"weight": values.astype(np.float32).reshape(dims)}}


def _dims_field(dims: list[int], wire: int) -> bytes:
    if wire == 2:
        return fld(1, 2, b"".join(varint(d) for d in dims))
    if wire == 0:
        return b"".join(fld(1, 0, d) for d in dims)
    return b"".join(fld(1, wire, struct.pack("<I" if wire == 5 else "<Q", d)) for d in dims)


def any_field(number: int, wire: int) -> bytes:
    """A field of any number with a well-formed payload for its wire type."""
    payload = {0: 2, 1: b"\0" * 7 + b"\x40", 2: b"\x08\x02", 5: b"\0\0\0\x40"}[wire]
    return fld(number, wire, payload)


@st.composite
def blob_fields(draw) -> bytes:
    """A BlobProto from shuffled fields, some with a wire type the schema does not allow."""
    dims = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    n = math.prod(dims) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    n = max(n, 0)
    vals = np.arange(n, dtype=np.float64) / 4 - 1
    choices = [
        fld(7, 2, _dims_field(dims, draw(st.sampled_from([2, 2, 0, 5, 1])))),
        fld(5, 2, vals.astype("<f4").tobytes()),
        b"".join(fld(5, 5, struct.pack("<f", v)) for v in vals),
        fld(8, 2, vals.astype("<f8").tobytes()),
        fld(8, 1, struct.pack("<d", 0.5)),
        fld(10, 0, draw(st.integers(0, 4))),
        fld(12, 2, vals.astype(draw(st.sampled_from(["<f2", "<f4", "<f8"]))).tobytes()),
        any_field(draw(st.integers(1, 13)), draw(st.sampled_from([0, 1, 2, 5]))),
    ]
    legacy = draw(st.booleans())
    if legacy:
        dims4 = [1] * (4 - len(dims)) + dims if len(dims) <= 4 else dims
        choices.append(b"".join(fld(i + 1, 0, d) for i, d in enumerate(dims4)))
    # often a plausible core (a shape and one payload), plus random fields, in any order
    core = [choices[-1] if legacy else choices[0], draw(st.sampled_from(choices[1:7]))]
    picked = draw(st.lists(st.sampled_from(choices), min_size=0, max_size=4))
    if draw(st.booleans()):
        picked += core
    return b"".join(draw(st.permutations(picked or core)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(blob=blob_fields())
def test_every_reader_agrees_with_protobuf_on_random_blobs(tmp_path, blob):
    raw = layer_bytes("c", "Convolution", [blob])
    assert_readers_agree(raw, tmp_path, reference_params(raw))


# ----------------------------------------------------------------------------- NVCaffe fp16


def nvcaffe_blob(dims, values: np.ndarray, kind: int) -> bytes:
    """A BlobProto as NVIDIA Caffe writes it: shape, raw_data_type, raw_data."""
    return (fld(7, 2, fld(1, 2, b"".join(varint(d) for d in dims))) + fld(10, 0, kind)
            + fld(12, 2, values.tobytes()))


def test_float16_float_and_double_raw_data_are_read_exactly(tmp_path):
    halves = np.array([0, -0.0, 1, -2.5, 65504, 6.1e-5, 5.96e-8, np.inf, 0.1, 3.14159],
                      "<f2")
    for kind, values in ((2, halves), (1, halves.astype("<f4") * 3), (0, np.linspace(-1, 1, 10))):
        raw = layer_bytes("c", "Convolution", [nvcaffe_blob([2, 5], values, kind)])
        independent = np.frombuffer(values.tobytes(), values.dtype).astype(np.float32)
        assert_readers_agree(raw, tmp_path, {"c": {"weight": independent.reshape(2, 5)}})
    # data, when present, wins over raw_data (Caffe's and NVCaffe's order)
    blob = nvcaffe_blob([2], np.array([7, 8], "<f2"), 2) + fld(5, 2, np.ones(2, "<f4").tobytes())
    assert_readers_agree(layer_bytes("c", "Convolution", [blob]), tmp_path,
                         {"c": {"weight": np.ones(2, np.float32)}})


@pytest.mark.parametrize("blob, message", [
    (fld(7, 2, fld(1, 2, varint(2))) + fld(12, 2, b"\0" * 4), "raw_data without raw_data_type"),
    (nvcaffe_blob([2], np.zeros(2, "<i4"), 3), "raw_data_type INT is not a float type"),
    (nvcaffe_blob([3], np.zeros(2, "<f2"), 2), r"holds 2 values but its shape \(3,\) needs 3"),
    (nvcaffe_blob([2], np.zeros(3, np.uint8), 2), "raw_data length 3 is not a multiple of 2"),
])
def test_bad_raw_data_is_named(tmp_path, blob, message):
    got = readers(layer_bytes("c", "Convolution", [blob]), tmp_path)
    for name, e in got.items():
        assert isinstance(e, CaffeFormatError), name
        assert re.search(r"layer 'c': blobs\[0\]: " + message, str(e)), (name, str(e))


def test_raw_data_honours_the_memory_budget(tmp_path):
    """The budget counts the float32 array made from the halves, before allocating."""
    raw = layer_bytes("c", "Convolution", [nvcaffe_blob([1000], np.zeros(1000, "<f2"), 2)])
    f = tmp_path / "h.caffemodel"
    f.write_bytes(raw)
    with pytest.raises(CaffeFormatError, match=r"needs 4000 bytes, over the memory budget"):
        converters.load_caffemodel(f, memory_budget=3000)
    assert converters.load_caffemodel(f, memory_budget=5000)["c"]["weight"].shape == (1000,)


def test_save_float16_writes_nvcaffe_raw_halves(tmp_path):
    net = converters.read_prototxt(DATA / "zoo" / "prelu.prototxt")
    params = converters.load_caffemodel(DATA / "zoo" / "prelu.caffemodel")
    f = tmp_path / "h.caffemodel"
    converters.save_caffemodel(f, params, net, dtype="float16")
    for layer, blobs in blobs_by_layer(f.read_bytes()).items():
        (blob,) = blobs
        assert blob.raw_data_type == 2 and not blob.data and not blob.double_data
        decoded = np.frombuffer(blob.raw_data, "<f2")
        assert same_bits(decoded, np.asarray(params[layer]["slope"], "<f2").ravel())
    back = converters.load_caffemodel(f)
    assert back["pr2"]["slope"].shape == () and not blobs_by_layer(
        f.read_bytes())["pr2"][0].HasField("shape")
    for layer in params:
        assert same_bits(back[layer]["slope"],
                         params[layer]["slope"].astype(np.float16).astype(np.float32))


def test_save_float16_refuses_values_beyond_its_range(tmp_path):
    net = converters.read_prototxt(DATA / "layers" / "conv_rect.prototxt")
    params = {"c": {"weight": np.zeros((5, 3, 5, 3), np.float32), "bias": np.zeros(5)}}
    params["c"]["bias"][2] = 70000.0
    f = tmp_path / "h.caffemodel"
    with pytest.raises(CaffeFormatError, match=r"h\.caffemodel: layer 'c': bias: value 70000\.0 "
                       r"at \(2,\) is beyond float16's range"):
        converters.save_caffemodel(f, params, net, dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        converters.save_caffemodel(f, params, net, dtype="int8")
    assert not f.exists()


FP16_NET = """
name: "fp16"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "pr" type: "PReLU" bottom: "conv" top: "conv" prelu_param { channel_shared: true } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "up" type: "Deconvolution" bottom: "pool" top: "up"
  convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "up" top: "ip"
  inner_product_param { num_output: 5 } }
"""


def test_float16_model_matches_opencv(tmp_path):
    """OpenCV's Caffe importer reads NVCaffe's fp16 blobs; our forward of the same file
    agrees within 1e-4 (relative to the largest output)."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV not installed (the [opencv] test extra)")
    import jax

    proto = tmp_path / "fp16.prototxt"
    proto.write_text(FP16_NET)
    rng = np.random.default_rng(0)
    params = {"conv": {"weight": rng.normal(0, 0.3, (6, 3, 3, 3)), "bias": rng.normal(0, 0.1, 6)},
              "bn": {"mean": rng.normal(0, 0.2, 6), "variance": rng.uniform(0.5, 2, 6),
                     "scale_factor": np.array([2.0])},
              "sc": {"scale": rng.uniform(0.5, 1.5, 6), "bias": rng.normal(0, 0.1, 6)},
              "pr": {"slope": np.array(0.2)},
              "up": {"weight": rng.normal(0, 0.3, (6, 4, 2, 2)), "bias": rng.normal(0, 0.1, 4)},
              "ip": {"weight": rng.normal(0, 0.05, (5, 4 * 16 * 16)), "bias": np.zeros(5)}}
    model = tmp_path / "fp16.caffemodel"
    converters.save_caffemodel(model, params, converters.read_prototxt(proto), dtype="float16")
    x = rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)
    module, ours = converters.load_caffe(proto, model)
    blobs = jax.jit(module.apply)({"params": ours}, x)
    cvnet = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    cvnet.setInput(x)
    for layer, name in (("pr", "conv"), ("up", "up"), ("ip", "ip")):
        ref = cvnet.forward(layer).reshape(np.shape(blobs[name]))
        err = float(np.max(np.abs(np.asarray(blobs[name], np.float64) - ref)))
        assert err <= 1e-4 * float(np.max(np.abs(ref))), (name, err)


def test_save_like_an_fp16_file_keeps_fp16(tmp_path):
    """Issue 20 item 12: ``like=`` an NVCaffe fp16 file writes fp16 (not float32, twice the
    size) unless ``dtype=`` says otherwise; a float32 or float64 source keeps its type."""
    net = converters.read_prototxt(DATA / "zoo" / "prelu.prototxt")
    params = converters.load_caffemodel(DATA / "zoo" / "prelu.caffemodel")
    half = tmp_path / "h.caffemodel"
    converters.save_caffemodel(half, params, net, dtype="float16")
    again = tmp_path / "again.caffemodel"
    converters.save_caffemodel(again, converters.load_caffemodel(half), net, like=half)
    for blobs in blobs_by_layer(again.read_bytes()).values():
        assert blobs[0].raw_data_type == 2 and not blobs[0].data
    assert again.read_bytes() == half.read_bytes()  # halves -> float32 -> halves: exact
    single = tmp_path / "s.caffemodel"
    converters.save_caffemodel(single, params, net, like=half, dtype="float32")
    assert all(b[0].data and not b[0].raw_data
               for b in blobs_by_layer(single.read_bytes()).values())
    double = tmp_path / "d.caffemodel"
    converters.save_caffemodel(double, params, net, dtype="float64")
    for src, field in ((single, "data"), (double, "double_data")):
        out = tmp_path / f"like_{field}.caffemodel"
        converters.save_caffemodel(out, params, net, like=src)
        assert all(getattr(b[0], field) for b in blobs_by_layer(out.read_bytes()).values())
    # a NetParameter as like= (the parsed file) reads the same storage type
    parsed = converters.read_caffemodel(half)
    converters.save_caffemodel(again, params, net, like=parsed)
    assert all(b[0].raw_data_type == 2 for b in blobs_by_layer(again.read_bytes()).values())
