"""Multi-process start-up: `jax.distributed.initialize` when several processes are launched.

Coordinator address, process count and id come from flags, else from the environment
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); on TPU pods and under SLURM
(several tasks) JAX finds them itself. On CPU the processes talk through gloo collectives.
Each process then reads its own rows of every global batch (`data.make_source`) and the
global arrays are assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Initialize jax.distributed if this is one of several processes; True when it did."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if coordinator is None and not (slurm or tpu_pod):
        return False
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError("a coordinator address needs the process count and this process's id")
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
