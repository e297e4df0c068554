"""Per-compilation XLA options: the kernels that run Caffe nets fastest, chosen for each
compiled function rather than for the whole process.

On XLA:CPU (jaxlib 0.10) the default hands every convolution to YNNPACK, which is slower
than XLA's own Eigen kernels for CaffeNet's convolutions; :data:`CPU_OPTIONS` keeps YNNPACK
for dots only (why, with the measurements: ``experiments/README.md``). They change which
kernels run, not the precision (float32, ``Precision.HIGHEST``): results can differ in the
last bits (another summation order), and every Caffe reference test passes with and without
them.

``fcn_jax.jit(module.apply)`` is ``jax.jit`` with these options; the library's own compiled
paths (``compile_forward``, ``fcn-jax predict``, ``dense``, the demo) use them already. For a
plain ``jax.jit`` anywhere in a process, ``inference.use_fast_cpu_flags()`` sets the same
choices in ``XLA_FLAGS`` before JAX starts.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["CPU_OPTIONS", "compiler_options", "jit"]

#: XLA:CPU debug options (``compiler_options`` of ``jax.jit``), the per-function form of
#: ``inference.FAST_CPU_XLA_FLAGS``.
CPU_OPTIONS: Mapping[str, Any] = types.MappingProxyType({
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_use_xnnpack": False,
})


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The options for ``backend`` (default: JAX's default backend, which this starts):
    :data:`CPU_OPTIONS` on CPU, none elsewhere. An option this jaxlib does not know, or that
    ``XLA_FLAGS`` already sets (the user's choice wins), is left out."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    names = {f.split("=")[0].lstrip("-") for f in os.environ.get("XLA_FLAGS", "").split()}
    return {k: v for k, v in _supported_cpu_options().items() if k not in names}


@functools.cache
def _supported_cpu_options() -> dict[str, Any]:
    """The subset of :data:`CPU_OPTIONS` that this jaxlib accepts (probed once, on a tiny
    function compiled for the CPU)."""
    x = jax.device_put(jnp.zeros((2,), jnp.float32), jax.devices("cpu")[0])
    ok = {}
    for k, v in CPU_OPTIONS.items():
        try:
            jax.jit(lambda a: a + 1).lower(x).compile(compiler_options={k: v})
        except (RuntimeError, ValueError, TypeError):  # XLA refuses an unknown option/value
            continue
        ok[k] = v
    return ok


def jit(fun: Callable, **kwargs: Any) -> Callable:
    """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options`; an explicit
    ``compiler_options=`` mapping replaces them (``{}``: XLA's defaults). The options are
    looked up at the first call (or ``lower``), so wrapping starts no JAX backend."""
    user = kwargs.pop("compiler_options", None)
    return _LazyJit(fun, None if user is None else dict(user), kwargs)


def _jit_with(fun: Callable, options: Mapping[str, Any] | None, **kwargs: Any) -> Callable:
    """``jax.jit(fun, compiler_options=options, **kwargs)``, leaving the argument out when
    there are none (or on a JAX whose ``jit`` does not take it)."""
    if not options:
        return jax.jit(fun, **kwargs)
    try:
        return jax.jit(fun, compiler_options=dict(options), **kwargs)
    except TypeError:  # a JAX without per-function compiler options
        return jax.jit(fun, **kwargs)


class _LazyJit:
    """A ``jax.jit`` object built at first use (call, ``lower``, ``trace``, ...)."""

    def __init__(self, fun: Callable, options: dict[str, Any] | None, kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun, self._options, self._kwargs = fun, options, kwargs
        self._jitted: Callable | None = None

    def _get(self) -> Callable:
        if self._jitted is None:
            opts = compiler_options() if self._options is None else self._options
            self._jitted = _jit_with(self._fun, opts, **self._kwargs)
        return self._jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fun", "_options", "_kwargs", "_jitted"):
            raise AttributeError(name)
        return getattr(self._get(), name)
