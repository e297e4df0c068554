"""Per-compilation XLA options: the kernels that run Caffe nets fastest, chosen for each
compiled function rather than for the whole process.

On XLA:CPU (jaxlib 0.10) the default hands every convolution to YNNPACK, which runs
CaffeNet's ``conv1`` (11x11, stride 4, 3 channels) 3-4x slower than XLA's own Eigen kernels
at batch 10, and the other convolutions up to 1.4x slower; :data:`CPU_OPTIONS` keeps YNNPACK for
dots only (``experiments/README.md`` has the measurements). They change which kernels run, not
the float32 math: every Caffe reference test passes with and without them.

``fcn_jax.jit(module.apply)`` is ``jax.jit`` with these options; the library's own compiled
paths (``compile_forward``, ``fcn-jax predict``, ``dense``, the demo) use them already. For a
plain ``jax.jit`` anywhere in a process, ``inference.use_fast_cpu_flags()`` sets the same
choices in ``XLA_FLAGS`` before JAX starts.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["CPU_OPTIONS", "compiler_options", "jit"]

#: XLA:CPU debug options (``compiler_options`` of ``jax.jit``), the per-function form of
#: ``inference.FAST_CPU_XLA_FLAGS``.
CPU_OPTIONS: Mapping[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_use_xnnpack": False,
}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The options for ``backend`` (default: JAX's default backend): :data:`CPU_OPTIONS` on
    CPU, none elsewhere. An option this jaxlib does not know, or that ``XLA_FLAGS`` already
    sets (the user's choice wins), is left out."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in _supported_cpu_options().items() if f"--{k}" not in flags}


@functools.cache
def _supported_cpu_options() -> dict[str, Any]:
    """The subset of :data:`CPU_OPTIONS` that this jaxlib accepts (probed once, on a tiny
    function)."""
    ok = {}
    for k, v in CPU_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1).lower(jnp.zeros((2,), jnp.float32)).compile(
                compiler_options={k: v})
        except Exception:  # an unknown option or value: XLA refuses it, we leave it out
            continue
        ok[k] = v
    return ok


def jit(fun: Callable, **kwargs: Any) -> Callable:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` (options passed in
    ``compiler_options=`` win)."""
    opts = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    if not opts:
        return jax.jit(fun, **kwargs)
    try:
        return jax.jit(fun, compiler_options=opts, **kwargs)
    except TypeError:  # a JAX without per-function compiler options
        return jax.jit(fun, **kwargs)
