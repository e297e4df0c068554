"""No data lost on write: a writer killed mid-save (SIGKILL, or an exception) leaves the old
file intact and never a partial file at the target path."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

import converters
from converters.files import atomic_write, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
LAYERS = DATA / "layers"


def _child(code: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, word: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read()}")
    raise AssertionError(f"child never said {word!r}")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# A child that stops inside the save, after the new bytes went to the temp file and before
# the rename: `os.fsync` (called exactly there) announces itself and sleeps until killed.
_BLOCK_IN_FSYNC = """
    import os, sys, time
    def blocked_fsync(fd):
        print("in-fsync", flush=True)
        time.sleep(600)
    os.fsync = blocked_fsync
"""

# A child whose file write stops half-way: half the bytes reach the temp file, then it sleeps.
_BLOCK_HALF_WRITTEN = """
    import io, os, sys, time
    real_fdopen = os.fdopen
    class HalfWriter:
        def __init__(self, f): self.f = f
        def write(self, data):
            data = memoryview(data).cast("B")
            self.f.write(data[: len(data) // 2]); self.f.flush()
            print("half-written", flush=True)
            time.sleep(600)
        def __getattr__(self, name): return getattr(self.f, name)
        def __enter__(self): return self
        def __exit__(self, *a): return self.f.__exit__(*a)
    os.fdopen = lambda *a, **k: HalfWriter(real_fdopen(*a, **k))
"""


@pytest.mark.parametrize("block, word", [(_BLOCK_IN_FSYNC, "in-fsync"),
                                         (_BLOCK_HALF_WRITTEN, "half-written")])
def test_caffemodel_save_killed_keeps_old_file(tmp_path, block, word):
    target = tmp_path / "model.caffemodel"
    old = (LAYERS / "conv_rect.caffemodel").read_bytes()
    target.write_bytes(old)
    proc = _child(block + f"""
    import numpy as np, converters
    net = converters.read_prototxt({str(LAYERS / 'conv_rect.prototxt')!r})
    params = {{"c": {{"weight": np.ones((5, 3, 5, 3), np.float32),
                     "bias": np.ones(5, np.float32)}}}}
    converters.save_caffemodel({str(target)!r}, params, net)
    """)
    _wait_for(proc, word)
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".model.caffemodel.")]
    assert len(hidden) == 1 and hidden[0].stat().st_size > 0  # the write was under way
    _kill(proc)
    assert target.read_bytes() == old
    assert _visible(tmp_path) == ["model.caffemodel"]
    converters.load_caffe(LAYERS / "conv_rect.prototxt", target)  # still loads


def test_safetensors_save_killed_keeps_old_file(tmp_path):
    target = tmp_path / "w.safetensors"
    converters.save_safetensors(target, {"c": {"w": np.zeros(4, np.float32)}})
    old = target.read_bytes()
    proc = _child(_BLOCK_HALF_WRITTEN + f"""
    import numpy as np, converters
    converters.save_safetensors({str(target)!r}, {{"c": {{"w": np.ones(100000, np.float32)}}}})
    """)
    _wait_for(proc, "half-written")
    _kill(proc)
    assert target.read_bytes() == old
    assert not converters.load_safetensors(target)["c"]["w"].any()
    assert _visible(tmp_path) == ["w.safetensors"]


def test_saves_killed_at_random_moments_leave_old_or_new_file(tmp_path):
    """No injection: a child saves a 64 MB caffemodel over and over, alternating two
    contents; killed at random moments, the file is always exactly one of the two."""
    target = tmp_path / "big.caffemodel"
    net = converters.parse_prototxt(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4096'
        ' } } }\nlayer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
        'inner_product_param { num_output: 4096 } }')
    versions = {}
    for v in (1, 2):
        params = {"fc": {"weight": np.full((4096, 4096), v, np.float32),
                         "bias": np.full(4096, v, np.float32)}}
        versions[hashlib.sha256(converters.build_caffemodel(params, net)).hexdigest()] = v
    converters.save_caffemodel(target, {"fc": {"weight": np.full((4096, 4096), 1, np.float32),
                                               "bias": np.full(4096, 1, np.float32)}}, net)
    code = f"""
    import numpy as np, converters
    net = converters.read_prototxt({str(tmp_path / 'net.prototxt')!r})
    models = [{{"fc": {{"weight": np.full((4096, 4096), v, np.float32),
                       "bias": np.full(4096, v, np.float32)}}}} for v in (1, 2)]
    print("ready", flush=True)
    i = 1
    while True:
        converters.save_caffemodel({str(target)!r}, models[i % 2], net)
        i += 1
    """
    converters.write_prototxt(tmp_path / "net.prototxt", net)
    rng = random.Random(5)
    for _ in range(3):
        proc = _child(code)
        _wait_for(proc, "ready")
        time.sleep(rng.uniform(0.05, 1.0))
        _kill(proc)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        assert digest in versions
        assert _visible(tmp_path) == ["big.caffemodel", "net.prototxt"]
    for stale in tmp_path.glob(".*.tmp"):  # what SIGKILL can leave: hidden, never the target
        stale.unlink()


def test_exception_mid_write_removes_temp_and_keeps_old(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_keeps_permissions(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"new")
    default = 0o666 & ~_umask()
    assert target.stat().st_mode & 0o777 == default   # not mkstemp's 0600
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"newer")
    assert target.stat().st_mode & 0o777 == 0o640 and target.read_bytes() == b"newer"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_writer_fails_cleanly(tmp_path, monkeypatch):
    """caffemodel, prototxt, safetensors, npz, JSON and figures: a failure while writing (here:
    the disk fills up at fsync) leaves the old file and no temp file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fcn_jax import io_utils

    net = converters.read_prototxt(LAYERS / "conv_rect.prototxt")
    params = converters.load_caffemodel(LAYERS / "conv_rect.caffemodel")
    fig = plt.figure()
    writers = {
        "m.caffemodel": lambda p: converters.save_caffemodel(p, params, net),
        "n.prototxt": lambda p: converters.write_prototxt(p, net),
        "w.safetensors": lambda p: converters.save_safetensors(p, params, net),
        "a.npz": lambda p: io_utils.atomic_save_npz(p, {"x": np.ones(3)}),
        "a.json": lambda p: io_utils.atomic_save_json(p, {"x": 1}),
        "a.png": lambda p: io_utils.atomic_savefig(fig, p),
    }

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    for name, write in writers.items():
        target = tmp_path / name
        target.write_bytes(b"old")
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", disk_full)
            with pytest.raises(OSError, match="No space left"):
                write(target)
        assert target.read_bytes() == b"old", name
        write(target)  # and without the failure it writes
        assert target.read_bytes() != b"old", name
    plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)


def test_orbax_training_checkpoints_killed_mid_save_keep_a_complete_step(tmp_path):
    """A child saves training checkpoints of a 16 MB state over and over (step s holds the
    value s everywhere); killed at random moments, the latest step left is complete."""
    from fcn_jax import train as T

    def code(folder):
        return f"""
    import jax.numpy as jnp, optax
    from fcn_jax import train as T
    from flax import linen as nn
    params = {{"fc": {{"weight": jnp.zeros((2048, 2048)), "bias": jnp.zeros(2048)}}}}
    state = T.create_train_state(nn.Dense(1), params, optax.sgd(0.1), score="x")
    with T.TrainCheckpoints({str(folder)!r}, keep=2, async_save=False) as ck:
        for s in range(1, 1000):
            p = {{"fc": {{k: v + s for k, v in params["fc"].items()}}}}
            ck.save(state.replace(step=jnp.int32(s), params=p))
            print("saved", s, flush=True)
    """

    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    template = T.create_train_state(
        nn.Dense(1), {"fc": {"weight": jnp.zeros((2048, 2048)), "bias": jnp.zeros(2048)}},
        optax.sgd(0.1), score="x")
    rng = random.Random(0)
    for i in range(2):
        folder = tmp_path / f"ck{i}"
        proc = _child(code(folder))
        _wait_for(proc, "saved 1")
        time.sleep(0.0 if i == 0 else rng.uniform(0.0, 1.0))  # 0: right after a save
        _kill(proc)
        state, _ = T.restore_train_state(folder, template)
        s = int(state.step)
        assert s >= 1
        assert np.all(np.asarray(state.params["fc"]["weight"]) == s)
        assert np.all(np.asarray(state.params["fc"]["bias"]) == s)
