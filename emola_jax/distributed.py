"""Joining a multi-process run: one home for training, evaluation and generation alike."""

from __future__ import annotations

import jax


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
    auto: bool = False,
) -> None:
    """Joins a multi-process run before any device is touched: explicitly (coordinator address,
    process count and id, e.g. several hosts or several processes on one machine), or `auto`
    (TPU pods, SLURM and other clusters jax detects). CPU processes talk through gloo."""
    if coordinator is None and not auto:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
