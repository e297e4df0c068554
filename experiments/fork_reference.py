"""Plain numpy references for the Caffe-fork layer types, written from the forks' ``.cpp``
(loops as there, not from ``fcn_jax.fork_layers``): the truths of ``tests/test_fork_layers.py``
and of the float64 forward in ``experiments/real_model.py``.

Sources: SSD (weiliu89/caffe, branch ssd) ``normalize_layer.cpp``, ``permute_layer.cpp``,
``prior_box_layer.cpp``, ``detection_output_layer.cpp`` + ``util/bbox_util.cpp``; ShuffleNet's
``shuffle_channel_layer.cpp``; DepthwiseConvolution's ``conv_dw_layer.cpp``; the YOLOv3 ports'
nearest ``upsample_layer.cpp``; DeepLab's ``interp_layer.cpp`` + ``util/interp.cpp``.
Everything is float64 except ``detection_output``, which follows Caffe's float32 arithmetic
(its outputs are compared for equality).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def normalize(x, scale, across_spatial, channel_shared, eps):
    """normalize_layer.cpp Forward_cpu, per image."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    n, c = x.shape[:2]
    s = np.asarray(scale, np.float64).reshape(-1)
    for i in range(n):
        sq = x[i] ** 2
        if across_spatial:
            y = x[i] * (1.0 / math.sqrt(sq.sum() + eps))
        else:
            norm = np.sqrt(eps + sq.sum(axis=0))
            y = x[i] / norm[None]
        out[i] = y * (s[0] if channel_shared else s.reshape((c,) + (1,) * (x.ndim - 2)))
    return out


def permute(x, order):
    """permute_layer.cpp: the steps-based index loop."""
    x = np.asarray(x)
    nd = x.ndim
    orders = list(order) + [i for i in range(nd) if i not in order]
    new_shape = [x.shape[o] for o in orders]
    old_steps = [math.prod(x.shape[i + 1:]) for i in range(nd)]
    new_steps = [math.prod(new_shape[i + 1:]) for i in range(nd)]
    flat = x.reshape(-1)
    out = np.empty(flat.size, x.dtype)
    for i in range(flat.size):
        old, idx = 0, i
        for j in range(nd):
            old += (idx // new_steps[j]) * old_steps[orders[j]]
            idx %= new_steps[j]
        out[i] = flat[old]
    return out.reshape(new_shape)


def prior_box(p, layer_hw, image_hw):
    """prior_box_layer.cpp (SSD) for a ``PriorBoxParameter`` ``p``: (1, 2, H*W*A*4)."""
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if all(abs(ar - r) >= 1e-6 for r in ratios):
            ratios.append(ar)
            if p.flip:
                ratios.append(1.0 / ar)
    lh, lw = layer_hw
    if p.HasField("img_h") or p.HasField("img_w"):
        ih, iw = p.img_h, p.img_w
    elif p.HasField("img_size"):
        ih = iw = p.img_size
    else:
        ih, iw = image_hw
    if p.HasField("step_h") or p.HasField("step_w"):
        sh, sw = p.step_h, p.step_w
    elif p.HasField("step"):
        sh = sw = p.step
    else:
        sh, sw = ih / lh, iw / lw
    out = []
    for h in range(lh):
        for w in range(lw):
            cx, cy = (w + p.offset) * sw, (h + p.offset) * sh
            for s, mn in enumerate(p.min_size):
                mn = int(mn)
                boxes = [(mn, mn)]
                if len(p.max_size):
                    side = math.sqrt(mn * int(p.max_size[s]))
                    boxes.append((side, side))
                for ar in ratios:
                    if abs(ar - 1.0) >= 1e-6:
                        boxes.append((mn * math.sqrt(ar), mn / math.sqrt(ar)))
                for bw, bh in boxes:
                    out += [(cx - bw / 2) / iw, (cy - bh / 2) / ih, (cx + bw / 2) / iw,
                            (cy + bh / 2) / ih]
    top = np.asarray(out)
    if p.clip:
        top = np.clip(top, 0.0, 1.0)
    var = list(p.variance) or [0.1]
    variances = np.tile(var if len(var) == 4 else var * 4, top.size // 4)
    return np.stack([top, variances])[None]


# ----------------------------------------------------------------------------- DetectionOutput

F = np.float32


def _size(b):
    if b[2] < b[0] or b[3] < b[1]:
        return F(0)
    return F(F(b[2] - b[0]) * F(b[3] - b[1]))


def _jaccard(a, b):
    """bbox_util.cpp JaccardOverlap (normalized boxes, float)."""
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return F(0)
    iw = F(min(a[2], b[2]) - max(a[0], b[0]))
    ih = F(min(a[3], b[3]) - max(a[1], b[1]))
    if iw > 0 and ih > 0:
        inter = F(iw * ih)
        return F(inter / F(F(_size(a) + _size(b)) - inter))
    return F(0)


def _decode(prior, var, loc, code_type, var_in_target):
    """bbox_util.cpp DecodeBBox for one box (float)."""
    if var_in_target:
        var = [F(1)] * 4
    if code_type == 1:  # CORNER
        return [F(prior[i] + F(var[i] * loc[i])) for i in range(4)]
    pw, ph = F(prior[2] - prior[0]), F(prior[3] - prior[1])
    if code_type == 3:  # CORNER_SIZE
        dims = [pw, ph, pw, ph]
        return [F(prior[i] + F(F(var[i] * loc[i]) * dims[i])) for i in range(4)]
    pcx, pcy = F(F(prior[0] + prior[2]) / F(2)), F(F(prior[1] + prior[3]) / F(2))
    cx = F(F(F(var[0] * loc[0]) * pw) + pcx)
    cy = F(F(F(var[1] * loc[1]) * ph) + pcy)
    w = F(F(np.exp(F(var[2] * loc[2]))) * pw)
    h = F(F(np.exp(F(var[3] * loc[3]))) * ph)
    return [F(cx - F(w / F(2))), F(cy - F(h / F(2))), F(cx + F(w / F(2))), F(cy + F(h / F(2)))]


def _nms_fast(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """bbox_util.cpp ApplyNMSFast."""
    cand = [(s, i) for i, s in enumerate(scores) if s > score_threshold]
    cand.sort(key=lambda t: -t[0])  # Python's sort is stable, as std::stable_sort
    if top_k > -1:
        cand = cand[:top_k]
    kept: list[int] = []
    thr = F(nms_threshold)
    for _, idx in cand:
        keep = all(_jaccard(boxes[idx], boxes[k]) <= thr for k in kept)
        if keep:
            kept.append(idx)
            if eta < 1 and thr > 0.5:
                thr = F(thr * F(eta))
    return kept


def detection_output(loc, conf, prior, p) -> np.ndarray:
    """detection_output_layer.cpp Forward_cpu for a ``DetectionOutputParameter`` ``p``:
    Caffe's variable-size (1, 1, n, 7) blob."""
    num, ncls = loc.shape[0], p.num_classes
    priors = prior.shape[2] // 4
    share = p.share_location
    loc_classes = 1 if share else ncls
    loc = np.asarray(loc, F).reshape(num, priors, loc_classes, 4)
    conf = np.asarray(conf, F).reshape(num, priors, ncls)
    pbox = np.asarray(prior, F)[0, 0].reshape(priors, 4)
    pvar = np.asarray(prior, F)[0, 1].reshape(priors, 4)
    thr = F(p.confidence_threshold) if p.HasField("confidence_threshold") \
        else -np.finfo(F).max
    top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1
    rows = []
    for i in range(num):
        decoded = {}
        for c in range(loc_classes):
            label = -1 if share else c
            if label == p.background_label_id:
                continue
            decoded[label] = [_decode(pbox[j], pvar[j], loc[i, j, c], p.code_type,
                                      p.variance_encoded_in_target) for j in range(priors)]
        indices: dict[int, list[int]] = {}
        num_det = 0
        for c in range(ncls):
            if c == p.background_label_id:
                continue
            scores = conf[i, :, c]
            indices[c] = _nms_fast(decoded[-1 if share else c], scores, thr,
                                   p.nms_param.nms_threshold, p.nms_param.eta, top_k)
            num_det += len(indices[c])
        if -1 < p.keep_top_k < num_det:
            pairs = [(conf[i, j, c], c, j) for c in sorted(indices) for j in indices[c]]
            pairs.sort(key=lambda t: -t[0])
            new: dict[int, list[int]] = {}
            for _, c, j in pairs[:p.keep_top_k]:
                new.setdefault(c, []).append(j)
            indices = new
        for c in sorted(indices):
            for j in indices[c]:
                b = decoded[-1 if share else c][j]
                rows.append([i, c, conf[i, j, c], *b])
    if not rows:
        out = -np.ones((num, 7), F)
        out[:, 0] = np.arange(num)
        return out[None, None]
    return np.asarray(rows, F)[None, None]


# ----------------------------------------------------------------------------- simple forks


def relu6(x):
    return np.minimum(np.maximum(np.asarray(x, np.float64), 0.0), 6.0)


def shuffle_channel(x, group):
    """shuffle_channel_layer.cpp Resize_cpu: input channel i*cols+j -> output j*group+i."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    cols = x.shape[1] // group
    for i in range(group):
        for j in range(cols):
            out[:, j * group + i] = x[:, i * cols + j]
    return out


def depthwise_conv(x, weight, bias, kernel, stride, pad, dilation):
    """conv_dw_layer.cpp Forward_cpu (loops; out channels = in channels)."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    n, c, h, w = x.shape
    kh, kw = kernel
    ho = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (w + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    out = np.zeros((n, c, ho, wo))
    for oh in range(ho):
        for ow in range(wo):
            for i in range(kh):
                for j in range(kw):
                    hi = -pad[0] + oh * stride[0] + i * dilation[0]
                    wi = -pad[1] + ow * stride[1] + j * dilation[1]
                    if 0 <= hi < h and 0 <= wi < w:
                        out[:, :, oh, ow] += weight[:, 0, i, j] * x[:, :, hi, wi]
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return out


def upsample(x, scale):
    """The YOLOv3 ports' nearest Upsample: out[h][w] = in[h / scale][w / scale]."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    out = np.empty((n, c, h * scale, w * scale))
    for i in range(h * scale):
        for j in range(w * scale):
            out[:, :, i, j] = x[:, :, i // scale, j // scale]
    return out


def interp(x, out_hw, pad_beg=0, pad_end=0):
    """interp.cpp caffe_cpu_interp2 (float32 ratios and positions, as there)."""
    x = np.asarray(x, np.float64)
    h1, w1 = x.shape[2] + pad_beg + pad_end, x.shape[3] + pad_beg + pad_end
    y1 = x1 = -pad_beg
    h2, w2 = out_hw
    if (h1, w1) == (h2, w2):
        return x[:, :, y1:y1 + h1, x1:x1 + w1].copy()
    rh = F(F(h1 - 1) / F(h2 - 1)) if h2 > 1 else F(0)
    rw = F(F(w1 - 1) / F(w2 - 1)) if w2 > 1 else F(0)
    out = np.empty(x.shape[:2] + (h2, w2))
    for oh in range(h2):
        hr = F(rh * F(oh))
        hi = int(hr)
        hp = 1 if hi < h1 - 1 else 0
        l1 = float(F(hr - F(hi)))
        for ow in range(w2):
            wr = F(rw * F(ow))
            wi = int(wr)
            wp = 1 if wi < w1 - 1 else 0
            m1 = float(F(wr - F(wi)))
            a = x[:, :, y1 + hi, x1 + wi]
            b = x[:, :, y1 + hi, x1 + wi + wp]
            c = x[:, :, y1 + hi + hp, x1 + wi]
            d = x[:, :, y1 + hi + hp, x1 + wi + wp]
            out[:, :, oh, ow] = (1 - l1) * ((1 - m1) * a + m1 * b) + l1 * ((1 - m1) * c + m1 * d)
    return out


def forward_fork_layer(lp, xs: list[Any], params: dict[str, Any]) -> Any | None:
    """One fork layer's float64 top (DetectionOutput: Caffe's blob), or None for a type
    this module does not cover."""
    t = lp.type
    if t == "Normalize":
        q = lp.norm_param
        return normalize(xs[0], params["blob0"] if "blob0" in params else params["scale"],
                         q.across_spatial, q.channel_shared, q.eps)
    if t == "Permute":
        return permute(np.asarray(xs[0], np.float64), list(lp.permute_param.order))
    if t == "PriorBox":
        return prior_box(lp.prior_box_param, xs[0].shape[2:], xs[1].shape[2:])
    if t == "DetectionOutput":
        return detection_output(xs[0], xs[1], xs[2], lp.detection_output_param)
    return None
