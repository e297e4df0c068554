"""Untrusted ``.npy`` / ``.npz`` files, read safely: no pickle, numeric dtypes only, and the
header's shape checked against the file's bytes and the memory budget *before* anything is
allocated (``np.load`` allocates what the header claims, so a 100-byte file can ask for
terabytes). Every problem raises ``CaffeFormatError`` naming the file and the entry.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from typing import IO

import numpy as np

from .caffe_io import resolve_memory_budget
from .errors import CaffeFormatError
from .files import open_regular, read_exactly

PathLike = str | os.PathLike
_NPY_MAGIC = b"\x93NUMPY"


def _read_header(f: IO[bytes], path: PathLike, field: str | None
                 ) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an npy header; the stream is left at the data."""
    fmt = np.lib.format
    try:
        major, minor = fmt.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif (major, minor) == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = fmt._read_array_header(f, version=(major, minor))
    except Exception as e:  # numpy raises ValueError, SyntaxError, TokenError, EOFError...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CaffeFormatError(f"not a valid .npy header ({type(e).__name__}: {reason})",
                               path=path, field=field) from None
    if dtype.hasobject or dtype.kind not in "biufc" or dtype.fields is not None:
        raise CaffeFormatError(f"dtype {dtype} is not a plain numeric type", path=path,
                               field=field)
    if any(d < 0 for d in shape):
        raise CaffeFormatError(f"negative dimension in shape {shape}", path=path, field=field)
    # numpy refuses ("array is too big") any shape whose non-zero dims overflow its index
    # type, even an empty one such as (0, 3, 2**31, 2**31)
    if math.prod(max(int(d), 1) for d in shape) * dtype.itemsize > np.iinfo(np.intp).max:
        raise CaffeFormatError(f"shape {tuple(shape)} is too large for any array", path=path,
                               field=field)
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _finish(buf: bytearray, shape, fortran: bool, dtype: np.dtype) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=dtype)
    if not arr.dtype.isnative:
        arr = arr.byteswap().view(arr.dtype.newbyteorder("="))
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def load_npy(path: PathLike, *, memory_budget: int | None = None) -> np.ndarray:
    """Read a ``.npy`` array (numeric dtypes only); see the module docstring."""
    budget = resolve_memory_budget(memory_budget)
    try:
        with open_regular(path) as f:
            if f.read(6) != _NPY_MAGIC:
                raise CaffeFormatError("not a .npy file (no NumPy magic)", path=path)
            f.seek(0)
            shape, fortran, dtype = _read_header(f, path, None)
            need = math.prod(shape) * dtype.itemsize
            if need > budget:
                raise CaffeFormatError(f"shape {shape} needs {need} bytes, over the memory "
                                       f"budget of {budget}", path=path)
            have = os.fstat(f.fileno()).st_size - f.tell()
            if have < need:
                raise CaffeFormatError(f"truncated: shape {shape} needs {need} bytes of data, "
                                       f"the file holds {have}", path=path)
            buf = read_exactly(f, need)
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    if len(buf) != need:
        raise CaffeFormatError("truncated while reading", path=path)
    return _finish(buf, shape, fortran, dtype)


def load_npz(path: PathLike, *, memory_budget: int | None = None) -> dict[str, np.ndarray]:
    """Read every array of a ``.npz`` archive (numeric dtypes only, no pickle), refusing
    members whose declared size disagrees with their header or exceeds the budget (which
    also stops decompression bombs)."""
    budget = resolve_memory_budget(memory_budget)
    out: dict[str, np.ndarray] = {}
    total = 0
    try:
        with open_regular(path) as raw, zipfile.ZipFile(raw) as z:
            for info in z.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.file_size > budget - total:
                    raise CaffeFormatError(f"member of {info.file_size} bytes exceeds the "
                                           f"memory budget of {budget}", path=path, field=name)
                with z.open(info) as f:
                    shape, fortran, dtype = _read_header(f, path, name)
                    need = math.prod(shape) * dtype.itemsize
                    if need > info.file_size:
                        raise CaffeFormatError(f"shape {shape} needs {need} bytes, the member "
                                               f"holds {info.file_size}", path=path, field=name)
                    buf = read_exactly(f, need)
                if len(buf) != need:
                    raise CaffeFormatError("truncated member", path=path, field=name)
                total += need
                out[name] = _finish(buf, shape, fortran, dtype)
    except CaffeFormatError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError,
            RuntimeError) as e:
        raise CaffeFormatError(f"not a valid .npz archive ({type(e).__name__}: {e})",
                               path=path) from None
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    return out


# ----------------------------------------------------------------------------- member names

#: Longest npz member name zip can store (a 16-bit length), ``.npy`` suffix included.
MAX_MEMBER_NAME = 65535


def encode_member_name(name: str) -> str:
    """The npz member name (without ``.npy``) for a blob name, reversibly
    (``decode_member_name`` gives ``name`` back).

    Percent-encoded as ``%XX`` (the UTF-8 bytes): ``%`` itself, ``\\``, control and other
    non-printing characters (NUL, terminal escapes), and every ``/`` when the name, read as a
    path, is absolute or has an empty, ``.`` or ``..`` part (``../x`` becomes ``..%2Fx``).
    Ordinary names are unchanged, ``/`` included (``inception_3a/1x1``), so readers that
    index the archive by plain names keep working; ``load_blobs`` decodes every name.
    """
    import unicodedata

    parts = name.split("/")
    plain_slashes = len(parts) > 1 and all(p not in ("", ".", "..") for p in parts)
    out = []
    for ch in name:
        if ch in "%\\" or (ch == "/" and not plain_slashes) or (
                unicodedata.category(ch)[0] in "CZ" and ch != " "):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


def decode_member_name(key: str) -> str:
    """The blob name of an npz key written with ``encode_member_name``: the key as
    ``np.load``/``load_npz`` give it, i.e. the zip member name without its ``.npy``."""
    from urllib.parse import unquote

    return unquote(key, encoding="utf-8", errors="surrogatepass")


def check_member_names(names, *, path: PathLike | None = None) -> dict[str, str]:
    """``{name: member}`` for blob names to be stored in one npz, refusing a name too long
    for a zip member (zipfile would fail with ``struct.error``)."""
    out = {}
    for name in names:
        member = encode_member_name(name)
        size = len((member + ".npy").encode("utf-8"))
        if size > MAX_MEMBER_NAME:
            raise CaffeFormatError(f"blob name of {len(name.encode('utf-8', 'replace'))} "
                                   f"bytes is too long for an npz member ({MAX_MEMBER_NAME} "
                                   "bytes at most, encoded, with .npy); choose blobs with "
                                   "--outputs", path=path, field=f"blob {name[:60]!r}")
        out[name] = member
    return out


__all__ = ["MAX_MEMBER_NAME", "check_member_names", "decode_member_name",
           "encode_member_name", "load_npy", "load_npz"]
