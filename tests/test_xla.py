"""fcn_jax.xla: per-function XLA options (the library's fastest kernel choice)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import DATA, caffe_close

import converters
import fcn_jax
from fcn_jax import xla

D = DATA / "caffenet_mini"


def test_options_on_cpu_and_none_elsewhere():
    assert xla.compiler_options("gpu") == {} and xla.compiler_options("tpu") == {}
    if jax.default_backend() == "cpu" and "XLA_FLAGS" not in os.environ:
        # a jaxlib that drops an option fails here rather than silently losing the speed
        assert xla.compiler_options() == dict(xla.CPU_OPTIONS)


def test_jit_with_options_matches_caffe():
    """fcn_jax.jit(module.apply) runs the fast kernels and still matches real Caffe."""
    module, params = converters.load_caffe(D / "caffenet_mini_deploy.prototxt",
                                           D / "caffenet_mini.caffemodel")
    ref = np.load(D / "caffenet_mini_classifier_blobs.npz")
    blobs = fcn_jax.jit(module.apply)({"params": params}, ref["data"])
    for name in ("conv1", "norm1", "norm2", "conv5", "fc8", "prob"):
        caffe_close(blobs[name], ref[name], name, rel=1e-4 if name == "prob" else 1e-5)


@pytest.mark.parametrize("given, want", [
    (None, "fast"), ({}, {}), ({"xla_cpu_use_xnnpack": True}, {"xla_cpu_use_xnnpack": True})])
def test_explicit_options_replace_the_fast_ones(monkeypatch, given, want):
    fast = xla.compiler_options()  # probed before jax.jit is replaced below
    seen = {}

    def fake_jit(fun, **kwargs):
        seen.update(kwargs)
        return fun

    monkeypatch.setattr(xla.jax, "jit", fake_jit)
    kw = {} if given is None else {"compiler_options": given}
    assert fcn_jax.jit(lambda x: x * 2, **kw)(3) == 6
    assert seen.get("compiler_options", {}) == (fast if want == "fast" else want)


def test_wrapping_starts_no_backend_and_users_flags_are_kept():
    code = textwrap.dedent("""
        from jax._src import xla_bridge
        import fcn_jax
        f = fcn_jax.jit(lambda x: x + 1)
        started = xla_bridge.backends_are_initialized()
        print(started, float(f(1.0)), sorted(fcn_jax.compiler_options("cpu")))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_use_xnnpack=true", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    started, value, *names = r.stdout.split(maxsplit=2)
    assert started == "False" and value == "2.0"
    assert "xla_cpu_use_xnnpack" not in names[0]  # the user's own setting wins
