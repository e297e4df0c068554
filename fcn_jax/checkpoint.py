"""fcn-jax checkpoints: one msgpack file (Flax's serialisation, no pickle) holding a pytree
of arrays plus metadata, written atomically.

Layout: ``{"format": "fcn-jax/1", "meta": {...json-able...}, "tree": pytree}``. ``meta``
typically carries the net's prototxt text so that a checkpoint is self-describing.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import serialization

from converters import CaffeFormatError
from converters._io import atomic_write_bytes

FORMAT = "fcn-jax/1"
#: Largest checkpoint we agree to read (bytes); protects against absurd files.
MAX_BYTES = 8 * 2**30


def save_checkpoint(path: str | os.PathLike, tree: Any, meta: dict | None = None) -> None:
    """Write ``tree`` (nested dicts/lists of arrays and scalars) and ``meta`` atomically."""
    host = _to_host(tree)
    data = serialization.msgpack_serialize({"format": FORMAT, "meta": meta or {},
                                            "tree": host})
    atomic_write_bytes(path, data)


def _to_host(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _to_host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): _to_host(v) for i, v in enumerate(tree)} if isinstance(
            tree, tuple) else [_to_host(v) for v in tree]
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return np.asarray(tree)
    return tree


def load_checkpoint(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES
                    ) -> tuple[Any, dict]:
    """Read ``(tree, meta)`` from a checkpoint; malformed files raise ``CaffeFormatError``."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise CaffeFormatError(f"file of {size} bytes exceeds the limit of {max_bytes}",
                                   path=path)
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror}", path=path) from None
    try:
        obj = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises many types on corrupt input
        raise CaffeFormatError(f"not an fcn-jax checkpoint ({type(e).__name__}: {e})",
                               path=path) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "tree" not in obj:
        raise CaffeFormatError(f"not an fcn-jax checkpoint (expected format {FORMAT!r})",
                               path=path, field="format")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise CaffeFormatError("meta is not a mapping", path=path, field="meta")
    _check_tree(obj["tree"], path)
    return obj["tree"], meta


def _check_tree(tree: Any, path: Any, where: str = "tree") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_tree(v, path, f"{where}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_tree(v, path, f"{where}[{i}]")
    elif isinstance(tree, np.ndarray):
        if tree.dtype.kind not in "biufc":
            raise CaffeFormatError(f"array of dtype {tree.dtype} is not numeric", path=path,
                                   field=where)
    elif not isinstance(tree, (int, float, str, bool, bytes, type(None), np.generic)):
        raise CaffeFormatError(f"unexpected value of type {type(tree).__name__}", path=path,
                               field=where)
