"""The training processes: one (plain `python -m`), or several under `accelerate launch`.

accelerate's `PartialState` reads the launcher's environment and sets up torch.distributed (gloo
on CPU, NCCL on GPUs); without a launcher it is a single process and every collective here is the
identity. What the policy stage exchanges, and why:

- features and realism logits of every process's samples: the diversity reward is a function of
  the whole set, so it is computed once on the gathered set and each process keeps its own slice;
- gradients (PPO, REINFORCE, TRPO's penalty mode): averaged before every optimizer step, so the
  same step is taken everywhere and the weights stay identical;
- TRPO's g, every Fisher-vector product, and the surrogate and KL of the line search: averaged, so
  every process computes the same step and takes the same accept/reject decision;
- small Python objects (reward statistics, RNG states for checkpoints): broadcast or gathered.

Only the main process writes logs, sample grids and checkpoints; the others wait at a barrier.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def active() -> bool:
    """Whether several processes share the work."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


_device: torch.device | None = None


def init(cpu: bool) -> None:
    """Join the processes `accelerate launch` started; a no-op for a single process."""
    global _device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ:
            # `accelerate launch --cpu --num_processes N` (N > 1) sets MASTER_ADDR but, without MPI
            # (--mpirun_hostfile), starts a single process: say so instead of silently running one
            print("accelerate launch --cpu started one process (several CPU processes need MPI there); "
                  "training as one process. For N CPU processes use: accelerate launch --multi_gpu "
                  "--num_processes N -m scripts.finetune ... --set device=cpu", file=sys.stderr)
        return
    from accelerate import PartialState

    _device = PartialState(cpu=cpu).device


def process_device() -> torch.device | None:
    """This process's device when several run (cuda:<local rank> on GPUs, or cpu), else None."""
    return _device if active() else None


def barrier() -> None:
    if active():
        dist.barrier()


def mean_(t: Tensor) -> Tensor:
    """All-reduce `t` in place to its mean over processes; returns it."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def mean_float(x: float) -> float:
    """The mean of a Python float over processes (float64)."""
    if not active():
        return x
    return float(mean_(torch.tensor([x], dtype=torch.float64))[0])


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every process."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t[0])


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over processes (one flat all-reduce; missing grads count as 0)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    vector_to_parameters(mean_(parameters_to_vector(grads)), grads)  # copies the means into the grads


def gather(t: Tensor) -> Tensor:
    """Concatenate every process's `t` along dim 0, in rank order (equal shapes)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every process."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
