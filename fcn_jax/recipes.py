"""Caffe recipes written from fcn-jax's jobs: the tutorial's sliding-window fine-tuning as a
``train_val.prototxt`` + ``solver.prototxt`` + HDF5 data that ``fcn-jax train`` (or real
``caffe train``) runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import converters
from converters.proto import caffe_pb2

PathLike = str | os.PathLike


def sliding_window_train_val(*, widths: Sequence[int], num_classes: int,
                             batch_size: int = 8, val_batch_size: int | None = None,
                             ignore_label: int = 255, name: str = "sliding_window"):
    """The fully convolutional CaffeNet as a train_val ``NetParameter``: HDF5Data (TRAIN:
    ``train_list.txt``, shuffled; TEST: ``val_list.txt``), the convolutions with MSRA fillers,
    ``SoftmaxWithLoss`` over the score map (``ignore_label``, VALID normalisation: the loss
    of every labelled cell) and, in TEST, ``Accuracy`` over the cells."""
    from .caffenet import caffenet_net

    deploy = caffenet_net(fully_conv=True, widths=widths, num_classes=num_classes,
                          input_shape=(batch_size, 3, 227, 227))
    net = caffe_pb2.NetParameter(name=name)
    for phase, source, batch, shuffle in (
            (0, "train_list.txt", batch_size, True),
            (1, "val_list.txt", val_batch_size or batch_size, False)):
        lp = net.layer.add(name="data", type="HDF5Data", top=["data", "label"])
        lp.include.add().phase = phase
        lp.hdf5_data_param.source = source
        lp.hdf5_data_param.batch_size = batch
        lp.hdf5_data_param.shuffle = shuffle
    score = None
    for lp in deploy.layer:
        if lp.type in ("Input", "Softmax"):
            continue
        new = net.layer.add()
        new.CopyFrom(lp)
        if lp.type == "Convolution":
            p = new.convolution_param
            p.weight_filler.type = "msra"
            p.bias_filler.type, p.bias_filler.value = "constant", 0.0
            new.param.add(lr_mult=1, decay_mult=1)
            new.param.add(lr_mult=2, decay_mult=0)
            score = lp.top[0]
    loss = net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=[score, "label"],
                         top=["loss"])
    loss.loss_param.ignore_label = ignore_label
    loss.loss_param.normalization = caffe_pb2.LossParameter.VALID
    acc = net.layer.add(name="accuracy", type="Accuracy", bottom=[score, "label"],
                        top=["accuracy"])
    acc.accuracy_param.ignore_label = ignore_label
    acc.include.add().phase = 1
    return net


def _write_h5(path: Path, data: np.ndarray, label: np.ndarray) -> None:
    import h5py

    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("data", data=data.astype(np.float32))
        f.create_dataset("label", data=label.astype(np.float32))
    os.replace(tmp, path)


def write_sliding_window_recipe(out: PathLike, train_ds: Sequence[Any], val_ds: Sequence[Any], *,
                                num_classes: int, widths: Sequence[int],
                                input_size: tuple[int, int] = (355, 355), batch_size: int = 8,
                                train_images: int | None = None, max_iter: int = 200,
                                base_lr: float = 1e-3, solver_type: str = "Adam",
                                input_scale: float = 0.017, test_interval: int = 50,
                                display: int = 20, snapshot: int = 0, seed: int = 0
                                ) -> dict[str, Path]:
    """Write the sliding-window fine-tuning job as a Caffe recipe in ``out``:
    ``train_val.prototxt``, ``solver.prototxt``, ``train.h5``/``val.h5`` (images preprocessed
    as ``fcn-jax finetune`` does, times ``input_scale``; ``label`` the (N, 1, h, w) cell labels
    from the boxes by each cell's window, 255 = ignored) and their list files. ``train_ds`` /
    ``val_ds``: ``fcn_jax.data`` datasets (e.g. ``SyntheticDataset``); training images are the
    augmented crops ``finetune`` would draw (``train_images`` of them)."""
    from . import data as D
    from . import train as T
    from .net import build_module, init_params

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    h, w = input_size
    net = sliding_window_train_val(widths=widths, num_classes=num_classes,
                                   batch_size=batch_size)
    deploy = converters.filter_net(net, phase="TEST")
    probe = caffe_pb2.NetParameter()
    probe.CopyFrom(deploy)
    del probe.layer[:]
    inp = probe.layer.add(name="data", type="Input", top=["data"])
    inp.input_param.shape.add(dim=[1, 3, h, w])
    for lp in deploy.layer:
        if lp.type not in ("HDF5Data", "SoftmaxWithLoss", "Accuracy"):
            probe.layer.add().CopyFrom(lp)
    module = build_module(probe)
    params = init_params(module, 0)
    geometry = T.window_geometry(module)
    out_hw = T.output_hw(module, params, (h, w))
    labels_cfg = T.LabelConfig()
    tcfg = D.input_transformer((h, w), input_scale=None if input_scale == 1.0 else input_scale)
    n_train = train_images or batch_size * max(1, max_iter // 4)
    steps = -(-n_train // batch_size)
    xs, ys = [], []
    for step in range(steps):
        images, boxes = D.train_batch(train_ds, step, batch_size=batch_size, cfg=tcfg,
                                      seed=seed)
        xs.append(images)
        ys.append(T.batch_labels(boxes, out_hw, geometry, labels_cfg))
    _write_h5(out / "train.h5", np.concatenate(xs)[:n_train],
              np.concatenate(ys)[:n_train, None])
    vx, vy = [], []
    for start in range(0, len(val_ds), batch_size):
        images, boxes = D.eval_batch(val_ds, start, batch_size, tcfg)
        vx.append(images)
        vy.append(T.batch_labels(boxes, out_hw, geometry, labels_cfg))
    vx_all, vy_all = np.concatenate(vx), np.concatenate(vy)[:, None]
    _write_h5(out / "val.h5", vx_all, vy_all)
    (out / "train_list.txt").write_text("train.h5\n")
    (out / "val_list.txt").write_text("val.h5\n")
    converters.write_prototxt(out / "train_val.prototxt", net)
    test_iter = max(1, len(vx_all) // batch_size)
    solver = (f'net: "train_val.prototxt"\ntype: "{solver_type}"\nbase_lr: {base_lr:g}\n'
              f'lr_policy: "fixed"\nmomentum: 0.9\n'
              + ('momentum2: 0.999\n' if solver_type == "Adam" else "")
              + f'weight_decay: 0.0005\nmax_iter: {max_iter}\ndisplay: {display}\n'
              f'test_iter: {test_iter}\ntest_interval: {test_interval}\n'
              f'snapshot: {snapshot}\nsnapshot_prefix: "sliding_window"\n'
              f'random_seed: {seed}\nsolver_mode: CPU\n')
    (out / "solver.prototxt").write_text(solver)
    return {name: out / name for name in ("train_val.prototxt", "solver.prototxt", "train.h5",
                                          "val.h5", "train_list.txt", "val_list.txt")}


__all__ = ["sliding_window_train_val", "write_sliding_window_recipe"]
