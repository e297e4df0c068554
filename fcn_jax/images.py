"""The one image reader of fcn-jax: ``predict``, ``demo --image``, fine-tuning data and
``fcn_jax.preprocess.load_image`` all read images through :func:`read_image`.

What it guarantees for any file, however hostile:

* only regular files are opened, without blocking (a FIFO or device named ``x.png`` is
  refused at once, never read);
* the pixel count is checked from the header, before anything is decoded: at most
  ``max_pixels`` (default 64 Mpx), and the float32 result within the memory budget;
* only the first frame of a multi-frame file (animated GIF/APNG/WebP, multi-page TIFF) is
  decoded; the others are never touched;
* every failure (not an image, truncated, unsupported mode, too large) is one
  :class:`ImageError` naming the file: no decoder traceback, no plugin text.

Decoding is Pillow's, with imageio's conventions (palette images expanded to their palette's
mode, 16-bit PNGs as uint16), so results equal ``skimage.io.imread`` of a single-frame image
and pycaffe's ``caffe.io.load_image`` bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import warnings
from typing import IO

import numpy as np

from converters import CaffeFormatError
from converters.caffe_io import resolve_memory_budget

#: Images with more pixels than this are refused from their header (decompression bombs).
MAX_PIXELS = 64_000_000
#: Pixels converted to float per step (bounds the float64 intermediate of pycaffe's path).
_CHUNK_PIXELS = 1 << 20
#: Pillow modes converted to RGB (imageio would hand these out raw).
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa")


class ImageError(CaffeFormatError):
    """An image file that cannot be read: one line naming the file and the reason."""


def open_regular_file(path: str | os.PathLike) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file, never blocking: a FIFO, socket or
    device is refused (``ImageError``) without waiting for a writer."""
    from converters.files import open_regular

    try:
        return open_regular(path)
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}", path=path) from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image from its header (nothing is decoded)."""
    with _opened(path) as im:
        return int(im.size[1]), int(im.size[0])


_quiet_bomb_warning = False


@contextlib.contextmanager
def _opened(path: str | os.PathLike):
    """The Pillow image of ``path`` (header read only), errors as ``ImageError``."""
    from PIL import Image, UnidentifiedImageError

    global _quiet_bomb_warning
    if not _quiet_bomb_warning:  # our pixel budget is stricter than Pillow's bomb warning
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _quiet_bomb_warning = True  # (set once: catch_warnings is not thread-safe)
    f = open_regular_file(path)
    try:
        try:
            im = Image.open(f)
        except Image.DecompressionBombError as e:  # Pillow's own limit, far above ours
            m = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(m.group(1))} pixels" if m else "its size"
            raise ImageError(f"image of {size} has more than {MAX_PIXELS} pixels",
                             path=path) from None
        except UnidentifiedImageError:
            raise ImageError("not an image file (or a format Pillow cannot read)",
                             path=path) from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as e:
            raise ImageError(f"corrupt image header ({_first_line(e)})", path=path) from None
        with im:
            yield im
    finally:
        f.close()


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


def check_pixels(path: str | os.PathLike, width: int, height: int, channels: int, *,
                 max_pixels: int = MAX_PIXELS, memory_budget: int | None = None) -> None:
    """Refuse an image whose header claims more than ``max_pixels`` pixels, or whose float32
    array would exceed the memory budget."""
    if width < 1 or height < 1:
        raise ImageError(f"empty image ({width}x{height})", path=path)
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} image has more than {max_pixels} pixels",
                         path=path)
    budget = resolve_memory_budget(memory_budget)
    need = width * height * channels * 4
    if need > budget:
        raise ImageError(f"{width}x{height} image needs {need} bytes as float32, over the "
                         f"memory budget of {budget}", path=path)


def read_image(path: str | os.PathLike, color: bool = True, *, max_pixels: int = MAX_PIXELS,
               memory_budget: int | None = None) -> np.ndarray:
    """The first frame of an image file as float32 in [0, 1], like ``caffe.io.load_image``:
    ``H x W x 3`` RGB when ``color`` (gray tiled, alpha dropped), else ``H x W x 1``
    intensity (scikit-image's ``rgb2gray``; RGBA blended on white first, as
    ``skimage.io.imread(as_gray=True)``). Raises ``ImageError``; see the module doc."""
    raw = _decode_first_frame(path, max_pixels=max_pixels, memory_budget=memory_budget)
    return _to_float(raw, color)


def _decode_first_frame(path: str | os.PathLike, *, max_pixels: int,
                        memory_budget: int | None) -> np.ndarray:
    """Frame 0 as imageio's pillow plugin returns it (uint8/uint16/bool/float array)."""
    with _opened(path) as im:
        w, h = im.size
        check_pixels(path, w, h, 4, max_pixels=max_pixels, memory_budget=memory_budget)
        try:
            im.seek(0)
            if im.mode == "P":
                im = im.convert(im.palette.mode if im.palette is not None else "RGB")
            elif im.mode == "PA":
                im = im.convert("RGBA")
            elif im.format == "PNG" and im.mode == "I":
                im = im.convert("I;16")
            elif im.mode in _TO_RGB:
                im = im.convert("RGB")
            arr = np.asarray(im)
        except ImageError:
            raise
        except Exception as e:  # any decoder failure, whatever the plugin raises
            raise ImageError(f"cannot decode ({_first_line(e)})", path=path) from None
    if arr.dtype.kind not in "buif" or arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageError(f"unsupported pixel layout {arr.shape} {arr.dtype}", path=path)
    if arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"unsupported number of channels {arr.shape[2]}", path=path)
    return arr


def _to_float(raw: np.ndarray, color: bool) -> np.ndarray:
    """pycaffe's ``img_as_float(imread(...)).astype(float32)`` and channel handling, row
    block by row block (every step is per pixel, so blocks give identical values while the
    float64 intermediate stays small)."""
    import skimage

    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    h, w = raw.shape[:2]
    channels_in = 1 if raw.ndim == 2 else raw.shape[2]
    gray_in = channels_in in (1, 2)
    c_out = 3 if color else 1
    out = np.empty((h, w, c_out), np.float32)
    rows = max(1, _CHUNK_PIXELS // max(w, 1))
    for r0 in range(0, h, rows):
        block = raw[r0:r0 + rows]
        if gray_in:
            g = block if block.ndim == 2 else block[:, :, 0]  # gray (+ alpha dropped)
            out[r0:r0 + rows] = skimage.img_as_float(g).astype(np.float32)[:, :, None]
        elif color:
            out[r0:r0 + rows] = skimage.img_as_float(block[:, :, :3]).astype(np.float32)
        else:
            from skimage.color import rgb2gray, rgba2rgb

            rgb = rgba2rgb(block) if channels_in == 4 else block
            out[r0:r0 + rows, :, 0] = skimage.img_as_float(rgb2gray(rgb)).astype(np.float32)
    if gray_in and color:
        out[:, :, 1] = out[:, :, 0]
        out[:, :, 2] = out[:, :, 0]
    return out


__all__ = ["MAX_PIXELS", "ImageError", "check_pixels", "image_size", "open_regular_file",
           "read_image"]

