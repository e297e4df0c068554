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

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_npz",
    "atomic_save_json",
    "atomic_savefig",
]

PathLike = str | os.PathLike


def _default_file_mode() -> int:
    """Permission bits a plain ``open(path, 'w')`` would create (0o666 & ~umask)."""
    umask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    if umask is None:  # not Linux: the set-and-restore dance (not thread-safe, rare)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Best-effort fsync of a directory so the rename itself is durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write_fn: Callable[[IO[Any]], Any], mode: str = "wb") -> Path:
    """Atomically write ``path`` by calling ``write_fn(fileobj)`` on a temp file.

    ``mode`` is ``"wb"`` (binary) or ``"w"`` (text, UTF-8).  The temp file lives
    in the destination folder, so the final :func:`os.replace` never crosses a
    file system.  The new file keeps the permission bits of the file it replaces
    (or the umask default for a new file).  On any exception (``BaseException``
    included) the temp file is removed, the old file is left intact, and the
    exception propagates.  If ``path`` is a symlink, the link itself is replaced
    by a regular file.  Returns the destination path.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    dest = Path(os.fspath(path))
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        perm = stat.S_IMODE(os.stat(dest).st_mode)
    except FileNotFoundError:
        perm = _default_file_mode()

    text_kw: dict[str, Any] = {"encoding": "utf-8"} if mode == "w" else {}
    tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 -- closed explicitly below
        mode=mode, dir=folder, delete=False, prefix="." + dest.name + ".", suffix=".tmp", **text_kw
    )
    tmp_name = tmp.name
    try:
        try:
            write_fn(tmp)
            closed_by_writer = tmp.closed
            if not closed_by_writer:
                tmp.flush()
                os.fsync(tmp.fileno())
        finally:
            tmp.close()
        if closed_by_writer:
            # write_fn closed the file itself; still make sure the bytes are on disk.
            fd = os.open(tmp_name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):
            os.chmod(tmp_name, perm)
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(folder)
    return dest


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
