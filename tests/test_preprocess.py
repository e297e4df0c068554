"""Tests for fcn_jax.preprocess (against real pycaffe output) and fcn_jax.io_utils."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fcn_jax import io_utils
from fcn_jax.preprocess import (
    TransformerConfig,
    caffe_transformer,
    deprocess,
    imagenet_mean_bgr,
    load_image,
    load_mean,
    parse_blobproto,
    preprocess,
    resize_image,
)

DATA = Path(__file__).parent / "data"
CAT = DATA / "source" / "cat.jpg"
CAT_GRAY = DATA / "source" / "cat_gray.jpg"
TUTORIAL = DATA / "tutorial" / "tutorial_preprocess.npz"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(TUTORIAL) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return load_image(CAT)


def _max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    span = float(want.max() - want.min()) or 1.0
    return float(np.abs(got.astype(np.float64) - want).max() / span)


# --------------------------------------------------------------------------- pycaffe parity


def test_imagenet_mean_matches_reference(ref):
    mean = imagenet_mean_bgr()
    assert mean.dtype == np.float64 and mean.shape == (3,)
    np.testing.assert_array_equal(mean, ref["mean_bgr"])
    np.testing.assert_array_equal(mean, np.load(DATA / "source" / "ilsvrc_2012_mean_bgr.npy"))


def test_load_image_matches_pycaffe(cat, ref):
    assert cat.dtype == np.float32 and cat.shape == (360, 480, 3)
    assert 0.0 <= cat.min() and cat.max() <= 1.0
    assert _max_rel_err(cat[::4, ::4], ref["load_image_cat_s4"]) <= 1e-6


@pytest.mark.parametrize("size", [451, 227])
def test_preprocess_deprocess_match_pycaffe(cat, ref, size):
    cfg = caffe_transformer((3, size, size), mean=ref["mean_bgr"])
    before = cat.copy()
    blob = preprocess(cfg, cat)
    np.testing.assert_array_equal(cat, before)  # pure: input untouched
    assert blob.dtype == np.float32 and blob.shape == (3, size, size)
    assert _max_rel_err(blob[:, ::4, ::4], ref[f"preprocess_{size}_s4"]) <= 1e-4

    img = deprocess(cfg, blob)
    assert img.dtype == np.float32 and img.shape == (size, size, 3)
    assert _max_rel_err(img[::4, ::4], ref[f"deprocess_{size}_s4"]) <= 1e-4
    # the batch axis of a (1, C, H, W) blob is dropped
    np.testing.assert_array_equal(deprocess(cfg, blob[np.newaxis]), img)


def test_preprocess_without_resize_is_exact_arithmetic():
    rng = np.random.default_rng(0)
    img = rng.random((5, 7, 3), dtype=np.float32)
    mean = np.array([1.5, 2.5, 3.5])
    cfg = caffe_transformer((3, 5, 7), mean=mean, input_scale=0.5)
    blob = preprocess(cfg, img)
    want = (img.transpose(2, 0, 1)[::-1] * np.float32(255.0) - mean[:, None, None]) * 0.5
    np.testing.assert_allclose(blob, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(deprocess(cfg, blob), img, atol=1e-6)


# --------------------------------------------------------------------------- transformer


def test_config_defaults_and_validation():
    cfg = TransformerConfig((3, 10, 12))
    assert cfg.transpose == (2, 0, 1) and cfg.channel_swap is None and cfg.mean is None
    tut = caffe_transformer([1, 3, 227, 227])  # (N, C, H, W) accepted
    assert tut.input_shape == (3, 227, 227)
    assert tut.channel_swap == (2, 1, 0) and tut.raw_scale == 255.0 and tut.mean is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        tut.raw_scale = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        TransformerConfig((3, 10))
    with pytest.raises(ValueError):
        TransformerConfig((3, 10, 10), transpose=(0, 0, 1))
    with pytest.raises(ValueError):
        TransformerConfig((3, 10, 10), channel_swap=(1, 0))
    with pytest.raises(ValueError):
        TransformerConfig((3, 10, 10), mean=np.zeros(4))
    with pytest.raises(ValueError):
        TransformerConfig((3, 10, 10), mean=np.zeros((3, 8, 8)))  # smaller mean image
    with pytest.raises(ValueError):
        TransformerConfig((3, 10, 10), raw_scale=0.0)


def test_mean_is_private_and_read_only():
    mean = np.array([1.0, 2.0, 3.0])
    cfg = TransformerConfig((3, 4, 4), mean=mean)
    mean[:] = 0
    assert cfg.mean is not None and cfg.mean.ravel().tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        cfg.mean[0, 0, 0] = 5.0


def test_full_mean_image_center_cropped():
    rng = np.random.default_rng(1)
    mean_img = rng.random((3, 12, 14)) * 100
    img = rng.random((8, 8, 3), dtype=np.float32)
    cfg = caffe_transformer((3, 8, 8), mean=mean_img)
    crop = mean_img[:, 2:10, 3:11]
    np.testing.assert_array_equal(cfg.mean, crop)
    blob = preprocess(cfg, img)
    want = img.transpose(2, 0, 1)[::-1] * np.float32(255.0) - crop
    np.testing.assert_allclose(blob, want, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(deprocess(cfg, blob), img, atol=1e-6)
    # a same-size mean image with constant planes == the per-channel mean
    const = np.broadcast_to(imagenet_mean_bgr()[:, None, None], (3, 8, 8))
    a = preprocess(caffe_transformer((3, 8, 8), mean=const), img)
    b = preprocess(caffe_transformer((3, 8, 8), mean=imagenet_mean_bgr()), img)
    np.testing.assert_array_equal(a, b)


def test_gray_pipeline():
    img = load_image(CAT_GRAY, color=False)
    assert img.shape == (360, 480, 1)
    cfg = TransformerConfig((1, 64, 64), raw_scale=255.0, mean=np.array([100.0]))
    blob = preprocess(cfg, img)
    assert blob.shape == (1, 64, 64)
    assert deprocess(cfg, blob).shape == (64, 64, 1)  # not squeezed away


def test_load_image_variants(tmp_path):
    from PIL import Image

    gray = load_image(CAT_GRAY)
    assert gray.shape == (360, 480, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    assert load_image(CAT, color=False).shape == (360, 480, 1)

    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 7
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], 1.0)


def test_resize_image_paths():
    const = np.full((6, 6, 3), 0.25, dtype=np.float32)
    out = resize_image(const, (4, 9))
    assert out.shape == (4, 9, 3) and out.dtype == np.float32 and np.all(out == 0.25)

    rng = np.random.default_rng(2)
    im = rng.random((10, 10, 3)).astype(np.float32) * 50 - 20  # outside [0, 1]
    out = resize_image(im, (20, 20))
    assert out.shape == (20, 20, 3)
    assert out.min() >= im.min() - 1e-4 and out.max() <= im.max() + 1e-4

    multi = rng.random((10, 10, 5)).astype(np.float32)  # scipy.ndimage.zoom path
    assert resize_image(multi, (5, 20)).shape == (5, 20, 5)
    assert resize_image(im[..., 0], (3, 3)).shape == (3, 3)


@pytest.mark.parametrize("shape", [(640, 480, 3), (300, 200, 3), (200, 640, 3), (160, 160, 3),
                                   (601, 599, 1), (228, 1000, 3), (227, 226, 3), (3, 700, 3),
                                   (2, 1100, 1)])
def test_resize_image_equals_scikit_image_resize(shape):
    """The sparse-operator resize against pycaffe's own call, skimage.transform.resize
    (order 1, mode constant, anti-aliasing when downsampling) of the min/max-normalised
    image, on downsampling, upsampling, mixed and unchanged axes: equal but for the order
    of float64 sums (which can flip a float32 rounding: at most 1 ulp, in at most 1 pixel
    in 10^4)."""
    from skimage.transform import resize

    rng = np.random.default_rng(sum(shape))
    im = (rng.random(shape) * 3 - 1).astype(np.float32)
    dims = (227, 227) if shape[0] > 2 else (1, 300)  # (2, 1100): a Gaussian wider than H
    got = resize_image(im, dims)
    lo, hi = im.min(), im.max()
    down = any(n < o for n, o in zip(dims, shape[:2], strict=True))
    std = resize((im - lo) / (hi - lo), dims, order=1, mode="constant", anti_aliasing=down)
    want = (std * (hi - lo) + lo).astype(np.float32)
    assert got.shape == want.shape and got.dtype == np.float32
    ulp = np.spacing(np.float32(max(abs(lo), abs(hi)))) * 2
    np.testing.assert_allclose(got, want, rtol=0, atol=ulp)
    assert np.mean(got != want) <= 1e-4


# --------------------------------------------------------------------------- mean files


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _legacy_blob(values: np.ndarray, c: int, h: int, w: int, num: int = 1) -> bytes:
    payload = struct.pack(f"<{values.size}f", *values.ravel().tolist())
    return (
        _key(1, 0)
        + _varint(num)
        + _key(2, 0)
        + _varint(c)
        + _key(3, 0)
        + _varint(h)
        + _key(4, 0)
        + _varint(w)
        + _key(5, 2)
        + _varint(len(payload))
        + payload
    )


def _shape_blob(values: np.ndarray, dims: tuple[int, ...]) -> bytes:
    dim_bytes = b"".join(_varint(d) for d in dims)
    shape = _key(1, 2) + _varint(len(dim_bytes)) + dim_bytes
    payload = struct.pack(f"<{values.size}f", *values.ravel().tolist())
    return _key(7, 2) + _varint(len(shape)) + shape + _key(5, 2) + _varint(len(payload)) + payload


def test_load_mean_binaryproto_legacy(tmp_path):
    vals = np.arange(12, dtype=np.float32) * 0.5 + 100
    p = tmp_path / "mean.binaryproto"
    # an unknown varint field (99) and a diff field are skipped
    p.write_bytes(_key(99, 0) + _varint(5) + _legacy_blob(vals, 3, 2, 2) + _key(6, 5) + b"\0" * 4)
    mean = load_mean(p)
    assert mean.dtype == np.float64 and mean.shape == (3, 2, 2)
    np.testing.assert_array_equal(mean, vals.reshape(3, 2, 2))


def test_parse_blobproto_shape_and_encodings():
    vals = np.linspace(-1, 1, 6, dtype=np.float32)
    np.testing.assert_array_equal(parse_blobproto(_shape_blob(vals, (2, 3))), vals.reshape(2, 3))
    # unpacked (fixed32) data and unpacked dims are valid protobuf too
    unpacked = (
        _key(7, 2)
        + _varint(4)
        + _key(1, 0)
        + _varint(2)
        + _key(1, 0)
        + _varint(3)
        + b"".join(_key(5, 5) + struct.pack("<f", v) for v in vals.tolist())
    )
    np.testing.assert_array_equal(parse_blobproto(unpacked), vals.reshape(2, 3))
    # double_data wins over data, as in Caffe
    dbl = struct.pack("<6d", *np.arange(6.0).tolist())
    both = _shape_blob(vals, (6,)) + _key(8, 2) + _varint(len(dbl)) + dbl
    out = parse_blobproto(both)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np.arange(6.0))


def test_parse_blobproto_follows_protobufs_rules():
    """Wrong wire types are unknown fields (skipped), a second shape merges, int32 keeps its
    low 32 bits, NVCaffe's fp16 raw_data is read: as google.protobuf parses the same bytes."""
    from converters.proto import caffe_pb2

    halves = np.array([0.5, -2, 65504, 6e-8, 1 / 3, 7], "<f2")
    blob = (
        _key(1, 2) + _varint(1) + b"\x05"                          # num, length-delimited
        + _key(7, 2) + _varint(3) + _key(1, 2) + _varint(1) + _varint(2)
        + _key(7, 2) + _varint(2) + _key(1, 0) + _varint(3)       # merges: dims (2, 3)
        + _key(5, 0) + _varint(9)                                 # data as a varint
        + _key(10, 0) + _varint(2) + _key(12, 2) + _varint(12) + halves.tobytes()
    )
    ref = caffe_pb2.BlobProto.FromString(blob)
    assert not ref.HasField("num") and list(ref.shape.dim) == [2, 3] and not ref.data
    expected = np.frombuffer(ref.raw_data, "<f2").astype(np.float32).reshape(2, 3)
    out = parse_blobproto(blob)
    assert out.dtype == np.float32 and out.tobytes() == expected.tobytes()
    legacy = (_key(1, 0) + _varint(2**32 + 1) + _key(2, 0) + _varint(1) + _key(3, 0)
              + _varint(1) + _key(4, 0) + _varint(2) + _key(5, 2) + _varint(8)
              + struct.pack("<2f", 1, 2))
    assert caffe_pb2.BlobProto.FromString(legacy).num == 1
    assert parse_blobproto(legacy).shape == (1, 1, 1, 2)


def test_load_mean_npy(tmp_path):
    p = tmp_path / "m.npy"
    np.save(p, np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(load_mean(p), [0.0, 1.0, 2.0])
    bad = tmp_path / "obj.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_mean(bad)


def test_binaryproto_truncated_everywhere(tmp_path):
    good = _legacy_blob(np.arange(12, dtype=np.float32), 3, 2, 2)
    p = tmp_path / "trunc.binaryproto"
    for n in range(len(good)):
        p.write_bytes(good[:n])
        with pytest.raises(ValueError, match="trunc.binaryproto"):
            load_mean(p)


@pytest.mark.parametrize(
    "blob, field",
    [
        # data count does not match the shape
        (_legacy_blob(np.arange(11, dtype=np.float32), 3, 2, 2), "data"),
        # `channels` of the wrong wire type is an unknown field (protobuf): no shape is left
        (_key(2, 2) + _varint(0), "no shape"),
        # packed float length not a multiple of 4 (protobuf refuses it, as in a caffemodel)
        (_key(1, 0) + _varint(1) + _key(5, 2) + _varint(3) + b"abc", "truncated or corrupt"),
        # length-delimited field runs past the end
        (_key(5, 2) + _varint(100) + b"\0" * 8, "truncated or corrupt"),
        # negative dimension
        (_key(7, 2) + _varint(11) + _key(1, 0) + _varint(-1), "shape"),
        # more than 2**31 elements (no allocation attempted)
        (
            _key(1, 0)
            + _varint(1)
            + _key(2, 0)
            + _varint(2**16)
            + _key(3, 0)
            + _varint(2**16)
            + _key(4, 0)
            + _varint(2),
            "num/channels/height/width",
        ),
        # group wire type (unsupported)
        (_key(12, 3), "12"),
        # 11-byte varint
        (_key(1, 0) + b"\xff" * 10 + b"\x01", "truncated or corrupt"),
        # field number 0
        (b"\x00", "truncated or corrupt"),
        # no shape at all
        (b"", "shape"),
        # legacy fields present but width missing -> 0 elements: an empty mean
        (_key(1, 0) + _varint(1) + _key(2, 0) + _varint(3), "empty blob"),
    ],
)
def test_binaryproto_corrupt(tmp_path, blob, field):
    p = tmp_path / "bad.binaryproto"
    p.write_bytes(blob)
    with pytest.raises(ValueError) as info:
        load_mean(p)
    msg = str(info.value)
    assert str(p) in msg and field in msg


def test_binaryproto_num_must_be_one(tmp_path):
    p = tmp_path / "two.binaryproto"
    p.write_bytes(_legacy_blob(np.zeros(8, dtype=np.float32), 1, 2, 2, num=2))
    with pytest.raises(ValueError, match="num=2"):
        load_mean(p)


# --------------------------------------------------------------------------- atomic writes


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_writers_roundtrip(tmp_path):
    io_utils.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    io_utils.atomic_write_text(tmp_path / "t.txt", "h\u00e9llo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "h\u00e9llo\n"
    io_utils.atomic_save_npz(tmp_path / "a.npz", {"x": np.arange(3), "y": np.eye(2)})
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    io_utils.atomic_save_json(tmp_path / "j.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": 1.5, "b": [0, 1]}
    assert _siblings(tmp_path) == ["a.npz", "b.bin", "j.json", "t.txt"]


def test_atomic_write_keeps_permissions(tmp_path):
    p = tmp_path / "perm.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    io_utils.atomic_write_text(p, "new")
    assert p.read_text() == "new" and (os.stat(p).st_mode & 0o777) == 0o640


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_old_file(tmp_path, exc):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old content")

    def write_fn(f):
        f.write(b"partial new content")
        f.flush()
        raise exc("boom")

    with pytest.raises(exc):
        io_utils.atomic_write(p, write_fn)
    assert p.read_bytes() == b"old content"
    assert _siblings(tmp_path) == ["out.bin"]  # no temp file left behind


def test_atomic_write_survives_sigkill(tmp_path):
    p = tmp_path / "victim.npz"
    p.write_bytes(b"old content")
    script = textwrap.dedent(
        f"""
        import sys, time
        from fcn_jax.io_utils import atomic_write

        def write_fn(f):
            f.write(b"x" * 100000)
            f.flush()
            print("ready", flush=True)
            time.sleep(60)

        atomic_write({str(p)!r}, write_fn)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert p.read_bytes() == b"old content"
    leftovers = [n for n in _siblings(tmp_path) if n != p.name]
    # SIGKILL cannot be caught: at most the hidden temp file remains, never a torn target.
    assert all(n.startswith(".victim.npz.") and n.endswith(".tmp") for n in leftovers)


def test_atomic_savefig_png(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    io_utils.atomic_savefig(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    io_utils.atomic_savefig(fig, tmp_path / "f.svg")
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:500]


def test_pycaffe_style_transformer_matches_pycaffe(cat, ref):
    """``preprocess.Transformer`` (the README's name) with the tutorial's set_* calls."""
    from fcn_jax.preprocess import Transformer

    tf = Transformer({"data": (1, 3, 451, 451)})
    assert tf.config("data").transpose is None and tf.config("data").mean is None  # as pycaffe
    tf.set_transpose("data", (2, 0, 1))
    tf.set_channel_swap("data", (2, 1, 0))
    tf.set_raw_scale("data", 255.0)
    tf.set_mean("data", ref["mean_bgr"])
    blob = tf.preprocess("data", cat)
    assert blob.shape == (3, 451, 451)
    assert _max_rel_err(blob[:, ::4, ::4], ref["preprocess_451_s4"]) <= 1e-4
    assert _max_rel_err(tf.deprocess("data", blob)[::4, ::4], ref["deprocess_451_s4"]) <= 1e-4
    want = caffe_transformer((3, 451, 451), mean=ref["mean_bgr"])
    for field in ("input_shape", "transpose", "channel_swap", "raw_scale", "input_scale"):
        assert getattr(tf.config("data"), field) == getattr(want, field), field
    with pytest.raises(KeyError, match="not one of the net's inputs"):
        tf.preprocess("label", cat)


@pytest.mark.parametrize("order", [
    ("transpose", "swap", "raw", "mean", "input"),
    ("transpose", "mean", "raw", "swap", "input"),
    ("mean", "input", "raw", "swap", "transpose"),
    ("input", "mean", "transpose", "raw", "swap"),
])
def test_transformer_set_calls_in_any_order(order):
    """pycaffe's set_* calls commute: a per-channel mean set early survives later calls
    (issue 20 item 1: set_mean then set_raw_scale raised 'mean image (1, 1) is smaller')."""
    from fcn_jax.preprocess import Transformer

    rng = np.random.default_rng(1)
    img = rng.random((6, 5, 3), dtype=np.float32)
    mean = np.array([104.0, 117.0, 123.0])
    tf = Transformer({"data": (1, 3, 6, 5)})
    calls = {
        "transpose": lambda: tf.set_transpose("data", (2, 0, 1)),
        "swap": lambda: tf.set_channel_swap("data", (2, 1, 0)),
        "raw": lambda: tf.set_raw_scale("data", 255.0),
        "mean": lambda: tf.set_mean("data", mean),
        "input": lambda: tf.set_input_scale("data", 0.017),
    }
    for step in order:
        calls[step]()
    # pycaffe's formula in float64: transpose, swap, *raw, -mean, *input
    want = (img.astype(np.float64).transpose(2, 0, 1)[::-1] * 255.0
            - mean[:, None, None]) * 0.017
    np.testing.assert_allclose(tf.preprocess("data", img), want, rtol=1e-5, atol=1e-4)
    # a mean image (C, H, W) also survives later calls
    tf.set_mean("data", np.broadcast_to(mean[:, None, None], (3, 6, 5)))
    tf.set_raw_scale("data", 255.0)
    np.testing.assert_allclose(tf.preprocess("data", img), want, rtol=1e-5, atol=1e-4)
