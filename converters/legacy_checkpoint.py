"""Reader for the weights files of older fcn-jax (format ``fcn-jax/2``, ``fcn-jax convert -o
x.msgpack``), so that they keep loading; new files are safetensors (``converters.
save_safetensors``), training checkpoints Orbax (``fcn_jax.train``).

Layout: ``b"FCNJAX\\x00\\x02"``, sha256(payload) (32 bytes), payload = msgpack ``{"format":
"fcn-jax/2", "meta": {...}, "tree": pytree}``, arrays as msgpack extension 1 (3: a numpy
scalar) holding ``(shape, dtype name, C-order bytes)``. Read strictly: checksum, bounded
containers, numeric dtypes, byte counts that match shapes; every problem is a one-line
``CaffeFormatError``. No JAX, no pickle.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import numpy as np

from .caffe_io import resolve_memory_budget
from .errors import CaffeFormatError
from .files import open_regular

MAGIC = b"FCNJAX\x00\x02"
FORMAT = "fcn-jax/2"
#: Most dict entries + list items a file may hold (bounds memory on hostile files).
MAX_ITEMS = 1 << 24
_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64"}


def is_legacy_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the ``fcn-jax/2`` magic."""
    try:
        with open_regular(path) as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def load_legacy_checkpoint(path: str | os.PathLike, *, max_bytes: int | None = None
                           ) -> tuple[Any, dict]:
    """``(tree, meta)`` of an ``fcn-jax/2`` file; files over ``max_bytes`` (default: the
    memory budget) are refused unread."""
    limit = resolve_memory_budget(max_bytes)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise CaffeFormatError(f"file of {size} bytes exceeds the limit of {limit}",
                                       path=path)
            raw = f.read(limit + 1)
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    return parse_legacy_checkpoint(raw, path)


def parse_legacy_checkpoint(raw: bytes, path: str | os.PathLike = "<bytes>"
                            ) -> tuple[Any, dict]:
    """``load_legacy_checkpoint`` on bytes in memory."""
    import msgpack

    header = len(MAGIC) + 32
    if raw[:len(MAGIC)] != MAGIC or len(raw) < header:
        raise CaffeFormatError(f"not a valid checkpoint (no {FORMAT} header)", path=path)
    payload = memoryview(raw)[header:]
    if hashlib.sha256(payload).digest() != raw[len(MAGIC):header]:
        raise CaffeFormatError("checksum mismatch: the file is corrupt or truncated",
                               path=path, field="sha256")
    count = [0]

    def counted(items):
        count[0] += len(items)
        if count[0] > MAX_ITEMS:
            raise CaffeFormatError(f"more than {MAX_ITEMS} entries", path=path, field="tree")
        return items

    n = len(payload)
    try:
        obj = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, ext_hook=lambda c, d: _array(c, d, path),
            object_pairs_hook=lambda kv: dict(counted(kv)), list_hook=counted,
            max_str_len=n, max_bin_len=n, max_ext_len=n, max_array_len=min(n, MAX_ITEMS),
            max_map_len=min(n, MAX_ITEMS))
    except CaffeFormatError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError,
            msgpack.UnpackException) as e:
        raise CaffeFormatError(f"not a valid checkpoint (corrupt: {type(e).__name__})",
                               path=path) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or \
            not isinstance(obj.get("tree"), dict) or not isinstance(obj.get("meta", {}), dict):
        raise CaffeFormatError(f"not an fcn-jax checkpoint (expected format {FORMAT!r})",
                               path=path, field="format")
    return obj["tree"], obj.get("meta") or {}


def _array(code: int, data: bytes, path) -> Any:
    import msgpack

    if code not in (1, 3):
        raise CaffeFormatError(f"unknown msgpack extension type {code}", path=path)
    try:
        shape, name, buffer = msgpack.unpackb(data, raw=True, max_array_len=32, max_map_len=0,
                                              max_bin_len=len(data), max_str_len=64)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise CaffeFormatError(f"bad array header ({type(e).__name__})", path=path) from None
    name = name.decode("ascii", "replace") if isinstance(name, bytes) else None
    if name not in _DTYPES:
        raise CaffeFormatError(f"array dtype {str(name)[:40]} is not numeric", path=path)
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CaffeFormatError(f"bad array shape {str(shape)[:80]}", path=path)
    dtype = np.dtype(name)
    if not isinstance(buffer, bytes) or math.prod(shape) * dtype.itemsize != len(buffer):
        raise CaffeFormatError(f"array of shape {tuple(shape)} and dtype {name} needs "
                               f"{math.prod(shape) * dtype.itemsize} bytes", path=path)
    arr = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return arr[()] if code == 3 else arr


__all__ = ["FORMAT", "MAGIC", "is_legacy_checkpoint", "load_legacy_checkpoint",
           "parse_legacy_checkpoint"]
