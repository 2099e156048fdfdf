"""Several processes, one run: torch.distributed for ``parallel: ddp | fsdp``.

torchrun (``torchrun --nproc-per-node N -m hybridlab train PIPELINE``, or the shortcut
``hybridlab train PIPELINE --nproc N``) starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK in their environment. Each copy builds the same model from the
same seed, joins the process group (gloo on the CPU, nccl on CUDA) and then

- ``ddp``: wraps the model and its objectives in DistributedDataParallel; every process
  holds all weights, the backward all-reduces the gradients;
- ``fsdp``: FSDP2 ``fully_shard`` on each block, then on the model (the embedding, final
  norm and head); weights, gradients and optimizer state are sharded, and a bf16
  ``precision`` gathers the weights in bf16 and reduces gradients in fp32.

The data of a step is a pure function of (seed, step) (see core/train.py): every process
builds the step's global batch and keeps its own rows, so the global batch is the
pipeline's ``batch_size`` whatever N is, and a resume with another N is exact.

A process that dies or stops answering makes the others fail their next collective within
``dist_timeout_s``; :func:`lost_ranks` turns that failure into one line naming the rank.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import HybridlabError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the run: ``rank`` of ``world`` (``local`` on its host)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory, logs and shows progress."""
        return self.rank == 0


def launched() -> Ranks | None:
    """The ranks torchrun put in the environment, or None for a plain one-process start."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except (KeyError, ValueError) as exc:
        raise HybridlabError(f"WORLD_SIZE is set but RANK / LOCAL_RANK are not whole numbers ({exc}); start the "
                             "processes with torchrun") from None


def start(ranks: Ranks, device: torch.device, timeout_s: float) -> None:
    """Join the process group (gloo on the CPU, nccl on CUDA); waits at most ``timeout_s``
    for the other processes, here and in every later collective."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    with lost_ranks(ranks, timeout_s, "joining the process group"):
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world,
                                timeout=timedelta(seconds=timeout_s))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# how the backends' failures read when they surface as a plain RuntimeError (DDP's
# all-reduce runs inside the autograd engine, which re-raises what gloo or nccl threw)
_TRANSPORT_FAILURES = ("gloo", "nccl", "connection closed by peer", "connection reset", "timed out", "timeout")


@contextlib.contextmanager
def lost_ranks(ranks: Ranks, timeout_s: float, doing: str = "training") -> Iterator[None]:
    """A collective that failed because another process died, or did not answer within
    ``timeout_s``, becomes one HybridlabError line instead of a traceback or a hang."""
    try:
        yield
    except RuntimeError as exc:  # DistError subclasses it; a collective inside autograd raises it plain
        if not isinstance(exc, dist.DistError) and not any(m in str(exc).lower() for m in _TRANSPORT_FAILURES):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise HybridlabError(
            f"rank {ranks.rank} of {ranks.world}: lost contact with the other processes while {doing} ({first}); "
            f"another rank died (see its output) or did not answer within dist_timeout_s={timeout_s:g} s. The run "
            "stops here; continue it with --resume RUN_DIR from its last checkpoint") from None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the run directory it chose)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over the ranks, in float64 (one collective for all the values)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def parallelize(parallel: str, model: nn.Module, loss: nn.Module, *, device: torch.device,
                precision: str, objective_weights: bool) -> nn.Module:
    """Apply ``parallel`` to a process group's model; returns the module to call for the
    loss (``loss`` holds the model and the objectives: DDP wraps it, FSDP shards inside it)."""
    if not dist.is_initialized() or parallel == "none":
        return loss
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # unused parameters are common here (experts no token chose, a skipped block)
        return DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    if objective_weights:
        raise HybridlabError("parallel: fsdp shards the model's blocks; this pipeline's objectives train weights of "
                             "their own (e.g. mtp), which it does not shard yet; use parallel: ddp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embedding, final norm, head
    register_fsdp_forward_method(model, "step")  # decoding (sampling objectives) gathers too
    return loss


def gradient_sync(parallel: str, wrapped: nn.Module, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Accumulation: reduce gradients only in the backward of a step's last micro-batch."""
    if not dist.is_initialized() or parallel == "none":
        return contextlib.nullcontext()
    if parallel == "ddp":
        return contextlib.nullcontext() if last else wrapped.no_sync()
    model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """``hybridlab ARGV`` in ``nproc`` processes under torchrun on this host; its status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hybridlab", *argv]
    print("launching: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command)
