"""fcn_jax.inference: compiled forward, shape buckets, batching, data-parallel sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, caffe_close
from test_net import _full_conv_params

import converters
from fcn_jax import CaffeNet
from fcn_jax.inference import (
    batch_bucket,
    compile_forward,
    module_layers,
    spatial_bucket,
    supports_buckets,
)

D = DATA / "caffenet_mini"
MINI = dict(widths=(24, 64, 96, 96, 64, 256, 256))


@pytest.fixture(scope="module")
def mini_fcn():
    params = _full_conv_params(converters.load_caffemodel(D / "caffenet_mini.caffemodel"))
    module, _ = converters.load_caffe(D / "caffenet_mini_full_conv.prototxt", params)
    return module, params


@pytest.fixture(scope="module")
def mini_cls():
    return converters.load_caffe(D / "caffenet_mini_deploy.prototxt",
                                 D / "caffenet_mini.caffemodel")


def test_bucket_helpers():
    assert spatial_bucket(451, 32) == 480 and spatial_bucket(480, 32) == 480
    assert spatial_bucket(451, 1) == 451
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    assert batch_bucket(3, multiple=4) == 4 and batch_bucket(5, multiple=4) == 8
    assert batch_bucket(9, max_batch=8) == 9 and batch_bucket(6, max_batch=8) == 8


def test_bucketed_dense_map_matches_caffe(mini_fcn):
    """451x451 padded to 480x480 and masked: every returned blob equals real Caffe's."""
    module, params = mini_fcn
    ref = np.load(D / "caffenet_mini_full_conv_blobs.npz")
    names = ("pool2", "pool5", "fc6-conv", "fc8-conv", "prob")
    fwd = compile_forward(module, params, outputs=names)
    out = fwd(ref["data"])
    assert fwd.compiled_shapes == [(1, 3, 480, 480)]
    for name in names:
        caffe_close(out[name], ref[name], name, rel=1e-4 if name == "prob" else 1e-5)


def test_stream_of_sizes_compiles_per_bucket_and_stays_exact(mini_fcn):
    """Many sizes, few compilations; each image's maps equal the unpadded forward."""
    module, params = mini_fcn
    rng = np.random.default_rng(0)
    sizes = [(227, 227), (230, 250), (250, 230), (240, 255), (291, 259), (300, 290),
             (262, 270)]
    images = [rng.normal(size=(3, h, w)).astype(np.float32) * 30 for h, w in sizes]
    fwd = compile_forward(module, params, outputs=("fc8-conv", "prob"), spatial_step=64)
    got = list(fwd.stream(images, batch_size=2))
    buckets = {fwd.bucket((1, 3, h, w))[2:] for h, w in sizes}
    assert buckets == {(256, 256), (320, 320)}
    assert fwd.compile_count <= 2 * len(buckets) < len(set(sizes))
    direct = jax.jit(lambda x: module.apply({"params": params}, x, outputs=("fc8-conv",
                                                                            "prob")))
    for img, g in zip(images, got, strict=True):
        want = direct(img[None])
        for k in ("fc8-conv", "prob"):
            w = np.asarray(want[k][0])
            assert g[k].shape == w.shape
            # prob at 1e-4 as against Caffe everywhere (the softmax amplifies fc8's last bits:
            # 1.07e-5 seen on an AMD EPYC host), fc8-conv at 1e-5
            rel = 1e-4 if k == "prob" else 1e-5
            np.testing.assert_allclose(g[k], w, rtol=0, atol=rel * np.abs(w).max(), err_msg=k)


def test_bucket_keeps_caffes_overhanging_last_window():
    """A strided convolution whose last window hangs past a small image (Caffe: one more
    cell, zeros beyond the image) stays exact when the image is padded into a bucket."""
    from test_layers import np_conv_caffe

    text = textwrap.dedent("""
        input: "data"  input_shape { dim: 1 dim: 2 dim: 16 dim: 16 }
        layer { name: "a" type: "Convolution" bottom: "data" top: "a"
          convolution_param { num_output: 2 kernel_size: 1 } }
        layer { name: "c" type: "Convolution" bottom: "a" top: "c"
          convolution_param { num_output: 3 kernel_size: 5 stride: 3 } }
    """)
    rng = np.random.default_rng(3)
    params = {n: {"weight": rng.standard_normal(ws).astype(np.float32),
                  "bias": rng.standard_normal(ws[0]).astype(np.float32) + 2}
              for n, ws in (("a", (2, 2, 1, 1)), ("c", (3, 2, 5, 5)))}
    module, _ = converters.load_caffe(converters.parse_prototxt(text), params)
    fwd = compile_forward(module, params, outputs=("c",), spatial_step=16)
    images = [rng.standard_normal((2, h, w)).astype(np.float32) for h, w in
              ((3, 4), (4, 7), (9, 6), (16, 16))]

    def caffe(x, layer, stride):
        return np_conv_caffe(x, params[layer]["weight"].astype(np.float64),
                             params[layer]["bias"], stride, (0, 0), (1, 1), 1)

    for img, got in zip(images, fwd.stream(images, batch_size=4), strict=True):
        # "a" turns the bucket's zero padding into its bias: only masking makes it zero again
        ref = caffe(caffe(img[None].astype(np.float64), "a", (1, 1)), "c", (3, 3))[0]
        assert got["c"].shape == ref.shape  # (3, 4) -> 1x1 cell: Caffe's C division
        np.testing.assert_allclose(got["c"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert fwd.compile_count == 1


def test_classifier_uses_exact_shapes_and_pads_batches(mini_cls):
    module, params = mini_cls
    assert not supports_buckets(module.layers)  # fc6 flattens pool5
    ref = np.load(D / "caffenet_mini_classifier_blobs.npz")
    fwd = compile_forward(module, params, outputs=("fc8", "prob"))
    out = fwd(ref["data"])
    caffe_close(out["prob"], ref["prob"], "prob")
    caffe_close(out["fc8"], ref["fc8"], "fc8")
    one = list(fwd.stream([ref["data"][1]], batch_size=4))[0]
    caffe_close(one["prob"], ref["prob"][1], "prob[1]")
    with pytest.raises(ValueError, match="exact shapes"):
        fwd._run_padded([ref["data"][0], ref["data"][0][:, :200]],
                        np.array([[227, 227], [200, 227]]), (2, 3, 227, 227))


def test_caffenet_module_through_the_engine(mini_fcn):
    """A CaffeNet runs through its prototxt's layers with the same params tree."""
    _, params = mini_fcn
    net = CaffeNet(fully_conv=True, **MINI)
    assert [s.name for s in module_layers(net) if s.type == "Convolution"][-1] == "fc8-conv"
    ref = np.load(D / "caffenet_mini_full_conv_blobs.npz")
    got = compile_forward(net, params, outputs=("pool2", "pool5", "fc8-conv", "prob"))(
        ref["data"])
    for k in got:  # against real Caffe, prob at 1e-4 as everywhere (see test_net)
        caffe_close(got[k], ref[k], k, rel=1e-4 if k == "prob" else 1e-5)


def test_caffenet_outputs_selects_blobs(mini_fcn):
    _, params = mini_fcn
    net = CaffeNet(fully_conv=True, **MINI)
    x = np.load(D / "caffenet_mini_full_conv_blobs.npz")["data"]
    out = jax.jit(lambda p, x: net.apply({"params": p}, x, outputs=("pool5", "prob")))(params, x)
    assert list(out) == ["pool5", "prob"] and out["pool5"].shape == (1, 64, 13, 13)
    with pytest.raises(ValueError, match="unknown blobs"):
        net.apply({"params": params}, x, outputs=("nope",))


def test_wrong_params_name_the_layer(mini_fcn):
    module, params = mini_fcn
    bad = dict(params)
    bad["conv3"] = {"weight": np.zeros((96, 32, 3, 3), np.float32),
                    "bias": params["conv3"]["bias"]}
    fwd = compile_forward(module, bad)
    with pytest.raises(ValueError, match="conv3"):
        fwd(np.zeros((1, 3, 227, 227), np.float32))


def test_bfloat16_option_runs_close(mini_fcn):
    module, params = mini_fcn
    x = np.load(D / "caffenet_mini_full_conv_blobs.npz")["data"]
    f32 = compile_forward(module, params, outputs=("prob",))(x)["prob"]
    b16 = compile_forward(module, params, outputs=("prob",), dtype=jnp.bfloat16)(x)["prob"]
    assert b16.dtype == np.float32
    assert (b16.argmax(1) == f32.argmax(1)).mean() > 0.8


SHARDED = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    sys.path.insert(0, {tests!r})
    from test_net import _full_conv_params
    import converters
    from fcn_jax.inference import compile_forward
    d = {data!r}
    params = _full_conv_params(converters.load_caffemodel(d + "/caffenet_mini.caffemodel"))
    module, _ = converters.load_caffe(d + "/caffenet_mini_full_conv.prototxt", params)
    x = np.random.default_rng(0).normal(size=(6, 3, 259, 291)).astype(np.float32) * 30
    res = {{"devices": jax.device_count()}}
    for tag, opts in (("fast", None), ("xla_default", {{}})):
        one = compile_forward(module, params, outputs=("prob", "pool5"),
                              compiler_options=opts)(x)
        four = compile_forward(module, params, outputs=("prob", "pool5"), devices=4,
                               compiler_options=opts)
        got = four(x)
        arr = four._fn(four.params, *[jax.make_array_from_process_local_data(four._bat, a)
                       for a in (np.zeros((8, 3, 288, 320), np.float32),
                                 np.full(8, 259, np.int32), np.full(8, 291, np.int32))])
        res[tag] = {{"shards": len(arr[0]["prob"].sharding.device_set),
                    "shapes": [list(got[k].shape) for k in ("prob", "pool5")],
                    "rel_diff": {{k: float(np.abs(got[k] - one[k]).max() / np.abs(one[k]).max())
                                 for k in one}},
                    "same_argmax": bool(np.array_equal(got["prob"].argmax(1),
                                                       one["prob"].argmax(1))),
                    "equal": all(bool(np.array_equal(got[k], one[k])) for k in one)}}
    print(json.dumps(res))
""")


@pytest.mark.slow
def test_data_parallel_on_four_host_devices_matches_one_device():
    """Sharded over 4 devices (2 images each) == one device (6 images) to float32 rounding
    (Eigen's blocking depends on the row count per device); pool5 bit for bit with XLA's
    default kernels."""
    code = SHARDED.format(tests=str(Path(__file__).parent), data=str(D))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    for tag in ("fast", "xla_default"):
        assert res[tag]["shards"] == 4
        assert res[tag]["shapes"] == [[6, 1000, 2, 3], [6, 64, 7, 8]]
        # prob at 1e-4 as against Caffe everywhere (softmax of logits ~400 amplifies the
        # last bits of fc8; measured 6.7e-6 here), pool5 at 1e-5
        assert res[tag]["same_argmax"], res
        assert res[tag]["rel_diff"]["prob"] <= 1e-4 and res[tag]["rel_diff"]["pool5"] <= 1e-5, res
    # bit for bit on the Intel hosts this was written on; XLA's default kernels on an AMD
    # EPYC host block the GEMMs by rows per device too (prob 1.65e-5 apart, pool5 equal):
    # pool5 (no GEMM after the shard split of conv5's output) must still be equal
    assert res["xla_default"]["rel_diff"]["pool5"] == 0.0, res


def test_use_fast_cpu_flags_only_before_jax_starts():
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_cpu_use_xnnpack=true"
        from fcn_jax.inference import FAST_CPU_XLA_FLAGS, use_fast_cpu_flags
        first = use_fast_cpu_flags()
        flags = os.environ["XLA_FLAGS"]
        import jax.numpy as jnp
        jnp.zeros(1).block_until_ready()
        print(first, use_fast_cpu_flags(), flags)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    first, second, *flags = r.stdout.split()
    assert (first, second) == ("True", "False")
    # the user's own setting of a flag wins; the other flag is added
    assert flags == ["--xla_cpu_use_xnnpack=true",
                     "--xla_cpu_experimental_ynn_fusion_type=individual_dot"]


SMALL_FCN = """
input: "data"  input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "p1" top: "score"
  convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""


def test_default_buckets_keep_compiles_few_on_every_entry_point():
    """Issue 13: batches of 3, 5, 6, 7 compiled four times and a stream of 12 random sizes
    eleven times. Now: twice each (README: 'Jit without surprises'), results unchanged."""
    rng = np.random.default_rng(0)
    params = {"c1": {"weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                     "bias": rng.standard_normal(4).astype(np.float32)},
              "score": {"weight": rng.standard_normal((5, 4, 1, 1)).astype(np.float32),
                        "bias": rng.standard_normal(5).astype(np.float32)}}
    module, _ = converters.load_caffe(converters.parse_prototxt(SMALL_FCN), params)
    direct = jax.jit(lambda x: module.apply({"params": params}, x, outputs=("prob",))["prob"])

    fwd = compile_forward(module, params, outputs=("prob",))
    for n in (3, 5, 6, 7):
        x = rng.standard_normal((n, 3, 40, 36)).astype(np.float32)
        got = fwd(x)["prob"]
        np.testing.assert_allclose(got, direct(x), rtol=0, atol=2e-6)
    assert fwd.compile_count == 2
    assert fwd.compiled_shapes == [(3, 3, 64, 64), (8, 3, 64, 64)]

    sizes = [(int(rng.integers(20, 100)), int(rng.integers(20, 100))) for _ in range(12)]
    images = [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in sizes]
    stream = compile_forward(module, params, outputs=("prob",))
    got = list(stream.stream(images))  # batch_size 8: batches of 8 and 4
    assert len(set(sizes)) == 12 and stream.compile_count <= 2  # here 1: the 4 reuse the 8
    for img, g in zip(images, got, strict=True):
        want = np.asarray(direct(img[None])[0])
        assert g["prob"].shape == want.shape
        np.testing.assert_allclose(g["prob"], want, rtol=0, atol=2e-6)
