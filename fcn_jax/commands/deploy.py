"""``fcn-jax export``: a Caffe net as a ``jax.export`` artifact (StableHLO) for services."""

from __future__ import annotations

import argparse


def _batch(text: str) -> int | str:
    if text == "dynamic":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch takes a positive int or 'dynamic', not "
                                         f"{text!r}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="serialize the jitted forward with jax.export (StableHLO)",
        description="Write the net's jitted forward as a jax.export artifact: a service runs "
        "it with jax.export.deserialize(open(PATH, 'rb').read()).call(x) and nothing of "
        "fcn-jax. x is NCHW float32; the result is {blob: array} of the net's final blobs.")
    p.add_argument("prototxt")
    p.add_argument("weights", help=".caffemodel or .safetensors")
    p.add_argument("-o", "--output", required=True, help="artifact path (.jaxexport)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="spatial input size (default: the prototxt's)")
    p.add_argument("--batch", type=_batch, default="dynamic", metavar="N|dynamic",
                   help="batch size, or 'dynamic' for a symbolic batch dimension (default)")
    p.add_argument("--weights-file", metavar="PATH",
                   help="store the weights in this safetensors file instead of the artifact; "
                   "then call(weights, x) with weights = safetensors.numpy.load_file(PATH)")
    p.add_argument("--outputs", nargs="+", metavar="BLOB",
                   help="blobs to return (default: the net's final blobs)")
    p.add_argument("--platforms", nargs="+", metavar="P",
                   help="lower for these platforms, e.g. cpu cuda (default: this machine's)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``fcn-jax export``."""
    import os

    from fcn_jax.export import export_net

    exp = export_net(args.prototxt, args.weights, args.output,
                     input_size=tuple(args.input_size) if args.input_size else None,
                     batch=args.batch, outputs=args.outputs, weights_path=args.weights_file,
                     platforms=args.platforms)
    shapes = ", ".join(str(a.shape) for a in exp.in_avals[-1:])
    size = os.path.getsize(args.output) / 1e6
    print(f"wrote {args.output} ({size:.1f} MB): input {shapes}, outputs "
          f"{list(exp.out_tree.unflatten(range(len(exp.out_avals))))}, platforms "
          f"{list(exp.platforms)}" + (f"; weights in {args.weights_file}"
                                      if args.weights_file else ""))
    return 0
