"""loss ``distill``: knowledge distillation from a frozen teacher's logits (Hinton, Vinyals &
Dean 2015, "Distilling the Knowledge in a Neural Network").

The teacher (another run's latest weights, loaded frozen) reads the same ``inputs`` as the
student, on the fly under ``no_grad``; at every scored position both logit vectors are
softened by the temperature T and compared by a KL divergence, scaled by T² so that the
gradient keeps its size as T changes (Hinton et al., section 2):

    p_t = softmax(z_teacher / T),  p_s = softmax(z_student / T)
    forward:  KL(p_t || p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v))   (mass-covering)
    reverse:  KL(p_s || p_t) = Σ_v p_s(v) (log p_s(v) − log p_t(v))   (mode-seeking)
    loss = T² · mean over scored positions of the KL

The student and the teacher must share a vocabulary (the same vocab_size; validate refuses
a teacher with another).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from hybridlab.core.config import LossConfig, Needs
from hybridlab.core.objectives import Objective, ObjectiveRun, ObjectiveSetup
from hybridlab.registry import hookimpl


class DistillConfig(LossConfig):
    """KL divergence between the student's and a frozen teacher's softened next-token
    distributions, on the positions whose target is scored."""

    kind: Literal["distill"] = "distill"
    teacher: str
    """The teacher: a run directory (relative to the pipeline file) with at least one
    checkpoint; its latest weights are loaded frozen. Its vocab_size must equal the model's."""
    temperature: float = Field(default=1.0, gt=0)
    """T: both logit vectors are divided by T before the softmax; the KL is multiplied by T²."""
    direction: Literal["forward", "reverse"] = "forward"
    """forward: KL(teacher || student), the student covers all of the teacher's mass (Hinton);
    reverse: KL(student || teacher), the student concentrates on the teacher's modes."""
    top_k: int | None = Field(default=None, ge=1)
    """Compare only the teacher's k most likely tokens at each position: both distributions are
    restricted to that set and renormalised over it (a softmax of the k logits / T) before the
    KL. Student mass outside the set is not penalised. None: the whole vocabulary; k ≥
    vocab_size is the same as None."""
    ignore_index: int = -100
    """Positions whose target equals this are not scored (nor counted in the metrics); every
    other position is."""

    def needs(self) -> Needs:
        return Needs(fields=("inputs", "targets"), models=("teacher",))

    def check_pipeline(self, pipeline, models):
        teacher = models.get("teacher")  # absent when a saved run is re-read (checked when it was written)
        if teacher is not None and teacher.vocab_size != pipeline.model.vocab_size:
            yield "teacher", (f"the teacher's vocabulary ({teacher.vocab_size} tokens, model {teacher.name!r}) differs "
                              f"from the model's ({pipeline.model.vocab_size}, model {pipeline.model.name!r}); "
                              "distillation compares the two distributions token by token, so both must use one "
                              "vocabulary")


def distill_kl(student: Tensor, teacher: Tensor, *, temperature: float = 1.0,
               direction: str = "forward", top_k: int | None = None) -> Tensor:
    """student, teacher [..., V] logits -> the KL per position [...] (fp32, not scaled by T²).

    forward: KL(p_t || p_s), reverse: KL(p_s || p_t), with p = softmax(logits / T). With
    ``top_k``, S = the teacher's k largest logits at that position and both p are
    softmax(logits[S] / T): distributions over S alone, each renormalised to sum to 1."""
    student, teacher = student.float(), teacher.float()
    if top_k is not None and top_k < teacher.shape[-1]:
        index = teacher.topk(top_k, dim=-1).indices  # [..., k]
        student, teacher = student.gather(-1, index), teacher.gather(-1, index)
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    if direction == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if direction == "reverse":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


class Distill(Objective):
    """No parameters of its own: reads the student's logits on ``inputs`` and runs the teacher."""

    def __init__(self, config: DistillConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.config = config

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict]:
        """-> (T² · mean KL, metrics): ``kl`` (the mean KL, unscaled), ``agreement`` (student
        argmax == teacher argmax over the whole vocabulary) and ``teacher_accuracy`` (teacher
        argmax == target), all on scored positions."""
        config = self.config
        logits, targets = run.output.logits, run.batch["targets"]  # [B, T, V], [B, T]
        teacher = run.frozen("teacher", run.batch["inputs"]).logits  # [B, T, V], no gradient
        mask = targets != config.ignore_index  # [B, T]
        kl = distill_kl(logits[mask], teacher[mask], temperature=config.temperature,
                        direction=config.direction, top_k=config.top_k)  # [N]
        count = mask.sum()
        loss = config.temperature ** 2 * kl.sum() / count.clamp(min=1)
        with torch.no_grad():
            student_top, teacher_top = logits[mask].argmax(-1), teacher[mask].argmax(-1)
            metrics = {"kl": (kl.detach().sum(), count), "agreement": ((student_top == teacher_top).sum(), count),
                       "teacher_accuracy": ((teacher_top == targets[mask]).sum(), count)}
        return loss, metrics


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "distill", config=DistillConfig, module=Distill)
