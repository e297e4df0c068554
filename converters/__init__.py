"""Caffe <-> pytree converters: read/write prototxt and caffemodel (V1, V2). No JAX needed,
except for ``load_caffe``, which builds a Flax module."""

from __future__ import annotations

from ._load import load_caffe
from .caffe_io import (
    PARAM_NAMES,
    build_caffemodel,
    filter_net,
    format_prototxt,
    load_caffemodel,
    net_params,
    param_names,
    parse_caffemodel,
    parse_prototxt,
    read_caffemodel,
    read_net,
    read_prototxt,
    resolve_memory_budget,
    save_caffemodel,
    upgrade_net,
    write_prototxt,
)
from .errors import CaffeFormatError, UnsupportedLayerError
from .fcn import fully_convolutional_net
from .proto import caffe_pb2

__all__ = [
    "PARAM_NAMES", "CaffeFormatError", "UnsupportedLayerError", "build_caffemodel",
    "caffe_pb2", "filter_net", "format_prototxt", "fully_convolutional_net", "load_caffe",
    "load_caffemodel",
    "net_params", "param_names", "parse_caffemodel", "parse_prototxt", "read_caffemodel",
    "read_net", "read_prototxt", "resolve_memory_budget", "save_caffemodel", "upgrade_net",
    "write_prototxt",
]
