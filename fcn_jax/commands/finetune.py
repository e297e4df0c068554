"""``fcn-jax finetune``: fine-tune a fully convolutional net with a sliding-window loss.

``fcn-jax finetune [--weights W] [--data ANN.jsonl | --demo] --steps N --out DIR`` writes
``DIR/metrics.json`` (``train_loss`` per step, ``eval.before`` / ``eval.after`` per-cell
accuracy and mean IoU of the dense map on held-out images, ``eval_curve``),
``loss_curve.png``, ``heatmap_<n>.png`` (P(object) before/after on held-out images),
``targets.png`` (the ground-truth cell labels) and ``classes_after.png`` (the argmax map) of
the first of them, ``checkpoints/`` (Orbax: the last 3 steps saved and the one of lowest
training loss; resumable with ``--resume DIR/checkpoints``) and the fine-tuned
``finetuned.prototxt`` + ``finetuned.caffemodel`` (any ``--input-scale`` folded into the
first layer, so it takes the standard ImageNet preprocessing).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import converters
from converters import CaffeFormatError
from fcn_jax import distributed

#: Input scale when training from scratch: about 1 / (std of an ImageNet-preprocessed pixel),
#: the ``scale: 0.017`` of many Caffe train prototxts, so that layer 1 sees unit-scale input.
SCRATCH_INPUT_SCALE = 0.017
#: Narrow CaffeNet widths (conv1..5, fc6, fc7) of the demo: trains on 2 CPU cores in minutes.
DEMO_WIDTHS = (16, 32, 48, 48, 32, 64, 64)


class FinetuneError(ValueError):
    """A setting or input that cannot work (printed as one line by the CLI)."""


@dataclasses.dataclass
class FinetuneConfig:
    """Everything ``fcn-jax finetune`` does, as data (the CLI flags map one to one)."""

    out: str
    steps: int
    demo: bool = False
    data: str | None = None
    val: str | None = None
    val_fraction: float = 0.1
    val_images: int = 96
    train_images: int = 0  # demo: synthetic training images (0: steps * batch_size)
    weights: str | None = None
    model: str | None = None
    classes: Sequence[str] | None = None
    input_size: tuple[int, int] = (451, 451)
    widths: Sequence[int] = DEMO_WIDTHS
    batch_size: int = 8
    solver: str = "Adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: str = "fixed"
    init: str = "msra"
    input_scale: float | None = None
    freeze: Sequence[str] = ()
    positive: float = 0.7
    negative: float = 0.3
    class_weights: Sequence[float] | None = None
    seed: int = 0
    resume: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    devices: int = 1
    eval_every: int = 0
    heatmap_images: int = 3
    progress: bool = True
    verbose: bool = False


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a fully convolutional net with a sliding-window loss",
        description="Sliding-window fine-tuning: every output cell is labelled from the boxes "
                    "by its input window (227 px at stride 32 for CaffeNet) and trained with "
                    "a per-cell softmax loss.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="training annotations, JSON lines: "
                     '{"image": PATH, "boxes": [[x0, y0, x1, y1, label], ...]}')
    src.add_argument("--demo", action="store_true",
                     help="the embedded synthetic task (scikit-image objects on textures)")
    p.add_argument("--steps", type=int, required=True,
                   help="total training steps (a resumed run continues up to this step)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", help="caffemodel to start from (a classifier's fc layers are "
                   "cast to convolutions; layers whose shapes differ keep their init)")
    p.add_argument("--model", help="fully convolutional deploy prototxt (default: CaffeNet, "
                   "fully convolutional, --widths)")
    p.add_argument("--val", help="held-out annotations (default: the last --val-fraction of "
                   "--data)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-images", type=int, default=96, help="demo: held-out images")
    p.add_argument("--train-images", type=int, default=0,
                   help="demo: distinct training images (default: steps x batch size)")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="class names, background first (default: from the data)")
    p.add_argument("--input-size", type=int, nargs=2, default=(451, 451), metavar=("H", "W"))
    p.add_argument("--widths", type=int, nargs=7, default=DEMO_WIDTHS, metavar="N",
                   help="CaffeNet conv1..conv5, fc6, fc7 widths (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--solver", choices=("SGD", "Adam"), default="Adam")
    p.add_argument("--lr", type=float, help="base learning rate (default: Adam 1e-3, "
                   "SGD 1e-3 with --weights else 1e-2)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-policy", choices=("fixed", "poly"), default="fixed",
                   help="poly: Caffe's poly decay (power 1) to 0 at --steps")
    p.add_argument("--init", choices=("msra", "caffe"), default="msra",
                   help="initialisation of layers not in --weights: the MSRA (He) filler "
                        "(default), or CaffeNet's train_val gaussian fillers")
    p.add_argument("--input-scale", type=float, metavar="S",
                   help="multiply preprocessed inputs by S during training (Caffe's "
                        "transform_param scale; default 0.017 from scratch, 1 with "
                        "--weights); folded into the first layer of the exported caffemodel")
    p.add_argument("--freeze", nargs="+", default=(), metavar="LAYER",
                   help="layer names or glob patterns whose params stay fixed")
    p.add_argument("--positive", type=float, default=0.7,
                   help="overlap for a positive cell (default %(default)s)")
    p.add_argument("--negative", type=float, default=0.3,
                   help="overlap up to which a cell is background (default %(default)s)")
    p.add_argument("--class-weights", type=float, nargs="+", metavar="W")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", metavar="DIR", help="checkpoints/ folder of an earlier run with "
                   "the same flags (its latest step; any --devices)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS")
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                   help="keep the last K checkpoints (and the best); default 3")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="data-parallel over the first N devices (the batch is split, the "
                   "params replicated); with several processes (--coordinator) always over "
                   "every device of every process, --batch-size per process")
    p.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="also evaluate the held-out images every STEPS steps (eval_curve)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(p)
    p.add_argument("--verbose", action="store_true",
                   help="print the whole weight transplant report (always written to "
                   "OUT/transplant.txt)")
    p.set_defaults(func=cmd_finetune)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of parsed ``fcn-jax finetune`` arguments."""
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw["progress"] = not args.no_progress
    kw["input_size"] = tuple(args.input_size)
    return FinetuneConfig(**kw)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run ``fcn-jax finetune`` from parsed arguments."""
    rank, processes = distributed.initialize(args)  # first: before any JAX computation
    cfg = config_from_args(args)
    if rank:  # one voice: process 0 logs and shows progress
        cfg = dataclasses.replace(cfg, progress=False)
    try:
        result = finetune(cfg, log=print if rank == 0 else lambda *_: None)
    except (FinetuneError, FloatingPointError) as e:
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as e:
        if processes > 1 and _PEER_GONE.search(str(e)):  # a collective with a dead peer
            raise distributed.peer_failure(e, "training") from None
        raise
    distributed.finish()  # several processes: wait for the others to end too
    if rank:
        print(f"process {rank} of {processes}: done; process 0 wrote {cfg.out}/")
        return 0
    ev = result["eval"]
    print(f"held-out mean IoU {ev['before']['mean_iou']:.3f} -> {ev['after']['mean_iou']:.3f}, "
          f"cell accuracy {ev['before']['cell_accuracy']:.3f} -> "
          f"{ev['after']['cell_accuracy']:.3f}")
    wrote = [n for n in OUTPUTS if cfg.weights or n != "transplant.txt"]
    print(f"wrote {cfg.out}/: {', '.join(wrote)}")
    return 0


#: What a collective's error says when another process died (gloo closes its connection).
_PEER_GONE = re.compile(r"gloo|connection|peer|heartbeat|coordinat|barrier", re.IGNORECASE)
#: What ``fcn-jax finetune`` writes in ``--out`` (``transplant.txt`` with ``--weights``;
#: ``checkpoints/<step>/`` are Orbax folders, ``--resume OUT/checkpoints`` continues).
OUTPUTS = ("metrics.json", "loss_curve.png", "heatmap_*.png", "targets.png",
           "classes_after.png", "checkpoints/", "finetuned.prototxt", "finetuned.caffemodel",
           "transplant.txt")


# ----------------------------------------------------------------------------- model


def _caffenet_widths(stored: dict) -> tuple[int, ...] | None:
    names = ("conv1", "conv2", "conv3", "conv4", "conv5")
    if not all(n in stored and "weight" in stored[n] for n in names):
        return None
    fc = [stored.get(n, stored.get(f"{n}-conv", {})).get("weight") for n in ("fc6", "fc7")]
    if any(w is None for w in fc):
        return None
    return tuple(int(stored[n]["weight"].shape[0]) for n in names) + tuple(
        int(w.shape[0]) for w in fc)


def _refill(params: dict, seed: int, keep: set[str]) -> dict:
    """Caffe's MSRA filler (``N(0, 2 / fan_in)``, fan_in = in * kh * kw) for the weights and
    zero biases, for training from scratch; layers in ``keep`` untouched. NumPy, seeded.
    (A small score-layer init, as CaffeNet's fc8, started lower but trained less reliably.)"""
    out = {}
    for i, (layer, blobs) in enumerate(params.items()):
        if layer in keep:
            out[layer] = blobs
            continue
        rng = np.random.default_rng([seed, i, 0x35A])
        out[layer] = {}
        for b, v in blobs.items():
            shape = np.shape(v)
            if b == "weight":
                fan_in = int(np.prod(shape[1:])) or 1
                out[layer][b] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(
                    np.float32)
            else:
                out[layer][b] = np.zeros(shape, np.float32)
    return out


def fold_input_scale(params: dict, net: Any, scale: float) -> dict:
    """Params of the same net for inputs *not* multiplied by ``scale``: the first layer's
    weights (a Convolution or InnerProduct on the input blob) times ``scale``; exact, as the
    layer is linear in its input."""
    if scale == 1.0:
        return params
    inputs = {t for lp in net.layer if lp.type in ("Input", "Data", "ImageData") for t in lp.top}
    inputs |= set(net.input)
    for lp in net.layer:
        if lp.type in ("Convolution", "InnerProduct") and lp.bottom and lp.bottom[0] in inputs:
            out = dict(params)
            out[lp.name] = dict(params[lp.name])
            out[lp.name]["weight"] = (np.asarray(params[lp.name]["weight"], np.float64)
                                      * scale).astype(np.float32)
            return out
    raise FinetuneError("--input-scale can only be folded into a Convolution or InnerProduct "
                        "reading the input; use --input-scale 1")


def fit_score_layer(net: Any, module: Any, num_classes: int,
                    log: Callable[[str], Any] = print) -> bool:
    """Set ``num_output`` of the Convolution producing the score blob to ``num_classes``
    (in ``net``, in place), as the CaffeNet path re-initialises fc8: its weights then differ in
    shape from a caffemodel's and keep their init. Returns whether ``net`` changed; one line
    is logged when it does."""
    from fcn_jax.train import score_blob

    try:
        score = score_blob(module)
    except ValueError:
        return False
    producer = next((lp for lp in reversed(net.layer) if score in lp.top), None)
    if producer is None or producer.type != "Convolution":
        return False
    old = int(producer.convolution_param.num_output)
    if old == num_classes:
        return False
    producer.convolution_param.num_output = num_classes
    log(f"score layer {producer.name!r}: {old} -> {num_classes} outputs for the data's "
        f"classes, re-initialised (its stored weights are not used)")
    return True


def build_model(cfg: FinetuneConfig, num_classes: int, log: Callable[[str], Any] = print
                ) -> tuple[Any, dict, Any]:
    """``(module, params, net)``: CaffeNet (fully convolutional) or ``--model``, initialised
    and, with ``--weights``, transplanted from a caffemodel; ``net`` is the NetParameter used
    for the caffemodel export."""
    import jax
    import jax.numpy as jnp

    from fcn_jax import CaffeNet
    from fcn_jax.net import build_module
    from fcn_jax.train import model_net

    h, w = cfg.input_size
    stored = converters.load_caffemodel(cfg.weights) if cfg.weights else None
    if cfg.model:
        net = converters.read_prototxt(cfg.model)
        module = build_module(net, phase="TEST", path=cfg.model)
        if fit_score_layer(net, module, num_classes, log=log):
            module = build_module(net, phase="TEST", path=cfg.model)
    else:
        widths = tuple(cfg.widths)
        if stored is not None:
            widths = _caffenet_widths(stored) or widths
        module = CaffeNet(fully_conv=True, widths=widths, num_classes=num_classes)
        net = model_net(module, (1, 3, h, w))
    key = jax.random.PRNGKey(cfg.seed)
    x = jax.ShapeDtypeStruct((1, 3, h, w), jnp.float32)
    if cfg.init == "caffe":  # the net's own fillers
        variables = jax.jit(module.init)(key, jnp.zeros(x.shape, x.dtype))
        params = jax.tree_util.tree_map(np.asarray, dict(variables["params"]))
    else:  # shapes only: every layer not transplanted is refilled below
        shapes = jax.eval_shape(module.init, key, x)["params"]
        params = {layer: {b: np.zeros(v.shape, np.float32) for b, v in blobs.items()}
                  for layer, blobs in shapes.items()}
    kept: set[str] = set()
    if stored is not None:
        from fcn_jax.surgery import transplant

        # the tutorial's renaming: a classifier's fc6 feeds fc6-conv (coerced to a conv)
        def rename(name: str) -> str:
            return f"{name}-conv" if name not in params and f"{name}-conv" in params else name

        new, report = transplant(params, stored, rename=rename)
        params = jax.tree_util.tree_map(np.asarray, new)
        from fcn_jax.io_utils import atomic_write_text

        full = Path(cfg.out) / "transplant.txt"
        atomic_write_text(full, "\n".join(report.lines()) + "\n")
        log(f"{report.summary()}; full report in {full}")
        if cfg.verbose:
            for line in report.lines():
                log(f"  {line}")
        kept = {d for _, d, _ in report.copied} | {d for _, d, *_ in report.coerced}
    if cfg.init == "msra":
        params = _refill(params, cfg.seed, kept)
    return module, params, net


# ----------------------------------------------------------------------------- data


def _datasets(cfg: FinetuneConfig, log: Callable[[str], Any] = print
              ) -> tuple[Any, Any, list[str]]:
    from fcn_jax import data as D

    if cfg.demo:
        h, w = cfg.input_size
        size = (h + 32, w + 32)  # random 32 px translations by the crop
        n_train = cfg.train_images or max(cfg.steps * cfg.batch_size, 1)
        train = D.SyntheticDataset(n_train, seed=cfg.seed, size=size)
        # held-out images at the input size: evaluated exactly as at inference, no resize
        val = D.SyntheticDataset(cfg.val_images, seed=cfg.seed + 1_000_003, size=(h, w))
        names = list(D.SYNTHETIC_CLASSES)
    else:
        train = D.AnnotationDataset(cfg.data)
        if cfg.val:
            val = D.AnnotationDataset(cfg.val)
        else:
            n_val = max(1, int(round(len(train) * cfg.val_fraction)))
            if n_val >= len(train):
                raise CaffeFormatError("too few images to hold some out; pass --val",
                                       path=cfg.data)
            val = _Subset(train, range(len(train) - n_val, len(train)))
            train = _Subset(train, range(len(train) - n_val))
        k = max(_num_classes(train), _num_classes(val))
        names = [f"class{i}" for i in range(k)]
        names[0] = "background"
        _warn_sparse_labels(train.labels() | val.labels(), cfg.data, log)
    if cfg.classes:
        if len(cfg.classes) < len(names) and not cfg.demo:
            raise CaffeFormatError(f"--classes names {len(cfg.classes)} classes but the "
                                   f"annotations use labels up to {len(names) - 1}",
                                   path=cfg.data, field="label")
        if cfg.demo and len(cfg.classes) != len(names):
            raise FinetuneError(f"--demo has {len(names)} classes: {names}")
        names = list(cfg.classes)
    return train, val, names


def _num_classes(ds: Any) -> int:
    return ds.num_classes()


def _warn_sparse_labels(labels: set[int], data: str | None,
                        log: Callable[[str], Any]) -> None:
    """Say what sparse labels (e.g. only 3 and 7) do: the net still gets one class per index
    up to the largest, and the unused ones are only ever trained as absent."""
    from fcn_jax.data import label_gaps

    gaps = label_gaps(labels)
    if not gaps:
        return
    top = max(labels)
    shown = ", ".join(map(str, gaps[:10])) + (f" and {len(gaps) - 10} more" if len(gaps) > 10
                                               else "")
    log(f"warning: {data}: the boxes use labels {sorted(labels)[:10]}, so the net gets "
        f"{top + 1} classes (0 = background .. {top}); labels {shown} have no boxes and are "
        f"only ever trained as absent. Renumber the labels 1..{len(labels)} to train exactly "
        "the classes you have.")


class _Subset(Sequence):
    def __init__(self, base: Any, idx: range):
        self.base, self.idx = base, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):  # type: ignore[override]
        return self.base[self.idx[i]]

    def labels(self) -> set[int]:
        return {int(b[4]) for j in self.idx for b in self.base.records[j][1]}

    def num_classes(self) -> int:
        return 1 + max(self.labels(), default=0)


# ----------------------------------------------------------------------------- run


def _freeze_predicate(patterns: Sequence[str]) -> Callable[[tuple[str, str]], bool] | None:
    if not patterns:
        return None
    rx = [re.compile(fnmatch.translate(p)) for p in patterns]
    return lambda path: any(r.fullmatch(path[0]) for r in rx)


def require_fully_convolutional(prototxt: str) -> None:
    """Refuse a classifier (InnerProduct layers) as ``--model``, saying how to cast it."""
    net = converters.read_prototxt(prototxt)
    fc = [lp.name for lp in net.layer if lp.type == "InnerProduct"]
    if fc:
        stem = Path(prototxt).with_suffix("").name
        raise CaffeFormatError(
            "InnerProduct: a classifier; the sliding-window loss needs its fully "
            f"convolutional form: run `fcn-jax fcn {prototxt} WEIGHTS.caffemodel -o "
            f"{stem}_fc`, then fine-tune with --model {stem}_fc.prototxt --weights "
            f"{stem}_fc.caffemodel", path=prototxt, layer=fc[0], field="type")


def finetune(cfg: FinetuneConfig, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the whole fine-tuning job of ``cfg``; returns what ``metrics.json`` holds."""
    import jax

    from fcn_jax import data as D
    from fcn_jax import train as T
    from fcn_jax import viz
    from fcn_jax.io_utils import atomic_save_json, atomic_write_text

    if cfg.steps < 0:
        raise FinetuneError("--steps must be >= 0")
    if cfg.batch_size < 1:
        raise FinetuneError("--batch-size must be >= 1")
    if cfg.model:
        require_fully_convolutional(cfg.model)
    processes = jax.process_count()
    mesh = None
    if processes > 1:  # data-parallel over every process's devices; --batch-size per process
        if cfg.devices != 1:
            raise FinetuneError("--devices: with several processes the mesh is every "
                                "device of every process; leave --devices out")
        mesh = distributed.global_mesh(T.DATA_AXIS)
        if cfg.batch_size % jax.local_device_count():
            raise FinetuneError(f"--batch-size {cfg.batch_size} does not split over this "
                                f"process's {jax.local_device_count()} devices")
    elif cfg.devices != 1:
        try:
            mesh = T.make_mesh(cfg.devices)
        except ValueError as e:
            raise FinetuneError(f"--devices: {e}") from None
        if cfg.batch_size % mesh.size:
            raise FinetuneError(f"--batch-size {cfg.batch_size} does not split over "
                                f"{mesh.size} devices")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the global batch: --batch-size per process, as Caffe's batch_size is per GPU
    global_batch = cfg.batch_size * processes
    rows = distributed.local_rows(global_batch)  # this process's rows of every batch
    train_ds, val_ds, names = _datasets(dataclasses.replace(cfg, batch_size=global_batch), log)
    k = len(names)
    module, params, net = build_model(cfg, k, log=log)
    h, w = cfg.input_size
    try:
        geometry = T.window_geometry(module)
        out_hw = T.output_hw(module, params, (h, w))
    except (ValueError, TypeError) as e:
        raise CaffeFormatError(str(e), path=cfg.model or "CaffeNet") from None
    score = T.score_blob(module)
    channels = _score_channels(module, params, score, (h, w))
    if channels != k:
        raise FinetuneError(f"score blob {score!r} of the net has {channels} channels but the "
                            f"data has {k} classes {names}; set num_output of its layer to {k}")
    log(f"model: {'CaffeNet' if not cfg.model else cfg.model} -> score blob {score!r} "
        f"{out_hw[0]}x{out_hw[1]} cells for {h}x{w} input; window {geometry.size[0]} px at "
        f"stride {geometry.stride[0]}; {k} classes {names}")
    if cfg.class_weights is not None and len(cfg.class_weights) != k:
        raise FinetuneError(f"--class-weights needs {k} values, one per class")
    try:
        labels_cfg = T.LabelConfig(positive=cfg.positive, negative=cfg.negative)
    except ValueError as e:
        raise FinetuneError(f"--positive/--negative: {e}") from None
    loss_cfg = T.LossConfig(ignore_label=labels_cfg.ignore_label,
                            class_weights=tuple(cfg.class_weights) if cfg.class_weights
                            else None)
    lr = cfg.lr if cfg.lr is not None else (1e-3 if cfg.solver == "Adam" or cfg.weights
                                            else 1e-2)
    solver = T.SolverConfig(type=cfg.solver, base_lr=lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, lr_policy=cfg.lr_policy,
                            max_iter=max(cfg.steps, 1))
    layers = module.layers if hasattr(module, "layers") else None
    lr_mults, decay_mults = T.caffe_multipliers(params, layers, bias=(2.0, 0.0))
    frozen = T.frozen_paths(params, _freeze_predicate(cfg.freeze), lr_mults)
    unknown = [p for p in cfg.freeze if not any(fnmatch.fnmatchcase(n, p) for n in params)]
    if unknown:
        raise FinetuneError(f"--freeze {unknown}: no such layer (layers: {list(params)})")
    tx = T.make_optimizer(solver, params, lr_mults=lr_mults, decay_mults=decay_mults,
                          frozen=frozen)
    state = T.create_train_state(module, params, tx, seed=cfg.seed, score=score,
                                 loss=loss_cfg, frozen=frozen)
    input_scale = cfg.input_scale if cfg.input_scale is not None else (
        1.0 if cfg.weights else SCRATCH_INPUT_SCALE)
    if not (np.isfinite(input_scale) and input_scale > 0):
        raise FinetuneError(f"--input-scale must be positive, got {input_scale}")
    tcfg = D.input_transformer((h, w), input_scale=None if input_scale == 1.0 else input_scale)

    def labelled(images: np.ndarray, boxes: list) -> dict:
        return {"image": images, "label": T.batch_labels(boxes, out_hw, geometry, labels_cfg)}

    def batch_fn(step: int) -> dict:
        return labelled(*D.train_batch(train_ds, step, batch_size=global_batch, cfg=tcfg,
                                       seed=cfg.seed, rows=rows))

    # all of one size (the last padded with ignored rows): one compiled eval for everything
    val_batches = [_pad(labelled(*D.eval_batch(val_ds, s, cfg.batch_size, tcfg)),
                        cfg.batch_size, labels_cfg.ignore_label)
                   for s in range(0, len(val_ds), cfg.batch_size)]
    if mesh is not None:
        state = T.replicate(state, mesh)
        if processes == 1:
            val_batches = [T.shard_batch(b, mesh) for b in val_batches]
    # evaluation, figures and export: each process alone on its copy of the replicated state
    local = distributed.local_copy if processes > 1 else (lambda st: st)
    config_meta = {k2: (list(v) if isinstance(v, tuple) else v)
                   for k2, v in dataclasses.asdict(cfg).items()
                   if k2 not in ("out", "resume", "progress", "verbose", "steps",
                                 "checkpoint_every",
                                 "eval_every", "keep_checkpoints", "devices")}
    config_meta["batch_size"] = global_batch  # resumable on any number of processes
    history: list[float] = []
    shown = _pick_heatmap_images(val_ds, cfg.heatmap_images)
    if cfg.resume:
        state, meta = T.restore_train_state(cfg.resume, state)  # onto state's devices
        if meta.get("config") != config_meta:
            saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
            diff = sorted(k2 for k2 in config_meta if saved.get(k2) != config_meta[k2])
            raise CaffeFormatError(f"checkpoint was made with different settings: {diff}",
                                   path=cfg.resume, field="meta.config")
        try:  # a damaged meta (missing keys, wrong types) is one line, not a traceback
            history = [float(v) for v in meta.get("train_loss", [])][:int(state.step)]
            before = dict(meta["eval_before"])
            float(before["mean_iou"]), float(before["cell_accuracy"]), int(before["cells"])
            curve = list(meta.get("eval_curve", []))
            maps_before = [np.asarray(m, np.float32) for m in meta["maps_before"]]
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise CaffeFormatError(f"the checkpoint's meta is damaged ({type(e).__name__}: "
                                   f"{e})", path=cfg.resume, field="meta") from None
        log(f"resumed from {cfg.resume} at step {int(state.step)}")
    else:
        before = T.evaluate(local(state), val_batches, k, class_names=names)
        curve = [_curve_point(0, before)]
        maps_before = _objectness_maps(local(state), val_batches, shown)
    log(f"before: held-out mean IoU {before['mean_iou']:.3f}, cell accuracy "
        f"{before['cell_accuracy']:.3f} ({before['cells']} cells of {len(val_ds)} images)")

    def meta_now(st) -> dict:
        return {"prototxt": converters.format_prototxt(net), "config": config_meta,
                "train_loss": history, "eval_before": before,
                "maps_before": [m.tolist() for m in maps_before], "eval_curve": curve,
                "step": int(st.step)}

    done: list[float] = []  # losses of this run, for checkpoints taken along the way

    def on_step(step: int, st, metrics: dict) -> None:
        done.append(float(metrics["loss"]))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            curve.append(_curve_point(step + 1, T.evaluate(local(st), val_batches, k)))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            m = meta_now(st)
            m["train_loss"] = history + done
            recent = done[-cfg.checkpoint_every:]
            checkpoints.save(st, m, metrics={"loss": sum(recent) / len(recent)})

    remaining = max(cfg.steps - int(state.step), 0)
    t_train = time.perf_counter()
    checkpoints = T.TrainCheckpoints(out / "checkpoints", keep=cfg.keep_checkpoints)
    stale = [s for s in checkpoints.steps() if s > int(state.step)]
    if stale:  # they would outrank this run's saves in "keep the last k"
        checkpoints.close()
        raise FinetuneError(f"{out / 'checkpoints'} holds steps {stale} of another run: "
                            f"--resume it, or use another --out")
    try:
        state, new_hist = T.fit(state, batch_fn, remaining, progress=cfg.progress,
                                on_step=on_step, mesh=mesh)
    except BaseException:
        checkpoints.close()
        raise
    train_s = time.perf_counter() - t_train
    history = history + new_hist
    after = T.evaluate(local(state), val_batches, k, class_names=names)
    maps_after = _objectness_maps(local(state), val_batches, shown)
    curve.append(_curve_point(int(state.step), after))
    log(f"after:  held-out mean IoU {after['mean_iou']:.3f}, cell accuracy "
        f"{after['cell_accuracy']:.3f}")

    last = history[-max(cfg.checkpoint_every, 1):]
    checkpoints.save(state, meta_now(state),
                     metrics={"loss": sum(last) / len(last)} if last else None)
    checkpoints.close()
    if jax.process_index() != 0:  # process 0 writes the outputs
        return {"train_loss": history, "steps": int(state.step)}
    state = local(state)
    atomic_write_text(out / "finetuned.prototxt", converters.format_prototxt(net))
    # the exported model takes the standard preprocessing: input_scale folded into layer 1
    T.export_caffemodel(out / "finetuned.caffemodel", fold_input_scale(
        jax.tree_util.tree_map(np.asarray, jax.device_get(state.params)), net, input_scale),
        net)
    viz.training_curves(history, curve, out / "loss_curve.png",
                        title="sliding-window loss", smooth=10 if len(history) >= 20 else None)
    for n, (i, b, a) in enumerate(zip(shown, maps_before, maps_after, strict=True)):
        viz.before_after_heatmaps(
            _with_boxes(val_ds[i]), b, a, out / f"heatmap_{n}.png", vmin=0.0, vmax=1.0,
            titles=(f"held-out image {i} (boxes)", "P(object) before", "P(object) after"))
    if shown:
        bs = cfg.batch_size
        target = val_batches[shown[0] // bs]["label"][shown[0] % bs]
        viz.classification_map_figure(
            _with_boxes(val_ds[shown[0]]), target, {**dict(enumerate(names)),
                                                   labels_cfg.ignore_label: "ignore"},
            out / "targets.png", title="sliding-window ground truth per cell",
            ignore_label=labels_cfg.ignore_label)
        pred = T.eval_step(state, val_batches[shown[0] // bs])["pred"][shown[0] % bs]
        viz.classification_map_figure(val_ds[shown[0]].image, np.asarray(pred), names,
                                      out / "classes_after.png",
                                      title="argmax class per cell, after")
    result = {
        "train_loss": history,
        "eval": {"before": before, "after": after},
        "eval_curve": curve,
        "classes": names,
        "steps": int(state.step),
        "model": {"net": cfg.model or "CaffeNet (fully convolutional)",
                  "widths": list(getattr(module, "widths", ())) or None,
                  "score_blob": score, "cells": list(out_hw),
                  "window": {"size": list(geometry.size), "stride": list(geometry.stride)},
                  "weights": cfg.weights, "init": cfg.init if not cfg.weights else "weights",
                  "frozen": sorted("/".join(p) for p in frozen)},
        "solver": dataclasses.asdict(solver),
        "labels": dataclasses.asdict(labels_cfg),
        "data": {"demo": cfg.demo, "train": cfg.data, "train_images": len(train_ds),
                 "val_images": len(val_ds), "batch_size": cfg.batch_size,
                 "processes": processes, "global_batch_size": global_batch,
                 "input_size": [h, w], "input_scale": input_scale},
        "time_s": {"train": round(train_s, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    atomic_save_json(out / "metrics.json", result)
    return result


def _score_channels(module: Any, params: dict, score: str, hw: tuple[int, int]) -> int:
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, 3, *hw), jnp.float32)
    return int(jax.eval_shape(lambda p, x: module.apply({"params": p}, x)[score], params,
                              x).shape[1])


def _curve_point(step: int, ev: dict) -> dict:
    return {"step": step, "mean_iou": ev["mean_iou"], "cell_accuracy": ev["cell_accuracy"],
            "loss": ev["loss"]}


def _pick_heatmap_images(val_ds: Any, n: int) -> list[int]:
    """The first ``n`` held-out images that contain objects (cheap for the demo)."""
    picked = []
    for i in range(min(len(val_ds), 50)):
        if len(picked) >= n:
            break
        boxes = val_ds.records[i][1] if hasattr(val_ds, "records") else val_ds[i].boxes
        if len(boxes):
            picked.append(i)
    return picked


def _objectness_maps(state: Any, batches: list[dict], idx: list[int]) -> list[np.ndarray]:
    """P(object) = 1 - P(background) per cell for the held-out images ``idx``."""
    from fcn_jax import train as T

    bs = len(batches[0]["label"]) if batches else 1
    probs = {}
    for i in idx:
        if i // bs not in probs:
            probs[i // bs] = np.asarray(T.eval_step(state, batches[i // bs])["prob"])
    return [1.0 - probs[i // bs][i % bs, 0] for i in idx]


def _pad(batch: dict, size: int, ignore_label: int) -> dict:
    """``batch`` grown to ``size`` rows: zero images with every cell ignored."""
    n = len(batch["label"])
    if n >= size:
        return batch
    img, lab = batch["image"], batch["label"]
    return {"image": np.concatenate([img, np.zeros((size - n, *img.shape[1:]), img.dtype)]),
            "label": np.concatenate([lab, np.full((size - n, *lab.shape[1:]), ignore_label,
                                                  lab.dtype)])}


def _with_boxes(example: Any, color: tuple[int, int, int] = (255, 0, 0),
                width: int = 3) -> np.ndarray:
    """The example's image (uint8) with its boxes drawn in."""
    im = np.asarray(example.image)
    im = (np.clip(im, 0, 1) * 255).astype(np.uint8) if im.dtype != np.uint8 else im.copy()
    hh, ww = im.shape[:2]
    for x0, y0, x1, y1, _ in np.asarray(example.boxes):
        x0, y0 = int(max(x0, 0)), int(max(y0, 0))
        x1, y1 = int(min(x1, ww)), int(min(y1, hh))
        im[y0:y1, x0:min(x0 + width, x1)] = color
        im[y0:y1, max(x1 - width, x0):x1] = color
        im[y0:min(y0 + width, y1), x0:x1] = color
        im[max(y1 - width, y0):y1, x0:x1] = color
    return im
