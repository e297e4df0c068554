"""Atomic file writes.

Every writer here goes through :func:`atomic_write`: the content is written to a
temporary file in the destination folder, flushed and fsynced, then moved onto
the destination with :func:`os.replace` (atomic on POSIX and Windows).  If
anything fails -- including ``KeyboardInterrupt`` or the process being killed --
the previous file at the destination is left untouched and no temporary file is
left behind (except after SIGKILL, where a hidden ``.<name>.*.tmp`` file may
remain; the destination is still intact).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from converters.files import atomic_write as _atomic_write

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_npz",
    "atomic_save_json",
    "atomic_savefig",
    "load_blobs",
    "prepare_output",
    "save_blobs",
]

PathLike = str | os.PathLike


def atomic_write(path: PathLike, write_fn: Callable[[IO[Any]], Any], mode: str = "wb") -> Path:
    """Atomically write ``path`` by calling ``write_fn(fileobj)`` on a temp file.

    ``mode`` is ``"wb"`` (binary) or ``"w"`` (text, UTF-8). The mechanism (temp file in the
    same folder, fsync, rename, old permissions kept, temp removed on any exception) is
    ``converters.files.atomic_write``. Returns the destination path.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    if mode == "w":
        def binary(f: IO[bytes]) -> None:
            text = io.TextIOWrapper(f, encoding="utf-8")
            write_fn(text)
            text.flush()
            text.detach()

        _atomic_write(path, binary)
    else:
        _atomic_write(path, write_fn)
    return Path(os.fspath(path))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    view = memoryview(data)
    return atomic_write(path, lambda f: f.write(view), mode="wb")


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_save_npz(path: PathLike, arrays: Mapping[str, Any], *, compressed: bool = False) -> Path:
    """Atomically save ``arrays`` as an ``.npz`` archive (``np.savez`` on the file object).

    Unlike ``np.savez(path, ...)`` no ``.npz`` suffix is appended to ``path``.
    """
    arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
    saver = np.savez_compressed if compressed else np.savez
    return atomic_write(path, lambda f: saver(f, **arrays), mode="wb")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_save_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON (NumPy scalars/arrays are converted)."""
    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
    return atomic_write_text(path, text)


def atomic_savefig(fig: Any, path: PathLike, **kw: Any) -> Path:
    """Atomically save a matplotlib figure; the format comes from ``path``'s suffix.

    Extra keyword arguments go to ``fig.savefig`` (an explicit ``format=`` wins).
    """
    suffix = Path(os.fspath(path)).suffix.lstrip(".").lower()
    if suffix and "format" not in kw:
        kw["format"] = suffix
    return atomic_write(path, lambda f: fig.savefig(f, **kw), mode="wb")


def save_blobs(path: PathLike, blobs: Mapping[str, Any]) -> int:
    """Save blobs by Caffe name as an ``.npz``, atomically, with member names encoded
    reversibly (``converters.npy.encode_member_name``: NUL, ``../``, ``%``... cannot merge
    two blobs or escape the archive); returns the number of members the written archive
    holds (checked by reading its directory back). ``load_blobs`` reads it."""
    import zipfile

    from converters.npy import check_member_names

    members = check_member_names(blobs, path=path)
    arrays = {members[k]: np.asarray(v) for k, v in blobs.items()}

    def write(f: IO[bytes]) -> None:
        # not np.savez(f, **arrays): a blob named "file" or "allow_pickle" would collide
        # with its parameters
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for member, arr in arrays.items():
                with z.open(member + ".npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, arr, allow_pickle=False)

    atomic_write(path, write, mode="wb")
    from converters.files import open_regular

    with open_regular(path) as raw, zipfile.ZipFile(raw) as z:
        written = len(z.namelist())
    if written != len(blobs):
        raise OSError(f"{path}: the archive holds {written} members for {len(blobs)} blobs")
    return written


def load_blobs(path: PathLike) -> dict[str, np.ndarray]:
    """The blobs of an ``.npz`` written by ``save_blobs`` (``fcn-jax run --blobs``), keyed by
    their Caffe names (member names decoded); safe on untrusted files (no pickle, budget)."""
    from converters.npy import decode_member_name, load_npz

    return {decode_member_name(k): v for k, v in load_npz(path).items()}


def prepare_output(path: PathLike, inputs: Sequence[PathLike] = (), *,
                   create: bool = True) -> Path:
    """Ready ``path`` to be written by a command: refused (``CaffeFormatError``) when it is
    one of the command's ``inputs`` (writing would replace what is being read), and, with
    ``create``, its folder created if missing (every command does this alike)."""
    from converters import CaffeFormatError

    out = Path(os.fspath(path))
    for src in inputs:
        if src is None:
            continue
        if _same_file(out, Path(os.fspath(src))):
            raise CaffeFormatError(f"the output would replace the input {os.fspath(src)}",
                                   path=out)
    if create:
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
