"""``fcn-jax info``, ``fcn-jax run`` and ``fcn-jax convert``."""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import numpy as np

import converters
from converters import CaffeFormatError
from converters.errors import printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="layers, blob shapes and param shapes of a net")
    p.add_argument("file", help=".prototxt, .caffemodel or .safetensors (from fcn-jax convert)")
    p.add_argument("--weights", help="caffemodel or safetensors to check against the prototxt")
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

    p = sub.add_parser("convert", help="caffemodel -> safetensors ('{layer}/{blob}' tensors in "
                       "Caffe's shapes; the prototxt and the caffemodel's sha256 in metadata)")
    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    p.add_argument("-o", "--output", required=True, help="output path (.safetensors)")
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

    from converters.errors import printable
    from converters.safetensors_io import is_safetensors
    from fcn_jax.net import blob_names, build_module, example_inputs, expected_param_shapes

    if is_safetensors(args.file):  # the net from its metadata, the weights from the tensors
        text = converters.safetensors_metadata(args.file).get("prototxt")
        if text is None:
            raise CaffeFormatError("no prototxt in the metadata; pass the .prototxt and "
                                   "--weights", path=args.file, field="metadata")
        net = converters.parse_prototxt(text, args.file)
        params = converters.load_safetensors(args.file)
    else:
        net = converters.read_net(args.file)
        is_model = any(layer.blobs for layer in net.layer)
        params = converters.net_params(net, path=args.file) if is_model else None
    if args.weights:
        params = converters.load_weights(args.weights)
    print(f"net: {printable(net.name) or '(unnamed)'}  ({len(net.layer)} layers, from "
          f"{printable(args.file)})")
    shape = tuple(args.input_shape) if args.input_shape else None
    net, undeclared = with_declared_inputs(net, shape)
    if undeclared and shape is None:
        print(f"\nblobs: unknown (the net declares no input for {undeclared}: pass "
              "--input-shape N C H W)")
        return _print_params_and_check(args, params, None, {})
    try:
        module = build_module(net, path=args.file)
    except (CaffeFormatError, ValueError, TypeError) as e:
        if params is None:
            raise
        # a training net stored with its weights (custom data layers, label Slices): the
        # weights are listed and checked without it
        reason = e.reason if isinstance(e, CaffeFormatError) else str(e)
        where = f" (layer {printable(repr(e.layer), 60)})" if getattr(e, "layer", None) else ""
        print(f"\nblobs: unknown (the stored net is not runnable{where}: "
              f"{printable(reason, 300)}); its stored weights follow")
        return _print_params_and_check(args, params, None,
                                       {lp.name: lp.type for lp in net.layer})
    try:
        xs = example_inputs(module, shape)
        traced = jax.eval_shape(
            lambda x: module.init_with_output(jax.random.PRNGKey(0), x)[0], xs)
        print("\nblobs:")
        order = [n for n in module.inputs if n in traced] + [
            n for n in blob_names(module) if n in traced and n not in module.inputs]
        width = max(len(printable(k, 60)) for k in order)
        for name in order:
            print(f"  {printable(name, 60):<{width}}  {_fmt(traced[name].shape)}")
        expected = expected_param_shapes(module, shape)
    except (ValueError, TypeError) as e:
        if shape is not None:
            raise CaffeFormatError(f"the net cannot run on this input: {e}", path=args.file,
                                   field="input_shape") from None
        print(f"\nblobs: unknown ({printable(e, 300)})")
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
        desc = "  ".join(f"{printable(n, 60)} {_fmt(np.shape(a) if params is not None else a)}"
                         for n, a in blobs.items())
        print(f"  {printable(layer, 60):<12} {desc}")
    total = sum(math.prod(np.shape(a) if params is not None else a)
                for b in source.values() for a in b.values())
    print(f"\n{total:,} parameters")
    if params is not None and expected is not None:
        for layer in expected:
            if layer not in params:
                print(f"warning: layer {printable(repr(layer), 60)} has no weights in the "
                      "caffemodel")
    if args.check:
        if params is None:
            raise CaffeFormatError("--check needs weights (a caffemodel or --weights)",
                                   path=args.file)
        problems = weight_report(params, absurd=args.absurd)
        for p in problems:
            print(f"check: {printable(p, 300)}")
        print(f"check: {'FAILED' if problems else 'ok'} ({len(problems)} problems)")
        return 1 if problems else 0
    return 0


def read_input(path: str) -> np.ndarray | dict[str, np.ndarray]:
    """``run --input``: an ``.npy`` array, or an ``.npz`` of named inputs, as float32;
    refuses (one line, naming the file) empty arrays and dtypes Caffe has no blob for
    (bool, complex), besides everything ``converters.npy`` refuses."""
    from converters.files import open_regular
    from converters.npy import load_npy, load_npz

    try:
        with open_regular(path) as f:
            is_zip = f.read(4) == b"PK\x03\x04"
    except OSError as e:
        raise CaffeFormatError(f"cannot read: {e.strerror or e}", path=path) from None
    arrays: dict[str | None, np.ndarray] = dict(load_npz(path)) if is_zip else {
        None: load_npy(path)}
    if not arrays:
        raise CaffeFormatError("the archive holds no arrays", path=path)
    for name, v in arrays.items():
        field = None if name is None else f"input {name!r}"
        if v.dtype.kind not in "iuf":
            raise CaffeFormatError(f"dtype {v.dtype} is not a real number type (Caffe's "
                                   "blobs are float)", path=path, field=field)
        if v.size == 0:
            raise CaffeFormatError(f"empty input of shape {v.shape}", path=path, field=field)
    out = {k: v.astype(np.float32) for k, v in arrays.items()}
    return out[None] if None in out else out  # type: ignore[return-value]


def cmd_run(args: argparse.Namespace) -> int:
    from converters.errors import printable
    from converters.npy import check_member_names
    from fcn_jax import xla
    from fcn_jax.io_utils import prepare_output, save_blobs
    from fcn_jax.net import blob_names

    inputs = [args.input, args.prototxt, args.caffemodel]
    prepare_output(args.blobs, inputs, create=False)  # checked before any work
    x = read_input(args.input)
    shape = ({k: v.shape for k, v in x.items()} if isinstance(x, dict) else x.shape)
    module, params = load_for_input(args.prototxt, args.caffemodel, shape, args.input)
    outputs = tuple(args.outputs) if args.outputs else None
    known = set(blob_names(module)) | set(module.inputs)
    unknown = sorted(set(outputs or ()) - known)
    if unknown:
        raise CaffeFormatError(f"unknown blobs {unknown}", path=args.prototxt, field="outputs")
    check_member_names(outputs or known, path=args.prototxt)  # before the forward pass
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
    written = save_blobs(prepare_output(args.blobs, inputs), blobs)
    for k, v in blobs.items():
        print(f"  {printable(k, 60):<12} {_fmt(v.shape)}")
    print(f"wrote {written} blobs to {args.blobs}")
    if nonfinite:
        shown = "[" + ", ".join(printable(repr(k), 60) for k in nonfinite[:20]) + "]"
        print(f"warning: non-finite values (NaN/Inf) in blobs {shown}", file=sys.stderr)
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
    from fcn_jax.io_utils import prepare_output

    prepare_output(args.output, [args.prototxt, args.caffemodel], create=False)
    net = converters.read_prototxt(args.prototxt)
    _, params = converters.load_caffe(args.prototxt, args.caffemodel)
    prepare_output(args.output, [args.prototxt, args.caffemodel])
    converters.save_safetensors(args.output, params, net, source=args.caffemodel)
    count = sum(len(b) for b in params.values())
    print(f"wrote {args.output}: {count} tensors of {len(params)} layers")
    return 0
