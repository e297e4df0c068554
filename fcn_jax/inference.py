"""Compiled inference: one jitted forward per shape bucket, batching, data-parallel sharding.

``compile_forward(module, params)`` returns a :class:`CompiledForward`: call it with an NCHW
batch and it returns ``{blob: numpy array}`` for the requested blobs, exactly the shapes the
net gives for that batch. Behind it:

* **weights laid out once**: convolution weights are rearranged for the NHWC fast path
  (``fcn_jax.nhwc``) and put on the device(s) once, not on every call;
* **shape buckets**: an image of size ``h x w`` is zero-padded to a bucket shape (each side
  rounded up to a multiple of ``spatial_step``) and the true sizes travel with it as traced
  integers; every layer masks the cells beyond them (zeros before a convolution, the lowest
  float before MAX pooling, Caffe's divisor for AVE pooling), so the cells inside equal the
  unpadded forward and the result is cropped back to the net's output size. Nets with a
  layer that mixes spatial positions globally (``InnerProduct`` on a 4-D blob, ``Flatten``,
  ``Reshape``...) get exact spatial shapes instead;
* **batch buckets, and reuse** (every entry point, by default): a batch runs in the smallest
  shape already compiled that holds it (batch and sides at least its own, at most twice its
  own bucket's volume); otherwise it compiles its own bucket, with its exact batch size the
  first time that spatial bucket is seen and the next power of two after that. So calls with
  batches of 3, 5, 6, 7 compile twice (3, then 8), a constant batch size compiles once, and
  ``stream`` -- which batches consecutive images of any sizes together, padded to the
  largest -- compiles about once per batch size it runs (12 random sizes in batches of 8:
  twice). ``compile_count`` and ``compiled_shapes`` say what compiled;
* **data parallel**: ``devices=`` (or ``mesh=``) shards the batch axis over a
  ``jax.sharding.Mesh`` with ``NamedSharding(mesh, P("batch"))`` and replicates the weights.
  On several hosts, call ``jax.distributed.initialize(coordinator_address, num_processes,
  process_id)`` in every process before anything else touches JAX; ``jax.devices()`` then lists
  the devices of all hosts, each process passes its own slice of the batch (assembled with
  ``jax.make_array_from_process_local_data``) and gets back the rows of its own slice;
* **XLA:CPU kernels**: compiled with ``fcn_jax.xla.compiler_options()`` (convolutions on
  XLA's Eigen kernels, dots on YNNPACK: the choices measured fastest here), per function, so
  nothing else in the process changes; :func:`use_fast_cpu_flags` sets the same choices for
  every ``jax.jit`` of the process (before JAX starts);
* **dtype**: float32 with ``Precision.HIGHEST`` by default (Caffe's numerics, also on GPUs
  where the default would be TF32); ``dtype=jnp.bfloat16`` computes in bfloat16 (for
  accelerators; softmax in float32) and returns float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import nhwc as F
from . import xla
from .layer_table import LayerSpec, given_input_shapes, layer_type, param_shapes
from .net import run_graph

Array = jax.Array

__all__ = [
    "FAST_CPU_XLA_FLAGS",
    "CompiledForward",
    "batch_bucket",
    "compile_forward",
    "data_parallel_mesh",
    "module_layers",
    "prepare_params",
    "spatial_bucket",
    "supports_buckets",
    "use_fast_cpu_flags",
]

def _as_flag(name: str, value: Any) -> str:
    """An ``XLA_FLAGS`` entry for a debug option as ``jax.jit``'s ``compiler_options`` take it
    (enum names lose their ``LIBRARY_FUSION_TYPE_`` prefix, booleans are lower case)."""
    if isinstance(value, bool):
        return f"--{name}={str(value).lower()}"
    return f"--{name}={str(value).removeprefix('LIBRARY_FUSION_TYPE_').lower()}"


#: ``fcn_jax.xla.CPU_OPTIONS`` (the per-function kernel choice) as
#: process-wide ``XLA_FLAGS``, for a plain ``jax.jit``.
FAST_CPU_XLA_FLAGS = tuple(_as_flag(k, v) for k, v in xla.CPU_OPTIONS.items())


def use_fast_cpu_flags() -> bool:
    """Opt in to :data:`FAST_CPU_XLA_FLAGS` by adding them to ``XLA_FLAGS`` (a flag already
    there wins). XLA reads the variable once, when JAX first starts a backend, so call this
    first thing; returns False (and changes nothing) when the backends are already up."""
    import os

    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):  # pragma: no cover - other JAX versions
        pass
    current = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in current}
    extra = [f for f in FAST_CPU_XLA_FLAGS if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(current + extra)
    return True


def module_layers(module: Any) -> tuple[LayerSpec, ...]:
    """The compiled layers of a ``CaffeGraph`` or ``CaffeNet`` (both hold them)."""
    layers = getattr(module, "layers", None)
    if not isinstance(layers, tuple):
        raise TypeError(f"expected a CaffeGraph or CaffeNet, got {type(module).__name__}")
    return layers


def supports_buckets(layers: Sequence[LayerSpec]) -> bool:
    """Whether zero-padding the input to a bucket shape keeps the net's outputs exact:
    every layer's record can run on padded buckets (local in space and maskable: no
    InnerProduct on 4-D blobs, no Flatten, no BatchNorm with batch statistics...)."""
    for s in layers:
        rec = layer_type(s.type, layer=s.name)
        if not rec.is_input and not rec.can_pad(s):
            return False
    return True


def spatial_bucket(size: int, step: int) -> int:
    """``size`` rounded up to a multiple of ``step`` (``step <= 1``: unchanged)."""
    return size if step <= 1 else -(-size // step) * step


def batch_bucket(n: int, multiple: int = 1, max_batch: int | None = None) -> int:
    """The batch size to compile for ``n`` examples: the next power of two (capped at
    ``max_batch`` when given, but never below ``n``), rounded up to a multiple of
    ``multiple`` (the device count when sharding)."""
    b = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    if max_batch is not None:
        b = max(min(b, max_batch), n)
    return -(-b // multiple) * multiple


def data_parallel_mesh(devices: Sequence[Any] | int | None = None) -> Mesh:
    """A 1-D ``Mesh`` named ``"batch"`` over ``devices`` (a list, a count of the first
    ``jax.devices()``, or all of them)."""
    if devices is None:
        devs = jax.devices()
    elif isinstance(devices, int):
        devs = jax.devices()[:devices]
    else:
        devs = list(devices)
    return Mesh(np.array(devs), ("batch",))


def prepare_params(layers: Sequence[LayerSpec], params: Mapping[str, Mapping[str, Any]], *,
                   dtype: Any = jnp.float32) -> dict[str, dict[str, Any]]:
    """``params`` in the layout the fast path runs on, as device arrays of ``dtype``:
    weights of convolutions that ``nhwc.conv_nhwc`` runs as ``lax.conv_general_dilated`` become
    per-group HWIO kernels; dot-formulated layers (1x1, deep kernels, InnerProduct) keep
    Caffe's layout: the dot reads it untransposed, so that each row of a result does not
    depend on the batch size and a sharded run equals one device bit for bit."""
    out: dict[str, dict[str, Any]] = {}
    for s in layers:
        if s.name not in params:
            continue
        blobs = {k: jnp.asarray(v, dtype) for k, v in params[s.name].items()}
        w = blobs.get("weight")
        if s.type == "Convolution" and w is not None and w.ndim == 4:
            o, cg, kh, kw = w.shape
            deep = kh * kw * cg >= F.PATCHES_MIN_DEPTH
            if (kh, kw) != (1, 1) and not deep and s.cfg["group"] <= F.GROUP_SPLIT_MAX:
                blobs["weight"] = F.prepare_conv_weight(w, s.cfg["group"])
        out[s.name] = blobs
    return out


def _param_checker(params: Mapping[str, Mapping[str, Any]]) -> Callable:
    """``check(spec, bottom_shapes)``: raise naming the layer when the (Caffe-shaped)
    ``params`` do not fit what the layer needs for these bottoms."""
    shapes = {layer: {k: tuple(np.shape(v)) for k, v in blobs.items()}
              for layer, blobs in params.items()}

    def check(spec: LayerSpec, bottom_shapes: list) -> None:
        need = param_shapes(spec, bottom_shapes)
        have = shapes.get(spec.name, {})
        for n, (shp, _) in need.items():
            if have.get(n) != tuple(shp):
                raise ValueError(f"{spec.name}: param {n!r} has shape {have.get(n)}, the net "
                                 f"needs {tuple(shp)} for bottoms {bottom_shapes}")

    return check


@dataclasses.dataclass
class _Stats:
    compiles: int = 0
    shapes: list = dataclasses.field(default_factory=list)


class CompiledForward:
    """A compiled inference forward for one net and fixed weights (see the module doc).

    ``fwd(x)`` with ``x`` (N, C, H, W) returns ``{blob: np.ndarray}`` with the net's exact
    output shapes; ``fwd.stream(images)`` runs (C, H, W) images of any sizes in batches and
    yields one ``{blob: array}`` per image, in order. ``compile_count`` counts compilations.
    """

    def __init__(self, module: Any, params: Mapping[str, Mapping[str, Any]], *,
                 outputs: Sequence[str] | None = None, dtype: Any = jnp.float32,
                 spatial_step: int = 32, devices: Sequence[Any] | int | None = None,
                 mesh: Mesh | None = None, buckets: bool = True,
                 compiler_options: Mapping[str, Any] | None = None):
        self.layers = module_layers(module)
        names = list(given_input_shapes(self.layers))
        if len(names) != 1:
            raise ValueError(f"compile_forward needs a net with one input, got {names}")
        self.input_name = names[0]
        last = [s for s in self.layers
                if not layer_type(s.type).is_input and s.tops][-1]
        self.outputs = tuple(outputs) if outputs is not None else (last.tops[-1],)
        self.dtype = jnp.dtype(dtype)
        self.precision = lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
        self.spatial = buckets and spatial_step > 1 and supports_buckets(self.layers)
        self.spatial_step = spatial_step if self.spatial else 1
        if mesh is None and devices is not None:
            mesh = data_parallel_mesh(devices)
        self.mesh = mesh
        self._stats = _Stats()
        self._run_shapes: set[tuple[int, ...]] = set()  # padded shapes run (compiled) so far
        self._forward = _forward(self.layers, self.input_name, self.outputs, self.dtype,
                                 check=_param_checker(params))
        prepared = prepare_params(self.layers, params, dtype=self.dtype)
        if mesh is not None:
            self._rep = NamedSharding(mesh, P())
            self._bat = NamedSharding(mesh, P("batch"))
            prepared = jax.device_put(prepared, self._rep)
            self._fn = xla.jit(self._traced, compiler_options=compiler_options,
                               in_shardings=(self._rep, self._bat, self._bat, self._bat))
        else:
            prepared = jax.device_put(prepared)
            self._fn = xla.jit(self._traced, compiler_options=compiler_options)
        self.params = prepared

    # -- the traced function -------------------------------------------------------------

    def _traced(self, params, x, vh, vw):
        self._stats.compiles += 1
        self._stats.shapes.append(tuple(x.shape))
        valid = (vh, vw) if self.spatial else None
        out, vs = self._forward(params, x, valid)
        sizes = {k: jnp.stack(v, axis=1) for k, v in vs.items() if v is not None}
        return out, sizes

    # -- public --------------------------------------------------------------------------

    @property
    def compile_count(self) -> int:
        """How many times the forward has been traced and compiled."""
        return self._stats.compiles

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """The padded input shapes compiled so far, in order."""
        return list(self._stats.shapes)

    def bucket(self, shape: tuple[int, ...], batch_size: int | None = None
               ) -> tuple[int, ...]:
        """The padded (N, C, H, W) a batch of ``shape`` runs as now (see the module doc):
        an already compiled shape that holds it at most twice over, else its own bucket --
        each side rounded up to a multiple of ``spatial_step`` (nets that allow it), the
        batch exact the first time that spatial bucket is seen, then the next power of two
        (capped at ``batch_size`` for a ``stream``), rounded up to the device count."""
        n, c, h, w = shape
        devs = 1 if self.mesh is None else self.mesh.size
        hb, wb = spatial_bucket(h, self.spatial_step), spatial_bucket(w, self.spatial_step)
        exact = -(-n // devs) * devs
        volume = exact * hb * wb
        fits = [s for s in self._run_shapes if s[1] == c and s[0] >= exact and s[0] % devs == 0
                and (s[2] >= hb and s[3] >= wb if self.spatial else s[2:] == (hb, wb))
                and s[0] * s[2] * s[3] <= 2 * volume]
        if fits:
            return min(fits, key=lambda s: (s[0] * s[2] * s[3], s))
        if not any(s[1:] == (c, hb, wb) for s in self._run_shapes):
            return (exact, c, hb, wb)
        return (batch_bucket(n, devs, batch_size), c, hb, wb)

    def __call__(self, x: Any) -> dict[str, np.ndarray]:
        x = np.asarray(x, np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {x.shape}")
        n, _, h, w = x.shape
        sizes = np.array([[h, w]] * n, np.int32)
        return self._run_padded([x[i] for i in range(n)], sizes, self.bucket(x.shape))

    def stream(self, images: Iterable[Any], batch_size: int = 8,
               progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Run (C, H, W) images of any sizes; yields ``{blob: array}`` (no batch axis) per
        image, in order. Up to ``batch_size`` consecutive images share a batch, padded to
        the largest (nets with exact shapes: consecutive images of the same size)."""
        from tqdm import tqdm

        bar = tqdm(disable=not progress, unit="img")
        group: list[np.ndarray] = []
        key = None
        try:
            for img in images:
                img = np.asarray(img, np.float32)
                k = img.shape[:1] if self.spatial else img.shape  # what a batch must share
                if group and (k != key or len(group) == batch_size):
                    yield from self._flush(group, batch_size)
                    bar.update(len(group))
                    group = []
                key = k
                group.append(img)
            if group:
                yield from self._flush(group, batch_size)
                bar.update(len(group))
        finally:
            bar.close()

    def _flush(self, group: list[np.ndarray], batch_size: int
               ) -> Iterator[dict[str, np.ndarray]]:
        sizes = np.array([im.shape[1:] for im in group], np.int32)
        c = group[0].shape[0]
        shape = self.bucket((len(group), c, int(sizes[:, 0].max()), int(sizes[:, 1].max())),
                            batch_size)
        out = self._run_padded(group, sizes, shape, per_image=True)
        yield from out

    def _run_padded(self, images: Sequence[np.ndarray], sizes: np.ndarray,
                    shape: tuple[int, ...], per_image: bool = False):
        n = len(images)
        if not self.spatial and len({tuple(s) for s in sizes}) > 1:
            raise ValueError("this net needs exact shapes: images in one batch must have "
                             "the same size")
        self._run_shapes.add(tuple(shape))
        xb = np.zeros(shape, np.float32)
        for i, im in enumerate(images):
            xb[i, :, :im.shape[1], :im.shape[2]] = im
        vh = np.zeros(shape[0], np.int32)
        vw = np.zeros(shape[0], np.int32)
        vh[:n], vw[:n] = sizes[:, 0], sizes[:, 1]
        vh[n:], vw[n:] = sizes[0, 0], sizes[0, 1]  # padding rows: any valid size
        if self.mesh is not None:
            args = [jax.make_array_from_process_local_data(self._bat, a) for a in (xb, vh, vw)]
        else:
            args = [xb, vh, vw]
        out, osizes = self._fn(self.params, *args)
        out = {k: _local_numpy(v) for k, v in out.items()}
        osizes = {k: _local_numpy(v) for k, v in osizes.items()}
        if per_image:
            return [{k: _crop(v[i], osizes.get(k), i) for k, v in out.items()} for i in range(n)]
        # one batch of one size: every example has the same output size
        return {k: _crop(v[:n], osizes.get(k), 0) for k, v in out.items()}


def _crop(a: np.ndarray, sizes: np.ndarray | None, i: int) -> np.ndarray:
    """``a`` cut to example ``i``'s valid output size (spatial blobs only)."""
    if sizes is None:
        return a
    h, w = (int(s) for s in sizes[i])
    return a[..., :h, :w]


def _local_numpy(a: Array) -> np.ndarray:
    """A (possibly multi-host) array as numpy: all of it, or this process's rows."""
    if getattr(a, "is_fully_addressable", True):
        return np.asarray(a)
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


def compile_forward(module: Any, params: Mapping[str, Mapping[str, Any]], *,
                    outputs: Sequence[str] | None = None, dtype: Any = jnp.float32,
                    spatial_step: int = 32, devices: Sequence[Any] | int | None = None,
                    mesh: Mesh | None = None, buckets: bool = True,
                    compiler_options: Mapping[str, Any] | None = None) -> CompiledForward:
    """A :class:`CompiledForward` for a ``CaffeGraph`` (``load_caffe``) or ``CaffeNet`` and
    its params (Caffe-shaped tree). ``outputs``: blobs to return (default: the last top).
    ``spatial_step``: bucket sides are multiples of it (1: exact sizes). ``devices``/``mesh``:
    shard the batch over devices. ``buckets=False`` compiles exact spatial shapes.
    ``compiler_options``: XLA options (default ``fcn_jax.xla.compiler_options()``, the fastest
    kernels measured; ``{}``: XLA's defaults, whose results do not depend on the batch size,
    so a sharded run equals one device bit for bit)."""
    return CompiledForward(module, params, outputs=outputs, dtype=dtype,
                           spatial_step=spatial_step, devices=devices, mesh=mesh,
                           buckets=buckets, compiler_options=compiler_options)


def _forward(layers: Sequence[LayerSpec], input_name: str, outputs: Sequence[str] | None,
             dtype: Any, check: Callable | None = None) -> Callable:
    """``f(prepared_params, x, valid) -> ({blob: array}, {blob: valid size})``: the graph
    executor on prepared params, float32 results."""
    precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None

    def f(params, x, valid=None):
        def get(spec, shapes):
            if check is not None:
                check(spec, shapes)
            return params.get(spec.name, {})

        out, vs = run_graph(layers, get, {input_name: jnp.asarray(x).astype(dtype)},
                            outputs=outputs, precision=precision,
                            valid=None if valid is None else {input_name: valid})
        out = {k: v.astype(jnp.float32) if v.dtype != jnp.float32 and jnp.issubdtype(
            v.dtype, jnp.floating) else v for k, v in out.items()}
        return out, vs

    return f


def forward_fn(module: Any, *, outputs: Sequence[str] | None = None,
               dtype: Any = jnp.float32) -> Callable[[Any, Array], dict[str, Array]]:
    """A pure ``f(prepared_params, x) -> {blob: array}`` (NCHW in, NCHW out) to ``jax.jit``
    yourself, for params from :func:`prepare_params`."""
    layers = module_layers(module)
    fwd = _forward(layers, next(iter(given_input_shapes(layers))), outputs, dtype)
    return lambda params, x: fwd(params, x)[0]
