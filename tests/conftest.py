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


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(autouse=True)
def _no_gpu_preallocation(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", os.environ.get(
        "XLA_PYTHON_CLIENT_PREALLOCATE", "false"))
