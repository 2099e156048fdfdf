"""loss ``let``: Late-to-Early Training (Zhao, Gu, Shao, Zhou, Xiang & Xie, "Late-to-Early
Training: LET LLMs Learn Earlier, So Faster and Better", 2026, arXiv 2602.05393).

A smaller pretrained model's *late* layer guides the trained model's *early* layer during
the *early* steps of training. The teacher's hidden state at ``teacher_layer`` goes
through a learned linear map W (teacher d -> model d, trained and checkpointed with the
model) and is aligned with the model's hidden state at ``layer``; the term's factor decays
linearly from 1 at step 0 to 0 at ``decay_steps`` and stays 0 after (the objective's
``weight`` is the peak factor, the paper's λ):

    h = model's output of block ``layer`` [B, T, d],   g = teacher's ``teacher_layer`` [B, T, d_t]
    cosine: align = mean over positions of 1 − cos(h_t, W g_t)
    mse:    align = mean over positions and channels of (h_t − W g_t)²
    loss   = max(0, 1 − step / decay_steps) · align

Past ``decay_steps`` the loss is a constant 0: the teacher does not run and nothing gets a
gradient from this term. Both models read the same token ids, so the teacher must share the
model's vocabulary (the paper pairs models with their own tokenizers; here one task feeds
both).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import LossConfig, Needs
from hybridlab.core.errors import HybridlabError
from hybridlab.core.objectives import Objective, ObjectiveRun, ObjectiveSetup, resolve_layer
from hybridlab.registry import hookimpl


class LETConfig(LossConfig):
    """Align an early layer of the model with a late layer of a smaller pretrained teacher,
    through a learned projection, with a factor that decays linearly to 0."""

    kind: Literal["let"] = "let"
    teacher: str
    """The pretrained teacher: a run directory (relative to the pipeline file) with at least
    one checkpoint; its latest weights are loaded frozen. Its vocab_size must equal the model's."""
    layer: int | str
    """The model's early layer whose output is aligned: a position in the block order (0 is
    the first block's output; negative counts from the end), or a block's ``name:``."""
    teacher_layer: int | str = "final"
    """The teacher's late layer: a position in its block order, a block's ``name:``, or
    ``final`` (its last block's output after the final norm: what its head reads)."""
    decay_steps: int = Field(ge=1)
    """The factor falls linearly from 1 (step 0) to 0 (this step); from then on the term is 0
    and the teacher is no longer run."""
    alignment: Literal["cosine", "mse"] = "cosine"
    """cosine: 1 − cos(h, W g) per position, blind to scale (the teacher's final-norm output
    and the model's residual stream differ in scale, and the model's stream keeps its own);
    mse: (h − W g)² per channel, which also asks the model's stream to match the projected
    scale."""

    @field_validator("layer", "teacher_layer", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read `layer: true` as position 1
            raise ValueError(f"a layer is a position (an integer) or a block's name, got {value!r}")
        return value

    def needs(self) -> Needs:
        return Needs(fields=("inputs",), hidden=(self.layer,), models=("teacher",))

    def check_pipeline(self, pipeline, models):
        teacher = models.get("teacher")  # absent when a saved run is re-read (checked when it was written)
        if teacher is None:
            return
        if teacher.vocab_size != pipeline.model.vocab_size:
            yield "teacher", (f"the teacher's vocabulary ({teacher.vocab_size} tokens, model {teacher.name!r}) differs "
                              f"from the model's ({pipeline.model.vocab_size}, model {pipeline.model.name!r}); the "
                              "teacher reads the model's token ids, so both must use one vocabulary")
        if resolve_layer(teacher, self.teacher_layer) is None:
            yield "teacher_layer", (f"the teacher (model {teacher.name!r}) has no layer {self.teacher_layer!r} (a "
                                    f"position 0..{len(teacher.positions()) - 1}, a block's name:, or 'final')")


def let_factor(step: int, decay_steps: int) -> float:
    """The schedule: 1 at step 0, falling linearly to 0 at ``decay_steps``, then 0."""
    return max(0.0, 1.0 - step / decay_steps)


def let_alignment(hidden: Tensor, projected: Tensor, alignment: str = "cosine") -> Tensor:
    """hidden, projected [..., d] -> the alignment loss (a scalar, fp32): the mean of
    1 − cos over positions, or the mean squared difference over positions and channels."""
    hidden, projected = hidden.float(), projected.float()
    if alignment == "cosine":
        return (1 - F.cosine_similarity(hidden, projected, dim=-1)).mean()
    if alignment == "mse":
        return (hidden - projected).pow(2).mean()
    raise ValueError(f"alignment must be 'cosine' or 'mse', got {alignment!r}")


class LET(Objective):
    """Holds the projection W (teacher d -> model d, no bias), initialised with std
    d_teacher^-0.5 so W g starts at the teacher's own scale."""

    def __init__(self, config: LETConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.config = config
        teacher = setup.models["teacher"].spec
        self.teacher_key = resolve_layer(teacher, config.teacher_layer)
        if self.teacher_key is None:  # validate reports this at teacher_layer; a hand-built spec may skip it
            raise HybridlabError(f"let: the teacher (model {teacher.name!r}) has no layer {config.teacher_layer!r}")
        self.projection = nn.Linear(teacher.d_model, setup.dims.d_model, bias=False)
        nn.init.normal_(self.projection.weight, std=teacher.d_model ** -0.5)

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict]:
        """-> (factor · align, metrics): ``align`` (the alignment loss before the factor),
        ``cosine`` (mean cos(h, W g) over positions) and ``factor`` (the schedule's value);
        past decay_steps only ``factor`` (0)."""
        factor = let_factor(run.step, self.config.decay_steps)
        if factor == 0.0:
            zero = self.projection.weight.new_zeros(())
            return zero.requires_grad_(torch.is_grad_enabled()), {"factor": zero.detach()}
        hidden = run.hidden(self.config.layer)  # [B, T, d]
        guide = run.frozen("teacher", run.batch["inputs"], hidden=(self.teacher_key,)).hidden[self.teacher_key]
        projected = self.projection(guide.float())  # [B, T, d]
        align = let_alignment(hidden, projected, self.config.alignment)
        with torch.no_grad():
            cosine = F.cosine_similarity(hidden.float(), projected, dim=-1)  # [B, T]
        metrics = {"align": align.detach(), "cosine": (cosine.sum(), cosine.numel()),
                   "factor": torch.tensor(factor)}
        return factor * align, metrics


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "let", config=LETConfig, module=LET)
