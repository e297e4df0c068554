"""Caffe's protobuf schema, built at import from ``caffe.proto`` without protoc.

``caffe.proto`` beside this file is the single source of truth. A small parser for the
proto2 subset it uses (messages, nested enums, scalar/message fields, ``[default]`` and
``[packed]`` options) turns it into a ``FileDescriptorProto``; the protobuf runtime then
makes the message classes. Two schemas are built:

- ``caffe``: exactly Caffe's, for text prototxts and general use;
- ``caffe_fast``: the same, except that ``BlobProto``'s packed float/double arrays are typed
  ``bytes``. A packed repeated field is on the wire a length-delimited field holding the
  little-endian values, so parsing a caffemodel with this schema yields each blob's payload
  as one ``bytes`` object that ``np.frombuffer`` reads without a per-element copy.
"""

from __future__ import annotations

import re
from importlib import resources
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FDP.TYPE_DOUBLE, "float": _FDP.TYPE_FLOAT, "int64": _FDP.TYPE_INT64,
    "uint64": _FDP.TYPE_UINT64, "int32": _FDP.TYPE_INT32, "uint32": _FDP.TYPE_UINT32,
    "bool": _FDP.TYPE_BOOL, "string": _FDP.TYPE_STRING, "bytes": _FDP.TYPE_BYTES,
}
_LABELS = {"optional": _FDP.LABEL_OPTIONAL, "repeated": _FDP.LABEL_REPEATED,
           "required": _FDP.LABEL_REQUIRED}
_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|[A-Za-z_][\w.]*|-?[\d.][\w.+-]*|[{}\[\]=;,]')
_BLOB_ARRAYS = {"data", "diff", "double_data", "double_diff"}


def _tokens(text: str) -> list[str]:
    text = re.sub(r"//[^\n]*", "", text)
    return _TOKEN.findall(text)


class _Parser:
    """Recursive-descent parser for the proto2 subset used by caffe.proto."""

    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0

    def next(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, tok: str) -> None:
        got = self.next()
        if got != tok:
            raise SyntaxError(f"caffe.proto: expected {tok!r}, got {got!r}")

    def parse_file(self, package: str) -> descriptor_pb2.FileDescriptorProto:
        fdp = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package,
                                                 syntax="proto2")
        while self.i < len(self.toks):
            tok = self.next()
            if tok in ("syntax", "package"):
                while self.next() != ";":
                    pass
            elif tok == "message":
                self.parse_message(fdp.message_type.add())
            elif tok == "enum":
                self.parse_enum(fdp.enum_type.add())
            else:
                raise SyntaxError(f"caffe.proto: unexpected {tok!r}")
        return fdp

    def parse_enum(self, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        enum.name = self.next()
        self.expect("{")
        while (tok := self.next()) != "}":
            self.expect("=")
            enum.value.add(name=tok, number=int(self.next()))
            self.expect(";")

    def parse_message(self, msg: descriptor_pb2.DescriptorProto) -> None:
        msg.name = self.next()
        self.expect("{")
        while (tok := self.next()) != "}":
            if tok == "enum":
                self.parse_enum(msg.enum_type.add())
            elif tok == "message":
                self.parse_message(msg.nested_type.add())
            else:
                self.parse_field(msg.field.add(), tok)

    def parse_field(self, field: descriptor_pb2.FieldDescriptorProto, label: str) -> None:
        field.label = _LABELS[label]
        ftype = self.next()
        field.name = self.next()
        self.expect("=")
        field.number = int(self.next())
        if ftype in _SCALARS:
            field.type = _SCALARS[ftype]
        else:
            field.type_name = ftype  # message or enum, resolved below
        tok = self.next()
        if tok == "[":
            while True:
                key = self.next()
                self.expect("=")
                value = self.next()
                if key == "default":
                    field.default_value = value.strip("\"'")
                elif key == "packed":
                    field.options.packed = value == "true"
                if self.next() == "]":
                    break
            tok = self.next()
        if tok != ";":
            raise SyntaxError(f"caffe.proto: expected ';' after field {field.name}")


def _resolve_types(fdp: descriptor_pb2.FileDescriptorProto) -> None:
    """Fill in absolute type names and message/enum kinds for non-scalar fields."""
    kinds: dict[str, int] = {}

    def collect(prefix: str, messages, enums) -> None:
        for e in enums:
            kinds[f"{prefix}.{e.name}"] = _FDP.TYPE_ENUM
        for m in messages:
            kinds[f"{prefix}.{m.name}"] = _FDP.TYPE_MESSAGE
            collect(f"{prefix}.{m.name}", m.nested_type, m.enum_type)

    root = f".{fdp.package}"
    collect(root, fdp.message_type, fdp.enum_type)

    def resolve(scope: str, messages) -> None:
        for m in messages:
            inner = f"{scope}.{m.name}"
            for f in m.field:
                if f.type_name:
                    # proto scoping: innermost scope first, then outwards
                    parts = inner.split(".")
                    for k in range(len(parts), 1, -1):
                        cand = ".".join(parts[:k]) + "." + f.type_name
                        if cand in kinds:
                            f.type_name = cand
                            f.type = kinds[cand]
                            break
                    else:
                        raise SyntaxError(f"caffe.proto: unknown type {f.type_name}")
            resolve(inner, m.nested_type)

    resolve(root, fdp.message_type)


def _build(package: str, fast: bool) -> SimpleNamespace:
    text = resources.files(__package__).joinpath("caffe.proto").read_text()
    fdp = _Parser(text).parse_file(package)
    _resolve_types(fdp)
    if fast:
        blob = next(m for m in fdp.message_type if m.name == "BlobProto")
        for f in blob.field:
            if f.name in _BLOB_ARRAYS:
                f.label = _FDP.LABEL_OPTIONAL
                f.type = _FDP.TYPE_BYTES
                f.ClearField("options")
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp) if hasattr(pool, "Add") else None
    fd = pool.FindFileByName(fdp.name)
    ns = SimpleNamespace(pool=pool, file=fd)
    for name, desc in fd.message_types_by_name.items():
        setattr(ns, name, message_factory.GetMessageClass(desc))
    for name, enum in fd.enum_types_by_name.items():
        setattr(ns, name, enum)
    return ns


caffe_pb2 = _build("caffe", fast=False)
"""Caffe's messages, e.g. ``caffe_pb2.NetParameter``."""

caffe_fast_pb2 = _build("caffe_fast", fast=True)
"""The same messages with ``BlobProto`` float arrays as raw little-endian ``bytes``."""
