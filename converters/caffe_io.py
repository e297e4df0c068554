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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format, unknown_fields

from . import files, wire
from .errors import CaffeFormatError
from .files import atomic_write_bytes
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
    # forks' types (fcn_jax.fork_layers)
    "ConvolutionDepthwise": ("weight", "bias"),
    "Normalize": ("scale",),
}

#: Protobuf refuses messages of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Default ceiling on the bytes a single file may make us allocate.
DEFAULT_MEMORY_BUDGET = 8 * 2**30
#: Environment variable overriding ``DEFAULT_MEMORY_BUDGET`` (bytes, or with a K/M/G suffix).
MEMORY_BUDGET_ENV = "FCN_JAX_MEMORY_BUDGET"
#: Caffe's ``kMaxBlobAxes``.
MAX_BLOB_AXES = 32

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


def resolve_memory_budget(memory_budget: int | None = None) -> int:
    """The memory budget in bytes: ``memory_budget`` if given, else ``$FCN_JAX_MEMORY_BUDGET``
    (e.g. ``4G``, ``512M``, ``1000000``), else ``DEFAULT_MEMORY_BUDGET`` (8 GiB).

    Every reader refuses, before allocating, a file or a shape that would need more.
    """
    if memory_budget is not None:
        return int(memory_budget)
    text = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if not text:
        return DEFAULT_MEMORY_BUDGET
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text, flags=re.IGNORECASE)
    if not m:
        raise CaffeFormatError(f"{MEMORY_BUDGET_ENV}={text!r} is not a size like 4G or 512M",
                               field=MEMORY_BUDGET_ENV)
    scale = 1024 ** " KMGT".index((m.group(2) or " ").upper())
    return int(float(m.group(1)) * scale)


def param_names(layer_type: str, count: int) -> tuple[str, ...]:
    """Names of a layer's parameter blobs: readable for known types, ``blob{i}`` otherwise."""
    names = PARAM_NAMES.get(layer_type, ())
    return tuple(names[i] if i < len(names) else f"blob{i}" for i in range(count))


# ----------------------------------------------------------------------------- text


#: The messages whose unknown ``*_param`` fields (a fork layer's parameters) are skipped.
_LAYER_MESSAGES = frozenset({"caffe.LayerParameter", "caffe.V1LayerParameter"})


class _LayerParamSkipper(text_format._Parser):  # noqa: SLF001 (protobuf's parser class)
    """protobuf's text parser that skips an unknown ``*_param`` field of a layer (and all
    its contents) and refuses every other unknown field, as the strict parser does: a typo
    inside a known message (``strde: 2`` in ``convolution_param``) stays an error."""

    def __init__(self) -> None:
        super().__init__(allow_unknown_field=True)
        self._skipping = 0

    def _SkipFieldContents(self, tokenizer, field_name, immediate_message_type):  # noqa: N802
        if not self._skipping and not (immediate_message_type in _LAYER_MESSAGES
                                       and field_name.endswith("_param")):
            raise tokenizer.ParseErrorPreviousToken(
                f'Message type "{immediate_message_type}" has no field named '
                f'"{field_name}".')
        self._skipping += 1
        try:
            super()._SkipFieldContents(tokenizer, field_name, immediate_message_type)
        finally:
            self._skipping -= 1


def parse_prototxt(text: str, path: PathLike = "<string>", *,
                   memory_budget: int | None = None):
    """Parse prototxt text into a V2 ``caffe.NetParameter`` (V1 and input fields upgraded).

    A syntax error raises ``CaffeFormatError`` with the line and column. A ``*_param``
    field unknown to BVLC Caffe (a fork's layer, e.g. SSD's ``norm_param``) is skipped so
    that the unsupported layer type can be reported by name when the net is built. Input
    shapes are checked: every dim positive, the blob within the memory budget.
    """
    net = caffe_pb2.NetParameter()
    try:
        _LayerParamSkipper().ParseLines(text.split("\n"), net)
    except text_format.ParseError as e:
        raise _syntax_error(e, path, text) from None
    except RecursionError:
        raise CaffeFormatError("syntax error: braces nested too deeply", path=path,
                               field="syntax") from None
    except (ValueError, TypeError, OverflowError) as e:  # protobuf's own checks on values
        raise CaffeFormatError(f"syntax error: {e}", path=path, field="syntax") from None
    net = upgrade_net(net, path)
    check_input_shapes(net, path, memory_budget=memory_budget)
    return net


def check_input_shapes(net, path: PathLike = "<net>", *,
                       memory_budget: int | None = None) -> None:
    """Refuse ``Input`` shapes with a zero or negative dim, more than 32 axes, or a blob
    larger than the memory budget (checked before anything is allocated)."""
    budget = resolve_memory_budget(memory_budget)
    for layer in net.layer:
        if layer.type != "Input":
            continue
        for i, shape in enumerate(layer.input_param.shape):
            dims = tuple(int(d) for d in shape.dim)
            field = f"input_param.shape[{i}]"
            if len(dims) > MAX_BLOB_AXES:
                raise CaffeFormatError(f"{len(dims)} axes, more than Caffe's {MAX_BLOB_AXES}",
                                       path=path, layer=layer.name, field=field)
            if any(d <= 0 for d in dims):
                raise CaffeFormatError(f"dimensions must be positive, got {dims}", path=path,
                                       layer=layer.name, field=field)
            nbytes = math.prod(dims) * 4
            if nbytes > budget:
                raise CaffeFormatError(f"shape {dims} needs {nbytes} bytes, over the memory "
                                       f"budget of {budget}", path=path, layer=layer.name,
                                       field=field)


def _syntax_error(e: text_format.ParseError, path: PathLike, text: str) -> CaffeFormatError:
    msg = str(e)
    line, col = e.GetLine(), e.GetColumn()
    msg = re.sub(r"^\d+:\d+\s*:\s*", "", msg)
    if len(msg) > 200 and msg.startswith("'") and line:
        # protobuf quotes the whole offending line first: keep only the reason
        lines = text.splitlines()
        quoted = len(lines[line - 1]) if line <= len(lines) else 0
        cut = msg.find("': ", max(1, quoted - 10))
        if cut > 0:
            msg = msg[cut + 3:]
    where = f"line {line}, column {col}" if line else "syntax"
    return CaffeFormatError(f"syntax error: {msg}", path=path, field=where)


def _check_size(size: int, path: PathLike, budget: int) -> None:
    if size > PROTOBUF_LIMIT:
        raise CaffeFormatError(f"file of {size} bytes exceeds protobuf's 2 GiB limit "
                               f"({PROTOBUF_LIMIT} bytes)", path=path)
    if size > budget:
        raise CaffeFormatError(f"file of {size} bytes exceeds the memory budget of {budget} "
                               f"bytes (set {MEMORY_BUDGET_ENV} to raise it)", path=path)


def read_file(path: PathLike, budget: int | None = None) -> bytearray:
    """The bytes of a Caffe file, bounded: only regular files (a FIFO never blocks), the
    size checked against protobuf's 2 GiB limit and the memory budget *before* reading,
    and exactly that many bytes allocated (a 112-byte file needs 112 bytes, not the
    budget)."""
    budget = resolve_memory_budget(budget)
    try:
        with files.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            _check_size(size, path, budget)
            raw = files.read_exactly(f, size)
            if len(raw) != size or f.read(1):
                raise CaffeFormatError("the file changed size while it was read", path=path)
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    return raw


def read_prototxt(path: PathLike, *, memory_budget: int | None = None):
    """Read a ``.prototxt`` net definition (V1 or V2) into a V2 ``caffe.NetParameter``.

    Refuses (before reading) files over protobuf's 2 GiB limit or the memory budget, and
    nets without layers (an empty file, or one cut before its first layer).
    """
    budget = resolve_memory_budget(memory_budget)
    raw = read_file(path, budget)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaffeFormatError(f"not a text prototxt (byte {e.start} is not UTF-8)",
                               path=path) from None
    net = parse_prototxt(text, path, memory_budget=budget)
    if not net.layer:
        raise CaffeFormatError("no layers: an empty or truncated net definition", path=path,
                               field="layer")
    return net


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
    # Caffe's UpgradeNetDataTransformation: a V1 data layer's scale, mean_file, crop_size and
    # mirror move into transform_param
    data_param = _V1_TRANSFORM_PARAMS.get(enum_name)
    if data_param is not None and layer.HasField(data_param):
        old = getattr(layer, data_param)
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if old.HasField(name):
                setattr(layer.transform_param, name, getattr(old, name))
                old.ClearField(name)
    return layer


_V1_TRANSFORM_PARAMS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
                        "WINDOW_DATA": "window_data_param"}


# ----------------------------------------------------------------------------- phase


def filter_net(net, phase: str = "TEST", stages: Sequence[str] | None = (),
               level: int | None = None):
    """Keep the layers whose include/exclude rules admit this NetState (Caffe's
    ``FilterNet``): ``phase``; the net's own ``state { stage }`` plus ``stages`` (pycaffe's
    ``Net(..., stages=)`` adds to the file's); ``level``, or the net's ``state { level }``
    when None."""
    if phase not in ("TRAIN", "TEST"):
        raise CaffeFormatError(f"phase {phase!r} is not TRAIN or TEST", field="phase")
    phase_id = {"TRAIN": 0, "TEST": 1}[phase]
    if isinstance(stages, str):
        stages = (stages,)
    stages = tuple(net.state.stage) + tuple(stages or ())
    if level is None:
        level = int(net.state.level)

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


def read_caffemodel(path: PathLike, *, memory_budget: int | None = None):
    """Read a ``.caffemodel`` (V1 or V2) into a V2 NetParameter of the fast schema.

    Each blob's ``data`` is raw little-endian float32 ``bytes`` (``double_data`` float64).
    Files over protobuf's 2 GiB limit or the memory budget are refused before reading.
    """
    budget = resolve_memory_budget(memory_budget)
    return parse_caffemodel(bytes(read_file(path, budget)), path)


def _parse(schema, raw: bytes, path: PathLike):
    net = schema.NetParameter()
    try:
        net.ParseFromString(raw)
    except (pb_message.DecodeError, RuntimeError, ValueError, RecursionError) as e:
        reason = str(e) or type(e).__name__
        raise CaffeFormatError(f"not a valid caffemodel (truncated or corrupt: {reason})",
                               path=path) from None
    return net


def parse_caffemodel(raw: bytes, path: PathLike = "<bytes>"):
    """Parse caffemodel bytes; see ``read_caffemodel``.

    Protobuf's rules hold as in Caffe: a field whose wire type does not match the schema
    is an unknown field and is skipped (a fork's field at a BVLC field number), as are
    unknown field numbers. Refuses an enum value Caffe does not define (protobuf would
    silently use the field's default) and text that is not UTF-8.
    """
    # the fast schema keeps only the last chunk of a packed array split in several, and
    # cannot hold unpacked floats: the wire scanner says when Caffe's exact schema is needed
    exact = wire.scan_caffemodel(raw) is None
    net = _parse(caffe_pb2 if exact else caffe_fast_pb2, raw, path)
    check_wire_types(net, path)
    if not net.layer and not net.layers:
        raise CaffeFormatError("no layers: not a caffemodel, or an empty one", path=path)
    return upgrade_net(net, path)


def _is_repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5.28; `label` went away in 7
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def check_wire_types(net, path: PathLike = "<net>") -> None:
    """Raise ``CaffeFormatError`` for an enum value outside Caffe's enum (protobuf sets it
    aside as unknown and would silently use the default) and for text fields that are not
    UTF-8 (protobuf hands those out as ``bytes``). Unknown field numbers and fields whose
    wire type does not match the schema (a fork's field at a BVLC number) are unknown
    fields, skipped as protobuf and Caffe skip them."""

    def walk(msg, layer: str | None, where: str) -> None:
        desc = msg.DESCRIPTOR
        for u in unknown_fields.UnknownFieldSet(msg):
            fd = desc.fields_by_number.get(u.field_number)
            if fd is not None and fd.type == fd.TYPE_ENUM and u.wire_type == 0:
                raise CaffeFormatError(f"value {u.data} is not a valid {fd.enum_type.name}",
                                       path=path, layer=layer, field=where + fd.name)
        for fd, value in msg.ListFields():
            if fd.type == fd.TYPE_STRING:
                values = value if _is_repeated(fd) else [value]
                if any(isinstance(v, bytes) for v in values):  # upb's invalid UTF-8
                    raise CaffeFormatError("text is not valid UTF-8 (corrupt file)", path=path,
                                           layer=layer, field=where + fd.name)
                continue
            if fd.message_type is None or (where == "" and layer is None
                                           and fd.name in ("layer", "layers")):
                continue
            if _is_repeated(fd):
                for i, item in enumerate(value):
                    walk(item, layer, f"{where}{fd.name}[{i}].")
            else:
                walk(value, layer, f"{where}{fd.name}.")

    walk(net, None, "")
    for kind in ("layer", "layers"):
        if kind not in net.DESCRIPTOR.fields_by_name:
            continue
        for i, layer in enumerate(getattr(net, kind)):
            name = layer.name
            walk(layer, name if name and isinstance(name, str) else f"{kind}[{i}]", "")


def blob_dims(blob) -> tuple[int, ...]:
    """Caffe's ``Blob::FromProto``: the legacy 4-D dims when any is set, else ``shape``."""
    if _has_legacy_dims(blob):
        return tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return ()


def check_blob_dims(dims: tuple[int, ...], *, path: PathLike | None = "<net>",
                    layer: str | None = "?", field: str | None = "blob",
                    memory_budget: int | None = None) -> int:
    """Validate a blob shape before allocating: at most 32 axes, positive dims, within the
    memory budget. Returns the element count."""
    budget = resolve_memory_budget(memory_budget)
    if len(dims) > MAX_BLOB_AXES:
        raise CaffeFormatError(f"{len(dims)} axes, more than Caffe's {MAX_BLOB_AXES}",
                               path=path, layer=layer, field=field)
    if any(d < 0 for d in dims):
        raise CaffeFormatError(f"negative dimension in shape {dims}", path=path, layer=layer,
                               field=field)
    if any(d == 0 for d in dims):
        raise CaffeFormatError(f"zero dimension in shape {dims} (an empty blob)", path=path,
                               layer=layer, field=field)
    count = math.prod(dims)
    if count * 4 > budget:
        raise CaffeFormatError(f"shape {dims} needs {count * 4} bytes, over the memory budget "
                               f"of {budget}", path=path, layer=layer, field=field)
    return count


def _blob_values(blob, path: PathLike, layer: str, field: str) -> tuple[Any, str, str]:
    """The payload Caffe's (and NVCaffe's) ``Blob::FromProto`` reads: ``double_data`` if
    non-empty, else ``data`` if non-empty, else NVCaffe's ``raw_data`` in its
    ``raw_data_type``. Returns ``(values, numpy dtype, field name)``; ``values`` is bytes or
    a repeated field."""
    if len(blob.double_data):
        return blob.double_data, "<f8", "double_data"
    if len(blob.data) or not blob.HasField("raw_data"):
        return blob.data, "<f4", "data"
    if not blob.HasField("raw_data_type"):
        raise CaffeFormatError("raw_data without raw_data_type", path=path, layer=layer,
                               field=field)
    kind = blob.raw_data_type
    if kind not in wire.RAW_DTYPES:
        kind_name = blob.DESCRIPTOR.fields_by_name["raw_data_type"].enum_type \
            .values_by_number[kind].name
        raise CaffeFormatError(f"raw_data_type {kind_name} is not a float type", path=path,
                               layer=layer, field=field)
    return blob.raw_data, wire.RAW_DTYPES[kind], "raw_data"


def blob_to_array(blob, *, path: PathLike = "<net>", layer: str = "?", field: str = "blob",
                  memory_budget: int | None = None) -> np.ndarray:
    """A ``BlobProto`` as a float32 array in its stored shape, validated (Caffe's
    ``Blob::FromProto``: ``double_data`` wins over ``data``; NVIDIA Caffe's ``raw_data``
    (FLOAT16, FLOAT or DOUBLE) is read when both are empty, float16 converted exactly).

    Refuses zero or negative dims, more than 32 axes, shapes over the memory budget (before
    allocating) and data whose length disagrees with the shape. Legacy 4-D blobs keep their
    4 dims.
    """
    dims = blob_dims(blob)
    count = check_blob_dims(dims, path=path, layer=layer, field=field,
                            memory_budget=memory_budget)
    values, dtype, name = _blob_values(blob, path, layer, field)
    if isinstance(values, bytes):
        width = np.dtype(dtype).itemsize
        if len(values) % width:
            raise CaffeFormatError(f"{name} length {len(values)} is not a multiple of "
                                   f"{width}", path=path, layer=layer, field=field)
        size = len(values) // width
    else:
        size = len(values)
    if size != count:
        raise CaffeFormatError(f"holds {size} values but its shape {dims} needs {count}",
                               path=path, layer=layer, field=field)
    if isinstance(values, bytes):
        arr = np.frombuffer(values, dtype=dtype)
    else:
        arr = np.asarray(values, dtype=np.float64 if dtype == "<f8" else np.float32)
    return arr.astype(np.float32, copy=False).reshape(dims)


def _has_legacy_dims(blob) -> bool:
    return any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def _squeeze_legacy(layer_type: str, name: str, arr: np.ndarray, blob) -> np.ndarray:
    """Legacy 4-D V1 blobs in the modern shapes (see ``_squeeze_legacy_dims``)."""
    return _squeeze_legacy_dims(layer_type, name, arr, _has_legacy_dims(blob))


def _squeeze_legacy_dims(layer_type: str, name: str, arr: np.ndarray,
                         legacy: bool) -> np.ndarray:
    """Legacy 4-D V1 blobs in the modern shapes: biases 1-D, InnerProduct weights 2-D.

    Only leading axes of size 1 are dropped; any other legacy shape is kept as stored (the
    net's shape check then reports it).
    """
    if not legacy or arr.ndim != 4:
        return arr
    if (name == "bias" or layer_type in ("BatchNorm", "Scale", "PReLU")) \
            and arr.shape[:3] == (1, 1, 1):
        return arr.reshape(arr.shape[-1])
    if layer_type == "InnerProduct" and name == "weight" and arr.shape[:2] == (1, 1):
        return arr.reshape(arr.shape[-2:])
    return arr


def _check_weighted_name(layer, index: int, seen, path: PathLike) -> None:
    """A layer holding weights needs a name, distinct from those already ``seen``."""
    if not layer.name:
        raise CaffeFormatError("a layer with weights has no name", path=path,
                               layer=f"layer[{index}]", field="name")
    if layer.name in seen:
        raise CaffeFormatError("duplicate layer name", path=path, layer=layer.name,
                               field="name")


def net_params(net, *, path: PathLike = "<net>",
               memory_budget: int | None = None) -> Params:
    """The parameter blobs held in a NetParameter, as ``params[layer][name]`` numpy arrays.

    Layers with blobs must have distinct, non-empty names; all blobs together must fit the
    memory budget.
    """
    budget = resolve_memory_budget(memory_budget)
    params: Params = {}
    total = 0
    for i, layer in enumerate(net.layer):
        if not layer.blobs:
            continue
        _check_weighted_name(layer, i, params, path)
        names = param_names(layer.type, len(layer.blobs))
        entry = {}
        for j, (name, blob) in enumerate(zip(names, layer.blobs, strict=True)):
            arr = blob_to_array(blob, path=path, layer=layer.name, field=f"blobs[{j}]",
                                memory_budget=budget - total)
            total += arr.nbytes
            entry[name] = _squeeze_legacy(layer.type, name, arr, blob)
        params[layer.name] = entry
    return params


def check_param_dtypes(params: Mapping[str, Mapping[str, Any]], *,
                       path: PathLike | None = None) -> None:
    """Refuse parameters Caffe could not hold: every blob must be an array of real numbers
    (``float``/``int``); boolean, complex, string or object arrays raise
    ``CaffeFormatError`` naming the layer and blob (they are never cast)."""
    if not isinstance(params, Mapping):
        raise CaffeFormatError(f"params must map layer names to blobs, got "
                               f"{type(params).__name__}", path=path, field="params")
    for layer, blobs in params.items():
        if not isinstance(blobs, Mapping):
            raise CaffeFormatError(f"expected a mapping of blob names to arrays, got "
                                   f"{type(blobs).__name__}", path=path, layer=str(layer),
                                   field="params")
        for name, value in blobs.items():
            dtype = getattr(value, "dtype", None)
            if dtype is None:
                dtype = np.asarray(value).dtype
            dtype = np.dtype(dtype)
            if dtype.kind not in "iuf":
                raise CaffeFormatError(f"dtype {dtype} is not a real number type (Caffe's "
                                       "blobs are float)", path=path, layer=str(layer),
                                       field=str(name))


def load_caffemodel(path: PathLike, *, memory_budget: int | None = None) -> Params:
    """Read a ``.caffemodel`` (V1 or V2) into ``params[layer_name][blob_name]`` arrays.

    Convolution ``{"weight": (O, I/group, kh, kw), "bias": (O,)}``, InnerProduct
    ``{"weight": (N, K), "bias": (N,)}`` (legacy 1x1xNxK squeezed), BatchNorm
    ``mean/variance/scale_factor``, Scale ``scale/bias``, PReLU ``slope``. Malformed files
    raise ``CaffeFormatError``; see ``resolve_memory_budget`` for the size limit.

    The weights are read without per-element work: the file is read once into a buffer and
    each array is a view of it (``converters.wire``); unusual encodings take the full parser.
    """
    budget = resolve_memory_budget(memory_budget)
    raw = read_file(path, budget)
    scan = wire.scan_caffemodel(raw)
    if scan is None:
        return net_params(parse_caffemodel(bytes(raw), path), path=path, memory_budget=budget)
    stripped, refs = scan
    plain = _parse(caffe_fast_pb2, stripped, path)
    check_wire_types(plain, path)
    if plain.layer and plain.layers:
        raise CaffeFormatError("net mixes V1 'layers' and V2 'layer' fields", path=path,
                               field="layers")
    layers = list(plain.layer) or list(plain.layers)
    by_name: dict[str, list] = {}
    for i, (layer, blob_refs) in enumerate(zip(layers, refs, strict=True)):
        if not blob_refs:
            continue
        _check_weighted_name(layer, i, by_name, path)
        by_name[layer.name] = blob_refs
    if not layers:
        raise CaffeFormatError("no layers: not a caffemodel, or an empty one", path=path)
    net = upgrade_net(plain, path)
    params: Params = {}
    total = 0
    for layer in net.layer:
        blob_refs = by_name.get(layer.name)
        if not blob_refs:
            continue
        entry = {}
        for j, (name, ref) in enumerate(zip(param_names(layer.type, len(blob_refs)),
                                            blob_refs, strict=True)):
            arr = wire.blob_array(raw, ref, path=path, layer=layer.name, field=f"blobs[{j}]",
                                  memory_budget=budget - total)
            total += arr.nbytes
            entry[name] = _squeeze_legacy_dims(layer.type, name, arr, ref.legacy)
        params[layer.name] = entry
    return params


def read_net(path: PathLike, *, memory_budget: int | None = None):
    """Read a net definition from a ``.prototxt`` or the structure of a ``.caffemodel``."""
    try:
        with files.open_regular(path) as f:
            head = f.read(64)
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    if _looks_binary(head):
        return read_caffemodel(path, memory_budget=memory_budget)
    return read_prototxt(path, memory_budget=memory_budget)


def _looks_binary(head: bytes) -> bool:
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(b < 9 or 13 < b < 32 for b in head)


# ----------------------------------------------------------------------------- write


#: ``save_caffemodel``'s ``dtype``: where each kind of value goes in a ``BlobProto``.
#: float32 and float64 are BVLC Caffe's ``data`` and ``double_data``; float16 is NVIDIA
#: Caffe's ``raw_data`` with ``raw_data_type: FLOAT16`` (OpenCV reads it; BVLC Caffe cannot).
BLOB_DTYPES = ("float32", "float16", "float64")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _blob_pattern(layer, name: str, ndim: int) -> tuple[int | None, ...] | None:
    """The shape Caffe's ``LayerSetUp`` gives a parameter blob, as far as the layer's own
    parameters fix it: ints where fixed, ``None`` where it depends on the bottom blobs;
    ``None`` when even the number of axes does (or for types without a rule)."""
    t = layer.type
    if t in ("Convolution", "Deconvolution"):  # base_conv_layer.cpp
        p = layer.convolution_param
        if name == "bias":
            return (int(p.num_output),)
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            kernel: tuple[int | None, ...] = (int(p.kernel_h) or None, int(p.kernel_w) or None)
        elif len(p.kernel_size) > 1:
            kernel = tuple(int(k) for k in p.kernel_size)
        else:  # one kernel_size for every spatial axis; their number comes from the bottom
            k = int(p.kernel_size[0]) if p.kernel_size else None
            kernel = (k,) * max(ndim - 2, 1)
        group = max(int(p.group), 1)
        if t == "Convolution":  # (num_output, channels / group, *kernel)
            return (int(p.num_output), None, *kernel)
        per_group = int(p.num_output) // group if p.num_output % group == 0 else None
        return (None, per_group, *kernel)  # (channels, num_output / group, *kernel)
    if t == "InnerProduct":  # inner_product_layer.cpp: (N, K), or (K, N) transposed
        n = int(layer.inner_product_param.num_output)
        if name == "bias":
            return (n,)
        return (None, n) if layer.inner_product_param.transpose else (n, None)
    if t == "Embed":  # embed_layer.cpp: weight (input_dim, num_output), bias (num_output,)
        p = layer.embed_param
        return (int(p.num_output),) if name == "bias" else (int(p.input_dim), int(p.num_output))
    if t == "BatchNorm":  # batch_norm_layer.cpp: mean, variance (channels,); factor (1,)
        return (1,) if name == "scale_factor" else (None,)
    if t in ("Scale", "Bias"):  # scale_layer.cpp / bias_layer.cpp
        if len(layer.bottom) != 1:
            return None  # the bias spans the second bottom's axes
        p = layer.scale_param if t == "Scale" else layer.bias_param
        # bottom[0]'s shape from axis, num_axes of them; -1: to the end; 0: zero axes
        return None if p.num_axes < 0 else (None,) * int(p.num_axes)
    if t == "PReLU":  # prelu_layer.cpp: zero axes when channel_shared, else (channels,)
        return () if layer.prelu_param.channel_shared else (None,)
    return None


def caffe_blob_shape(layer, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape Caffe gives parameter blob ``name`` of ``layer`` (a ``LayerParameter``)
    when the array holding it has ``shape``: the array's own dims, with leading axes of
    size 1 added or dropped to reach the number of axes Caffe's layer setup gives the blob
    (zero for a ``channel_shared`` PReLU slope or a Scale/Bias with ``num_axes: 0``, one for
    BatchNorm's scale factor, ...). Raises ``CaffeFormatError`` when the array cannot be
    that blob (a different ``num_output``, kernel, or number of axes)."""
    shape = tuple(int(d) for d in shape)
    pattern = _blob_pattern(layer, name, len(shape))
    if pattern is None:
        return shape
    fitted = shape
    extra = len(shape) - len(pattern)
    if extra > 0 and all(d == 1 for d in shape[:extra]):
        fitted = shape[extra:]
    elif extra < 0:
        fitted = (1,) * -extra + shape
    if len(fitted) != len(pattern) or any(p is not None and p != d
                                          for p, d in zip(pattern, fitted, strict=True)):
        want = "(" + ", ".join("?" if p is None else str(p) for p in pattern) + (
            ",)" if len(pattern) == 1 else ")")
        raise CaffeFormatError(f"shape {shape} cannot be Caffe's {want} for this "
                               f"{layer.type} layer", layer=layer.name, field=name)
    return fitted


_STORAGE = {"<f4": "float32", "<f8": "float64", "<f2": "float16"}


def _legacy_records(like, budget: int) -> tuple[dict[str, dict[int, tuple[int, ...]]], str]:
    """The legacy 4-D shape records (num, channels, height, width) of a caffemodel's blobs,
    by layer name and blob index, and the storage type holding most of its values (one of
    ``BLOB_DTYPES``; float32 for a file without blobs); ``like`` is a caffemodel path or a
    ``NetParameter``."""
    records: dict[str, dict[int, tuple[int, ...]]] = {}
    volume = dict.fromkeys(BLOB_DTYPES, 0)
    if isinstance(like, (str, os.PathLike)):
        raw = read_file(like, budget)
        scan = wire.scan_caffemodel(raw)
        if scan is not None:
            plain = _parse(caffe_fast_pb2, scan[0], like)
            for layer, refs in zip(list(plain.layer) or list(plain.layers), scan[1],
                                   strict=True):
                found = {j: r.dims for j, r in enumerate(refs) if r.legacy}
                if found:
                    records[layer.name] = found
                for r in refs:
                    volume[_STORAGE.get(r.dtype, "float32")] += r.nbytes
            return records, max(volume, key=volume.get) if any(volume.values()) else "float32"
        like = parse_caffemodel(raw, like)
    for layer in list(like.layer) + list(like.layers):
        found = {j: blob_dims(b) for j, b in enumerate(layer.blobs) if _has_legacy_dims(b)}
        if found:
            records[layer.name] = found
        for j, b in enumerate(layer.blobs):
            values, kind, _ = _blob_values(b, "<net>", layer.name, f"blobs[{j}]")
            volume[_STORAGE[kind]] += len(values) * (
                1 if isinstance(values, (bytes, memoryview)) else np.dtype(kind).itemsize)
    return records, max(volume, key=volume.get) if any(volume.values()) else "float32"


def _write_blob(blob, arr: Any, shape: tuple[int, ...], legacy: tuple[int, ...] | None,
                dtype: str, layer: str, name: str) -> None:
    """Fill ``blob`` with ``arr``'s values in ``dtype`` and its shape record: the legacy
    4-D fields when ``legacy`` is given, else ``shape`` (no record at all for zero axes,
    as Caffe's ``Blob::ToProto`` writes it)."""
    if legacy is not None:
        blob.num, blob.channels, blob.height, blob.width = legacy
    elif shape:
        blob.shape.dim.extend(shape)
    arr = np.asarray(arr)
    if dtype == "float32":
        blob.data = arr.astype("<f4").tobytes()
    elif dtype == "float64":
        blob.double_data = arr.astype("<f8").tobytes()
    else:
        with np.errstate(over="ignore"):
            half = arr.astype("<f2")
        over = np.isinf(half) & np.isfinite(arr)
        if over.any():
            where = tuple(int(i) for i in np.argwhere(over)[0])
            raise CaffeFormatError(f"value {float(arr[where])} at {where} is beyond float16's "
                                   f"range (±{_FLOAT16_MAX:g})", layer=layer, field=name)
        blob.raw_data_type = caffe_fast_pb2.Type.values_by_name["FLOAT16"].number
        blob.raw_data = half.tobytes()


def build_caffemodel(params: Mapping[str, Mapping[str, Any]], net, *, like=None,
                     dtype: str | None = None) -> bytes:
    """Serialise ``params`` into a V2 caffemodel for ``net`` (a NetParameter or prototxt path).

    Every layer of ``net`` is written with its definition; layers with entries in ``params``
    get their blobs in Caffe's order, each with the shape record Caffe's layer setup gives
    it (``caffe_blob_shape``). ``like`` (a caffemodel path or NetParameter, e.g. the file
    the params were read from) keeps its legacy num/channels/height/width records for blobs
    whose shape they still describe, and its storage type. ``dtype``: one of
    ``BLOB_DTYPES``; default the storage type of most of ``like``'s values (an NVCaffe fp16
    file stays fp16), else float32. Unknown layer names or blob names, and arrays that
    cannot be their blob, raise.
    """
    if dtype is not None and dtype not in BLOB_DTYPES:
        raise ValueError(f"dtype must be one of {BLOB_DTYPES}, got {dtype!r}")
    if isinstance(net, (str, os.PathLike)):
        net = read_prototxt(net)
    legacy, like_dtype = ({}, "float32") if like is None else _legacy_records(
        like, resolve_memory_budget())
    dtype = dtype or like_dtype
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
        if not names and len(entry) == 1:  # a layer type the format does not name: one blob
            names = list(entry)
        extras = sorted(k for k in entry if k not in names)
        generic = sorted(extras, key=lambda k: int(k[4:]) if k[4:].isdigit() else 1 << 30)
        if any(not k.startswith("blob") for k in generic):
            raise CaffeFormatError(f"unknown parameter names {generic} for type {layer.type}",
                                   layer=layer.name, field="params")
        order = [n for n in names if n in entry] + generic
        records = legacy.get(layer.name, {})
        for j, name in enumerate(order):
            shape = caffe_blob_shape(layer, name, np.shape(entry[name]))
            old = records.get(j)
            keep = old is not None and len(shape) <= 4 and \
                (1,) * (4 - len(shape)) + shape == old  # Caffe's ShapeEquals, legacy form
            _write_blob(dst.blobs.add(), entry[name], shape, old if keep else None, dtype,
                        layer.name, name)
    return out.SerializeToString()


def save_caffemodel(path: PathLike, params: Mapping[str, Mapping[str, Any]], net, *,
                    like=None, dtype: str | None = None) -> None:
    """Write ``params`` as a V2 ``.caffemodel`` that Caffe loads, atomically (temp + rename).

    Each blob gets exactly the shape record Caffe gives it (see ``build_caffemodel``;
    ``like=`` the source caffemodel keeps its legacy 4-D records and, unless ``dtype`` is
    given, its storage type; the default without ``like`` is float32). ``dtype="float16"``
    writes NVIDIA Caffe's half-precision ``raw_data`` (read by OpenCV and NVCaffe, not by
    BVLC Caffe); ``"float64"`` Caffe's ``double_data``.
    """
    try:
        data = build_caffemodel(params, net, like=like, dtype=dtype)
    except CaffeFormatError as e:
        if e.path is not None:
            raise
        raise CaffeFormatError(e.reason, path=path, layer=e.layer, field=e.field) from None
    if len(data) > PROTOBUF_LIMIT:
        raise CaffeFormatError("model exceeds protobuf's 2 GiB limit", path=path)
    atomic_write_bytes(path, data)
