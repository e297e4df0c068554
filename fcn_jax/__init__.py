"""fcn-jax: Caffe models in JAX, net surgery as pure tree transforms, fully convolutional
CaffeNet and sliding-window fine-tuning."""

from __future__ import annotations

from converters import load_caffe

from .caffenet import CAFFENET_WIDTHS, CaffeNet, caffenet_prototxt
from .layer_table import register_layer
from .net import CaffeGraph
from .xla import compiler_options, jit

__version__ = "0.1.0"

__all__ = ["CAFFENET_WIDTHS", "CaffeGraph", "CaffeNet", "__version__", "caffenet_prototxt",
           "compiler_options", "jit", "load_caffe", "register_layer"]
