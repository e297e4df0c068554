"""Zero-copy caffemodel reading: walk the protobuf wire format to find each blob's payload.

A caffemodel is a ``NetParameter`` whose layers hold ``BlobProto``s; ``BlobProto.data`` is a
packed ``repeated float``, i.e. on the wire one length-delimited field whose payload is the
little-endian float32 array. ``scan_caffemodel`` walks the top-level and layer messages in
Python (a few dozen fields), records where each blob's payload lies, and hands protobuf only
the small remainder (layer definitions without blobs). Arrays are then ``np.frombuffer``
views into the file's buffer: no per-element work and no extra copy of the weights.

The scanner follows protobuf's rules exactly: a field whose wire type does not match the
schema is an unknown field and is skipped; a second ``shape`` message merges into the first
(its dims are appended); for scalars the last occurrence wins; ``int32`` fields keep the low
32 bits of the varint. NVIDIA Caffe's ``raw_data`` (``raw_data_type`` FLOAT16, FLOAT or DOUBLE)
is found like ``data``. Anything it does not read itself (unpacked floats, a payload in
several chunks, an enum value outside Caffe's, raw_data without a usable type) returns
``None`` so the caller falls back to a full protobuf parse, which handles or reports it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import CaffeFormatError

_V2_LAYER, _V1_LAYER = 100, 2
_BLOBS = {_V2_LAYER: 7, _V1_LAYER: 6}


@dataclasses.dataclass(frozen=True)
class BlobRef:
    """Where one blob's values lie in the buffer, and its declared shape."""

    dims: tuple[int, ...]
    legacy: bool          # shape from num/channels/height/width rather than BlobShape
    offset: int
    nbytes: int
    dtype: str            # "<f4" (data, raw FLOAT), "<f8" (double_data, raw DOUBLE), "<f2"
    source: str = "data"  # the field holding the values: data, double_data or raw_data


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        if shift == 63 and b > 1:
            raise _Malformed("varint over 64 bits")
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int):
    """Yield (field, wire_type, start_of_tag, value_start, value_end, varint_value)."""
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise _Malformed("field number 0")
        if wt == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wt, start, pos, pos, value
        elif wt == 1:
            if pos + 8 > end:
                raise _Malformed("truncated fixed64")
            yield field, wt, start, pos, pos + 8, None
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed("length-delimited field runs past its message")
            yield field, wt, start, pos, pos + n, None
            pos += n
        elif wt == 5:
            if pos + 4 > end:
                raise _Malformed("truncated fixed32")
            yield field, wt, start, pos, pos + 4, None
            pos += 4
        else:
            raise _Malformed(f"wire type {wt}")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _int32(v: int) -> int:
    """Protobuf's int32 from a varint: the low 32 bits, two's complement."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


#: NVCaffe's ``Type`` enum values that hold floats, as numpy little-endian dtypes.
RAW_DTYPES = {0: "<f8", 1: "<f4", 2: "<f2"}
_TYPE_VALUES = range(5)  # DOUBLE, FLOAT, FLOAT16, INT, UINT


def _blob(buf: memoryview, pos: int, end: int) -> BlobRef | None:
    dims: list[int] | None = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    data = double = raw = None
    raw_type = None
    for field, wt, _, vs, ve, value in _fields(buf, pos, end):
        if field == 7 and wt == 2:  # BlobShape; a second one merges: dims append
            dims = [] if dims is None else dims
            for f2, wt2, _, s2, e2, v2 in _fields(buf, vs, ve):
                if f2 != 1:
                    continue
                if wt2 == 2:
                    p = s2
                    while p < e2:
                        d, p = _varint(buf, p, e2)
                        dims.append(_signed(d))
                elif wt2 == 0:
                    dims.append(_signed(v2))
                # any other wire type: an unknown field, skipped
        elif field in (1, 2, 3, 4) and wt == 0:
            legacy[field - 1] = _int32(value)
            has_legacy = True
        elif (field == 5 and wt == 5) or (field == 8 and wt == 1):
            return None  # unpacked floats: the full parser
        elif field == 5 and wt == 2:
            if data is not None:
                return None  # packed in several chunks: the full parser concatenates
            data = (vs, ve)
        elif field == 8 and wt == 2:
            if double is not None:
                return None
            double = (vs, ve)
        elif field == 10 and wt == 0:
            if value not in _TYPE_VALUES:
                return None  # protobuf keeps it as unknown: the full parser reports it
            raw_type = value
        elif field == 12 and wt == 2:
            raw = (vs, ve)  # optional bytes: the last occurrence wins
        # every other field (diffs, fork fields, mismatched wire types) is skipped
    if has_legacy:  # Caffe's Blob::FromProto: legacy 4-D dims win over BlobShape
        dims = legacy
    elif dims is None:
        dims = []
    shape, is_legacy = tuple(dims), dims is legacy
    # precedence of Caffe's (and NVCaffe's) Blob::FromProto: double_data, data, raw_data
    if double is not None and double[1] > double[0]:
        return BlobRef(shape, is_legacy, double[0], double[1] - double[0], "<f8",
                       "double_data")
    if data is not None and data[1] > data[0]:
        return BlobRef(shape, is_legacy, data[0], data[1] - data[0], "<f4")
    if raw is not None:
        if raw_type not in RAW_DTYPES:
            return None  # no type, or INT/UINT: the full parser reports it
        return BlobRef(shape, is_legacy, raw[0], raw[1] - raw[0], RAW_DTYPES[raw_type],
                       "raw_data")
    return BlobRef(shape, is_legacy, 0, 0, "<f4")


def _encode_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def scan_caffemodel(raw: bytes | bytearray | memoryview
                    ) -> tuple[bytes, list[list[BlobRef]]] | None:
    """Split a caffemodel into (the NetParameter bytes without blobs, the blob refs of each
    layer in order). ``None`` when the file needs the full parser."""
    buf = memoryview(raw)
    end = len(buf)
    out = bytearray()
    refs: list[list[BlobRef]] = []
    try:
        for field, wt, start, vs, ve, _ in _fields(buf, 0, end):
            if field in _BLOBS and wt == 2:
                layer = bytearray()
                blobs: list[BlobRef] = []
                for f2, wt2, s2, vs2, ve2, _ in _fields(buf, vs, ve):
                    if f2 == _BLOBS[field] and wt2 == 2:
                        ref = _blob(buf, vs2, ve2)
                        if ref is None:
                            return None
                        blobs.append(ref)
                    else:
                        layer += buf[s2:ve2]
                out += _encode_varint((field << 3) | 2)
                out += _encode_varint(len(layer)) + layer
                refs.append(blobs)
            else:
                out += buf[start:ve]
    except _Malformed:
        return None
    return bytes(out), refs


def blob_array(raw: bytes | bytearray | memoryview, ref: BlobRef, *, path=None, layer=None,
               field=None, memory_budget: int | None = None) -> np.ndarray:
    """The blob as a float32 array viewing ``raw`` (float64/float16 payloads are converted,
    exactly for float16), after the checks of ``caffe_io.blob_to_array`` (dims, budget,
    length)."""
    from .caffe_io import check_blob_dims

    count = check_blob_dims(ref.dims, path=path, layer=layer, field=field,
                            memory_budget=memory_budget)
    itemsize = np.dtype(ref.dtype).itemsize
    if ref.nbytes % itemsize:
        raise CaffeFormatError(f"{ref.source} length {ref.nbytes} is not a multiple of "
                               f"{itemsize}", path=path, layer=layer, field=field)
    n = ref.nbytes // itemsize
    if n != count:
        raise CaffeFormatError(f"holds {n} values but its shape {ref.dims} needs {count}",
                               path=path, layer=layer, field=field)
    arr = np.frombuffer(raw, dtype=ref.dtype, count=n, offset=ref.offset)
    if itemsize != 4:
        arr = arr.astype(np.float32)  # float16 -> float32 is exact
    return arr.reshape(ref.dims)
