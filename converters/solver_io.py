"""Caffe's solver files: ``solver.prototxt`` (``SolverParameter``) and ``.solverstate``
(``SolverState``), read and written exactly as Caffe does. No JAX needed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from .caffe_io import _syntax_error, blob_to_array, read_file, resolve_memory_budget
from .errors import CaffeFormatError
from .files import atomic_write_bytes
from .proto import caffe_fast_pb2, caffe_pb2

PathLike = str | os.PathLike

#: ``solver_type`` enum (deprecated) -> ``type`` string, as Caffe's ``UpgradeSolverType``.
SOLVER_TYPE_NAMES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta",
                     5: "Adam"}


def parse_solver(text: str, path: PathLike = "<solver>"):
    """Parse ``solver.prototxt`` text into a ``caffe.SolverParameter``, upgraded as Caffe's
    ``ReadSolverParamsFromTextFileOrDie`` does (the old ``solver_type`` enum becomes
    ``type``; the default ``snapshot_prefix`` is the solver file's path without its
    extension, and a prefix naming a folder gets the file's stem added). An unknown field is
    an error naming it."""
    sp = caffe_pb2.SolverParameter()
    try:
        text_format.Parse(text, sp)
    except text_format.ParseError as e:
        raise _syntax_error(e, path, text) from None
    except RecursionError:
        raise CaffeFormatError("syntax error: braces nested too deeply", path=path,
                               field="syntax") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise CaffeFormatError(f"syntax error: {e}", path=path, field="syntax") from None
    if sp.HasField("solver_type"):
        if sp.HasField("type"):
            raise CaffeFormatError("old solver_type field (enum) and new type field (string) "
                                   "cannot be both specified", path=path, field="solver_type")
        sp.type = SOLVER_TYPE_NAMES[sp.solver_type]
        sp.ClearField("solver_type")
    name = str(path)
    if not name.startswith("<"):
        if not sp.HasField("snapshot_prefix"):
            sp.snapshot_prefix = str(Path(name).with_suffix(""))
        elif os.path.isdir(sp.snapshot_prefix):
            sp.snapshot_prefix = str(Path(sp.snapshot_prefix) / Path(name).stem)
    return sp


def read_solver(path: PathLike, *, memory_budget: int | None = None):
    """Read a ``solver.prototxt`` (see ``parse_solver``)."""
    raw = read_file(path, resolve_memory_budget(memory_budget))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaffeFormatError(f"not a text solver definition (byte {e.start} is not UTF-8)",
                               path=path) from None
    return parse_solver(text, path)


def read_solverstate(path: PathLike, *, memory_budget: int | None = None
                     ) -> tuple[Any, list[np.ndarray]]:
    """A ``.solverstate`` as ``(SolverState message, history arrays)``; the arrays (float32,
    each blob's own shape) in the order Caffe wrote them. HDF5 states (``.h5``) are
    refused in one line."""
    if str(path).endswith(".h5"):
        raise CaffeFormatError("HDF5 solver states are not supported (snapshot_format: "
                               "BINARYPROTO writes .solverstate files)", path=path)
    budget = resolve_memory_budget(memory_budget)
    raw = bytes(read_file(path, budget))
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(raw)
    except (pb_message.DecodeError, RuntimeError, ValueError, RecursionError) as e:
        raise CaffeFormatError(f"not a valid solverstate (truncated or corrupt: "
                               f"{str(e) or type(e).__name__})", path=path) from None
    if not state.HasField("iter"):
        raise CaffeFormatError("not a solverstate: no iter field", path=path, field="iter")
    if state.iter < 0:
        raise CaffeFormatError(f"iter {state.iter} is negative", path=path, field="iter")
    history = []
    total = 0
    for i, blob in enumerate(state.history):
        arr = blob_to_array(blob, path=path, layer="history", field=f"history[{i}]",
                            memory_budget=budget - total)
        total += arr.nbytes
        history.append(np.asarray(arr, np.float32))
    return state, history


def solverstate_bytes(iter_: int, learned_net: str, current_step: int,
                      history: Sequence[Any]) -> bytes:
    """The bytes of a ``SolverState`` as Caffe's ``SnapshotSolverStateToBinaryProto``
    writes it: ``iter``, ``learned_net``, ``current_step``, then each history blob with its
    ``shape`` and float ``data`` (no diff)."""
    state = caffe_fast_pb2.SolverState()
    state.iter = int(iter_)
    state.learned_net = str(learned_net)
    state.current_step = int(current_step)
    for h in history:
        arr = np.asarray(h, np.float32)
        blob = state.history.add()
        blob.shape.dim.extend(int(d) for d in arr.shape)
        blob.data = arr.astype("<f4").tobytes()
    return state.SerializeToString()


def write_solverstate(path: PathLike, iter_: int, learned_net: str, current_step: int,
                      history: Sequence[Any]) -> None:
    """Write a ``.solverstate`` that Caffe restores (see ``solverstate_bytes``), atomically."""
    atomic_write_bytes(path, solverstate_bytes(iter_, learned_net, current_step, history))


__all__ = ["SOLVER_TYPE_NAMES", "parse_solver", "read_solver", "read_solverstate",
           "solverstate_bytes", "write_solverstate"]
