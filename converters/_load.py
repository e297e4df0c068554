"""``converters.load_caffe``: ``fcn_jax.net.load_caffe`` behind the readers' error contract.

Everything a hostile prototxt or caffemodel can cause while the net is built comes out as a
one-line ``CaffeFormatError`` naming the file, and filler-initialised parameters are
refused, before allocating, when they would exceed the memory budget.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any

import numpy as np

from .caffe_io import check_param_dtypes, read_prototxt, resolve_memory_budget, upgrade_net
from .errors import CaffeFormatError, ParamMismatchError

#: Exceptions that shape inference (JAX tracing) raises for a net that cannot be built.
_BUILD_ERRORS = (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError,
                 OverflowError, RecursionError)


def load_weights(path, *, memory_budget: int | None = None) -> dict:
    """``params[layer][blob]`` from a ``.caffemodel`` or a ``.safetensors`` file (told apart
    by their first bytes; the safetensors tensors are memory-mapped), or an older fcn-jax
    ``fcn-jax/2`` weights file."""
    from .legacy_checkpoint import is_legacy_checkpoint, load_legacy_checkpoint
    from .safetensors_io import is_safetensors, load_safetensors

    if is_safetensors(path):
        return load_safetensors(path, memory_budget=memory_budget)
    if is_legacy_checkpoint(path):
        tree, _ = load_legacy_checkpoint(path, max_bytes=memory_budget)
        for layer, blobs in tree.items():
            if not isinstance(blobs, dict) or not all(
                    isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in blobs.values()):
                raise CaffeFormatError("not a params tree of float arrays", path=path,
                                       layer=layer)
        return tree
    from .caffe_io import load_caffemodel

    return load_caffemodel(path, memory_budget=memory_budget)


def load_caffe(prototxt, caffemodel=None, *, memory_budget: int | None = None, **kwargs):
    """Build ``(module, params)`` from a prototxt and optional weights.

    ``caffemodel``: a ``.caffemodel``, a ``.safetensors`` file (``fcn-jax convert``), a params
    pytree, or None. ``module.apply({"params": params}, x)`` returns every blob by Caffe
    name. Without weights, params come from the prototxt fillers. See ``fcn_jax.net.load_caffe`` for
    ``phase``, ``input_shape``, ``strict`` and ``seed``. Any problem with the files raises
    ``CaffeFormatError``.
    """
    from fcn_jax import net as _net

    inspect.signature(_net.load_caffe).bind(prototxt, caffemodel, **kwargs)  # caller errors
    path = prototxt if isinstance(prototxt, (str, os.PathLike)) else None
    budget = resolve_memory_budget(memory_budget)
    try:
        if isinstance(prototxt, (str, os.PathLike)):
            prototxt = read_prototxt(prototxt, memory_budget=budget)
            net_arg: Any = prototxt
        else:
            net_arg = upgrade_net(prototxt)
        if caffemodel is None or kwargs.get("strict") is False:
            _check_filler_budget(_net, net_arg, kwargs, budget, path)
        if isinstance(caffemodel, (str, os.PathLike)):
            stored = load_weights(caffemodel, memory_budget=budget)
            _warn_unused(net_arg, stored, caffemodel, kwargs)
            return _with_model_path(_net.load_caffe, net_arg, stored, caffemodel, path,
                                    kwargs)
        if caffemodel is not None:
            check_param_dtypes(caffemodel)
        return _with_model_path(_net.load_caffe, net_arg, caffemodel, None, path, kwargs)
    except CaffeFormatError as e:
        raise e.with_context(path=path) from e.__cause__
    except _BUILD_ERRORS as e:
        raise CaffeFormatError(f"the net cannot be built: {type(e).__name__}: {e}",
                               path=path) from e


def _with_model_path(load, net, params, model_path, net_path, kwargs):
    """Call ``load``; errors about params name the caffemodel, others the prototxt."""
    try:
        return load(net, params, **kwargs)
    except CaffeFormatError as e:
        if e.path is None or e.path == "<net>":
            about_params = isinstance(e, ParamMismatchError)
            where = model_path if (about_params and model_path is not None) else net_path
            raise type(e)(e.reason, path=where, layer=e.layer, field=e.field) from None
        raise


def _warn_unused(net, stored, model_path, kwargs: dict) -> None:
    """Caffe's "Ignoring source layer": weights for layers the net does not have. Expected
    after surgery (renamed layers); otherwise a sign of a truncated prototxt or the wrong
    caffemodel."""
    from .caffe_io import filter_net

    try:
        names = {lp.name for lp in filter_net(net, phase=kwargs.get("phase", "TEST"),
                                              stages=kwargs.get("stages", ()),
                                              level=kwargs.get("level")).layer}
    except (CaffeFormatError, KeyError):
        return
    unused = [k for k in stored if k not in names]
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8
                                         else "")
        warnings.warn(f"{os.fspath(model_path)}: ignoring weights of layers the net does not "
                      f"have: {shown}", UserWarning, stacklevel=3)


def _check_filler_budget(_net, net, kwargs: dict, budget: int, path) -> None:
    """Refuse fillers that would allocate more parameter bytes than the budget."""
    outputs = kwargs.get("outputs")
    module = _net.build_module(net, phase=kwargs.get("phase", "TEST"),
                               stages=kwargs.get("stages", ()), level=kwargs.get("level"),
                               path=path if path is not None else "<net>",
                               outputs=(outputs,) if isinstance(outputs, str) else outputs)
    try:
        _net.example_inputs(module, kwargs.get("input_shape"))
    except ValueError:
        return  # no input shape known: nothing is allocated until apply
    # a net that cannot be built at its declared size raises here, before any allocation
    shapes = _net.expected_param_shapes(module, kwargs.get("input_shape"))
    sizes = {(layer, name): math.prod(shape) * 4
             for layer, blobs in shapes.items() for name, shape in blobs.items()}
    total = sum(sizes.values())
    if total > budget:
        (layer, name), biggest = max(sizes.items(), key=lambda kv: kv[1])
        raise CaffeFormatError(
            f"the net's parameters need {total} bytes ({name} alone {biggest}), over the "
            f"memory budget of {budget}", path=path, layer=layer, field=name)
