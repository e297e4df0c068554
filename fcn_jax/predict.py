"""Batch inference over many images: ``fcn-jax predict``'s engine, as small functions.

A run reads images, preprocesses them like pycaffe's ``Transformer`` (resized to the net's
input, so every batch has one shape and the forward pass compiles once; the last batch is
padded), runs the jit-compiled net batch by batch and writes results as it goes:

``OUT/results.jsonl``
    one JSON record per image, appended and fsynced after every batch (a journal):
    ``{"image", "top_k": [{"class", "score", "label"?}], "nonfinite"}``; in dense mode also
    ``{"shard", "key", "shape"}`` pointing at the maps, and ``top_k`` ranks the classes by
    their score averaged over the whole map; ``{"image", "error"}`` for an image that could
    not be read.
``OUT/maps/NNNNNN.npz`` (dense and blob modes)
    one archive per batch, written atomically *before* its records: ``KEY_argmax`` (H, W)
    class map, ``KEY_score`` (H, W) its score, and ``KEY_blob`` (C, H, W) with
    ``save_blob``; in the blob mode (``save_blob`` without ``dense``) only ``KEY_blob``,
    the output blob of any shape.
``OUT/run.json``, ``OUT/summary.json``
    everything that decides an output (:func:`run_fingerprint`: net and weights digests,
    preprocessing, input size, dtype, output blob, dense/top_k/labels), and counts, failures
    and throughput at the end (atomic).

An interrupted run continues with ``resume=True``: images with a record (and, in dense mode,
an existing shard) are skipped, a torn last line of the journal is dropped, failed images
are tried again. A resume whose fingerprint differs from ``run.json`` is refused, naming
what changed, so one results file never mixes two nets, weights or preprocessings. Memory
stays flat: nothing grows with the number of images processed except the list of names.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from converters import CaffeFormatError
from converters.caffe_io import resolve_memory_budget
from converters.files import atomic_write_bytes

from . import images as _images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pnm")
JOURNAL = "results.jsonl"
#: Images with more pixels than this are skipped unread (decompression bombs, memory).
MAX_PIXELS = _images.MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What to compute and write. ``top_k`` classes per image from ``blob`` (default: the
    net's last blob; ``top_k`` None: 5, or all classes when fewer); ``dense`` writes
    per-pixel class maps of a (N, C, H, W) blob and ranks classes by their mean score over
    the map. ``save_blob`` without ``dense`` is the blob mode: the whole output blob of
    each image is stored (any shape: boxes, landmarks, features), no classes are ranked.
    ``labels`` name the classes (one per class); without them, a blob of 1000 classes is
    named with ImageNet's synset words unless ``imagenet_labels`` is False.
    ``native_size``: every image at its own size (no resize; dense or blob mode), batched
    with images of the same size bucket (``fcn_jax.inference.CompiledForward.stream``), so
    the maps are at the image's own resolution."""

    batch_size: int = 8
    top_k: int | None = None
    dense: bool = False
    blob: str | None = None
    save_blob: bool = False
    labels: tuple[str, ...] | None = None
    workers: int = 2
    max_pixels: int = MAX_PIXELS
    imagenet_labels: bool = True
    native_size: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")
        if self.native_size and not (self.dense or self.save_blob):
            raise ValueError("native_size needs dense maps or the blob mode (--dense or "
                             "--save-blob): a classifier's output takes one input size")

    @property
    def stores_arrays(self) -> bool:
        """Whether each image's arrays go to ``OUT/maps`` shards (dense or blob mode)."""
        return self.dense or self.save_blob


@dataclasses.dataclass
class PredictSummary:
    """Counts of one run (``done_before``: skipped by ``--resume``)."""

    total: int
    done_before: int
    processed: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    nonfinite: int = 0
    seconds: float = 0.0
    first_batch_seconds: float = 0.0
    first_batch_images: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput after the first batch (which includes compilation)."""
        steady = self.seconds - self.first_batch_seconds
        n = self.processed - self.first_batch_images
        if steady > 0 and n > 0:
            return n / steady
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "done_before": self.done_before,
                "processed": self.processed, "ok": self.processed - len(self.failed),
                "failed": len(self.failed), "failed_images": self.failed,
                "nonfinite": self.nonfinite, "seconds": round(self.seconds, 3),
                "first_batch_seconds": round(self.first_batch_seconds, 3),
                "first_batch_images": self.first_batch_images,
                "images_per_second": round(self.images_per_second, 2)}


# ----------------------------------------------------------------------------- inputs


def list_images(paths: Sequence[str | os.PathLike] = (), directory: str | os.PathLike | None
                = None, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Image paths: ``paths`` in the given order, then every file under ``directory`` whose
    suffix is an image extension, sorted; duplicates dropped."""
    out: list[str] = [os.path.normpath(os.fspath(p)) for p in paths]
    if directory is not None:
        root = Path(directory)
        if not root.is_dir():
            raise NotADirectoryError(f"{directory}: not a directory")
        exts = {e.lower() for e in extensions}
        found = []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            found.extend(os.path.join(folder, f) for f in files
                         if os.path.splitext(f)[1].lower() in exts)
        out.extend(sorted(os.path.normpath(p) for p in found))
    return list(dict.fromkeys(out))


def load_and_preprocess(path: str, transformer, *, max_pixels: int = MAX_PIXELS,
                        native: bool = False) -> np.ndarray:
    """One image as the net's ``(C, H, W)`` float32 input (``fcn_jax.preprocess``); raises
    ``fcn_jax.images.ImageError`` on an unreadable, corrupt, oversized or non-regular file
    (only the first frame of a multi-frame image is read). ``native``: at the image's own
    size (the transformer's height and width are ignored; its mean must be per channel)."""
    from fcn_jax.preprocess import load_image, native_config, preprocess

    color = transformer.input_shape[0] != 1
    img = load_image(path, color=color, max_pixels=max_pixels)
    if native:
        transformer = native_config(transformer, img.shape)
    return preprocess(transformer, img)


def _reason(e: BaseException) -> str:
    """Why an image was skipped, one line: an ``ImageError``'s own reason, else the type."""
    if isinstance(e, CaffeFormatError):
        return " ".join(e.reason.split())[:300]
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------- forward


def _forward_native(module, params, outputs: tuple[str, ...]):
    """The compiled forward of ``native_size`` runs: ``stream`` images of any sizes
    (size buckets of 32 px for nets that allow padding, else exact sizes)."""
    from .inference import compile_forward

    return compile_forward(module, params, outputs=outputs)


def _forward(module, params, outputs: tuple[str, ...]
             ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The compiled forward pass: an (N, C, H, W) float32 batch -> ``{blob: array}``.

    The one place that builds the jitted net, so that a faster engine can replace it.
    """
    from .inference import compile_forward

    # weights laid out once for the NHWC fast path; the batch shape is fixed here, so no
    # spatial buckets (spatial_step=1)
    return compile_forward(module, params, outputs=outputs, spatial_step=1)


def check_activation_budget(module, params, batch_shape: tuple[int, ...], *,
                            memory_budget: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every blob's shape for this batch shape (a shape-only trace), refusing a batch whose
    blobs together exceed the memory budget before anything runs."""
    import jax
    import jax.numpy as jnp

    budget = resolve_memory_budget(memory_budget)
    shapes = jax.eval_shape(lambda p, x: module.apply({"params": p}, x), params,
                            jax.ShapeDtypeStruct(batch_shape, jnp.float32))
    total = sum(math.prod(s.shape) * s.dtype.itemsize for s in shapes.values())
    if total > budget:
        raise CaffeFormatError(
            f"a batch of shape {batch_shape} needs {total} bytes of blobs, over the memory "
            f"budget of {budget}; use a smaller --batch-size or input size", field="batch")
    return {k: tuple(v.shape) for k, v in shapes.items()}


# ----------------------------------------------------------------------------- outputs


def top_k(scores: np.ndarray, k: int, labels: Sequence[str] | None = None
          ) -> list[dict[str, Any]]:
    """The ``k`` highest of a 1-D score vector, best first (ties: lower class first)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    k = min(k, scores.size)
    order = np.argsort(-scores, kind="stable")[:k]
    out = []
    for c in order:
        entry: dict[str, Any] = {"class": int(c), "score": _finite_or_none(scores[c])}
        if labels is not None and c < len(labels):
            entry["label"] = labels[c]
        out.append(entry)
    return out


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def class_map(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax class, its score) per pixel of a (C, H, W) score blob."""
    idx = np.argmax(blob, axis=0)
    score = np.take_along_axis(blob, idx[None], axis=0)[0]
    dtype = np.uint16 if blob.shape[0] <= 65536 else np.int32
    return idx.astype(dtype), score.astype(np.float32)


# ----------------------------------------------------------------------------- journal


def read_journal(out_dir: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """The last good record of each image in ``OUT/results.jsonl`` and the byte length of
    its intact part (a torn last line, from a killed run, is not counted)."""
    path = Path(out_dir) / JOURNAL
    records: dict[str, dict] = {}
    good = 0
    if not path.exists():
        return records, 0
    from converters.files import open_regular

    with open_regular(path) as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn tail of a killed run
            good += len(line)
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a damaged line: its image is simply done again
            if isinstance(rec, dict) and isinstance(rec.get("image"), str):
                records[os.path.normpath(rec["image"])] = rec
    return records, good


def finished_images(out_dir: str | os.PathLike, dense: bool) -> set[str]:
    """Images a previous run finished: a record without error (and its shard, if dense)."""
    records, _ = read_journal(out_dir)
    done = set()
    shard_ok: dict[str, bool] = {}
    for image, rec in records.items():
        if "error" in rec:
            continue
        if dense:
            shard = rec.get("shard")
            if not isinstance(shard, str):
                continue
            if shard not in shard_ok:
                shard_ok[shard] = (Path(out_dir) / shard).is_file()
            if not shard_ok[shard]:
                continue
        done.add(image)
    return done


def _append(journal, records: Iterable[dict]) -> None:
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    journal.write(text.encode())
    journal.flush()
    os.fsync(journal.fileno())


def _save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getbuffer())


# ----------------------------------------------------------------------------- run


def _loaded_batches(images: Sequence[str], transformer, cfg: PredictConfig
                    ) -> Iterator[list[tuple[str, np.ndarray | None, str | None]]]:
    """Batches of ``(path, input or None, error or None)``, read by ``cfg.workers`` threads
    two batches ahead, so that decoding overlaps the forward pass of the batch before
    (memory: at most three batches of images)."""
    def load(path: str):
        try:
            return path, load_and_preprocess(path, transformer, max_pixels=cfg.max_pixels,
                                             native=cfg.native_size), None
        except Exception as e:  # any decoder error: the image is skipped, the run goes on
            return path, None, _reason(e)

    chunks = [images[i:i + cfg.batch_size] for i in range(0, len(images), cfg.batch_size)]
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        pending: collections.deque[list[Future]] = collections.deque()
        for chunk in chunks:
            pending.append([pool.submit(load, p) for p in chunk])
            if len(pending) > 2:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


def run_predict(module, params, images: Sequence[str], out_dir: str | os.PathLike,
                transformer, cfg: PredictConfig = PredictConfig(), *, resume: bool = False,
                progress: bool = True, memory_budget: int | None = None,
                on_batch: Callable[[int, PredictSummary], None] | None = None,
                net_text: str | None = None, sources: Mapping[str, str] | None = None
                ) -> PredictSummary:
    """Run the net over ``images`` and write results to ``out_dir`` (see the module doc).

    ``transformer``: a ``fcn_jax.preprocess.TransformerConfig`` whose ``input_shape`` is the
    net input. Without ``resume``, an ``out_dir`` that already holds results is refused; with
    it, a run whose :func:`run_fingerprint` differs from the first run's is refused.
    ``net_text``: the net's prototxt text (its digest identifies the net; default: a digest of
    the layer graph); ``sources``: file names recorded in ``run.json`` for the reader, not
    compared. ``on_batch(n_batches_done, summary)`` is called after each batch is written.
    """
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive(out):
            return _run(module, params, images, out, transformer, cfg, resume=resume,
                        progress=progress, memory_budget=memory_budget, on_batch=on_batch,
                        net_text=net_text, sources=sources)
    except BaseException:
        if created:  # a refused run leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One run per output folder at a time (an advisory lock, released if the process dies;
    the lock file is removed when the run ends)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock = out / ".lock"
    with open(lock, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{out}: another fcn-jax predict is writing there") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()  # still held: a run starting now locks a new file


def _run(module, params, images: Sequence[str], out: Path, transformer, cfg: PredictConfig,
         *, resume: bool, progress: bool, memory_budget: int | None,
         on_batch: Callable[[int, PredictSummary], None] | None, net_text: str | None,
         sources: Mapping[str, str] | None) -> PredictSummary:
    from tqdm import tqdm

    journal_path = out / JOURNAL
    if journal_path.exists() and journal_path.stat().st_size and not resume:
        raise FileExistsError(f"{journal_path} exists: pass --resume to continue that run, "
                              "or choose another --out")
    c, h, w = transformer.input_shape
    batch_shape = (cfg.batch_size, c, h, w)
    shapes = check_activation_budget(module, params, batch_shape, memory_budget=memory_budget)
    blob = cfg.blob or _last_blob(module, shapes)
    if blob not in shapes:
        raise CaffeFormatError(f"the net has no blob {blob!r} (it has {list(shapes)})",
                               field="blob")
    _check_blob_shape(blob, shapes[blob], cfg)
    if cfg.dense or not cfg.save_blob:  # the blob mode ranks no classes
        cfg = _resolve_classes(cfg, blob, int(shapes[blob][1]))
    settings = run_fingerprint(module, params, transformer, cfg, blob=blob, net_text=net_text)
    if resume:
        _check_same_settings(out / "run.json", settings,
                             has_results=journal_path.exists() and journal_path.stat().st_size)
    record = dict(settings, sources=dict(sources or {}))
    atomic_write_bytes(out / "run.json", (json.dumps(record, indent=2) + "\n").encode())

    done = finished_images(out, cfg.stores_arrays) if resume else set()
    todo = [p for p in images if os.path.normpath(p) not in done]
    summary = PredictSummary(total=len(images), done_before=len(images) - len(todo))
    if resume:
        _, good = read_journal(out)
        if journal_path.exists() and journal_path.stat().st_size != good:
            with open(journal_path, "r+b") as f:  # drop a torn last line
                f.truncate(good)
    if not todo:
        _write_summary(out, summary)
        return summary

    forward = (_forward_native if cfg.native_size else _forward)(module, params, (blob,))

    maps_dir = out / "maps"
    if cfg.stores_arrays:
        maps_dir.mkdir(exist_ok=True)
    shard_no = _next_shard(maps_dir) if cfg.stores_arrays else 0
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    batches = 0
    try:
        with open(journal_path, "ab") as journal:
            for batch in _loaded_batches(todo, transformer, cfg):
                records = _run_batch(batch, forward, blob, cfg, batch_shape, maps_dir,
                                     shard_no, summary, bar)
                shard_no += cfg.stores_arrays
                _append(journal, records)
                summary.processed += len(batch)
                batches += 1
                if batches == 1:
                    summary.first_batch_seconds = time.perf_counter() - start
                    summary.first_batch_images = len(batch)
                summary.seconds = time.perf_counter() - start
                bar.update(len(batch))
                if summary.failed:
                    bar.set_postfix(failed=len(summary.failed), refresh=False)
                if on_batch is not None:
                    on_batch(batches, summary)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        _write_summary(out, summary)
    return summary


def _run_batch(batch, forward, blob: str, cfg: PredictConfig, batch_shape, maps_dir: Path,
               shard_no: int, summary: PredictSummary, bar) -> list[dict]:
    ok = [i for i, (_, arr, _) in enumerate(batch) if arr is not None]
    if cfg.native_size:  # by size, so that images of one size bucket share a batch
        ok.sort(key=lambda i: batch[i][1].shape)
        outputs = dict(zip(ok, (o[blob] for o in forward.stream(
            [batch[i][1] for i in ok], batch_size=cfg.batch_size)), strict=True))
    else:
        x = np.zeros(batch_shape, np.float32)  # padded to a full batch: one compiled shape
        for j, i in enumerate(ok):
            x[j] = batch[i][1]
        y = forward(x)[blob] if ok else None
        outputs = {i: y[j] for j, i in enumerate(ok)}
    records: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    shard = f"maps/{shard_no:06d}.npz"
    for i, (path, _, error) in enumerate(batch):
        if error is not None:
            summary.failed.append(path)
            bar.write(f"warning: skipping {path}: {error}", file=sys.stderr)
            records.append({"image": path, "error": error})
            continue
        out = outputs[i]
        finite = bool(np.all(np.isfinite(out)))
        if not finite:
            summary.nonfinite += 1
            bar.write(f"warning: non-finite values in {blob!r} for {path}", file=sys.stderr)
        rec: dict[str, Any] = {"image": path}
        if cfg.dense:
            key = f"i{i}"
            amax, score = class_map(out)
            arrays[f"{key}_argmax"] = amax
            arrays[f"{key}_score"] = score
            if cfg.save_blob:
                arrays[f"{key}_blob"] = out.astype(np.float32)
            rec.update(shard=shard, key=key, shape=list(amax.shape),
                       top_k=top_k(out.reshape(out.shape[0], -1).mean(axis=1), cfg.top_k,
                                   cfg.labels))
        elif cfg.save_blob:  # the blob mode: the output as it is
            key = f"i{i}"
            arrays[f"{key}_blob"] = np.asarray(out, np.float32)
            rec.update(shard=shard, key=key, shape=list(np.shape(out)))
        else:
            rec["top_k"] = top_k(out, cfg.top_k, cfg.labels)
        rec["nonfinite"] = not finite
        records.append(rec)
    if arrays:
        _save_npz_atomic(maps_dir / f"{shard_no:06d}.npz", arrays)
    return records


def _last_blob(module, shapes: Mapping[str, Any]) -> str:
    """The net's last blob in execution order (traced dicts come back key-sorted)."""
    from fcn_jax.net import blob_names

    try:
        names = [n for n in blob_names(module) if n in shapes]
    except (AttributeError, TypeError):  # not a CaffeGraph
        names = []
    return names[-1] if names else list(shapes)[-1]


def _check_blob_shape(blob: str, shape: tuple[int, ...], cfg: PredictConfig) -> None:
    if cfg.save_blob and not cfg.dense:
        return  # the blob mode stores any shape
    if cfg.dense:
        if len(shape) != 4:
            raise CaffeFormatError(f"--dense needs an (N, C, H, W) blob; {blob!r} is {shape}",
                                   field="blob")
    elif len(shape) != 2 and not (len(shape) == 4 and shape[2:] == (1, 1)):
        raise CaffeFormatError(f"top-k needs an (N, C) blob; {blob!r} is {shape} (a dense "
                               "map? use --dense)", field="blob")


def _next_shard(maps_dir: Path) -> int:
    numbers = [int(p.stem) for p in maps_dir.glob("*.npz") if p.stem.isdigit()]
    return max(numbers, default=-1) + 1


def _resolve_classes(cfg: PredictConfig, blob: str, classes: int) -> PredictConfig:
    """``cfg`` with its effective ``top_k`` and ``labels`` for a blob of ``classes`` classes;
    refuses a ``top_k`` above the class count and labels for fewer classes."""
    top = cfg.top_k
    if top is None:
        top = min(5, classes)
    elif top > classes:
        raise CaffeFormatError(f"--top-k {top} is more than the {classes} classes of blob "
                               f"{blob!r}", field="top_k")
    labels = cfg.labels
    if labels is not None:
        if len(labels) < classes:
            raise CaffeFormatError(f"--labels has {len(labels)} lines but blob {blob!r} has "
                                   f"{classes} classes (one name per class, in class order)",
                                   field="labels")
        if len(labels) > classes:
            print(f"warning: --labels has {len(labels)} lines, blob {blob!r} has {classes} "
                  f"classes: the last {len(labels) - classes} names are unused",
                  file=sys.stderr)
    elif cfg.imagenet_labels:
        from .assets import default_labels

        found = default_labels(classes)
        labels = tuple(found) if found is not None else None
    return dataclasses.replace(cfg, top_k=top, labels=labels)


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return "blake2b:" + h.hexdigest()


def weights_digest(params: Mapping[str, Mapping[str, Any]]) -> str:
    """A digest of a params tree: every layer, blob name, dtype, shape and value."""
    def chunks() -> Iterator[bytes]:
        for layer in sorted(params):
            for name in sorted(params[layer]):
                a = np.ascontiguousarray(np.asarray(params[layer][name]))
                yield f"{layer}/{name}:{a.dtype.str}:{a.shape};".encode()
                yield a.tobytes()
    return _digest(chunks())


def net_digest(module, net_text: str | None = None) -> str:
    """A digest of the net: of its prototxt text when given, else of its layer graph
    (names, types, bottoms and tops)."""
    if net_text is not None:
        return _digest([net_text.encode()])
    try:
        from .inference import module_layers

        graph = [[s.name, s.type, list(s.bottoms), list(s.tops)]
                 for s in module_layers(module)]
    except (TypeError, AttributeError):
        graph = [type(module).__name__, repr(module)]
    return _digest([json.dumps(graph).encode()])


def _plain(v: Any) -> Any:
    """A JSON value for a preprocessing setting (arrays as lists, big ones as a digest)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    a = np.asarray(v)
    if a.size <= 16:
        return [float(x) for x in a.ravel()] if a.dtype.kind == "f" else a.tolist()
    return {"shape": list(a.shape), "digest": _digest([a.astype(np.float64).tobytes()])}


def run_fingerprint(module, params, transformer, cfg: PredictConfig, *, blob: str,
                    net_text: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Everything that decides a run's outputs, as recorded in ``OUT/run.json`` and compared
    on ``--resume``: net and weights digests, preprocessing (input size included), dtype,
    output blob, mode, ``top_k`` and labels."""
    pre = {f: _plain(getattr(transformer, f, None))
           for f in ("input_shape", "transpose", "channel_swap", "raw_scale", "mean",
                     "input_scale")}
    return {
        "net": getattr(module, "name_", None),
        "net_digest": net_digest(module, net_text),
        "weights_digest": weights_digest(params),
        "input_shape": list(transformer.input_shape),
        "preprocessing": pre,
        "dtype": dtype,
        "blob": blob,
        "dense": cfg.dense,
        "save_blob": cfg.save_blob,
        "native_size": cfg.native_size,
        "top_k": cfg.top_k,
        "labels_digest": (None if cfg.labels is None
                          else _digest(["\n".join(cfg.labels).encode()])),
    }


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k == "preprocessing":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_regular_text(path: Path) -> str:
    """A small text file of a run, through the guarded reader (a FIFO never blocks)."""
    from converters.files import open_regular

    with open_regular(path) as f:
        return f.read().decode("utf-8")


def _check_same_settings(path: Path, settings: dict[str, Any], has_results: bool = True
                         ) -> None:
    """Refuse a resume whose settings differ from ``run.json``'s, naming each change."""
    try:
        from converters.files import open_regular

        with open_regular(path) as f:
            before = json.loads(f.read())
    except FileNotFoundError:
        if has_results:
            raise CaffeFormatError("--resume: the results have no run.json to check the "
                                   "settings against; use another --out", path=path) from None
        return
    except (OSError, ValueError) as e:
        raise CaffeFormatError(f"--resume: cannot read the first run's settings ({e}); use "
                               "another --out", path=path) from None
    if not isinstance(before, dict):
        raise CaffeFormatError("--resume: not a settings object; use another --out", path=path)
    old, new = _flat(before), _flat(settings)
    missing = object()
    changed = [k for k in new if old.get(k, missing) != new[k]]
    if changed:
        def show(v: Any) -> str:
            return "(not recorded)" if v is missing else repr(v)

        raise CaffeFormatError(
            "--resume with different settings than the first run: "
            + ", ".join(f"{k} {show(old.get(k, missing))} -> {show(new[k])}" for k in changed)
            + " (use another --out, or the first run's settings)", path=path)


# ----------------------------------------------------------------------------- processes


def part_dir(out_dir: str | os.PathLike, process_id: int, num_processes: int) -> Path:
    """The folder where process ``process_id`` of ``num_processes`` writes its own run."""
    return Path(out_dir) / f"process-{process_id}-of-{num_processes}"


def run_predict_processes(module, params, images: Sequence[str], out_dir: str | os.PathLike,
                          transformer, cfg: PredictConfig = PredictConfig(), *,
                          process_id: int, num_processes: int, resume: bool = False,
                          **kwargs: Any) -> PredictSummary:
    """:func:`run_predict` as one of ``num_processes`` processes (``jax.distributed``), each
    called with the same ``images``: this one runs its share
    (:func:`fcn_jax.distributed.process_share`) into :func:`part_dir` (its own journal,
    maps, run.json, so ``resume`` continues each share), waits for the others, and process
    0 merges every part into ``out_dir`` (:func:`merge_parts`). Returns the merged summary
    on process 0, this process's own elsewhere. ``out_dir`` must be one folder that every
    process sees (a shared file system)."""
    from . import distributed as D

    out = Path(out_dir)
    merged = out / JOURNAL
    if not resume and merged.exists() and merged.stat().st_size:
        raise FileExistsError(f"{merged} exists: pass --resume to continue that run, or "
                              "choose another --out")
    share = D.process_share(images, process_id, num_processes, key=os.path.normpath)
    own = run_predict(module, params, share, part_dir(out, process_id, num_processes),
                      transformer, cfg, resume=resume, **kwargs)
    D.barrier("predict: every share done")
    if process_id != 0:
        return own
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return merge_parts(out, images, num_processes)


def merge_parts(out_dir: str | os.PathLike, images: Sequence[str], num_processes: int
                ) -> PredictSummary:
    """Write ``OUT/results.jsonl`` (one record per image of ``images``, in their order; a
    dense record's ``shard`` points into its part's ``maps/``), ``OUT/run.json`` and
    ``OUT/summary.json`` from the parts of :func:`run_predict_processes`. Raises
    ``CaffeFormatError`` when a part lacks an image or disagrees on the settings."""
    out = Path(out_dir)
    records: dict[str, dict] = {}
    settings: dict[str, Any] | None = None
    summary = PredictSummary(total=0, done_before=0)
    parts = [part_dir(out, i, num_processes) for i in range(num_processes)]
    for part in parts:
        try:
            run = json.loads(read_regular_text(part / "run.json"))
            done = json.loads(read_regular_text(part / "summary.json"))
        except (OSError, ValueError) as e:
            raise CaffeFormatError(f"cannot read this process's run ({e})", path=part) from None
        run.pop("sources", None)
        if settings is None:
            settings = run
        elif run != settings:
            raise CaffeFormatError("this process ran with other settings than process 0 "
                                   "(every process needs the same arguments)", path=part)
        rel = part.name
        for image, rec in read_journal(part)[0].items():
            if isinstance(rec.get("shard"), str):
                rec = dict(rec, shard=f"{rel}/{rec['shard']}")
            records[image] = rec
        summary.total += int(done.get("total", 0))
        summary.done_before += int(done.get("done_before", 0))
        summary.processed += int(done.get("processed", 0))
        summary.failed += list(done.get("failed_images", []))
        summary.nonfinite += int(done.get("nonfinite", 0))
        summary.seconds = max(summary.seconds, float(done.get("seconds", 0.0)))
        summary.first_batch_seconds = max(summary.first_batch_seconds,
                                          float(done.get("first_batch_seconds", 0.0)))
        summary.first_batch_images += int(done.get("first_batch_images", 0))
    missing = [p for p in images if os.path.normpath(p) not in records]
    if missing:
        raise CaffeFormatError(f"{len(missing)} images have no record in any process's "
                               f"results, e.g. {missing[0]} (rerun with --resume)", path=out)
    order = {os.path.normpath(p): i for i, p in enumerate(images)}
    summary.failed.sort(key=lambda p: order.get(os.path.normpath(p), len(order)))
    text = "".join(json.dumps(records[os.path.normpath(p)], allow_nan=False) + "\n"
                   for p in images)
    atomic_write_bytes(out / JOURNAL, text.encode())
    atomic_write_bytes(out / "run.json", (json.dumps(
        dict(settings or {}, processes=num_processes,
             parts=[p.name for p in parts]), indent=2) + "\n").encode())
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: PredictSummary) -> None:
    atomic_write_bytes(out / "summary.json",
                       (json.dumps(summary.as_dict(), indent=2) + "\n").encode())


__all__ = ["IMAGE_EXTENSIONS", "PredictConfig", "PredictSummary", "check_activation_budget",
           "class_map", "finished_images", "list_images", "load_and_preprocess", "net_digest",
           "merge_parts", "part_dir", "read_journal", "run_fingerprint", "run_predict",
           "run_predict_processes", "top_k", "weights_digest"]
