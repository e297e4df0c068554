"""File access for every reader and writer: regular files only, read by their size; atomic
writes (temp file in the same folder, fsync, rename; no partial files).

A reader of ``path`` sees either the old file or the complete new one, whatever happens to
the writer (an exception, Ctrl-C, SIGKILL, a power cut after the rename's fsync). After a
SIGKILL a hidden ``.<name>.<random>.tmp`` may remain beside the file; ``path`` is intact.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
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


def _about(path: str, e: OSError) -> OSError:
    """``e`` re-addressed to ``path``: a message names the file the user asked for, never
    our temp file (``.out.npz.g9ztrthm.tmp``) and never no file at all (ENOSPC)."""
    if e.errno is None:
        return e
    return OSError(e.errno, e.strerror or str(e), path)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write_fn(fileobj)`` so that ``path`` is either the old file or
    the complete new one: on any failure (even KeyboardInterrupt) the old file stays intact
    and the temp file is removed. The new file keeps the old one's permission bits (or the
    umask default), not ``mkstemp``'s 0600. An ``OSError`` names ``path``."""
    path = os.fspath(path)
    tmp = _write_temp(path, write_fn)
    try:
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _about(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path)


def _write_temp(path: str, write_fn: Callable[[IO[bytes]], None]) -> str:
    """A complete, fsynced temp file beside ``path`` (mode of the old file), or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = _new_file_mode()
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as e:
        raise _about(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _about(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_folder(path: str) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_group(files: Sequence[tuple[str | os.PathLike, Callable[[IO[bytes]], None]]]
                       ) -> None:
    """Write several files that belong together (a prototxt and its caffemodel) so that
    they are all new or all old.

    Every file is first written completely to its temp file (a full disk or an error there
    leaves all the old files untouched); the old files are then kept as hidden hard-link
    backups, the temps renamed into place one after the other, and on a failed rename the
    files already replaced are restored from their backups. What remains: a SIGKILL or
    power cut *between two renames* (microseconds, no I/O in between) leaves a mix; the
    old versions are then still beside them as ``.<name>.<random>.bak``.
    """
    paths = [os.fspath(p) for p, _ in files]
    temps: list[str] = []
    backups: dict[str, tuple[bool, str | None]] = {}
    keep_backups = False
    try:
        for path, write_fn in files:
            temps.append(_write_temp(os.fspath(path), write_fn))
        for path in paths:
            backups[path] = (os.path.lexists(path), _backup(path))
        done: list[str] = []
        try:
            for path, tmp in zip(paths, temps, strict=True):
                try:
                    os.replace(tmp, path)
                except OSError as e:
                    raise _about(path, e) from None
                done.append(path)
        except BaseException:
            for path in done:  # put the old files back
                existed, bak = backups[path]
                try:
                    if bak is not None:
                        os.replace(bak, path)
                    elif not existed:
                        os.unlink(path)
                except OSError:
                    keep_backups = True
            raise
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not keep_backups:
            for _, bak in backups.values():
                if bak is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(bak)
    for path in paths:
        _fsync_folder(path)


def _backup(path: str) -> str | None:
    """A hidden hard link to the current ``path``; ``None`` if there is no file yet or the
    file system has no hard links (the group is then all-or-nothing only up to the
    renames)."""
    if not os.path.lexists(path):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        bak = os.path.join(folder, f".{os.path.basename(path)}.{os.urandom(4).hex()}.bak")
        try:
            os.link(path, bak)
            return bak
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


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
