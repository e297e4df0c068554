"""Shared fixtures: where the Caffe reference data lives and how to compare against it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def caffe_close(ours, ref, name: str = "", rel: float = 1e-5) -> None:
    """max |ours - caffe| <= rel * max |caffe|: the tolerance real implementations reach."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != caffe {ref.shape}"
    scale = max(float(np.max(np.abs(ref))), 1e-30) if ref.size else 1.0
    err = float(np.max(np.abs(ours.astype(np.float64) - ref))) if ref.size else 0.0
    assert err <= rel * scale, f"{name}: max abs err {err:.3g} > {rel} * {scale:.3g}"


def varint(v: int) -> bytes:
    """``v`` as a protobuf base-128 varint (negative: two's complement, 10 bytes)."""
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def fld(number: int, wire: int, payload: bytes | int) -> bytes:
    """One protobuf field: tag, then the payload in its wire form."""
    tag = varint(number << 3 | wire)
    if wire == 0:
        return tag + varint(int(payload))
    if wire == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


def random_caffe_net(folder: Path, text: str, shapes: dict, seed: int = 0,
                     scale: float = 0.02) -> tuple[Path, Path, dict]:
    """``folder/net.prototxt`` (``text``) and ``net.caffemodel`` with normal random blobs of
    ``shapes`` (``{layer: {blob: shape}}``) times ``scale``: (proto, model, params)."""
    import converters

    proto = folder / "net.prototxt"
    proto.write_text(text)
    rng = np.random.default_rng(seed)
    params = {layer: {k: (rng.standard_normal(s) * scale).astype(np.float32)
                      for k, s in blobs.items()} for layer, blobs in shapes.items()}
    model = folder / "net.caffemodel"
    converters.save_caffemodel(model, params, converters.read_prototxt(proto))
    return proto, model, params


def legacy_weights_bytes(tree: dict, meta: dict | None = None) -> bytes:
    """An old fcn-jax/2 weights file (``fcn-jax convert -o x.msgpack`` before safetensors),
    written here from its documented layout: magic, sha256(payload), msgpack payload with
    arrays as extension 1 ``(shape, dtype name, bytes)``."""
    import hashlib

    import msgpack

    def ext(a):
        a = np.asarray(a)
        return msgpack.ExtType(1, msgpack.packb((list(a.shape), a.dtype.name, a.tobytes()),
                                                use_bin_type=True))
    payload = msgpack.packb({"format": "fcn-jax/2", "meta": meta or {}, "tree": tree},
                            default=ext, use_bin_type=True)
    return b"FCNJAX\x00\x02" + hashlib.sha256(payload).digest() + payload


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(autouse=True)
def _no_gpu_preallocation(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", os.environ.get(
        "XLA_PYTHON_CLIENT_PREALLOCATE", "false"))
