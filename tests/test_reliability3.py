"""Reliability, round 3 (issue #21): each test exercises the mechanism behind one item,
against independent references (float64 numpy from Caffe's formulas, Caffe's own rules)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from converters import CaffeFormatError
from fcn_jax import layer_table
from fcn_jax import layers as L
from fcn_jax import nhwc as N

ROOT = Path(__file__).resolve().parents[1]
INPUT = 'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'


def net(body: str, shape=(1, 3, 8, 8)) -> str:
    return INPUT.format(dims=" ".join(f"dim: {d}" for d in shape)) + body


def parse(text: str):
    return converters.parse_prototxt(text)


# ----------------------------------------------------------------------------- item 7


_READS_ALLOWED = {  # (file, what): files the library itself ships or writes
    ("converters/files.py", "open"),        # /proc/self/status for the umask
    ("fcn_jax/assets/__init__.py", "open"),  # the packaged synset words
    ("converters/proto.py", "read_text"),    # the packaged caffe.proto
}


def test_every_file_the_library_reads_goes_through_the_guarded_reader():
    """No plain ``open(path)`` for reading, ``Path.read_text/read_bytes`` or
    ``safe_open`` before ``open_regular`` in the library: a FIFO would block them."""
    found = []
    for py in sorted([*(ROOT / "fcn_jax").rglob("*.py"), *(ROOT / "converters").rglob("*.py")]):
        rel = py.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(py.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                f, ast.Attribute) else None
            if name == "open" and isinstance(f, ast.Name):
                mode = node.args[1].value if len(node.args) > 1 and isinstance(
                    node.args[1], ast.Constant) else "r"
                if set(mode) & set("aw+"):
                    continue  # our own lock and journal, written to (read first, guarded)
            elif name not in ("read_text", "read_bytes"):
                continue
            if (rel, name) not in _READS_ALLOWED:
                found.append(f"{rel}:{node.lineno}: {name}")
    assert not found, found


def test_a_fifo_is_refused_at_once_by_every_reader(tmp_path):
    """Each entry point that takes a file, given a FIFO, answers with one line at once (in a
    subprocess: a blocking reader would time out instead of hanging the test run)."""
    fifo = tmp_path / "w.fifo"
    os.mkfifo(fifo)
    proto = tmp_path / "n.prototxt"
    proto.write_text(net('layer { name: "r" type: "ReLU" bottom: "data" top: "r" }'))
    code = textwrap.dedent(f"""
        import converters, fcn_jax.export as E
        from converters.safetensors_io import is_safetensors, load_safetensors
        from converters.legacy_checkpoint import is_legacy_checkpoint
        f, p = {str(fifo)!r}, {str(proto)!r}
        for call in (lambda: converters.load_weights(f), lambda: converters.load_caffe(p, f),
                     lambda: E.load_exported(f), lambda: load_safetensors(f),
                     lambda: converters.load_caffe(f)):
            try:
                call()
                print("accepted")
            except converters.CaffeFormatError as e:
                print("refused", "FIFO" in str(e))
        print(is_safetensors(f), is_legacy_checkpoint(f))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[:5] == ["refused True"] * 5 and lines[5] == "False False", out.stdout
    cli = subprocess.run([sys.executable, "-m", "fcn_jax.cli", "info", str(fifo)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode != 0 and "FIFO" in cli.stderr and "Traceback" not in cli.stderr


# ----------------------------------------------------------------------------- items 1-6


def test_graph_size_limits_are_one_line_refusals():
    wide = "".join(' bottom: "data"' for _ in range(layer_table.MAX_LAYER_BLOBS + 1))
    with pytest.raises(CaffeFormatError, match=r"layer 'e': bottom: 1025 bottom blobs, more "
                                                r"than the 1024"):
        layer_table.compile_net(parse(net(f'layer {{ name: "e" type: "Eltwise"{wide} '
                                          'top: "o" }')))
    deep = "".join(f'layer {{ name: "t{i}" type: "TanH" bottom: "data" top: "data" }}\n'
                   for i in range(layer_table.MAX_LAYERS))
    with pytest.raises(CaffeFormatError, match=r"2049 layers, more than the 2048"):
        layer_table.compile_net(parse(net(deep)))


@pytest.mark.parametrize("op", ["SUM", "PROD", "MAX"])
def test_eltwise_of_many_bottoms_is_a_tree_of_log_depth(op):
    """Past ELTWISE_CHAIN_MAX bottoms: the reduction equals float64 numpy's, and its graph
    is log2(n) deep (a chain is n deep: 30,000 overflowed XLA's stack)."""
    n = 300
    rng = np.random.default_rng(0)
    xs = [rng.uniform(0.9, 1.1, (2, 3)).astype(np.float32) for _ in range(n)]
    coeff = list(rng.uniform(-1, 1, n)) if op == "SUM" else None
    got = np.asarray(L.eltwise(xs, op, coeff))
    x64 = np.stack(xs).astype(np.float64)
    want = {"SUM": lambda: np.tensordot(np.asarray(coeff), x64, 1),
            "PROD": lambda: x64.prod(0), "MAX": lambda: x64.max(0)}[op]()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda *a: L.eltwise(list(a), op))(*xs).jaxpr
    depth: dict = {v: 0 for v in jaxpr.invars}
    for eq in jaxpr.eqns:
        d = 1 + max((depth.get(v, 0) for v in eq.invars if not hasattr(v, "val")), default=0)
        for o in eq.outvars:
            depth[o] = d
    assert max(depth[o] for o in jaxpr.outvars) <= 10  # ceil(log2(300)) = 9


def test_slice_with_many_tops_equals_numpy_split():
    x = np.arange(300, dtype=np.float32).reshape(1, 300)
    tops = L.slice_blob(x, axis=1, num_tops=150)
    assert len(tops) == 150
    for got, want in zip(tops, np.split(x, 150, axis=1), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    pts = L.slice_blob(x, axis=1, slice_points=list(range(3, 300, 3)))
    np.testing.assert_array_equal(np.concatenate([np.asarray(t) for t in pts], 1), x)


def _lrn_reference(x, n, alpha, beta, k, region):
    """Caffe's LRN in float64 over the unclipped (zero padded) window."""
    x = x.astype(np.float64)
    sq = x * x
    if region == "ACROSS_CHANNELS":
        s = sq.sum(1, keepdims=True)  # a window of n >= 2C - 1 channels covers all
        return x * (k + alpha / n * s) ** -beta
    s = sq.sum((2, 3), keepdims=True)
    return x * (1 + alpha / (n * n) * s) ** -beta


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_window_wider_than_the_blob_is_clipped(region):
    """local_size 2^32 - 1 on 1x2x3x3: the same sums as the unclipped window (Caffe's),
    computed at once (it took 10 minutes)."""
    n = 4294967295
    x = np.random.default_rng(1).normal(size=(1, 2, 3, 3)).astype(np.float32) * 1e4
    want = _lrn_reference(x, n, 1e5, 0.75, 2.0, region)
    got = L.lrn(x, local_size=n, alpha=1e5, beta=0.75, k=2.0, norm_region=region)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    got = N.lrn_nhwc(jnp.transpose(x, (0, 2, 3, 1)), local_size=n, alpha=1e5, beta=0.75,
                     k=2.0, norm_region=region)
    np.testing.assert_allclose(np.transpose(np.asarray(got), (0, 3, 1, 2)), want, rtol=1e-5)


def test_conv_method_is_chosen_by_the_size_of_the_graph():
    """A 128x128 kernel (16,384 cells) is one convolution, not 16,384 gathered slices."""
    assert N._conv_method((1, 128, 128, 1), (1, 1, 128, 128), (1, 1), (0, 0), (1, 1),
                          1) == "conv"
    x = np.random.default_rng(2).normal(size=(1, 1, 70, 70)).astype(np.float32)
    w = np.random.default_rng(3).normal(size=(1, 1, 64, 64)).astype(np.float32)
    jaxpr = jax.make_jaxpr(lambda x, w: N.conv_nhwc(x, w))(jnp.transpose(x, (0, 2, 3, 1)), w)
    assert len(jaxpr.jaxpr.eqns) < 50
    got = np.asarray(N.conv_nhwc(jnp.transpose(x, (0, 2, 3, 1)), w))[0, :, :, 0]
    want = np.array([[np.sum(x[0, 0, i:i + 64, j:j + 64].astype(np.float64) * w[0, 0])
                      for j in range(7)] for i in range(7)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_detection_output_graph_does_not_grow_with_the_classes():
    from fcn_jax.fork_layers import detection_output

    def size(ncls):
        cfg = {"num_classes": ncls, "share_location": True, "background_label_id": 0,
               "nms_threshold": 0.45, "eta": 1.0, "top_k": -1, "code_type": "CENTER_SIZE",
               "variance_encoded_in_target": False, "keep_top_k": -1,
               "confidence_threshold": 0.01}
        args = (jnp.zeros((1, 4)), jnp.zeros((1, ncls)), jnp.zeros((1, 2, 4)))
        return len(jax.make_jaxpr(lambda *a: detection_output(*a, cfg))(*args).jaxpr.eqns)

    assert size(3) == size(20000)


# ----------------------------------------------------------------------------- item 12


LAYER_PARAMS = [
    ('pooling_param { kernel_size: 2 ceil_mode: false }', "PoolingParameter", "ceil_mode"),
    ('convolution_param { num_output: 1 kernel_size: 2 strde: 2 }', "ConvolutionParameter",
     "strde"),
    ('relu_param { negative_slope: 0 slope: 1 }', "ReLUParameter", "slope"),
    ('weird: 2', "LayerParameter", "weird"),
]


@pytest.mark.parametrize("body,message,field", LAYER_PARAMS)
def test_an_unknown_field_inside_a_known_message_stays_an_error(body, message, field):
    text = net('layer { name: "f" type: "Foo" bottom: "data" top: "f" '
               'fork_param { x: 1 y { z: 2 } } }\n'
               f'layer {{ name: "l" type: "Pooling" bottom: "data" top: "l" {body} }}')
    with pytest.raises(CaffeFormatError, match=rf'"caffe.{message}" has no field named '
                                               rf'"{field}"'):
        parse(text)


def test_an_unknown_layer_param_message_is_skipped_whole():
    n = parse(net('layer { name: "f" type: "Foo" bottom: "data" top: "f" '
                  'fork_param { x: 1 y { z: 2 unknown: "v" } } '
                  'pooling_param { kernel_size: 3 } }'))
    assert n.layer[1].pooling_param.kernel_size == 3


# ----------------------------------------------------------------------------- item 13

STAGED = """
state { stage: "deploy" }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 } } }
layer { name: "a" type: "ReLU" bottom: "data" top: "a" include { stage: "deploy" } }
layer { name: "b" type: "ReLU" bottom: "data" top: "b" exclude { stage: "deploy" } }
layer { name: "c" type: "ReLU" bottom: "data" top: "c" include { stage: "deploy" stage: "x" } }
layer { name: "d" type: "ReLU" bottom: "data" top: "d" include { not_stage: "x" } }
layer { name: "e" type: "ReLU" bottom: "data" top: "e" include { min_level: 1 } }
layer { name: "f" type: "ReLU" bottom: "data" top: "f" include { max_level: 0 } }
"""


@pytest.mark.parametrize("stages,level,want", [
    ((), None, "a d f"), (("x",), None, "a c f"), ((), 1, "a d e"), (("x",), 2, "a c e")])
def test_netstate_rules_follow_caffe_filternet(tmp_path, stages, level, want):
    """Caffe's StateMeetsRule: every `stage` present, no `not_stage`, level within
    [min_level, max_level]; the net's own state stages plus pycaffe's ``stages=``."""
    path = tmp_path / "n.prototxt"
    path.write_text(STAGED)
    module, _ = converters.load_caffe(path, stages=stages, level=level)
    assert [s.name for s in module.layers] == ["data", *want.split()]


# ----------------------------------------------------------------------------- item 14


POOL = 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { %s } }'
CONV = ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
        'convolution_param { num_output: 2 %s } }')
FIELD_RULES = [  # (layer, refused with, or the geometry Caffe uses)
    (POOL % "global_pooling: true kernel_size: 2", "filter size cannot be specified"),
    (POOL % "global_pooling: true pad: 1", "only pad = 0 and stride = 1"),
    (POOL % "global_pooling: true stride: 2", "only pad = 0 and stride = 1"),
    (POOL % "kernel_size: 2 kernel_h: 2 kernel_w: 2", "kernel_size OR kernel_h"),
    (POOL % "kernel_h: 2", "both kernel_h and kernel_w are required"),
    (POOL % "kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", "pad is pad OR pad_h and pad_w"),
    (POOL % "kernel_size: 3 pad_h: 1", "pad is pad OR pad_h and pad_w"),
    (POOL % "kernel_size: 3 stride_w: 2", "stride is stride OR"),
    (POOL % "kernel_size: 3 kernel_h: 5", {"kernel": (3, 3)}),  # Caffe uses kernel_size
    (CONV % "kernel_size: 3 kernel_h: 3 kernel_w: 3", "either kernel_size or kernel_h/w"),
    (CONV % "kernel_size: 3 pad: 1 pad_h: 1", "either pad or pad_h/w"),
    (CONV % "kernel_size: 3 stride: 1 stride_h: 1", "either stride or stride_h/w"),
    (CONV % "kernel_h: 3", "filter dimensions must be nonzero"),
    (CONV % "kernel_size: 3 stride_h: 2", "divides by it"),
    (CONV % "kernel_size: 3 pad_h: 1", {"pad": (1, 0)}),
    (CONV % "kernel_size: 3 axis: -3", {"kernel": (3, 3)}),
]


@pytest.mark.parametrize("layer,expect", FIELD_RULES)
def test_pooling_and_convolution_fields_follow_caffe_layersetup(layer, expect):
    text = net(layer)
    if isinstance(expect, str):
        with pytest.raises(CaffeFormatError, match=expect):
            layer_table.compile_net(parse(text))
        return
    spec = layer_table.compile_net(parse(text))[1]
    for k, v in expect.items():
        assert spec.cfg[k] == v


def test_conv_pad_h_alone_computes_caffe_output(tmp_path):
    path = tmp_path / "c.prototxt"
    path.write_text(net(CONV % 'kernel_size: 3 pad_h: 1 weight_filler { type: "constant" '
                                'value: 1 }', shape=(1, 1, 4, 4)))
    module, params = converters.load_caffe(path)
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    got = np.asarray(module.apply({"params": params}, x)["c"])
    xp = np.pad(x[0, 0].astype(np.float64), ((1, 1), (0, 0)))
    want = np.array([[xp[i:i + 3, j:j + 3].sum() for j in range(2)] for i in range(4)])
    assert got.shape == (1, 2, 4, 2)
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)


# ----------------------------------------------------------------------------- item 15


@pytest.mark.parametrize("body", [
    'layer { name: "a" type: "ReLU" bottom: "data" top: "x" }\n'
    'layer { name: "b" type: "TanH" bottom: "data" top: "x" }',
    'layer { name: "in2" type: "Input" top: "data" input_param { shape { dim: 1 } } }',
    'layer { name: "a" type: "Slice" bottom: "data" top: "x" top: "x" }',
    'layer { name: "a" type: "Split" bottom: "data" top: "o" top: "data" }',
])
def test_a_blob_has_one_producer(body):
    with pytest.raises(CaffeFormatError, match="produced by multiple sources"):
        layer_table.compile_net(parse(net(body)))


def test_in_place_layers_are_not_second_producers():
    layers = layer_table.compile_net(parse(net(
        'layer { name: "a" type: "ReLU" bottom: "data" top: "data" }\n'
        'layer { name: "b" type: "Dropout" bottom: "data" top: "data" }')))
    assert [s.name for s in layers] == ["data", "a", "b"]


# ----------------------------------------------------------------------------- item 10


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "s.prototxt"
    path.write_text(net(
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        'convolution_param { num_output: 2 kernel_size: 3 } }\n'
        'layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" '
        'inner_product_param { num_output: 2 } }\n'
        'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }', shape=(1, 3, 8, 8)))
    return converters.load_caffe(path)


@pytest.mark.parametrize("shape,dtype,match", [
    ((1, 8, 8, 3), np.float32, r"input 'data' of shape \(1, 8, 8, 3\) does not fit the "
                               r"net, which takes \(N, 3, 8, 8\) \(at this input, layer"),
    ((1, 3, 10, 10), np.float32, r"does not fit the net, which takes \(N, 3, 8, 8\) \(at "
                                 r"this input, layer 'fc'"),
    ((1, 4, 8, 8), np.float32, r"layer 'conv': weight"),
    ((0, 3, 8, 8), np.float32, r"input 'data' of shape \(0, 3, 8, 8\) is empty"),
    ((1, 3, 8, 8), np.uint8, r"input 'data' is uint8: the net takes float arrays"),
])
def test_module_apply_checks_the_input_before_flax(small_net, shape, dtype, match):
    module, params = small_net
    with pytest.raises(CaffeFormatError, match=match):
        module.apply({"params": params}, np.zeros(shape, dtype))


def test_module_apply_outputs_as_a_string(small_net):
    module, params = small_net
    out = module.apply({"params": params}, np.zeros((2, 3, 8, 8), np.float32), outputs="prob")
    assert list(out) == ["prob"] and out["prob"].shape == (2, 2)


# ----------------------------------------------------------------------------- items 9, 16


def test_safetensors_with_a_dtype_numpy_lacks_is_one_line(tmp_path):
    import json
    import struct

    header = json.dumps({"l/w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})
    path = tmp_path / "f8.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\x00\x00")
    with pytest.raises(CaffeFormatError, match=r"f8.safetensors: layer 'l': w: "):
        converters.load_weights(path)


def test_removing_a_replacement_gives_the_builtin_back():
    import fcn_jax

    builtin = layer_table.layer_type("ReLU")
    fcn_jax.register_layer("ReLU", replace=True)(lambda x: x)
    assert layer_table.layer_type("ReLU") is not builtin
    layer_table.remove_layer_type("ReLU")
    assert layer_table.layer_type("ReLU") is builtin


# ----------------------------------------------------------------------------- item 17


@pytest.fixture(scope="module")
def exportable(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    proto = d / "n.prototxt"
    proto.write_text(net('layer { name: "conv" type: "Convolution" bottom: "data" '
                         'top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }'))
    _, params = converters.load_caffe(proto)
    weights = d / "m.safetensors"
    converters.save_safetensors(weights, params, proto)
    return proto, weights


def test_export_refuses_to_replace_its_inputs(exportable, tmp_path):
    from fcn_jax.export import export_net

    proto, weights = exportable
    before = (proto.read_bytes(), weights.read_bytes())
    for out, wfile in [(weights, None), (proto, None), (tmp_path / "a.jaxexport", proto),
                       (tmp_path / "b.jaxexport", weights),
                       (tmp_path / "c.jaxexport", tmp_path / "c.jaxexport")]:
        with pytest.raises(CaffeFormatError, match="would replace the input"):
            export_net(proto, weights, out, weights_path=wfile)
    assert (proto.read_bytes(), weights.read_bytes()) == before


def test_a_failed_export_leaves_the_old_weights_file(exportable, tmp_path):
    """The program and its weights are written as one group: the program's rename fails
    (a folder is in its place) and the weights file is still the old one."""
    from fcn_jax.export import export_net

    proto, weights = exportable
    old = tmp_path / "w.safetensors"
    old.write_bytes(b"old weights")
    blocked = tmp_path / "prog.jaxexport"
    blocked.mkdir()
    (blocked / "x").write_text("keeps the folder non-empty")
    with pytest.raises(OSError):
        export_net(proto, weights, blocked, weights_path=old)
    assert old.read_bytes() == b"old weights"


# ----------------------------------------------------------------------------- items 11, 18, 19


@pytest.fixture()
def saved_state(tmp_path):
    import optax

    from fcn_jax import train as T

    proto = tmp_path / "t.prototxt"
    proto.write_text(net('layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                         'inner_product_param { num_output: 4 weight_filler { type: '
                         '"gaussian" std: 1 } } }', shape=(1, 2)))
    module, params = converters.load_caffe(proto, seed=1)
    state = T.create_train_state(module, params, optax.sgd(0.1))
    T.save_train_state(tmp_path / "ck", state.replace(step=jnp.int32(3)), {"a": 1}, keep=1)
    return T, state, tmp_path / "ck"


def test_params_that_differ_from_the_recorded_digest_are_a_checksum_mismatch(saved_state):
    """The digest recorded at save is checked on restore: params read back that differ
    from those saved (here: the record changed) are refused, whatever changed them."""
    import json

    T, state, ck = saved_state
    restored, meta = T.restore_train_state(ck, state)
    assert meta == {"a": 1}
    meta_file = ck / "3" / "meta" / "metadata"
    record = json.loads(meta_file.read_text())
    assert record[T.DIGEST_KEY] == T.params_digest(state.params)
    record[T.DIGEST_KEY] = T.params_digest({"fc": {"weight": np.zeros(1)}})
    meta_file.write_text(json.dumps(record))
    with pytest.raises(CaffeFormatError, match=r"ck: params: step 3: checksum mismatch"):
        T.restore_train_state(ck, state)


def test_a_flipped_byte_never_resumes_with_changed_weights(saved_state):
    """Each of several single-bit flips in each data file: refused, or the exact weights."""
    T, state, ck = saved_state
    want = {k: np.asarray(v) for k, v in state.params["fc"].items()}
    files = [p for p in (ck / "3" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        raw = path.read_bytes()
        for pos in (len(raw) // 3, len(raw) // 2, len(raw) - 9):
            flipped = bytearray(raw)
            flipped[pos] ^= 0x10
            path.write_bytes(bytes(flipped))
            try:
                got = T.restore_train_state(ck, state)[0].params["fc"]
            except CaffeFormatError:
                continue
            finally:
                path.write_bytes(raw)
            for k, v in want.items():
                np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{path} {pos}")


def test_a_truncated_data_file_is_one_line(saved_state):
    T, state, ck = saved_state
    for p in (ck / "3" / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[:7])
    with pytest.raises(CaffeFormatError, match=r"ck: step 3 "):
        T.restore_train_state(ck, state)


def test_a_replaced_step_survives_a_kill_before_the_new_save_commits(saved_state):
    """The old step is set aside, not deleted, until the new save of the step commits; a
    kill in between (simulated: set aside, no new save) finds it back on the next open."""
    T, state, ck = saved_state
    T._set_aside(str(ck), 3)
    assert not (ck / "3").exists()
    restored, meta = T.restore_train_state(ck, state)  # the old step, put back
    assert int(restored.step) == 3 and meta == {"a": 1}
    with T.TrainCheckpoints(ck, keep=1) as c:  # a real re-save keeps one step, the new one
        c.save(state.replace(step=jnp.int32(3)), {"a": 2})
    assert T.restore_train_state(ck, state)[1] == {"a": 2}
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) == ["3"]


def test_damaged_meta_is_one_line(saved_state):
    T, state, ck = saved_state
    with pytest.raises(CaffeFormatError, match="meta is list, not a JSON object"):
        T._checked_meta([1], state.params, ck, 3)


# ----------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("layer,x,want", [
    # exp_layer.cpp: outer_scale = powf(10, 1000) = inf (float); inf * e^(ln10 * 0) = inf
    ('type: "Exp" exp_param { base: 10 shift: 1000 }', 0.0, np.inf),
    # power_layer.cpp, scale 0: caffe_set(powf(-1, 0.5)) = NaN
    ('type: "Power" power_param { shift: -1 scale: 0 power: 0.5 }', 3.0, np.nan),
    # powf(-2, 0.5) = NaN element-wise
    ('type: "Power" power_param { shift: -3 power: 0.5 }', 1.0, np.nan),
])
def test_float_overflow_and_nan_come_out_as_caffe_computes_them(tmp_path, layer, x, want):
    path = tmp_path / "n.prototxt"
    path.write_text(net(f'layer {{ name: "l" {layer} bottom: "data" top: "l" }}',
                        shape=(1, 1, 2, 2)))
    module, params = converters.load_caffe(path)
    got = np.asarray(module.apply({"params": params}, np.full((1, 1, 2, 2), x, np.float32))["l"])
    np.testing.assert_array_equal(got, np.full((1, 1, 2, 2), want, np.float32))


@pytest.mark.parametrize("layer,bottoms,match", [
    ('type: "Log" log_param { base: 1 }', 1, r"layer 'l': log_param.base: .*1 / log\(base\)"),
    ('type: "Log" log_param { base: 0 }', 1, r"layer 'l': log_param.base: .*log\(base\)"),
    ('type: "Exp" exp_param { base: 0 }', 1, r"layer 'l': exp_param.base"),
    ('type: "Interp" interp_param { shrink_factor: 0 }', 1, r"layer 'l': interp_param: "),
    ('type: "PriorBox" prior_box_param { min_size: 2 aspect_ratio: 0 }', 2,
     r"layer 'l': prior_box_param.aspect_ratio"),
    ('type: "PriorBox" prior_box_param { min_size: inf }', 2,
     r"layer 'l': prior_box_param.min_size"),
])
def test_caffes_setup_refusals_name_file_layer_and_field(tmp_path, layer, bottoms, match):
    path = tmp_path / "n.prototxt"
    b = ' bottom: "data"' * bottoms
    path.write_text(net(f'layer {{ name: "l" {layer}{b} top: "l" }}', shape=(1, 1, 4, 4)))
    with pytest.raises(CaffeFormatError, match="n.prototxt: " + match):
        converters.load_caffe(path)
