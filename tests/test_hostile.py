"""Hostile input files: every reader raises only ``CaffeFormatError`` (one line naming the
file, layer and field) and never allocates what a file merely claims.

Each class of bad input in the README's table has a test here (crafted files) and, for the
random kinds, in ``test_fuzz.py``.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, fld, legacy_weights_bytes, varint

import converters
from converters import CaffeFormatError
from converters.caffe_io import PROTOBUF_LIMIT
from converters.legacy_checkpoint import load_legacy_checkpoint as load_checkpoint
from converters.legacy_checkpoint import parse_legacy_checkpoint as parse_checkpoint
from converters.npy import load_npy, load_npz
from converters.proto import caffe_pb2

MINI = DATA / "caffenet_mini"
LAYERS = DATA / "layers"
ZOO = DATA / "zoo"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def one_line(e: pytest.ExceptionInfo | BaseException) -> str:
    msg = str(e.value if isinstance(e, pytest.ExceptionInfo) else e)
    assert "\n" not in msg and len(msg) <= 800, msg
    return msg


def top_level_boundaries(raw: bytes) -> list[int]:
    """Offsets where a top-level protobuf field ends (a cut there parses silently)."""
    pos, out = 0, []
    while pos < len(raw):
        tag, n = 0, 0
        while True:
            b = raw[pos]
            tag |= (b & 0x7F) << (7 * n)
            pos += 1
            n += 1
            if not b & 0x80:
                break
        wire = tag & 7
        if wire == 0:
            while raw[pos] & 0x80:
                pos += 1
            pos += 1
        elif wire == 2:
            length, n = 0, 0
            while True:
                b = raw[pos]
                length |= (b & 0x7F) << (7 * n)
                pos += 1
                n += 1
                if not b & 0x80:
                    break
            pos += length
        else:
            pos += 8 if wire == 1 else 4
        out.append(pos)
    return out


def conv_net_bytes(blobs: list[bytes], name: str = "c", extra: bytes = b"") -> bytes:
    """A caffemodel with one Convolution layer holding raw BlobProto payloads."""
    layer = fld(1, 2, name.encode()) + fld(2, 2, b"Convolution") + extra
    for b in blobs:
        layer += fld(7, 2, b)
    return fld(100, 2, layer)


def blob_bytes(dims, data: np.ndarray | None = None, *, double: np.ndarray | None = None,
               legacy: bool = False) -> bytes:
    out = b""
    if legacy:
        for i, d in enumerate(dims):
            out += fld(i + 1, 0, d)
    else:
        out += fld(7, 2, fld(1, 2, b"".join(varint(d) for d in dims)))
    if data is not None:
        out += fld(5, 2, np.asarray(data, "<f4").tobytes())
    if double is not None:
        out += fld(8, 2, np.asarray(double, "<f8").tobytes())
    return out


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("name", ["layers/conv_rect", "zoo/batchnorm_scale", "zoo/prelu"])
def test_every_truncation_of_a_caffemodel_is_refused_or_loses_nothing(name):
    """A cut at any byte: an error, or (a cut between two top-level fields, which protobuf
    parses silently) exactly the full file's weights or fewer layers, which load_caffe's
    strict check then refuses."""
    raw = (DATA / f"{name}.caffemodel").read_bytes()
    full = converters.net_params(converters.parse_caffemodel(raw))
    silent = []
    for k in range(len(raw)):
        try:
            params = converters.net_params(converters.parse_caffemodel(raw[:k], "cut"))
        except CaffeFormatError as e:
            one_line(e)
            continue
        assert set(params) <= set(full)
        for layer, blobs in params.items():
            for n, arr in blobs.items():
                np.testing.assert_array_equal(arr, full[layer][n])
        if set(params) != set(full):
            silent.append(k)
    assert set(silent) <= set(top_level_boundaries(raw))


def test_caffemodel_cut_between_layers_is_caught_by_load_caffe(tmp_path):
    raw = (MINI / "caffenet_mini_v1.caffemodel").read_bytes()
    proto = MINI / "caffenet_mini_deploy.prototxt"
    cuts = [k for k in top_level_boundaries(raw) if k < len(raw)]
    assert len(cuts) > 10
    for k in cuts[:: max(1, len(cuts) // 6)]:
        f = write(tmp_path, "cut.caffemodel", raw[:k])
        with pytest.raises(CaffeFormatError, match=r"cut\.caffemodel: "):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converters.load_caffe(proto, f)
    # and a cut anywhere else is a parse error
    for k in (17, 1000, len(raw) // 2, len(raw) - 3):
        with pytest.raises(CaffeFormatError, match="truncated or corrupt"):
            converters.parse_caffemodel(raw[:k], "cut")


def test_every_truncation_of_a_prototxt_is_refused_or_flagged(tmp_path):
    """A prototxt cut between two layers is a valid, smaller net (Caffe too would run it);
    the weights the cut net lacks are reported, as Caffe's "Ignoring source layer" does."""
    text = (ZOO / "batchnorm_scale.prototxt").read_text()
    model = ZOO / "batchnorm_scale.caffemodel"
    full = [lp.name for lp in converters.read_prototxt(ZOO / "batchnorm_scale.prototxt").layer]
    outcomes = set()
    for k in range(len(text)):
        f = write(tmp_path, "cut.prototxt", text[:k])
        try:
            net = converters.read_prototxt(f)
        except CaffeFormatError as e:
            assert one_line(e).startswith(str(f))
            outcomes.add("error")
            continue
        if [lp.name for lp in net.layer] == full:
            outcomes.add("same net")  # only whitespace was cut
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                converters.load_caffe(f, model)
            except CaffeFormatError:
                outcomes.add("error")
                continue
        assert any("ignoring weights of layers the net does not have" in str(w.message)
                   for w in caught), k
        outcomes.add("warned")
    assert {"error", "warned"} <= outcomes


def test_v1_prototxt_cut_inside_input_dims(tmp_path):
    text = (MINI / "caffenet_mini_deploy_v1.prototxt").read_text()
    cut = text.index("input_dim", text.index("input_dim") + 1) + len("input_dim: 3")
    f = write(tmp_path, "v1.prototxt", text[:cut])
    with pytest.raises(CaffeFormatError, match=r"v1\.prototxt: input_dim: needs 4 input_dim"):
        converters.read_prototxt(f)


# ----------------------------------------------------------------------------- wire types


def test_wrong_wire_type_is_an_unknown_field_as_in_protobuf(tmp_path):
    """Protobuf (and so Caffe) skips a field whose wire type the schema does not allow."""
    bad_conv = fld(1, 2, b"x") + fld(4, 0, 3)  # num_output sent length-delimited; kernel 3
    raw = conv_net_bytes([], extra=fld(106, 2, bad_conv))
    f = write(tmp_path, "w.caffemodel", raw)
    conv = converters.read_caffemodel(f).layer[0].convolution_param
    ref = caffe_pb2.NetParameter.FromString(raw).layer[0].convolution_param
    assert not conv.HasField("num_output") and not ref.HasField("num_output")
    assert list(conv.kernel_size) == list(ref.kernel_size) == [3]


def test_enum_value_outside_caffes_enum_is_named(tmp_path):
    raw = fld(100, 2, fld(1, 2, b"p") + fld(2, 2, b"Pooling") + fld(121, 2, fld(1, 0, 7)))
    f = write(tmp_path, "e.caffemodel", raw)
    with pytest.raises(CaffeFormatError,
                       match=r"layer 'p': pooling_param\.pool: value 7 is not a valid "
                             r"PoolMethod"):
        converters.read_caffemodel(f)


def test_text_fields_that_are_not_utf8_are_named():
    """Protobuf hands invalid UTF-8 out as bytes; found by experiments/fuzz_long.py."""
    raw = conv_net_bytes([], extra=fld(3, 2, b"\xfe\xff"))  # bottom
    with pytest.raises(CaffeFormatError, match=r"layer 'c': bottom: text is not valid UTF-8"):
        converters.parse_caffemodel(raw)
    raw = fld(3, 2, b"da\xdfta") + conv_net_bytes([])  # V1 net input name
    with pytest.raises(CaffeFormatError, match=r"<bytes>: input: text is not valid UTF-8"):
        converters.parse_caffemodel(raw)


def test_unknown_field_numbers_of_caffe_forks_are_allowed():
    data = np.arange(3, dtype=np.float32)
    raw = conv_net_bytes([blob_bytes([3], data)], extra=fld(9999, 2, b"fork's own param"))
    params = converters.net_params(converters.parse_caffemodel(raw))
    np.testing.assert_array_equal(params["c"]["weight"], data)


# ----------------------------------------------------------------------------- blob payloads


def test_double_data_length_disagrees_with_shape():
    raw = conv_net_bytes([blob_bytes([2, 3], double=np.ones(5))])
    with pytest.raises(CaffeFormatError,
                       match=r"<net>: layer 'c': blobs\[0\]: holds 5 values but its shape "
                             r"\(2, 3\) needs 6"):
        converters.net_params(converters.parse_caffemodel(raw))


def test_unpacked_floats_of_the_wrong_count():
    blob = fld(7, 2, fld(1, 2, varint(4))) + b"".join(fld(5, 5, struct.pack("<f", v))
                                                       for v in (1, 2, 3))
    with pytest.raises(CaffeFormatError, match=r"blobs\[0\]: holds 3 values but its shape"):
        converters.net_params(converters.parse_caffemodel(conv_net_bytes([blob])))


def test_data_split_over_several_packed_chunks_is_read_whole():
    """Protobuf concatenates repeated chunks of a packed field: legal, so read it all."""
    a, b = np.arange(4, dtype="<f4"), np.arange(4, 10, dtype="<f4")
    blob = fld(7, 2, fld(1, 2, varint(10))) + fld(5, 2, a.tobytes()) + fld(5, 2, b.tobytes())
    params = converters.net_params(converters.parse_caffemodel(conv_net_bytes([blob])))
    np.testing.assert_array_equal(params["c"]["weight"], np.arange(10, dtype=np.float32))


def test_double_data_wins_over_data_as_in_caffe():
    """Caffe's Blob::FromProto reads double_data when it is present."""
    blob = blob_bytes([2], np.array([7, 7]), double=np.array([1.5, -2.5]))
    params = converters.net_params(converters.parse_caffemodel(conv_net_bytes([blob])))
    np.testing.assert_array_equal(params["c"]["weight"], [1.5, -2.5])


@pytest.mark.parametrize("dims, message", [
    ([2**40, 2**40], r"shape \(1099511627776, 1099511627776\) needs \d+ bytes, over the "
                     r"memory budget"),
    ([2**62, 2**62, 2**62], r"shape .* needs \d+ bytes, over the memory budget"),  # > int64
    ([0, 2**62, 2**62], r"zero dimension in shape \(0, "),
    ([3, 0], r"zero dimension"),
    ([-1, 4], r"negative dimension in shape \(-1, 4\)"),
    ([1] * 33, r"33 axes, more than Caffe's 32"),
])
def test_absurd_blob_shapes_are_refused_before_allocating(dims, message):
    raw = conv_net_bytes([blob_bytes(dims, np.zeros(4))])
    with pytest.raises(CaffeFormatError, match=r"layer 'c': blobs\[0\]: " + message) as e:
        converters.net_params(converters.parse_caffemodel(raw, "x.caffemodel"))
    one_line(e)


def test_legacy_dims_negative_or_zero():
    raw = conv_net_bytes([blob_bytes([1, 1, -3, 2], np.zeros(6), legacy=True)])
    with pytest.raises(CaffeFormatError, match="negative dimension"):
        converters.net_params(converters.parse_caffemodel(raw))
    raw = conv_net_bytes([blob_bytes([0, 1, 3, 2], np.zeros(6), legacy=True)])
    with pytest.raises(CaffeFormatError, match="zero dimension"):
        converters.net_params(converters.parse_caffemodel(raw))


def test_legacy_bias_with_an_unsqueezable_shape_is_a_shape_error(tmp_path):
    """A V1 bias of legacy dims (2, 1, 1, 3) used to reach numpy's reshape."""
    net = converters.read_prototxt(LAYERS / "conv_rect.prototxt")
    params = converters.load_caffemodel(LAYERS / "conv_rect.caffemodel")
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString(converters.build_caffemodel(params, net))
    bias = msg.layer[1].blobs[1]
    bias.ClearField("shape")
    bias.num, bias.channels, bias.height, bias.width = 5, 1, 1, 1
    f = write(tmp_path, "b.caffemodel", msg.SerializeToString())
    with pytest.raises(CaffeFormatError, match=r"b\.caffemodel: layer 'c': bias: shape "
                                               r"\(5, 1, 1, 1\) does not match"):
        converters.load_caffe(LAYERS / "conv_rect.prototxt", f)


def test_wire_scanner_refuses_zero_dims_with_absurd_others(tmp_path):
    """Found by experiments/fuzz_long.py: zero dims beside a 65-bit varint dim."""
    from converters.wire import BlobRef, blob_array, scan_caffemodel

    dims = varint(0) * 3 + bytes([0xFF] * 9 + [0x03])  # 0, 0, 0 and a 65-bit varint
    raw = conv_net_bytes([fld(7, 2, fld(1, 2, dims)) + fld(5, 2, b"")])
    assert scan_caffemodel(raw) is None  # over-long varint: left to the full parser
    with pytest.raises(CaffeFormatError, match="zero dimension"):
        blob_array(raw, BlobRef((0, 0, 0, 1 << 40), False, 0, 0, "<f4"))
    with pytest.raises(CaffeFormatError):  # the protobuf path refuses it
        converters.net_params(converters.parse_caffemodel(raw))
    f = tmp_path / "z.caffemodel"
    f.write_bytes(raw)
    with pytest.raises(CaffeFormatError, match=r"z\.caffemodel"):
        converters.load_caffemodel(f)


# ----------------------------------------------------------------------------- memory budget


def test_memory_budget_refuses_a_claimed_shape_before_the_data_is_checked():
    raw = conv_net_bytes([blob_bytes([1000, 1000], np.zeros(3))])
    with pytest.raises(CaffeFormatError, match=r"needs 4000000 bytes, over the memory budget "
                                               r"of 1000000"):
        converters.net_params(converters.parse_caffemodel(raw), memory_budget=10**6)


def test_memory_budget_counts_all_blobs_together():
    raw = conv_net_bytes([blob_bytes([100], np.zeros(100)), blob_bytes([100], np.zeros(100))])
    converters.net_params(converters.parse_caffemodel(raw), memory_budget=800)
    with pytest.raises(CaffeFormatError, match=r"blobs\[1\]: shape \(100,\) needs 400 bytes, "
                                               r"over the memory budget of 399"):
        converters.net_params(converters.parse_caffemodel(raw), memory_budget=799)


def test_memory_budget_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_JAX_MEMORY_BUDGET", "1K")
    assert converters.resolve_memory_budget() == 1024
    with pytest.raises(CaffeFormatError, match=r"conv_rect\.caffemodel: file of 1037 bytes "
                                               r"exceeds the memory budget of 1024 bytes"):
        converters.load_caffemodel(LAYERS / "conv_rect.caffemodel")
    monkeypatch.setenv("FCN_JAX_MEMORY_BUDGET", "lots")
    with pytest.raises(CaffeFormatError, match="FCN_JAX_MEMORY_BUDGET='lots' is not a size"):
        converters.resolve_memory_budget()


def test_input_shape_over_the_budget_is_refused(tmp_path):
    f = write(tmp_path, "big.prototxt", 'layer { name: "data" type: "Input" top: "data" '
              'input_param { shape { dim: 64 dim: 3 dim: 100000 dim: 100000 } } }')
    with pytest.raises(CaffeFormatError, match=r"big\.prototxt: layer 'data': "
                                               r"input_param\.shape\[0\]: shape \(64, 3, 100000,"
                                               r" 100000\) needs \d+ bytes, over the memory"):
        converters.read_prototxt(f)


def test_filler_params_over_the_budget_are_refused_before_allocating(tmp_path):
    f = write(tmp_path, "wide.prototxt",
              'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
              'dim: 3 dim: 100 dim: 100 } } }\n'
              'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
              'inner_product_param { num_output: 4000000000 } }')
    with pytest.raises(CaffeFormatError, match=r"wide\.prototxt: layer 'fc': weight: the net's "
                                               r"parameters need \d+ bytes"):
        converters.load_caffe(f)


# ----------------------------------------------------------------------------- size limits


@pytest.fixture
def sparse_3gb(tmp_path):
    f = tmp_path / "huge.caffemodel"
    with open(f, "wb") as fh:
        fh.truncate(3 * 2**30)  # sparse: no disk space, no writing
    return f


def test_files_over_protobufs_2gb_limit_are_refused_unread(sparse_3gb, monkeypatch):
    def no_reading(*a, **k):
        raise AssertionError("the file was read")

    monkeypatch.setattr(converters.files, "read_exactly", no_reading)
    budget = 16 * 2**30
    for reader in (converters.read_caffemodel, converters.load_caffemodel,
                   converters.read_prototxt):
        with pytest.raises(CaffeFormatError, match=r"huge\.caffemodel: file of 3221225472 "
                                                   r"bytes exceeds protobuf's 2 GiB limit"):
            reader(sparse_3gb, memory_budget=budget)
    with pytest.raises(CaffeFormatError, match="2 GiB limit"):
        converters.read_net(sparse_3gb, memory_budget=budget)
    assert PROTOBUF_LIMIT == 2**31 - 1


def test_checkpoint_over_the_limit_is_refused_unread(sparse_3gb):
    with pytest.raises(CaffeFormatError, match=r"file of 3221225472 bytes exceeds the limit "
                                               r"of 1000000"):
        load_checkpoint(sparse_3gb, max_bytes=10**6)


# ----------------------------------------------------------------------------- net structure


def _net(tmp_path, body: str, name: str = "n.prototxt") -> Path:
    head = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n')
    return write(tmp_path, name, head + body)


def test_cycle_in_prototxt(tmp_path):
    f = _net(tmp_path, 'layer { name: "a" type: "ReLU" bottom: "b" top: "a" }\n'
                       'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }')
    with pytest.raises(CaffeFormatError, match=r"n\.prototxt: layer 'a': bottom: cycle"):
        converters.load_caffe(f)


def test_undefined_bottom_in_prototxt(tmp_path):
    f = _net(tmp_path, 'layer { name: "a" type: "ReLU" bottom: "nope" top: "a" }')
    with pytest.raises(CaffeFormatError, match=r"layer 'a': bottom: bottom blob 'nope' is "
                                               r"produced by no layer"):
        converters.load_caffe(f)


def test_duplicate_layer_names_in_prototxt(tmp_path):
    f = _net(tmp_path, 'layer { name: "a" type: "ReLU" bottom: "data" top: "a" }\n'
                       'layer { name: "a" type: "ReLU" bottom: "a" top: "b" }')
    with pytest.raises(CaffeFormatError, match=r"n\.prototxt: layer 'a': name: duplicate "
                                               r"layer name"):
        converters.load_caffe(f)


def test_duplicate_layer_names_in_caffemodel():
    blob = blob_bytes([1], np.zeros(1))
    raw = conv_net_bytes([blob], "a") + conv_net_bytes([blob], "a")
    with pytest.raises(CaffeFormatError, match=r"layer 'a': name: duplicate layer name"):
        converters.net_params(converters.parse_caffemodel(raw))


def test_unnamed_layer_with_weights_in_caffemodel():
    raw = conv_net_bytes([blob_bytes([1], np.zeros(1))], "")
    with pytest.raises(CaffeFormatError, match=r"layer 'layer\[0\]': name: a layer with "
                                               r"weights has no name"):
        converters.net_params(converters.parse_caffemodel(raw))


@pytest.mark.parametrize("dims", ["dim: 1 dim: 0 dim: 4 dim: 4", "dim: 1 dim: -3 dim: 4"])
def test_zero_or_negative_input_dims_in_prototxt(tmp_path, dims):
    f = write(tmp_path, "d.prototxt", 'layer { name: "data" type: "Input" top: "data" '
              f'input_param {{ shape {{ {dims} }} }} }}')
    with pytest.raises(CaffeFormatError, match=r"layer 'data': input_param\.shape\[0\]: "
                                               r"dimensions must be positive"):
        converters.read_prototxt(f)


def test_zero_v1_input_dim(tmp_path):
    f = write(tmp_path, "v1.prototxt", 'input: "data" input_dim: 1 input_dim: 3 input_dim: 0 '
              'input_dim: 5\nlayers { name: "r" type: RELU bottom: "data" top: "r" }')
    with pytest.raises(CaffeFormatError, match="dimensions must be positive"):
        converters.read_prototxt(f)


def test_a_net_that_cannot_be_built_is_a_format_error(tmp_path):
    f = _net(tmp_path, 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
                       'reshape_param { shape { dim: 7 dim: 7 } } }')
    with pytest.raises(CaffeFormatError, match=r"n\.prototxt: ") as e:
        converters.load_caffe(f)
    one_line(e)


def test_load_caffe_still_reports_caller_mistakes_as_type_errors():
    with pytest.raises(TypeError):
        converters.load_caffe(LAYERS / "conv_rect.prototxt", no_such_option=1)


# ----------------------------------------------------------------------------- text


def test_deeply_nested_unknown_param_is_a_syntax_error(tmp_path):
    text = 'layer { name: "a" type: "ROIPooling" roi_pooling_param ' + "{ x " * 5000 + "}" * 5001
    f = write(tmp_path, "deep.prototxt", text)
    with pytest.raises(CaffeFormatError, match=r"deep\.prototxt: syntax: syntax error: braces "
                                               r"nested too deeply"):
        converters.read_prototxt(f)


def test_binary_file_given_as_prototxt(tmp_path):
    f = write(tmp_path, "m.prototxt", (MINI / "caffenet_mini.caffemodel").read_bytes()[:4000])
    with pytest.raises(CaffeFormatError, match=r"m\.prototxt: (not a text prototxt|.*syntax)"):
        converters.read_prototxt(f)


def test_empty_files(tmp_path):
    f = write(tmp_path, "e.prototxt", "")
    with pytest.raises(CaffeFormatError, match=r"e\.prototxt: layer: no layers: an empty or "
                                               r"truncated net definition"):
        converters.read_prototxt(f)
    f = write(tmp_path, "e.caffemodel", b"")
    with pytest.raises(CaffeFormatError, match=r"e\.caffemodel: no layers"):
        converters.load_caffemodel(f)
    f = write(tmp_path, "e.ckpt", b"")
    with pytest.raises(CaffeFormatError, match=r"e\.ckpt: not a valid checkpoint"):
        load_checkpoint(f)


def test_missing_file_is_a_format_error(tmp_path):
    for reader in (converters.read_prototxt, converters.load_caffemodel, converters.read_net,
                   load_checkpoint):
        with pytest.raises(CaffeFormatError, match=r"nope: cannot read: No such file"):
            reader(tmp_path / "nope")


def test_long_lines_and_terminal_escapes_are_tamed(tmp_path):
    f = write(tmp_path, "long.prototxt", 'name: "x" ' * 50000 + " @")
    with pytest.raises(CaffeFormatError) as e:
        converters.read_prototxt(f)
    assert len(one_line(e)) <= 600
    raw = conv_net_bytes([blob_bytes([2], np.zeros(3))], name="\x1b[2J\x1b[31mevil")
    with pytest.raises(CaffeFormatError) as e:
        converters.net_params(converters.parse_caffemodel(raw))
    assert "\x1b" not in str(e.value) and "\\x1b[2J" in str(e.value)


# ----------------------------------------------------------------------------- mean files


def _binaryproto(arr: np.ndarray) -> bytes:
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.ravel().astype(np.float32))
    return blob.SerializeToString()


def test_binaryproto_mean_every_truncation(tmp_path):
    from fcn_jax.preprocess import load_mean

    arr = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    raw = _binaryproto(arr)
    f = tmp_path / "m.binaryproto"
    for k in range(len(raw)):
        f.write_bytes(raw[:k])
        with pytest.raises(ValueError, match=re.escape(str(f))):
            load_mean(f)
    f.write_bytes(raw)
    np.testing.assert_array_equal(load_mean(f), arr[0])


def test_binaryproto_mean_with_a_huge_claimed_shape(tmp_path):
    from fcn_jax.preprocess import load_mean

    blob = fld(7, 2, fld(1, 2, varint(2**20) + varint(2**20))) + fld(5, 2, b"\0" * 8)
    f = write(tmp_path, "m.binaryproto", blob)
    with pytest.raises(ValueError, match=r"shape.dim: shape \(1048576, 1048576\) needs "
                                         r"4398046511104 bytes, over the memory budget"):
        load_mean(f)


def _npy_with_header(shape, descr="<f8") -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    header = header.ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64


def test_npy_mean_with_a_huge_claimed_shape(tmp_path):
    from fcn_jax.preprocess import load_mean

    f = write(tmp_path, "m.npy", _npy_with_header((10**5, 10**5, 1000)))
    with pytest.raises(ValueError):
        load_mean(f)


def test_npy_mean_with_a_corrupt_header(tmp_path):
    from fcn_jax.preprocess import load_mean

    raw = bytearray(_npy_with_header((3,)))
    raw[11] = ord("(")  # opens a bracket that is never closed
    f = write(tmp_path, "m.npy", bytes(raw))
    with pytest.raises(ValueError):
        load_mean(f)


# ----------------------------------------------------------------------------- npy / npz


def test_npy_reader_refuses_claims_it_cannot_back(tmp_path):
    f = write(tmp_path, "huge.npy", _npy_with_header((10**5, 10**5, 1000)))
    with pytest.raises(CaffeFormatError, match=r"huge\.npy: shape \(100000, 100000, 1000\) "
                                               r"needs 80000000000000 bytes, over the memory"):
        load_npy(f)
    f = write(tmp_path, "short.npy", _npy_with_header((100,)))
    with pytest.raises(CaffeFormatError, match=r"truncated: shape \(100,\) needs 800 bytes of "
                                               r"data, the file holds 64"):
        load_npy(f)
    raw = bytearray(_npy_with_header((3,)))
    raw[11] = ord("(")
    f = write(tmp_path, "bad.npy", bytes(raw))
    with pytest.raises(CaffeFormatError, match=r"bad\.npy: not a valid \.npy header"):
        load_npy(f)


def test_npy_reader_refuses_pickled_objects(tmp_path):
    f = tmp_path / "obj.npy"
    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CaffeFormatError, match=r"obj\.npy: dtype object is not a plain "
                                               r"numeric type"):
        load_npy(f)


def test_npz_member_larger_than_the_budget(tmp_path):
    f = tmp_path / "z.npz"
    np.savez_compressed(f, x=np.zeros((1000, 1000), np.float32))  # 4 MB, compresses to ~4 KB
    assert f.stat().st_size < 50_000
    with pytest.raises(CaffeFormatError, match=r"z\.npz: x: member of 4000128 bytes exceeds "
                                               r"the memory budget of 1000000"):
        load_npz(f, memory_budget=10**6)
    np.testing.assert_array_equal(load_npz(f)["x"], np.zeros((1000, 1000), np.float32))
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CaffeFormatError, match=r"z\.npz: not a valid \.npz archive"):
        load_npz(f)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def small_checkpoint(tmp_path):
    f = tmp_path / "c.ckpt"
    tree = {"conv": {"weight": np.arange(12, dtype=np.float32).reshape(3, 4),
                     "bias": np.array([1, 2, 3], np.float32)}, "step": 7}
    f.write_bytes(legacy_weights_bytes(tree, {"prototxt": "name: 'x'"}))
    return f


def test_checkpoint_every_truncation_and_every_bit_flip(small_checkpoint):
    raw = small_checkpoint.read_bytes()
    tree, meta = parse_checkpoint(raw)
    np.testing.assert_array_equal(tree["conv"]["weight"], np.arange(12).reshape(3, 4))
    for k in range(len(raw)):
        with pytest.raises(CaffeFormatError):
            parse_checkpoint(raw[:k], "c.ckpt")
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << bit % 8
        with pytest.raises(CaffeFormatError) as e:
            parse_checkpoint(bytes(flipped), "c.ckpt")
        one_line(e)


def _legacy(obj_bytes: bytes) -> bytes:
    """An fcn-jax/2 file, with a valid checksum, around a raw (hostile) tree value."""
    import hashlib

    import msgpack

    head = msgpack.packb({"format": "fcn-jax/2", "meta": {}})
    # splice "tree": <obj> into the map: fixmap of 2 -> fixmap of 3
    payload = bytes([head[0] + 1]) + head[1:] + msgpack.packb("tree") + obj_bytes
    return b"FCNJAX\x00\x02" + hashlib.sha256(payload).digest() + payload


def _ext_array(shape, dtype: str, data: bytes, code: int = 1) -> bytes:
    import msgpack

    return msgpack.packb(msgpack.ExtType(code, msgpack.packb((shape, dtype, data),
                                                             use_bin_type=True)))


@pytest.mark.parametrize("obj, message", [
    (_ext_array([2], "object", b"\0" * 16), r"array dtype object is not numeric"),
    (_ext_array([2], "float32", b"\0" * 4), r"array of shape \(2,\) and dtype float32 needs 8 "
                                            r"bytes"),
    (_ext_array([2**40, 2**40], "float32", b""), r"array of shape .* needs \d+ bytes"),
    (_ext_array([-1], "float32", b""), r"bad array shape"),
    (_ext_array([1], "float32", b"\0" * 4, code=42), r"unknown msgpack extension type 42"),
    (b"\xdf\x7f\xff\xff\xff", r"not a valid checkpoint"),          # map32 of 2**31 entries
    (b"\x91" * 3000 + b"\xc0", r"not a valid checkpoint"),         # 3000 nested lists
])
def test_hostile_legacy_checkpoints(tmp_path, obj, message):
    f = write(tmp_path, "h.ckpt", _legacy(obj))
    with pytest.raises(CaffeFormatError, match=r"h\.ckpt: " + message) as e:
        load_checkpoint(f)
    one_line(e)


# ----------------------------------------------------------------------------- no pickle


def test_no_pickle_anywhere_in_the_package():
    """No module imports pickle, and every np.load passes allow_pickle=False."""
    offenders = []
    for py in list((ROOT / "fcn_jax").rglob("*.py")) + list((ROOT / "converters").rglob("*.py")):
        text = py.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            offenders.append(f"{py.name}: imports pickle")
        if "allow_pickle=True" in text:
            offenders.append(f"{py.name}: allow_pickle=True")
        for call in re.finditer(r"np\.load\(([^()]*(\([^()]*\))?)*\)", text):
            if "allow_pickle=False" not in call.group(0):
                offenders.append(f"{py.name}: {call.group(0)}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_one_line_and_exits_2_on_hostile_files(tmp_path, capsys):
    from fcn_jax.cli import main

    cases = [
        ["info", str(write(tmp_path, "a.caffemodel", conv_net_bytes(
            [blob_bytes([2**40, 2**40], np.zeros(1))])))],
        ["info", str(write(tmp_path, "b.prototxt", "layer { name: 'a' type: 'ReLU'"))],
        ["run", str(LAYERS / "conv_rect.prototxt"), str(LAYERS / "conv_rect.caffemodel"),
         "--input", str(write(tmp_path, "x.npy", _npy_with_header((10**6, 10**6)))),
         "--blobs", str(tmp_path / "out.npz")],
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fcn-jax: error: ") and "\n" not in err, err
    assert not (tmp_path / "out.npz").exists()


def test_info_check_reports_nan_inf_and_absurd_weights(tmp_path, capsys):
    from fcn_jax.cli import main

    params = {layer: {k: v.copy() for k, v in blobs.items()} for layer, blobs in
              converters.load_caffemodel(LAYERS / "conv_rect.caffemodel").items()}
    params["c"]["weight"][0, 0, 1, 2] = np.nan
    params["c"]["weight"][1, 0, 0, 0] = np.inf
    params["c"]["bias"][3] = 3e7
    f = tmp_path / "bad.caffemodel"
    converters.save_caffemodel(f, params, converters.read_prototxt(LAYERS / "conv_rect.prototxt"))
    assert main(["info", str(LAYERS / "conv_rect.prototxt"), "--weights", str(f),
                 "--check"]) == 1
    out = capsys.readouterr().out
    assert "check: c/weight: 2 non-finite values (1 NaN, 1 Inf), first at (0, 0, 1, 2)" in out
    assert "check: c/bias: max |w| = 3e+07 > 10000" in out
    assert "check: FAILED (2 problems)" in out
    assert main(["info", str(LAYERS / "conv_rect.prototxt"), "--weights",
                 str(LAYERS / "conv_rect.caffemodel"), "--check"]) == 0
    assert "check: ok (0 problems)" in capsys.readouterr().out


def test_run_flags_non_finite_outputs(tmp_path, capsys):
    from fcn_jax.cli import main

    x = np.zeros((1, 3, 17, 12), np.float32)
    x[0, 0, 5, 5] = np.inf
    np.save(tmp_path / "x.npy", x)
    rc = main(["run", str(LAYERS / "conv_rect.prototxt"), str(LAYERS / "conv_rect.caffemodel"),
               "--input", str(tmp_path / "x.npy"), "--blobs", str(tmp_path / "b.npz")])
    assert rc == 1
    assert "warning: non-finite values (NaN/Inf) in blobs ['c', 'data']" in capsys.readouterr().err
    with np.load(tmp_path / "b.npz", allow_pickle=False) as z:
        assert not np.all(np.isfinite(z["c"])) and math.isinf(float(z["data"].max()))



# ----------------------------------------------------------------------------- round 2 (#15)


def _capped(code: str, cap_mb: int, *args: str, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose address space is capped at ``cap_mb``."""
    prelude = ("import resource, sys\n"
               f"resource.setrlimit(resource.RLIMIT_AS, ({cap_mb} << 20, {cap_mb} << 20))\n")
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=full_env, timeout=120)


def test_small_files_read_under_a_small_address_space_cap(tmp_path):
    """With the default 8 GiB budget, a 112-byte caffemodel, its prototxt, an npy, an npz
    and a binaryproto mean read in a 400 MB address space (each reader used to reserve the
    whole budget, f.read(limit + 1): MemoryError under any cap below 2 GiB)."""
    np.save(tmp_path / "x.npy", np.ones((1, 3, 17, 12), np.float32))
    np.savez(tmp_path / "x.npz", data=np.ones(3, np.float32))
    write(tmp_path, "m.binaryproto", _binaryproto(np.ones((1, 3, 2, 2), np.float32)))
    r = _capped("""
        import converters
        from converters.mean import load_mean
        from converters.npy import load_npy, load_npz
        d = sys.argv[1]
        converters.read_prototxt(d + "/layers/conv_rect.prototxt")
        converters.load_caffemodel(d + "/layers/conv_rect.caffemodel")
        converters.read_caffemodel(d + "/layers/conv_rect.caffemodel")
        load_npy(sys.argv[2] + "/x.npy"); load_npz(sys.argv[2] + "/x.npz")
        print(load_mean(sys.argv[2] + "/m.binaryproto").shape)
    """, 400, str(DATA), str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(3, 2, 2)" in r.stdout
    assert (LAYERS / "conv_rect.caffemodel").stat().st_size < 4096


def test_a_binaryproto_of_unpacked_floats_stays_within_its_budget(tmp_path):
    """25 MB of unpacked floats (one tag per value) under FCN_JAX_MEMORY_BUDGET=100M: the
    reader used to make one array per float (1.98 GB); now protobuf's packed storage and
    one float64 result, peak RSS far below 400 MB, in seconds."""
    n = 5_000_000
    head = fld(1, 0, 1) + fld(2, 0, 1) + fld(3, 0, 1) + fld(4, 0, n)
    f = tmp_path / "m.binaryproto"
    f.write_bytes(head + (b"\x2d" + struct.pack("<f", 1.5)) * n)
    assert f.stat().st_size > 25_000_000
    r = _capped("""
        import resource, time
        from converters.mean import load_mean
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        m = load_mean(sys.argv[1])
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(m.shape, float(m.min()), float(m.max()), round(grew),
              round(time.perf_counter() - t, 1))
        assert grew < 400, grew
    """, 2000, str(f), env={"FCN_JAX_MEMORY_BUDGET": "100M"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"(1, 1, {n}) 1.5 1.5 ")


def test_a_3gb_sparse_binaryproto_is_refused_by_its_size(sparse_3gb, monkeypatch):
    from converters.mean import load_mean

    def no_reading(*a, **k):
        raise AssertionError("the file was read")

    monkeypatch.setattr(converters.files, "read_exactly", no_reading)
    with pytest.raises(CaffeFormatError, match=r"huge\.caffemodel: file of 3221225472 bytes "
                                               r"exceeds protobuf's 2 GiB limit"):
        load_mean(sparse_3gb, memory_budget=16 * 2**30)


def test_fifos_never_block_a_reader(tmp_path):
    """A FIFO given as prototxt, caffemodel, npy, npz or mean is refused at once."""
    import threading

    from converters.mean import load_mean

    fifo = tmp_path / "f.caffemodel"
    os.mkfifo(fifo)
    readers = [converters.read_prototxt, converters.load_caffemodel, converters.read_net,
               load_npy, load_npz, load_mean]
    errors: list[str] = []

    def attempt() -> None:
        for reader in readers:
            try:
                reader(fifo)
            except CaffeFormatError as e:
                errors.append(one_line(e))

    th = threading.Thread(target=attempt, daemon=True)
    th.start()
    th.join(20)
    if th.is_alive():
        with open(fifo, "wb"):
            pass
        pytest.fail(f"a reader blocked on a FIFO after {len(errors)} refusals")
    assert len(errors) == len(readers)
    assert all("not a regular file (a FIFO)" in e for e in errors), errors


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_complex_and_bool_weights_inputs_and_means_are_refused(tmp_path, dtype, capsys):
    from converters.mean import load_mean
    from fcn_jax.cli import main

    params = converters.load_caffemodel(LAYERS / "conv_rect.caffemodel")
    params = {k: dict(v) for k, v in params.items()}
    params["c"]["weight"] = params["c"]["weight"].astype(dtype)
    with pytest.raises(CaffeFormatError, match=rf"layer 'c': weight: dtype {dtype} is not a "
                                               "real number type"):
        converters.load_caffe(LAYERS / "conv_rect.prototxt", params)
    np.save(tmp_path / "m.npy", np.ones(3, dtype))
    with pytest.raises(CaffeFormatError, match=rf"m\.npy: a mean must hold real numbers, got "
                                               rf"dtype {dtype}"):
        load_mean(tmp_path / "m.npy")
    np.save(tmp_path / "x.npy", np.ones((1, 3, 17, 12), dtype))
    assert main(["run", str(LAYERS / "conv_rect.prototxt"), str(LAYERS / "conv_rect.caffemodel"),
                 "--input", str(tmp_path / "x.npy"), "--blobs", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert err == (f"fcn-jax: error: {tmp_path / 'x.npy'}: dtype {dtype} is not a real number "
                   "type (Caffe's blobs are float)\n")


def test_run_input_of_an_empty_shape_numpy_cannot_make(tmp_path, capsys):
    from fcn_jax.cli import main

    for shape, why in [((0, 3, 2**31, 2**31), "is too large for any array"),
                       ((0, 3, 17, 12), "empty input of shape (0, 3, 17, 12)")]:
        f = write(tmp_path, "x.npy", _npy_with_header(shape, "<f4"))
        assert main(["run", str(LAYERS / "conv_rect.prototxt"),
                     str(LAYERS / "conv_rect.caffemodel"), "--input", str(f), "--blobs",
                     str(tmp_path / "b.npz")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fcn-jax: error: {f}: ") and why in err and err.count("\n") == 1


def test_a_caffemodel_mixing_v1_and_v2_layers_is_named(tmp_path, capsys):
    from fcn_jax.cli import main

    v2 = (LAYERS / "conv_rect.caffemodel").read_bytes()
    v1_layer = fld(4, 2, b"c1") + fld(5, 0, 4)  # V1LayerParameter name, type CONVOLUTION
    f = write(tmp_path, "mixed.caffemodel", v2 + fld(2, 2, v1_layer))
    for reader in (converters.load_caffemodel, converters.read_caffemodel):
        with pytest.raises(CaffeFormatError, match=r"mixed\.caffemodel: layers: net mixes V1 "
                                                   r"'layers' and V2 'layer' fields"):
            reader(f)
    np.save(tmp_path / "x.npy", np.ones((1, 3, 17, 12), np.float32))
    assert main(["run", str(LAYERS / "conv_rect.prototxt"), str(f), "--input",
                 str(tmp_path / "x.npy"), "--blobs", str(tmp_path / "b.npz")]) == 2
    assert capsys.readouterr().err == (f"fcn-jax: error: {f}: layers: net mixes V1 'layers' "
                                       "and V2 'layer' fields\n")


_NAMED = """name: "n"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "r1" type: "ReLU" bottom: "data" top: "a\\000b" }
layer { name: "r2" type: "ReLU" bottom: "data" top: "a\\000c" }
layer { name: "r3" type: "ReLU" bottom: "data" top: "../evil" }
layer { name: "r4" type: "ReLU" bottom: "data" top: "100%" }
layer { name: "r5" type: "ReLU" bottom: "data" top: "red\\033[31mtext" }
layer { name: "r6" type: "ReLU" bottom: "data" top: "inception_3a/1x1" }
"""  # noqa: E501


def test_run_blobs_encodes_names_reversibly(tmp_path, capsys):
    """NUL no longer merges two blobs (zip cut names at NUL: 'wrote 3' but 2 held), ``../``
    is no traversal-looking member, terminal escapes are printed harmless, and load_blobs
    gives every name back."""
    import zipfile

    from converters.npy import decode_member_name
    from fcn_jax.cli import main
    from fcn_jax.io_utils import load_blobs

    proto = write(tmp_path, "n.prototxt", _NAMED)
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 18, dtype=np.float32).reshape(1, 2, 3, 3))
    out = tmp_path / "new" / "folder" / "b.npz"  # created, like fcn's
    assert main(["run", str(proto), "none", "--input", str(tmp_path / "x.npy"), "--blobs",
                 str(out)]) == 2  # no such caffemodel: one line
    capsys.readouterr()
    assert not (tmp_path / "new").exists()  # folders are made only when writing
    empty = tmp_path / "empty.caffemodel"
    converters.save_caffemodel(empty, {}, converters.read_prototxt(proto))
    assert main(["run", str(proto), str(empty), "--input", str(tmp_path / "x.npy"), "--blobs",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    names = ["data", "a\0b", "a\0c", "../evil", "100%", "red\x1b[31mtext", "inception_3a/1x1"]
    with zipfile.ZipFile(out) as z:
        members = z.namelist()
    assert f"wrote {len(names)} blobs to {out}" in printed and len(members) == len(names)
    assert not any(m.startswith(("/", "..")) and "/" in m for m in members)
    assert "inception_3a/1x1.npy" in members and "..%2Fevil.npy" in members
    assert sorted(decode_member_name(m[:-4]) for m in members) == sorted(names)
    blobs = load_blobs(out)
    assert sorted(blobs) == sorted(names)
    np.testing.assert_array_equal(blobs["a\0c"], np.maximum(blobs["data"], 0))
    assert "\x1b" not in printed and "\x00" not in printed and "red\\x1b[31mtext" in printed


def test_run_blob_names_too_long_for_zip_are_one_line(tmp_path, capsys):
    from fcn_jax.cli import main

    text = _NAMED.split("\n")[1] + "\n" + (
        'layer { name: "r" type: "ReLU" bottom: "data" top: "' + "x" * 70000 + '" }\n')
    proto = write(tmp_path, "long.prototxt", 'name: "n"\n' + text)
    empty = tmp_path / "e.caffemodel"
    converters.save_caffemodel(empty, {}, converters.read_prototxt(proto))
    np.save(tmp_path / "x.npy", np.ones((1, 2, 3, 3), np.float32))
    assert main(["run", str(proto), str(empty), "--input", str(tmp_path / "x.npy"),
                 "--blobs", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 600 and "struct" not in err
    assert "blob name of 70000 bytes is too long for an npz member" in err
    assert not (tmp_path / "b.npz").exists()


def test_info_prints_names_sanitised(tmp_path, capsys):
    from fcn_jax.cli import main

    proto = write(tmp_path, "n.prototxt", _NAMED.replace('name: "r5"', 'name: "\\033]0;x\\007"'))
    assert main(["info", str(proto)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x00" not in out
    assert "red\\x1b[31mtext" in out and "a\\x00b" in out


def test_outputs_equal_to_an_input_are_refused(tmp_path, capsys):
    from fcn_jax.cli import main

    proto = tmp_path / "deploy.prototxt"
    model = tmp_path / "m.caffemodel"
    proto.write_bytes((LAYERS / "conv_rect.prototxt").read_bytes())
    model.write_bytes((LAYERS / "conv_rect.caffemodel").read_bytes())
    np.save(tmp_path / "x.npy", np.ones((1, 3, 17, 12), np.float32))
    before = {p: p.read_bytes() for p in (proto, model, tmp_path / "x.npy")}
    for argv in (["convert", str(proto), str(model), "-o", str(model)],
                 ["convert", str(proto), str(model), "-o", f"{tmp_path}/./deploy.prototxt"],
                 ["run", str(proto), str(model), "--input", str(tmp_path / "x.npy"), "--blobs",
                  str(tmp_path / "x.npy")],
                 ["fcn", str(proto), str(model), "-o", str(tmp_path / "deploy")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "the output would replace the input" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in before} == before


def test_run_and_convert_create_missing_folders_like_fcn(tmp_path, capsys):
    from fcn_jax.cli import main

    np.save(tmp_path / "x.npy", np.ones((1, 3, 17, 12), np.float32))
    proto, model = str(LAYERS / "conv_rect.prototxt"), str(LAYERS / "conv_rect.caffemodel")
    assert main(["run", proto, model, "--input", str(tmp_path / "x.npy"), "--blobs",
                 str(tmp_path / "a" / "b" / "out.npz")]) == 0
    assert main(["convert", proto, model, "-o", str(tmp_path / "c" / "d" / "m.msgpack")]) == 0
    assert (tmp_path / "a" / "b" / "out.npz").is_file()
    assert (tmp_path / "c" / "d" / "m.msgpack").is_file()


def test_write_errors_name_the_destination_never_a_temp_file(tmp_path):
    from converters.files import atomic_write

    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:  # the folder is a file: mkstemp fails
        atomic_write(tmp_path / "file" / "out.npz", lambda f: f.write(b"x"))
    msg = str(e.value)
    assert msg.endswith(f"'{tmp_path / 'file' / 'out.npz'}'") and ".tmp" not in msg

    def full_disk(f):
        raise OSError(28, "No space left on device")  # a write error names no file

    (tmp_path / "out.npz").write_bytes(b"old")
    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "out.npz", full_disk)
    assert str(e.value) == f"[Errno 28] No space left on device: '{tmp_path / 'out.npz'}'"
    assert (tmp_path / "out.npz").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out.npz"]


def test_fcn_writes_its_prototxt_and_caffemodel_as_a_pair(tmp_path, monkeypatch, capsys):
    """A failure while writing the second file, or on its rename, leaves both old files;
    no temp or backup file remains."""
    import converters.files as cio
    from fcn_jax.cli import main

    mini = DATA / "caffenet_mini"
    argv = ["fcn", str(mini / "caffenet_mini_deploy.prototxt"),
            str(mini / "caffenet_mini.caffemodel"), "-o", str(tmp_path / "out" / "fc")]
    out_p, out_m = tmp_path / "out" / "fc.prototxt", tmp_path / "out" / "fc.caffemodel"
    assert main(argv) == 0
    new = out_p.read_bytes(), out_m.read_bytes()
    out_p.write_bytes(b"old prototxt")
    out_m.write_bytes(b"old caffemodel")
    real_replace = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2 and str(dst).endswith(".caffemodel"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", second_rename_fails)
    assert main(argv) == 2
    assert f"Input/output error: '{out_m}'" in capsys.readouterr().err
    assert (out_p.read_bytes(), out_m.read_bytes()) == (b"old prototxt", b"old caffemodel")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fc.caffemodel",
                                                                   "fc.prototxt"]
    monkeypatch.setattr(cio.os, "replace", real_replace)
    real_write_temp = cio._write_temp

    def disk_full_on_the_caffemodel(path, write_fn):
        if path.endswith(".caffemodel"):
            raise OSError(28, "No space left on device", path)
        return real_write_temp(path, write_fn)

    monkeypatch.setattr(cio, "_write_temp", disk_full_on_the_caffemodel)
    assert main(argv) == 2
    assert (out_p.read_bytes(), out_m.read_bytes()) == (b"old prototxt", b"old caffemodel")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fc.caffemodel",
                                                                   "fc.prototxt"]
    monkeypatch.setattr(cio, "_write_temp", real_write_temp)
    assert main(argv) == 0
    assert (out_p.read_bytes(), out_m.read_bytes()) == new
