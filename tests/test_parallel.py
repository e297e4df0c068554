"""Fine-tuning past one device: the data-parallel step on 4 (host) devices against one
device, and an Orbax checkpoint made on 4 devices resumed on 1 (this process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from fcn_jax import train as T

ROOT = Path(__file__).resolve().parents[1]

# The same tiny job for both runs: a narrow fully convolutional CaffeNet (Dropout active),
# Adam, batches of 4 images of 227x259 (1x2 cells), seeded.
_JOB = """
import jax, jax.numpy as jnp, numpy as np
from fcn_jax import CaffeNet
from fcn_jax import train as T

MODULE = CaffeNet(fully_conv=True, widths=(4, 8, 8, 8, 8, 8, 8), num_classes=3)


def params():
    shapes = jax.eval_shape(MODULE.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 3, 227, 227), jnp.float32))["params"]
    rng = np.random.default_rng(0)
    return {k: {"weight": (rng.normal(size=b["weight"].shape) * 0.05).astype(np.float32),
                "bias": np.full(b["bias"].shape, 0.1, np.float32)} for k, b in shapes.items()}


def state():
    p = params()
    tx = T.make_optimizer(T.SolverConfig(type="Adam", base_lr=1e-3), p)
    return T.create_train_state(MODULE, p, tx, seed=7)


def batch(step):
    rng = np.random.default_rng(100 + step)
    label = rng.integers(0, 3, size=(4, 1, 2)).astype(np.int32)
    return {"image": (rng.normal(size=(4, 3, 227, 259)) * 50).astype(np.float32),
            "label": label}
"""

_FOUR_DEVICES = """
import sys
assert len(jax.devices()) == 4, jax.devices()
out = sys.argv[1]
one, losses_one = T.fit(state(), batch, 3, progress=False, mesh=T.make_mesh(1))
mesh = T.make_mesh(4)
two, losses_four = T.fit(state(), batch, 2, progress=False, mesh=mesh)
leaf = two.params["conv1"]["weight"]
assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
with T.TrainCheckpoints(out + "/ck") as ck:
    ck.save(two, {"devices": 4})
three, more = T.fit(two, batch, 1, progress=False, mesh=mesh)
flat = lambda s: {f"{k}/{b}": np.asarray(v) for k, d in s.params.items() for b, v in d.items()}
np.savez(out + "/four.npz", losses_one=losses_one, losses_four=losses_four + more,
         **{"one:" + k: v for k, v in flat(one).items()},
         **{"two:" + k: v for k, v in flat(two).items()},
         **{"four:" + k: v for k, v in flat(three).items()})
print("ok")
"""


@pytest.mark.slow  # run by .ci/run after the default suite
def test_four_devices_match_one_and_resume_on_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_JOB + _FOUR_DEVICES),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
    got = np.load(tmp_path / "four.npz")
    # the same loss curve on 4 devices as on one, within float tolerance (the gradient sum
    # is split across devices, so rounding differs)
    np.testing.assert_allclose(got["losses_four"], got["losses_one"], rtol=1e-4)
    for k in [k for k in got.files if k.startswith("one:")]:
        np.testing.assert_allclose(got["four:" + k[4:]], got[k], rtol=1e-3, atol=1e-5)

    # this process has one device: the 4-device checkpoint restores onto it, bit for bit
    assert len(jax.devices()) == 1
    ns: dict = {}
    exec(textwrap.dedent(_JOB), ns)  # noqa: S102 - the job's own definitions, no I/O
    with T.TrainCheckpoints(tmp_path / "ck", read_only=True) as ck:
        resumed, meta = ck.restore(ns["state"]())
    assert meta == {"devices": 4} and int(resumed.step) == 2
    for layer, blobs in resumed.params.items():
        for b, v in blobs.items():
            assert v.sharding.device_set == {jax.devices()[0]}
            np.testing.assert_array_equal(np.asarray(v), got[f"two:{layer}/{b}"])
    # and continues on one device like the 4-device run did
    final, loss = T.fit(resumed, ns["batch"], 1, progress=False)
    np.testing.assert_allclose(loss, got["losses_four"][2:], rtol=1e-4)
    for layer, blobs in final.params.items():
        for b, v in blobs.items():
            np.testing.assert_allclose(np.asarray(v), got[f"four:{layer}/{b}"], rtol=1e-3,
                                       atol=1e-5)


def test_batch_that_does_not_split_is_a_clear_error():
    mesh = T.make_mesh(1)
    assert T.shard_batch({"x": np.zeros((3, 2))}, mesh)["x"].shape == (3, 2)
    try:
        T.make_mesh(len(jax.devices()) + 1)
    except ValueError as e:
        assert "xla_force_host_platform_device_count" in str(e)
    else:
        raise AssertionError("asked for more devices than there are")
