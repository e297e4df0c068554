"""fcn-jax checkpoints: a pytree of arrays plus JSON-like metadata in one file, written
atomically, read back without pickle and without trusting the file.

File layout (format ``fcn-jax/2``)::

    b"FCNJAX\\x00\\x02"   8-byte magic
    sha256(payload)      32 bytes
    payload              msgpack {"format": "fcn-jax/2", "meta": {...}, "tree": pytree}

Arrays in ``tree`` use Flax's msgpack encoding (extension type 1: ``(shape, dtype name,
C-order bytes)``). The checksum turns any corruption (a flipped bit, a truncated copy) into a
clear error instead of silently different weights. Files of the older ``fcn-jax/1`` form
(the same map written as plain msgpack, without magic or checksum) are still read.

Reading is strict: only numeric dtypes, shapes that match their byte counts, a bounded
number of containers, file size within the memory budget (``$FCN_JAX_MEMORY_BUDGET``).
Every problem raises ``CaffeFormatError`` naming the file and the entry.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from converters import CaffeFormatError
from converters._io import atomic_write
from converters.caffe_io import resolve_memory_budget

FORMAT = "fcn-jax/2"
LEGACY_FORMATS = ("fcn-jax/1",)
MAGIC = b"FCNJAX\x00\x02"
#: Largest checkpoint read by default (bytes); ``$FCN_JAX_MEMORY_BUDGET`` overrides it.
MAX_BYTES = 8 * 2**30
#: Most dict entries + list items a checkpoint may hold (bounds memory on hostile files).
MAX_ITEMS = 1 << 24

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128", "bfloat16"}
_MAX_AXES = 32


# ----------------------------------------------------------------------------- write


def save_checkpoint(path: str | os.PathLike, tree: Any, meta: dict | None = None) -> None:
    """Write ``tree`` (nested dicts/lists/tuples of arrays and scalars) and ``meta`` (JSON-like)
    atomically: a reader sees the old file or the complete new one, never a partial one.

    Tuples are stored as dicts keyed ``"0"``, ``"1"``, ... (as Flax does).
    """
    host = _to_host(tree)
    if not isinstance(host, (dict, list)):
        raise TypeError(f"a checkpoint tree must be a dict, list or tuple, not "
                        f"{type(tree).__name__}")
    payload = msgpack.packb({"format": FORMAT, "meta": _to_host(meta or {}), "tree": host},
                            default=_pack_ext, strict_types=True, use_bin_type=True)
    digest = hashlib.sha256(payload).digest()

    def write(f) -> None:
        f.write(MAGIC)
        f.write(digest)
        f.write(memoryview(payload))

    atomic_write(path, write)


def _to_host(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _to_host(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return {str(i): _to_host(v) for i, v in enumerate(tree)}
    if isinstance(tree, list):
        return [_to_host(v) for v in tree]
    if isinstance(tree, np.generic):
        return tree
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return np.asarray(tree)
    if isinstance(tree, os.PathLike):
        return os.fspath(tree)
    return tree


def _pack_ext(x: Any) -> msgpack.ExtType:
    if isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        if arr.dtype.name not in _DTYPES:
            raise TypeError(f"cannot store arrays of dtype {arr.dtype} in a checkpoint")
        body = msgpack.packb((arr.shape, arr.dtype.name, np.ascontiguousarray(arr).tobytes()),
                             use_bin_type=True)
        return msgpack.ExtType(_EXT_NPSCALAR if isinstance(x, np.generic) else _EXT_NDARRAY,
                               body)
    if isinstance(x, complex):
        return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb((x.real, x.imag)))
    raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")


# ----------------------------------------------------------------------------- read


def load_checkpoint(path: str | os.PathLike, *, max_bytes: int | None = None
                    ) -> tuple[Any, dict]:
    """Read ``(tree, meta)`` from a checkpoint.

    Malformed, corrupt or truncated files raise ``CaffeFormatError`` (one line naming the
    file and the entry). Files larger than ``max_bytes`` (default: the memory budget,
    ``$FCN_JAX_MEMORY_BUDGET`` or 8 GiB) are refused before reading. Arrays are read-only
    views of the file's bytes.
    """
    limit = resolve_memory_budget(max_bytes)
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise CaffeFormatError(f"file of {size} bytes exceeds the limit of {limit}",
                                   path=path)
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror}", path=path) from None
    if len(raw) > limit:
        raise CaffeFormatError(f"file exceeds the limit of {limit} bytes", path=path)
    return parse_checkpoint(raw, path)


def parse_checkpoint(raw: bytes, path: str | os.PathLike = "<bytes>") -> tuple[Any, dict]:
    """``load_checkpoint`` on bytes already in memory."""
    view = memoryview(raw)
    if raw[: len(MAGIC)] == MAGIC:
        header = len(MAGIC) + 32
        if len(raw) < header:
            raise CaffeFormatError("truncated checkpoint (no checksum)", path=path)
        payload = view[header:]
        if hashlib.sha256(payload).digest() != bytes(view[len(MAGIC):header]):
            raise CaffeFormatError("checksum mismatch: the file is corrupt or truncated",
                                   path=path, field="sha256")
        formats: tuple[str, ...] = (FORMAT,)
    elif raw[:6] == MAGIC[:6]:
        raise CaffeFormatError(f"checkpoint version {raw[7:8]!r} is not supported by this "
                               f"fcn-jax (reads {FORMAT})", path=path, field="format")
    else:
        payload = view
        formats = LEGACY_FORMATS
    obj = _unpack(payload, path)
    if not isinstance(obj, dict) or obj.get("format") not in formats or "tree" not in obj:
        raise CaffeFormatError(f"not an fcn-jax checkpoint (expected format {FORMAT!r})",
                               path=path, field="format")
    meta = obj.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise CaffeFormatError("meta is not a mapping", path=path, field="meta")
    if not isinstance(obj["tree"], (dict, list)):
        raise CaffeFormatError(f"tree is a {type(obj['tree']).__name__}, not a dict or list",
                               path=path, field="tree")
    tree = _unchunk(obj["tree"], path, "tree")
    _check_tree(tree, path)
    return tree, meta


def _unpack(payload: memoryview, path) -> Any:
    """msgpack with limits: counted containers, strict extension types, str map keys."""
    count = [0]

    def counted(n: int) -> None:
        count[0] += n
        if count[0] > MAX_ITEMS:
            raise CaffeFormatError(f"more than {MAX_ITEMS} entries", path=path, field="tree")

    def pairs(items):
        counted(len(items))
        return dict(items)

    def items(lst):
        counted(len(lst))
        return lst

    n = len(payload)
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True,
            ext_hook=lambda code, data: _ext(code, data, path),
            object_pairs_hook=pairs, list_hook=items,
            max_str_len=n, max_bin_len=n, max_ext_len=n,
            max_array_len=min(n, MAX_ITEMS), max_map_len=min(n, MAX_ITEMS))
    except CaffeFormatError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError,
            msgpack.UnpackException) as e:
        # ExtraData, FormatError, StackError, OutOfData are ValueError subclasses
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CaffeFormatError(f"not a valid checkpoint (truncated or corrupt: "
                               f"{type(e).__name__}: {reason})", path=path) from None


def _ext(code: int, data: bytes, path) -> Any:
    if code == _EXT_COMPLEX:
        try:
            re_, im = msgpack.unpackb(data, max_array_len=2)
            return complex(float(re_), float(im))
        except (ValueError, TypeError) as e:
            raise CaffeFormatError(f"bad complex number ({e})", path=path) from None
    if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
        raise CaffeFormatError(f"unknown msgpack extension type {code}", path=path)
    try:
        shape, dtype_name, buffer = msgpack.unpackb(
            data, raw=True, max_array_len=_MAX_AXES, max_map_len=0,
            max_bin_len=len(data), max_str_len=64)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise CaffeFormatError(f"bad array header ({type(e).__name__})", path=path) from None
    name = dtype_name.decode("ascii", "replace") if isinstance(dtype_name, bytes) else None
    if name not in _DTYPES:
        raise CaffeFormatError(f"array dtype {str(dtype_name)[:40]} is not numeric",
                               path=path)
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CaffeFormatError(f"bad array shape {str(shape)[:80]}", path=path)
    if not isinstance(buffer, bytes):
        raise CaffeFormatError("array data is not bytes", path=path)
    if name == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(name)
    count = math.prod(shape)
    if count * dtype.itemsize != len(buffer):
        raise CaffeFormatError(f"array of shape {tuple(shape)} and dtype {name} needs "
                               f"{count * dtype.itemsize} bytes, holds {len(buffer)}",
                               path=path)
    arr = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return arr[()] if code == _EXT_NPSCALAR else arr


def _unchunk(tree: Any, path, where: str) -> Any:
    """Flax's form for arrays over 1 GiB: ``{"__msgpack_chunked_array__": True, "shape":
    {"0": d0, ...}, "chunks": {"0": flat0, ...}}`` -> one array."""
    if isinstance(tree, dict):
        if "__msgpack_chunked_array__" not in tree:
            return {k: _unchunk(v, path, f"{where}/{k}") for k, v in tree.items()}
        shape_d, chunks_d = tree.get("shape"), tree.get("chunks")
        if not isinstance(shape_d, dict) or not isinstance(chunks_d, dict):
            raise CaffeFormatError("bad chunked array", path=path, field=where)
        try:
            shape = tuple(shape_d[str(i)] for i in range(len(shape_d)))
            chunks = [chunks_d[str(i)] for i in range(len(chunks_d))]
        except KeyError:
            raise CaffeFormatError("bad chunked array keys", path=path, field=where) from None
        if not chunks or not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks) \
                or len({c.dtype for c in chunks}) != 1 \
                or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or sum(c.size for c in chunks) != math.prod(shape):
            raise CaffeFormatError("chunked array does not match its shape", path=path,
                                   field=where)
        return np.concatenate(chunks).reshape(shape)
    if isinstance(tree, list):
        return [_unchunk(v, path, f"{where}[{i}]") for i, v in enumerate(tree)]
    return tree


def _check_tree(tree: Any, path: Any, where: str = "tree") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_tree(v, path, f"{where}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_tree(v, path, f"{where}[{i}]")
    elif isinstance(tree, np.ndarray):
        if tree.dtype.kind not in "biufcV" or tree.dtype.kind == "V" and \
                tree.dtype.name != "bfloat16":
            raise CaffeFormatError(f"array of dtype {tree.dtype} is not numeric", path=path,
                                   field=where)
    elif not isinstance(tree, (int, float, complex, str, bool, bytes, type(None),
                               np.generic)):
        raise CaffeFormatError(f"unexpected value of type {type(tree).__name__}", path=path,
                               field=where)


__all__ = ["FORMAT", "MAX_BYTES", "load_checkpoint", "parse_checkpoint", "save_checkpoint"]
