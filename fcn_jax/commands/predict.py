"""``fcn-jax predict``: batch inference over images (top-k classes or dense class maps),
resumable, skipping unreadable images."""

from __future__ import annotations

import argparse
import os
import sys

import converters
from converters import CaffeFormatError
from fcn_jax import distributed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="run a net over many images: top-k classes or dense class maps",
        description="Preprocess images like pycaffe's Transformer (resize to the net input, "
        "RGB->BGR, x255, minus the mean), run the jit-compiled net in batches and write "
        "OUT/results.jsonl (one record per image, written as it goes), OUT/maps/*.npz "
        "(--dense) and OUT/summary.json. Unreadable images are skipped with a warning; the "
        "exit status is 1 if any was skipped or gave non-finite outputs. An interrupted run "
        "continues with --resume.")
    p.add_argument("prototxt", help="deploy .prototxt (V1 or V2)")
    p.add_argument("weights", help=".caffemodel, or .safetensors from fcn-jax convert")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--dir", help="also every image under this folder (recursive)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="default 8")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--top-k", type=int, default=None, metavar="K",
                      help="classes per image (default 5, or all when the net has fewer; "
                      "with --dense: ranked by their mean score over the map)")
    mode.add_argument("--dense", action="store_true",
                      help="per-pixel class maps of an (N, C, H, W) output (e.g. an FCN)")
    p.add_argument("--blob", help="output blob (default: the net's last)")
    p.add_argument("--save-blob", action="store_true",
                   help="store the whole output blob per image in OUT/maps/*.npz: with "
                   "--dense besides the class maps; alone, for outputs that are not class "
                   "scores (boxes, landmarks, features), without top-k")
    p.add_argument("--native-size", action="store_true",
                   help="run each image at its own size, no resize (--dense or --save-blob; "
                   "a fully convolutional net): images of one size bucket share a batch and "
                   "the maps are at the image's resolution; a mean image becomes its "
                   "per-channel mean")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --out, skipping images already done")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize images to this size (default: the prototxt's input)")
    p.add_argument("--mean", default="imagenet",
                   help="'imagenet' (per-channel BGR mean, default for 3 channels), 'none', "
                   "numbers in the blob's channel order ('104,117,123', or one value for "
                   "every channel, e.g. 127.5), or a .npy / .binaryproto mean file")
    p.add_argument("--raw-scale", type=float, default=255.0,
                   help="multiply [0, 1] pixels by this (default 255)")
    p.add_argument("--input-scale", type=float, metavar="S",
                   help="multiply the mean-subtracted input by S (pycaffe's set_input_scale; "
                   "MTCNN: 0.0078125)")
    p.add_argument("--transpose", type=int, nargs=3, default=(2, 0, 1), metavar="A",
                   help="image axes (H=0, W=1, C=2) in blob order, pycaffe's set_transpose "
                   "(default 2 0 1; MTCNN, trained on transposed images: 2 1 0)")
    p.add_argument("--no-channel-swap", action="store_true",
                   help="keep RGB order (default: RGB->BGR as Caffe models expect)")
    p.add_argument("--labels", help="text file with one class name per line, in class order "
                   "(default: ImageNet's 1000 synset words when the output has 1000 classes; "
                   "'none': no names)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_predict)


def _load_weights(prototxt: str, weights: str, input_shape):
    return converters.load_caffe(prototxt, weights, input_shape=input_shape)


def _numbers(arg: str) -> list[float] | None:
    """``'104,117,123'`` or ``'127.5'`` as floats; None if ``arg`` is not numbers."""
    try:
        return [float(v) for v in arg.replace(" ", "").split(",")]
    except ValueError:
        return None


def _mean(arg: str, channels: int, height: int, width: int, native: bool = False):
    import numpy as np

    from converters.mean import load_mean
    from fcn_jax.preprocess import imagenet_mean_bgr

    if arg == "none":
        return None
    if arg == "imagenet":
        return imagenet_mean_bgr() if channels == 3 else None
    values = None if os.path.exists(arg) else _numbers(arg)
    if values is not None:
        if len(values) not in (1, channels) or not all(np.isfinite(values)):
            raise CaffeFormatError(f"--mean {arg}: give one finite value or {channels} (one "
                                   "per input channel, in the blob's order)", field="mean")
        return np.array(values * channels if len(values) == 1 else values, np.float64)
    mean = load_mean(arg)  # .npy or .binaryproto; CaffeFormatError naming the file
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim == 3 and (native or mean.shape[1:] != (height, width)):
        mean = mean.mean(axis=(1, 2))  # a mean image of another size: per-channel mean
    return mean


def _labels(path: str | None) -> tuple[str, ...] | None:
    import io

    from converters.files import open_regular

    if path is None or path == "none":
        return None
    try:
        with open_regular(path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace").read()
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    lines = text.split("\n")
    return tuple(lines[:-1] if lines and not lines[-1] else lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from fcn_jax import predict as P
    from fcn_jax.preprocess import caffe_transformer

    rank, processes = distributed.initialize(args)  # first: before any JAX computation
    try:
        images = P.list_images(args.images, args.dir)
    except OSError as e:
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        return 2
    if not images:
        print("fcn-jax: error: no images (give files or --dir)", file=sys.stderr)
        return 2
    distributed.all_equal("the image list", images)
    net = converters.read_prototxt(args.prototxt)
    shapes = [list(s.dim) for lp in net.layer if lp.type == "Input"
              for s in lp.input_param.shape]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise CaffeFormatError("predict needs a net with one 4-D Input", path=args.prototxt)
    _, c, h, w = (int(d) for d in shapes[0])
    if args.input_size:
        h, w = args.input_size
        if min(h, w) < 1:
            raise CaffeFormatError(f"--input-size {h} {w} must be positive", field="input")
    try:
        cfg = P.PredictConfig(batch_size=args.batch_size, top_k=args.top_k, dense=args.dense,
                              blob=args.blob, save_blob=args.save_blob,
                              labels=_labels(args.labels), workers=args.workers,
                              imagenet_labels=args.labels is None,
                              native_size=args.native_size)
    except ValueError as e:
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        return 2
    module, params = _load_weights(args.prototxt, args.weights, (args.batch_size, c, h, w))
    try:
        transformer = caffe_transformer(
            (c, h, w), mean=_mean(args.mean, c, h, w, args.native_size),
            raw_scale=args.raw_scale, input_scale=args.input_scale,
            transpose=tuple(args.transpose),
            channel_swap=None if args.no_channel_swap or c != 3 else (2, 1, 0))
    except CaffeFormatError:
        raise
    except ValueError as e:
        about_mean = "mean" in str(e)
        raise CaffeFormatError(str(e), path=args.mean if about_mean and os.path.exists(
            args.mean) else None, field="mean" if about_mean else "transpose") from None
    run = dict(resume=args.resume, progress=not args.no_progress,
               net_text=converters.format_prototxt(net),
               sources={"prototxt": os.path.abspath(args.prototxt),
                        "weights": os.path.abspath(args.weights)})
    try:
        if processes > 1:  # this process's share into OUT/process-I-of-N; 0 merges
            summary = P.run_predict_processes(module, params, images, args.out, transformer,
                                              cfg, process_id=rank, num_processes=processes,
                                              **run)
        else:
            summary = P.run_predict(module, params, images, args.out, transformer, cfg, **run)
    except FileExistsError as e:
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fcn-jax: interrupted; the images done so far are in "
              f"{os.path.join(args.out, P.JOURNAL)}: run the same command with --resume to "
              "continue", file=sys.stderr)
        return 130
    distributed.finish()  # several processes: wait for the others to end too
    s = summary
    ok = s.processed - len(s.failed)
    if s.done_before:
        print(f"resumed: {s.done_before} of {s.total} images were already done")
    if s.processed > s.first_batch_images:
        speed = (f"{s.images_per_second:.1f} images/s after the first batch, which took "
                 f"{s.first_batch_seconds:.1f} s with compilation")
    else:
        speed = f"{s.images_per_second:.1f} images/s including compilation"
    print(f"{ok} images predicted, {len(s.failed)} skipped, in {s.seconds:.1f} s ({speed})")
    if rank:
        print(f"process {rank} of {processes}: results merged by process 0 from "
              f"{P.part_dir(args.out, rank, processes)}")
    print(f"results: {os.path.join(args.out, P.JOURNAL)}")
    if s.failed:
        print(f"warning: {len(s.failed)} images could not be read:", file=sys.stderr)
        for path in s.failed[:20]:
            print(f"  {path}", file=sys.stderr)
        if len(s.failed) > 20:
            print(f"  ... and {len(s.failed) - 20} more (see summary.json)", file=sys.stderr)
    if s.nonfinite:
        print(f"warning: {s.nonfinite} images gave non-finite outputs (NaN/Inf)",
              file=sys.stderr)
    return 1 if s.failed or s.nonfinite else 0
