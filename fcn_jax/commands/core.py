"""``fcn-jax info``, ``fcn-jax run`` and ``fcn-jax convert``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import numpy as np

import converters
from converters import CaffeFormatError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="layers, blob shapes and param shapes of a net")
    p.add_argument("file", help=".prototxt or .caffemodel")
    p.add_argument("--weights", help="caffemodel to check against the prototxt")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="D",
                   help="input shape N C H W (default: the prototxt's)")
    p.add_argument("--check", action="store_true",
                   help="report NaN/Inf or absurd magnitudes in the weights (exit 1 if any)")
    p.add_argument("--absurd", type=float, default=1e4, metavar="X",
                   help="with --check, flag weights with |w| above X (default 1e4)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run a net on an input array and save every blob")
    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    p.add_argument("--input", required=True, help=".npy array (N, C, H, W) or .npz of inputs")
    p.add_argument("--blobs", required=True, help="output .npz of blobs")
    p.add_argument("--outputs", nargs="+", help="only these blobs (default: all)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("convert", help="caffemodel -> fcn-jax checkpoint (msgpack, no pickle)")
    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    p.add_argument("-o", "--output", required=True, help="checkpoint path (.msgpack)")
    p.set_defaults(func=cmd_convert)


def _fmt(shape) -> str:
    return str(tuple(int(d) for d in shape))


def _any_batch(shape) -> str:
    """``(N, 3, 227, 227)`` for a declared ``(10, 3, 227, 227)``."""
    return "(" + ", ".join(["N"] + [str(int(d)) for d in shape[1:]]) + ")"


def weight_report(params: dict, absurd: float = 1e4) -> list[str]:
    """Problems in a params tree: non-finite values, or magnitudes above ``absurd``.

    One line per blob, e.g. ``fc6/weight: 3 non-finite values (2 NaN, 1 Inf), first at
    (0, 17)`` or ``conv1/bias: max |w| = 3.4e+38 > 1e+04``.
    """
    problems = []
    for layer, blobs in params.items():
        for name, arr in blobs.items():
            a = np.asarray(arr)
            if a.dtype.kind not in "fc":
                continue
            finite_mask = np.isfinite(a)
            bad = int(a.size - np.count_nonzero(finite_mask))
            if bad:
                nan = int(np.count_nonzero(np.isnan(a)))
                first = tuple(int(i) for i in np.argwhere(~finite_mask)[0])
                problems.append(f"{layer}/{name}: {bad} non-finite values ({nan} NaN, "
                                f"{bad - nan} Inf), first at {first}")
            biggest = float(np.max(np.abs(np.where(finite_mask, a, 0)))) if a.size else 0.0
            if biggest > absurd:
                problems.append(f"{layer}/{name}: max |w| = {biggest:.3g} > {absurd:g}")
    return problems


def cmd_info(args: argparse.Namespace) -> int:
    import jax

    from fcn_jax.net import blob_names, build_module, example_inputs, expected_param_shapes

    net = converters.read_net(args.file)
    is_model = any(layer.blobs for layer in net.layer)
    params = converters.net_params(net, path=args.file) if is_model else None
    if args.weights:
        params = converters.load_caffemodel(args.weights)
    print(f"net: {net.name or '(unnamed)'}  ({len(net.layer)} layers, from {args.file})")
    shape = tuple(args.input_shape) if args.input_shape else None
    net, undeclared = with_declared_inputs(net, shape)
    if undeclared and shape is None:
        print(f"\nblobs: unknown (the net declares no input for {undeclared}: pass "
              "--input-shape N C H W)")
        return _print_params_and_check(args, params, None, {})
    module = build_module(net, path=args.file)
    try:
        xs = example_inputs(module, shape)
        traced = jax.eval_shape(
            lambda x: module.init_with_output(jax.random.PRNGKey(0), x)[0], xs)
        print("\nblobs:")
        order = [n for n in module.inputs if n in traced] + [
            n for n in blob_names(module) if n in traced and n not in module.inputs]
        width = max(len(k) for k in order)
        for name in order:
            print(f"  {name:<{width}}  {_fmt(traced[name].shape)}")
        expected = expected_param_shapes(module, shape)
    except (ValueError, TypeError) as e:
        if shape is not None:
            raise CaffeFormatError(f"the net cannot run on this input: {e}", path=args.file,
                                   field="input_shape") from None
        print(f"\nblobs: unknown ({e})")
        expected = None
    if args.weights and expected is not None:
        # the checks `run` and `convert` make: every layer's blobs fit the net
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converters.load_caffe(net, args.weights, input_shape=shape)
        for w in caught:
            print(f"warning: {w.message}")
    types = {s.name: s.type for s in module.layers}
    return _print_params_and_check(args, params, expected, types)


def with_declared_inputs(net, shape: tuple[int, ...] | None):
    """``(net, names)``: a net (often a V1 caffemodel) that declares no input gets an Input
    layer of ``shape`` for each bottom no layer produces; ``names`` lists those bottoms."""
    if any(lp.type in ("Input", "Data", "ImageData", "MemoryData", "HDF5Data", "DummyData",
                       "WindowData", "Python") for lp in net.layer):
        return net, []
    produced: set[str] = set()
    undeclared: list[str] = []
    for lp in net.layer:
        undeclared += [b for b in lp.bottom if b not in produced and b not in undeclared]
        produced.update(lp.top)
    if not undeclared or shape is None:
        return net, undeclared
    new = type(net)()
    new.CopyFrom(net)
    del new.layer[:]
    for name in undeclared:
        lp = new.layer.add(name=name, type="Input", top=[name])
        lp.input_param.shape.add(dim=list(shape))
    new.layer.extend(net.layer)
    return new, undeclared


def _print_params_and_check(args: argparse.Namespace, params: dict | None,
                            expected: dict | None, types: dict[str, str]) -> int:
    """The params table of ``fcn-jax info`` and its ``--check``."""
    print("\nparams:")
    source = params if params is not None else expected or {}
    for layer, blobs in source.items():
        names = converters.param_names(types.get(layer, ""), len(blobs))
        blobs = {n: blobs[n] for n in names if n in blobs} | blobs
        desc = "  ".join(f"{n} {_fmt(np.shape(a) if params is not None else a)}"
                         for n, a in blobs.items())
        print(f"  {layer:<12} {desc}")
    total = sum(math.prod(np.shape(a) if params is not None else a)
                for b in source.values() for a in b.values())
    print(f"\n{total:,} parameters")
    if params is not None and expected is not None:
        for layer in expected:
            if layer not in params:
                print(f"warning: layer {layer!r} has no weights in the caffemodel")
    if args.check:
        if params is None:
            raise CaffeFormatError("--check needs weights (a caffemodel or --weights)",
                                   path=args.file)
        problems = weight_report(params, absurd=args.absurd)
        for p in problems:
            print(f"check: {p}")
        print(f"check: {'FAILED' if problems else 'ok'} ({len(problems)} problems)")
        return 1 if problems else 0
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from converters.npy import load_npy, load_npz
    from fcn_jax import xla
    from fcn_jax.io_utils import atomic_save_npz
    from fcn_jax.net import blob_names

    with open(args.input, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        x = {k: v.astype(np.float32) for k, v in load_npz(args.input).items()}
    else:
        x = load_npy(args.input).astype(np.float32)
    shape = ({k: v.shape for k, v in x.items()} if isinstance(x, dict) else x.shape)
    module, params = load_for_input(args.prototxt, args.caffemodel, shape, args.input)
    outputs = tuple(args.outputs) if args.outputs else None
    unknown = sorted(set(outputs or ()) - set(blob_names(module)) - set(module.inputs))
    if unknown:
        raise CaffeFormatError(f"unknown blobs {unknown}", path=args.prototxt, field="outputs")
    try:
        if not isinstance(x, dict):
            from fcn_jax.predict import check_activation_budget

            check_activation_budget(module, params, x.shape)
        blobs = xla.jit(lambda p, x: module.apply({"params": p}, x, outputs=outputs))(params, x)
    except (ValueError, TypeError) as e:
        raise CaffeFormatError(f"input of shape {shape} does not fit the net: {e}",
                               path=args.input) from None
    blobs = {k: np.asarray(v) for k, v in blobs.items()}
    nonfinite = [k for k, v in blobs.items() if not np.all(np.isfinite(v))]
    atomic_save_npz(args.blobs, blobs)
    for k, v in blobs.items():
        print(f"  {k:<12} {_fmt(v.shape)}")
    print(f"wrote {len(blobs)} blobs to {args.blobs}")
    if nonfinite:
        print(f"warning: non-finite values (NaN/Inf) in blobs {nonfinite}", file=sys.stderr)
        return 1
    return 0


def load_for_input(prototxt: str, caffemodel: str, shape, input_path: str):
    """``converters.load_caffe`` for an input of ``shape`` (one shape or ``{name: shape}``),
    blaming the right file: the weights are checked against the prototxt at its own input
    shape first, so a shape that then fails is the input's fault, and said so."""
    from converters import fcn as fcn_net

    net = converters.read_prototxt(prototxt)
    try:
        declared = fcn_net.input_shapes(net)
    except ValueError:
        declared = {}
    if declared and not any(v is None for v in declared.values()):
        given = shape if isinstance(shape, dict) else (
            {next(iter(declared)): shape} if len(declared) == 1 else {})
        if not given:
            raise CaffeFormatError(f"the net has inputs {sorted(declared)}: give an .npz with "
                                   "one array per input", path=input_path)
        for name, s in given.items():
            want = declared.get(name)
            if want is None:
                raise CaffeFormatError(f"the net has no input {name!r} (its inputs: "
                                       f"{sorted(declared)})", path=input_path)
            if len(s) != len(want):
                raise CaffeFormatError(
                    f"input {name!r} has shape {_fmt(s)} ({len(s)}-D) but the net's input is "
                    f"{len(want)}-D, like {_fmt(want)} (N, C, H, W)", path=input_path)
        module, params = converters.load_caffe(prototxt, caffemodel)  # the prototxt's shapes
        if all(tuple(given[k]) == tuple(declared[k]) for k in given):
            return module, params
        try:
            return converters.load_caffe(prototxt, params, input_shape=shape)
        except CaffeFormatError as e:
            want = ", ".join(f"{k!r} {_any_batch(v)}" for k, v in declared.items()
                             if k in given)
            got = ", ".join(f"{k!r} of shape {_fmt(v)}" for k, v in given.items())
            where = "".join(f"{k}: " for k in (e.layer and f"layer {e.layer!r}", e.field) if k)
            raise CaffeFormatError(
                f"input {got} does not fit the net, which takes {want} (at this input, "
                f"{where}{e.reason})", path=input_path) from None
    return converters.load_caffe(prototxt, caffemodel, input_shape=shape)


def cmd_convert(args: argparse.Namespace) -> int:
    from fcn_jax.checkpoint import save_checkpoint

    net = converters.read_prototxt(args.prototxt)
    _, params = converters.load_caffe(args.prototxt, args.caffemodel)
    save_checkpoint(args.output, params, {"prototxt": converters.format_prototxt(net),
                                          "source": os.path.basename(args.caffemodel)})
    print(f"wrote {args.output}: {len(params)} layers")
    return 0
