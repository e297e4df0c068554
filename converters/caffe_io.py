"""Read and write Caffe nets: ``.prototxt`` (text) and ``.caffemodel`` (binary), V1 and V2.

Everything here is numpy + protobuf; no JAX. Nets are returned as V2 ``NetParameter``
messages (V1 ``layers`` and the ``input``/``input_dim`` fields upgraded as Caffe's
``UpgradeNetAsNeeded`` does); weights as a params pytree
``params[layer_name][blob_name] -> np.ndarray`` in Caffe's shapes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from ._io import atomic_write_bytes
from .errors import CaffeFormatError
from .proto import caffe_fast_pb2, caffe_pb2

PathLike = str | os.PathLike
Params = dict[str, dict[str, np.ndarray]]

#: Names given to each layer type's parameter blobs, in Caffe's blob order.
PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "Convolution": ("weight", "bias"),
    "Deconvolution": ("weight", "bias"),
    "InnerProduct": ("weight", "bias"),
    "Embed": ("weight", "bias"),
    "BatchNorm": ("mean", "variance", "scale_factor"),
    "Scale": ("scale", "bias"),
    "Bias": ("bias",),
    "PReLU": ("slope",),
}

#: Protobuf refuses messages of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Default ceiling on the bytes a single file may make us allocate.
DEFAULT_MEMORY_BUDGET = 8 * 2**30

# UpgradeV1LayerType in Caffe's upgrade_proto.cpp
_V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}


def param_names(layer_type: str, count: int) -> tuple[str, ...]:
    """Names of a layer's parameter blobs: readable for known types, ``blob{i}`` otherwise."""
    names = PARAM_NAMES.get(layer_type, ())
    return tuple(names[i] if i < len(names) else f"blob{i}" for i in range(count))


# ----------------------------------------------------------------------------- text


_UNKNOWN_FIELD = re.compile(r'has no field named "(\w+_param)"')


def parse_prototxt(text: str, path: PathLike = "<string>"):
    """Parse prototxt text into a V2 ``caffe.NetParameter`` (V1 and input fields upgraded).

    A syntax error raises ``CaffeFormatError`` with the line and column. A ``*_param``
    field unknown to BVLC Caffe (a fork's layer, e.g. SSD's ``norm_param``) is skipped so
    that the unsupported layer type can be reported by name when the net is built.
    """
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as e:
        if _UNKNOWN_FIELD.search(str(e)):
            net = caffe_pb2.NetParameter()
            try:
                text_format.Parse(text, net, allow_unknown_field=True)
            except text_format.ParseError as e2:
                raise _syntax_error(e2, path) from None
        else:
            raise _syntax_error(e, path) from None
    return upgrade_net(net, path)


def _syntax_error(e: text_format.ParseError, path: PathLike) -> CaffeFormatError:
    msg = str(e)
    line, col = e.GetLine(), e.GetColumn()
    msg = re.sub(r"^\d+:\d+\s*:\s*", "", msg)
    where = f"line {line}, column {col}" if line else "syntax"
    return CaffeFormatError(f"syntax error: {msg}", path=path, field=where)


def read_prototxt(path: PathLike):
    """Read a ``.prototxt`` net definition (V1 or V2) into a V2 ``caffe.NetParameter``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(PROTOBUF_LIMIT + 1)
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror}", path=path) from None
    if len(raw) > PROTOBUF_LIMIT:
        raise CaffeFormatError("file exceeds protobuf's 2 GiB limit", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaffeFormatError(f"not a text prototxt (byte {e.start} is not UTF-8)",
                               path=path) from None
    return parse_prototxt(text, path)


def format_prototxt(net) -> str:
    """The prototxt text of a ``NetParameter``."""
    return text_format.MessageToString(net)


def write_prototxt(path: PathLike, net) -> None:
    """Write a ``NetParameter`` as prototxt text, atomically."""
    atomic_write_bytes(path, format_prototxt(net).encode())


# ----------------------------------------------------------------------------- upgrade


def upgrade_net(net, path: PathLike = "<net>"):
    """Upgrade a ``NetParameter`` in Caffe's legacy forms to V2, returning a new message.

    Mirrors ``UpgradeNetAsNeeded``: V1 ``layers`` become ``layer`` with string types and
    ``blobs_lr``/``weight_decay`` as ``param { lr_mult decay_mult }``; the deprecated
    ``input``/``input_shape``/``input_dim`` fields become an ``Input`` layer named "input".
    """
    pb = _schema_of(net)
    if not net.layers and not net.input:
        return net
    if net.layers and net.layer:
        raise CaffeFormatError("net mixes V1 'layers' and V2 'layer' fields", path=path,
                               field="layers")
    out = pb.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layers")
    out.ClearField("layer")
    out.ClearField("input")
    out.ClearField("input_shape")
    out.ClearField("input_dim")
    if net.input:
        layer = out.layer.add(name="input", type="Input")
        layer.top.extend(net.input)
        if net.input_shape:
            if len(net.input_shape) not in (1, len(net.input)):
                raise CaffeFormatError("needs one input_shape per input", path=path,
                                       field="input_shape")
            for s in net.input_shape:
                layer.input_param.shape.add().CopyFrom(s)
        elif net.input_dim:
            dims = list(net.input_dim)
            if len(dims) != 4 * len(net.input):
                raise CaffeFormatError(
                    f"needs 4 input_dim values per input, got {len(dims)} for "
                    f"{len(net.input)} inputs", path=path, field="input_dim")
            for i in range(len(net.input)):
                layer.input_param.shape.add().dim.extend(dims[4 * i:4 * i + 4])
    source = list(net.layer) if net.layer else [_upgrade_v1_layer(v1, pb, path)
                                                   for v1 in net.layers]
    for layer in source:
        out.layer.add().CopyFrom(layer)
    return out


def _schema_of(msg):
    return caffe_fast_pb2 if msg.DESCRIPTOR.file.package == "caffe_fast" else caffe_pb2


def _upgrade_v1_layer(v1, pb, path: PathLike):
    name = v1.name
    if not v1.HasField("type") or v1.type == 0:
        raise CaffeFormatError("V1 layer without a type (V0 nets are not supported)",
                               path=path, layer=name or "?", field="type")
    enum_name = v1.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[v1.type].name
    layer = pb.LayerParameter(name=name, type=_V1_TYPES[enum_name])
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    layer.loss_weight.extend(v1.loss_weight)
    for rule in v1.include:
        layer.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        layer.exclude.add().CopyFrom(rule)
    for blob in v1.blobs:
        layer.blobs.add().CopyFrom(blob)
    n_specs = max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    for field, value in v1.ListFields():
        if field.name.endswith("_param") and field.name in layer.DESCRIPTOR.fields_by_name:
            getattr(layer, field.name).CopyFrom(value)
    return layer


# ----------------------------------------------------------------------------- phase


def filter_net(net, phase: str = "TEST", stages: tuple[str, ...] = (), level: int = 0):
    """Keep the layers whose include/exclude rules admit this state (Caffe's ``FilterNet``)."""
    phase_id = {"TRAIN": 0, "TEST": 1}[phase]

    def meets(rule) -> bool:
        if rule.HasField("phase") and rule.phase != phase_id:
            return False
        if rule.HasField("min_level") and level < rule.min_level:
            return False
        if rule.HasField("max_level") and level > rule.max_level:
            return False
        if any(s not in stages for s in rule.stage):
            return False
        return not any(s in stages for s in rule.not_stage)

    out = type(net)()
    out.CopyFrom(net)
    del out.layer[:]
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise CaffeFormatError("layer has both include and exclude rules",
                                   layer=layer.name, field="include")
        keep = any(meets(r) for r in layer.include) if layer.include else not any(
            meets(r) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


# ----------------------------------------------------------------------------- binary


def read_caffemodel(path: PathLike, *, memory_budget: int = DEFAULT_MEMORY_BUDGET):
    """Read a ``.caffemodel`` (V1 or V2) into a V2 NetParameter of the fast schema.

    Each blob's ``data`` is raw little-endian float32 ``bytes`` (``double_data`` float64).
    """
    try:
        size = os.path.getsize(path)
        if size > PROTOBUF_LIMIT:
            raise CaffeFormatError(f"file of {size} bytes exceeds protobuf's 2 GiB limit",
                                   path=path)
        if size > memory_budget:
            raise CaffeFormatError(f"file of {size} bytes exceeds the memory budget of "
                                   f"{memory_budget} bytes", path=path)
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror}", path=path) from None
    return parse_caffemodel(raw, path)


def parse_caffemodel(raw: bytes, path: PathLike = "<bytes>"):
    """Parse caffemodel bytes; see ``read_caffemodel``."""
    net = caffe_fast_pb2.NetParameter()
    try:
        net.ParseFromString(raw)
    except (pb_message.DecodeError, RuntimeError, ValueError) as e:
        raise CaffeFormatError(f"not a valid caffemodel (truncated or corrupt: {e})",
                               path=path) from None
    if _has_unpacked_arrays(net):
        # a writer that did not pack BlobProto.data: fall back to the exact schema
        net = caffe_pb2.NetParameter()
        try:
            net.ParseFromString(raw)
        except (pb_message.DecodeError, RuntimeError, ValueError) as e:
            raise CaffeFormatError(f"not a valid caffemodel ({e})", path=path) from None
    if not net.layer and not net.layers:
        raise CaffeFormatError("no layers: not a caffemodel, or an empty one", path=path)
    return upgrade_net(net, path)


def _has_unpacked_arrays(net) -> bool:
    """True when a blob declares a non-empty shape but no packed payload was found."""
    for layer in list(net.layer) + list(net.layers):
        for blob in layer.blobs:
            dims = _blob_dims(blob)
            if dims and math.prod(dims) > 0 and not blob.data and not blob.double_data:
                return True
    return False


def _blob_dims(blob) -> tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    legacy = (blob.num, blob.channels, blob.height, blob.width)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return tuple(int(d) for d in legacy)
    return ()


def blob_to_array(blob, *, path: PathLike = "<net>", layer: str = "?", field: str = "blob",
                  memory_budget: int = DEFAULT_MEMORY_BUDGET) -> np.ndarray:
    """A ``BlobProto`` as a float32 numpy array in its stored shape, validated.

    Refuses negative dims, shapes over the memory budget (before allocating) and data whose
    length disagrees with the shape. Legacy 4-D blobs keep their 4 dims.
    """
    dims = _blob_dims(blob)
    if any(d < 0 for d in dims):
        raise CaffeFormatError(f"negative dimension in shape {dims}", path=path, layer=layer,
                               field=field)
    count = math.prod(dims)
    if count * 4 > memory_budget:
        raise CaffeFormatError(f"shape {dims} needs {count * 4} bytes, over the memory budget "
                               f"of {memory_budget}", path=path, layer=layer, field=field)
    data, double = blob.data, blob.double_data
    if isinstance(data, bytes):
        if len(data) % 4 or len(double) % 8:
            raise CaffeFormatError("float data length is not a multiple of the element size",
                                   path=path, layer=layer, field=field)
        arr = (np.frombuffer(data, dtype="<f4") if data or not double
               else np.frombuffer(double, dtype="<f8").astype(np.float32))
    else:
        arr = np.asarray(data if len(data) or not len(double) else double, dtype=np.float32)
    if arr.size != count:
        raise CaffeFormatError(f"holds {arr.size} values but its shape {dims} needs {count}",
                               path=path, layer=layer, field=field)
    return arr.astype(np.float32, copy=False).reshape(dims)


def _squeeze_legacy(layer_type: str, name: str, arr: np.ndarray, blob) -> np.ndarray:
    """Legacy 4-D V1 blobs in the modern shapes: biases 1-D, InnerProduct weights 2-D."""
    if blob.HasField("shape") or arr.ndim != 4:
        return arr
    if name == "bias" or (layer_type in ("BatchNorm", "Scale", "PReLU")):
        return arr.reshape(arr.shape[-1])
    if layer_type == "InnerProduct" and name == "weight":
        return arr.reshape(arr.shape[-2:])
    return arr


def net_params(net, *, path: PathLike = "<net>",
               memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Params:
    """The parameter blobs held in a NetParameter, as ``params[layer][name]`` numpy arrays."""
    params: Params = {}
    total = 0
    for layer in net.layer:
        if not layer.blobs:
            continue
        if layer.name in params:
            raise CaffeFormatError("duplicate layer name", path=path, layer=layer.name,
                                   field="name")
        names = param_names(layer.type, len(layer.blobs))
        entry = {}
        for i, (name, blob) in enumerate(zip(names, layer.blobs, strict=True)):
            arr = blob_to_array(blob, path=path, layer=layer.name, field=f"blobs[{i}]",
                                memory_budget=memory_budget - total)
            total += arr.nbytes
            entry[name] = _squeeze_legacy(layer.type, name, arr, blob)
        params[layer.name] = entry
    return params


def load_caffemodel(path: PathLike, *,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Params:
    """Read a ``.caffemodel`` (V1 or V2) into ``params[layer_name][blob_name]`` arrays.

    Convolution ``{"weight": (O, I/group, kh, kw), "bias": (O,)}``, InnerProduct
    ``{"weight": (N, K), "bias": (N,)}`` (legacy 1x1xNxK squeezed), BatchNorm
    ``mean/variance/scale_factor``, Scale ``scale/bias``, PReLU ``slope``.
    """
    net = read_caffemodel(path, memory_budget=memory_budget)
    return net_params(net, path=path, memory_budget=memory_budget)


def read_net(path: PathLike):
    """Read a net definition from a ``.prototxt`` or the structure of a ``.caffemodel``."""
    with open(path, "rb") as f:
        head = f.read(64)
    if _looks_binary(head):
        return read_caffemodel(path)
    return read_prototxt(path)


def _looks_binary(head: bytes) -> bool:
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(b < 9 or 13 < b < 32 for b in head)


# ----------------------------------------------------------------------------- write


def _array_blob(blob, arr: Any) -> None:
    arr = np.ascontiguousarray(np.asarray(arr, dtype="<f4"))
    blob.shape.dim.extend(arr.shape)
    blob.data = arr.tobytes()


def build_caffemodel(params: Mapping[str, Mapping[str, Any]], net) -> bytes:
    """Serialise ``params`` into a V2 caffemodel for ``net`` (a NetParameter or prototxt path).

    Every layer of ``net`` is written with its definition; layers with entries in ``params``
    get their blobs in Caffe's order. Unknown layer names or blob names raise.
    """
    if isinstance(net, (str, os.PathLike)):
        net = read_prototxt(net)
    out = caffe_fast_pb2.NetParameter()
    out.name = net.name
    known = {layer.name for layer in net.layer}
    extra = sorted(set(params) - known)
    if extra:
        raise CaffeFormatError(f"params for layers not in the net: {extra}", field="params")
    for layer in net.layer:
        dst = out.layer.add()
        dst.ParseFromString(layer.SerializeToString())  # same wire format, fast schema
        del dst.blobs[:]
        entry = params.get(layer.name)
        if not entry:
            continue
        names = list(PARAM_NAMES.get(layer.type, ()))
        extras = sorted(k for k in entry if k not in names)
        generic = sorted(extras, key=lambda k: int(k[4:]) if k[4:].isdigit() else 1 << 30)
        if any(not k.startswith("blob") for k in generic):
            raise CaffeFormatError(f"unknown parameter names {generic} for type {layer.type}",
                                   layer=layer.name, field="params")
        order = [n for n in names if n in entry] + generic
        for name in order:
            _array_blob(dst.blobs.add(), entry[name])
    return out.SerializeToString()


def save_caffemodel(path: PathLike, params: Mapping[str, Mapping[str, Any]], net) -> None:
    """Write ``params`` as a V2 ``.caffemodel`` that Caffe loads, atomically (temp + rename)."""
    data = build_caffemodel(params, net)
    if len(data) > PROTOBUF_LIMIT:
        raise CaffeFormatError("model exceeds protobuf's 2 GiB limit", path=path)
    atomic_write_bytes(path, data)
