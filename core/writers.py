"""Where a run's metrics go besides metrics.jsonl, and the throughput numbers logged with them.

metrics.jsonl is the record: ``--resume``, ``compare`` and the tests read it. A pipeline
may add writers (``log: {tensorboard: true, wandb: {project: NAME}}``); each gets the
same records from rank 0. Their packages are extras, imported only when asked for:
``pip install hybridlab[tensorboard]``, ``pip install hybridlab[wandb]``.
"""

from __future__ import annotations

import importlib
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import HybridlabError

# Dense peak FLOP/s of one device by (name fragment, precision), from the vendors' data
# sheets (docs/scaling.md lists them); fp32 on tensor-core GPUs counts TF32 matmuls.
PEAK_FLOPS = {
    ("H200", "bf16"): 989e12, ("H200", "fp32"): 494e12,
    ("H100", "bf16"): 989e12, ("H100", "fp32"): 494e12,
    ("A100", "bf16"): 312e12, ("A100", "fp32"): 156e12,
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The table's peak for this CUDA device, or None (the CPU, an unknown GPU): then the
    pipeline's ``peak_flops`` is the only source and without it no ``mfu`` is logged."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for (part, p), flops in PEAK_FLOPS.items() if part in name and p == precision), None)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since the last reset, in MiB: allocated tensor memory on CUDA; on the
    CPU the process's peak resident set (ru_maxrss; it never resets, so it is the peak of
    the whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _extra(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HybridlabError(f"log.{extra}: the {module!r} package is not installed; install the extra: "
                             f"pip install 'hybridlab[{extra}]' (or remove log.{extra} from the pipeline)") from None


def require_extras(log: Any) -> None:
    """Import what the pipeline's ``log`` asks for, or a HybridlabError naming the extra."""
    if log.tensorboard:
        _extra("tensorboard", "tensorboard")
    if log.wandb is not None:
        _extra("wandb", "wandb")


class Writers:
    """The pipeline's ``log`` writers; ``write(record)`` sends one metrics.jsonl record."""

    def __init__(self, log: Any, run_dir: Path, config: dict) -> None:
        self.tensorboard = self.wandb = None
        if log.tensorboard:
            _extra("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if log.wandb is not None:
            wandb = _extra("wandb", "wandb")
            self.wandb = wandb.init(project=log.wandb.project, entity=log.wandb.entity, mode=log.wandb.mode,
                                    dir=str(run_dir), name=Path(run_dir).name, config=config, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
