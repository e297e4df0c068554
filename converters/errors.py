"""The error type of every reader and writer in fcn-jax."""

from __future__ import annotations

import os


class CaffeFormatError(ValueError):
    """A Caffe file (or our checkpoint) is malformed or does not match its net.

    The message is one line naming the file, the layer and the field, e.g.
    ``deploy.prototxt: layer 'conv2': blobs[0]: shape (256, 96, 5, 5) does not match ...``.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 layer: str | None = None, field: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.layer = layer
        self.field = field
        self.reason = message
        parts = []
        if self.path is not None:
            parts.append(os.path.basename(self.path) if len(self.path) > 120 else self.path)
        if layer is not None:
            parts.append(f"layer {layer!r}")
        if field is not None:
            parts.append(field)
        parts.append(" ".join(str(message).split()))
        super().__init__(": ".join(parts))


class UnsupportedLayerError(CaffeFormatError):
    """The net uses a layer type fcn-jax does not implement."""
