"""The error type of every reader and writer in fcn-jax."""

from __future__ import annotations

import os
import re

#: Longest message kept; longer ones (e.g. a parser quoting a 1 MB line) are cut with "...".
MAX_MESSAGE = 400

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: str, limit: int = MAX_MESSAGE) -> str:
    """One printable line: whitespace runs collapsed, control characters (terminal escapes
    from a hostile file) shown as ``\\xNN``, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: object, limit: int = 200) -> str:
    """``text`` (a layer or blob name from a file) safe to print: one line, control
    characters and terminal escapes shown as ``\\xNN``, cut to ``limit`` characters."""
    return _clean(str(text), limit)


class CaffeFormatError(ValueError):
    """A Caffe file (or our checkpoint) is malformed or does not match its net.

    The message is one line naming the file, the layer and the field, e.g.
    ``deploy.prototxt: layer 'conv2': blobs[0]: shape (256, 96, 5, 5) does not match ...``.
    Text that comes from the file (layer names, quoted content) is made printable and cut
    to a sane length, so a hostile file cannot flood or drive the terminal.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 layer: str | None = None, field: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.layer = layer
        self.field = field
        self.reason = message
        parts = []
        if self.path is not None:
            shown = os.path.basename(self.path) if len(self.path) > 120 else self.path
            parts.append(_clean(shown, 200))
        if layer is not None:
            parts.append(f"layer {_clean(repr(layer), 120)}")
        if field is not None:
            parts.append(_clean(field, 120))
        parts.append(_clean(message))
        super().__init__(": ".join(parts))

    def with_context(self, *, path: str | os.PathLike | None = None, layer: str | None = None,
                     field: str | None = None) -> CaffeFormatError:
        """The same error (same type) with the file, layer or field filled in where it
        named none; ``self`` when nothing changes."""
        new = (self.path if self.path is not None else path,
               self.layer if self.layer is not None else layer,
               self.field if self.field is not None else field)
        if new == (self.path, self.layer, self.field):
            return self
        err = type(self)(self.reason, path=new[0], layer=new[1], field=new[2])
        err.__cause__ = self.__cause__
        return err


class UnsupportedLayerError(CaffeFormatError):
    """The net uses a layer type fcn-jax does not implement."""


class ParamMismatchError(CaffeFormatError):
    """Stored weights (a caffemodel's blobs, a params tree) do not fit the net: the error is
    about the weights' file, not the net definition."""
