"""objective ``diffusion``: train the model to denoise images, with an ε-, v- or
flow-matching target, and sample from it (``hybridlab sample``).

A schedule gives, for t in [0, 1], the signal and noise scales α(t), σ(t) of

    x_t = α(t) x₀ + σ(t) ε,    ε ~ N(0, I)

    cosine     α = cos(πt/2),  σ = sin(πt/2)                          (variance preserving)
    linear     α = exp(−½ ∫₀ᵗ β),  σ = sqrt(1 − α²),  β(t) = β₀ + (β₁ − β₀) t,
               β₀ = 0.1, β₁ = 20: DDPM's linear betas 1e-4 … 0.02 over 1000 steps, in
               continuous time (Song et al. 2021's VP SDE)
    rectified  α = 1 − t,  σ = t                                      (rectified flow)

and the model, run on (x_t, t, label), regresses one of three targets, with MSE:

    eps    ε                                  (Ho et al. 2020)
    v      α ε − σ x₀                         (Salimans & Ho 2022)
    flow   dx_t/dt = α'(t) x₀ + σ'(t) ε       (flow matching; ε − x₀ on the rectified schedule)

Each target determines (x₀, ε) from x_t (``to_x0_eps``), so one deterministic sampler
serves all three: from t = 1 to 0 in ``steps`` equal steps, x₀ is predicted and clipped
to the data's range [−1, 1], ε recomputed from it, and x_{t'} = α(t') x₀ + σ(t') ε (DDIM
with η = 0; on the rectified schedule without clipping this is Euler's method on the flow).
Classifier-free guidance (Ho & Salimans 2022): labels are replaced by the null label with
probability ``label_dropout`` in training; sampling with guidance w predicts
p_null + w (p_label − p_null).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from hybridlab.core.config import ImageShaped, LossConfig, Needs
from hybridlab.core.interfaces import Sampler
from hybridlab.core.objectives import Objective, ObjectiveRun, ObjectiveSetup
from hybridlab.registry import hookimpl

T_EDGE = 1e-3  # t is drawn in [T_EDGE, 1 − T_EDGE]: the linear schedule's σ' is infinite at 0, α is 0 at 1
BETA_MIN, BETA_MAX = 0.1, 20.0  # the linear schedule's β(t) per unit time (DDPM's 1e-4 … 0.02 × 1000 steps)
DEFAULT_SCHEDULE = {"eps": "cosine", "v": "cosine", "flow": "rectified"}


def schedule(name: str, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """t [...] -> (α, σ, dα/dt, dσ/dt), each of t's shape, in float32 or above."""
    t = t.float() if t.dtype not in (torch.float32, torch.float64) else t
    if name == "cosine":
        half_pi = math.pi / 2
        a, s = torch.cos(half_pi * t), torch.sin(half_pi * t)
        return a, s, -half_pi * s, half_pi * a
    if name == "linear":
        beta = BETA_MIN + (BETA_MAX - BETA_MIN) * t
        log_a = -0.5 * (BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t)
        a = torch.exp(log_a)
        s = torch.sqrt(-torch.expm1(2 * log_a))  # sqrt(1 − α²), accurate near t = 0
        return a, s, -0.5 * beta * a, 0.5 * beta * a * a / s
    if name == "rectified":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    raise ValueError(f"unknown schedule {name!r}; one of cosine, linear, rectified")


def _b(x: Tensor, like: Tensor) -> Tensor:
    """A per-row [B] value broadcast over an image [B, C, H, W]."""
    return x.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def target_of(kind: str, x0: Tensor, eps: Tensor, t: Tensor, schedule_name: str) -> Tensor:
    """What the model regresses at (x₀, ε, t): ε, v = α ε − σ x₀, or dx_t/dt = α' x₀ + σ' ε."""
    a, s, da, ds = (_b(v, x0) for v in schedule(schedule_name, t))
    if kind == "eps":
        return eps
    if kind == "v":
        return a * eps - s * x0
    if kind == "flow":
        return da * x0 + ds * eps
    raise ValueError(f"unknown target {kind!r}; one of eps, v, flow")


def to_x0_eps(kind: str, pred: Tensor, xt: Tensor, t: Tensor, schedule_name: str) -> tuple[Tensor, Tensor]:
    """A prediction of the target at x_t -> (x₀, ε) it implies (the inverse of ``target_of``
    given x_t = α x₀ + σ ε)."""
    a, s, da, ds = (_b(v, xt) for v in schedule(schedule_name, t))
    if kind == "eps":
        return (xt - s * pred) / a.clamp_min(1e-8), pred
    if kind == "v":  # α x_t − σ v = (α² + σ²) x₀ and σ x_t + α v = (α² + σ²) ε
        norm = a * a + s * s
        return (a * xt - s * pred) / norm, (s * xt + a * pred) / norm
    if kind == "flow":  # [x_t; u] = [[α, σ], [α', σ']] [x₀; ε]
        det = a * ds - s * da
        return (ds * xt - s * pred) / det, (a * pred - da * xt) / det
    raise ValueError(f"unknown target {kind!r}; one of eps, v, flow")


class DiffusionConfig(LossConfig):
    """Denoising of images: ε-, v- or flow-matching targets on a noise schedule, with label
    dropout for classifier-free guidance."""

    kind: Literal["diffusion"] = "diffusion"
    target: Literal["eps", "v", "flow"] = "eps"
    """What the model predicts from (x_t, t, label): eps (the noise), v (α ε − σ x₀) or flow
    (the velocity dx_t/dt)."""
    schedule: Literal["cosine", "linear", "rectified"] | None = None
    """α(t), σ(t): cosine, linear (DDPM's betas) or rectified (α = 1 − t, σ = t).
    null: cosine for eps and v, rectified for flow."""
    label_dropout: float = Field(default=0.1, ge=0, lt=1)
    """Probability that a training example's label is replaced by the null label, so the
    model also learns the unconditional prediction that guidance needs (0: never; then
    ``hybridlab sample --guidance`` must stay 1). Must be 0 for an unconditional model."""

    def schedule_name(self) -> str:
        return self.schedule or DEFAULT_SCHEDULE[self.target]

    def needs(self) -> Needs:
        # runs the model itself on noised images; reads the whole image (no causal order to keep)
        return Needs(fields=("inputs", "labels"), forward=False, causal=False, images=True)

    def check_pipeline(self, pipeline: Any, models: dict[str, Any]):
        # images end to end (task, embedding, head: Needs.images) is the core's check, and the
        # head's channels and patch against the embedding's the model spec's
        data, embedding = pipeline.data, pipeline.model.embedding
        if not isinstance(data, ImageShaped) or not isinstance(embedding, ImageShaped):
            return
        if embedding.image_shape() != data.image_shape():
            yield None, (f"model.embedding takes images {list(embedding.image_shape())} (channels, image_size²) but "
                         f"task {data.kind!r} yields {list(data.image_shape())}")
        classes = embedding.label_count()
        if classes and classes != data.label_count():
            yield None, (f"model.embedding.classes is {classes} but task {data.kind!r} has {data.label_count()} "
                         "classes; make them equal (or 0 for an unconditional model)")
        if not classes and self.label_dropout > 0:
            yield "label_dropout", (f"is {self.label_dropout}, but the model is unconditional (model.embedding."
                                    "classes is 0): there is no label to drop; set label_dropout: 0")


class Diffusion(Sampler, Objective):
    def __init__(self, config: DiffusionConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.target, self.schedule_name = config.target, config.schedule_name()
        self.label_dropout = config.label_dropout
        embedding = setup.model_spec.embedding
        self.classes = embedding.label_count() if isinstance(embedding, ImageShaped) else 0
        self.guided = bool(self.classes) and config.label_dropout > 0  # Sampler: it learned the null label

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict[str, Any]]:
        x0 = run.batch["inputs"].float()  # [B, C, H, W]
        labels = run.batch["labels"]
        B, g = x0.shape[0], run.generator
        if run.training:  # uniform t; in evaluation a fixed grid, so the metric's noise is the data's alone
            t = torch.rand(B, generator=g, device=x0.device)
        else:
            t = (torch.arange(B, device=x0.device) + 0.5) / B
        t = T_EDGE + (1 - 2 * T_EDGE) * t
        eps = torch.randn(x0.shape, generator=g, device=x0.device)
        a, s, _, _ = (_b(v, x0) for v in schedule(self.schedule_name, t))
        xt = a * x0 + s * eps
        if run.training and self.classes and self.label_dropout > 0:
            drop = torch.rand(B, generator=g, device=x0.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.classes), labels)
        pred = run.forward(xt, condition={"t": t, "labels": labels}).logits.float()  # [B, C, H, W]
        target = target_of(self.target, x0, eps, t, self.schedule_name)
        loss = (pred - target).pow(2).mean()
        with torch.no_grad():  # comparable across targets: the x₀ each prediction implies
            x0_hat, _ = to_x0_eps(self.target, pred, xt, t, self.schedule_name)
            x0_mse = (x0_hat.clamp(-1, 1) - x0).pow(2).mean()
        return loss, {"x0_mse": (x0_mse * B, B)}

    @torch.no_grad()
    def sample(self, model, labels: Tensor | None, *, count: int, steps: int, guidance: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """-> images [count, C, H, W] in [−1, 1]. ``labels`` [count] long (None for an
        unconditional model); guidance w ≠ 1 mixes in the null label's prediction."""
        C, H, W = model.spec.embedding.image_shape()
        device = next(model.parameters()).device
        x = torch.randn(count, C, H, W, generator=generator, device=device)
        null = torch.full((count,), self.classes, dtype=torch.long, device=device)
        labels = null if labels is None else labels.to(device)
        grid = torch.linspace(1 - T_EDGE, T_EDGE, steps, device=device).tolist() + [0.0]
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            t = torch.full((count,), t_now, device=device)
            pred = model(x, condition={"t": t, "labels": labels}).logits.float()
            if guidance != 1.0:
                uncond = model(x, condition={"t": t, "labels": null}).logits.float()
                pred = uncond + guidance * (pred - uncond)
            x0, _ = to_x0_eps(self.target, pred, x, t, self.schedule_name)
            x0 = x0.clamp(-1, 1)
            a, s, _, _ = (_b(v, x) for v in schedule(self.schedule_name, t))
            eps = (x - a * x0) / s  # consistent with the clipped x₀
            a_next, s_next, _, _ = (_b(v, x) for v in schedule(self.schedule_name, torch.full_like(t, t_next)))
            x = a_next * x0 + s_next * eps
        return x


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "diffusion", config=DiffusionConfig, module=Diffusion)
