"""loss ``grpo`` and ``gspo``: policy gradient on the model's own samples, scored by the
task's symbolic oracle, with group-normalised advantages and clipped importance ratios.

For each prompt x (the task's ``prompt`` field) G completions y_1..y_G are decoded step by
step from the model at ``temperature``; the task's oracle scores them, r_i = reward(x, y_i)
(:class:`hybridlab.core.tasks.Rewards`). Advantages are normalised within the group:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)          (or without the division: scale_advantages false)

- ``grpo`` (DeepSeekMath, Shao et al. 2024): a ratio per token,
  ρ_{i,t} = π(y_{i,t} | x, y_{i,<t}) / π_old(y_{i,t} | x, y_{i,<t}), and
  loss = -mean_i (1/N) Σ_t min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1-ε, 1+ε) A_i)
- ``gspo`` (Group Sequence Policy Optimization, Zheng et al. 2025): one length-normalised
  ratio per sequence, s_i = exp((1/N) Σ_t log ρ_{i,t}), and
  loss = -mean_i min(s_i A_i, clip(s_i, 1-ε, 1+ε) A_i)

plus, with ``kl`` > 0, kl · mean k3(π, π_ref) per token, k3 = exp(q) - q - 1 with
q = log π_ref - log π (Schulman's estimator, as in GRPO). Log-probabilities are taken at the
sampling temperature.

One gradient step is taken per batch of samples, so π_old is the current policy: old
log-probabilities are the current ones detached. Every ratio is 1 at the step (the clip
never binds and the logged loss is 0 up to rounding, plus the KL term), but the gradient is
the policy gradient, -mean_i A_i (1/N) Σ_t ∇log π(y_{i,t}). With all completions N tokens
long (here they always are), the two kinds' gradients are then the same; they part once
ratios move away from 1, which ``grpo_loss`` supports for callers that reuse samples.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from hybridlab.core.config import LossConfig, Needs
from hybridlab.core.errors import HybridlabError
from hybridlab.core.objectives import START, Objective, ObjectiveRun, ObjectiveSetup
from hybridlab.core.tasks import Rewards
from hybridlab.registry import hookimpl

from .dpo import check_reference_vocab, completion_logps


class _PolicyGradientConfig(LossConfig):
    group: int = Field(default=8, ge=2)
    """G: completions sampled per prompt (advantages compare a completion with its group)."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Tokens per completion (default: the task's answer length, ``answer``'s width)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature; the log-probabilities are taken at the same temperature."""
    clip: float = Field(default=0.2, gt=0)
    """ε: ratios are clipped to [1 - ε, 1 + ε]."""
    scale_advantages: bool = True
    """Divide the advantages by the group's reward std (false: only subtract the mean, as Dr. GRPO)."""
    kl: float = Field(default=0.0, ge=0)
    """Weight of the KL penalty to ``reference`` (0: none)."""
    reference: str | None = None
    """The frozen model of the KL term: ``start`` (the trained model's starting weights) or a
    run directory; null means none, and becomes ``start`` when ``kl`` > 0."""

    @model_validator(mode="before")
    @classmethod
    def _reference_for_kl(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("reference") is None:
            try:
                kl = float(data.get("kl", 0.0))
            except (TypeError, ValueError):
                return data  # the field's own validation reports it
            if kl > 0:
                data = {**data, "reference": START}
        return data

    def needs(self) -> Needs:
        return Needs(fields=("prompt", "answer"), models=("reference",) if self.reference is not None else (),
                     forward=False, samples=True)

    def check_pipeline(self, pipeline: Any, models: dict[str, Any]):
        if self.reference is not None and self.kl == 0:
            yield "reference", "is never read: kl is 0 (set kl > 0 to penalise the distance to it, or remove reference)"
        yield from check_reference_vocab(pipeline, models)


class GRPOConfig(_PolicyGradientConfig):
    """GRPO: group-normalised advantages, a clipped importance ratio per token."""

    kind: Literal["grpo"] = "grpo"


class GSPOConfig(_PolicyGradientConfig):
    """GSPO: group-normalised advantages, one clipped length-normalised ratio per sequence."""

    kind: Literal["gspo"] = "gspo"
    clip: float = Field(default=4e-4, gt=0)
    """ε: the sequence ratio is clipped to [1 - ε, 1 + ε] (sequence ratios sit much closer to
    1 than token ratios; the paper clips at 3e-4 and 4e-4)."""


def group_advantages(rewards: Tensor, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """rewards [B, G] -> advantages [B, G]: minus the group's mean, divided by its std
    (unbiased) + eps when ``scale``; exactly 0 in a group whose rewards are all equal."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    if scale:
        centered = centered / (rewards.std(-1, keepdim=True) + eps)
    flat = (rewards == rewards[:, :1]).all(-1, keepdim=True)  # [B, 1]
    return centered.masked_fill(flat, 0.0)


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, clip: float,
              level: Literal["token", "sequence"] = "token", reference_logp: Tensor | None = None,
              kl: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """logp, old_logp [B, G, N] (per completion token, under the policy and the policy that
    sampled), advantages [B, G] -> (scalar loss, metrics: ``clip_fraction`` and, with a
    reference, ``kl``). ``level``: one ratio per token (GRPO) or per sequence (GSPO)."""
    log_ratio = logp - old_logp  # [B, G, N]
    if level == "token":
        ratio, adv = log_ratio.exp(), advantages[..., None]  # [B, G, N], [B, G, 1]
    else:
        ratio, adv = log_ratio.mean(-1).exp(), advantages  # [B, G]: the length-normalised sequence ratio
    bounded = ratio.clamp(1 - clip, 1 + clip)
    surrogate = torch.minimum(ratio * adv, bounded * adv)
    loss = -surrogate.mean()  # token level: every completion has N tokens, so this is mean_i (1/N) Σ_t
    metrics = {"clip_fraction": (ratio * adv != surrogate).float().mean().detach()}
    if reference_logp is not None:
        q = reference_logp - logp
        k3 = q.exp() - q - 1  # [B, G, N] >= 0
        loss = loss + kl * k3.mean()
        metrics["kl"] = k3.mean().detach()
    return loss, metrics


class GRPO(Objective):
    """Samples G completions per prompt (no gradient), has the task score them, then runs
    the prompts with their completions through the model with gradients."""

    level: Literal["token", "sequence"] = "token"

    def __init__(self, config: _PolicyGradientConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.config = config

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict[str, Tensor]]:
        c, task = self.config, run.task
        if not isinstance(task, Rewards):
            raise HybridlabError(f"objective {c.kind}: task {type(task).__name__} yields 'answer' but has no "
                                 "reward(batch, completions) oracle (core/tasks.py Rewards)")
        prompt, answer = run.batch["prompt"], run.batch["answer"]  # [B, P], [B, A]
        (B, P), G = prompt.shape, c.group
        N = c.max_new_tokens or answer.shape[1]
        completions = run.sample(prompt, G, N, temperature=c.temperature)  # [B, G, N]
        rewards = task.reward(run.batch, completions).float()  # [B, G]
        advantages = group_advantages(rewards, scale=c.scale_advantages)

        flat = (rewards == rewards[:, :1]).all(-1)  # [B] groups without a learning signal
        # without a KL term such a group's loss and gradient are exactly 0: leave it out of the
        # forward (DAPO's dynamic sampling drops them too), keeping one group for the graph
        rows = torch.arange(B, device=prompt.device)
        if c.kl == 0 and flat.any():
            rows = rows[~flat] if not flat.all() else rows[:1]
        kept = len(rows)
        tokens = torch.cat([prompt[rows].repeat_interleave(G, 0), completions[rows].flatten(0, 1)], 1)  # [b*G, P+N]
        logp = completion_logps(run.forward(tokens).logits, tokens, P, temperature=c.temperature)
        logp = logp.view(kept, G, N)
        reference = None
        if c.kl > 0:
            reference = completion_logps(run.frozen("reference", tokens).logits, tokens, P,
                                         temperature=c.temperature).view(kept, G, N)
        loss, metrics = grpo_loss(logp, logp.detach(), advantages[rows], clip=c.clip, level=self.level,
                                  reference_logp=reference, kl=c.kl)
        loss = loss * (kept / B)  # the mean over all B groups: the left-out ones add 0
        del metrics["clip_fraction"]  # always 0 with one step per batch of samples: not worth a column
        with torch.no_grad():
            greedy = task.reward(run.batch, run.sample(prompt, 1, N, temperature=0.0))[:, 0]  # [B]
            passed = rewards >= 1
            metrics.update({
                "reward": rewards.mean(),
                "pass@1": (greedy >= 1).float().mean(),  # greedy decoding
                f"pass@{G}": passed.any(-1).float().mean(),  # any of the G samples
                "zero_variance": flat.float().mean(),
            })
        return loss, metrics


class GSPO(GRPO):
    level = "sequence"


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "grpo", config=GRPOConfig, module=GRPO)
    register.kind("loss", "gspo", config=GSPOConfig, module=GSPO)
