"""loss ``cross_entropy``: next-token cross-entropy on the positions whose target is
not ``ignore_index``, with an optional z-loss on the log-partition (PaLM, Chowdhery et al. 2022)."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from hybridlab.core.config import LossConfig
from hybridlab.registry import hookimpl


class CrossEntropyConfig(LossConfig):
    """Cross-entropy of logits against batch['targets']."""

    kind: Literal["cross_entropy"] = "cross_entropy"
    ignore_index: int = -100
    """Targets equal to this are not scored."""
    z_loss: float = Field(default=0.0, ge=0)
    """Weight of mean(logsumexp(logits)²), which keeps logits from drifting."""


class CrossEntropy:
    def __init__(self, config: CrossEntropyConfig) -> None:
        self.config = config

    def __call__(self, output, batch):
        """-> (loss, metrics): metrics has 'accuracy' (argmax == target on scored positions)."""
        logits, targets = output.logits.float(), batch["targets"]  # [B, T, V], [B, T]
        mask = targets != self.config.ignore_index
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.config.ignore_index)
        metrics = {"ce": loss.detach()}
        if self.config.z_loss > 0:
            z = torch.logsumexp(logits[mask], dim=-1).pow(2).mean()
            loss = loss + self.config.z_loss * z
            metrics["z"] = z.detach()
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets) & mask
            metrics["accuracy"] = correct.sum() / mask.sum().clamp(min=1)
        return loss, metrics


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "cross_entropy", config=CrossEntropyConfig, module=CrossEntropy)
