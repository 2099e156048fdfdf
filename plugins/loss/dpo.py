"""loss ``dpo``: Direct Preference Optimization (Rafailov et al. 2023), with the
label-smoothed ("conservative") variant of Mitchell 2023.

For a prompt x, a chosen answer y_w and a rejected one y_l (the task's ``prompt``,
``answer`` and ``rejected`` fields), with log-probabilities summed over the answer tokens
under the trained policy π and a frozen reference π_ref:

    h    = β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))]
    loss = -(1 - ε) · log σ(h) - ε · log σ(-h)                 (ε = label_smoothing)

The reference defaults to ``start``: the trained model's own starting weights (the
checkpoint a pipeline's ``model: RUN_DIR`` fine-tunes from), frozen.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from hybridlab.core.config import LossConfig, Needs
from hybridlab.core.objectives import START, Objective, ObjectiveRun, ObjectiveSetup
from hybridlab.registry import hookimpl


class DPOConfig(LossConfig):
    """DPO on the task's preference pairs: prompt + answer (chosen) vs prompt + rejected."""

    kind: Literal["dpo"] = "dpo"
    beta: float = Field(default=0.1, gt=0)
    """Strength of the implicit KL to the reference: the log-ratios are scaled by β."""
    reference: str = START
    """The frozen reference model: ``start`` (the trained model's starting weights) or a run
    directory (its latest checkpoint; relative paths are read from this file's folder)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """ε: the probability that a pair's preference is flipped (conservative DPO); 0 is plain DPO."""

    def needs(self) -> Needs:
        return Needs(fields=("prompt", "answer", "rejected"), models=("reference",), forward=False)

    def check_pipeline(self, pipeline: Any, models: dict[str, Any]):
        yield from check_reference_vocab(pipeline, models)


def check_reference_vocab(pipeline: Any, models: dict[str, Any]):
    """A reference scores the same token ids as the trained model: their vocabularies must match."""
    reference = models.get("reference")
    if reference is not None and reference.vocab_size != pipeline.model.vocab_size:
        yield "reference", (f"the reference model has vocab_size {reference.vocab_size} but the trained model has "
                            f"{pipeline.model.vocab_size}; their log-probabilities of one token would not compare")


def completion_logps(logits: Tensor, tokens: Tensor, start: int, *, temperature: float = 1.0) -> Tensor:
    """logits [B, T, V] of a model on tokens [B, T] -> [B, T - start]: the log-probability
    of each of tokens[:, start:] given the tokens before it, at ``temperature``."""
    scores = logits[:, start - 1:-1].float()  # [B, N, V]: position t predicts token t + 1
    if temperature != 1.0:
        scores = scores / temperature
    picked = scores.gather(-1, tokens[:, start:, None]).squeeze(-1)  # [B, N]
    return picked - torch.logsumexp(scores, dim=-1)


def dpo_loss(chosen: Tensor, rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor, *,
             beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence log-probabilities [B] of the chosen and rejected answers under the policy
    and the reference -> (mean loss, metrics)."""
    chosen_reward = beta * (chosen - reference_chosen)  # [B]
    rejected_reward = beta * (rejected - reference_rejected)
    h = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    with torch.no_grad():
        metrics = {
            "reward_margin": h.mean(),
            "preference_accuracy": (h > 0).float().mean(),  # ties (the first step from 'start') count as wrong
            "reward_chosen": chosen_reward.mean(),
            "reward_rejected": rejected_reward.mean(),
            "logp_chosen": chosen.mean(),
            "logp_rejected": rejected.mean(),
        }
    return loss.mean(), metrics


class DPO(Objective):
    """Chosen and rejected sequences go through the policy as one batch of 2B (with
    gradients) and through the reference as another (without)."""

    def __init__(self, config: DPOConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.config = config

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict[str, Tensor]]:
        prompt, chosen, rejected = run.batch["prompt"], run.batch["answer"], run.batch["rejected"]  # [B, P], [B, A]
        B, P = prompt.shape
        tokens = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])  # [2B, P + A]
        policy = completion_logps(run.forward(tokens).logits, tokens, P).sum(-1)  # [2B]
        reference = completion_logps(run.frozen("reference", tokens).logits, tokens, P).sum(-1)
        return dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], beta=self.config.beta,
                        label_smoothing=self.config.label_smoothing)


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "dpo", config=DPOConfig, module=DPO)
