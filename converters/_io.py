"""Atomic file writes: temp file in the same folder, fsync, rename. No partial files.

A reader of ``path`` sees either the old file or the complete new one, whatever happens to
the writer (an exception, Ctrl-C, SIGKILL, a power cut after the rename's fsync). After a
SIGKILL a hidden ``.<name>.<random>.tmp`` may remain beside the file; ``path`` is intact.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from typing import IO


def _new_file_mode() -> int:
    """The permission bits ``open(path, "w")`` would give a new file (0o666 minus umask)."""
    mask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
                    break
    if mask is None:  # not Linux
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write_fn(fileobj)`` so that ``path`` is either the old file or
    the complete new one: on any failure (even KeyboardInterrupt) the old file stays intact
    and the temp file is removed. The new file keeps the old one's permission bits (or the
    umask default), not ``mkstemp``'s 0600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    view = memoryview(data)
    atomic_write(path, lambda f: f.write(view))


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open ``path`` for binary reading if it is a regular file, without ever blocking: a
    FIFO, socket, device or folder raises ``IsADirectoryError``/``OSError`` at once (an
    ordinary ``open`` of a FIFO waits for a writer forever)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device")
            raise NotRegularFileError(f"not a regular file ({kind})")
        with contextlib.suppress(OSError, AttributeError):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class NotRegularFileError(OSError):
    """A path that is not a regular file where a file's bytes are expected."""


def read_exactly(f: IO[bytes], size: int) -> bytearray:
    """``size`` bytes of ``f`` into a buffer allocated once (shorter if the file ends
    first): reading never reserves more than the file holds."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            del view
            del buf[got:]
            return buf
        got += n
    return buf
