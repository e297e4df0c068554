"""fcn-jax: Caffe models in JAX, net surgery as pure tree transforms, fully convolutional
CaffeNet and sliding-window fine-tuning.

Names that need JAX (``CaffeNet``, ``CaffeGraph``, ``jit``, ...) and the submodules
(``fcn_jax.surgery``, ``fcn_jax.dense``, ...) are imported on first use, so that importing the
package (and ``fcn-jax --help``) does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .assets import imagenet_labels, tutorial_file

__version__ = "0.1.0"

#: Lazily imported names: attribute -> (module, name in it).
_LAZY = {
    "load_caffe": ("converters", "load_caffe"),
    "CAFFENET_WIDTHS": ("fcn_jax.caffenet", "CAFFENET_WIDTHS"),
    "CaffeNet": ("fcn_jax.caffenet", "CaffeNet"),
    "caffenet_prototxt": ("fcn_jax.caffenet", "caffenet_prototxt"),
    "CaffeGraph": ("fcn_jax.net", "CaffeGraph"),
    "compiler_options": ("fcn_jax.xla", "compiler_options"),
    "register_layer": ("fcn_jax.layer_table", "register_layer"),
    "jit": ("fcn_jax.xla", "jit"),
    "get_solver": ("fcn_jax.solver", "get_solver"),
    "Solver": ("fcn_jax.solver", "Solver"),
}
_SUBMODULES = frozenset({
    "assets", "builtin_layers", "caffenet", "cli", "commands", "data", "demo", "dense",
    "export", "fork_layers", "images", "inference", "io_utils", "layer_table", "layers",
    "losses", "net", "netdef", "nhwc", "predict", "preprocess", "recipes", "solver", "surgery",
    "train", "viz", "xla"})

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from converters import load_caffe

    from .caffenet import CAFFENET_WIDTHS, CaffeNet, caffenet_prototxt
    from .layer_table import register_layer
    from .net import CaffeGraph
    from .solver import Solver, get_solver
    from .xla import compiler_options, jit


def __getattr__(name: str) -> Any:
    """Import a JAX-using name or a submodule on first access (PEP 562)."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = ["CAFFENET_WIDTHS", "CaffeGraph", "CaffeNet", "Solver", "__version__",
           "caffenet_prototxt", "compiler_options", "get_solver", "imagenet_labels", "jit",
           "load_caffe", "register_layer", "tutorial_file"]
