"""CaffeNet in PyTorch (CPU or CUDA), the peer for ``experiments/bench_dense.py``.

Same semantics as Caffe and ``fcn_jax.CaffeNet``: ceil-mode max pooling, Caffe's LRN
(``torch.nn.functional.local_response_norm`` divides ``alpha`` by ``size`` like Caffe),
grouped convolutions, ``fc6`` flattening pool5 in (C, H, W) order; the fully convolutional form
runs fc6/fc7/fc8 as 6x6/1x1/1x1 convolutions. Weights come from a fcn-jax params tree (Caffe
shapes). torch is a benchmark-only extra (``pip install fcn-jax[bench]``), never imported by
the package.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

#: (kernel, stride, pad, group) of conv1..conv5, as in fcn_jax.caffenet.CONV_SPECS.
CONV_SPECS = ((11, 4, 0, 1), (5, 1, 2, 2), (3, 1, 1, 1), (3, 1, 1, 2), (3, 1, 1, 2))


class TorchCaffeNet(torch.nn.Module):
    """CaffeNet with the weights of ``params`` (``params[layer]["weight"|"bias"]`` in Caffe's
    shapes); ``forward(x)`` returns ``prob`` ((N, 1000) or (N, 1000, H', W'))."""

    def __init__(self, params: Mapping[str, Mapping[str, np.ndarray]], fully_conv: bool,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fully_conv = fully_conv

        def t(a):
            return torch.nn.Parameter(torch.as_tensor(np.asarray(a, np.float32)).to(
                device=device, dtype=dtype), requires_grad=False)

        self.w = torch.nn.ParameterDict()
        for layer, blobs in params.items():
            for name, arr in blobs.items():
                self.w[f"{layer.replace('-', '_')}__{name}"] = t(arr)

    def _p(self, layer: str, name: str) -> torch.Tensor:
        return self.w[f"{layer.replace('-', '_')}__{name}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (_, s, pad, g) in enumerate(CONV_SPECS):
            n = f"conv{i + 1}"
            h = F.relu(F.conv2d(h, self._p(n, "weight"), self._p(n, "bias"), stride=s,
                                padding=pad, groups=g))
            if i in (0, 1, 4):
                h = F.max_pool2d(h, 3, 2, ceil_mode=True)
            if i in (0, 1):
                h = F.local_response_norm(h, 5, alpha=1e-4, beta=0.75, k=1.0)
        if self.fully_conv:
            for j, n in enumerate(("fc6-conv", "fc7-conv", "fc8-conv")):
                h = F.conv2d(h, self._p(n, "weight"), self._p(n, "bias"))
                if j < 2:
                    h = F.relu(h)
        else:
            h = h.flatten(1)
            for j, n in enumerate(("fc6", "fc7", "fc8")):
                h = F.linear(h, self._p(n, "weight"), self._p(n, "bias"))
                if j < 2:
                    h = F.relu(h)
        return F.softmax(h, dim=1)


def torch_forward(model: TorchCaffeNet, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``prob`` for the NCHW float32 batch ``x`` as numpy (inference mode, synchronised)."""
    with torch.inference_mode():
        y = model(torch.as_tensor(x).to(device=device, dtype=next(model.parameters()).dtype))
        if device != "cpu":
            torch.cuda.synchronize()
        return y.float().cpu().numpy()
