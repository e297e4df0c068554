"""pycaffe's ``caffe.io`` image pipeline as pure functions.

Reimplements the semantics of ``caffe.io.load_image``, ``caffe.io.resize_image``
and ``caffe.io.Transformer.preprocess`` / ``deprocess`` (BVLC/caffe
``python/caffe/io.py``) without mutable state: a frozen :class:`TransformerConfig`
replaces the ``Transformer`` object and its ``set_*`` calls.

The float32 arithmetic follows pycaffe step by step (same operation order and
dtypes), so outputs match pycaffe bit for bit when the same scikit-image version
is used (checked against pycaffe output in ``tests/data/tutorial``).

Differences from pycaffe, all deliberate:

* nothing is modified in place (pycaffe's ``preprocess`` may scale the caller's
  float32 array in place when no resize/channel swap happens);
* a full mean image whose height/width are *larger* than the net input is
  center-cropped to the input size, as FCN / CaffeNet users do by hand with
  ``ilsvrc_2012_mean.npy`` (256x256) and a 227x227 input.  pycaffe raises;
* ``deprocess`` drops leading singleton batch axes only, where pycaffe squeezes
  every singleton axis (which breaks single-channel blobs);
* ``load_image`` also drops the alpha channel of gray+alpha images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Transformer",
    "TransformerConfig",
    "caffe_transformer",
    "deprocess",
    "image_dims",
    "imagenet_mean_bgr",
    "load_image",
    "load_mean",
    "native_config",
    "preprocess",
    "resize_image",
]

# Per-channel (B, G, R) mean of Caffe's ``python/caffe/imagenet/ilsvrc_2012_mean.npy``
# (the 3x256x256 mean image averaged over height and width), as stored in
# tests/data/tutorial/tutorial_preprocess.npz['mean_bgr'] (also
# tests/data/source/ilsvrc_2012_mean_bgr.npy).
_IMAGENET_MEAN_BGR = (104.0069879317889, 116.66876761696767, 122.6789143406786)


# --------------------------------------------------------------------------- image IO


def load_image(path: str | os.PathLike, color: bool = True, *,
               max_pixels: int | None = None) -> np.ndarray:
    """Load an image as float32 in [0, 1], like ``caffe.io.load_image``.

    Returns ``H x W x 3`` RGB when ``color`` is true (gray images are tiled to
    three channels, alpha is dropped), else ``H x W x 1`` intensity (color
    images are converted with scikit-image's ``rgb2gray``). Only the first frame
    of a multi-frame file is read, only regular files are opened, and the pixel
    count is checked from the header (``max_pixels``, default
    ``fcn_jax.images.MAX_PIXELS``): see :func:`fcn_jax.images.read_image`, the
    reader every command uses. Errors raise ``fcn_jax.images.ImageError``.
    """
    from .images import MAX_PIXELS, read_image

    return read_image(path, color, max_pixels=MAX_PIXELS if max_pixels is None
                      else max_pixels)


def resize_image(im: np.ndarray, new_dims: tuple[int, int], interp_order: int = 1) -> np.ndarray:
    """Resize an ``H x W x K`` array to ``new_dims`` (height, width), like pycaffe.

    For K in {1, 3} the image is min/max-normalised to [0, 1], resized with
    ``skimage.transform.resize(..., order=interp_order, mode='constant')`` (with
    scikit-image's default anti-aliasing when downsampling, which is what pycaffe
    gets with scikit-image >= 0.19) and mapped back; a constant image gives a
    constant result.  Other K go through ``scipy.ndimage.zoom``.  A 2-D ``H x W``
    input is accepted and gives a 2-D result (extension).  Returns float32.
    """
    im = np.asarray(im)
    new_dims = (int(new_dims[0]), int(new_dims[1]))
    if min(new_dims) < 1:
        raise ValueError(f"new_dims must be positive, got {new_dims}")
    if im.ndim == 2:
        return resize_image(im[:, :, np.newaxis], new_dims, interp_order)[:, :, 0]
    if im.ndim != 3:
        raise ValueError(f"resize_image expects an H x W x K array, got shape {im.shape}")

    if im.shape[-1] in (1, 3):
        im_min, im_max = im.min(), im.max()
        if not im_max > im_min:
            out = np.empty((new_dims[0], new_dims[1], im.shape[-1]), dtype=np.float32)
            out.fill(im_min)
            return out
        im_std = (im - im_min) / (im_max - im_min)
        # skimage's default (anti_aliasing=None) for float input: smooth iff downsampling.
        downsampling = any(n < o for n, o in zip(new_dims, im.shape[:2], strict=True))
        if interp_order == 1 and im_std.dtype.kind == "f" and np.isfinite(im_max - im_min):
            resized_std = _resize_linear(im_std, new_dims, downsampling)
        else:
            from skimage.transform import resize

            resized_std = resize(
                im_std, new_dims, order=interp_order, mode="constant",
                anti_aliasing=downsampling
            )
        resized = resized_std * (im_max - im_min) + im_min
    else:
        from scipy.ndimage import zoom

        scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
        resized = zoom(im, scale + (1,), order=interp_order)
    return resized.astype(np.float32)


def _resize_linear(im: np.ndarray, new_dims: tuple[int, int], anti_aliasing: bool
                   ) -> np.ndarray:
    """``skimage.transform.resize(im, new_dims, order=1, mode="constant",
    anti_aliasing=anti_aliasing)`` of an ``H x W x K`` image in [0, 1], step for step as
    scikit-image runs it: scipy's Gaussian filter (the same ``gaussian_filter1d`` calls, axis
    by axis, each rounded to the image's dtype), then the grid-mode linear zoom of both axes
    as two cached sparse matrices (float64 sums, rounded once; ``ndimage.zoom`` itself is the
    slow half), then the clip to the input's range. Equal to scikit-image's result up to the
    order of the zoom's float64 sums (``tests/test_preprocess.py``)."""
    from scipy import ndimage as ndi

    x = im
    if anti_aliasing:
        for axis, (n, m) in enumerate(zip(im.shape[:2], new_dims, strict=True)):
            sigma = max(0.0, (n / m - 1) / 2)
            if sigma > 1e-15:  # ndimage.gaussian_filter skips smaller sigmas
                x = ndi.gaussian_filter1d(x, sigma, axis=axis, mode="constant", cval=0.0)
    y = _along(_zoom_operator(im.shape[0], new_dims[0]), x, 0)
    y = _along(_zoom_operator(im.shape[1], new_dims[1]), y, 1)
    # skimage clips to the input's range (here [0, 1], which holds its cval 0)
    return np.clip(y, 0.0, 1.0).astype(im.dtype)


def _along(op: Any, x: np.ndarray, axis: int) -> np.ndarray:
    """The sparse ``op`` (m, n) applied along ``axis`` (0 or 1) of ``x`` (H, W, K), float64."""
    if axis == 1:
        return _along(op, x.transpose(1, 0, 2), 0).transpose(1, 0, 2)
    n, *rest = x.shape
    return np.asarray(op @ np.asarray(x, np.float64).reshape(n, -1)).reshape(-1, *rest)


@functools.lru_cache(maxsize=256)
def _zoom_operator(n: int, m: int) -> Any:
    """The (m, n) sparse matrix of ``ndimage.zoom(order=1, mode="grid-constant",
    grid_mode=True)`` from n to m samples: output ``i`` samples the input at
    ``(i + 0.5) n / m - 0.5``, linearly between its two neighbours, zero beyond the edge."""
    from scipy import sparse

    c = (np.arange(m) + 0.5) * (n / m) - 0.5
    i0 = np.floor(c).astype(np.int64)
    f = c - i0
    rows = np.repeat(np.arange(m), 2)
    cols = np.stack([i0, i0 + 1], axis=1).ravel()
    vals = np.stack([1.0 - f, f], axis=1).ravel()
    keep = (cols >= 0) & (cols < n) & (vals != 0)
    return sparse.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(m, n))


# --------------------------------------------------------------------------- transformer


def _as_int_tuple(x: Any, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in x)
    except TypeError as e:
        raise TypeError(f"{name} must be a sequence of ints, got {x!r}") from e


@dataclass(frozen=True, eq=False)
class TransformerConfig:
    """Settings of one pycaffe ``Transformer`` input, frozen.

    ``input_shape`` is the net input ``(C, H, W)`` (a 4-tuple ``(N, C, H, W)`` is
    accepted and its batch axis dropped).  ``transpose``, ``channel_swap``,
    ``raw_scale``, ``mean`` and ``input_scale`` mean what the matching
    ``Transformer.set_*`` calls mean; ``None`` disables a step.  ``mean`` is a
    per-channel ``(C,)`` vector or a ``(C, H', W')`` mean image (``(H', W')`` for
    C == 1); a mean image larger than the input is center-cropped (extension),
    and a ``(C, 1, 1)`` mean is per-channel (extension).  The mean is stored as a
    read-only float64 copy.
    """

    input_shape: tuple[int, int, int]
    transpose: tuple[int, ...] | None = (2, 0, 1)
    channel_swap: tuple[int, ...] | None = None
    raw_scale: float | None = None
    mean: np.ndarray | None = None
    input_scale: float | None = None

    def __post_init__(self) -> None:
        shape = _as_int_tuple(self.input_shape, "input_shape")
        if len(shape) == 4:
            shape = shape[1:]
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
        object.__setattr__(self, "input_shape", shape)
        c = shape[0]

        if self.transpose is not None:
            order = _as_int_tuple(self.transpose, "transpose")
            if sorted(order) != [0, 1, 2]:
                raise ValueError(f"transpose must be a permutation of (0, 1, 2), got {order}")
            object.__setattr__(self, "transpose", order)
        if self.channel_swap is not None:
            swap = _as_int_tuple(self.channel_swap, "channel_swap")
            if len(swap) != c:
                raise ValueError(
                    f"channel_swap needs {c} entries (one per input channel), got {swap}"
                )
            if sorted(swap) != list(range(c)):
                raise ValueError(f"channel_swap must be a permutation of range({c}), got {swap}")
            object.__setattr__(self, "channel_swap", swap)
        for name in ("raw_scale", "input_scale"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not math.isfinite(value) or value == 0.0:
                    raise ValueError(f"{name} must be finite and non-zero, got {value}")
                object.__setattr__(self, name, value)
        if self.mean is not None:
            object.__setattr__(self, "mean", _prepare_mean(self.mean, shape))

    def __repr__(self) -> str:
        mean = None if self.mean is None else f"array(shape={self.mean.shape})"
        return (
            f"TransformerConfig(input_shape={self.input_shape}, transpose={self.transpose}, "
            f"channel_swap={self.channel_swap}, raw_scale={self.raw_scale}, mean={mean}, "
            f"input_scale={self.input_scale})"
        )


def _prepare_mean(mean: Any, input_shape: tuple[int, int, int]) -> np.ndarray:
    """Validate a mean and bring it to a broadcastable ``(C, 1, 1)`` or ``(C, H, W)``."""
    c, h, w = input_shape
    m = np.array(mean, dtype=np.float64)  # always a private copy
    if m.ndim == 1:
        if m.shape[0] != c:
            raise ValueError(f"mean has {m.shape[0]} channels, input has {c}")
        m = m[:, np.newaxis, np.newaxis]
    else:
        if m.ndim == 2:
            m = m[np.newaxis]
        if m.ndim != 3:
            raise ValueError(f"mean must be (C,), (H, W) or (C, H, W), got shape {m.shape}")
        if m.shape[0] != c:
            raise ValueError(f"mean has {m.shape[0]} channels, input has {c}")
        mh, mw = m.shape[1:]
        if (mh, mw) == (1, 1):
            pass  # a per-channel mean already in broadcast form (a config copied by replace)
        elif (mh, mw) != (h, w):
            if mh < h or mw < w:
                raise ValueError(
                    f"mean image {m.shape[1:]} is smaller than the input {(h, w)}; "
                    "only center-cropping a larger mean is supported"
                )
            top, left = (mh - h) // 2, (mw - w) // 2
            m = m[:, top : top + h, left : left + w]
        m = np.ascontiguousarray(m)
    if not np.all(np.isfinite(m)):
        raise ValueError("mean contains non-finite values")
    m.setflags(write=False)
    return m


def caffe_transformer(
    input_shape: tuple[int, ...],
    *,
    transpose: tuple[int, ...] | None = (2, 0, 1),
    channel_swap: tuple[int, ...] | None = (2, 1, 0),
    raw_scale: float | None = 255.0,
    mean: Any = None,
    input_scale: float | None = None,
) -> TransformerConfig:
    """The Caffe tutorial / ImageNet setup: HWC->CHW, RGB->BGR, [0,1]->[0,255].

    ``mean=None`` subtracts nothing; pass ``imagenet_mean_bgr()`` (per channel)
    or a ``(3, H, W)`` mean image for the ImageNet reference models.
    """
    return TransformerConfig(
        input_shape=input_shape,
        transpose=transpose,
        channel_swap=channel_swap,
        raw_scale=raw_scale,
        mean=mean,
        input_scale=input_scale,
    )


def preprocess(cfg: TransformerConfig, image: np.ndarray) -> np.ndarray:
    """``Transformer.preprocess``: ``H' x W' x K`` image -> float32 ``(C, H, W)`` blob.

    Steps, in pycaffe's order: to float32, resize to the input height/width (if
    different), transpose, channel swap, ``* raw_scale``, ``- mean``,
    ``* input_scale``.  The input array is never modified.
    """
    x = np.array(image, dtype=np.float32)  # private copy
    if x.ndim != 3:
        raise ValueError(f"preprocess expects an H x W x K image, got shape {x.shape}")
    in_dims = image_dims(cfg)
    if x.shape[:2] != in_dims:
        x = resize_image(x, in_dims)
    if cfg.transpose is not None:
        x = x.transpose(cfg.transpose)
    if cfg.channel_swap is not None:
        if x.shape[0] != len(cfg.channel_swap):
            raise ValueError(
                f"image has {x.shape[0]} channels after transpose, channel_swap expects "
                f"{len(cfg.channel_swap)}"
            )
        x = x[list(cfg.channel_swap), :, :]
    x = np.ascontiguousarray(x)
    if cfg.raw_scale is not None:
        x *= np.float32(cfg.raw_scale)
    if cfg.mean is not None:
        # pycaffe: float32 blob -= float64 mean, i.e. a float64 op rounded to float32.
        np.subtract(x, cfg.mean, out=x, casting="same_kind")
    if cfg.input_scale is not None:
        x *= np.float32(cfg.input_scale)
    if x.shape != cfg.input_shape:
        raise ValueError(f"preprocessed blob has shape {x.shape}, expected {cfg.input_shape}")
    return x


def image_dims(cfg: TransformerConfig) -> tuple[int, int]:
    """The (height, width) an image is resized to so that, after ``cfg.transpose``, it has
    the input's shape: ``input_shape[1:]`` for the usual ``(2, 0, 1)``, swapped for
    MTCNN's ``(2, 1, 0)`` (pycaffe resizes to ``input_shape[1:]`` whatever the order);
    without a transpose the input is the image's own ``H x W x K`` layout."""
    if cfg.transpose is None:
        return cfg.input_shape[:2]
    t = cfg.transpose
    return cfg.input_shape[t.index(0)], cfg.input_shape[t.index(1)]


def native_config(cfg: TransformerConfig, image_shape: Sequence[int]) -> TransformerConfig:
    """``cfg`` for an ``H x W x K`` image at its own size: the input shape the image has
    after the transpose, nothing resized; a per-channel mean is kept, a mean image refused."""
    if cfg.mean is not None and cfg.mean.shape[1:] != (1, 1):
        raise ValueError(f"a mean image {cfg.mean.shape} cannot be subtracted from images at "
                         "their own sizes; use a per-channel mean")
    h, w = (int(d) for d in image_shape[:2])
    hwc = (h, w, cfg.input_shape[0])
    shape = hwc if cfg.transpose is None else tuple(hwc[a] for a in cfg.transpose)
    return dataclasses.replace(cfg, input_shape=shape)


def deprocess(cfg: TransformerConfig, blob: np.ndarray) -> np.ndarray:
    """``Transformer.deprocess``: invert :func:`preprocess` (except the resize).

    Takes a ``(C, H, W)`` blob (leading singleton batch axes are dropped) and
    returns a float32 ``H x W x C`` image: ``/ input_scale``, ``+ mean``,
    ``/ raw_scale``, undo the channel swap, undo the transpose.
    """
    x = np.array(blob, dtype=np.float32)  # private copy
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"deprocess expects a (C, H, W) blob, got shape {np.shape(blob)}")
    if cfg.input_scale is not None:
        x /= np.float32(cfg.input_scale)
    if cfg.mean is not None:
        if cfg.mean.shape[1:] not in ((1, 1), x.shape[1:]):
            raise ValueError(f"mean of shape {cfg.mean.shape} does not fit blob {x.shape}")
        np.add(x, cfg.mean, out=x, casting="same_kind")
    if cfg.raw_scale is not None:
        x /= np.float32(cfg.raw_scale)
    if cfg.channel_swap is not None:
        x = x[np.argsort(cfg.channel_swap), :, :]
    if cfg.transpose is not None:
        x = x.transpose(np.argsort(cfg.transpose))
    return np.ascontiguousarray(x)


class Transformer:
    """pycaffe's ``caffe.io.Transformer``, for code written against it: ``set_*`` calls per
    input, then ``preprocess(name, image)`` / ``deprocess(name, blob)``.

    Each call replaces that input's frozen :class:`TransformerConfig` (``config(name)``), which
    the pure :func:`preprocess` / :func:`deprocess` run; as in pycaffe, nothing is set at
    first (no transpose, no swap, no scaling, no mean)::

        tf = Transformer({"data": (1, 3, 227, 227)})
        tf.set_transpose("data", (2, 0, 1))
        tf.set_channel_swap("data", (2, 1, 0))
        tf.set_raw_scale("data", 255.0)
        tf.set_mean("data", imagenet_mean_bgr())
        x = tf.preprocess("data", load_image("cat.jpg"))   # (3, 227, 227) float32
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]) -> None:
        self.inputs = {k: tuple(int(d) for d in v) for k, v in inputs.items()}
        self._cfg = {k: TransformerConfig(v, transpose=None) for k, v in self.inputs.items()}

    def config(self, name: str) -> TransformerConfig:
        """The frozen settings of input ``name``."""
        if name not in self._cfg:
            raise KeyError(f"{name} is not one of the net's inputs {sorted(self._cfg)}")
        return self._cfg[name]

    def _set(self, name: str, **change: Any) -> None:
        self._cfg[name] = dataclasses.replace(self.config(name), **change)

    def set_transpose(self, name: str, order: Sequence[int]) -> None:
        """Axis order of the image (H x W x K) in the blob, e.g. ``(2, 0, 1)``."""
        self._set(name, transpose=tuple(order))

    def set_channel_swap(self, name: str, order: Sequence[int]) -> None:
        """Channel order after the transpose, e.g. ``(2, 1, 0)`` for RGB -> BGR."""
        self._set(name, channel_swap=tuple(order))

    def set_raw_scale(self, name: str, scale: float) -> None:
        """Multiply [0, 1] pixels by ``scale`` (255 for ImageNet models)."""
        self._set(name, raw_scale=float(scale))

    def set_mean(self, name: str, mean: Any) -> None:
        """Subtract a per-channel ``(C,)`` mean or a ``(C, H, W)`` mean image."""
        self._set(name, mean=np.asarray(mean))

    def set_input_scale(self, name: str, scale: float) -> None:
        """Multiply the mean-subtracted blob by ``scale``."""
        self._set(name, input_scale=float(scale))

    def preprocess(self, name: str, image: np.ndarray) -> np.ndarray:
        """An ``H x W x K`` image as input ``name``'s float32 ``(C, H, W)`` blob."""
        return preprocess(self.config(name), image)

    def deprocess(self, name: str, blob: np.ndarray) -> np.ndarray:
        """A ``(C, H, W)`` blob of input ``name`` back to an ``H x W x C`` image."""
        return deprocess(self.config(name), blob)


def imagenet_mean_bgr() -> np.ndarray:
    """Per-channel BGR mean of Caffe's ``ilsvrc_2012_mean.npy``, float64 ``(3,)``."""
    return np.array(_IMAGENET_MEAN_BGR, dtype=np.float64)


# --------------------------------------------------------------------------- mean files


def load_mean(path: str | os.PathLike) -> np.ndarray:
    """Load a mean from a ``.npy`` file or a Caffe ``.binaryproto`` (BlobProto) file, as
    float64; a legacy ``(1, C, H, W)`` blob comes back as ``(C, H, W)``. The reader is
    ``converters.mean.load_mean`` (bounded like the caffemodel reader); malformed input
    raises ``CaffeFormatError`` (a ``ValueError``) naming the file."""
    from converters.mean import load_mean as _load_mean

    return _load_mean(path)


def parse_blobproto(buf: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode a serialized ``caffe.BlobProto`` (``converters.mean.parse_binaryproto``):
    float64 from ``double_data`` when present, else float32 from ``data``."""
    from converters.mean import parse_binaryproto

    return parse_binaryproto(buf, source)
