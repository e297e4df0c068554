"""fcn_jax.data_layers: Caffe's HDF5Data / ImageData / Data (LMDB) layers for train nets.

References: the rows real Caffe fed its solver (caffe-reference/solvers' ``batch_rows``),
float64 numpy written from data_transformer.cpp's formula, OpenCV's own ``cv2.resize`` /
``cv2.imread`` for the pixels, and properties (every epoch a permutation, every crop window
reachable, ``skip`` equal to ``next``).
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from converters.caffe_io import parse_prototxt
from converters.errors import CaffeFormatError
from converters.proto import caffe_pb2
from fcn_jax import data_layers as D

h5py = pytest.importorskip("h5py")
cv2 = pytest.importorskip("cv2")
lmdb = pytest.importorskip("lmdb")

SOLVERS = Path(__file__).resolve().parents[2] / "shared" / "caffe-reference" / "solvers"
needs_ref = pytest.mark.skipif(not (SOLVERS / "data.h5").exists(),
                               reason="../shared/caffe-reference/solvers not present")


def layer(text: str):
    """One LayerParameter from prototxt text."""
    return parse_prototxt(f"layer {{ {text} }}").layer[0]


def data_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fcn-jax-data")]


@pytest.fixture(autouse=True)
def _no_thread_leaks():
    yield
    for _ in range(50):
        if not data_threads():
            break
        time.sleep(0.02)
    assert not data_threads(), "a data layer left its worker threads running"


def drain(src, n):
    return [src.next() for _ in range(n)]


# ----------------------------------------------------------------------------- HDF5Data


@needs_ref
@pytest.mark.parametrize("case,passes", [("01_sgd_fixed", 1), ("14_sgd_iter_size2", 2)])
def test_hdf5_batches_are_the_rows_caffe_used(monkeypatch, case, passes):
    """Caffe's trajectory records which rows of data.h5 made each step's batch(es): the
    layer wraps row by row (iteration 4 reads rows 32-35 then 0-3)."""
    monkeypatch.chdir(SOLVERS)  # Caffe's paths are relative to the current directory
    net = parse_prototxt((SOLVERS / "train.prototxt").read_text())
    rows = np.load(SOLVERS / case / "trajectory.npz")["batch_rows"]
    with h5py.File(SOLVERS / "data.h5") as f:
        data, label = f["data"][()], f["label"][()]
    with D.open_data_layer(net.layer[0], path="train.prototxt", workers=3) as src:
        assert src.tops == ("data", "label")
        assert src.shapes() == {"data": (8, 3, 16, 16), "label": (8,)}
        for step in rows:
            got = drain(src, passes)
            want = step.reshape(passes, 8)
            for b, r in zip(got, want, strict=True):
                assert b["data"].dtype == np.float32 and b["label"].dtype == np.float32
                np.testing.assert_array_equal(b["data"], data[r])
                np.testing.assert_array_equal(b["label"], label[r])
    with D.open_data_layer(net.layer[0]) as src:
        src.skip(4 * passes)
        np.testing.assert_array_equal(src.next()["data"], data[rows[4][:8]])


def write_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v


def hdf5_layer(tmp_path, files, batch, shuffle=False, extra=""):
    (tmp_path / "list.txt").write_text("\n\n".join(str(f) for f in files) + "\n")
    return layer(f'name: "d" type: "HDF5Data" top: "x" top: "y" hdf5_data_param {{ '
                 f'source: "{tmp_path / "list.txt"}" batch_size: {batch} '
                 f'shuffle: {str(shuffle).lower()} }} {extra}')


def test_hdf5_wraps_across_files(tmp_path):
    """Rows in file order, across files, back to the first file: 5 + 3 rows, batch 3."""
    write_h5(tmp_path / "a.h5", x=np.arange(10, 15, dtype=np.float64).reshape(5, 1),
             y=np.arange(5, dtype=np.int32))
    write_h5(tmp_path / "b.h5", x=np.arange(20, 23, dtype=np.float64).reshape(3, 1),
             y=np.arange(5, 8, dtype=np.int32))
    lp = hdf5_layer(tmp_path, [tmp_path / "a.h5", tmp_path / "b.h5"], 3)
    cycle = [0, 1, 2, 3, 4, 5, 6, 7]   # rows of a then b
    xs = [10, 11, 12, 13, 14, 20, 21, 22]
    with D.open_data_layer(lp) as src:
        assert src.shapes() == {"x": (3, 1), "y": (3,)}
        for b in range(6):
            got = src.next()
            idx = [cycle[(3 * b + i) % 8] for i in range(3)]
            np.testing.assert_array_equal(got["y"], np.array(idx, np.float32))
            np.testing.assert_array_equal(got["x"][:, 0], np.array(xs, np.float32)[idx])


def test_hdf5_shuffle_is_a_deterministic_permutation_per_epoch(tmp_path):
    write_h5(tmp_path / "a.h5", x=np.arange(12, dtype=np.float32)[:, None],
             y=np.arange(12, dtype=np.float32))
    lp = hdf5_layer(tmp_path, [tmp_path / "a.h5"], 4, shuffle=True)

    def epochs(seed):
        with D.open_data_layer(lp, seed=seed, workers=2) as src:
            return [np.concatenate([src.next()["y"] for _ in range(3)]) for _ in range(3)]

    a, b, c = epochs(5), epochs(5), epochs(6)
    for e in a:
        assert sorted(e) == list(range(12))          # each epoch: every row once
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], np.arange(12))   # shuffled
    assert not np.array_equal(a[0], a[1])            # reshuffled at the wrap
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("case,message", [
    ("no_dataset", "no dataset 'y' for top 'y'"),
    ("rows", "has 4 rows but 'x' has 5"),
    ("empty_list", "lists no HDF5 file"),
    ("missing_file", "cannot open HDF5 file"),
    ("zero_bytes", "cannot open HDF5 file"),
    ("strings", "only float and integer"),
    ("transform", "does not transform data"),
])
def test_hdf5_errors_are_one_line(tmp_path, case, message):
    files = [tmp_path / "a.h5"]
    extra = ""
    if case == "no_dataset":
        write_h5(files[0], x=np.zeros((5, 2)))
    elif case == "rows":
        write_h5(files[0], x=np.zeros((5, 2)), y=np.zeros(4))
    elif case == "empty_list":
        files = []
    elif case == "zero_bytes":
        files[0].write_bytes(b"")
    elif case == "strings":
        write_h5(files[0], x=np.array([b"a", b"b"]), y=np.zeros(2))
    elif case == "transform":
        write_h5(files[0], x=np.zeros((5, 2)), y=np.zeros(5))
        extra = "transform_param { scale: 2 }"
    with pytest.raises(CaffeFormatError, match=message) as e:
        D.open_data_layer(hdf5_layer(tmp_path, files, 2, extra=extra), path="net.prototxt")
    assert "\n" not in str(e.value) and "'d'" in str(e.value)


# ----------------------------------------------------------------------------- transform


def caffe_formula(chw, *, h_off, w_off, crop, mean=None, mean_values=None, scale=1.0,
                  mirror=False):
    """data_transformer.cpp, in float64: (value - mean[c, h_off + h, w_off + w]) * scale,
    width flipped when mirrored."""
    x = np.asarray(chw, np.float64)
    c, h, w = x.shape
    ch, cw = (crop, crop) if crop else (h, w)
    m = np.zeros_like(x) if mean is None else np.asarray(mean, np.float64)
    if mean_values is not None:
        m = np.broadcast_to(np.asarray(mean_values, np.float64)[:, None, None], x.shape)
    out = (x - m)[:, h_off:h_off + ch, w_off:w_off + cw] * scale
    return out[:, :, ::-1] if mirror else out


def tparam(text: str):
    return layer(f'name: "t" type: "Data" transform_param {{ {text} }}').transform_param


RNG = np.random.default_rng(0)


def test_transform_test_phase_centre_crop_mean_value_scale():
    img = RNG.integers(0, 256, (9, 12, 3), dtype=np.uint8)  # HWC, BGR
    tp = tparam("crop_size: 5 scale: 0.00390625 mean_value: 104 mean_value: 117 "
                "mean_value: 123")
    out = D.transform(img, tp, phase="TEST")
    ref = caffe_formula(img.transpose(2, 0, 1), h_off=2, w_off=3, crop=5,
                        mean_values=[104, 117, 123], scale=0.00390625)
    assert out.dtype == np.float32 and out.shape == (3, 5, 5)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)


def test_transform_mean_file_is_cropped_with_the_image_and_one_mean_value_replicates():
    chw = RNG.integers(0, 256, (2, 7, 6), dtype=np.uint8)
    mean = RNG.random((2, 7, 6)).astype(np.float32) * 255
    tp = tparam('crop_size: 4 scale: 0.017 mean_file: "m.binaryproto"')
    out = D.transform_chw(chw, tp, phase="TEST", mean=mean)
    np.testing.assert_allclose(out, caffe_formula(chw, h_off=1, w_off=1, crop=4, mean=mean,
                                                  scale=0.017), rtol=1e-6)
    out = D.transform_chw(chw, tparam("mean_value: 100"), phase="TEST")
    np.testing.assert_allclose(out, caffe_formula(chw, h_off=0, w_off=0, crop=0,
                                                  mean_values=[100, 100]), rtol=0)


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_transform_train_crops_and_mirrors_every_way_with_caffes_distribution(layout):
    """TRAIN: the window is one of the (H - crop + 1) x (W - crop + 1) placements, mirrored or
    not; over many draws every placement and both mirror states occur."""
    chw = RNG.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    tp = tparam("crop_size: 3 mirror: true scale: 2 mean_value: 7")
    if layout == "CHW":
        fn = D.transform_chw
    else:
        def fn(x, tp, **kw):
            return D.transform(np.ascontiguousarray(x.transpose(1, 2, 0)), tp, **kw)
    candidates = {(h, w, m): caffe_formula(chw, h_off=h, w_off=w, crop=3, mean_values=[7] * 3,
                                           scale=2.0, mirror=m)
                  for h in range(4) for w in range(3) for m in (False, True)}
    seen = []
    for seed in range(400):
        out = fn(chw, tp, phase="TRAIN", rng=np.random.default_rng(seed))
        hits = [k for k, ref in candidates.items() if np.array_equal(out, ref)]
        assert len(hits) == 1
        seen.append(hits[0])
    assert set(seen) == set(candidates)
    counts = np.array([seen.count(k) for k in candidates])
    assert counts.min() > 400 / 24 * 0.3                 # roughly uniform
    # TEST mirrors too (Caffe mirrors in every phase) but crops at the centre
    outs = {fn(chw, tp, phase="TEST", rng=np.random.default_rng(s)).tobytes()
            for s in range(40)}
    assert outs == {candidates[(1, 1, False)].astype(np.float32).tobytes(),
                    candidates[(1, 1, True)].astype(np.float32).tobytes()}


@pytest.mark.parametrize("text,message", [
    ("crop_size: 10", "smaller than crop_size"),
    ("mean_value: 1 mean_value: 2", "2 mean_value for 3 channels"),
    ('mean_value: 1 mean_file: "m"', "mean_file and mean_value"),
])
def test_transform_refuses_like_caffes_checks(text, message):
    with pytest.raises((CaffeFormatError, ValueError), match=message):
        D.transform(np.zeros((6, 6, 3), np.uint8), tparam(text), phase="TEST",
                    mean=np.zeros((3, 6, 6), np.float32))


# ----------------------------------------------------------------------------- Data (LMDB)


def write_lmdb(path, records):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value)
    env.close()


def png_bomb(height, width):
    """A PNG whose header claims height x width RGB pixels, with almost no pixel data."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0,
                                                              0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def raw_datum(chw, label):
    c, h, w = chw.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=chw.tobytes(),
                           label=label).SerializeToString()


def png_datum(hwc, label):
    ok, buf = cv2.imencode(".png", hwc)
    assert ok
    return caffe_pb2.Datum(data=buf.tobytes(), encoded=True, label=label).SerializeToString()


def write_mean(path, mean_chw):
    blob = caffe_pb2.BlobProto(num=1, channels=mean_chw.shape[0], height=mean_chw.shape[1],
                               width=mean_chw.shape[2])
    blob.data.extend(mean_chw.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def data_layer(source, batch, transform="", tops=('"data"', '"label"'), backend="LMDB",
               extra=""):
    top = " ".join(f"top: {t}" for t in tops)
    return layer(f'name: "d" type: "Data" {top} data_param {{ source: "{source}" '
                 f'batch_size: {batch} backend: {backend} {extra} }} '
                 f'transform_param {{ {transform} }}')


@pytest.mark.parametrize("encoded", [False, True])
def test_lmdb_datums_in_key_order_with_crop_mean_scale(tmp_path, encoded):
    images = [RNG.integers(0, 256, (7, 8, 3), dtype=np.uint8) for _ in range(5)]  # HWC BGR
    keys = [b"%08d" % i for i in range(5)]
    order = [3, 0, 4, 1, 2]                 # inserted out of order: LMDB reads key order
    write_lmdb(tmp_path / "db", [
        (keys[i], png_datum(images[i], 10 + i) if encoded
         else raw_datum(images[i].transpose(2, 0, 1).copy(), 10 + i)) for i in order])
    mean = (RNG.random((3, 7, 8)) * 255).astype(np.float32)
    write_mean(tmp_path / "mean.binaryproto", mean)
    lp = data_layer(tmp_path / "db", 2, f'crop_size: 4 scale: 0.5 mean_file: '
                    f'"{tmp_path / "mean.binaryproto"}"')
    with D.open_data_layer(lp, phase="TEST", workers=3) as src:
        assert src.shapes() == {"data": (2, 3, 4, 4), "label": (2,)}
        for b in range(4):                  # 8 records from 5: wraps after key 4
            got = src.next()
            idx = [(2 * b) % 5, (2 * b + 1) % 5]
            np.testing.assert_array_equal(got["label"], np.array(idx, np.float32) + 10)
            for i, j in enumerate(idx):
                ref = caffe_formula(images[j].transpose(2, 0, 1), h_off=1, w_off=2, crop=4,
                                    mean=mean, scale=0.5)
                np.testing.assert_allclose(got["data"][i], ref, rtol=1e-6)


def test_lmdb_float_data_gray_png_and_force_color(tmp_path):
    vals = RNG.standard_normal((2, 3, 3)).astype(np.float32)
    gray = RNG.integers(0, 256, (3, 3), dtype=np.uint8)
    d = caffe_pb2.Datum(channels=2, height=3, width=3, label=1)
    d.float_data.extend(vals.ravel().tolist())
    write_lmdb(tmp_path / "f", [(b"a", d.SerializeToString())])
    with D.open_data_layer(data_layer(tmp_path / "f", 1, "scale: 3"), phase="TEST") as src:
        np.testing.assert_allclose(src.next()["data"][0], vals.astype(np.float64) * 3,
                                   rtol=1e-6)
    write_lmdb(tmp_path / "g", [(b"a", png_datum(gray, 0))])
    with D.open_data_layer(data_layer(tmp_path / "g", 1, tops=('"data"',))) as src:
        assert src.tops == ("data",) and src.shapes() == {"data": (1, 1, 3, 3)}
        np.testing.assert_array_equal(src.next()["data"][0, 0], gray)   # native: 1 channel
    with D.open_data_layer(data_layer(tmp_path / "g", 1, "force_color: true")) as src:
        out = src.next()["data"][0]
        assert out.shape == (3, 3, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[c], gray)


def test_lmdb_errors_are_raised_at_the_batch_that_holds_the_bad_record(tmp_path):
    good = raw_datum(np.zeros((1, 2, 2), np.uint8), 0)
    write_lmdb(tmp_path / "db", [(b"0", good), (b"1", good), (b"2", good), (b"3", good),
                                 (b"4", b"\xff\xff\xff\xff garbage")])
    with D.open_data_layer(data_layer(tmp_path / "db", 2), prefetch=4) as src:
        src.next()
        src.next()
        with pytest.raises(CaffeFormatError, match=r"key b'4'.*not a valid Datum"):
            src.next()


@pytest.mark.parametrize("value,message", [
    (caffe_pb2.Datum(channels=2**30, height=2**30, width=2**30, data=b"xx").SerializeToString(),
     "data holds 2 bytes but"),
    (caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc").SerializeToString(),
     "data holds 3 bytes but 1 x 2 x 2 needs 4"),
    (caffe_pb2.Datum(channels=-1, height=2, width=2, data=b"ab").SerializeToString(),
     "each must be positive"),
    (caffe_pb2.Datum(channels=1, height=2, width=2).SerializeToString(),
     "float_data holds 0 values"),
    (caffe_pb2.Datum(data=b"not an image", encoded=True).SerializeToString(),
     "cannot decode"),
    (caffe_pb2.Datum(data=b"", encoded=True).SerializeToString(), "cannot decode"),
    (caffe_pb2.Datum(data=png_bomb(30000, 30000), encoded=True).SerializeToString(),
     "cannot decode"),
])
def test_lmdb_hostile_datums_name_the_key(tmp_path, value, message):
    write_lmdb(tmp_path / "db", [(b"evil", value)])
    with pytest.raises(CaffeFormatError, match=message) as e:
        D.open_data_layer(data_layer(tmp_path / "db", 1))
    assert "key b'evil'" in str(e.value) and "\n" not in str(e.value)


def test_lmdb_missing_empty_and_leveldb_are_refused(tmp_path):
    with pytest.raises(CaffeFormatError, match="no LMDB database"):
        D.open_data_layer(data_layer(tmp_path / "nothing", 1))
    write_lmdb(tmp_path / "empty", [])
    with pytest.raises(CaffeFormatError, match="empty"):
        D.open_data_layer(data_layer(tmp_path / "empty", 1))
    with pytest.raises(CaffeFormatError, match="LEVELDB is not supported"):
        D.open_data_layer(data_layer(tmp_path / "empty", 1, backend="LEVELDB"))
    with pytest.raises(CaffeFormatError, match="deprecated"):
        D.open_data_layer(data_layer(tmp_path / "empty", 1, extra="scale: 2"))


def test_lmdb_pre_1_0_fields_are_ignored_with_a_warning_as_caffe_1_0_does(tmp_path):
    """Caffe 1.0's DataLayer reads from the first key whatever rand_skip says (the field is
    deprecated) and decodes by transform_param's force_color/force_gray only."""
    gray = RNG.integers(0, 256, (3, 3), dtype=np.uint8)
    write_lmdb(tmp_path / "db", [(b"%d" % i, png_datum(gray, i)) for i in range(4)])
    lp = data_layer(tmp_path / "db", 4, extra="rand_skip: 7 force_encoded_color: true")
    for seed in range(3):
        with pytest.warns(UserWarning) as caught, D.open_data_layer(lp, seed=seed) as src:
            got = src.next()
        assert sorted(str(w.message).split(": ")[1].split()[0] for w in caught) == [
            "data_param.force_encoded_color", "data_param.rand_skip"]
        assert got["label"].tolist() == [0, 1, 2, 3] and got["data"].shape == (4, 1, 3, 3)


# ----------------------------------------------------------------------------- ImageData


def write_images(folder, sizes, gray=False):
    folder.mkdir(exist_ok=True)
    names = []
    for i, (h, w) in enumerate(sizes):
        img = RNG.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
        name = f"im {i}.png"                 # a space in the path: Caffe splits at the last
        assert cv2.imwrite(str(folder / name), img)
        names.append(name)
    return names


def image_layer(source, batch, params="", transform=""):
    return layer(f'name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ '
                 f'source: "{source}" batch_size: {batch} {params} }} '
                 f'transform_param {{ {transform} }}')


@pytest.mark.parametrize("is_color", [True, False])
def test_imagedata_resizes_with_opencv_then_caffes_formula(tmp_path, is_color):
    names = write_images(tmp_path / "img", [(11, 9), (6, 14), (8, 8)], gray=not is_color)
    (tmp_path / "list.txt").write_text("".join(f"{n} {3 * i}\n" for i, n in enumerate(names)))
    lp = image_layer(tmp_path / "list.txt", 2,
                     f'new_height: 7 new_width: 10 is_color: {str(is_color).lower()} '
                     f'root_folder: "{tmp_path}/img/"',
                     "scale: 0.25 mean_value: 3" + (" mean_value: 5 mean_value: 9"
                                                    if is_color else ""))
    flag = cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE
    means = [3, 5, 9] if is_color else [3]
    with D.open_data_layer(lp, phase="TEST") as src:
        assert src.shapes() == {"data": (2, len(means), 7, 10), "label": (2,)}
        for b in range(3):
            got = src.next()
            for i in range(2):
                j = (2 * b + i) % 3
                img = cv2.resize(cv2.imread(str(tmp_path / "img" / names[j]), flag), (10, 7))
                img = img[:, :, None] if img.ndim == 2 else img
                ref = caffe_formula(img.transpose(2, 0, 1), h_off=0, w_off=0, crop=0,
                                    mean_values=means, scale=0.25)
                np.testing.assert_allclose(got["data"][i], ref, rtol=1e-6)
                assert got["label"][i] == 3 * j


def test_imagedata_shuffle_rand_skip_and_skip_are_deterministic(tmp_path):
    names = write_images(tmp_path, [(6, 6)] * 7)
    (tmp_path / "list.txt").write_text("".join(f"{tmp_path / n} {i}\n"
                                               for i, n in enumerate(names)))
    lp = image_layer(tmp_path / "list.txt", 3, "shuffle: true rand_skip: 5",
                     "crop_size: 4 mirror: true")

    def run(seed, n=7, workers=2):
        with D.open_data_layer(lp, seed=seed, workers=workers) as src:
            return drain(src, n)

    a, b = run(3), run(3, workers=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["data"], y["data"])
        np.testing.assert_array_equal(x["label"], y["label"])
    labels = np.concatenate([x["label"] for x in a]).astype(int).tolist()
    # rand_skip s < 5 drops the first s lines of the shuffled list: the 21 records are the
    # 7 - s left of epoch 1, then whole reshuffled epochs
    def epochs_after(s):
        rest = labels[7 - s:]
        return (len(set(labels[:7 - s])) == 7 - s and sorted(rest[:7]) == list(range(7))
                and sorted(rest[7:14]) == list(range(7)) and rest[:7] != rest[7:14])
    assert any(epochs_after(s) for s in range(5))
    assert labels[:7] != list(range(7))
    with D.open_data_layer(lp, seed=3) as src:
        src.skip(4)
        np.testing.assert_array_equal(src.next()["data"], a[4]["data"])
    assert any(not np.array_equal(x["data"], y["data"]) for x, y in zip(a, run(4), strict=True))


@pytest.mark.parametrize("text,message", [
    ("a.png\n", "line 1: no label"),
    ("a.png 1\nb.png x\n", "line 2: label b'x' is not an int32"),
    ("a.png 1\n\n", "line 2: no label"),
    ("a.png 99999999999\n", "not an int32"),
    ("", "lists no image"),
    ("missing.png 0\n", "line 1: cannot read image"),
    ("zero.png 0\n", "line 1: cannot decode image"),
    ("junk.png 0\n", "line 1: cannot decode image"),
])
def test_imagedata_hostile_lists(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)             # relative paths: relative to the current directory
    Path("a.png").write_bytes(cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1])
    Path("zero.png").write_bytes(b"")
    Path("junk.png").write_bytes(b"\x89PNG but not really" * 10)
    Path("list.txt").write_text(text)
    with pytest.raises(CaffeFormatError, match=message) as e:
        D.open_data_layer(image_layer("list.txt", 1))
    assert "list.txt" in str(e.value) and "\n" not in str(e.value)


def test_imagedata_large_list_reads_images_lazily(tmp_path):
    Path(tmp_path / "a.png").write_bytes(cv2.imencode(".png", np.zeros((3, 3, 3), np.uint8))[1])
    n = 200_000
    (tmp_path / "list.txt").write_bytes(f"{tmp_path}/a.png 1\n".encode() * n)
    with D.open_data_layer(image_layer(tmp_path / "list.txt", 2)) as src:
        assert src.next()["data"].shape == (2, 3, 3, 3)


def test_imagedata_bad_image_mid_stream_fails_at_its_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.png").write_bytes(cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1])
    Path("list.txt").write_text("a.png 0\na.png 1\na.png 2\ngone.png 3\n")
    with D.open_data_layer(image_layer("list.txt", 1), prefetch=4) as src:
        assert [src.next()["label"][0] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(CaffeFormatError, match="line 4: cannot read image 'gone.png'"):
            src.next()


def test_a_batch_of_mixed_sizes_names_the_record_that_differs(tmp_path, monkeypatch):
    """Caffe reshapes its batch to the first record and CHECKs the others fit; without a crop
    or resize, two sizes in one batch are refused, naming the second record."""
    monkeypatch.chdir(tmp_path)
    for name, hw in (("a.png", (2, 2)), ("b.png", (3, 2))):
        Path(name).write_bytes(cv2.imencode(".png", np.zeros((*hw, 3), np.uint8))[1])
    Path("list.txt").write_text("a.png 0\nb.png 1\n")
    with D.open_data_layer(image_layer("list.txt", 2), prefetch=1) as src:
        with pytest.raises(CaffeFormatError, match=r"line 2: image gives \(3, 3, 2\), the "
                           r"batch's first image gave \(3, 2, 2\) \(set crop_size"):
            src.next()
    write_lmdb(tmp_path / "db", [(b"0", raw_datum(np.zeros((1, 2, 2), np.uint8), 0)),
                                 (b"1", raw_datum(np.zeros((1, 2, 3), np.uint8), 1))])
    with D.open_data_layer(data_layer(tmp_path / "db", 2), prefetch=1) as src:
        with pytest.raises(CaffeFormatError, match=r"key b'1'.*record gives \(1, 2, 3\), "
                           r"the batch's first record gave \(1, 2, 2\)"):
            src.next()


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_caffes_order_whatever_the_workers_timing(tmp_path, monkeypatch):
    """Later batches finish first (each batch of a group of 4 waits for the next one to
    finish); next() still returns them in order, and close() stops every worker."""
    write_h5(tmp_path / "a.h5", x=np.arange(40, dtype=np.float32)[:, None],
             y=np.arange(40, dtype=np.float32))
    lp = hdf5_layer(tmp_path, [tmp_path / "a.h5"], 2)
    build = D.HDF5DataSource._build
    finished = []
    done = [threading.Event() for _ in range(13)]

    def slow_build(self, records, first):
        b = first // 2
        if b % 4 != 3:
            done[b + 1].wait(timeout=5)
        out = build(self, records, first)
        finished.append(b)
        done[b].set()
        return out

    monkeypatch.setattr(D.HDF5DataSource, "_build", slow_build)
    src = D.open_data_layer(lp, workers=4, prefetch=4)
    got = [src.next()["y"].tolist() for _ in range(12)]
    assert got == [[2 * b, 2 * b + 1] for b in range(12)]
    assert finished[:4] == [3, 2, 1, 0]           # the threads did finish out of order
    assert len(data_threads()) > 1
    src.close()
    src.close()
    assert not data_threads()
    with pytest.raises(RuntimeError, match="closed"):
        src.next()


def test_open_data_layer_refuses_other_types():
    with pytest.raises(CaffeFormatError, match="not a data layer"):
        D.open_data_layer(layer('name: "c" type: "Convolution"'), path="n.prototxt")
    assert frozenset({"HDF5Data", "ImageData", "Data"}) == D.DATA_LAYER_TYPES


@pytest.mark.parametrize("transform,message", [
    ("MEAN", "key b'a': mean of shape"),
    ("mean_value: 1 mean_value: 2", "key b'a': 2 mean_value for 3 channels"),
    ("crop_size: 5", "key b'a': image 4x4 is smaller than crop_size 5"),
])
def test_transform_params_that_do_not_fit_the_first_record_are_refused_at_open(
        tmp_path, transform, message):
    write_mean(tmp_path / "m.binaryproto", np.zeros((3, 5, 5), np.float32))
    write_lmdb(tmp_path / "db", [(b"a", raw_datum(np.zeros((3, 4, 4), np.uint8), 0))])
    transform = transform.replace("MEAN", f'mean_file: "{tmp_path / "m.binaryproto"}"')
    with pytest.raises(CaffeFormatError, match=message) as e:
        D.open_data_layer(data_layer(tmp_path / "db", 1, transform))
    assert "layer 'd'" in str(e.value)



def test_hdf5_shuffle_permutes_files_and_rows_within_each_file(tmp_path):
    """Caffe shuffles the file order and the rows of each file, never mixing files: every
    pass over the files reads each file's rows together, each row once."""
    names = []
    for k, n in enumerate((3, 5, 4)):
        names.append(tmp_path / f"{k}.h5")
        write_h5(names[-1], x=np.zeros((n, 1), np.float32),
                 y=np.arange(10 * k, 10 * k + n, dtype=np.float32))
    lp = hdf5_layer(tmp_path, names, 4, shuffle=True)
    with D.open_data_layer(lp, seed=11) as src:
        stream = np.concatenate([src.next()["y"] for _ in range(12)]).astype(int)  # 4 passes
    with D.open_data_layer(lp, seed=11, workers=1, prefetch=1) as src:
        again = np.concatenate([src.next()["y"] for _ in range(12)]).astype(int)
    np.testing.assert_array_equal(stream, again)
    passes = stream.reshape(4, 12)
    for p in passes:
        assert sorted(p) == sorted(list(range(3)) + list(range(10, 15)) + list(range(20, 24)))
        files_in_order = [v // 10 for v in p]
        blocks = [f for i, f in enumerate(files_in_order) if i == 0 or f != files_in_order[i - 1]]
        assert sorted(blocks) == [0, 1, 2]         # each file's rows contiguous
    assert len({tuple(p) for p in passes}) > 1     # reshuffled between passes


def test_data_layer_schema_is_caffes():
    """Field numbers and defaults against BVLC caffe.proto, and a Datum written byte by byte
    as Caffe's C++ protobuf writes it (float_data unpacked: proto2's default)."""
    def numbers(msg):
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}
    assert numbers(caffe_pb2.Datum) == {"channels": 1, "height": 2, "width": 3, "data": 4,
                                        "label": 5, "float_data": 6, "encoded": 7}
    assert numbers(caffe_pb2.DataParameter) == {
        "source": 1, "batch_size": 4, "rand_skip": 7, "backend": 8, "scale": 2,
        "mean_file": 3, "crop_size": 5, "mirror": 6, "force_encoded_color": 9, "prefetch": 10}
    assert numbers(caffe_pb2.ImageDataParameter) == {
        "source": 1, "batch_size": 4, "rand_skip": 7, "shuffle": 8, "new_height": 9,
        "new_width": 10, "is_color": 11, "scale": 2, "mean_file": 3, "crop_size": 5,
        "mirror": 6, "root_folder": 12}
    assert numbers(caffe_pb2.HDF5DataParameter) == {"source": 1, "batch_size": 2, "shuffle": 3}
    assert numbers(caffe_pb2.TransformationParameter) == {
        "scale": 1, "mirror": 2, "crop_size": 3, "mean_file": 4, "mean_value": 5,
        "force_color": 6, "force_gray": 7}
    dp, ip, tp = (caffe_pb2.DataParameter(), caffe_pb2.ImageDataParameter(),
                  caffe_pb2.TransformationParameter())
    assert (dp.backend, dp.prefetch, dp.scale, dp.rand_skip) == (caffe_pb2.DataParameter.LEVELDB,
                                                                 4, 1.0, 0)
    assert (ip.batch_size, ip.is_color, ip.root_folder, ip.shuffle) == (1, True, "", False)
    assert (tp.scale, tp.mirror, tp.crop_size) == (1.0, False, 0)
    assert caffe_pb2.Datum().encoded is False
    wire = (b"\x08\x02\x10\x01\x18\x01"          # channels 2, height 1, width 1
            b"\x28\x07"                          # label 7
            b"\x35" + np.float32(1.5).tobytes() + b"\x35" + np.float32(-2).tobytes())
    d = caffe_pb2.Datum.FromString(wire)
    assert (d.channels, d.height, d.width, d.label, list(d.float_data)) == (2, 1, 1, 7,
                                                                            [1.5, -2.0])


def test_v1_data_layers_move_their_transform_fields_as_caffe_upgrades_them(tmp_path):
    """upgrade_proto.cpp's UpgradeNetDataTransformation: a V1 DATA layer's scale, mean_file,
    crop_size and mirror become transform_param's; the layer then reads as a V2 one."""
    chw = RNG.integers(0, 256, (3, 6, 6), dtype=np.uint8)
    write_lmdb(tmp_path / "db", [(b"a", raw_datum(chw, 4))])
    net = parse_prototxt(f'layers {{ name: "d" type: DATA top: "data" top: "label" data_param {{ '
                         f'source: "{tmp_path / "db"}" batch_size: 1 backend: LMDB scale: 0.5 '
                         f'crop_size: 4 mirror: false }} }}')
    lp = net.layer[0]
    assert (lp.type, lp.transform_param.scale, lp.transform_param.crop_size) == ("Data", 0.5, 4)
    assert not lp.data_param.HasField("scale") and lp.transform_param.HasField("mirror")
    with D.open_data_layer(lp, phase="TEST") as src:
        np.testing.assert_allclose(src.next()["data"][0],
                                   caffe_formula(chw, h_off=1, w_off=1, crop=4, scale=0.5))


def test_a_source_dropped_without_close_stops_its_threads(tmp_path):
    import gc

    write_h5(tmp_path / "a.h5", x=np.zeros((6, 1), np.float32), y=np.zeros(6, np.float32))
    src = D.open_data_layer(hdf5_layer(tmp_path, [tmp_path / "a.h5"], 2), workers=3)
    src.next()
    assert data_threads()
    del src
    gc.collect()
    for _ in range(100):
        if not data_threads():
            break
        time.sleep(0.02)
    assert not data_threads()


def test_shares_keep_caffes_multi_gpu_records(tmp_path):
    """``share=(r, n)``: Caffe's Skip rule, solver r of n keeps records r, r+n, ... of the
    stream, batch_size each; together the shares' batches are the records of one batch of
    n x batch_size (7 rows, so the stream wraps mid-batch), and skip() moves the same way."""
    write_h5(tmp_path / "a.h5", x=np.arange(7, dtype=np.float64).reshape(7, 1),
             y=np.arange(7, dtype=np.int32))
    with D.open_data_layer(hdf5_layer(tmp_path, [tmp_path / "a.h5"], 6)) as whole:
        ref = [whole.next()["y"] for _ in range(4)]
    for n in (2, 3):
        lp = hdf5_layer(tmp_path, [tmp_path / "a.h5"], 6 // n)
        shares = [D.open_data_layer(lp, share=(r, n)) for r in range(n)]
        try:
            for b in range(4):
                got = [s.next()["y"] for s in shares]
                np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.sort(ref[b]))
                for r in range(n):
                    np.testing.assert_array_equal(got[r], ref[b][r::n])
            shares[0].skip(1)
            with D.open_data_layer(hdf5_layer(tmp_path, [tmp_path / "a.h5"], 6)) as whole:
                whole.skip(5)
                np.testing.assert_array_equal(shares[0].next()["y"], whole.next()["y"][0::n])
        finally:
            for s in shares:
                s.close()
    with pytest.raises(ValueError):
        D.open_data_layer(hdf5_layer(tmp_path, [tmp_path / "a.h5"], 2), share=(2, 2))
