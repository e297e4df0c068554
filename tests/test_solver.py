"""Caffe's solvers (``fcn_jax.solver``) against real Caffe, step by step.

The reference (``tests/data/solvers``, a copy of ``shared/caffe-reference/solvers``) is what BVLC
Caffe did in 10 ``solver.step(1)`` calls of 15 solver cases: weights, loss, rate, raw gradient
and history after every step, and two snapshot/resume runs. Three kinds of check:

- teacher forcing: ``caffe_update`` fed Caffe's own raw gradient, w_t and history_t gives
  Caffe's w_{t+1} and history_{t+1} (the update rule alone, no forward/backward);
- the whole solver from ``init.caffemodel`` (our forward/backward, data layer, update) follows
  Caffe's trajectory within 1e-5 at every step;
- a float64 numpy transcription of ``sgd_solver.cpp`` & co. (written here, independently) for
  the solver types and policies the recorded cases do not cover (AdaDelta, sigmoid, clipping on
  some steps only, iter_size with clipping).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from converters import CaffeFormatError, load_caffemodel
from converters.proto import caffe_pb2
from converters.solver_io import parse_solver, read_solver, read_solverstate
from fcn_jax import solver as S
from fcn_jax.cli import main as cli

REF = Path(__file__).parent / "data" / "solvers"
CASES = sorted(p.name for p in REF.iterdir() if (p / "trajectory.npz").exists())
BLOB = {"weight": 0, "bias": 1}


@pytest.fixture
def solvers_dir(tmp_path, monkeypatch):
    """A writable copy of the reference folder as the current directory (Caffe's paths are
    relative to it)."""
    dst = tmp_path / "solvers"
    shutil.copytree(REF, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    monkeypatch.chdir(dst)
    return dst


def _rel(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _key(layer: str, blob: str) -> str:
    return f"{layer}/{BLOB[blob]}"


def _multipliers():
    cwd = os.getcwd()
    os.chdir(REF)
    try:
        net = S.solver_nets(read_solver("01_sgd_fixed/solver.prototxt"))[0][0]
    finally:
        os.chdir(cwd)
    params = load_caffemodel(REF / "init.caffemodel")
    params = {k: v for k, v in params.items() if v}
    return net, params, *S.param_multipliers(net, params)


def test_multipliers_are_caffes():
    """conv2 has no param {}: lr_mult 1 and decay_mult 1 on its bias too; ip1 frozen."""
    net, params, lr, decay = _multipliers()
    assert lr == {"conv1": {"weight": 1, "bias": 2}, "conv2": {"weight": 1, "bias": 1},
                  "ip1": {"weight": 0, "bias": 0}, "ip2": {"weight": 1, "bias": 2}}
    assert decay == {"conv1": {"weight": 1, "bias": 0}, "conv2": {"weight": 1, "bias": 1},
                     "ip1": {"weight": 1, "bias": 1}, "ip2": {"weight": 1, "bias": 0}}
    assert S.learnable_order(net, params) == [
        ("conv1", "weight"), ("conv1", "bias"), ("conv2", "weight"), ("conv2", "bias"),
        ("ip1", "weight"), ("ip1", "bias"), ("ip2", "weight"), ("ip2", "bias")]


@pytest.mark.parametrize("case", CASES)
def test_update_rule_teacher_forced(case):
    """Fed Caffe's raw gradient, weights and history at every step, one update gives Caffe's
    next weights (a few float32 ulps) and history."""
    sp = read_solver(REF / case / "solver.prototxt")
    net, params, lr, decay = _multipliers()
    tx = S.caffe_update(sp, lr, decay)
    tr = np.load(REF / case / "trajectory.npz")
    it0 = int(tr["iter"][0])
    update = jax.jit(tx.update)
    for t in range(len(tr["loss"])):
        def at(prefix, t=t):
            return {l: {b: jnp.asarray(tr[f"{prefix}{_key(l, b)}"][t]) for b in bl}
                    for l, bl in params.items()}
        w = ({l: {b: jnp.asarray(tr["init/" + _key(l, b)]) for b in bl}
              for l, bl in params.items()} if t == 0 else at("", t - 1))
        zeros = jax.tree_util.tree_map(jnp.zeros_like, w)
        h = zeros if t == 0 else at("history/", t - 1)
        h2 = {} if "history2/conv1/0" not in tr else (zeros if t == 0 else at("history2/", t - 1))
        cs = 0 if t == 0 else int(tr["current_step"][t - 1])
        state = S.CaffeSolverState(jnp.int32(it0 + t), jnp.int32(cs), h, h2)
        upd, new = update(at("grad/"), state, w)
        w1 = optax.apply_updates(w, upd)
        for l, bl in params.items():
            for b in bl:
                k = _key(l, b)
                ref, prev = tr[k][t], np.asarray(w[l][b])
                step = np.abs(ref - prev).max()
                err = np.abs(np.asarray(w1[l][b]) - ref).max()
                assert err <= 4 * np.spacing(np.float32(np.abs(ref).max())) + 1e-4 * step, (
                    case, t, k, err)
                assert _rel(new.history[l][b], tr["history/" + k][t]) < 1e-5, (case, t, k)
                if h2:
                    assert _rel(new.history2[l][b], tr["history2/" + k][t]) < 1e-5
        assert int(new.iter) == it0 + t + 1
        rate, _ = S.learning_rate(S.SolverSpec.from_proto(sp), it0 + t, cs)
        assert abs(float(rate) - tr["lr"][t]) <= 1e-6 * tr["lr"][t]


#: run whole in the default suite (one per solver family); every case runs with -m slow
_QUICK = {"01_sgd_fixed", "12_adam", "14_sgd_iter_size2", "15_sgd_clip", "09_adagrad"}


@pytest.mark.parametrize("case", [c if c in _QUICK else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_solver_follows_caffe(case, solvers_dir):
    """From init.caffemodel, our forward/backward + HDF5Data + update stay within 1e-5 of
    Caffe after every step: every blob (relative to its largest |w|), the loss, the history,
    the rate and current_step."""
    tr = np.load(f"{case}/trajectory.npz")
    with S.get_solver(f"{case}/solver.prototxt") as s:
        s.copy_from("init.caffemodel")
        for t in range(len(tr["loss"])):
            loss = s.step(1)[0]
            assert abs(loss - tr["loss"][t]) <= 1e-5 * abs(tr["loss"][t]), (t, loss)
            assert abs(s.lr - tr["lr"][t]) <= 1e-6 * tr["lr"][t]
            assert s.current_step == tr["current_step"][t]
            for layer, blob in s.learnable:
                k = _key(layer, blob)
                assert _rel(s.params[layer][blob], tr[k][t]) < 1e-5, (t, k)
                assert _rel(s.state.history[layer][blob], tr["history/" + k][t]) < 1e-5
                if "history2/" + k in tr:
                    assert _rel(s.state.history2[layer][blob], tr["history2/" + k][t]) < 1e-5
        assert s.iter == len(tr["loss"])
        # frozen ip1 (lr_mult 0) never moves
        assert np.array_equal(np.asarray(s.params["ip1"]["weight"]), tr["init/ip1/0"])


@pytest.mark.parametrize("case", ["18_sgd_snapshot", "19_adam_snapshot"])
def test_restore_caffe_solverstate(case, solvers_dir):
    """restore() of Caffe's snap_iter_4.solverstate (iter, history, learned_net relative to the
    current directory) then 3 steps equals resumed.npz."""
    r = np.load(f"{case}/resumed.npz")
    with S.get_solver(f"{case}/solver.prototxt") as s:
        s.restore(f"{case}/snap_iter_4.solverstate")
        assert s.iter == 4
        for t in range(3):
            loss = s.step(1)[0]
            assert abs(loss - r["loss"][t]) <= 1e-5 * abs(r["loss"][t])
            for layer, blob in s.learnable:
                k = _key(layer, blob)
                assert _rel(s.params[layer][blob], r[k][t]) < 1e-5, (t, k)
                assert _rel(s.state.history[layer][blob], r["history/" + k][t]) < 1e-5


@pytest.mark.parametrize("case", ["18_sgd_snapshot", "19_adam_snapshot"])
def test_own_snapshot_as_caffe_writes_it(case, solvers_dir):
    """Our snapshot at iteration 4 (``snapshot: 4``) holds Caffe's messages: the same fields,
    blob shapes and learned_net as Caffe's file, values within tolerance; restored in a new
    Solver (data advanced by the 4 consumed batches) it continues identically."""
    ref_state, ref_hist = read_solverstate(f"{case}/snap_iter_4.solverstate")
    os.remove(f"{case}/snap_iter_4.solverstate")
    os.remove(f"{case}/snap_iter_4.caffemodel")
    with S.get_solver(f"{case}/solver.prototxt") as s:
        s.copy_from("init.caffemodel")
        s.step(4)
        state, hist = read_solverstate(f"{case}/snap_iter_4.solverstate")
        assert (state.iter, state.learned_net, state.current_step) == (
            ref_state.iter, ref_state.learned_net, ref_state.current_step)
        assert [h.shape for h in hist] == [h.shape for h in ref_hist]
        for ours, ref in zip(hist, ref_hist, strict=True):
            assert _rel(ours, ref) < 1e-5
        ref_w = load_caffemodel(REF / case / "snap_iter_4.caffemodel")
        ours_w = load_caffemodel(f"{case}/snap_iter_4.caffemodel")
        for layer, blobs in ref_w.items():
            for b, v in blobs.items():
                assert _rel(ours_w[layer][b], v) < 1e-5
        with S.get_solver(f"{case}/solver.prototxt") as s2:
            s2.restore(f"{case}/snap_iter_4.solverstate")
            s2.skip_batches(4)
            a, b = s.step(3), s2.step(3)
            assert np.array_equal(a, b)
            for layer, blob in s.learnable:
                assert np.array_equal(np.asarray(s.params[layer][blob]),
                                      np.asarray(s2.params[layer][blob]))


def test_cli_train_writes_caffes_iteration_10(solvers_dir, capsys):
    """``fcn-jax train --solver 01_sgd_fixed/solver.prototxt --weights init.caffemodel``: the
    iteration-10 caffemodel (Caffe's default prefix: the solver path without extension)
    equals Caffe's weights."""
    assert cli(["train", "--solver", "01_sgd_fixed/solver.prototxt", "--weights",
                "init.caffemodel", "--no-progress"]) == 0
    tr = np.load("01_sgd_fixed/trajectory.npz")
    w = load_caffemodel("01_sgd_fixed/solver_iter_10.caffemodel")
    for layer, blobs in w.items():
        for b, v in blobs.items():
            assert _rel(v, tr[_key(layer, b)][-1]) < 1e-5, (layer, b)
    assert os.path.exists("01_sgd_fixed/solver_iter_10.solverstate")
    assert "weights in 01_sgd_fixed/solver_iter_10.caffemodel" in capsys.readouterr().out


def test_cli_resume_from_caffe_snapshot(solvers_dir):
    """``--snapshot`` resumes from Caffe's own state: iteration 7 equals resumed.npz[-1]."""
    assert cli(["train", "--solver", "18_sgd_snapshot/solver.prototxt", "--snapshot",
                "18_sgd_snapshot/snap_iter_4.solverstate", "--no-progress"]) == 0
    r = np.load("18_sgd_snapshot/resumed.npz")
    w = load_caffemodel("18_sgd_snapshot/snap_iter_7.caffemodel")
    for layer, blobs in w.items():
        for b, v in blobs.items():
            assert _rel(v, r[_key(layer, b)][-1]) < 1e-5


# ----------------------------------------------------------------------------- float64 numpy


def _np_rate(sp, it: int, cs: int) -> tuple[float, int]:
    """GetLearningRate, float64, from sgd_solver.cpp."""
    p = sp.lr_policy
    if p == "fixed":
        return sp.base_lr, cs
    if p == "step":
        cs = it // sp.stepsize
        return sp.base_lr * sp.gamma ** cs, cs
    if p == "exp":
        return sp.base_lr * sp.gamma ** it, cs
    if p == "inv":
        return sp.base_lr * (1 + sp.gamma * it) ** (-sp.power), cs
    if p == "multistep":
        if cs < len(sp.stepvalue) and it >= sp.stepvalue[cs]:
            cs += 1
        return sp.base_lr * sp.gamma ** cs, cs
    if p == "poly":
        return sp.base_lr * (1 - it / sp.max_iter) ** sp.power, cs
    return sp.base_lr / (1 + np.exp(-sp.gamma * (it - sp.stepsize))), cs


def _np_apply_update(sp, it, cs, w, g, h, h2, lr_mult, decay_mult):
    """ApplyUpdate in float64 over lists of blobs: clip, normalize, regularize, then
    ComputeUpdateValue of each solver type."""
    rate, cs = _np_rate(sp, it, cs)
    g = [x.astype(np.float64) for x in g]
    if sp.clip_gradients >= 0:
        norm = np.sqrt(sum((x ** 2).sum() for x in g))
        if norm > sp.clip_gradients:
            g = [x * (sp.clip_gradients / norm) for x in g]
    out_w, out_h, out_h2 = [], [], []
    for k in range(len(w)):
        d = g[k] / sp.iter_size
        decay = sp.weight_decay * decay_mult[k]
        if decay:
            d = d + decay * (w[k] if sp.regularization_type == "L2" else np.sign(w[k]))
        local = rate * lr_mult[k]
        m, delta = sp.momentum, sp.delta
        hk, h2k = h[k], h2[k] if h2 else None
        if sp.type == "SGD":
            hk = m * hk + local * d
            step = hk
        elif sp.type == "Nesterov":
            old = hk
            hk = m * hk + local * d
            step = (1 + m) * hk - m * old
        elif sp.type in ("AdaGrad", "RMSProp"):
            hk = hk + d * d if sp.type == "AdaGrad" else (
                sp.rms_decay * hk + (1 - sp.rms_decay) * d * d)
            step = local * d / (np.sqrt(hk) + delta)
        elif sp.type == "AdaDelta":
            hk = m * hk + (1 - m) * d * d
            dx = d * np.sqrt((h2k + delta) / (hk + delta))
            h2k = m * h2k + (1 - m) * dx * dx
            step = local * dx
        else:
            t = it + 1
            corr = np.sqrt(1 - sp.momentum2 ** t) / (1 - m ** t)
            hk = m * hk + (1 - m) * d
            h2k = sp.momentum2 * h2k + (1 - sp.momentum2) * d * d
            step = local * corr * hk / (np.sqrt(h2k) + delta)
        out_w.append(w[k] - step)
        out_h.append(hk)
        out_h2.append(h2k)
    return out_w, out_h, out_h2 if h2 else None, cs


_SYNTH = {
    "adadelta": 'type: "AdaDelta" base_lr: 1.0 lr_policy: "fixed" momentum: 0.95 '
                'weight_decay: 0.0005 delta: 1e-6',
    "sigmoid": 'type: "SGD" base_lr: 0.01 lr_policy: "sigmoid" gamma: 0.5 stepsize: 5 '
               'momentum: 0.9 weight_decay: 0.0005',
    "clip_mixed": 'type: "SGD" base_lr: 0.01 lr_policy: "step" gamma: 0.5 stepsize: 2 '
                  'momentum: 0.9 weight_decay: 0.0005 clip_gradients: 2.0',
    "iter_size_clip": 'type: "Nesterov" base_lr: 0.01 lr_policy: "multistep" gamma: 0.1 '
                      'stepvalue: 1 stepvalue: 3 momentum: 0.9 weight_decay: 0.001 '
                      'iter_size: 3 clip_gradients: 3.0 regularization_type: "L1"',
    "rmsprop_inv": 'type: "RMSProp" base_lr: 0.001 lr_policy: "inv" gamma: 0.1 power: 0.75 '
                   'rms_decay: 0.9 weight_decay: 0.0005',
    "adam_poly": 'type: "Adam" base_lr: 0.001 lr_policy: "poly" power: 2 max_iter: 8 '
                 'momentum: 0.9 momentum2: 0.99 weight_decay: 0.0005',
    "adagrad_exp": 'type: "AdaGrad" base_lr: 0.05 lr_policy: "exp" gamma: 0.9 '
                   'weight_decay: 0.002',
}


@pytest.mark.parametrize("name", sorted(_SYNTH))
def test_update_rule_vs_float64_numpy(name):
    """caffe_update against the float64 transcription, 8 steps of random gradients whose
    norm crosses the clip threshold on some steps (frozen, undecayed and doubled-rate blobs
    included)."""
    sp = parse_solver(_SYNTH[name])
    spec = S.SolverSpec.from_proto(sp)
    rng = np.random.default_rng(5)
    shapes = [(6, 4), (6,), (3, 2, 2), (5,)]
    lr_mult, decay_mult = [1.0, 2.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]
    names = [("a", "weight"), ("a", "bias"), ("b", "weight"), ("c", "bias")]
    tree = lambda xs: {l: {b: xs[i] for i, (ll, b) in enumerate(names) if ll == l}  # noqa
                       for l in dict.fromkeys(n[0] for n in names)}
    mults = tree(lr_mult), tree(decay_mult)
    tx = S.caffe_update(sp, *mults)
    w64 = [rng.normal(0, 0.5, s).astype(np.float32).astype(np.float64) for s in shapes]
    second = spec.type in ("AdaDelta", "Adam")
    w = tree([jnp.asarray(x, jnp.float32) for x in w64])
    state = tx.init(w)
    cs = 0
    update = jax.jit(tx.update)
    for it in range(8):
        g = [rng.normal(0, 0.8 + 0.4 * (it % 3), s).astype(np.float32) for s in shapes]
        g = [np.zeros_like(x) if m == 0 else x for x, m in zip(g, lr_mult, strict=True)]
        # float64 reference one step ahead from OUR float32 state (no drift)
        wf = [np.asarray(w[l][b], np.float64) for l, b in names]
        hf = [np.asarray(state.history[l][b], np.float64) for l, b in names]
        h2f = ([np.asarray(state.history2[l][b], np.float64) for l, b in names]
               if second else None)
        ref_w, ref_h, ref_h2, cs = _np_apply_update(spec, it, cs, wf, g, hf, h2f, lr_mult,
                                                    decay_mult)
        upd, state = update(tree([jnp.asarray(x) for x in g]), state, w)
        w = optax.apply_updates(w, upd)
        assert int(state.current_step) == cs
        for i, (l, b) in enumerate(names):
            ours = np.asarray(w[l][b], np.float64)
            scale = max(np.abs(ref_w[i]).max(), 1e-30)
            assert np.abs(ours - ref_w[i]).max() <= 4e-7 * scale + 1e-5 * np.abs(
                ref_w[i] - wf[i]).max(), (name, it, l, b)
            assert _rel(state.history[l][b], ref_h[i]) < 2e-6
            if ref_h2 is not None:
                assert _rel(state.history2[l][b], ref_h2[i]) < 2e-6


def test_sigmoid_rate_rises_to_half_at_stepsize():
    spec = S.SolverSpec.from_proto(parse_solver(_SYNTH["sigmoid"]))
    rate, _ = S.learning_rate(spec, 5, 0)
    assert float(rate) == pytest.approx(0.005, rel=1e-6)


# ----------------------------------------------------------------------------- nets & errors


TRAIN_VAL = """
name: "tv"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" include { phase: TRAIN stage: "drop" }
  dropout_param { dropout_ratio: 0.5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


def _write(tmp_path, solver: str, net: str = TRAIN_VAL) -> str:
    (tmp_path / "tv.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(solver)
    return str(tmp_path / "solver.prototxt")


def test_netstate_gives_train_and_test_nets(tmp_path, monkeypatch):
    """One train_val: the TRAIN net has the loss and (with the stage) Dropout, the TEST net
    Accuracy; test_state / train_state merge into each net's state as in Solver::Init."""
    monkeypatch.chdir(tmp_path)
    sp = parse_solver('net: "tv.prototxt" test_iter: 2 test_interval: 5 base_lr: 0.1 '
                      'lr_policy: "fixed" train_state { stage: "drop" }')
    _write(tmp_path, "")
    (train, _), tests = S.solver_nets(sp)
    assert [lp.name for lp in train.layer] == ["data", "ip", "drop", "loss"]
    assert [lp.name for lp in tests[0][0].layer] == ["data", "ip", "loss", "acc"]
    assert S.net_outputs(tests[0][0]) == ["accuracy", "loss"]
    assert S.loss_weights(tests[0][0]) == {"loss": 1.0}
    sp.ClearField("train_state")
    assert [lp.name for lp in S.solver_nets(sp)[0][0].layer] == ["data", "ip", "loss"]


def test_fed_input_and_test_outputs(tmp_path, monkeypatch):
    """An Input-fed net: the step equals a hand-written float64 SGD step on the softmax loss;
    test() averages Accuracy over test_iter batches."""
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, 'net: "tv.prototxt" test_iter: 2 test_interval: 100 '
                  'test_initialization: false base_lr: 0.1 lr_policy: "fixed" momentum: 0 '
                  'weight_decay: 0.01 max_iter: 1 random_seed: 3')
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1], np.float32)
    with S.get_solver(path) as s:
        s.set_feed(lambda: {"data": x, "label": y})
        s.set_feed(lambda: {"data": x, "label": y}, test_net=0)
        w = np.asarray(s.params["ip"]["weight"], np.float64)
        b = np.asarray(s.params["ip"]["bias"], np.float64)
        z = x @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(4), y.astype(int)]).mean()
        dz = p.copy()
        dz[np.arange(4), y.astype(int)] -= 1
        dz /= 4
        gw, gb = dz.T @ x, dz.sum(0)
        got = s.step(1)[0]
        assert got == pytest.approx(loss, rel=1e-6)
        np.testing.assert_allclose(s.params["ip"]["weight"], w - 0.1 * (gw + 0.01 * w),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s.params["ip"]["bias"], b - 0.2 * gb, rtol=1e-5, atol=1e-7)
        res = s.test(0)
        zt = x @ np.asarray(s.params["ip"]["weight"], np.float64).T + np.asarray(
            s.params["ip"]["bias"])
        assert res["accuracy"] == pytest.approx((zt.argmax(1) == y).mean())
        assert set(res) == {"accuracy", "loss"}


@pytest.mark.parametrize("text,field", [
    ('base_lr: 0.1 lr_policy: "sigmoid" gamma: -0.5 stepsize: 2', "gamma"),
    ('type: "AdaGrad" momentum: 0.9 lr_policy: "fixed"', "momentum"),
    ('type: "RMSProp" rms_decay: 1.0 lr_policy: "fixed"', "rms_decay"),
    ('type: "Adamax" lr_policy: "fixed"', "type"),
    ('lr_policy: "plateau"', "lr_policy"),
    ("", "lr_policy"),
    ('lr_policy: "step" gamma: 0.1', "stepsize"),
    ('lr_policy: "poly" power: 1', "max_iter"),
    ('lr_policy: "fixed" regularization_type: "L3"', "regularization_type"),
])
def test_settings_caffe_aborts_on(text, field):
    with pytest.raises(CaffeFormatError) as e:
        S.SolverSpec.from_proto(parse_solver(text, "s.prototxt"), "s.prototxt")
    assert e.value.field == field and "\n" not in str(e.value)


def test_solver_file_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaffeFormatError, match="lr_polcy"):
        parse_solver('lr_polcy: "fixed"', "s.prototxt")
    with pytest.raises(CaffeFormatError, match="cannot be both specified"):
        parse_solver('solver_type: ADAM type: "Adam"', "s.prototxt")
    assert parse_solver("solver_type: NESTEROV").type == "Nesterov"
    sp = parse_solver('net: "x"', str(tmp_path / "a" / "solver.prototxt"))
    assert sp.snapshot_prefix == str(tmp_path / "a" / "solver")
    (tmp_path / "snaps").mkdir()
    sp = parse_solver('snapshot_prefix: "snaps"', "b/run.prototxt")
    assert sp.snapshot_prefix == os.path.join("snaps", "run")
    for text, match in [('net: "nosuch.prototxt" lr_policy: "fixed"', "not found"),
                        ('lr_policy: "fixed"', "no train net"),
                        ('net: "tv.prototxt" test_iter: 1 lr_policy: "fixed"', "test_interval"),
                        ('net: "tv.prototxt" snapshot_format: HDF5 lr_policy: "fixed"', "HDF5"),
                        ('net: "tv.prototxt" snapshot: 2 snapshot_prefix: "no/such/x" '
                         'lr_policy: "fixed"', "snapshot prefix")]:
        with pytest.raises(CaffeFormatError, match=match):
            S.get_solver(_write(tmp_path, text))


def test_restore_refuses_a_state_of_another_solver(solvers_dir):
    """Adam's 16 history blobs into an SGD solver: Caffe's 'Incorrect length of history
    blobs'; a truncated file names itself."""
    with S.get_solver("01_sgd_fixed/solver.prototxt") as s:
        with pytest.raises(CaffeFormatError, match="incorrect length of history"):
            s.restore("19_adam_snapshot/snap_iter_4.solverstate")
    raw = Path("18_sgd_snapshot/snap_iter_4.solverstate").read_bytes()
    Path("cut.solverstate").write_bytes(raw[:1000])
    with pytest.raises(CaffeFormatError, match="cut.solverstate"):
        read_solverstate("cut.solverstate")


def test_solverstate_bytes_equal_caffes():
    """Caffe's state read and written again is byte for byte the file Caffe wrote."""
    from converters.solver_io import solverstate_bytes
    for case in ("18_sgd_snapshot", "19_adam_snapshot"):
        path = REF / case / "snap_iter_4.solverstate"
        st, hist = read_solverstate(path)
        assert solverstate_bytes(st.iter, st.learned_net, st.current_step,
                                 hist) == path.read_bytes()
        assert isinstance(st, type(caffe_pb2.SolverState()))


BN_NET = """
name: "bn"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 6 dim: 3 } shape { dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "h"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 }
                        bias_filler { type: "constant" value: 0.5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "h" top: "h"
  batch_norm_param { moving_average_fraction: 0.9 } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "s"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }
"""


def test_batchnorm_running_sums_follow_caffe(tmp_path, monkeypatch):
    """A TRAIN BatchNorm (in place) normalises with batch statistics and updates Caffe's
    running sums in each forward (iter_size 2: twice per iteration); its blobs are frozen
    (lr_mult 0) but still decayed into the AdaGrad history, as Caffe does."""
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, 'net: "tv.prototxt" type: "AdaGrad" base_lr: 0.1 '
                  'lr_policy: "fixed" weight_decay: 0.01 iter_size: 2 random_seed: 1', BN_NET)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(6, 3)).astype(np.float32) for _ in range(4)]
    y = np.array([0, 1, 2, 1, 0, 2], np.float32)
    feed = iter([{"data": x, "label": y} for x in xs])
    with S.get_solver(path) as s:
        assert s.lr_mults["bn"] == {"mean": 0.0, "variance": 0.0, "scale_factor": 0.0}
        s.set_feed(lambda: next(feed))
        mean, var, factor = np.zeros(4), np.zeros(4), 0.0
        hist = np.zeros(4)
        for it in range(2):
            w = np.asarray(s.params["ip1"]["weight"], np.float64)
            b = np.asarray(s.params["ip1"]["bias"], np.float64)
            for x in xs[2 * it: 2 * it + 2]:
                h = x @ w.T + b
                mean = h.mean(0) + 0.9 * mean
                var = 6 / 5 * h.var(0) + 0.9 * var
                factor = 0.9 * factor + 1
            s.step(1)
            np.testing.assert_allclose(s.params["bn"]["mean"], mean, rtol=1e-5)
            np.testing.assert_allclose(s.params["bn"]["variance"], var, rtol=1e-5)
            np.testing.assert_allclose(s.params["bn"]["scale_factor"], [factor], rtol=1e-6)
            hist = hist + (0.01 * mean) ** 2
            np.testing.assert_allclose(s.state.history["bn"]["mean"], hist, rtol=1e-4)


# ----------------------------------------------------------------------------- whole recipes


RECIPE = """
name: "recipe"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB }
  transform_param { crop_size: 6 mirror: false mean_value: 100 scale: 0.02 } }
layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TEST }
  image_data_param { source: "test.txt" batch_size: 3 new_height: 8 new_width: 8 }
  transform_param { crop_size: 6 mean_file: "mean.binaryproto" scale: 0.02 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


def test_train_val_recipe_lmdb_imagedata_accuracy(tmp_path, monkeypatch):
    """A whole recipe: LMDB Datums (raw) with a TRAIN crop, an ImageData TEST net resized with
    OpenCV, centre-cropped, mean file; Accuracy every test_interval over test_iter batches,
    the TEST cursor going on between tests, the test net on the train net's current weights.
    Each test's accuracy equals one computed here from the images with numpy."""
    import cv2
    import lmdb

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    env = lmdb.open("train_lmdb", map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(8):
            chw = rng.integers(0, 256, (3, 6, 6), dtype=np.uint8)
            txn.put(f"{i:04d}".encode(), caffe_pb2.Datum(
                channels=3, height=6, width=6, data=chw.tobytes(),
                label=i % 3).SerializeToString())
    env.close()
    images, labels = [], []
    lines = []
    for i in range(5):
        img = rng.integers(0, 256, (10 + i, 9, 3), dtype=np.uint8)
        cv2.imwrite(f"t{i}.png", img)
        images.append(img)
        labels.append(i % 3)
        lines.append(f"t{i}.png {i % 3}")
    Path("test.txt").write_text("\n".join(lines) + "\n")
    mean = rng.uniform(90, 110, (3, 8, 8)).astype(np.float32)
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=8, width=8)
    blob.data.extend(mean.ravel().tolist())
    Path("mean.binaryproto").write_bytes(blob.SerializeToString())
    path = _write(tmp_path, 'net: "tv.prototxt" test_iter: 2 test_interval: 2 base_lr: 0.05 '
                  'lr_policy: "fixed" momentum: 0.9 max_iter: 4 random_seed: 5 '
                  'snapshot_after_train: false', RECIPE)
    seen = []
    with S.get_solver(path) as s:
        orig = s.test

        def test_and_check(i=0):
            res = orig(i)
            w = {k: {b: np.asarray(v, np.float64) for b, v in bl.items()}
                 for k, bl in s.params.items()}
            correct = []
            for _ in range(2 * 3):          # test_iter x batch_size, the cursor going on
                j = len(seen) % 5
                seen.append(j)
                x = cv2.resize(images[j], (8, 8), interpolation=cv2.INTER_LINEAR)
                x = (x.transpose(2, 0, 1).astype(np.float32) - mean)[:, 1:7, 1:7] * 0.02
                y = _np_forward(x.astype(np.float64), w)
                correct.append(int(np.argmax(y)) == labels[j])
            assert res["accuracy"] == pytest.approx(np.mean(correct), abs=1e-6)
            return res

        s.test = test_and_check
        s.solve()
        assert s.iter == 4 and len(seen) == 3 * 6     # tests at iterations 0, 2 and 4


def _np_forward(x, w):
    """conv 3x3 (valid) -> ReLU -> InnerProduct, float64, one CHW image."""
    k, b = w["conv"]["weight"], w["conv"]["bias"]
    out = np.zeros((k.shape[0], x.shape[1] - 2, x.shape[2] - 2))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = np.tensordot(k, x[:, i:i + 3, j:j + 3], 3) + b
    h = np.maximum(out, 0).ravel()
    return w["ip"]["weight"] @ h + w["ip"]["bias"]


@pytest.mark.slow
def test_sliding_window_recipe_runs_under_fcn_jax_train(tmp_path, monkeypatch, capsys):
    """The tutorial's sliding-window fine-tuning as a Caffe recipe: its TEST net's
    SoftmaxWithLoss over the score map (ignore 255, VALID) equals fcn-jax finetune's
    sliding_window_loss on the same cells, its Accuracy the fraction of labelled cells
    predicted right; `fcn-jax train` runs it and snapshots at the end."""
    import h5py

    from fcn_jax import data as D
    from fcn_jax import losses
    from fcn_jax.recipes import write_sliding_window_recipe

    widths = (8, 16, 16, 16, 16, 16, 16)
    ds = D.SyntheticDataset(6, seed=1, size=(300, 300))
    val = D.SyntheticDataset(4, seed=2, size=(300, 300))
    files = write_sliding_window_recipe(tmp_path / "recipe", ds, val, num_classes=4,
                                        widths=widths, input_size=(259, 259), batch_size=2,
                                        train_images=4, max_iter=2, test_interval=2,
                                        display=1)
    monkeypatch.chdir(tmp_path / "recipe")
    with h5py.File(files["val.h5"]) as f:
        vx, vy = f["data"][:], f["label"][:]
    assert vx.shape == (4, 3, 259, 259) and vy.shape == (4, 1, 2, 2)
    assert set(np.unique(vy)) <= {0, 1, 2, 3, 255}
    with S.get_solver("solver.prototxt") as s:
        res = s.test(0)
        blobs = s.test_nets[0].apply({"params": s.test_params(0)},
                                     {"data": vx[:2], "label": vy[:2]})
        b2 = s.test_nets[0].apply({"params": s.test_params(0)},
                                  {"data": vx[2:], "label": vy[2:]})
        score = blobs["fc8-conv"]
        want = np.mean([float(losses.sliding_window_loss(b["fc8-conv"], v[:, 0])[0])
                        for b, v in ((blobs, vy[:2]), (b2, vy[2:]))])
        assert res["loss"] == pytest.approx(want, rel=1e-5)
        pred = np.asarray(score).argmax(1)
        lab = vy[:2, 0]
        keep = lab != 255
        assert float(blobs["accuracy"]) == pytest.approx(
            (pred[keep] == lab[keep]).mean() if keep.any() else 0.0)
    assert cli(["train", "--solver", "solver.prototxt", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Test net output #0: accuracy" in out and "Train net output #0: loss" in out
    assert Path("sliding_window_iter_2.caffemodel").exists()


@pytest.mark.slow
def test_data_parallel_over_two_devices_follows_caffe(solvers_dir):
    """``devices=2`` (two host devices, in a child process): the batch of 8 split 4 + 4,
    params and state replicated; still Caffe's trajectory within 1e-5."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np, jax
        from fcn_jax import solver as S
        assert len(jax.devices()) == 2
        tr = np.load("01_sgd_fixed/trajectory.npz")
        with S.get_solver("01_sgd_fixed/solver.prototxt", devices=2) as s:
            s.copy_from("init.caffemodel")
            worst = 0.0
            for t in range(3):
                loss = s.step(1)[0]
                assert abs(loss - tr["loss"][t]) <= 1e-5 * tr["loss"][t]
                for l, b in s.learnable:
                    ref = tr[f"{l}/{ {'weight': 0, 'bias': 1}[b]}"][t]
                    worst = max(worst, np.abs(np.asarray(s.params[l][b]) - ref).max()
                                / np.abs(ref).max())
            assert len(s.params["conv1"]["weight"].sharding.device_set) == 2
        print("worst", worst)
        assert worst < 1e-5
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "worst" in out.stdout


@pytest.mark.slow
def test_ctrl_c_snapshots_then_stops(solvers_dir):
    """SIGINT during ``fcn-jax train`` (Caffe's default sigint_effect: stop): the iteration
    in flight finishes, a snapshot is written, the run ends with status 0."""
    import signal
    import subprocess
    import sys
    import time

    Path("long.prototxt").write_text(
        (REF / "01_sgd_fixed" / "solver.prototxt").read_text().replace(
            "max_iter: 10", "max_iter: 100000").replace("display: 0", "display: 1")
        + 'snapshot_prefix: "long"\n')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "fcn_jax.cli", "train", "--solver",
                             "long.prototxt", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            if line.startswith("Iteration 3,"):
                break
            assert time.monotonic() < deadline, "no iterations"
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert "Optimization stopped early." in rest
    snaps = sorted(Path().glob("long_iter_*.caffemodel"))
    assert len(snaps) == 1 and 3 <= int(snaps[0].stem.split("_")[-1]) < 100000
    assert Path(snaps[0].with_suffix(".solverstate")).exists()


@pytest.mark.slow
def test_two_processes_follow_caffe(solvers_dir):
    """``fcn-jax train`` as 2 jax.distributed processes x 1 CPU device over 127.0.0.1, batch
    4 each: Caffe's multi-GPU data rule (process r keeps records r, r+2, ...) gives the rows
    one process of batch 8 reads, so the run follows Caffe's batch-8 trajectory within 1e-5;
    process 0 writes the snapshot."""
    import socket
    import subprocess
    import sys

    Path("train.prototxt").write_text(Path("train.prototxt").read_text().replace(
        "batch_size: 8", "batch_size: 4"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "fcn_jax.cli", "train", "--solver", "01_sgd_fixed/solver.prototxt",
         "--weights", "init.caffemodel", "--no-progress", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i), "--init-timeout", "120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-1500:] + outs[1][1][-1500:]
    tr = np.load("01_sgd_fixed/trajectory.npz")
    w = load_caffemodel("01_sgd_fixed/solver_iter_10.caffemodel")
    for layer, blobs in w.items():
        for b, v in blobs.items():
            assert _rel(v, tr[_key(layer, b)][-1]) < 1e-5, (layer, b)
