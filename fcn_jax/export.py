"""Deployment artifacts with ``jax.export``: a Caffe net's jitted forward serialized as
StableHLO, runnable by a service with JAX alone::

    exp = jax.export.deserialize(open("net.jaxexport", "rb").read())
    out = exp.call(x)                       # weights embedded; {blob: array}
    out = exp.call(weights, x)              # weights_path=: weights = safetensors.numpy
                                            # .load_file("net.safetensors")

The batch dimension is symbolic by default (any batch size runs the same artifact); the
spatial size is fixed (``input_size``, default the prototxt's). The outputs are the net's
final blobs (tops no other layer reads), or ``outputs=``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import converters
from converters import CaffeFormatError
from converters.files import atomic_write_bytes

PathLike = str | os.PathLike

__all__ = ["export_forward", "export_net", "final_blobs", "load_exported", "save_exported"]


def final_blobs(module: Any) -> tuple[str, ...]:
    """The blobs a ``CaffeGraph`` ends in: tops that no other layer reads (in-place layers
    do not count as readers), in execution order."""
    read = {b for s in module.layers for b in s.bottoms if b not in s.tops}
    out: list[str] = []
    for s in module.layers:
        for t in s.tops:
            if t not in read and t not in out and t not in module.inputs:
                out.append(t)
    return tuple(out)


def export_forward(module: Any, params: Mapping[str, Mapping[str, Any]],
                   input_shape: Sequence[int], *, batch: int | str = "dynamic",
                   outputs: Sequence[str] | None = None, embed_weights: bool = True,
                   platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """``jax.export`` of ``x -> module.apply({"params": params}, x, outputs=...)`` for NCHW
    float32 inputs of ``input_shape`` (C, H, W) or (N, C, H, W) (its N is replaced by
    ``batch``: an int, or ``"dynamic"`` for a symbolic batch dimension).

    ``embed_weights=True``: the weights are constants of the program, ``call(x)``. False:
    they are its first argument, ``call(weights, x)`` with ``weights`` a flat
    ``{"layer/blob": array}`` dict (as in :func:`converters.save_safetensors`).
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {input_shape}")
    if batch == "dynamic":
        (n,) = jax.export.symbolic_shape("batch")
    elif isinstance(batch, int) and batch >= 1:
        n = batch
    else:
        raise ValueError(f"batch must be a positive int or 'dynamic', got {batch!r}")
    outs = tuple(outputs) if outputs else final_blobs(module)
    x_spec = jax.ShapeDtypeStruct((n, *shape), jnp.float32)
    flat = {f"{layer}/{blob}": np.asarray(v, np.float32)
            for layer, blobs in params.items() for blob, v in blobs.items()}

    def nest(w: Mapping[str, Any]) -> dict:
        tree: dict[str, dict[str, Any]] = {}
        for key, v in w.items():
            layer, _, blob = key.rpartition("/")
            tree.setdefault(layer, {})[blob] = v
        return tree

    def forward(w, x):
        return module.apply({"params": nest(w)}, x, outputs=outs)

    kw = {} if platforms is None else {"platforms": tuple(platforms)}
    if embed_weights:
        consts = {k: jnp.asarray(v) for k, v in flat.items()}
        return jax.export.export(jax.jit(lambda x: forward(consts, x)), **kw)(x_spec)
    w_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    return jax.export.export(jax.jit(forward), **kw)(w_spec, x_spec)


def save_exported(path: PathLike, exported: jax.export.Exported) -> None:
    """Write ``exported.serialize()`` to ``path`` atomically."""
    atomic_write_bytes(path, exported.serialize())


def load_exported(path: PathLike) -> jax.export.Exported:
    """``jax.export.deserialize`` of a file (what a service does without this library)."""
    from converters.files import open_regular

    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffers raise assorted errors on foreign bytes
        raise CaffeFormatError(f"not a jax.export artifact ({type(e).__name__})",
                               path=path) from None


def _write_all(data: bytes, f: Any) -> None:
    f.write(memoryview(data))


def export_net(prototxt: PathLike, weights: PathLike | None, path: PathLike, *,
               input_size: tuple[int, int] | None = None, batch: int | str = "dynamic",
               outputs: Sequence[str] | None = None, weights_path: PathLike | None = None,
               platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """Export a Caffe net (prototxt + caffemodel/safetensors) to ``path``. ``weights_path``:
    the weights go to that safetensors file instead of into the program."""
    from converters.files import atomic_write_group
    from converters.safetensors_io import safetensors_bytes

    from .io_utils import prepare_output
    from .net import build_module, example_inputs

    # every output checked against every input before anything is read or written
    sources = [prototxt, weights if isinstance(weights, (str, os.PathLike)) else None]
    prepare_output(path, sources, create=False)
    if weights_path is not None:
        prepare_output(weights_path, [*sources, path], create=False)
    net = converters.read_prototxt(prototxt)
    module = build_module(net, path=prototxt)
    if len(module.inputs) != 1:
        raise CaffeFormatError(f"export needs a net with one input, not {list(module.inputs)}",
                               path=prototxt)
    try:
        shape = tuple(next(iter(example_inputs(module).values())).shape)
    except ValueError:
        shape = None
    if input_size is not None:
        if shape is None:
            raise CaffeFormatError("the prototxt gives no input shape (channels): add an "
                                   "Input layer with its dims", path=prototxt, field="input")
        shape = (*shape[:2], *(int(v) for v in input_size))
    if shape is None or len(shape) != 4:
        raise CaffeFormatError(f"export needs a 4-D input shape, got {shape}", path=prototxt,
                               field="input")
    _, params = converters.load_caffe(prototxt, weights, input_shape=shape)
    unknown = sorted(set(outputs or ()) - set(final_blobs(module)) -
                     {t for s in module.layers for t in s.tops})
    if unknown:
        raise CaffeFormatError(f"unknown blobs {unknown}", path=prototxt, field="outputs")
    try:
        exported = export_forward(module, params, shape, batch=batch, outputs=outputs,
                                  embed_weights=weights_path is None, platforms=platforms)
    except (ValueError, TypeError) as e:
        raise CaffeFormatError(f"the forward cannot be exported for input {shape}: {e}",
                               path=prototxt) from None
    files = [(prepare_output(path, sources), exported.serialize())]
    if weights_path is not None:  # the program and its weights: all new or all old
        files.insert(0, (prepare_output(weights_path, sources),
                         safetensors_bytes(params, net)))
    atomic_write_group([(p, functools.partial(_write_all, data)) for p, data in files])
    return exported
