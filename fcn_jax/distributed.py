"""Several processes (``jax.distributed``): one process per host, one global mesh.

The commands that scale past one machine (``fcn-jax predict``, ``finetune``, ``train``) take
``--coordinator HOST:PORT --num-processes N --process-id I`` (:func:`add_arguments`) and call
:func:`initialize` first, before any JAX computation. Without the flags, JAX's own cluster
detection (SLURM, Open MPI, Kubernetes, Cloud TPU) applies where its environment is present,
else the command runs as one process. On CPU the collectives go over gloo (TCP).

Every process then runs the same program on its own share of the data:

- :func:`process_share` - the contiguous share of a sorted list (predict's images);
- :func:`global_batch` - a global ``jax.Array`` over a mesh of every process's devices from
  each process's rows (:func:`local_rows` says which rows of the global batch are whose);
- :func:`barrier` - wait for every process, bounded in time;
- :func:`all_equal` - check that every process holds the same value (same arguments).

A process that never joins makes the others stop with one line (:class:`DistributedError`)
after ``init_timeout``. Once started, a watchdog thread in each process watches the others
through the coordinator: one that dies, hangs or exits early (before :func:`finish`) ends the
others with one line and exit status 3 within ``heartbeat_timeout`` seconds; a barrier names
the processes that died.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: Seconds to wait for every process to join at start (``--init-timeout``).
INIT_TIMEOUT = 120
#: Seconds without a heartbeat after which a process counts as dead.
HEARTBEAT_TIMEOUT = 30

__all__ = ["DistributedError", "HEARTBEAT_TIMEOUT", "INIT_TIMEOUT", "PEER_FAILURE_EXIT",
           "ProcessConfig", "add_arguments", "all_equal", "barrier", "config_from_args",
           "exit_now", "finish", "global_batch", "global_mesh", "initialize", "is_main",
           "local_copy", "local_rows", "peer_failure", "process_count", "process_index",
           "process_share", "replicate", "share_bounds"]


class DistributedError(RuntimeError):
    """Several processes could not start or work together (printed as one line)."""


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """Where this process stands among several: the coordinator's ``HOST:PORT`` (process 0
    listens there), the number of processes and this one's id; all None: JAX's cluster
    detection, else one process. ``init_timeout``: seconds to wait for every process."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int = INIT_TIMEOUT
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT

    def __post_init__(self) -> None:
        given = [self.coordinator is not None, self.num_processes is not None,
                 self.process_id is not None]
        if any(given) and not all(given):
            raise DistributedError("--coordinator, --num-processes and --process-id go "
                                   "together (every process gets all three)")
        if self.coordinator is not None:
            if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):\d{1,5}", self.coordinator) \
                    or not 0 < int(self.coordinator.rsplit(":", 1)[1]) < 65536:
                raise DistributedError(f"--coordinator {self.coordinator!r}: expected HOST:PORT "
                                       "(e.g. 10.0.0.1:12345)")
            if self.num_processes < 1:
                raise DistributedError(f"--num-processes must be >= 1, got "
                                       f"{self.num_processes}")
            if not 0 <= self.process_id < self.num_processes:
                raise DistributedError(f"--process-id must be in 0..{self.num_processes - 1}, "
                                       f"got {self.process_id}")
        if self.init_timeout < 1 or self.heartbeat_timeout < 1:
            raise DistributedError("--init-timeout and --heartbeat-timeout must be >= 1 "
                                   "second")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--coordinator``, ``--num-processes``, ``--process-id`` and ``--init-timeout``."""
    g = parser.add_argument_group(
        "several processes (jax.distributed; one per host, all with the same arguments)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, which listens on PORT (every process gives "
                   "the same); default: JAX's cluster detection (SLURM, Open MPI, "
                   "Kubernetes), else one process")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    g.add_argument("--init-timeout", type=int, default=INIT_TIMEOUT, metavar="S",
                   help="seconds to wait for every process to join (default %(default)s)")
    g.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT, metavar="S",
                   help="seconds without news from a process before the others count it "
                   "dead and stop with an error (default %(default)s)")


def config_from_args(args: argparse.Namespace | Mapping[str, Any]) -> ProcessConfig:
    """The :class:`ProcessConfig` of parsed arguments (or a mapping of the same names)."""
    get = args.get if isinstance(args, Mapping) else lambda k, d=None: getattr(args, k, d)
    return ProcessConfig(coordinator=get("coordinator"), num_processes=get("num_processes"),
                         process_id=get("process_id"),
                         init_timeout=int(get("init_timeout", INIT_TIMEOUT) or INIT_TIMEOUT),
                         heartbeat_timeout=int(get("heartbeat_timeout", HEARTBEAT_TIMEOUT)
                                               or HEARTBEAT_TIMEOUT))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:400]


def initialize(config: ProcessConfig | argparse.Namespace | Mapping[str, Any] | None = None
               ) -> tuple[int, int]:
    """Join the other processes (``jax.distributed.initialize``) and return ``(process_id,
    num_processes)``; ``(0, 1)`` when running alone. Call it before any JAX computation.

    With no coordinator, JAX's cluster detection decides; a machine outside any cluster runs
    one process. Idempotent: a second call returns the standing. Raises
    :class:`DistributedError` (one line) when the flags are inconsistent, a process never
    joins within ``init_timeout`` seconds, or JAX already ran a computation."""
    import jax
    from jax._src import distributed as _dist

    if config is None:
        config = ProcessConfig()
    elif not isinstance(config, ProcessConfig):
        config = config_from_args(config)
    if _dist.global_state.client is not None:  # already joined
        return jax.process_index(), jax.process_count()
    if config.coordinator is None:
        if not _cluster_detected():
            return 0, 1
        kwargs: dict[str, Any] = {}
    else:
        if config.num_processes == 1:
            return 0, 1
        kwargs = {"coordinator_address": config.coordinator,
                  "num_processes": config.num_processes, "process_id": config.process_id}
    # CPU collectives across processes (the CPU backend's default has none); no effect on
    # accelerators, whose own collectives are used
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # a process that dies is reported to the others (barrier, collective) instead of the
    # runtime aborting them all with a C++ stack trace
    jax.config.update("jax_enable_recoverability", True)
    try:
        with _raise_on_failed_connect():
            jax.distributed.initialize(**kwargs, initialization_timeout=config.init_timeout,
                                       heartbeat_timeout_seconds=config.heartbeat_timeout,
                                       shutdown_timeout_seconds=config.heartbeat_timeout)
    except RuntimeError as e:
        msg = _one_line(e)
        _reset()
        if "before" in msg and "computation" in msg:
            raise DistributedError("jax.distributed must start before any JAX computation "
                                   "(call fcn_jax.distributed.initialize first)") from None
        who = (f"process {config.process_id} of {config.num_processes} at "
               f"{config.coordinator}" if config.coordinator else "cluster detection")
        raise DistributedError(f"{who}: the processes did not all join within "
                               f"{config.init_timeout} s ({msg})") from None
    except ValueError as e:
        _reset()
        raise DistributedError(f"jax.distributed: {_one_line(e)}") from None
    if jax.process_count() > 1:
        _Watchdog(jax.process_index(), jax.process_count(), config.heartbeat_timeout).start()
    return jax.process_index(), jax.process_count()


#: Exit status of a process stopped because another one died, hung or vanished.
PEER_FAILURE_EXIT = 3
_KEY = "fcn_jax/watchdog"


class _Watchdog(threading.Thread):
    """Each process bumps its counter in the coordinator's key-value store every second and
    watches the others'; one whose counter stands still for ``timeout`` seconds (died, hung,
    or exited before :func:`finish`), or a coordinator that cannot be reached, ends this
    process with one line and exit status :data:`PEER_FAILURE_EXIT`: a dead peer would
    otherwise leave it waiting in a collective or a checkpoint barrier."""

    running: _Watchdog | None = None

    def __init__(self, process_id: int, num_processes: int, timeout: float):
        super().__init__(name="fcn_jax-watchdog", daemon=True)
        self.pid, self.n, self.timeout = process_id, num_processes, float(timeout)
        self.interval = max(0.2, min(1.0, self.timeout / 4))
        self.stopped = threading.Event()
        _Watchdog.running = self

    def run(self) -> None:
        import time

        from jax._src import distributed as _dist

        client = _dist.global_state.client
        seen = {j: ("", time.monotonic()) for j in range(self.n) if j != self.pid}
        while not self.stopped.wait(self.interval):
            try:
                client.key_value_increment(f"{_KEY}/alive/{self.pid}", 1)
                now = time.monotonic()
                for j in list(seen):
                    if client.key_value_increment(f"{_KEY}/done/{j}", 0):
                        del seen[j]  # finished its work: silence is fine
                        continue
                    count = str(client.key_value_increment(f"{_KEY}/alive/{j}", 0))
                    if count != seen[j][0]:
                        seen[j] = (count, now)
            except Exception as e:  # noqa: BLE001 - the coordinator is gone
                if self.stopped.is_set():
                    return
                self._stop_process(f"lost the coordinator, process 0 ({_one_line(e)[:160]})")
            stale = [j for j, (_, t) in seen.items() if now - t > self.timeout]
            if stale and not self.stopped.is_set():
                self._stop_process(f"process(es) {stale} of {self.n} stopped answering for "
                                   f"{self.timeout:g} s (died, hung or exited)")

    def _stop_process(self, why: str) -> None:
        sys.stderr.write(f"fcn-jax: error: process {self.pid}: {why}; stopping (what was "
                         "written so far is kept: rerun every process, with --resume to "
                         "continue)\n")
        sys.stderr.flush()
        os._exit(PEER_FAILURE_EXIT)


def exit_now(status: int) -> None:
    """With several processes started: flush the output and end this process at once with
    ``status`` (after a peer failed, the runtime would otherwise abort it during a normal
    exit). Alone, or before :func:`initialize`: returns."""
    from jax._src import distributed as _dist

    if _dist.global_state.client is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def finish() -> None:
    """This process's work is done: tell the others (its silence is no longer an error),
    wait for the live ones to finish theirs, and stop watching. Every process calls it at
    the end of a successful command; alone it does nothing."""
    import jax
    from jax._src import distributed as _dist

    dog = _Watchdog.running
    if jax.process_count() == 1 or dog is None:
        return
    client = _dist.global_state.client
    with contextlib.suppress(Exception):
        client.key_value_increment(f"{_KEY}/done/{jax.process_index()}", 1)
    with contextlib.suppress(DistributedError):
        barrier("finish")  # then nobody still needs the coordinator (process 0)
    dog.stopped.set()


@contextlib.contextmanager
def _raise_on_failed_connect() -> Iterator[None]:
    """Make a failed start (a process that never joins) an exception of ``initialize``,
    where the runtime's default is to abort with a C++ stack trace: the client gets a
    ``missed_heartbeat_callback`` (``jax.distributed.initialize`` passes none), whose call
    while connecting fails inside the connect call and so raises there."""
    from jax._src import distributed as _dist

    runtime = _dist._jax
    real = runtime.get_distributed_runtime_client

    def failed(*_: Any) -> None:
        raise DistributedError("a process never joined")

    def client(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("missed_heartbeat_callback", failed)
        return real(*args, **kwargs)

    runtime.get_distributed_runtime_client = client
    try:
        yield
    finally:
        runtime.get_distributed_runtime_client = real


def _reset() -> None:
    """Forget a failed start, so the process can go on alone or exit cleanly."""
    from jax._src import distributed as _dist

    try:
        _dist.global_state.shutdown()
    except Exception:  # noqa: BLE001 - a half-started client may refuse to shut down
        _dist.global_state.client = None
        _dist.global_state.service = None


def _cluster_detected() -> bool:
    """Whether this process is one of several in a job that JAX's cluster detection knows
    (the environment JAX reads, with more than one process): SLURM, Open MPI, a Kubernetes
    indexed job, a multi-host Cloud TPU, or ``JAX_COORDINATOR_ADDRESS`` set by hand. A
    single-process job of any kind runs alone, without a coordinator."""
    env = os.environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
        return env["SLURM_NTASKS"] not in ("", "1")
    if "OMPI_MCA_orte_hnp_uri" in env:
        return env.get("OMPI_COMM_WORLD_SIZE", "2") not in ("", "1")
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def process_index() -> int:
    """This process's id (0 alone)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """The number of processes (1 alone)."""
    import jax

    return jax.process_count()


def is_main() -> bool:
    """Whether this is process 0 (the one that writes shared outputs)."""
    return process_index() == 0


def share_bounds(n: int, process_id: int, num_processes: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``process_id``'s contiguous share of ``n`` items; the
    shares differ in size by at most one, the first ones larger."""
    base, extra = divmod(n, num_processes)
    start = process_id * base + min(process_id, extra)
    return start, start + base + (process_id < extra)


def process_share(items: Iterable[T], process_id: int | None = None,
                  num_processes: int | None = None, *, key: Callable[[T], Any] | None = None
                  ) -> list[T]:
    """This process's share of ``items``: a contiguous block of them sorted (by ``key``).
    Every item falls in exactly one process's share, whatever order each process got them
    in; default ``process_id`` / ``num_processes``: this process's."""
    ordered = sorted(items, key=key)
    pid = process_index() if process_id is None else process_id
    n = process_count() if num_processes is None else num_processes
    if not 0 <= pid < n:
        raise ValueError(f"process_id {pid} not in 0..{n - 1}")
    start, stop = share_bounds(len(ordered), pid, n)
    return ordered[start:stop]


def local_rows(global_batch_size: int, process_id: int | None = None,
               num_processes: int | None = None) -> slice:
    """The rows of a global batch that this process provides: the ``process_id``-th of
    ``num_processes`` equal slices (so a global batch is the same whatever the number of
    processes); the size must split evenly."""
    pid = process_index() if process_id is None else process_id
    n = process_count() if num_processes is None else num_processes
    if global_batch_size % n:
        raise ValueError(f"a global batch of {global_batch_size} does not split over {n} "
                         "processes")
    per = global_batch_size // n
    return slice(pid * per, (pid + 1) * per)


def global_mesh(axis: str = "data") -> Any:
    """A 1-D mesh over every device of every process, process by process (so process i's
    devices hold the i-th slice of a batch split along ``axis``)."""
    import jax

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.asarray(devices), (axis,))


def global_batch(local: Mapping[str, Any], mesh: Any, axis: str = "data") -> dict[str, Any]:
    """Global ``jax.Array``s split along their first axis over ``axis`` of ``mesh`` from this
    process's rows (its :func:`local_rows`); every process calls it with its own rows of the
    same shape. One process: the arrays placed on the mesh."""
    import jax

    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.shape[0] % max(local_devices, 1):
            raise ValueError(f"batch {k!r}: {v.shape[0]} rows do not split over this "
                             f"process's {local_devices} devices")
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def replicate(tree: Any, mesh: Any) -> Any:
    """``tree`` as global arrays copied whole onto every device of ``mesh`` (which may span
    processes), each process giving its own copy: every process must pass the same values
    (a seeded init, a restored checkpoint). Arrays already so placed are kept."""
    import jax

    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(local_copy(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree)


def local_copy(tree: Any) -> Any:
    """``tree`` with every fully replicated global array replaced by this process's copy on
    its first device (for work each process does alone: evaluation, export)."""
    import jax

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError("local_copy needs replicated arrays")
            return x.addressable_shards[0].data
        return x

    return jax.tree_util.tree_map(one, tree)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no time limit: the slowest
    live process is awaited); :class:`DistributedError` naming the processes that died, once
    their heartbeat is missed (``heartbeat_timeout``). Alone: returns at once."""
    import jax
    from jax._src import distributed as _dist

    n = jax.process_count()
    if n == 1:
        return
    try:  # a barrier among the live processes, which it returns
        live = _dist.global_state.client.get_live_nodes(list(range(n)))
    except Exception as e:  # noqa: BLE001 - the runtime's error types are not public
        raise DistributedError(f"process {jax.process_index()}: lost the coordinator at "
                               f"{name!r} ({_one_line(e)})") from None
    dead = sorted(set(range(n)) - set(live))
    if dead:
        raise DistributedError(f"process {jax.process_index()}: process(es) {dead} of {n} "
                               f"died before {name!r}; rerun every process (with --resume "
                               "to continue)")


def all_equal(name: str, value: Any) -> None:
    """Check that every process passes the same ``value`` (JSON-able or bytes), e.g. its
    arguments or file list: :class:`DistributedError` naming the processes that differ, raised
    in every process alike. Alone: nothing to check."""
    import json

    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    raw = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True,
                                                            default=str).encode()
    digest = np.frombuffer(hashlib.blake2b(raw, digest_size=16).digest(), np.uint8)
    try:
        everyone = np.asarray(multihost_utils.process_allgather(digest))
    except Exception as e:  # noqa: BLE001 - a peer gone during the collective
        raise peer_failure(e, f"checking {name}") from None
    differ = [i for i in range(len(everyone)) if not np.array_equal(everyone[i], everyone[0])]
    if differ:
        raise DistributedError(f"{name} differs between process 0 and process(es) {differ}: "
                               "every process must get the same arguments and files")



def peer_failure(error: BaseException, doing: str) -> DistributedError:
    """A one-line :class:`DistributedError` for ``error`` raised by a collective while
    ``doing`` (a peer that died closes its connections)."""
    import jax

    return DistributedError(f"process {jax.process_index()}: another process failed while "
                            f"{doing} ({_one_line(error)[:200]}); rerun every process (with "
                            "--resume to continue)")
