"""Caffe weights as safetensors: ``"{layer}/{blob}"`` tensors in Caffe's shapes (float32),
with the net's prototxt text and the source caffemodel's sha256 in the file's metadata.

Any safetensors reader takes the file (``safetensors.torch.load_file``,
``safetensors.numpy.load_file``, ...); ``load_safetensors`` reads it back memory-mapped into
``params[layer][blob]``, strictly: every problem is a one-line ``CaffeFormatError`` naming the
file and the tensor. NumPy and the ``safetensors`` package only; no JAX.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .caffe_io import MEMORY_BUDGET_ENV, format_prototxt, read_prototxt, resolve_memory_budget
from .errors import CaffeFormatError
from .files import atomic_write_bytes, open_regular

PathLike = str | os.PathLike
Params = dict[str, dict[str, np.ndarray]]

#: ``metadata["format"]`` of files written here.
FORMAT = "fcn-jax/caffe-weights/1"
#: safetensors' own cap on the JSON header (100 MB).
_MAX_HEADER = 100_000_000


def _sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save_safetensors(path: PathLike, params: Mapping[str, Mapping[str, Any]], net: Any = None,
                     *, source: PathLike | None = None,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``params`` as ``"{layer}/{blob}"`` float32 tensors, atomically.

    ``net`` (a NetParameter or a prototxt path) is stored as prototxt text in
    ``metadata["prototxt"]``; ``source`` (the caffemodel converted) as its file name and
    ``metadata["source_sha256"]``. ``metadata`` adds string entries.
    """
    atomic_write_bytes(path, safetensors_bytes(params, net, source=source, metadata=metadata))


def safetensors_bytes(params: Mapping[str, Mapping[str, Any]], net: Any = None, *,
                      source: PathLike | None = None,
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes ``save_safetensors`` writes (to write them with other files as a group)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for layer, blobs in params.items():
        for blob, value in blobs.items():
            if "/" in blob or not blob:
                raise ValueError(f"layer {layer!r}: blob name {blob!r} cannot hold '/'")
            tensors[f"{layer}/{blob}"] = np.ascontiguousarray(np.asarray(value, np.float32))
    meta = {"format": FORMAT}
    if net is not None:
        if isinstance(net, (str, os.PathLike)):
            net = read_prototxt(net)
        meta["prototxt"] = format_prototxt(net)
    if source is not None:
        meta["source"] = os.path.basename(os.fspath(source))
        meta["source_sha256"] = _sha256(source)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return save(tensors, metadata=meta)


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header size, then ``{``)."""
    try:
        with open_regular(path) as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(_MAX_HEADER, size - 8)


def _open(path: PathLike, budget: int):
    from safetensors import SafetensorError, safe_open

    try:
        with open_regular(path) as f:  # a FIFO or device is refused before safe_open
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    if size > budget:
        raise CaffeFormatError(f"file of {size} bytes exceeds the memory budget of {budget} "
                               f"bytes (set {MEMORY_BUDGET_ENV} to raise it)", path=path)
    try:
        return safe_open(os.fspath(path), framework="np")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CaffeFormatError(f"not a valid safetensors file ({reason})", path=path) from None


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (``prototxt``, ``source_sha256``, ...)."""
    with _open(path, resolve_memory_budget(None)) as f:
        return dict(f.metadata() or {})


def load_safetensors(path: PathLike, *, memory_budget: int | None = None) -> Params:
    """Read ``params[layer][blob]`` from a safetensors file of ``"{layer}/{blob}"`` tensors
    (layer names may hold ``/``; the blob is after the last one), memory-mapped.

    A malformed file, a name without ``/``, or a non-float tensor raises ``CaffeFormatError``;
    whether names and shapes fit a net is checked by ``load_caffe``, as for a caffemodel.
    """
    from safetensors import SafetensorError

    budget = resolve_memory_budget(memory_budget)
    params: Params = {}
    with _open(path, budget) as f:
        for name in f.keys():
            layer, sep, blob = name.rpartition("/")
            if not sep or not layer or not blob:
                raise CaffeFormatError("tensor name is not '{layer}/{blob}'", path=path,
                                       field=repr(name))
            try:
                arr = f.get_tensor(name)
            except (SafetensorError, ValueError, TypeError, AttributeError, KeyError) as e:
                # AttributeError: a dtype NumPy lacks (F8_E4M3, ...) in safetensors.numpy
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CaffeFormatError(f"unreadable tensor ({type(e).__name__}: {reason}); "
                                       "Caffe weights are float32", path=path, layer=layer,
                                       field=blob) from None
            if arr.dtype.kind != "f":
                raise CaffeFormatError(f"dtype {arr.dtype} is not a float", path=path,
                                       layer=layer, field=blob)
            params.setdefault(layer, {})[blob] = arr
    return params


__all__ = ["FORMAT", "is_safetensors", "load_safetensors", "safetensors_bytes",
           "safetensors_metadata", "save_safetensors"]
