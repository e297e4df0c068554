"""Caffe <-> pytree converters: read/write prototxt and caffemodel (V1, V2), and Caffe
weights as safetensors. No JAX needed, except for ``load_caffe``, which builds a Flax
module."""

from __future__ import annotations

from ._load import load_caffe, load_weights
from .caffe_io import (
    BLOB_DTYPES,
    PARAM_NAMES,
    build_caffemodel,
    caffe_blob_shape,
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
from .errors import CaffeFormatError, ParamMismatchError, UnsupportedLayerError
from .proto import caffe_pb2
from .safetensors_io import load_safetensors, safetensors_metadata, save_safetensors


def __getattr__(name: str):
    """``fully_convolutional_net`` (a net rewrite that needs the layer table, which imports
    JAX) is imported on first use: ``import converters`` stays free of JAX."""
    if name == "fully_convolutional_net":
        from fcn_jax.netdef import fully_convolutional_net

        return fully_convolutional_net
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BLOB_DTYPES", "PARAM_NAMES", "CaffeFormatError", "ParamMismatchError",
    "UnsupportedLayerError", "build_caffemodel", "caffe_blob_shape", "caffe_pb2", "filter_net",
    "format_prototxt", "fully_convolutional_net", "load_caffe", "load_caffemodel",
    "load_safetensors", "load_weights",
    "net_params", "param_names", "parse_caffemodel", "parse_prototxt", "read_caffemodel",
    "read_net", "read_prototxt", "resolve_memory_budget", "safetensors_metadata",
    "save_caffemodel", "save_safetensors", "upgrade_net",
    "write_prototxt",
]
