"""Detection data for sliding-window fine-tuning: a JSON-lines annotation format, a loader that
applies the inference preprocessing (``fcn_jax.preprocess``) with random crops and flips, and
an embedded synthetic dataset (scikit-image photos pasted on textures; no download).

Annotation format, one JSON object per line (blank lines and lines starting with ``#`` are
skipped; relative image paths are relative to the annotation file)::

    {"image": "img/0001.png", "boxes": [[x0, y0, x1, y1, label], ...]}

Box coordinates are pixels of the original image, ``x1``/``y1`` exclusive; ``label`` is a class
index >= 1 (0 is background). Boxes travel as float arrays ``(n, 5)``.

Every batch is a pure function of ``(dataset, step, seed)``, so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters import CaffeFormatError

from ..io_utils import atomic_write, atomic_write_text
from ..preprocess import TransformerConfig, caffe_transformer, imagenet_mean_bgr, load_image
from ..preprocess import preprocess as _preprocess

PathLike = str | os.PathLike

__all__ = [
    "MAX_COORD", "MAX_LABEL", "SYNTHETIC_CLASSES", "AugmentConfig", "Example",
    "AnnotationDataset", "SyntheticDataset", "check_boxes_in_image", "label_gaps",
    "augment_example", "batch_indices", "eval_batch", "input_transformer", "load_batch",
    "prepare_example", "read_annotations", "synthetic_example", "train_batch",
    "write_annotations", "write_synthetic_dataset",
]

#: Class names of the synthetic task; index 0 is background.
SYNTHETIC_CLASSES = ("background", "cat", "coffee", "rocket")
# Object sources: class -> (scikit-image picture, crop rows y0:y1, cols x0:x1).
_OBJECTS = {"cat": ("chelsea", (20, 290, 90, 370)),
            "coffee": ("coffee", (10, 330, 90, 500)),
            "rocket": ("rocket", (30, 427, 190, 450))}
_TEXTURES = ("brick", "grass", "gravel")


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One image (``H x W x 3`` RGB, uint8 or float in [0, 1]) and its boxes ``(n, 5)``."""

    image: np.ndarray
    boxes: np.ndarray


# ----------------------------------------------------------------------------- annotations


#: Largest class label accepted (class maps are stored as uint16).
MAX_LABEL = 65535
#: Largest |coordinate| accepted, in pixels: 2**24, beyond which float32 (the input pipeline's
#: type) no longer holds every integer, and far beyond any image ``read_image`` accepts.
MAX_COORD = float(2**24)


def _check_box(box: Any, path: PathLike, line: int, k: int) -> list[float]:
    field = f"line {line}: boxes[{k}]"
    if not isinstance(box, (list, tuple)) or len(box) != 5:
        raise CaffeFormatError("a box is [x0, y0, x1, y1, label]", path=path, field=field)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise CaffeFormatError("box values must be numbers", path=path, field=field)
    try:
        x0, y0, x1, y1, label = (float(v) for v in box)
    except OverflowError:  # an integer beyond float's range
        raise CaffeFormatError("box value out of range", path=path, field=field) from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise CaffeFormatError("box coordinates must be finite", path=path, field=field)
    if max(abs(x0), abs(y0), abs(x1), abs(y1)) > MAX_COORD:
        raise CaffeFormatError(f"box coordinates must be pixels within +-{MAX_COORD:.0f}, got "
                               f"{[x0, y0, x1, y1]}", path=path, field=field)
    if not (x1 > x0 and y1 > y0):
        raise CaffeFormatError(f"empty box: needs x1 > x0 and y1 > y0, got {box}", path=path,
                               field=field)
    if not math.isfinite(label) or label != int(label) or not 1 <= label <= MAX_LABEL:
        raise CaffeFormatError(f"label must be an integer from 1 to {MAX_LABEL} (0 is "
                               f"background), got {box[4]!r}", path=path, field=field)
    return [x0, y0, x1, y1, label]


def read_annotations(path: PathLike) -> list[tuple[str, np.ndarray]]:
    """Read a JSON-lines annotation file: ``[(image_path, boxes (n, 5) float64), ...]``.

    Relative image paths are resolved against the file's folder. Malformed lines (bad
    JSON, non-finite or absurd coordinates, labels outside 1..``MAX_LABEL``) raise
    ``CaffeFormatError`` naming the file and the line.
    """
    return [(image, boxes) for image, boxes, _ in _read_records(path)]


def _read_records(path: PathLike) -> list[tuple[str, np.ndarray, int]]:
    """``read_annotations`` with each record's line number."""
    path = Path(path)
    try:
        with open_text(path) as f:
            text = f.read()
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise CaffeFormatError("not a UTF-8 text file", path=path) from None
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise CaffeFormatError(f"invalid JSON ({msg})", path=path,
                                   field=f"line {line_no}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise CaffeFormatError('expected {"image": PATH, "boxes": [...]}', path=path,
                                   field=f"line {line_no}")
        boxes = rec.get("boxes", [])
        if not isinstance(boxes, list):
            raise CaffeFormatError("boxes must be a list", path=path,
                                   field=f"line {line_no}: boxes")
        arr = np.array([_check_box(b, path, line_no, k) for k, b in enumerate(boxes)],
                       dtype=np.float64).reshape(-1, 5)
        image = rec["image"]
        if not image or "\0" in image:
            raise CaffeFormatError("image path is empty or holds a NUL", path=path,
                                   field=f"line {line_no}: image")
        if not os.path.isabs(image):
            image = os.fspath(path.parent / image)
        out.append((image, arr, line_no))
    return out


def open_text(path: PathLike):
    """A UTF-8 text file opened for reading; only regular files (a FIFO is refused)."""
    from ..images import ImageError, open_regular_file

    try:
        f = open_regular_file(path)
    except ImageError as e:
        raise CaffeFormatError(e.reason, path=path) from None
    import io

    return io.TextIOWrapper(f, encoding="utf-8")


def check_boxes_in_image(boxes: np.ndarray, hw: tuple[int, int], *, path: PathLike,
                         line: int | str, image: str) -> None:
    """Refuse a box lying wholly outside its ``(height, width)`` image (a box that is partly
    outside is clipped when the image is cropped)."""
    h, w = hw
    for k, (x0, y0, x1, y1, _) in enumerate(np.asarray(boxes).reshape(-1, 5)):
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise CaffeFormatError(
                f"box {[float(x0), float(y0), float(x1), float(y1)]} lies wholly outside its "
                f"{w}x{h} image {os.path.basename(image)!r} (x1/y1 exclusive; swapped x and "
                "y?)", path=path, field=f"line {line}: boxes[{k}]")


def write_annotations(path: PathLike, records: Sequence[tuple[str, Any]]) -> None:
    """Write ``[(image_path, boxes), ...]`` as JSON lines, atomically."""
    lines = []
    for image, boxes in records:
        rows = [[float(v) for v in b[:4]] + [int(b[4])] for b in np.asarray(boxes).reshape(-1, 5)]
        lines.append(json.dumps({"image": os.fspath(image), "boxes": rows}))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


class AnnotationDataset(Sequence):
    """The examples of an annotation file, images loaded on access (``load_image``).

    On construction every image's header is read (nothing decoded): a missing, unreadable,
    non-regular or oversized image, or a box wholly outside its image, is refused at once
    with the annotation file and line, not hours into training. ``check_images=False``
    skips that.
    """

    def __init__(self, path: PathLike, *, check_images: bool = True):
        self.path = Path(path)
        records = _read_records(path)
        if not records:
            raise CaffeFormatError("no annotated images", path=path)
        self.records = [(image, boxes) for image, boxes, _ in records]
        self.lines = [line for _, _, line in records]
        if check_images:
            for image, boxes, line in records:
                hw = self._header(image, line)
                check_boxes_in_image(boxes, hw, path=self.path, line=line, image=image)

    def _header(self, image: str, line: int) -> tuple[int, int]:
        from ..images import MAX_PIXELS, ImageError, check_pixels, image_size

        try:
            h, w = image_size(image)
            check_pixels(image, w, h, 3, max_pixels=MAX_PIXELS)
        except ImageError as e:
            raise CaffeFormatError(f"{image!r}: {e.reason}", path=self.path,
                                   field=f"line {line}: image") from None
        return h, w

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        from ..images import ImageError

        image, boxes = self.records[i]
        try:
            im = load_image(image)
        except ImageError as e:
            raise CaffeFormatError(f"{image!r}: {e.reason}", path=self.path,
                                   field=f"line {self.lines[i]}: image") from None
        return Example(im, boxes)

    def labels(self) -> set[int]:
        """The labels its boxes use."""
        return {int(b[4]) for _, bx in self.records for b in bx}

    def num_classes(self) -> int:
        """1 + the largest label (background included)."""
        return 1 + max(self.labels(), default=0)


def label_gaps(labels: set[int]) -> list[int]:
    """Labels between 1 and the largest used label that no box uses (sparse labels)."""
    top = max(labels, default=0)
    return [c for c in range(1, top + 1) if c not in labels]


# ----------------------------------------------------------------------------- synthetic


@functools.lru_cache(maxsize=16)
def _picture(name: str) -> np.ndarray:
    import skimage.data

    im = getattr(skimage.data, name)()
    im.setflags(write=False)
    return im


def _object_patch(cls: str) -> np.ndarray:
    name, (y0, y1, x0, x1) = _OBJECTS[cls]
    return _picture(name)[y0:y1, x0:x1]


def _resize_u8(im: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image  # a matplotlib dependency; antialiased bilinear, fast

    return np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(
        (hw[1], hw[0]), Image.Resampling.BILINEAR))


def synthetic_example(seed: int, index: int, *, size: tuple[int, int] = (483, 483),
                      object_size: tuple[int, int] = (100, 200), max_objects: int = 3,
                      classes: Sequence[str] = SYNTHETIC_CLASSES[1:]) -> Example:
    """Example ``index`` of the synthetic dataset ``seed``: 0..``max_objects`` pictures of
    ``classes`` (cat, coffee, rocket from scikit-image) pasted without overlap at random
    positions and scales (long side in ``object_size``) on a tinted texture.

    Deterministic in ``(seed, index)``; labels are ``1 + classes.index(name)``. uint8 image.
    """
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])
    h, w = size
    tex = _picture(_TEXTURES[rng.integers(len(_TEXTURES))])
    reps = (math.ceil(h / tex.shape[0]) + 1, math.ceil(w / tex.shape[1]) + 1)
    tex = np.tile(tex, reps) if reps != (1, 1) else tex
    ty, tx = rng.integers(tex.shape[0] - h + 1), rng.integers(tex.shape[1] - w + 1)
    gray = tex[ty:ty + h, tx:tx + w].astype(np.float32) / 255.0
    tint = rng.uniform(0.25, 0.9, size=3).astype(np.float32)
    contrast = np.float32(rng.uniform(0.4, 1.0))
    image = (0.5 + contrast * (gray[..., None] - 0.5)) * tint * 1.3
    image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    count = rng.choice(max_objects + 1, p=_count_probs(max_objects))
    boxes: list[list[float]] = []
    for _ in range(count):
        cls = int(rng.integers(len(classes)))
        patch = _object_patch(classes[cls])
        for _try in range(20):
            long_side = rng.uniform(*object_size)
            aspect = patch.shape[1] / patch.shape[0] * math.exp(rng.uniform(-0.2, 0.2))
            ph, pw = ((long_side, long_side * aspect) if aspect < 1
                      else (long_side / aspect, long_side))
            ph, pw = min(int(round(ph)), h), min(int(round(pw)), w)
            y0, x0 = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
            box = [x0, y0, x0 + pw, y0 + ph]
            if all(_inter(box, b) <= 0.1 * min(_area(box), _area(b)) for b in boxes):
                break
        else:
            continue
        obj = _resize_u8(patch, (ph, pw))
        if rng.random() < 0.5:
            obj = obj[:, ::-1]
        image[y0:y0 + ph, x0:x0 + pw] = obj
        boxes.append([float(v) for v in box] + [float(cls + 1)])
    return Example(image, np.array(boxes, dtype=np.float64).reshape(-1, 5))


def _count_probs(max_objects: int) -> np.ndarray:
    p = np.array([0.25] + [1.0 / (k + 1) for k in range(1, max_objects + 1)])
    return p / p.sum()


def _area(b: Sequence[float]) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _inter(a: Sequence[float], b: Sequence[float]) -> float:
    return (max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
            * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0))


class SyntheticDataset(Sequence):
    """``n`` synthetic examples (see :func:`synthetic_example`), generated on access."""

    def __init__(self, n: int, seed: int = 0, **kwargs: Any):
        if n < 1:
            raise ValueError("a dataset needs at least one example")
        self.n, self.seed, self.kwargs = int(n), int(seed), kwargs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return synthetic_example(self.seed, i % self.n, **self.kwargs)

    def num_classes(self) -> int:
        """Background + the object classes."""
        return 1 + len(self.kwargs.get("classes", SYNTHETIC_CLASSES[1:]))


def write_synthetic_dataset(out_dir: PathLike, n: int, seed: int = 0, **kwargs: Any) -> Path:
    """Write ``n`` synthetic examples as PNGs plus ``annotations.jsonl``; returns its path."""
    import matplotlib.image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, ex in enumerate(SyntheticDataset(n, seed, **kwargs)):
        rel = f"images/{i:05d}.png"
        atomic_write(out / rel, lambda f, im=ex.image: matplotlib.image.imsave(
            f, im, format="png"))
        records.append((rel, ex.boxes))
    path = out / "annotations.jsonl"
    write_annotations(path, records)
    return path


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: a random crop of ``scale`` x the input size (1.0: the input
    size itself, no resampling), a random horizontal flip, and truncation handling
    (a cropped box keeps its label if at least ``min_visible`` of its area remains)."""

    scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    min_visible: float = 0.5


def input_transformer(input_hw: tuple[int, int], mean: Any = None,
                      input_scale: float | None = None) -> TransformerConfig:
    """The inference preprocessing for a net input of ``input_hw``: RGB [0, 1] -> BGR
    [0, 255] minus the ImageNet per-channel mean (``mean`` overrides it), times
    ``input_scale`` if given (Caffe's ``transform_param { scale }``, e.g. 0.017)."""
    return caffe_transformer((3, *input_hw), mean=imagenet_mean_bgr() if mean is None else mean,
                             input_scale=input_scale)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    im = np.asarray(image)
    if im.dtype == np.uint8:
        return im.astype(np.float32) / np.float32(255.0)
    return im.astype(np.float32, copy=False)


def augment_example(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
                    crop_hw: tuple[int, int], augment: AugmentConfig = AugmentConfig()
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A random crop (size ``crop_hw`` times a random factor in ``augment.scale``, clamped to
    the image) and flip; boxes moved, clipped, and dropped when less than
    ``min_visible`` of them remains. Returns ``(image crop, boxes in crop pixels)``."""
    h, w = image.shape[:2]
    s = rng.uniform(*augment.scale)
    ch, cw = min(int(round(crop_hw[0] * s)), h), min(int(round(crop_hw[1] * s)), w)
    y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    crop = image[y0:y0 + ch, x0:x0 + cw]
    b = np.asarray(boxes, np.float64).reshape(-1, 5).copy()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    b[:, [0, 2]] = np.clip(b[:, [0, 2]] - x0, 0, cw)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]] - y0, 0, ch)
    visible = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    b = b[visible >= augment.min_visible * area - 1e-9]
    b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
    if augment.flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
        b[:, [0, 2]] = cw - b[:, [2, 0]]
    return crop, b


def prepare_example(example: Example, cfg: TransformerConfig, *,
                    rng: np.random.Generator | None = None,
                    augment: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(blob (3, H, W) float32, boxes in input pixels)`` for one example.

    Without ``rng`` (evaluation) the whole image goes through ``preprocess`` like at inference
    (resized to the input size); with ``rng`` it is first cropped/flipped (``augment``).
    """
    image, boxes = example.image, np.asarray(example.boxes, np.float64).reshape(-1, 5)
    ih, iw = cfg.input_shape[1:]
    if rng is not None:
        image, boxes = augment_example(image, boxes, rng, (ih, iw), augment or AugmentConfig())
    h, w = image.shape[:2]
    blob = _preprocess(cfg, _as_float_image(image))
    if (h, w) != (ih, iw):
        boxes = boxes * np.array([iw / w, ih / h, iw / w, ih / h, 1.0])
    return blob, boxes


def load_batch(dataset: Sequence[Example], indices: Sequence[int], cfg: TransformerConfig, *,
               rng: np.random.Generator | None = None, augment: AugmentConfig | None = None
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Images ``(N, 3, H, W)`` float32 and a list of boxes (input pixels) for ``indices``."""
    blobs, boxes = [], []
    for i in indices:
        blob, b = prepare_example(dataset[int(i)], cfg, rng=rng, augment=augment)
        blobs.append(blob)
        boxes.append(b)
    return np.stack(blobs), boxes


def batch_indices(n: int, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Dataset indices of training batch ``step``: consecutive slices of per-epoch seeded
    permutations, so every example is seen once per epoch."""
    pos = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(pos, n)
    perms = {int(e): np.random.default_rng([int(seed), int(e), 0xE90C]).permutation(n)
             for e in np.unique(epochs)}
    return np.array([perms[int(e)][o] for e, o in zip(epochs, offsets, strict=True)])


def train_batch(dataset: Sequence[Example], step: int, *, batch_size: int,
                cfg: TransformerConfig, seed: int = 0,
                augment: AugmentConfig = AugmentConfig(), rows: slice | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Training batch ``step`` with augmentation: a pure function of its arguments. Each row
    has its own seeded augmentation, so ``rows`` (a slice of the batch: one process's share
    of a global batch) reads only those examples and gives exactly those rows."""
    idx = batch_indices(len(dataset), step, batch_size, seed)
    blobs, boxes = [], []
    for r in range(batch_size)[rows or slice(None)]:
        rng = np.random.default_rng([int(seed), int(step), 0xA06, r])
        blob, b = prepare_example(dataset[int(idx[r])], cfg, rng=rng, augment=augment)
        blobs.append(blob)
        boxes.append(b)
    if not blobs:
        raise ValueError(f"rows {rows} of a batch of {batch_size} select no example")
    return np.stack(blobs), boxes


def eval_batch(dataset: Sequence[Example], start: int, batch_size: int,
               cfg: TransformerConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """Examples ``start:start + batch_size`` preprocessed as at inference (no augmentation)."""
    return load_batch(dataset, range(start, min(start + batch_size, len(dataset))), cfg)
