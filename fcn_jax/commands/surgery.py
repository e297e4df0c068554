"""``fcn-jax fcn`` (classifier -> fully convolutional prototxt + caffemodel) and
``fcn-jax demo`` (the net surgery tutorial end to end)."""

from __future__ import annotations

import argparse

import numpy as np

import converters

from .. import netdef as fcn_net


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fcn", help="cast a classifier into a fully convolutional net (prototxt + caffemodel)",
        description="Cast every InnerProduct of a classifier into a Convolution whose kernel "
        "covers its bottom blob (the net surgery tutorial), renamed with a suffix, and write "
        "PREFIX.prototxt and PREFIX.caffemodel that Caffe loads.")
    p.add_argument("prototxt", help="the classifier's deploy .prototxt (V1 or V2)")
    p.add_argument("caffemodel", help="its weights (.caffemodel, V1 or V2)")
    p.add_argument("-o", "--output", required=True, metavar="PREFIX",
                   help="writes PREFIX.prototxt and PREFIX.caffemodel")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input height and width of the new net (default: the classifier's)")
    p.add_argument("--batch", type=int, metavar="N",
                   help="batch size of the new net's input (default: the classifier's)")
    p.add_argument("--suffix", default="-conv",
                   help="appended to cast layers and their blobs (default: -conv; write "
                   "--suffix=-x for values starting with '-')")
    p.add_argument("--verify", action="store_true",
                   help="check the new net equals the classifier at the classifier's input size")
    p.add_argument("--num-classes", type=int, metavar="K",
                   help="give the score layer (the last cast InnerProduct) K outputs, "
                   "re-initialised (gaussian std 0.01, bias 0, seeded), for fine-tuning on K "
                   "classes")
    p.set_defaults(func=cmd_fcn)

    p = sub.add_parser(
        "demo", help="the net surgery tutorial end to end, offline (figures + FCN files)",
        description="Designer filters, bias surgery, CaffeNet -> fully convolutional cast, "
        "transplant, save, dense 8x8 map on 451x451 and heatmaps; prints the tutorial's "
        "tables. Without --weights the CaffeNet is random (seeded) and says so.")
    from fcn_jax.demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_demo)


def cmd_fcn(args: argparse.Namespace) -> int:
    from fcn_jax.io_utils import prepare_output
    from fcn_jax.surgery import fc_to_conv

    for suffix in (".prototxt", ".caffemodel"):  # before any work: never replace an input
        prepare_output(args.output + suffix, [args.prototxt, args.caffemodel], create=False)
    net = fcn_net.as_net(converters.read_net(args.prototxt))
    params = converters.load_caffemodel(args.caffemodel)
    shape = None
    if args.input_size or args.batch:
        old = next(iter(fcn_net.input_shapes(net).values()), None) if len(
            fcn_net.input_shapes(net)) == 1 else None
        if old is None or len(old) != 4:
            raise converters.CaffeFormatError("--input-size/--batch need a net with one 4-D "
                                              "Input", path=args.prototxt)
        shape = ((args.batch or old[0]), old[1]) + tuple(args.input_size or old[2:])
        if min(shape) < 1:
            raise converters.CaffeFormatError(f"input shape {shape} must be positive",
                                              path=args.prototxt)
    try:
        new_net = fcn_net.fully_convolutional_net(net, shape, args.suffix)
        plan = fcn_net.fully_conv_plan(net, suffix=args.suffix)
    except converters.CaffeFormatError as e:
        if e.path is not None:
            raise
        raise converters.CaffeFormatError(e.reason, path=args.prototxt, layer=e.layer,
                                          field=e.field) from None
    except ValueError as e:
        raise converters.CaffeFormatError(str(e), path=args.prototxt) from None
    if not plan.casts:
        raise converters.CaffeFormatError("no InnerProduct layer: nothing to cast",
                                          path=args.prototxt)
    try:
        new_params = fc_to_conv(params, net, suffix=args.suffix)
    except converters.CaffeFormatError as e:
        raise converters.CaffeFormatError(e.reason, path=args.caffemodel, layer=e.layer,
                                          field=e.field) from None
    keep = {lp.name for lp in new_net.layer}
    new_params = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in new_params.items()
                  if k in keep}
    resized = None
    if args.num_classes is not None:
        resized = _resize_score_layer(new_net, new_params, plan.casts[-1].new_name,
                                      args.num_classes, args.prototxt)
    converters.load_caffe(new_net, new_params)  # validates every blob shape before writing
    proto_path, model_path = args.output + ".prototxt", args.output + ".caffemodel"
    write_net_and_weights(proto_path, model_path, new_net, new_params,
                          inputs=[args.prototxt, args.caffemodel])
    width = max(len(c.new_name) for c in plan.casts)
    for c in plan.casts:
        k = "x".join(str(v) for v in c.kernel)
        print(f"  {c.name} -> {c.new_name:<{width}}  weight ({c.num_output}, "
              f"{c.channels * c.kernel[0] * c.kernel[1]}) -> {c.weight_shape}  kernel {k}")
    for name, kernel in plan.pooling_kernels:
        print(f"  {name}: global pooling -> {kernel[0]}x{kernel[1]} stride 1")
    for name in plan.removed:
        print(f"  {name}: Flatten removed")
    if resized is not None:
        print(f"  score layer {plan.casts[-1].new_name}: {resized} -> {args.num_classes} "
              "outputs, re-initialised (gaussian std 0.01, bias 0)")
    shapes = fcn_net.blob_shapes(new_net)
    last = new_net.layer[-1].top[0] if new_net.layer[-1].top else None
    if last in shapes:
        print(f"output {last}: {shapes[last]}")
    print(f"wrote {proto_path} and {model_path}")
    if args.verify:
        return _verify(net, params, new_net, new_params)
    return 0


def _resize_score_layer(net, params: dict, name: str, k: int, path: str) -> int:
    """Give Convolution ``name`` of ``net`` ``k`` outputs with fresh weights (in place, as
    CaffeNet's fc8 filler: gaussian std 0.01, zero bias); returns its old ``num_output``."""
    if k < 1:
        raise converters.CaffeFormatError(f"--num-classes must be >= 1, got {k}", path=path)
    lp = next(lp for lp in net.layer if lp.name == name)
    old = int(lp.convolution_param.num_output)
    lp.convolution_param.num_output = k
    w = np.asarray(params[name]["weight"])
    rng = np.random.default_rng([k, 0xF8])
    fresh = {"weight": (rng.standard_normal((k,) + w.shape[1:]) * 0.01).astype(np.float32)}
    if "bias" in params[name]:
        fresh["bias"] = np.zeros((k,), np.float32)
    params[name] = fresh
    return old


def write_net_and_weights(proto_path: str, model_path: str, net, params, *,
                          inputs=()) -> None:
    """Write a prototxt and its caffemodel as a pair: both new or both old
    (``converters.files.atomic_write_group``); neither may replace one of ``inputs``, and a
    missing folder is created."""
    from converters.caffe_io import PROTOBUF_LIMIT, build_caffemodel
    from converters.files import atomic_write_group
    from fcn_jax.io_utils import prepare_output

    for path in (proto_path, model_path):
        prepare_output(path, inputs)
    text = converters.format_prototxt(net).encode()
    model = build_caffemodel(params, net)
    if len(model) > PROTOBUF_LIMIT:
        raise converters.CaffeFormatError("model exceeds protobuf's 2 GiB limit",
                                          path=model_path)
    atomic_write_group([(proto_path, lambda f: f.write(text)),
                        (model_path, lambda f: f.write(model))])


def _verify(net, params, new_net, new_params) -> int:
    """The FCN at the classifier's input size must give the classifier's outputs."""
    import jax

    shape = next(iter(fcn_net.input_shapes(net).values()))
    shape = (1,) + tuple(shape[1:])
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 50
    clf, clf_params = converters.load_caffe(net, params, input_shape=shape)
    fcn, _ = converters.load_caffe(new_net, new_params, input_shape=shape)
    a = jax.jit(clf.apply)({"params": clf_params}, x)
    b = jax.jit(fcn.apply)({"params": new_params}, x)
    plan = fcn_net.fully_conv_plan(net)
    renames = dict(plan.blob_renames)
    worst = 0.0
    for name, ref in a.items():
        other = b.get(renames.get(name, name))
        if other is None or other.size != ref.size:
            continue
        ref = np.asarray(ref, np.float64)
        err = float(np.max(np.abs(np.asarray(other, np.float64).reshape(ref.shape) - ref)))
        rel = err / max(float(np.max(np.abs(ref))), 1e-30)
        worst = max(worst, rel)
    ok = worst <= 1e-4
    print(f"verify: classifier vs fully convolutional at {shape[2]}x{shape[3]}: max rel err "
          f"{worst:.2e} ({'ok' if ok else 'FAILED'})")
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from fcn_jax.demo import run_demo

    return run_demo(args)
