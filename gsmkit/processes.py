"""The processes of one launch (`accelerate launch`, torchrun, mpirun): which one this is, how many there
are, and a barrier between them. One plain run is a launch of one process.

In: the launcher's environment variables. Out: `is_main_process()`, `Processes.from_env()` (index,
count, `is_main`, `barrier()`, `gather(value)`, `shard(items)`), and `single_process_note()`, which says when
`accelerate launch --cpu --num_processes N` started one process (its several-CPU-process launch goes
through mpirun and needs `--mpirun_hostfile`).

The barrier is torch.distributed's, in the process group accelerate's `PartialState` sets up (gloo on
CPUs, NCCL on GPUs, each process on GPU LOCAL_RANK), only when there are several processes: a plain run
imports nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

# The launchers' variables: torchrun and `accelerate launch` (RANK, WORLD_SIZE), mpirun (accelerate's
# multi-CPU launch): Intel MPI / MPICH, Open MPI, MVAPICH.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

T = TypeVar("T")


def _first_int(names: Sequence[str], default: int) -> int:
    return next((int(os.environ[v]) for v in names if os.environ.get(v, "").isdigit()), default)


def is_main_process() -> bool:
    """True on the process of a launch that writes the outputs (global rank 0), and in a plain run. Read from
    the launcher's variables, so it is known before anything sets up the process group."""
    return _first_int(RANK_VARIABLES, 0) == 0


@dataclass(frozen=True)
class Processes:
    index: int
    count: int

    @classmethod
    def from_env(cls) -> Processes:
        return cls(_first_int(RANK_VARIABLES, 0), max(1, _first_int(SIZE_VARIABLES, 1)))

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        """Every process waits here until all have arrived (nothing to wait for alone)."""
        if self.count > 1:
            _process_group().barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in process order, on every process (picklable values)."""
        if self.count == 1:
            return [value]
        dist = _process_group()
        values: list[Any] = [None] * self.count
        dist.all_gather_object(values, value)
        return values

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of `items`: every `count`-th, from its index (balanced to within one)."""
        return list(items[self.index::self.count])


def _process_group() -> Any:
    """torch.distributed, with the launch's process group set up: by accelerate's `PartialState` (which also
    puts each process on GPU LOCAL_RANK), else over gloo. PartialState's own `wait_for_everyone` is not
    used: with CUDA hidden under `--multi_gpu` it takes the launch for one process and does not wait."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist


def single_process_note() -> str | None:
    """What to tell a user whose `accelerate launch --cpu --num_processes N` (N > 1) started one process."""
    launched_several = os.environ.get("MASTER_ADDR") and os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "true", "1")
    if launched_several and Processes.from_env().count == 1:
        return ("accelerate launch --cpu started one process: its launch of several CPU processes goes "
                "through mpirun (--mpirun_hostfile); on one machine use --multi_gpu --num_processes N with "
                "CUDA_VISIBLE_DEVICES= for N CPU processes")
    return None
