"""Layer types of Caffe forks, one :class:`~fcn_jax.layer_table.LayerType` record each.

Each forward follows its fork's ``.cpp`` (the fork is the spec; parameters as in the fork's
``caffe.proto``, see ``converters/caffe.proto``):

* SSD (weiliu89/caffe, branch ``ssd``): ``Normalize``, ``Permute``, ``PriorBox``,
  ``DetectionOutput`` (``Flatten`` with ``axis``/``end_axis`` is BVLC's, built in);
* ``ReLU6`` (MobileNet-v2 ports, OpenCV): ``min(max(x, 0), 6)``;
* ``ShuffleChannel`` (ShuffleNet): channels ``(group, C/group)`` transposed;
* ``ConvolutionDepthwise`` (DepthwiseConvolution): ``Convolution`` with ``group = C``, one
  output channel per input channel (``num_output`` is ignored, as there);
* ``Upsample`` (YOLOv3 Caffe ports): nearest-neighbour, ``scale`` times in H and W;
* ``Interp`` (DeepLab v2 / PSPNet): align-corners bilinear resize (``interp.cpp``).

``DetectionOutput`` has a data-dependent number of detections in Caffe. Here its top has a
fixed size, jit-compatible: ``(1, 1, N * R, 7)``, ``R`` rows per image (``R = keep_top_k``,
or every NMS candidate when ``keep_top_k`` is -1), each image's detections first in Caffe's
order (label ascending, score descending) and then padding rows of ``-1`` (image id -1,
which Caffe's own ``GetDetectionResults`` skips). An optional second top gives each image's
number of valid rows, shape ``(N,)``. :func:`caffe_detections` turns the padded blob into
Caffe's exact variable-size one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters import CaffeFormatError

from . import layers as L
from . import nhwc as N
from .builtin_layers import (
    add_builtin,
    constant_filler,
    conv_sizes,
    conv_window,
    conv_workspace,
    filler_of,
    need_4d,
    read_kernel_geometry,
    same_valid,
    same_window,
)
from .layer_table import Context, Geo, LayerSpec, Shape, whole
from .nhwc import Blob

Params = Mapping[str, Any]


def _err(spec_or_name: LayerSpec | str, msg: str, field: str) -> CaffeFormatError:
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.name
    return CaffeFormatError(msg, layer=name, field=field)


# ----------------------------------------------------------------------------- Normalize


def _read_norm(lp) -> dict:
    p = lp.norm_param
    filler = filler_of(p.scale_filler) if p.HasField("scale_filler") else constant_filler(1.0)
    return {"across_spatial": bool(p.across_spatial), "channel_shared": bool(p.channel_shared),
            "eps": float(p.eps), "filler": filler}


def _norm_params(spec: LayerSpec, shapes: list[Shape]) -> dict:
    if len(shapes[0]) < 2:
        raise _err(spec, f"needs a bottom with channels, got shape {shapes[0]}", "bottom")
    shape = () if spec.cfg["channel_shared"] else (shapes[0][1],)
    return {"scale": (shape, spec.cfg["filler"])}


def normalize(x: Any, scale: Any, *, across_spatial: bool = True,
              channel_shared: bool = True, eps: float = 1e-10) -> Any:
    """SSD ``Normalize``: ``x / sqrt(sum x^2 + eps)`` over (C, H, W) per image, or over C per
    pixel (``across_spatial=False``), times a learned scale (one, or one per channel)."""
    x = jnp.asarray(x)
    axes = tuple(range(1, x.ndim)) if across_spatial else (1,)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True) + jnp.asarray(eps, x.dtype))
    y = x / norm
    s = jnp.asarray(scale, x.dtype)
    if channel_shared:
        return y * s.reshape(())
    return y * s.reshape((1, -1) + (1,) * (x.ndim - 2))


def _norm(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    c = spec.cfg
    return [normalize(xs[0], p["scale"], across_spatial=c["across_spatial"],
                      channel_shared=c["channel_shared"], eps=c["eps"])]


def _norm_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    c = spec.cfg
    if c["across_spatial"]:
        return None
    x = bl[0].nhwc()
    y = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + jnp.asarray(c["eps"], x.dtype))
    s = jnp.asarray(p["scale"], x.dtype)
    return [Blob(nhwc=y * (s.reshape(()) if c["channel_shared"] else s.reshape(-1)))]


def _norm_window(spec: LayerSpec, geos: list[Geo], shapes: list[Shape]) -> Geo:
    if spec.cfg["across_spatial"] and len(shapes[0]) == 4:
        return whole(geos[0], shapes[0][2:])
    return geos[0]


add_builtin(name="Normalize", read=_read_norm, param_shapes=_norm_params, forward=_norm,
            forward_nhwc=_norm_nhwc, window=_norm_window, valid_sizes=same_valid,
            bucketable=lambda spec: not spec.cfg["across_spatial"])


# ----------------------------------------------------------------------------- Permute


def _read_permute(lp) -> dict:
    order = tuple(int(o) for o in lp.permute_param.order)
    if len(set(order)) != len(order):
        raise _err(lp.name, f"duplicate axes in order {list(order)}", "permute_param.order")
    return {"order": order}


def _permutation(spec: LayerSpec, ndim: int) -> tuple[int, ...]:
    """permute_layer.cpp: the given axes, then the others in their order."""
    order = spec.cfg["order"]
    if any(o >= ndim for o in order):
        raise _err(spec, f"order {list(order)} names an axis of a {ndim}-D bottom",
                   "permute_param.order")
    return order + tuple(i for i in range(ndim) if i not in order)


def _permute_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    return [tuple(x[i] for i in _permutation(spec, len(x)))]


def _permute_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    if _permutation(spec, 4) != (0, 2, 3, 1) or not bl[0].has_nhwc:
        return None
    return [Blob(nchw=bl[0].nhwc())]  # NCHW permuted to (0, 2, 3, 1) is the NHWC array


add_builtin(name="Permute", read=_read_permute, out_shapes=_permute_shapes,
            forward=lambda spec, xs, p, ctx: [jnp.transpose(xs[0], _permutation(spec, xs[0].ndim))],
            forward_nhwc=_permute_nhwc)


# ----------------------------------------------------------------------------- PriorBox


def _read_prior_box(lp) -> dict:
    p = lp.prior_box_param
    name = lp.name
    if not p.min_size:
        raise _err(name, "must provide min_size", "prior_box_param.min_size")
    if any(not m > 0 for m in p.min_size):
        raise _err(name, "min_size must be positive", "prior_box_param.min_size")
    for what in ("min_size", "max_size", "aspect_ratio"):  # Caffe's int() of inf is undefined
        if any(not math.isfinite(v) or v <= 0 for v in getattr(p, what)):
            raise _err(name, f"{what} {list(getattr(p, what))} must be positive and finite",
                       f"prior_box_param.{what}")
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if not any(abs(ar - r) < 1e-6 for r in ratios):
            ratios.append(float(ar))
            if p.flip:
                ratios.append(float(np.float32(1.0 / float(np.float32(ar)))))
    if p.max_size:
        if len(p.max_size) != len(p.min_size):
            raise _err(name, f"{len(p.max_size)} max_size for {len(p.min_size)} min_size",
                       "prior_box_param.max_size")
        if any(mx <= mn for mn, mx in zip(p.min_size, p.max_size, strict=True)):
            raise _err(name, "max_size must be greater than min_size",
                       "prior_box_param.max_size")
    var = list(p.variance)
    if len(var) > 1 and len(var) != 4:
        raise _err(name, f"give 1 or 4 variances, got {len(var)}", "prior_box_param.variance")
    if any(v <= 0 for v in var):
        raise _err(name, "variance must be positive", "prior_box_param.variance")
    img = (0, 0)
    if p.HasField("img_h") or p.HasField("img_w"):
        if p.HasField("img_size"):
            raise _err(name, "give img_size or img_h/img_w, not both", "prior_box_param.img_size")
        img = (int(p.img_h), int(p.img_w))
        if min(img) <= 0:
            raise _err(name, "img_h and img_w must be positive", "prior_box_param.img_h")
    elif p.HasField("img_size"):
        img = (int(p.img_size),) * 2
        if img[0] <= 0:
            raise _err(name, "img_size must be positive", "prior_box_param.img_size")
    step = (0.0, 0.0)
    if p.HasField("step_h") or p.HasField("step_w"):
        if p.HasField("step"):
            raise _err(name, "give step or step_h/step_w, not both", "prior_box_param.step")
        step = (float(p.step_h), float(p.step_w))
        if min(step) <= 0:
            raise _err(name, "step_h and step_w must be positive", "prior_box_param.step_h")
    elif p.HasField("step"):
        step = (float(p.step),) * 2
        if step[0] <= 0:
            raise _err(name, "step must be positive", "prior_box_param.step")
    return {"min_sizes": tuple(float(m) for m in p.min_size),
            "max_sizes": tuple(float(m) for m in p.max_size), "aspect_ratios": tuple(ratios),
            "clip": bool(p.clip), "variance": tuple(float(v) for v in var) or (0.1,),
            "img": img, "step": step, "offset": float(p.offset)}


def _num_priors(c: Mapping[str, Any]) -> int:
    return len(c["aspect_ratios"]) * len(c["min_sizes"]) + len(c["max_sizes"])


def prior_boxes(cfg: Mapping[str, Any], feature_hw: Sequence[int], image_hw: Sequence[int]
                ) -> np.ndarray:
    """SSD ``PriorBox`` top ``(1, 2, H*W*priors*4)`` for a feature map and image size (a
    constant of the shapes, computed once at trace time, in Caffe's float/double mix)."""
    fh, fw = (int(v) for v in feature_hw)
    ih, iw = cfg["img"] if cfg["img"][0] > 0 else (int(v) for v in image_hw)
    f32 = np.float32
    if cfg["step"][0] > 0:
        step_h, step_w = (f32(s) for s in cfg["step"])
    else:
        step_h, step_w = f32(ih) / f32(fh), f32(iw) / f32(fw)
    off = f32(cfg["offset"])
    cy = ((np.arange(fh, dtype=f32) + off) * step_h).astype(np.float64)
    cx = ((np.arange(fw, dtype=f32) + off) * step_w).astype(np.float64)
    sizes: list[tuple[float, float]] = []  # (width, height) of each prior of a cell
    for s, mn in enumerate(cfg["min_sizes"]):
        mn = int(mn)  # prior_box_layer.cpp: int min_size_ = min_sizes_[s]
        sizes.append((float(f32(mn)), float(f32(mn))))
        if cfg["max_sizes"]:
            side = float(f32(math.sqrt(mn * int(cfg["max_sizes"][s]))))
            sizes.append((side, side))
        for ar in cfg["aspect_ratios"]:  # the rest: min_size * sqrt(ar) by min_size / sqrt(ar)
            if abs(ar - 1.0) < 1e-6:
                continue
            r = math.sqrt(f32(ar))
            sizes.append((float(f32(mn * r)), float(f32(mn / r))))
    wh = np.asarray(sizes, np.float64)  # (A, 2)
    gx = cx[None, :, None]
    gy = cy[:, None, None]
    bw, bh = wh[None, None, :, 0], wh[None, None, :, 1]
    boxes = np.stack(np.broadcast_arrays((gx - bw / 2.0) / iw, (gy - bh / 2.0) / ih,
                                         (gx + bw / 2.0) / iw, (gy + bh / 2.0) / ih), -1)
    boxes = boxes.astype(np.float32).reshape(-1)
    if cfg["clip"]:
        boxes = np.clip(boxes, 0.0, 1.0)
    var = np.asarray(cfg["variance"], np.float32)
    variances = np.broadcast_to(var if var.size == 4 else var[:1], (boxes.size // 4, 4))
    return np.stack([boxes, variances.reshape(-1)])[None].astype(np.float32)


def _prior_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    need_4d(spec, x)
    return [(1, 2, x[2] * x[3] * _num_priors(spec.cfg) * 4)]


def _prior(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    if spec.cfg["img"][0] == 0 and (len(xs) < 2 or xs[1].ndim != 4):
        raise _err(spec, "needs the image as a 4-D second bottom (or img_size)", "bottom")
    img = xs[1].shape[2:] if len(xs) > 1 else (0, 0)
    return [jnp.asarray(prior_boxes(spec.cfg, xs[0].shape[2:], img), xs[0].dtype)]


add_builtin(name="PriorBox", read=_read_prior_box, out_shapes=_prior_shapes, forward=_prior,
            bottoms=(1, 2))


# ----------------------------------------------------------------------------- DetectionOutput

_CODE_TYPES = ("CORNER", "CENTER_SIZE", "CORNER_SIZE")


def _read_detection_output(lp) -> dict:
    p = lp.detection_output_param
    name = lp.name
    if not p.HasField("num_classes"):
        raise _err(name, "must specify num_classes", "detection_output_param.num_classes")
    nms = p.nms_param
    if nms.nms_threshold < 0:
        raise _err(name, "nms_threshold must be non negative", "nms_param.nms_threshold")
    if not 0 < nms.eta <= 1:
        raise _err(name, f"eta {nms.eta} is not in (0, 1]", "nms_param.eta")
    if p.share_location and p.background_label_id == -1:
        # bbox_util.cpp DecodeBBoxesAll skips the shared label -1 as background: Caffe stops
        raise _err(name, "share_location with background_label_id -1 has no boxes in SSD's "
                   "DetectionOutput (LOG(FATAL) there)", "detection_output_param."
                   "background_label_id")
    if p.code_type not in (1, 2, 3):
        raise _err(name, f"unknown code_type {p.code_type}", "detection_output_param.code_type")
    return {"num_classes": int(p.num_classes), "share_location": bool(p.share_location),
            "background_label_id": int(p.background_label_id),
            "nms_threshold": float(nms.nms_threshold), "eta": float(nms.eta),
            "top_k": int(nms.top_k) if nms.HasField("top_k") else -1,
            "code_type": _CODE_TYPES[p.code_type - 1],
            "variance_encoded_in_target": bool(p.variance_encoded_in_target),
            "keep_top_k": int(p.keep_top_k),
            "confidence_threshold": float(p.confidence_threshold)
            if p.HasField("confidence_threshold") else -float(np.finfo(np.float32).max)}


def _det_sizes(spec: LayerSpec, shapes: list[Shape]) -> tuple[int, int, int]:
    """(priors, candidates per class K, rows per image R), checking the bottoms' sizes."""
    c = spec.cfg
    num, ncls = shapes[0][0], c["num_classes"]
    if len(shapes[2]) < 3 or shapes[2][1] != 2:
        raise _err(spec, f"bottom[2] must be PriorBox's (1, 2, P*4), got {shapes[2]}", "bottom")
    priors = math.prod(shapes[2][2:]) // 4
    loc_classes = 1 if c["share_location"] else ncls
    if math.prod(shapes[0][1:]) != priors * loc_classes * 4:
        raise _err(spec, f"{math.prod(shapes[0][1:])} location values for {priors} priors "
                   f"x {loc_classes} x 4", "bottom")
    if shapes[1][0] != num or math.prod(shapes[1][1:]) != priors * ncls:
        raise _err(spec, f"confidences {shapes[1]} do not hold {priors} priors x {ncls} "
                   "classes", "bottom")
    k = priors if c["top_k"] < 0 else min(c["top_k"], priors)
    fg = ncls - (1 if 0 <= c["background_label_id"] < ncls else 0)
    rows = fg * k if c["keep_top_k"] < 0 else min(c["keep_top_k"], fg * k)
    return priors, k, max(rows, 1)


def _det_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    _, _, rows = _det_sizes(spec, shapes)
    out = [(1, 1, shapes[0][0] * rows, 7)]
    return out + [(shapes[0][0],)] if len(spec.tops) > 1 else out


def decode_boxes(prior: Any, var: Any, loc: Any, code_type: str,
                 variance_encoded_in_target: bool) -> Any:
    """bbox_util.cpp ``DecodeBBox``: boxes ``(..., 4)`` (xmin, ymin, xmax, ymax) from the
    priors ``(P, 4)``, their variances ``(P, 4)`` and the predicted offsets ``(..., P, 4)``."""
    if variance_encoded_in_target:
        var = jnp.ones_like(var)
    if code_type == "CORNER":
        return prior + var * loc
    pw = prior[..., 2] - prior[..., 0]
    ph = prior[..., 3] - prior[..., 1]
    if code_type == "CORNER_SIZE":
        return prior + var * loc * jnp.stack([pw, ph, pw, ph], -1)
    pcx = (prior[..., 0] + prior[..., 2]) / 2
    pcy = (prior[..., 1] + prior[..., 3]) / 2
    cx = var[..., 0] * loc[..., 0] * pw + pcx
    cy = var[..., 1] * loc[..., 1] * ph + pcy
    w = jnp.exp(var[..., 2] * loc[..., 2]) * pw
    h = jnp.exp(var[..., 3] * loc[..., 3]) * ph
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _box_size(b: Any) -> Any:
    """BBoxSize (normalized): 0 for an inverted box, else width * height."""
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return jnp.where((w < 0) | (h < 0), jnp.zeros_like(w), w * h)


def jaccard(a: Any, b: Any) -> Any:
    """bbox_util.cpp ``JaccardOverlap`` (normalized) of box ``a (4,)`` with boxes ``b (K, 4)``."""
    apart = (b[:, 0] > a[2]) | (b[:, 2] < a[0]) | (b[:, 1] > a[3]) | (b[:, 3] < a[1])
    iw = jnp.minimum(a[2], b[:, 2]) - jnp.maximum(a[0], b[:, 0])
    ih = jnp.minimum(a[3], b[:, 3]) - jnp.maximum(a[1], b[:, 1])
    meet = ~apart & (iw > 0) & (ih > 0)
    inter = iw * ih
    union = _box_size(a) + _box_size(b) - inter
    return jnp.where(meet, inter / jnp.where(meet, union, jnp.ones_like(union)),
                     jnp.zeros_like(inter))


def nms_fast(boxes: Any, scores: Any, *, score_threshold: float, nms_threshold: float,
             eta: float, top_k: int) -> tuple[Any, Any, Any]:
    """bbox_util.cpp ``ApplyNMSFast`` with fixed sizes: the ``K`` best candidates (scores
    above the threshold, stable descending sort, at most ``top_k``) in order, and which of
    them greedy NMS keeps. Returns ``(candidate indices (K,), their scores, kept (K,))``."""
    k = scores.shape[0] if top_k < 0 else min(top_k, scores.shape[0])
    order = jnp.argsort(-scores, stable=True)[:k]
    s = scores[order]
    b = boxes[order]
    valid = s > jnp.asarray(score_threshold, s.dtype)
    thr0 = jnp.asarray(nms_threshold, s.dtype)

    def step(i, carry):
        keep, thr = carry
        suppressed = jnp.any(keep & (jaccard(b[i], b) > thr))
        k_i = valid[i] & ~suppressed
        keep = keep.at[i].set(k_i)
        if eta < 1:
            thr = jnp.where(k_i & (thr > 0.5), thr * jnp.asarray(eta, thr.dtype), thr)
        return keep, thr

    keep, _ = jax.lax.fori_loop(0, k, step, (jnp.zeros((k,), bool), thr0))
    return order, s, keep


def detection_output(loc: Any, conf: Any, prior: Any, cfg: Mapping[str, Any]
                     ) -> tuple[Any, Any]:
    """SSD ``DetectionOutput`` with fixed-size outputs: ``(rows (1, 1, N*R, 7), counts (N,))``
    (see the module doc for the row layout and the padding)."""
    c = cfg
    num, ncls = loc.shape[0], c["num_classes"]
    priors = math.prod(prior.shape[2:]) // 4
    loc_classes = 1 if c["share_location"] else ncls
    loc = loc.reshape(num, priors, loc_classes, 4)
    conf = conf.reshape(num, priors, ncls)
    pbox = prior[0, 0].reshape(priors, 4)
    pvar = prior[0, 1].reshape(priors, 4)
    bg = c["background_label_id"]
    fg = np.delete(np.arange(ncls, dtype=np.int32), [bg] if 0 <= bg < ncls else [])
    labels = jnp.asarray(fg)
    k = priors if c["top_k"] < 0 else min(c["top_k"], priors)
    rows = len(fg) * k if c["keep_top_k"] < 0 else min(c["keep_top_k"], len(fg) * k)
    rows = max(rows, 1)
    dtype = loc.dtype

    def one_image(img, loc_i, conf_i):
        boxes = decode_boxes(pbox, pvar, jnp.moveaxis(loc_i, 1, 0), c["code_type"],
                             c["variance_encoded_in_target"])  # (loc_classes, P, 4)
        # one NMS vmapped over the classes: the graph does not grow with num_classes
        def nms(b, s):
            return nms_fast(b, s, score_threshold=c["confidence_threshold"],
                            nms_threshold=c["nms_threshold"], eta=c["eta"], top_k=c["top_k"])

        scores = jnp.take(conf_i, labels, axis=1).T  # (F, P)
        if c["share_location"]:
            o, s, kp = jax.vmap(nms, in_axes=(None, 0))(boxes[0], scores)
        else:
            o, s, kp = jax.vmap(nms)(jnp.take(boxes, labels, axis=0), scores)
        idx, sc, kept = o.reshape(-1), s.reshape(-1), kp.reshape(-1)
        lab = jnp.repeat(labels, k)
        pos = jnp.tile(jnp.arange(k, dtype=jnp.int32), len(fg))
        # keep_top_k: the best `rows` kept detections over all classes (ties: first found)
        rank = jnp.argsort(-jnp.where(kept, sc, -jnp.inf), stable=True)[:rows]
        ok = kept[rank]
        # Caffe's output order: label ascending, then the NMS order (score descending)
        key = jnp.where(ok, lab[rank] * k + pos[rank], jnp.iinfo(jnp.int32).max)
        sel = rank[jnp.argsort(key, stable=True)]
        ok = kept[sel]
        lb = lab[sel]
        box = boxes[0, idx[sel]] if c["share_location"] else boxes[lb, idx[sel]]
        row = jnp.concatenate([jnp.full((rows, 1), img, dtype), lb[:, None].astype(dtype),
                               sc[sel][:, None].astype(dtype), box.astype(dtype)], -1)
        row = jnp.where(ok[:, None], row, -jnp.ones_like(row))
        return row, jnp.sum(ok).astype(dtype)

    out, count = jax.vmap(one_image)(jnp.arange(num), loc, conf)
    return out.reshape(1, 1, num * rows, 7), count


def _det(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    _det_sizes(spec, [tuple(x.shape) for x in xs])
    out, count = detection_output(xs[0], xs[1], xs[2], spec.cfg)
    return [out, count] if len(spec.tops) > 1 else [out]


add_builtin(name="DetectionOutput", read=_read_detection_output, out_shapes=_det_shapes,
            forward=_det, bottoms=(3, 3), tops=(1, 2))


def caffe_detections(out: Any, num_images: int | None = None) -> np.ndarray:
    """Caffe's variable-size ``DetectionOutput`` blob ``(1, 1, n, 7)`` from the padded one:
    the valid rows in order, or, when no image has any, one ``[i, -1, ..., -1]`` row per
    image (``num_images``, default 1), as detection_output_layer.cpp writes."""
    rows = np.asarray(out).reshape(-1, 7)
    valid = rows[rows[:, 0] >= 0]
    if len(valid):
        return valid[None, None]
    fake = -np.ones((num_images or 1, 7), rows.dtype)
    fake[:, 0] = np.arange(num_images or 1)
    return fake[None, None]


# ----------------------------------------------------------------------------- simple forks


def _relu6(x: Any, c: Mapping[str, Any]) -> Any:
    return jnp.minimum(jnp.maximum(x, 0), jnp.asarray(6, jnp.asarray(x).dtype))


add_builtin(name="ReLU6", forward=lambda spec, xs, p, ctx: [_relu6(xs[0], {})],
            forward_nhwc=lambda spec, bl, p, ctx, vs: [
         Blob(nhwc=_relu6(bl[0].nhwc(), {})) if bl[0].has_nhwc
         else Blob(nchw=_relu6(bl[0].nchw(), {}))],
            window=same_window, valid_sizes=same_valid, fast_any_rank=True)


def _read_shuffle(lp) -> dict:
    g = int(lp.shuffle_channel_param.group)
    if g <= 0:
        raise _err(lp.name, "group must be greater than 0", "shuffle_channel_param.group")
    return {"group": g}


def _shuffle_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    if len(x) < 2 or x[1] % spec.cfg["group"]:
        raise _err(spec, f"channels of {x} not divisible by group {spec.cfg['group']}",
                   "shuffle_channel_param.group")
    return [x]


def shuffle_channel(x: Any, group: int, axis: int = 1) -> Any:
    """ShuffleNet ``ShuffleChannel``: channel ``i * (C/g) + j`` goes to ``j * g + i``."""
    shp = x.shape
    c = shp[axis]
    y = x.reshape(shp[:axis] + (group, c // group) + shp[axis + 1:])
    return jnp.swapaxes(y, axis, axis + 1).reshape(shp)


add_builtin(name="ShuffleChannel", read=_read_shuffle, out_shapes=_shuffle_shapes,
            forward=lambda spec, xs, p, ctx: [shuffle_channel(xs[0], spec.cfg["group"])],
            forward_nhwc=lambda spec, bl, p, ctx, vs: [
         Blob(nhwc=shuffle_channel(bl[0].nhwc(), spec.cfg["group"], axis=3))],
            window=same_window, valid_sizes=same_valid)


def _read_dw(lp) -> dict:
    """conv_dw_layer.cpp reads kernel/stride/pad/dilation like Convolution; num_output and
    group are not read (one output channel per input channel)."""
    p = lp.convolution_param
    return {"bias_term": bool(p.bias_term), **read_kernel_geometry(p, lp.name),
            "weight_filler": filler_of(p.weight_filler), "bias_filler": filler_of(p.bias_filler)}


def _dw_params(spec: LayerSpec, shapes: list[Shape]) -> dict:
    need_4d(spec, shapes[0])
    c, ch = spec.cfg, shapes[0][1]
    out = {"weight": ((ch, 1) + tuple(c["kernel"]), c["weight_filler"])}
    if c["bias_term"]:
        out["bias"] = ((ch,), c["bias_filler"])
    return out


def _dw_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    need_4d(spec, x)
    hw = conv_sizes(spec, x[2:])
    if min(hw) <= 0:
        raise _err(spec, f"output size {hw} is not positive for bottom {x}", "kernel_size")
    return [(x[0], x[1]) + hw]


def _dw(spec: LayerSpec, xs, p: Params, ctx: Context) -> list:
    c = spec.cfg
    return [L.convolution(xs[0], p["weight"], p.get("bias"), stride=c["stride"], pad=c["pad"],
                          dilation=c["dilation"], group=xs[0].shape[1])]


def _dw_nhwc(spec: LayerSpec, bl: list[Blob], p: Params, ctx: Context, vs: list):
    c = spec.cfg
    return [Blob(nhwc=N.conv_nhwc(bl[0].nhwc(), p["weight"], p.get("bias"), stride=c["stride"],
                                  pad=c["pad"], dilation=c["dilation"], group=bl[0].shape[1],
                                  precision=ctx.precision, valid=vs[0]))]


add_builtin(name="ConvolutionDepthwise", read=_read_dw, out_shapes=_dw_shapes,
            param_shapes=_dw_params, forward=_dw, forward_nhwc=_dw_nhwc, window=conv_window,
            workspace=conv_workspace, valid_sizes=lambda spec, vs: [conv_sizes(spec, vs[0])])


def _read_upsample(lp) -> dict:
    s = int(lp.upsample_param.scale)
    if s <= 0:
        raise _err(lp.name, "scale must be positive", "upsample_param.scale")
    return {"scale": s}


def upsample_nearest(x: Any, scale: int, axes: tuple[int, int] = (2, 3)) -> Any:
    """YOLOv3-port ``Upsample``: ``out[.., h, w] = in[.., h // scale, w // scale]``."""
    return jnp.repeat(jnp.repeat(x, scale, axis=axes[0]), scale, axis=axes[1])


def _upsample_shapes(spec: LayerSpec, shapes: list[Shape]) -> list[Shape]:
    x, s = shapes[0], spec.cfg["scale"]
    need_4d(spec, x)
    return [(x[0], x[1], x[2] * s, x[3] * s)]


add_builtin(name="Upsample", read=_read_upsample, out_shapes=_upsample_shapes,
            forward=lambda spec, xs, p, ctx: [upsample_nearest(xs[0], spec.cfg["scale"])],
            forward_nhwc=lambda spec, bl, p, ctx, vs: [
         Blob(nhwc=upsample_nearest(bl[0].nhwc(), spec.cfg["scale"], (1, 2)))])


# ----------------------------------------------------------------------------- Interp


def _read_interp(lp) -> dict:
    p = lp.interp_param
    if p.pad_beg > 0 or p.pad_end > 0:
        raise _err(lp.name, "only non-positive padding (cropping) is supported",
                   "interp_param.pad_beg")
    return {"height": int(p.height) if p.HasField("height") else None,
            "width": int(p.width) if p.HasField("width") else None,
            "zoom": int(p.zoom_factor) if p.HasField("zoom_factor") else None,
            "shrink": int(p.shrink_factor) if p.HasField("shrink_factor") else None,
            "pad_beg": int(p.pad_beg), "pad_end": int(p.pad_end)}


def _interp_out(spec: LayerSpec, shapes: list[Shape]) -> tuple[int, int]:
    """interp_layer.cpp ``Reshape``: the output (H, W)."""
    c = spec.cfg
    need_4d(spec, shapes[0])
    if (c["zoom"] is not None and c["zoom"] < 1) or (c["shrink"] is not None
                                                     and c["shrink"] < 1):
        raise _err(spec, "zoom_factor and shrink_factor must be positive", "interp_param")
    eff = tuple(v + c["pad_beg"] + c["pad_end"] for v in shapes[0][2:])
    given = c["zoom"] is not None or c["shrink"] is not None or c["height"] is not None \
        or c["width"] is not None
    if len(shapes) > 1:
        if given:
            raise _err(spec, "a second bottom and shrink/zoom/height/width are ambiguous",
                       "interp_param")
        out = tuple(shapes[1][2:4])
    elif c["shrink"] is not None and c["zoom"] is None:
        out = tuple((v - 1) // c["shrink"] + 1 for v in eff)
    elif c["zoom"] is not None and c["shrink"] is None:
        out = tuple(v + (v - 1) * (c["zoom"] - 1) for v in eff)
    elif c["height"] is not None and c["width"] is not None:
        out = (c["height"], c["width"])
    elif c["zoom"] is not None and c["shrink"] is not None:
        out = tuple((v - 1) // c["shrink"] + 1 for v in eff)
        out = tuple(v + (v - 1) * (c["zoom"] - 1) for v in out)
    else:
        raise _err(spec, "Interp layer parameters are unspecified", "interp_param")
    if (c["zoom"] is not None and c["zoom"] < 1) or (c["shrink"] is not None
                                                     and c["shrink"] < 1):
        raise _err(spec, "zoom_factor and shrink_factor must be positive", "interp_param")
    if min(eff) <= 0 or min(out) <= 0:
        raise _err(spec, f"sizes {eff} -> {out} must be positive", "interp_param")
    return out


def _interp_axis(n_in: int, n_out: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """interp.cpp along one axis, in its float32 arithmetic: (index, next index, weight of
    the next)."""
    f32 = np.float32
    r = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
    pos = (r * np.arange(n_out, dtype=f32)).astype(f32)
    i0 = pos.astype(np.int64)
    lam = (pos - i0.astype(f32)).astype(f32)
    i1 = i0 + (i0 < n_in - 1)
    return i0 + start, i1 + start, lam


def interp(x: Any, out_hw: Sequence[int], pad_beg: int = 0, pad_end: int = 0) -> Any:
    """DeepLab/PSPNet ``Interp``: align-corners bilinear resize of the (cropped) input."""
    h_eff = x.shape[2] + pad_beg + pad_end
    w_eff = x.shape[3] + pad_beg + pad_end
    if (h_eff, w_eff) == tuple(out_hw):
        return x[:, :, -pad_beg:-pad_beg + h_eff, -pad_beg:-pad_beg + w_eff]
    h0, h1, lh = _interp_axis(h_eff, out_hw[0], -pad_beg)
    w0, w1, lw = _interp_axis(w_eff, out_hw[1], -pad_beg)
    dt = x.dtype
    lh, lw = jnp.asarray(lh, dt)[:, None], jnp.asarray(lw, dt)[None, :]
    rows0, rows1 = x[:, :, h0], x[:, :, h1]
    top = (1 - lw) * rows0[..., w0] + lw * rows0[..., w1]
    bottom = (1 - lw) * rows1[..., w0] + lw * rows1[..., w1]
    return (1 - lh) * top + lh * bottom


add_builtin(name="Interp", read=_read_interp,
            out_shapes=lambda spec, shapes: [tuple(shapes[0][:2]) + _interp_out(spec, shapes)],
            forward=lambda spec, xs, p, ctx: [interp(
         xs[0], _interp_out(spec, [tuple(x.shape) for x in xs]), spec.cfg["pad_beg"],
         spec.cfg["pad_end"])],
            bottoms=(1, 2))


FORK_TYPES = ("Normalize", "Permute", "PriorBox", "DetectionOutput", "ReLU6", "ShuffleChannel",
              "ConvolutionDepthwise", "Upsample", "Interp")
"""The layer types this module adds."""

__all__ = ["FORK_TYPES", "caffe_detections", "decode_boxes", "detection_output", "interp",
           "jaccard", "nms_fast", "normalize", "prior_boxes", "shuffle_channel",
           "upsample_nearest"]
