"""fcn_jax.xla: per-function XLA options (the library's fastest kernel choice)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
from conftest import DATA, caffe_close

import converters
import fcn_jax
from fcn_jax import xla

D = DATA / "caffenet_mini"


def test_options_on_cpu_and_none_elsewhere():
    assert xla.compiler_options("gpu") == {} and xla.compiler_options("tpu") == {}
    if jax.default_backend() == "cpu" and "XLA_FLAGS" not in os.environ:
        # this jaxlib knows them (else they are left out, and the tests below still hold)
        assert set(xla.compiler_options()) <= set(xla.CPU_OPTIONS)


def test_jit_with_options_matches_caffe():
    """fcn_jax.jit(module.apply) runs the fast kernels and still matches real Caffe."""
    module, params = converters.load_caffe(D / "caffenet_mini_deploy.prototxt",
                                           D / "caffenet_mini.caffemodel")
    ref = np.load(D / "caffenet_mini_classifier_blobs.npz")
    blobs = fcn_jax.jit(module.apply)({"params": params}, ref["data"])
    for name in ("conv1", "norm1", "norm2", "conv5", "fc8", "prob"):
        caffe_close(blobs[name], ref[name], name, rel=1e-4 if name == "prob" else 1e-5)


def test_explicit_options_win_and_users_flags_are_kept():
    f = fcn_jax.jit(lambda x: x * 2, compiler_options={"xla_cpu_use_xnnpack": True})
    assert float(f(np.float32(3))) == 6.0
    code = textwrap.dedent("""
        from fcn_jax import xla
        print(sorted(xla.compiler_options("cpu")))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_use_xnnpack=true", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "xla_cpu_use_xnnpack" not in r.stdout  # the user's own setting wins
