"""Property-based fuzzing of every reader over mutated real reference files (hypothesis).

The property: a reader either returns a well-formed result or raises its documented error
(``CaffeFormatError``; ``ValueError`` for ``fcn_jax.preprocess.load_mean``), with a one-line
message. Bounded to about a minute in all; ``experiments/fuzz_long.py`` runs far longer.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, legacy_weights_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converters
from converters import CaffeFormatError
from converters.legacy_checkpoint import parse_legacy_checkpoint as parse_checkpoint
from converters.npy import load_npy, load_npz
from converters.proto import caffe_pb2


@pytest.fixture(autouse=True, scope="module")
def _small_memory_budget():
    """Mutated shapes must be refused well below what this 2-core, 24 GB machine (shared by
    the whole suite) can allocate: 8 GiB (the default budget) of blobs can still derive
    larger intermediate arrays at trace time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FCN_JAX_MEMORY_BUDGET", "256M")
        yield

CAFFEMODELS = sorted((DATA / "layers").glob("*.caffemodel")) + sorted(
    (DATA / "zoo").glob("*.caffemodel"))
NETS = [p.with_suffix(".prototxt") for p in CAFFEMODELS]
MINI = [DATA / "caffenet_mini" / "caffenet_mini.caffemodel",
        DATA / "caffenet_mini" / "caffenet_mini_v1.caffemodel"]
PROTOTXTS = NETS + [DATA / "caffenet_mini" / "caffenet_mini_deploy_v1.prototxt",
                    DATA / "source" / "train_val.prototxt", DATA / "source" / "deploy.prototxt"]
_BYTES = {p: p.read_bytes() for p in CAFFEMODELS + MINI + PROTOTXTS}


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- mutations

_SPECIAL = st.sampled_from([0x00, 0x01, 0x07, 0x08, 0x0A, 0x12, 0x7F, 0x80, 0xFF])
_op = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("set"), st.floats(0, 1), st.one_of(_SPECIAL, st.integers(0, 255))),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 48)),
    st.tuples(st.just("splice"), st.floats(0, 1), st.floats(0, 1), st.integers(1, 48)),
)
mutations = st.lists(_op, min_size=1, max_size=4)


def mutate(raw: bytes, ops) -> bytes:
    """Apply byte-level mutations (positions are fractions of the current length)."""
    b = bytearray(raw)
    for op in ops:
        at = min(int(op[1] * len(b)), max(len(b) - 1, 0))
        if op[0] == "truncate":
            del b[at:]
        elif not b:
            continue
        elif op[0] == "flip":
            b[at] ^= 1 << op[2]
        elif op[0] == "set":
            b[at] = op[2]
        elif op[0] == "insert":
            b[at:at] = op[2]
        elif op[0] == "delete":
            del b[at:at + op[2]]
        else:  # splice: copy a chunk from elsewhere in the file over this spot
            src = int(op[2] * len(b))
            b[at:at + op[3]] = b[src:src + op[3]]
    return bytes(b)


_NUMBER = re.compile(rb"-?\d+(\.\d+)?(e-?\d+)?")
_EXTREME = [b"0", b"-1", b"-2147483649", b"4294967295", b"4294967296", b"99999999999999999999",
            b"1e40", b"nan", b"inf", b"3000000000", b"65536", b"1"]
_text_op = st.one_of(
    st.tuples(st.just("number"), st.floats(0, 1), st.sampled_from(_EXTREME)),
    st.tuples(st.just("line"), st.floats(0, 1), st.sampled_from(["delete", "duplicate"])),
    st.tuples(st.just("token"), st.floats(0, 1),
              st.sampled_from([b"{", b"}", b"layer {", b'"', b":", b"bottom: \"data\"",
                               b"top: \"x\"", b'name: "conv1"', b"\xff", b"#", b"\x00"])),
)


def mutate_text(raw: bytes, ops) -> bytes:
    """Prototxt-aware mutations: extreme numbers, dropped/duplicated lines, stray tokens."""
    for kind, where, what in ops:
        if kind == "number":
            nums = list(_NUMBER.finditer(raw))
            if nums:
                m = nums[int(where * len(nums)) % len(nums)]
                raw = raw[:m.start()] + what + raw[m.end():]
        elif kind == "line":
            lines = raw.split(b"\n")
            i = int(where * len(lines)) % len(lines)
            lines[i:i + 1] = [] if what == "delete" else [lines[i], lines[i]]
            raw = b"\n".join(lines)
        else:
            at = int(where * len(raw))
            raw = raw[:at] + what + raw[at:]
    return raw


def one_line(e: BaseException) -> None:
    assert "\n" not in str(e) and len(str(e)) <= 800, str(e)


# ----------------------------------------------------------------------------- caffemodels


def _check_params(params) -> None:
    for blobs in params.values():
        for arr in blobs.values():
            assert arr.dtype == np.float32 and arr.size == math.prod(arr.shape) > 0


@fuzz_settings(2000)
@given(st.sampled_from(CAFFEMODELS + MINI), mutations)
def test_fuzz_caffemodel_reader(path, ops):
    raw = mutate(_BYTES[path], ops)
    try:
        params = converters.net_params(converters.parse_caffemodel(raw, "f.caffemodel"),
                                       path="f.caffemodel")
    except CaffeFormatError as e:
        one_line(e)
        assert str(e).startswith("f.caffemodel: ")
        return
    _check_params(params)


@fuzz_settings(1500)
@given(st.sampled_from(CAFFEMODELS + MINI), mutations)
def test_fuzz_wire_scanner(path, ops):
    """The zero-copy scanner: ``None`` (use the full parser), a refusal, or arrays equal to
    what protobuf itself reads from the same bytes."""
    from converters.wire import blob_array, scan_caffemodel

    raw = mutate(_BYTES[path], ops)
    try:
        scanned = scan_caffemodel(raw)
    except CaffeFormatError as e:
        one_line(e)
        return
    if scanned is None:
        return
    _, refs = scanned
    for layer_refs in refs:
        for ref in layer_refs:
            try:
                arr = blob_array(raw, ref, memory_budget=2**30)
            except CaffeFormatError as e:
                one_line(e)
                continue
            assert arr.dtype == np.float32 and arr.size == math.prod(ref.dims)


@fuzz_settings(800)
@given(st.sampled_from(range(len(CAFFEMODELS))), st.booleans(), mutations, st.lists(
    _text_op, min_size=1, max_size=3))
def test_fuzz_load_caffe_end_to_end(index, mutate_model, ops, text_ops):
    """prototxt + caffemodel -> (module, params): a refusal, or params of the net's shapes."""
    proto, model = _BYTES[NETS[index]], _BYTES[CAFFEMODELS[index]]
    if mutate_model:
        model = mutate(model, ops)
    else:
        proto = mutate_text(proto, text_ops)
    with tempfile.TemporaryDirectory() as d:
        pp, mp = Path(d) / "n.prototxt", Path(d) / "m.caffemodel"
        pp.write_bytes(proto)
        mp.write_bytes(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module, params = converters.load_caffe(pp, mp)
        except CaffeFormatError as e:
            one_line(e)
            return
    for blobs in params.values():
        for arr in blobs.values():
            assert np.asarray(arr).dtype == np.float32


# ----------------------------------------------------------------------------- prototxt


@fuzz_settings(1500)
@given(st.sampled_from(PROTOTXTS), st.lists(_text_op, min_size=1, max_size=4), mutations,
       st.booleans())
def test_fuzz_prototxt_reader(path, text_ops, ops, bytewise):
    raw = mutate(_BYTES[path], ops) if bytewise else mutate_text(_BYTES[path], text_ops)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "n.prototxt"
        f.write_bytes(raw)
        try:
            net = converters.read_prototxt(f)
        except CaffeFormatError as e:
            one_line(e)
            return
    assert len(net.layer) > 0


# ----------------------------------------------------------------------------- checkpoints

_TREE = {"conv1": {"weight": np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 4, 5),
                   "bias": np.arange(3, dtype=np.float32)},
         "opt": {"mu": np.zeros(3, np.float64), "n": 7}, "steps": [1, 2.5, "x", None]}
_CKPT = legacy_weights_bytes(_TREE, {"prototxt": "name: 'net'", "lr": 0.01})


@fuzz_settings(800)
@given(mutations)
def test_fuzz_legacy_weights_reader(ops):
    """The old fcn-jax/2 weights files: the checksum makes every real change an error; a
    no-op mutation reads back equal."""
    raw = mutate(_CKPT, ops)
    try:
        tree, meta = parse_checkpoint(raw, "c.ckpt")
    except CaffeFormatError as e:
        one_line(e)
        return
    assert raw == _CKPT
    np.testing.assert_array_equal(tree["conv1"]["weight"], _TREE["conv1"]["weight"])


# ----------------------------------------------------------------------------- means, arrays


def _binaryproto() -> bytes:
    mean = np.load(DATA / "source" / "ilsvrc_2012_mean_bgr.npy", allow_pickle=False)
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2)
    blob.data.extend(np.repeat(mean.astype(np.float32), 4))
    return blob.SerializeToString()


_BINARYPROTO = _binaryproto()


def _unpacked_binaryproto() -> bytes:
    """The same mean with unpacked floats (one tag per value): the exact-schema path."""
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=1, width=2)
    head = blob.SerializeToString()
    return head + b"".join(b"\x2d" + np.float32(v).tobytes() for v in (1.0, 2, 3, 4, 5, 6))


_MEANS = [_BINARYPROTO, _unpacked_binaryproto()]


@fuzz_settings(1000)
@given(st.sampled_from(range(len(_MEANS))), mutations)
def test_fuzz_binaryproto_mean(which, ops):
    from converters.mean import load_mean

    raw = mutate(_MEANS[which], ops)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "mean.binaryproto"
        f.write_bytes(raw)
        try:
            mean = load_mean(f)
        except CaffeFormatError as e:  # the npy branch included: one error type
            one_line(e)
            return
    assert mean.dtype == np.float64 and mean.size > 0


def _npy_and_npz() -> tuple[bytes, bytes]:
    arr = np.load(DATA / "source" / "ilsvrc_2012_mean_bgr.npy", allow_pickle=False)
    a, z = io.BytesIO(), io.BytesIO()
    np.save(a, arr.reshape(3, 1, 1))
    np.savez_compressed(z, mean=arr, grid=np.arange(12, dtype=np.int16).reshape(3, 4))
    return a.getvalue(), z.getvalue()


_NPY, _NPZ = _npy_and_npz()


@fuzz_settings(800)
@given(st.booleans(), mutations)
def test_fuzz_npy_and_npz(is_npz, ops):
    raw = mutate(_NPZ if is_npz else _NPY, ops)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "a"
        f.write_bytes(raw)
        try:
            out = load_npz(f) if is_npz else {"a": load_npy(f)}
        except CaffeFormatError as e:
            one_line(e)
            return
    for arr in out.values():
        assert arr.dtype.kind in "biufc"


# ----------------------------------------------------------------------------- round 2


def _image_seeds() -> list[bytes]:
    """Small images of every kind the reader meets: multi-frame GIF/APNG/TIFF, palette,
    16-bit, RGBA, JPEG, and the header of a 3-frame 8000x8000 GIF bomb."""
    from PIL import Image
    from test_images import bomb_gif

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (6, 5, 3), np.uint8)) for _ in range(3)]
    out = [bomb_gif(), bomb_gif(40, 30, 3)]
    for fmt, kw in [("GIF", {}), ("PNG", {}), ("TIFF", {})]:
        b = io.BytesIO()
        frames[0].save(b, format=fmt, save_all=True, append_images=frames[1:], **kw)
        out.append(b.getvalue())
    for im, fmt in [(frames[0].convert("P"), "PNG"), (frames[0].convert("RGBA"), "PNG"),
                    (Image.fromarray(rng.integers(0, 65535, (6, 5), np.uint16)), "PNG"),
                    (frames[0], "JPEG"), (frames[0], "BMP")]:
        b = io.BytesIO()
        im.save(b, format=fmt)
        out.append(b.getvalue())
    return out


_IMAGES = _image_seeds()


@fuzz_settings(600)
@given(st.sampled_from(range(len(_IMAGES))), mutations)
def test_fuzz_image_reader(which, ops):
    """Mutated images (multi-frame ones included): a float32 H x W x 3 array of at most
    the pixel budget, or one ImageError line; never a decoder traceback."""
    from fcn_jax.images import ImageError, read_image

    raw = mutate(_IMAGES[which], ops)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.img"
        f.write_bytes(raw)
        try:
            img = read_image(f, max_pixels=2_000_000)
        except ImageError as e:
            one_line(e)
            assert "imageio" not in str(e)
            return
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] * img.shape[1] <= 2_000_000


_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 65535, 65536, 10**9, 2**24, 2**24 + 1, 1e308, -1e308, 5e-324,
                     0.5, True]),
    st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2))


@fuzz_settings(600)
@given(st.lists(st.lists(_VALUE, min_size=0, max_size=6), max_size=4),
       st.sampled_from([" ", "", "\n", "# c\n"]))
def test_fuzz_annotation_values(boxes, sep):
    """Annotation lines with extreme values: read back as finite boxes with x1 > x0,
    coordinates within MAX_COORD and integer labels in 1..MAX_LABEL, or one error line
    naming the file and the line."""
    import json

    from fcn_jax import data as D

    line = json.dumps({"image": "a.png", "boxes": boxes}, allow_nan=True)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "ann.jsonl"
        f.write_text(sep + line + "\n")
        try:
            records = D.read_annotations(f)
        except CaffeFormatError as e:
            one_line(e)
            assert str(e).startswith(f"{f}: line ")
            return
    (_, arr), = records
    assert arr.shape == (len(boxes), 5) and np.all(np.isfinite(arr))
    assert np.all(np.abs(arr[:, :4]) <= D.MAX_COORD)
    assert np.all(arr[:, 2] > arr[:, 0]) and np.all(arr[:, 3] > arr[:, 1])
    labels = arr[:, 4]
    assert np.all(labels == np.round(labels)) and np.all((labels >= 1) & (labels <= D.MAX_LABEL))


_SPECIAL_NAMES = st.sampled_from(["file", "allow_pickle", "args", "kwds", "a.npy", "../x", "/",
                                  "a/b", "a%2Fb", "", ".", "..", "\0", "x\0y"])


@fuzz_settings(300)
@given(st.lists(st.one_of(st.text(max_size=12), _SPECIAL_NAMES), unique=True, min_size=1,
                max_size=6))
def test_fuzz_npz_member_names(names):
    """Any blob names (NUL, ``/``, ``..``, ``%``, escapes, non-ASCII) survive an npz round
    trip: as many members as names, decoded back exactly, none absolute or climbing."""
    import zipfile

    from fcn_jax.io_utils import load_blobs, save_blobs

    blobs = {n: np.full(2, i, np.float32) for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "b.npz"
        assert save_blobs(f, blobs) == len(names)
        with zipfile.ZipFile(f) as z:
            members = z.namelist()
        back = load_blobs(f)
    assert len(members) == len(names)
    assert not any(m.startswith("/") or m.startswith("../") or "/../" in m for m in members)
    assert sorted(back) == sorted(names)
    for n, arr in blobs.items():
        np.testing.assert_array_equal(back[n], arr)


# ----------------------------------------------------------------------------- layer params

_EXTREME = st.sampled_from([0, 1, 2, 3, 5, 7, 255, 65535, 2**31 - 1, 2**31, 2**32 + 1, -1, -5])
_LAYERS = {
    "Convolution": lambda v: (f"convolution_param {{ num_output: {v[0]} kernel_size: {v[1]} "
                              f"stride: {v[2]} pad: {v[3]} group: {v[4]} dilation: {v[5]} }}"),
    "Deconvolution": lambda v: (f"convolution_param {{ num_output: {v[0]} kernel_size: {v[1]} "
                                f"stride: {v[2]} pad: {v[3]} group: {v[4]} }}"),
    "Pooling": lambda v: (f"pooling_param {{ pool: {('MAX', 'AVE')[v[0] % 2]} kernel_size: "
                          f"{v[1]} stride: {v[2]} pad: {v[3]} }}"),
    "LRN": lambda v: f"lrn_param {{ local_size: {v[1]} alpha: {v[2]} beta: 0.75 }}",
    "InnerProduct": lambda v: f"inner_product_param {{ num_output: {v[0]} axis: {v[5]} }}",
    "Reshape": lambda v: (f"reshape_param {{ shape {{ dim: {v[0]} dim: {v[1]} }} axis: {v[2]} "
                          f"num_axes: {v[3]} }}"),
    "Slice": lambda v: f"slice_param {{ axis: {v[0]} slice_point: {v[1]} }}",
    "Concat": lambda v: f"concat_param {{ axis: {v[0]} }}",
    "Eltwise": lambda v: "eltwise_param { operation: SUM }",
    "Crop": lambda v: f"crop_param {{ axis: {v[0]} offset: {v[1]} }}",
    "Scale": lambda v: f"scale_param {{ axis: {v[0]} num_axes: {v[1]} bias_term: true }}",
    "PReLU": lambda v: f"prelu_param {{ channel_shared: {('false', 'true')[v[0] % 2]} }}",
    "Flatten": lambda v: f"flatten_param {{ axis: {v[0]} end_axis: {v[1]} }}",
    "Softmax": lambda v: f"softmax_param {{ axis: {v[0]} }}",
    "ArgMax": lambda v: f"argmax_param {{ top_k: {v[0]} axis: {v[1]} }}",
    "Permute": lambda v: f"permute_param {{ order: {v[0]} order: {v[1]} }}",
    "Normalize": lambda v: f"norm_param {{ across_spatial: {('false', 'true')[v[0] % 2]} }}",
    "ShuffleChannel": lambda v: f"shuffle_channel_param {{ group: {v[0]} }}",
    "Interp": lambda v: f"interp_param {{ zoom_factor: {v[0]} }}",
    "Upsample": lambda v: f"upsample_param {{ scale: {v[0]} }}",
}


_VALUE_OR_EXTREME = st.one_of(st.integers(0, 4), _EXTREME)


@fuzz_settings(400)
@given(st.sampled_from(sorted(_LAYERS)), st.lists(_VALUE_OR_EXTREME, min_size=6, max_size=6),
       st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12)),
       st.sampled_from([1, 1, 1, 1, 2, 0, 3]), st.sampled_from([1, 1, 1, 1, 2, 0]))
def test_fuzz_layer_parameter_extremes(kind, values, shape, bottoms, tops):
    """A layer with extreme parameter values and any bottom/top counts either runs (shape
    trace) or is refused with a one-line ``CaffeFormatError``: never another exception, an
    abort, or an allocation past the memory budget."""
    import jax

    dims = " ".join(f"dim: {d}" for d in shape)
    bottom = "".join(f' bottom: "{b}"' for b in ("data", "data2", "data")[:bottoms])
    top = "".join(f' top: "t{i}"' for i in range(tops))
    text = (f'layer {{ name: "data" type: "Input" top: "data" top: "data2" input_param {{ '
            f'shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "l" type: "{kind}"{bottom}{top} {_LAYERS[kind](values)} }}')
    try:
        net = converters.parse_prototxt(text)
        module, params = converters.load_caffe(net)
        x = jax.ShapeDtypeStruct(shape, np.float32)
        jax.eval_shape(lambda p, a, b: module.apply({"params": p}, {"data": a, "data2": b}),
                       params, x, x)
    except CaffeFormatError as e:
        assert "\n" not in str(e)


# ----------------------------------------------------------------------------- graphs


@fuzz_settings(300)
@given(st.integers(0, 2**32 - 1))
def test_fuzz_prototxt_graphs(seed):
    """Random graphs (many bottoms and tops, in-place and duplicate tops, long chains,
    NetState rules, unknown fields inside known messages and unknown layer messages): the
    net builds with exactly the layers Caffe's FilterNet keeps, or is refused in one line,
    and the refusals Caffe makes are made (an unknown field named, "produced by multiple
    sources", past the layer limit)."""
    import random

    import jax
    from fuzz_graphs import random_graph

    from fcn_jax import layer_table

    g = random_graph(random.Random(seed), layer_table.MAX_LAYERS)
    try:
        net = converters.parse_prototxt(g.text)
        layers = layer_table.compile_net(net, stages=g.stages, level=g.level)
    except CaffeFormatError as e:
        one_line(e)
        msg = str(e)
        if g.unknown_field:
            assert g.unknown_field in msg, (msg, g.text)
        elif g.too_many_layers:
            assert "more than the" in msg, msg
        elif g.duplicate is not None:
            assert "produced by multiple sources" in msg and repr(g.duplicate) in msg, msg
        else:
            assert "multiple sources" not in msg and "has no field" not in msg, (msg, g.text)
        return
    assert g.unknown_field is None and g.duplicate is None and not g.too_many_layers, g.text
    assert sorted(s.name for s in layers) == sorted(g.kept), g.text
    if len(layers) > 40:
        return
    try:
        module, params = converters.load_caffe(net, stages=g.stages, level=g.level)
        jax.eval_shape(lambda p, x: module.apply({"params": p}, x), params,
                       jax.ShapeDtypeStruct((1, 4, 3, 3), np.float32))
    except CaffeFormatError as e:
        one_line(e)


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    import jax.numpy as jnp
    import optax

    from fcn_jax import train as T

    d = tmp_path_factory.mktemp("ckpt")
    (d / "t.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
        'dim: 3 } } }\nlayer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
        'inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 1 } } }')
    module, params = converters.load_caffe(d / "t.prototxt", seed=2)
    state = T.create_train_state(module, params, optax.adam(0.1))
    T.save_train_state(d / "ck", state.replace(step=jnp.int32(5)),
                       {"train_loss": [0.5], "eval_before": {"mean_iou": 0.1}}, keep=1)
    return T, state, d / "ck"


@fuzz_settings(60)
@given(st.integers(0, 2**32 - 1))
def test_fuzz_checkpoint_folders(checkpoint_folder, seed):
    """A checkpoint folder with one file damaged resumes with exactly the saved params, or
    is refused in one line naming the folder: never a traceback, never changed weights."""
    import random

    from fuzz_graphs import damage_checkpoint

    T, state, src = checkpoint_folder
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "ck"
        how = damage_checkpoint(src, dst, random.Random(seed))
        try:
            restored, _ = T.restore_train_state(dst, state)
        except CaffeFormatError as e:
            one_line(e)
            assert "ck" in str(e), str(e)
            return
        for k, v in state.params["fc"].items():
            np.testing.assert_array_equal(np.asarray(restored.params["fc"][k]), np.asarray(v),
                                          err_msg=how)
