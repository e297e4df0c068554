"""Mean files: Caffe's ``.binaryproto`` (one serialized ``BlobProto``) and pycaffe's ``.npy``.

A binaryproto is read exactly as a caffemodel's blobs are (``caffe_io``): the file through
the bounded reader (size checked against protobuf's limit and the memory budget before a
byte is read, only regular files), parsed with the fast schema (packed payloads as
``bytes``, viewed without a per-element copy) or, for unusual encodings such as unpacked
floats, with Caffe's exact schema (whose repeated floats take 4 bytes each, not a Python
object each); wire-type checks, the shape rules of ``Blob::FromProto`` (legacy 4-D dims win,
``double_data`` wins) and the memory budget are the caffemodel reader's. Errors are
``CaffeFormatError`` naming the file and the field.
"""

from __future__ import annotations

import os
import re

import numpy as np
from google.protobuf import message as pb_message

from . import files
from .caffe_io import (
    blob_dims,
    blob_to_array,
    check_blob_dims,
    check_wire_types,
    read_file,
    resolve_memory_budget,
)
from .errors import CaffeFormatError
from .proto import caffe_pb2

PathLike = str | os.PathLike
_NPY_MAGIC = b"\x93NUMPY"


def _parse(schema, raw: bytes, path: PathLike):
    blob = schema.BlobProto()
    try:
        blob.ParseFromString(raw)
    except (pb_message.DecodeError, RuntimeError, ValueError, RecursionError) as e:
        reason = re.sub(r"^Error parsing message with type '[\w.]+': ", "", str(e))
        reason = reason or type(e).__name__
        raise CaffeFormatError(f"not a valid BlobProto (truncated or corrupt: {reason})",
                               path=path) from None
    return blob


def parse_binaryproto(raw: bytes | bytearray, path: PathLike = "<bytes>", *,
                      memory_budget: int | None = None) -> np.ndarray:
    """Decode a serialized ``caffe.BlobProto`` into its values in its stored shape:
    float64 from ``double_data`` when present (Caffe's rule), else float32 from ``data``.
    The shape is the legacy ``(num, channels, height, width)`` when any of those is set,
    else ``shape.dim``."""
    budget = resolve_memory_budget(memory_budget)
    # Caffe's exact schema: protobuf's rules for repeated and split fields, as in Caffe
    # (a mean is small; its repeated floats are stored 4 bytes each, never as a list)
    blob = _parse(caffe_pb2, bytes(raw), path)
    check_wire_types(blob, path)
    dims = blob_dims(blob)
    if not dims:
        raise CaffeFormatError("no shape (neither shape.dim nor num/channels/height/width)",
                               path=path, field="shape")
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    field = "num/channels/height/width" if legacy else "shape.dim"
    count = check_blob_dims(dims, path=path, layer=None, field=field, memory_budget=budget)
    if not len(blob.double_data) and not len(blob.data):  # NVIDIA Caffe's raw_data
        return blob_to_array(blob, path=path, layer=None, field=field,
                             memory_budget=budget).reshape(dims)
    use_double = len(blob.double_data) > 0
    values = blob.double_data if use_double else blob.data
    name, dtype = ("double_data", "<f8") if use_double else ("data", "<f4")
    width = np.dtype(dtype).itemsize
    if isinstance(values, bytes):
        if len(values) % width:
            raise CaffeFormatError(f"length {len(values)} is not a multiple of {width}",
                                   path=path, field=name)
        size = len(values) // width
    else:
        size = len(values)
    if size != count:
        raise CaffeFormatError(f"holds {size} values but its shape {dims} needs {count}",
                               path=path, field=name)
    if isinstance(values, bytes):
        arr = np.frombuffer(values, dtype=dtype).astype(dtype[1:])
    else:  # Caffe's exact schema: repeated floats, converted one by one, never a list
        arr = np.fromiter(values, dtype=dtype[1:], count=size)
    return arr.reshape(dims)


def read_binaryproto(path: PathLike, *, memory_budget: int | None = None) -> np.ndarray:
    """Read a ``.binaryproto`` file (see ``parse_binaryproto``)."""
    budget = resolve_memory_budget(memory_budget)
    return parse_binaryproto(read_file(path, budget), path, memory_budget=budget)


def load_mean(path: PathLike, *, memory_budget: int | None = None) -> np.ndarray:
    """A mean from a ``.npy`` file or a Caffe ``.binaryproto``, as float64.

    The format is detected from the content (NumPy magic), not the suffix. A blob with the
    legacy 4-D shape ``(1, C, H, W)`` is returned as ``(C, H, W)``. Means must be real
    numbers: boolean and complex arrays are refused (Caffe's blobs are float), as are
    empty ones.
    """
    from .npy import load_npy

    budget = resolve_memory_budget(memory_budget)
    try:
        with files.open_regular(path) as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    if magic == _NPY_MAGIC:
        arr = load_npy(path, memory_budget=budget)
        if arr.dtype.kind not in "iuf":
            raise CaffeFormatError(f"a mean must hold real numbers, got dtype {arr.dtype}",
                                   path=path)
    else:
        arr = read_binaryproto(path, memory_budget=budget)
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise CaffeFormatError(f"mean blob has num={arr.shape[0]}, expected 1",
                                       path=path, field="num")
            arr = arr[0]
    if arr.size == 0:
        raise CaffeFormatError(f"empty mean (shape {arr.shape})", path=path)
    if arr.size * 8 > budget:
        raise CaffeFormatError(f"a mean of shape {arr.shape} needs {arr.size * 8} bytes as "
                               f"float64, over the memory budget of {budget}", path=path)
    return arr.astype(np.float64)


__all__ = ["load_mean", "parse_binaryproto", "read_binaryproto"]
