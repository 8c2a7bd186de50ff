"""Multi-process (multi-host) JAX: start `jax.distributed` when a cluster is detected, else do nothing.

    from jdpo.parallel import distributed
    info = distributed.maybe_initialize()   # first thing in main, before any JAX computation
    print(info)                             # "process 0 of 4 (tpu)" or "single process"
    ...
    if distributed.is_main_process():
        write_summary()
    distributed.sync("summary written")     # every process waits here

Detection, first match wins (`detect_cluster`):
1. `JDPO_DISTRIBUTED=0` (off/false/no): never initialise.
2. Explicit settings, from keyword arguments or the environment: `JDPO_COORDINATOR=host:port`,
   `JDPO_NUM_PROCESSES`, `JDPO_PROCESS_ID` (all three, or an error naming the missing ones) and optional
   `JDPO_LOCAL_DEVICE_IDS=0,1`. One process (`JDPO_NUM_PROCESSES=1`) is the plain single-process case.
3. SLURM: inside an `srun` step with more than one task (`SLURM_STEP_NUM_TASKS` / `SLURM_NTASKS` > 1);
   jax reads the coordinator from the node list.
4. Open MPI: launched by `mpirun` with `OMPI_COMM_WORLD_SIZE` > 1; jax reads the rest.
5. Cloud TPU: multi-worker environment variables (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` with
   several hosts, `MEGASCALE_*` multislice settings, `CLOUD_TPU_TASK_ID`), or any Cloud TPU VM (libtpu
   and a TPU chip present). jax's own detection then reads the worker list from the environment or the
   VM metadata server, so `jax.distributed.initialize()` is called with no arguments; on a single-host
   TPU VM that yields one process, which is harmless.
6. `JDPO_DISTRIBUTED=1` (on/true/yes): call `jax.distributed.initialize()` with no arguments anyway,
   for clusters jax detects but jdpo does not know (e.g. Kubernetes indexed jobs, mpi4py).
Otherwise: one process, nothing is initialised.

Multi-process runs on CPU use gloo for cross-process collectives (`jax_cpu_collectives_implementation`;
an explicit `JAX_CPU_COLLECTIVES_IMPLEMENTATION` in the environment wins). `JDPO_INIT_TIMEOUT` (seconds,
default 300) bounds how long a process waits for the others to join.

Everything here must be called on every process of a job, in the same order (a process that skips a
`sync` leaves the others waiting until the heartbeat timeout kills the job).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

ENV_SWITCH = "JDPO_DISTRIBUTED"
ENV_COORDINATOR = "JDPO_COORDINATOR"
ENV_NUM_PROCESSES = "JDPO_NUM_PROCESSES"
ENV_PROCESS_ID = "JDPO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JDPO_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "JDPO_INIT_TIMEOUT"

_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of Google's vendor id

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Cluster settings that are incomplete, inconsistent, or given too late."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """What `detect_cluster` found: how (and whether) to call `jax.distributed.initialize`.

    kind: "single" (no initialisation), "explicit", "slurm", "ompi", "tpu" or "forced".
    Fields left None are filled in by jax's own cluster detection.
    """

    kind: str
    reason: str  # the evidence, for logs and error messages (e.g. "SLURM_NTASKS=4")
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    detection_method: str | None = None  # jax's `cluster_detection_method`, when one must be named

    @property
    def multi_process(self) -> bool:
        return self.kind != "single"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What `maybe_initialize` did. `str(info)` is a one-line summary for the run log."""

    initialized: bool  # jax.distributed is running (by us or by the caller before us)
    kind: str  # ClusterSpec.kind, or "external" when jax.distributed was already running
    process_index: int
    process_count: int
    coordinator: str | None
    reason: str

    def __str__(self) -> str:
        if not self.initialized:
            return f"single process ({self.reason})"
        where = f", coordinator {self.coordinator}" if self.coordinator else ""
        return f"process {self.process_index} of {self.process_count} ({self.kind}: {self.reason}{where})"


_INFO: DistributedInfo | None = None  # the result of the first maybe_initialize (idempotence)


# ------------------------------------------------------------------------------------------------
# Detection (pure functions of the environment, so they are testable without a cluster)
# ------------------------------------------------------------------------------------------------


def _int(value: Any, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def _device_ids(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None or value == "" or value == ():
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    return tuple(_int(v, name) for v in value)


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM: libtpu installed and a TPU chip on the PCI bus.

    jax makes the same check at import (`cloud_tpu_init`); its result is used when available, and this
    module's own probe (the same two conditions) otherwise, e.g. before jax is imported.
    """
    try:
        from jax._src import cloud_tpu_init  # private; only read, and only as a shortcut

        if cloud_tpu_init.running_in_cloud_tpu_vm:
            return True
    except Exception:  # noqa: BLE001 - any import problem just means "ask the machine directly"
        pass
    has_libtpu = bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None
    if not has_libtpu:
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def _tpu_evidence(env: Mapping[str, str]) -> str | None:
    """The environment variable that says "several TPU workers", or None."""
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"{name} lists {len(hosts)} hosts"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS is set (multislice)"
    if _int(env.get("MEGASCALE_NUM_SLICES", "1") or "1", "MEGASCALE_NUM_SLICES") > 1:
        return f"MEGASCALE_NUM_SLICES={env['MEGASCALE_NUM_SLICES']}"
    if env.get("CLOUD_TPU_TASK_ID", "") != "":
        return f"CLOUD_TPU_TASK_ID={env['CLOUD_TPU_TASK_ID']}"
    return None


def detect_cluster(
    env: Mapping[str, str] | None = None,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    tpu_vm: bool | None = None,
) -> ClusterSpec:
    """Decide how this process joins a job (see the module docstring for the order of the rules).

    env: the environment (default `os.environ`). Keyword arguments are the command-line flags; each
    wins over its `JDPO_*` variable. tpu_vm: whether this is a Cloud TPU VM (default: probe the machine).
    Raises DistributedError for incomplete or inconsistent explicit settings.
    """
    env = os.environ if env is None else env
    switch = env.get(ENV_SWITCH, "").strip().lower()
    if switch and switch not in _OFF + _ON + ("auto",):
        raise DistributedError(f"{ENV_SWITCH}={env[ENV_SWITCH]!r}: expected auto, 0/off or 1/on")
    if switch in _OFF:
        return ClusterSpec("single", f"{ENV_SWITCH}={env[ENV_SWITCH]}")

    # Explicit settings: flags first, then JDPO_* variables.
    explicit = {
        ENV_COORDINATOR: coordinator if coordinator is not None else env.get(ENV_COORDINATOR) or None,
        ENV_NUM_PROCESSES: num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES) or None,
        ENV_PROCESS_ID: process_id if process_id is not None else env.get(ENV_PROCESS_ID) or None,
    }
    ids = local_device_ids if local_device_ids is not None else env.get(ENV_LOCAL_DEVICE_IDS)
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            given = ", ".join(f"{k}={v}" for k, v in explicit.items() if v is not None)
            raise DistributedError(
                f"incomplete multi-process settings: {given} is set but {', '.join(missing)} is not; "
                f"give all of {ENV_COORDINATOR}=host:port, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}"
            )
        addr = str(explicit[ENV_COORDINATOR])
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"{ENV_COORDINATOR}={addr!r}: expected host:port (e.g. 10.0.0.2:8476)")
        n = _int(explicit[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
        pid = _int(explicit[ENV_PROCESS_ID], ENV_PROCESS_ID)
        if n < 1 or not 0 <= pid < n:
            raise DistributedError(
                f"{ENV_PROCESS_ID}={pid} and {ENV_NUM_PROCESSES}={n}: need 0 <= process id < processes"
            )
        if n == 1:
            return ClusterSpec("single", f"{ENV_NUM_PROCESSES}=1")
        return ClusterSpec(
            "explicit",
            f"{ENV_NUM_PROCESSES}={n}",
            coordinator=addr,
            num_processes=n,
            process_id=pid,
            local_device_ids=_device_ids(ids, ENV_LOCAL_DEVICE_IDS),
        )

    # SLURM: jax needs these five; SLURM_STEP_NUM_TASKS is the size of this srun step (a batch script
    # that runs python directly is a one-task step of a larger allocation: a single process).
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm_vars):
        name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        n = _int(env[name], name)
        if n > 1:
            return ClusterSpec(
                "slurm",
                f"{name}={n}",
                num_processes=n,
                process_id=_int(env["SLURM_PROCID"], "SLURM_PROCID"),
                local_device_ids=_device_ids(ids, ENV_LOCAL_DEVICE_IDS),
                detection_method="slurm",
            )

    if (
        "OMPI_MCA_orte_hnp_uri" in env
        and _int(env.get("OMPI_COMM_WORLD_SIZE", "1"), "OMPI_COMM_WORLD_SIZE") > 1
    ):
        return ClusterSpec(
            "ompi", f"OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}", detection_method="ompi"
        )

    evidence = _tpu_evidence(env)
    if evidence is None:
        if tpu_vm is None:
            tpu_vm = on_cloud_tpu_vm()
        if tpu_vm and "TPU_SKIP_MDS_QUERY" not in env:
            evidence = "Cloud TPU VM (worker list from the metadata server)"
    if evidence is not None:
        return ClusterSpec("tpu", evidence)

    if switch in _ON:
        return ClusterSpec("forced", f"{ENV_SWITCH}={env[ENV_SWITCH]}")
    return ClusterSpec("single", "no cluster detected")


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------


def _cpu_only(jax, env: Mapping[str, str]) -> bool:
    """Whether this process will compute on CPU only (decides the CPU collectives)."""
    platforms = jax.config.jax_platforms or env.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    # No platform named: CPU unless an accelerator plugin will claim the process. A TPU VM uses TPU
    # collectives; on a GPU host gloo only serves the (unused) CPU backend, so it is harmless there.
    return not on_cloud_tpu_vm()


def maybe_initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedInfo:
    """Start `jax.distributed` if this process is part of a multi-process job; a no-op otherwise.

    Call it first, before anything computes with JAX (jax cannot join a cluster after its backends
    started). Idempotent: later calls return the first call's result; if the caller already started
    `jax.distributed`, that is reported (kind "external") and left alone. Arguments are the command-line
    flags and win over the `JDPO_*` variables (see `detect_cluster`).
    """
    global _INFO
    import jax

    if _INFO is not None:
        return _INFO
    if jax.distributed.is_initialized():
        from jax._src import distributed as _jd  # the coordinator address is only kept here

        state = _jd.global_state
        _INFO = DistributedInfo(
            True, "external", state.process_id, state.num_processes, state.coordinator_address,
            "jax.distributed was initialised before jdpo",
        )  # fmt: skip
        return _INFO
    env = os.environ if env is None else env
    spec = detect_cluster(
        env,
        coordinator=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    if not spec.multi_process:
        _INFO = DistributedInfo(False, "single", 0, 1, None, spec.reason)
        return _INFO

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env and _cpu_only(jax, env):
        # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {
        "initialization_timeout": _int(env.get(ENV_INIT_TIMEOUT, "300"), ENV_INIT_TIMEOUT),
    }
    for name in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
        value = getattr(spec, "coordinator" if name == "coordinator_address" else name)
        if value is not None:
            kwargs[name] = list(value) if name == "local_device_ids" else value
    if spec.detection_method:
        kwargs["cluster_detection_method"] = spec.detection_method
    log.info("initialising jax.distributed (%s: %s)", spec.kind, spec.reason)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise DistributedError(
                f"a multi-process job was detected ({spec.kind}: {spec.reason}) but JAX already ran a "
                "computation in this process; call jdpo.parallel.distributed.maybe_initialize() first in main"
            ) from e
        raise
    from jax._src import distributed as _jd

    state = _jd.global_state
    _INFO = DistributedInfo(
        True, spec.kind, state.process_id, state.num_processes, state.coordinator_address, spec.reason
    )
    log.info("jax.distributed: %s", _INFO)
    return _INFO


def add_arguments(parser) -> None:
    """Register `--coordinator`, `--num-processes`, `--process-id`, `--local-device-ids` on an
    argparse parser (all default to None: the `JDPO_*` variables and cluster detection decide)."""
    group = parser.add_argument_group(
        "multi-process", "Only for clusters jdpo cannot detect (TPU pods, SLURM and mpirun are automatic)."
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", default=None, help=f"Address of process 0 (${ENV_COORDINATOR})."
    )
    group.add_argument(
        "--num-processes", type=int, default=None, help=f"Processes in the job (${ENV_NUM_PROCESSES})."
    )
    group.add_argument(
        "--process-id", type=int, default=None, help=f"This process's index (${ENV_PROCESS_ID})."
    )
    group.add_argument(
        "--local-device-ids", metavar="IDS", default=None, help=f"e.g. 0,1 (${ENV_LOCAL_DEVICE_IDS})."
    )


def initialize_from_args(args) -> DistributedInfo:
    """`maybe_initialize` with the flags of `add_arguments` (absent attributes count as not given)."""
    return maybe_initialize(
        coordinator=getattr(args, "coordinator", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_ids=getattr(args, "local_device_ids", None),
    )


# ------------------------------------------------------------------------------------------------
# Process-0 helpers
# ------------------------------------------------------------------------------------------------


def process_index() -> int:
    """This process's index in the job (0 in a single-process run)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """Number of processes in the job (1 in a single-process run)."""
    import jax

    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that writes shared files (metrics, exports) and prints."""
    return process_index() == 0


def sync(name: str) -> None:
    """Barrier: returns once every process has reached `sync(name)` (a no-op with one process).

    The names must agree across processes (a mismatch raises), which catches processes that took
    different paths through the code.
    """
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_main(tree: T) -> T:
    """Process 0's value of a pytree of arrays / numbers, on every process (same shapes everywhere)."""
    if process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on at least one (a collective: call it everywhere).

    For decisions that must be unanimous although their trigger is local, e.g. a SIGTERM that reaches
    the workers of a pod at slightly different steps: if only some processes stopped to checkpoint, the
    others would wait for them in the next step's collectives until the job timed out.
    """
    if process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
    return bool(np.max(flags))


def sum_over_processes(values):
    """Elementwise sum over all processes of a small vector of counts (a collective: call it on every
    process at the same point), e.g. the tokens each host fed into a step. int32: per-step counts."""
    import numpy as np

    local = np.asarray(values, np.int32)
    if process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, *local.shape).sum(axis=0)


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run `fn` on process 0 only; other processes get None right away.

    No barrier: when the others must wait for the result (e.g. a file they will read), follow the call
    with `sync(...)` on every process.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_main_process():
            return fn(*args, **kwargs)
        return None

    return wrapper


def _reset_for_tests() -> None:
    """Forget the cached result of `maybe_initialize` (tests only; does not shut jax.distributed down)."""
    global _INFO
    _INFO = None
