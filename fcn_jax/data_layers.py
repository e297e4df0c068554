"""Caffe's data layers for train nets: ``HDF5Data``, ``ImageData`` and ``Data`` (LMDB).

Each layer becomes a ``BatchSource`` that yields Caffe's top blobs batch after batch, in the
order Caffe's layer reads its records (``hdf5_data_layer.cpp``, ``image_data_layer.cpp``,
``data_layer.cpp``), with ``DataTransformer``'s arithmetic (``data_transformer.cpp``) on the
pixels: ``(pixel - mean) * scale`` in float32, uint8 pixels, OpenCV's own decoders and
``cv::resize`` (INTER_LINEAR, fixed point on uint8), BGR channel order, NCHW float32 blobs.

Records are decoded and transformed in worker threads ahead of the consumer (a bounded queue
of ``prefetch`` batches, ``workers`` threads); ``next()`` returns them strictly in Caffe's
order whatever the threads' timing, and ``close()`` stops the threads.

Randomness (shuffles, TRAIN random crops, mirroring, ImageData's ``rand_skip``) is
deterministic from ``seed`` and has Caffe's distributions (uniform crop offsets in
``[0, H - crop]``, a fair coin for mirroring, uniform permutations), but it does **not**
reproduce Caffe's boost/std RNG streams bit for bit: the same seed gives the same batches
here, not Caffe's batches. Each
record's draws depend only on the seed and the record's position in the stream, so they do not
depend on thread timing, and ``skip(n)`` lands exactly where ``n`` calls of ``next()`` would.

Relative paths in a layer (``source``, ``root_folder``, ``mean_file``, the files an HDF5 list
names) are relative to the current directory, as in Caffe.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from converters import files
from converters.caffe_io import resolve_memory_budget
from converters.errors import CaffeFormatError
from converters.mean import load_mean
from converters.proto import caffe_pb2

#: The layer types ``open_data_layer`` reads.
DATA_LAYER_TYPES: frozenset[str] = frozenset({"HDF5Data", "ImageData", "Data"})

#: The seed used when the solver gives none (Caffe would draw one at random).
DEFAULT_SEED = 1701

PHASES = ("TRAIN", "TEST")

# Independent random streams, one per use: numpy SeedSequence entropy (seed, stream, ...).
_STREAM_SHUFFLE, _STREAM_SKIP, _STREAM_TRANSFORM = 1, 2, 3
_LABEL = re.compile(rb"[+-]?\d+\r?")
_INT32 = 2**31
_CHUNK = 1 << 16          # list lines parsed at once (bounds the parser's scratch memory)


class DataLayerError(CaffeFormatError):
    """A data layer's parameters, its source or one of its records is unusable."""


def _cv2():
    """OpenCV, imported on first use."""
    try:
        import cv2
    except ImportError:
        raise DataLayerError("ImageData and Data layers need OpenCV: pip install "
                             "'fcn-jax[data]' (opencv-python-headless)") from None
    return cv2


# ----------------------------------------------------------------------------- transform


def _phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"phase must be 'TRAIN' or 'TEST', got {phase!r}")
    return phase


def _mean_values(tp, channels: int) -> np.ndarray | None:
    values = list(tp.mean_value)
    if not values:
        return None
    if len(values) not in (1, channels):
        raise DataLayerError(f"{len(values)} mean_value for {channels} channels: specify "
                             f"either 1 mean_value or as many as channels",
                             field="transform_param.mean_value")
    return np.array(values * channels if len(values) == 1 else values, dtype=np.float32)


def _apply(values: np.ndarray, layout: str, tp, phase: str, mean: np.ndarray | None,
           rng: np.random.Generator | None, out: np.ndarray | None = None) -> np.ndarray:
    """``transform_chw`` / ``transform`` on an array in ``layout`` ("CHW" or "HWC"), written
    into ``out`` (a batch's slot) when given."""
    _phase(phase)
    if values.ndim != 3:
        raise ValueError(f"expected a ({', '.join(layout)}) array, got shape {values.shape}")
    hwc = layout == "HWC"
    height, width, channels = values.shape if hwc else values.shape[1:] + values.shape[:1]
    crop = int(tp.crop_size)
    if channels <= 0:
        raise DataLayerError("a record with 0 channels", field="channels")
    if height < crop or width < crop:
        raise DataLayerError(f"image {height}x{width} is smaller than crop_size {crop}",
                             field="transform_param.crop_size")
    if tp.HasField("mean_file") and tp.mean_value:
        raise DataLayerError("cannot specify mean_file and mean_value at the same time",
                             field="transform_param")
    if tp.HasField("mean_file") and mean is None:
        raise ValueError("transform_param has a mean_file: pass its blob as mean= "
                         "(read_transform_mean reads it)")
    mean_values = _mean_values(tp, channels)
    if mean is not None and tuple(mean.shape) != (channels, height, width):
        raise DataLayerError(f"mean of shape {tuple(mean.shape)} does not match the image's "
                             f"{(channels, height, width)} (Caffe needs equal channels, height, "
                             f"width)", field="transform_param.mean_file")
    needs_rand = tp.mirror or (crop and phase == "TRAIN")
    if needs_rand and rng is None:
        raise ValueError("mirror or a TRAIN crop needs rng= (a numpy Generator)")
    # Caffe's order of draws: the mirror coin, then the row offset, then the column offset
    do_mirror = bool(tp.mirror) and bool(rng.integers(2))
    h_off = w_off = 0
    out_h, out_w = height, width
    if crop:
        out_h = out_w = crop
        if phase == "TRAIN":
            h_off = int(rng.integers(height - crop + 1))
            w_off = int(rng.integers(width - crop + 1))
        else:
            h_off = (height - crop) // 2
            w_off = (width - crop) // 2
    rows, cols = slice(h_off, h_off + out_h), slice(w_off, w_off + out_w)
    # float32 throughout, one operation at a time as Caffe's loop: (value - mean) * scale
    if hwc:
        x = values[rows, cols].astype(np.float32)
        if mean is not None:
            np.subtract(x, np.asarray(mean, np.float32)[:, rows, cols].transpose(1, 2, 0), out=x)
        elif mean_values is not None:
            np.subtract(x, mean_values, out=x)
        np.multiply(x, np.float32(tp.scale), out=x)
        x = x.transpose(2, 0, 1)
    else:
        x = values[:, rows, cols].astype(np.float32)
        if mean is not None:
            np.subtract(x, np.asarray(mean, np.float32)[:, rows, cols], out=x)
        elif mean_values is not None:
            np.subtract(x, mean_values[:, None, None], out=x)
        np.multiply(x, np.float32(tp.scale), out=x)
    if do_mirror:
        x = x[:, :, ::-1]
    if out is not None:
        if out.shape != x.shape:
            raise DataLayerError(f"record gives {x.shape}, the batch's first gave {out.shape}")
        np.copyto(out, x)
        return out
    return np.ascontiguousarray(x, dtype=np.float32)


def transform_chw(values: np.ndarray, tp, *, phase: str = "TRAIN",
                  mean: np.ndarray | None = None,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Caffe's ``DataTransformer::Transform`` on one record in CHW order (a raw ``Datum``:
    uint8 ``data`` or float32 ``float_data``): crop (TRAIN: random offsets, TEST: the centre
    ``(H - crop) / 2``), ``(value - mean) * scale`` in float32 with the mean cropped by the same
    window (``mean``: the mean_file blob, (C, H, W)) or one ``mean_value`` per channel, then a
    mirror (width flipped) with probability 1/2 when ``mirror``, in either phase. ``rng``
    draws the mirror coin first, then the row and column offsets, as Caffe does; it is needed
    only when ``mirror`` is set or a TRAIN crop is taken. Returns (C, crop or H, crop or W)
    float32."""
    return _apply(np.asarray(values), "CHW", tp, phase, mean, rng)


def transform(image: np.ndarray, tp, *, phase: str = "TRAIN", mean: np.ndarray | None = None,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """Caffe's ``DataTransformer::Transform(cv::Mat)``: an OpenCV image (H, W, C) or (H, W),
    uint8 in BGR order, to a (C, H', W') float32 blob; see ``transform_chw`` for the
    arithmetic and the random draws."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataLayerError(f"image data type must be unsigned byte, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    return _apply(image, "HWC", tp, phase, mean, rng)


def read_transform_mean(tp, *, path: str | None = None) -> np.ndarray | None:
    """The mean blob of ``transform_param.mean_file`` (a BlobProto ``.binaryproto``) as
    float32 (C, H, W), as Caffe's ``Blob::FromProto`` holds it; None without a mean_file."""
    if not tp.HasField("mean_file"):
        return None
    if tp.mean_value:
        raise DataLayerError("cannot specify mean_file and mean_value at the same time",
                             path=path, field="transform_param")
    mean = load_mean(tp.mean_file)
    if mean.ndim != 3:
        raise DataLayerError(f"mean blob of shape {mean.shape}: expected (1, C, H, W)",
                             path=tp.mean_file)
    return mean.astype(np.float32)


def _out_shape(shape_chw: tuple[int, int, int], tp) -> tuple[int, int, int]:
    """``DataTransformer::InferBlobShape`` without the batch axis."""
    channels, height, width = shape_chw
    crop = int(tp.crop_size)
    if channels <= 0:
        raise DataLayerError("a record with 0 channels", field="channels")
    if height < crop or width < crop:
        raise DataLayerError(f"image {height}x{width} is smaller than crop_size {crop}",
                             field="transform_param.crop_size")
    return (channels, crop, crop) if crop else (channels, height, width)


def _read_source(path: str) -> bytes:
    """A list file's bytes, bounded: a regular file only (a FIFO never blocks), its size
    checked against the memory budget before reading."""
    budget = resolve_memory_budget()
    try:
        with files.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > budget:
                raise DataLayerError(f"file of {size} bytes exceeds the memory budget of "
                                     f"{budget} bytes", path=path)
            return bytes(files.read_exactly(f, size))
    except OSError as e:
        raise DataLayerError(f"cannot read: {e.strerror or e}", path=path) from None


# ----------------------------------------------------------------------------- base


def _failed(exc: BaseException) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_exception(exc)
    return fut


class BatchSource:
    """Batches of one data layer's top blobs, in Caffe's order.

    ``shapes()`` gives each top's shape with the batch axis, as the layer's setup reshapes
    it (Data and ImageData reshape each batch by its first record, so images of varying size
    without a crop give batches of varying shape, as in Caffe). ``next()`` returns the next
    batch (float32 arrays keyed by top name), ``skip(n)`` moves past ``n`` batches without
    decoding them, ``close()`` stops the worker threads. Usable as a context manager.
    """

    layer: str
    tops: tuple[str, ...]

    def __init__(self, layer: str, tops: tuple[str, ...], batch_size: int, *, seed: int,
                 prefetch: int, workers: int, path: str | None):
        if prefetch < 1 or workers < 1:
            raise ValueError(f"prefetch and workers must be >= 1, got {prefetch}, {workers}")
        self.layer, self.tops, self.batch_size = layer, tuple(tops), int(batch_size)
        self._seed, self._prefetch, self._path = int(seed), int(prefetch), path
        self._workers = int(workers)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: collections.deque = collections.deque()
        self._items = 0            # records taken so far (the position of the next one)
        self._broken: BaseException | None = None
        self._closed = False
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._share = (0, 1)       # (rank, count): keep records rank, rank+count, ...

    def share(self, rank: int, count: int) -> None:
        """Keep only records ``rank, rank + count, rank + 2 count, ...`` of the stream (Caffe's
        multi-GPU ``Skip`` rule: solver ``rank`` of ``count``), still ``batch_size`` per batch;
        the other records are stepped over without being decoded. Call before ``next()``."""
        if not 0 <= rank < count:
            raise ValueError(f"share {rank} of {count}")
        if self._items or self._pending:
            raise RuntimeError("share() must come before the first batch")
        self._share = (int(rank), int(count))

    def _take_share(self) -> tuple[list, int]:
        """This share's records of the next batch and the stream records they span."""
        rank, count = self._share
        if count == 1:
            records = self._take()
            return records, len(records)
        stream: list = []
        for _ in range(count):
            stream += self._take()
        return stream[rank::count], len(stream)

    # -- what each layer provides
    def _take(self) -> list:
        """The next batch's records (cheap: cursor steps, no decoding), cursor advanced."""
        raise NotImplementedError

    def _build(self, records: list, first: int) -> dict[str, np.ndarray]:
        """Decode and transform ``records`` (the first has stream position ``first``);
        runs in a worker thread."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close the layer's files (after the workers stopped)."""

    # -- shared machinery
    def _error(self, message: str, *, path: str | None = None, field: str | None = None,
               ) -> DataLayerError:
        return DataLayerError(message, path=path if path is not None else self._path,
                              layer=self.layer, field=field)

    def _rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, _STREAM_TRANSFORM, position])

    def _transform_batch(self, items: Iterable[tuple[np.ndarray, str, str]], n: int,
                         first: int, what: str, hint: str = "") -> np.ndarray:
        """``n`` decoded records ``(values, layout, field)`` through the layer's transformer
        (``self._tf``, layers with a ``transform_param``) into one float32 batch (record ``i``
        draws from stream position ``first + i``); a record whose transformed shape is not the
        first's is an error naming its field."""
        data = None
        for i, (values, layout, field) in enumerate(items):
            try:
                shape = self._tf.out_shape(_chw_shape(values) if layout == "HWC"
                                           else values.shape)
            except DataLayerError as e:
                raise self._error(e.reason, path=self._source, field=field) from None
            if data is None:
                data = np.empty((n, *shape), dtype=np.float32)
            elif shape != data.shape[1:]:
                raise self._error(f"{what} gives {shape}, the batch's first {what} gave "
                                  f"{data.shape[1:]}{hint}", path=self._source, field=field)
            self._tf.apply(values, layout, lambda i=i: self._rng(first + i), data[i])
        return data

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each top's shape including the batch axis, as Caffe's setup gives it."""
        return dict(self._shapes)

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch:
            if self._broken is not None:
                self._pending.append(_failed(self._broken))
                return
            first = self._items
            try:
                records, consumed = self._take_share()
            except Exception as e:  # noqa: BLE001 - reported at the batch it belongs to
                self._broken = e
                continue
            self._items += consumed
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._workers, thread_name_prefix=f"fcn-jax-data-{self.layer}")
            self._pending.append(self._pool.submit(self._build, records, first))

    def next(self) -> dict[str, np.ndarray]:
        """The next batch: float32 arrays keyed by top name, in the layer's top order."""
        if self._closed:
            raise RuntimeError(f"data layer {self.layer!r} is closed")
        self._fill()
        fut = self._pending.popleft()
        self._fill()
        return fut.result()

    def skip(self, n: int) -> None:
        """Advance by ``n`` batches (what ``n`` calls of ``next()`` would consume)."""
        if self._closed:
            raise RuntimeError(f"data layer {self.layer!r} is closed")
        if n < 0:
            raise ValueError(f"cannot skip {n} batches")
        while n and self._pending:
            self._pending.popleft().cancel()
            n -= 1
        for _ in range(n):
            if self._broken is not None:
                raise self._broken
            self._items += self._take_share()[1]

    def close(self) -> None:
        """Stop the worker threads and close the layer's files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._release()

    def __enter__(self) -> BatchSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


def _check_batch(batch_size: int, layer: str, path: str | None, field: str) -> int:
    if batch_size <= 0:
        raise DataLayerError("a positive batch size is required", path=path, layer=layer,
                             field=field)
    return int(batch_size)


def _deprecated(lp, param: str, path: str | None) -> None:
    """Caffe moves these V1 fields into transform_param only when upgrading V1 nets and
    ignores them in V2 layers: refuse them instead of guessing."""
    msg = getattr(lp, param)
    for name in ("scale", "mean_file", "crop_size", "mirror"):
        if msg.HasField(name):
            raise DataLayerError(f"{param}.{name} is deprecated (Caffe ignores it in a "
                                 f"'layer' block): put it in transform_param",
                                 path=path, layer=lp.name, field=f"{param}.{name}")


# ----------------------------------------------------------------------------- HDF5Data


class HDF5DataSource(BatchSource):
    """``HDF5Data``: ``source`` lists .h5 files (whitespace-separated, as Caffe's
    ``ifstream >>`` reads them); each top is the dataset of that name; rows are read in order,
    row by row across files, wrapping to the first file. ``shuffle`` permutes the files at
    setup and at each wrap, and the rows of a file when it is loaded and at each wrap of its
    rows (Caffe's ``LoadHDF5FileData`` and ``Next``). Each file is read whole, as Caffe does."""

    def __init__(self, lp, *, phase: str, seed: int, prefetch: int, workers: int,
                 path: str | None, memory_budget: int | None = None):
        p = lp.hdf5_data_param
        super().__init__(lp.name, tuple(lp.top), p.batch_size, seed=seed, prefetch=prefetch,
                         workers=workers, path=path)
        if lp.HasField("transform_param"):
            raise self._error("HDF5Data does not transform data (Caffe refuses "
                              "transform_param)", field="transform_param")
        if not self.tops:
            raise self._error("HDF5Data needs at least one top", field="top")
        _check_batch(p.batch_size, lp.name, path, "hdf5_data_param.batch_size")
        self._budget = resolve_memory_budget(memory_budget)
        self._shuffle = bool(p.shuffle)
        self._srng = np.random.default_rng([self._seed, _STREAM_SHUFFLE])
        self._source = p.source
        raw = self._read_list(p.source)
        self._files = [os.fsdecode(tok) for tok in raw.split()]
        if not self._files:
            raise self._error("lists no HDF5 file (must have at least 1)", path=p.source)
        self._file_perm = np.arange(len(self._files))
        if self._shuffle:
            self._srng.shuffle(self._file_perm)
        self._current_file = 0
        self._load(self._files[self._file_perm[0]])
        self._trailing = {t: a.shape[1:] for t, a in self._arrays.items()}
        self._shapes = {t: (self.batch_size, *self._trailing[t]) for t in self.tops}

    def _read_list(self, source: str) -> bytes:
        try:
            return _read_source(source)
        except DataLayerError as e:
            raise self._error(e.reason, path=source, field="hdf5_data_param.source") from None

    def _load(self, filename: str) -> None:
        try:
            import h5py
        except ImportError:
            raise self._error("HDF5Data needs h5py: pip install 'fcn-jax[data]'") from None

        arrays: dict[str, np.ndarray] = {}
        try:
            with files.open_regular(filename):
                pass
            f = h5py.File(filename, "r")
        except OSError as e:
            raise self._error(f"cannot open HDF5 file: {getattr(e, 'strerror', None) or e}",
                              path=filename) from None
        with f:
            rows = None
            for top in self.tops:
                try:
                    ds = f.get(top)
                except (KeyError, OSError, RuntimeError, ValueError):
                    ds = None
                if not isinstance(ds, h5py.Dataset):
                    raise self._error(f"no dataset {top!r} for top {top!r}", path=filename,
                                      field=top)
                if ds.ndim < 1:
                    raise self._error(f"dataset {top!r} is a scalar (needs at least 1 axis)",
                                      path=filename, field=top)
                if ds.dtype.kind not in "fiu":
                    raise self._error(f"dataset {top!r} has type {ds.dtype}: only float and "
                                      f"integer datasets are read", path=filename, field=top)
                need = int(np.prod(ds.shape, dtype=object)) * (4 + ds.dtype.itemsize)
                if need > self._budget:
                    raise self._error(f"dataset {top!r} of shape {ds.shape} needs {need} bytes, "
                                      f"over the memory budget of {self._budget}",
                                      path=filename, field=top)
                if rows is None:
                    rows = ds.shape[0]
                elif ds.shape[0] != rows:
                    raise self._error(f"dataset {top!r} has {ds.shape[0]} rows but "
                                      f"{self.tops[0]!r} has {rows}", path=filename, field=top)
                if hasattr(self, "_trailing") and ds.shape[1:] != self._trailing[top]:
                    raise self._error(f"dataset {top!r} has rows of shape {ds.shape[1:]}, the "
                                      f"first file's have {self._trailing[top]}",
                                      path=filename, field=top)
                try:
                    arrays[top] = np.asarray(ds[()], dtype=np.float32)
                except (OSError, RuntimeError, ValueError, TypeError) as e:
                    raise self._error(f"cannot read dataset {top!r}: {e}", path=filename,
                                      field=top) from None
        if not rows:
            raise self._error("the datasets have 0 rows", path=filename, field=self.tops[0])
        self._arrays, self._rows, self._filename = arrays, rows, filename
        self._row_perm = np.arange(rows)
        if self._shuffle:
            self._srng.shuffle(self._row_perm)
        self._current_row = 0

    def _advance(self) -> None:
        """Caffe's ``HDF5DataLayer::Next``."""
        self._current_row += 1
        if self._current_row == self._rows:
            if len(self._files) > 1:
                self._current_file += 1
                if self._current_file == len(self._files):
                    self._current_file = 0
                    if self._shuffle:
                        self._srng.shuffle(self._file_perm)
                self._load(self._files[self._file_perm[self._current_file]])
            self._current_row = 0
            if self._shuffle:
                self._srng.shuffle(self._row_perm)

    def _take(self) -> list:
        records = []
        for _ in range(self.batch_size):
            records.append((self._arrays, int(self._row_perm[self._current_row])))
            self._advance()
        return records

    def _build(self, records: list, first: int) -> dict[str, np.ndarray]:
        return {t: np.stack([arrays[t][row] for arrays, row in records]) for t in self.tops}

    def _release(self) -> None:
        self._arrays = {}


# ----------------------------------------------------------------------------- images


def _decode(buf: bytes | memoryview, flag: int):
    """``cv::imdecode``; None when OpenCV cannot decode the bytes."""
    cv2 = _cv2()
    if not len(buf):
        return None
    try:
        return cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), flag)
    except cv2.error:
        return None


def _as_hwc(img: np.ndarray) -> np.ndarray:
    return img[:, :, None] if img.ndim == 2 else img


def _chw_shape(hwc: np.ndarray) -> tuple[int, int, int]:
    return (hwc.shape[2], hwc.shape[0], hwc.shape[1])


class _Transformer:
    """A layer's ``DataTransformer``: its parameters, its mean and its phase."""

    def __init__(self, lp, phase: str, path: str | None):
        self.tp = lp.transform_param
        self.phase = phase
        if self.tp.HasField("mean_file") and self.tp.mean_value:
            raise DataLayerError("cannot specify mean_file and mean_value at the same time",
                                 path=path, layer=lp.name, field="transform_param")
        if self.tp.force_color and self.tp.force_gray:
            raise DataLayerError("cannot set both force_color and force_gray", path=path,
                                 layer=lp.name, field="transform_param")
        try:
            self.mean = read_transform_mean(self.tp, path=path)
        except CaffeFormatError as e:
            raise e.with_context(layer=lp.name, field="transform_param.mean_file") from None
        self.needs_rand = bool(self.tp.mirror) or bool(self.tp.crop_size and phase == "TRAIN")

    def out_shape(self, shape_chw: tuple[int, int, int]) -> tuple[int, int, int]:
        if self.mean is not None and self.mean.shape != tuple(shape_chw):
            raise DataLayerError(f"mean of shape {self.mean.shape} does not match the image's "
                                 f"{tuple(shape_chw)}", field="transform_param.mean_file")
        _mean_values(self.tp, shape_chw[0])
        return _out_shape(shape_chw, self.tp)

    def apply(self, values: np.ndarray, layout: str, rng: Callable[[], np.random.Generator],
              out: np.ndarray) -> np.ndarray:
        return _apply(values, layout, self.tp, self.phase, self.mean,
                      rng() if self.needs_rand else None, out)


def _parse_list(data: bytes, error: Callable[[str, int], Exception],
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ImageData list's lines ``path label``, split at the last space (Caffe's
    ``find_last_of(' ')``): the byte offsets where each path starts and ends and the int32
    labels. Vectorized in chunks of lines, so a list of millions of lines costs its bytes
    plus 24 bytes a line. ``error(message, line_number)`` makes the exception for a bad line
    (no space, an empty path, a label that is not a decimal int32)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    if len(data) and data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    spaces = np.flatnonzero(arr == 32)
    if len(spaces):
        k = np.searchsorted(spaces, ends) - 1
        cuts = np.where(k >= 0, spaces[np.maximum(k, 0)], -1)
    else:
        cuts = np.full(len(ends), -1, dtype=np.int64)
    labels = np.empty(len(ends), dtype=np.int64)

    def check_line(i: int) -> None:  # the slow, exact check of one line, for the message
        if cuts[i] < starts[i]:
            raise error("no label (expected 'path label')", i + 1)
        token = data[cuts[i] + 1:ends[i]]
        if not _LABEL.fullmatch(token) or not -_INT32 <= int(token) < _INT32:
            raise error(f"label {token[:40]!r} is not an int32", i + 1)
        if cuts[i] == starts[i]:
            raise error("empty path", i + 1)

    pow10 = 10 ** np.arange(12, dtype=np.int64)
    for lo in range(0, len(ends), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        c, e, s = cuts[sl], ends[sl].copy(), starts[sl]
        ok = (c > s)
        e -= (e > c + 1) & (arr[np.maximum(e - 1, 0)] == 13)          # a trailing CR
        sign = np.where(ok, arr[np.minimum(c + 1, len(arr) - 1)], 0)
        signed = (sign == 43) | (sign == 45)
        first = c + 1 + signed
        width = e - first
        ok &= (width >= 1) & (width <= 11)
        pos = first[:, None] + np.arange(11)[None, :]
        inside = pos < e[:, None]
        digits = arr[np.minimum(pos, len(arr) - 1)].astype(np.int64) - 48
        ok &= np.all(~inside | ((digits >= 0) & (digits <= 9)), axis=1)
        # right-align each token's digits: the value is sum(digit * 10^(width - 1 - j))
        exps = np.clip(width[:, None] - 1 - np.arange(11)[None, :], 0, 11)
        value = np.sum(np.where(inside, digits * pow10[exps], 0), axis=1)
        value = np.where(sign == 45, -value, value)
        ok &= (value >= -_INT32) & (value < _INT32)
        if not ok.all():
            check_line(lo + int(np.flatnonzero(~ok)[0]))
            raise AssertionError("unreachable: a line the vectorized parser refused passed")
        labels[sl] = value
    return starts, cuts.astype(np.int64), labels


class ImageDataSource(BatchSource):
    """``ImageData``: ``source`` lists ``path label`` lines (split at the last space, so paths
    may hold spaces); images are read from ``root_folder + path`` with OpenCV (color, or
    grayscale when ``is_color: false``), resized to ``new_height x new_width`` by
    ``cv::resize`` (INTER_LINEAR) when both are set, then transformed. ``shuffle`` permutes
    the lines at setup and at each wrap; ``rand_skip`` starts at a random line below it.
    The list is held as its bytes and line offsets; images are read only when batched."""

    def __init__(self, lp, *, phase: str, seed: int, prefetch: int, workers: int,
                 path: str | None):
        p = lp.image_data_param
        super().__init__(lp.name, tuple(lp.top), p.batch_size, seed=seed, prefetch=prefetch,
                         workers=workers, path=path)
        _cv2()
        if len(self.tops) != 2:
            raise self._error(f"ImageData needs exactly 2 tops (data, label), got "
                              f"{len(self.tops)}", field="top")
        _deprecated(lp, "image_data_param", path)
        _check_batch(p.batch_size, lp.name, path, "image_data_param.batch_size")
        if not ((p.new_height == 0 and p.new_width == 0) or
                (p.new_height > 0 and p.new_width > 0)):
            raise self._error("new_height and new_width must be set together",
                              field="image_data_param.new_height")
        self._new_hw = (int(p.new_height), int(p.new_width))
        self._flag = _cv2().IMREAD_COLOR if p.is_color else _cv2().IMREAD_GRAYSCALE
        self._root = os.fsencode(p.root_folder)
        self._source = p.source
        self._tf = _Transformer(lp, phase, path)
        self._parse(p.source)
        n = len(self._labels)
        self._order = np.arange(n)
        self._shuffle = bool(p.shuffle)
        self._srng = np.random.default_rng([self._seed, _STREAM_SHUFFLE])
        if self._shuffle:
            self._srng.shuffle(self._order)
        self._cursor = 0
        if p.rand_skip:
            skip = int(np.random.default_rng([self._seed, _STREAM_SKIP]).integers(p.rand_skip))
            if skip >= n:
                raise self._error(f"not enough lines ({n}) to skip {skip}", path=p.source,
                                  field="image_data_param.rand_skip")
            self._cursor = skip
        index = int(self._order[self._cursor])
        try:
            c, h, w = self._tf.out_shape(_chw_shape(_as_hwc(self._read(index))))
        except DataLayerError as e:
            if e.layer is not None:
                raise
            raise self._error(e.reason, path=self._source, field=f"line {index + 1}") from None
        self._shapes = {self.tops[0]: (self.batch_size, c, h, w),
                        self.tops[1]: (self.batch_size,)}

    def _parse(self, source: str) -> None:
        try:
            data = _read_source(source)
        except DataLayerError as e:
            raise self._error(e.reason, path=source, field="image_data_param.source") from None
        starts, cuts, labels = _parse_list(data, lambda message, line: self._error(
            message, path=source, field=f"line {line}"))
        if not len(labels):
            raise self._error("lists no image", path=source, field="image_data_param.source")
        self._list, self._starts, self._cuts, self._labels = data, starts, cuts, labels

    def _read(self, index: int) -> np.ndarray:
        """``ReadImageToCVMat(root_folder + path, new_height, new_width, is_color)``."""
        cv2 = _cv2()
        rel = self._list[self._starts[index]:self._cuts[index]]
        full = self._root + rel
        where = f"line {index + 1}"
        try:
            with files.open_regular(full) as f:
                size = os.fstat(f.fileno()).st_size
                budget = resolve_memory_budget()
                if size > budget:
                    raise self._error(f"image file of {size} bytes exceeds the memory budget",
                                      path=os.fsdecode(full), field=where)
                buf = files.read_exactly(f, size)
        except OSError as e:
            raise self._error(f"cannot read image {os.fsdecode(full)!r}: "
                              f"{e.strerror or e}", path=self._source, field=where) from None
        img = _decode(buf, self._flag)
        if img is None:
            raise self._error(f"cannot decode image {os.fsdecode(full)!r}", path=self._source,
                              field=where)
        if self._new_hw[0] > 0:
            img = cv2.resize(img, (self._new_hw[1], self._new_hw[0]))
        return img

    def _take(self) -> list:
        records = []
        n = len(self._labels)
        for _ in range(self.batch_size):
            records.append(int(self._order[self._cursor]))
            self._cursor += 1
            if self._cursor >= n:
                self._cursor = 0
                if self._shuffle:
                    self._srng.shuffle(self._order)
        return records

    def _build(self, records: list, first: int) -> dict[str, np.ndarray]:
        data = self._transform_batch(
            ((_as_hwc(self._read(index)), "HWC", f"line {index + 1}") for index in records),
            len(records), first, "image", " (set crop_size or new_height/new_width)")
        labels = self._labels[np.array(records)].astype(np.float32)
        return {self.tops[0]: data, self.tops[1]: labels}

    def _release(self) -> None:
        self._list = b""


# ----------------------------------------------------------------------------- Data (LMDB)


class LMDBDataSource(BatchSource):
    """``Data`` with ``backend: LMDB``: ``Datum`` records in the database's key order (an
    LMDB cursor), wrapping to the first key. A raw Datum holds ``channels x height x width``
    uint8 ``data`` (CHW) or ``float_data``; an encoded one holds an image file, decoded as
    Caffe's ``DecodeDatumToCVMatNative`` (``cv::imdecode`` unchanged) or, with
    ``transform_param.force_color`` / ``force_gray`` (or ``data_param.force_encoded_color``,
    in color / grayscale. ``data_param.rand_skip`` and ``force_encoded_color`` are ignored
    with a warning, as Caffe 1.0's DataLayer ignores them (pre-1.0 fields)."""

    def __init__(self, lp, *, phase: str, seed: int, prefetch: int, workers: int,
                 path: str | None):
        p = lp.data_param
        super().__init__(lp.name, tuple(lp.top), p.batch_size, seed=seed, prefetch=prefetch,
                         workers=workers, path=path)
        self._env = self._txn = self._cursor = None
        if len(self.tops) not in (1, 2):
            raise self._error(f"Data has 1 or 2 tops (data, label), got {len(self.tops)}",
                              field="top")
        _deprecated(lp, "data_param", path)
        _check_batch(p.batch_size, lp.name, path, "data_param.batch_size")
        if p.backend != caffe_pb2.DataParameter.LMDB:
            raise self._error("backend LEVELDB is not supported: convert the database to LMDB "
                              "(e.g. convert_imageset --backend=lmdb) and set backend: LMDB",
                              field="data_param.backend")
        self._tf = _Transformer(lp, phase, path)
        tp = self._tf.tp
        self._force = "color" if tp.force_color else "gray" if tp.force_gray else None
        for name, instead in (("rand_skip", "every record is read from the first key"),
                              ("force_encoded_color", "use transform_param.force_color")):
            if getattr(p, name):
                where = f"{path}: " if path else ""
                warnings.warn(f"{where}layer {lp.name!r}: data_param.{name} is ignored, as "
                              f"Caffe 1.0's Data layer ignores it ({instead})", stacklevel=4)
        self._source = p.source
        self._open(p.source)
        try:
            key, value = self._cursor.item()
            values, layout, _ = self._values(key, value)
            try:
                c, h, w = self._tf.out_shape(_chw_shape(values) if layout == "HWC"
                                             else values.shape)
            except DataLayerError as e:
                raise self._error(e.reason, path=self._source, field=f"key {key[:80]!r}") \
                    from None
        except BaseException:
            self._release()
            raise
        self._shapes = {self.tops[0]: (self.batch_size, c, h, w)}
        if len(self.tops) == 2:
            self._shapes[self.tops[1]] = (self.batch_size,)

    def _open(self, source: str) -> None:
        try:
            import lmdb
        except ImportError:
            raise self._error("Data layers with backend LMDB need the lmdb package: pip "
                              "install 'fcn-jax[data]'") from None
        if not os.path.isdir(source) or not os.path.isfile(os.path.join(source, "data.mdb")):
            raise self._error("no LMDB database here (a folder holding data.mdb)",
                              path=source, field="data_param.source")
        try:
            self._env = lmdb.open(source, readonly=True, lock=False, readahead=False,
                                  max_readers=1, subdir=True, create=False)
            self._txn = self._env.begin(buffers=False)
            self._cursor = self._txn.cursor()
            if not self._cursor.first():
                raise self._error("the database is empty", path=source,
                                  field="data_param.source")
        except lmdb.Error as e:
            self._release()
            raise self._error(f"cannot read LMDB: {e}", path=source,
                              field="data_param.source") from None
        except DataLayerError:
            self._release()
            raise

    def _next_key(self) -> None:
        if not self._cursor.next():
            self._cursor.first()

    def _values(self, key: bytes, value: bytes) -> tuple[np.ndarray, str, int]:
        """The Datum at ``key``: its values (an encoded image as OpenCV decodes it, (H, W, C)
        uint8; raw ``data`` (C, H, W) uint8; ``float_data`` (C, H, W) float32), their layout
        and the label."""
        where = f"key {key[:80]!r}"
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(value)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise self._error(f"not a valid Datum ({type(e).__name__})", path=self._source,
                              field=where) from None
        if datum.encoded:
            cv2 = _cv2()
            flag = {"color": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE,
                    None: cv2.IMREAD_UNCHANGED}[self._force]
            img = _decode(datum.data, flag)
            if img is None:
                raise self._error("cannot decode the encoded image", path=self._source,
                                  field=where)
            if img.dtype != np.uint8:
                raise self._error(f"image data type must be unsigned byte, got {img.dtype}",
                                  path=self._source, field=where)
            return _as_hwc(img), "HWC", datum.label
        c, h, w = datum.channels, datum.height, datum.width
        if c <= 0 or h <= 0 or w <= 0:
            raise self._error(f"channels x height x width = {c} x {h} x {w}: each must be "
                              f"positive", path=self._source, field=where)
        count = c * h * w
        if datum.data:
            if len(datum.data) != count:
                raise self._error(f"data holds {len(datum.data)} bytes but {c} x {h} x {w} "
                                  f"needs {count}", path=self._source, field=where)
            return np.frombuffer(datum.data, np.uint8).reshape(c, h, w), "CHW", datum.label
        if len(datum.float_data) != count:
            raise self._error(f"float_data holds {len(datum.float_data)} values but "
                              f"{c} x {h} x {w} needs {count}", path=self._source, field=where)
        values = np.fromiter(datum.float_data, dtype=np.float32, count=count)
        return values.reshape(c, h, w), "CHW", datum.label

    def _take(self) -> list:
        records = []
        for _ in range(self.batch_size):
            records.append(self._cursor.item())
            self._next_key()
        return records

    def _build(self, records: list, first: int) -> dict[str, np.ndarray]:
        labels = np.empty(len(records), dtype=np.float32)

        def items():
            for i, (key, value) in enumerate(records):
                values, layout, labels[i] = self._values(key, value)
                yield values, layout, f"key {key[:80]!r}"

        data = self._transform_batch(items(), len(records), first, "record")
        out = {self.tops[0]: data}
        if len(self.tops) == 2:
            out[self.tops[1]] = labels
        return out

    def _release(self) -> None:
        if self._txn is not None:
            self._txn.abort()
        if self._env is not None:
            self._env.close()
        self._env = self._txn = self._cursor = None


# ----------------------------------------------------------------------------- entry


_SOURCES = {"HDF5Data": HDF5DataSource, "ImageData": ImageDataSource, "Data": LMDBDataSource}


def open_data_layer(lp, *, phase: str = "TRAIN", seed: int | None = None, prefetch: int = 4,
                    workers: int = 2, path: str | None = None,
                    share: tuple[int, int] = (0, 1)) -> BatchSource:
    """The ``BatchSource`` of one data layer (a ``caffe_pb2.LayerParameter`` of a type in
    ``DATA_LAYER_TYPES``). Relative paths in the layer are relative to the current
    directory, as in Caffe; ``path`` (the prototxt) only names the net in errors. ``seed``
    (the solver's ``random_seed``; None: ``DEFAULT_SEED``) drives shuffles, random crops,
    mirrors and ImageData's ``rand_skip``, deterministically but not with Caffe's RNG
    streams. ``share=(rank, count)``: see :meth:`BatchSource.share` (several processes)."""
    _phase(phase)
    if lp.type not in _SOURCES:
        raise DataLayerError(f"type {lp.type!r} is not a data layer read here (types: "
                             f"{', '.join(sorted(DATA_LAYER_TYPES))})", path=path,
                             layer=lp.name, field="type")
    src = _SOURCES[lp.type](lp, phase=phase, seed=DEFAULT_SEED if seed is None else seed,
                            prefetch=prefetch, workers=workers, path=path)
    if share != (0, 1):
        src.share(*share)
    return src


__all__ = ["DATA_LAYER_TYPES", "DEFAULT_SEED", "BatchSource", "DataLayerError",
           "HDF5DataSource", "ImageDataSource", "LMDBDataSource", "open_data_layer",
           "read_transform_mean", "transform", "transform_chw"]
