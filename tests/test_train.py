"""fcn_jax.train: sliding-window ground truth, loss, Caffe solver semantics, train/eval steps,
checkpoints that resume bit for bit, caffemodel export, and the ``finetune`` command."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import converters
from converters import CaffeFormatError
from fcn_jax import CaffeNet, losses
from fcn_jax import train as T
from fcn_jax.net import load_caffe

TINY_WIDTHS = (4, 8, 8, 8, 8, 8, 8)

# A tiny fully convolutional net with Caffe param fields: conv1 frozen by lr_mult 0,
# conv2 with the CaffeNet convention (weights 1/1, bias 2/0), score with default multipliers.
TINY_GRAPH = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 23 dim: 23 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 5 stride: 2
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 6 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "score" type: "Convolution" bottom: "conv2" top: "score"
  convolution_param { num_output: 3 kernel_size: 2
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.prototxt"
    path.write_text(TINY_GRAPH)
    module, params = load_caffe(path, seed=3)
    return path, module, params


@pytest.fixture(scope="module")
def tiny_caffenet():
    module = CaffeNet(fully_conv=True, widths=TINY_WIDTHS, num_classes=3)
    return module, _random_params(module)


def _random_params(module, seed=0):
    """CaffeNet-like random params without compiling ``init`` (shapes from a trace)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 3, 227, 227), jnp.float32))["params"]
    rng = np.random.default_rng(seed)
    return {layer: {"weight": (rng.normal(size=b["weight"].shape) * 0.05).astype(np.float32),
                    "bias": np.full(b["bias"].shape, 0.1, np.float32)}
            for layer, b in shapes.items()}


# ----------------------------------------------------------------------------- geometry


def test_caffenet_window_is_227_at_stride_32(tiny_caffenet):
    module, params = tiny_caffenet
    assert T.score_blob(module) == "fc8-conv"
    g = T.window_geometry(module)
    assert g == T.WindowGeometry(size=(227, 227), stride=(32, 32), offset=(0, 0))
    assert T.output_hw(module, params, (451, 451)) == (8, 8)  # the tutorial's 8x8 map
    assert T.output_hw(module, params, (259, 291)) == (2, 3)
    win = g.windows((2, 3))
    np.testing.assert_array_equal(win[1, 2], [64, 32, 64 + 227, 32 + 227])
    with pytest.raises(ValueError, match="fully_conv"):
        T.window_geometry(CaffeNet(fully_conv=False))


def test_graph_window_geometry_by_hand(tiny_graph):
    _, module, params = tiny_graph
    assert T.score_blob(module) == "score"
    # conv1 k5 s2: 5 px, jump 2; pool k3 s2: 5 + 2*2 = 9, jump 4; conv2 k3 p1: 9 + 0;
    # score k2: 9 + 1*4 = 13, jump 4.  Input 23 -> conv1 10 -> pool 5 -> 5 -> score 4.
    assert T.window_geometry(module) == T.WindowGeometry((13, 13), (4, 4))
    assert T.output_hw(module, params, (23, 23)) == (4, 4)  # ceil pooling: last overhangs
    assert T.output_hw(module, params, (25, 25)) == (4, 4)  # 25 = 13 + 3 * 4 tiles exactly


# ----------------------------------------------------------------------------- ground truth


def test_labels_on_hand_made_boxes():
    g = T.WindowGeometry(size=(10, 10), stride=(5, 5))  # windows [0,10), [5,15), [10,20)
    cfg = T.LabelConfig(positive=0.7, negative=0.3, ignore_label=255)
    # An 8x8 object at the top left: window (0,0) holds all of it; (0,1) holds 3x8/64 =
    # 0.375 (ignore); (1,1) 3x3/64 = 0.14 and (0,2) nothing (background); (1,0) 8x3/64.
    box = np.array([[0, 0, 8, 8, 2]])
    expect = np.array([[2, 255, 0],
                       [255, 0, 0],
                       [0, 0, 0]])
    np.testing.assert_array_equal(T.sliding_window_labels(box, (3, 3), g, cfg), expect)
    # An object bigger than the window: overlap is the part of the window it fills.
    big = np.array([[0, 0, 20, 13, 1]])  # rows 0..13: windows at y=0 full, y=5 8/10, y=10 .3
    np.testing.assert_array_equal(T.sliding_window_labels(big, (3, 3), g, cfg),
                                  [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    # Two objects: each window takes the best-covered one; no boxes: all background.
    two = np.array([[0, 0, 8, 8, 2], [11, 11, 19, 19, 1]])
    np.testing.assert_array_equal(T.sliding_window_labels(two, (3, 3), g, cfg),
                                  [[2, 255, 0], [255, 0, 255], [0, 255, 1]])
    np.testing.assert_array_equal(T.sliding_window_labels(np.zeros((0, 5)), (2, 3), g, cfg),
                                  np.zeros((2, 3)))
    # min_fill: an object must also fill part of the window to count as seen.
    tiny = np.array([[1, 1, 3, 3, 1]])  # 4 px in a 100 px window
    assert T.sliding_window_labels(tiny, (1, 1), g, cfg)[0, 0] == 1
    strict = T.LabelConfig(min_fill=0.1)
    assert T.sliding_window_labels(tiny, (1, 1), g, strict)[0, 0] == 255
    # Ties go to the first box; thresholds are inclusive.
    same = np.array([[0, 0, 10, 10, 1], [0, 0, 10, 10, 2]])
    assert T.sliding_window_labels(same, (1, 1), g, cfg)[0, 0] == 1
    edge = np.array([[0, 0, 7, 10, 1]])  # overlap exactly 0.7
    assert T.sliding_window_labels(edge, (1, 1), g, cfg)[0, 0] == 1
    with pytest.raises(ValueError):
        T.LabelConfig(positive=0.2, negative=0.5)
    batch = T.batch_labels([box, two], (3, 3), g, cfg)
    assert batch.shape == (2, 3, 3) and batch.dtype == np.int32


# ----------------------------------------------------------------------------- loss


def _np_loss(logits, labels, ignore, weights, normalization):
    x = logits.astype(np.float64)
    logp = x - x.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    n, _, h, w = x.shape
    lmap = np.zeros((n, h, w))
    for a in range(n):
        for i in range(h):
            for j in range(w):
                y = labels[a, i, j]
                if y != ignore:
                    lmap[a, i, j] = -logp[a, y, i, j] * (1.0 if weights is None else weights[y])
    valid = (labels != ignore).sum()
    div = {"VALID": max(valid, 1), "FULL": lmap.size, "BATCH_SIZE": n, "NONE": 1}[normalization]
    return lmap.sum() / div, lmap


@pytest.mark.parametrize("normalization", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_float64_numpy(normalization, weighted):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(2, 4, 3, 5)) * 4).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 3, 5))
    labels[rng.random(labels.shape) < 0.3] = 255
    weights = np.array([0.3, 1.0, 2.5, 0.7]) if weighted else None
    loss, lmap = losses.sliding_window_loss(
        jnp.asarray(logits), jnp.asarray(labels), ignore_label=255,
        class_weights=None if weights is None else jnp.asarray(weights, jnp.float32),
        normalization=normalization)
    ref, ref_map = _np_loss(logits, labels, 255, weights, normalization)
    np.testing.assert_allclose(np.asarray(lmap), ref_map, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-6)
    assert np.all(np.asarray(lmap)[labels == 255] == 0)


def test_loss_with_everything_ignored_is_zero():
    loss, lmap = losses.sliding_window_loss(jnp.ones((1, 3, 2, 2)), jnp.full((1, 2, 2), 255))
    assert float(loss) == 0.0 and float(jnp.sum(lmap)) == 0.0


@pytest.mark.slow  # run by .ci/run after the default suite
def test_gradient_of_loss_map_matches_finite_differences(tiny_graph):
    """float64: d/dp sum(loss_map * r) against central differences along random directions."""
    _, module, params = tiny_graph
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x = jnp.asarray(rng.normal(size=(2, 3, 23, 23)) * 2)
        labels = rng.integers(0, 3, size=(2, 4, 4))
        labels[0, 0, :2] = 255  # ignored cells contribute nothing
        labels = jnp.asarray(labels)
        r = jnp.asarray(rng.random((2, 4, 4)))

        def f(p):
            logits = module.apply({"params": p}, x)["score"]
            assert logits.dtype == jnp.float64
            _, lmap = losses.sliding_window_loss(logits, labels, ignore_label=255)
            return jnp.sum(lmap * r)

        grad = jax.grad(f)(p64)
        f = jax.jit(f)
        leaves, treedef = jax.tree_util.tree_flatten(p64)
        eps = 1e-6
        for k in range(4):
            d = [jnp.asarray(rng.normal(size=leaf.shape)) for leaf in leaves]
            d_tree = jax.tree_util.tree_unflatten(treedef, d)
            plus = jax.tree_util.tree_map(lambda a, b: a + eps * b, p64, d_tree)
            minus = jax.tree_util.tree_map(lambda a, b: a - eps * b, p64, d_tree)
            fd = (float(f(plus)) - float(f(minus))) / (2 * eps)
            an = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree_util.tree_leaves(grad), d,
                                                           strict=True))
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (k, fd, an)


# ----------------------------------------------------------------------------- solver


def test_multipliers_from_prototxt_and_defaults(tiny_graph, tiny_caffenet):
    _, module, params = tiny_graph
    lr, decay = T.caffe_multipliers(params, module.layers)
    assert lr == {"conv1": {"weight": 0.0, "bias": 0.0}, "conv2": {"weight": 1.0, "bias": 2.0},
                  "score": {"weight": 1.0, "bias": 1.0}}
    assert decay["conv2"] == {"weight": 1.0, "bias": 0.0} and decay["score"]["bias"] == 1.0
    assert T.frozen_paths(params, None, lr) == {("conv1", "weight"), ("conv1", "bias")}
    assert T.frozen_paths(params, lambda p: p[0] == "score") == {("score", "weight"),
                                                                  ("score", "bias")}
    _, cparams = tiny_caffenet
    lr2, dec2 = T.caffe_multipliers(cparams, bias=(2.0, 0.0))
    assert lr2["fc6-conv"] == {"weight": 1.0, "bias": 2.0}
    assert dec2["conv3"] == {"weight": 1.0, "bias": 0.0}


def test_learning_rate_policies():
    def lr(**kw):
        return [float(T.learning_rate(T.SolverConfig(base_lr=0.1, **kw))(i)) for i in (0, 5, 10)]
    np.testing.assert_allclose(lr(), [0.1, 0.1, 0.1])
    np.testing.assert_allclose(lr(lr_policy="step", gamma=0.5, stepsize=5), [0.1, 0.05, 0.025])
    np.testing.assert_allclose(lr(lr_policy="poly", power=2.0, max_iter=10), [0.1, 0.025, 0.0])
    np.testing.assert_allclose(lr(lr_policy="inv", gamma=0.1, power=1.0), [0.1, 0.1 / 1.5, 0.05])
    np.testing.assert_allclose(lr(lr_policy="exp", gamma=0.9), [0.1, 0.1 * 0.9 ** 5,
                                                                 0.1 * 0.9 ** 10], rtol=1e-6)
    with pytest.raises(ValueError):
        T.SolverConfig(type="RMSProp")
    with pytest.raises(ValueError):
        T.SolverConfig(lr_policy="poly")


def _batch(module, params, n, hw, seed=0):
    rng = np.random.default_rng(seed)
    out_hw = T.output_hw(module, params, hw)
    labels = rng.integers(0, 3, size=(n, *out_hw)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    return {"image": rng.normal(size=(n, 3, *hw)).astype(np.float32) * 50, "label": labels}


def test_sgd_step_is_caffes_update(tiny_graph):
    """Two SGD steps against Caffe's formula in float64 numpy:
    v = momentum v + lr lr_mult (g + wd decay_mult w); w -= v; lr_mult 0 leaves w as is."""
    _, module, params = tiny_graph
    lr_m, dec_m = T.caffe_multipliers(params, module.layers)
    frozen = T.frozen_paths(params, None, lr_m)
    cfg = T.SolverConfig(type="SGD", base_lr=0.01, momentum=0.9, weight_decay=0.01)
    tx = T.make_optimizer(cfg, params, lr_mults=lr_m, decay_mults=dec_m, frozen=frozen)
    state = T.create_train_state(module, params, tx, frozen=frozen)
    batches = [_batch(module, params, 2, (23, 23), s) for s in range(2)]
    w = {k: {b: np.asarray(v, np.float64) for b, v in d.items()} for k, d in params.items()}
    v = jax.tree_util.tree_map(np.zeros_like, w)
    grad_fn = jax.jit(jax.grad(lambda p, b: T._loss(state, p, b, train=True, key=None)[0]))
    for batch in batches:
        grads = grad_fn(state.params, batch)
        for layer in w:
            for blob in w[layer]:
                g = np.asarray(grads[layer][blob], np.float64)
                step = cfg.base_lr * lr_m[layer][blob] * (
                    g + cfg.weight_decay * dec_m[layer][blob] * w[layer][blob])
                v[layer][blob] = cfg.momentum * v[layer][blob] + step
                w[layer][blob] = w[layer][blob] - v[layer][blob]
        state, metrics = T.train_step(state, batch)
        assert metrics["loss_map"].shape == batch["label"].shape
    for layer in w:
        for blob in w[layer]:
            np.testing.assert_allclose(np.asarray(state.params[layer][blob]), w[layer][blob],
                                       rtol=1e-5, atol=1e-6, err_msg=f"{layer}/{blob}")
    for blob in ("weight", "bias"):  # frozen by lr_mult 0: bit-identical
        np.testing.assert_array_equal(state.params["conv1"][blob], params["conv1"][blob])
    assert int(state.step) == 2


@pytest.mark.slow
def test_adam_matches_caffe_formula_on_first_step(tiny_graph):
    """Caffe Adam, step 1: w -= lr lr_mult sqrt(1-b2)/(1-b1) m / (sqrt(v) + eps) with
    m = (1-b1) g, v = (1-b2) g^2, i.e. about lr lr_mult sign(g)."""
    _, module, params = tiny_graph
    lr_m, _ = T.caffe_multipliers(params, module.layers)
    cfg = T.SolverConfig(type="Adam", base_lr=1e-3, weight_decay=0.0)
    tx = T.make_optimizer(cfg, params, lr_mults=lr_m)
    state = T.create_train_state(module, params, tx)
    batch = _batch(module, params, 2, (23, 23))
    grads = jax.grad(lambda p: T._loss(state, p, batch, train=True, key=None)[0])(state.params)
    new, _ = T.train_step(state, batch)
    g = np.asarray(grads["conv2"]["bias"], np.float64)
    m, vv = 0.1 * g, 0.001 * g * g
    ref = params["conv2"]["bias"] - 1e-3 * 2.0 * np.sqrt(0.001) / 0.1 * m / (np.sqrt(vv)
                                                                             + 1e-8)
    np.testing.assert_allclose(np.asarray(new.params["conv2"]["bias"]), ref, rtol=1e-5,
                               atol=1e-8)


# ----------------------------------------------------------------------------- training


def _caffenet_state(module, params, solver="SGD", freeze=None, lr=0.01, seed=0):
    lr_m, dec_m = T.caffe_multipliers(params, bias=(2.0, 0.0))
    frozen = T.frozen_paths(params, freeze)
    cfg = T.SolverConfig(type=solver, base_lr=lr, momentum=0.9, weight_decay=5e-4)
    tx = T.make_optimizer(cfg, params, lr_mults=lr_m, decay_mults=dec_m, frozen=frozen)
    return T.create_train_state(module, params, tx, seed=seed, frozen=frozen)


def test_a_few_steps_decrease_the_loss(tiny_graph):
    _, module, params = tiny_graph
    lr_m, dec_m = T.caffe_multipliers(params, module.layers)
    tx = T.make_optimizer(T.SolverConfig(type="Adam", base_lr=1e-2), params, lr_mults=lr_m,
                          decay_mults=dec_m)
    state = T.create_train_state(module, params, tx)
    batch = _batch(module, params, 2, (23, 23))
    # learnable: every (non-ignored) cell of image 0 is class 1, of image 1 class 2
    batch["label"] = np.where(batch["label"] == 255, 255, [[[1]], [[2]]]).astype(np.int32)
    before = float(T.eval_step(state, batch)["loss"])
    seen = []
    for _ in range(8):
        state, m = T.train_step(state, batch)
        seen.append(float(m["loss"]))
    after = float(T.eval_step(state, batch)["loss"])
    assert after < 0.85 * before, (before, after, seen)
    assert seen[-1] < seen[0] and seen[0] == pytest.approx(before, rel=1e-5)  # no dropout


def test_dropout_is_active_in_training_only(tiny_caffenet):
    module, params = tiny_caffenet
    state = _caffenet_state(module, params)
    batch = _batch(module, params, 1, (227, 227))
    key = jax.random.PRNGKey(0)
    train1 = T._loss(state, state.params, batch, train=True, key=key)[1][1]
    train2 = T._loss(state, state.params, batch, train=True, key=jax.random.PRNGKey(1))[1][1]
    test1 = T._loss(state, state.params, batch, train=False, key=None)[1][1]
    test2 = T._loss(state, state.params, batch, train=False, key=None)[1][1]
    assert not np.array_equal(train1, train2)
    np.testing.assert_array_equal(test1, test2)
    # fc6-conv after train-mode dropout has exact zeros where Caffe drops units
    blobs = module.apply({"params": state.params}, batch["image"], train=True,
                         rngs={"dropout": key})
    assert np.mean(np.asarray(blobs["fc6-conv"]) == 0) > 0.3


def test_freezing_by_path_predicate(tiny_caffenet):
    module, params = tiny_caffenet
    state = _caffenet_state(module, params, freeze=lambda p: p[0] in ("conv1", "conv2"))
    assert state.frozen == {("conv1", "weight"), ("conv1", "bias"), ("conv2", "weight"),
                            ("conv2", "bias")}
    batch = _batch(module, params, 1, (227, 227))
    for _ in range(2):
        state, _ = T.train_step(state, batch)
    for layer in params:
        for blob in params[layer]:
            same = np.array_equal(np.asarray(state.params[layer][blob]), params[layer][blob])
            assert same == (layer in ("conv1", "conv2")), (layer, blob)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("solver", ["SGD", "Adam"])
def test_checkpoint_resume_is_bit_exact(tiny_caffenet, tmp_path, solver):
    module, params = tiny_caffenet
    freeze = (lambda p: p[0] == "conv1") if solver == "SGD" else None
    batches = [_batch(module, params, 2, (227, 227), s) for s in range(4)]
    state = _caffenet_state(module, params, solver=solver, freeze=freeze, seed=5)
    for b in batches[:2]:
        state, _ = T.train_step(state, b)
    path = tmp_path / "ck"
    T.save_train_state(path, state, {"note": "x"})
    cont, seen = state, []
    for b in batches[2:]:
        cont, m = T.train_step(cont, b)
        seen.append(np.asarray(m["loss_map"]))
    template = _caffenet_state(module, params, solver=solver, freeze=freeze, seed=99)
    resumed, meta = T.restore_train_state(path, template)
    assert meta == {"note": "x"} and int(resumed.step) == 2
    assert _leaves_equal(resumed.opt_state, state.opt_state)
    for b, ref in zip(batches[2:], seen, strict=True):
        resumed, m = T.train_step(resumed, b)
        np.testing.assert_array_equal(np.asarray(m["loss_map"]), ref)
    assert _leaves_equal(resumed.params, cont.params)
    assert _leaves_equal(resumed.opt_state, cont.opt_state)
    np.testing.assert_array_equal(resumed.rng, cont.rng)


def test_restore_into_a_different_model_is_a_clear_error(tiny_caffenet, tmp_path):
    module, params = tiny_caffenet
    state = _caffenet_state(module, params)
    path = tmp_path / "ck"
    T.save_train_state(path, state)
    other = CaffeNet(fully_conv=True, widths=(4, 8, 8, 8, 8, 8, 16), num_classes=3)
    p2 = _random_params(other)
    with pytest.raises(CaffeFormatError) as e:
        T.restore_train_state(path, _caffenet_state(other, p2))
    assert "/ck: ['params']['fc7-conv']['bias']: float32[8] does not match the model's " \
           "float32[16]" in str(e.value)
    assert "\n" not in str(e.value)
    (tmp_path / "junk.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(CaffeFormatError, match="not an Orbax checkpoint folder"):
        T.restore_train_state(tmp_path / "junk.msgpack", state)
    with pytest.raises(CaffeFormatError, match="no such checkpoint folder"):
        T.restore_train_state(tmp_path / "nothing", state)


@pytest.mark.slow
def test_export_caffemodel_round_trips(tiny_caffenet, tmp_path):
    module, params = tiny_caffenet
    net = T.model_net(module, (1, 3, 259, 259))
    path = tmp_path / "ft.caffemodel"
    T.export_caffemodel(path, params, net)
    stored = converters.load_caffemodel(path)
    assert set(stored) == set(params)
    for layer in params:
        for blob in params[layer]:
            np.testing.assert_array_equal(stored[layer][blob], params[layer][blob])
    proto = tmp_path / "ft.prototxt"
    proto.write_text(converters.format_prototxt(net))
    graph, gparams = load_caffe(proto, path)
    x = np.random.default_rng(0).normal(size=(1, 3, 259, 259)).astype(np.float32)
    a = graph.apply({"params": gparams}, x)["fc8-conv"]
    b = module.apply({"params": params}, x)["fc8-conv"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fold_input_scale_is_exact_for_the_first_layer(tiny_graph):
    from fcn_jax.commands.finetune import fold_input_scale

    path, module, params = tiny_graph
    folded = fold_input_scale(params, converters.read_prototxt(path), 0.25)
    assert folded is not params and folded["conv2"] is params["conv2"]
    x = np.random.default_rng(0).normal(size=(2, 3, 23, 23)).astype(np.float32)
    a = module.apply({"params": params}, x * np.float32(0.25))["score"]
    b = module.apply({"params": folded}, x)["score"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_dense_metrics_by_hand():
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    label = np.array([[0, 1, 1], [255, 2, 0]])
    conf = T.confusion_matrix(pred, label, 3)
    np.testing.assert_array_equal(conf, [[1, 0, 1], [1, 1, 0], [0, 0, 1]])
    m = T.dense_metrics(conf, ["bg", "a", "b"])
    assert m["cells"] == 5 and m["cell_accuracy"] == pytest.approx(3 / 5)
    # IoU = TP / (row + column - TP): bg 1/(2+2-1), a 1/(2+1-1), b 1/(1+2-1)
    assert m["iou"] == pytest.approx({"bg": 1 / 3, "a": 1 / 2, "b": 1 / 2})
    assert m["mean_iou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    absent = T.dense_metrics(T.confusion_matrix([0, 0], [0, 0], 3))
    assert absent["iou"]["1"] is None and absent["mean_iou"] == 1.0


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow  # run by .ci/run after the default suite
def test_finetune_command_demo_and_resume(tmp_path):
    from fcn_jax.cli import main

    out = tmp_path / "run"
    args = ["finetune", "--demo", "--out", str(out), "--input-size", "227", "259",
            "--widths", *map(str, TINY_WIDTHS), "--batch-size", "2", "--val-images", "3",
            "--no-progress", "--checkpoint-every", "2"]
    assert main([*args, "--steps", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_loss"]) == 2
    for when in ("before", "after"):
        ev = metrics["eval"][when]
        assert 0.0 <= ev["cell_accuracy"] <= 1.0 and 0.0 <= ev["mean_iou"] <= 1.0
    assert metrics["model"]["window"] == {"size": [227, 227], "stride": [32, 32]}
    for name in ("loss_curve.png", "heatmap_0.png", "classes_after.png",
                 "finetuned.prototxt", "finetuned.caffemodel"):
        assert (out / name).stat().st_size > 0, name
    graph, gparams = load_caffe(out / "finetuned.prototxt", out / "finetuned.caffemodel")
    assert gparams["fc8-conv"]["weight"].shape == (4, 8, 1, 1)
    # trained on inputs x 0.017; the export folds that into conv1 and takes plain inputs
    assert metrics["data"]["input_scale"] == pytest.approx(0.017)
    with T.TrainCheckpoints(out / "checkpoints", read_only=True) as ck:
        assert ck.steps() == [2]
        trained = ck.read()[0]["params"]
    x = np.random.default_rng(0).normal(size=(1, 3, 227, 259)).astype(np.float32) * 60
    a = graph.apply({"params": gparams}, x)["fc8-conv"]
    b = CaffeNet(fully_conv=True, widths=TINY_WIDTHS, num_classes=4).apply(
        {"params": trained}, x * np.float32(0.017))["fc8-conv"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # resume to step 3: the first two losses are kept, one new step is run
    assert main([*args, "--steps", "3", "--resume", str(out / "checkpoints")]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["train_loss"][:2] == metrics["train_loss"] and len(resumed["train_loss"]) == 3
    assert resumed["eval"]["before"] == metrics["eval"]["before"]
    # a changed setting refuses to resume, with a one-line error
    assert main([*args, "--steps", "4", "--seed", "1", "--resume",
                 str(out / "checkpoints")]) == 2


def test_finetune_command_with_annotations_and_weights(tmp_path, capsys):
    from fcn_jax import data as D
    from fcn_jax.cli import main

    ann = D.write_synthetic_dataset(tmp_path / "ds", 6, seed=1, size=(240, 240),
                                    object_size=(60, 120))
    out = tmp_path / "run"
    weights = "tests/data/caffenet_mini/caffenet_mini.caffemodel"
    code = main(["finetune", "--data", str(ann), "--weights", weights, "--steps", "1",
                 "--out", str(out), "--input-size", "227", "227", "--batch-size", "2",
                 "--no-progress", "--freeze", "conv*", "--solver", "SGD"])
    assert code == 0
    text = capsys.readouterr().out
    assert "transplant: " in text and "copying" not in text  # one line; the rest in a file
    full = (out / "transplant.txt").read_text()
    assert "coercing fc6 -> fc6-conv weight from (256, 2304) to (256, 64, 6, 6)" in full
    assert "dropping fc8 weight" in full  # 1000 classes -> 4: keeps its initialisation
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["widths"] == [24, 64, 96, 96, 64, 256, 256]
    assert metrics["data"]["val_images"] == 1 and len(metrics["train_loss"]) == 1
    assert "conv1/weight" in metrics["model"]["frozen"]
    assert main(["finetune", "--data", str(tmp_path / "none.jsonl"), "--steps", "1",
                 "--out", str(out)]) == 2


def test_checkpoints_keep_the_last_k_and_the_best(tiny_graph, tmp_path):
    _, module, params = tiny_graph
    state = T.create_train_state(module, params, optax.sgd(0.1))
    with T.TrainCheckpoints(tmp_path / "ck", keep=2) as ck:
        for step, loss in zip(range(1, 6), [0.5, 0.9, 0.8, 0.7, 0.6], strict=True):
            ck.save(state.replace(step=jnp.int32(step)), {"loss": loss},
                    metrics={"loss": loss})
        assert ck.steps() == [1, 4, 5] and ck.best_step() == 1 and ck.latest_step() == 5
        assert ck.read(1)[1] == {"loss": 0.5}
        with pytest.raises(CaffeFormatError, match=r"ck: step: no step 2 \(steps: \[1, 4, 5\]"):
            ck.restore(state, 2)


def test_progress_bar_counts_from_the_resumed_step(tiny_graph, capsys):
    """Issue 20 item 10: after a resume at step 3 of 5 the bar reads 5/5, not 2/2."""
    _, module, params = tiny_graph
    tx = T.make_optimizer(T.SolverConfig(type="SGD", base_lr=1e-3), params)
    state = T.create_train_state(module, params, tx).replace(step=jnp.int32(3))
    batch = _batch(module, params, 2, (23, 23))
    state, losses = T.fit(state, lambda step: batch, 2, progress=True, desc="ft")
    err = capsys.readouterr().err
    assert int(state.step) == 5 and len(losses) == 2
    assert "5/5" in err and "2/2" not in err, err
    assert "batch_labels" in T.train_step.__doc__ and '"label"' in T.train_step.__doc__
