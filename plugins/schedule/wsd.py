"""schedule ``wsd``: warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024,
"Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").

Linear warmup to 1 over ``warmup`` steps, 1 until the cool-down, then a cool-down over the
last ``D`` steps (``decay_steps``, or ``round(decay · steps)``, at least 1) to ``min_ratio``.
The cool-down starts at ``s₀ = max(warmup, steps − D)`` and lasts ``L = steps − s₀`` steps;
with ``p = (step − s₀) / (L − 1)`` (``p = 1`` when ``L = 1``: its one step is the last), the
multiplier is ``min_ratio + (1 − min_ratio) · f(p)``:

- ``linear``: f = 1 − p
- ``cosine``: f = (1 + cos πp) / 2
- ``1-sqrt``: f = 1 − √p (Hägele et al.'s best shape)
- ``exponential``: the multiplier is ``min_ratio^p`` (geometric; needs min_ratio > 0)

so a cool-down of several steps starts at 1, and the last step has exactly ``min_ratio``.
"""

import math
from typing import Literal

from pydantic import Field, model_validator

from hybridlab.core.config import Config
from hybridlab.registry import hookimpl

SHAPES = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}


class WSDConfig(Config):
    """Learning-rate multiplier: warmup 0 to 1, stable at 1, cool-down to min_ratio over the last steps."""

    kind: Literal["wsd"] = "wsd"
    warmup: int = Field(default=0, ge=0)
    """Steps of linear warmup."""
    decay: float = Field(default=0.2, gt=0, le=1)
    """The cool-down's length as a fraction of the run's steps (ignored when decay_steps is set)."""
    decay_steps: int | None = Field(default=None, ge=1)
    """The cool-down's length in steps (default: round(decay · steps))."""
    shape: Literal["linear", "cosine", "1-sqrt", "exponential"] = "1-sqrt"
    """How the multiplier falls during the cool-down."""
    min_ratio: float = Field(default=0.0, ge=0, le=1)
    """The multiplier at the last step."""

    @model_validator(mode="after")
    def _exponential_needs_floor(self) -> "WSDConfig":
        if self.shape == "exponential" and self.min_ratio == 0:
            raise ValueError("shape exponential falls geometrically to min_ratio, which must then be above 0")
        return self


class WSD:
    def __init__(self, config: WSDConfig, steps: int) -> None:
        self.config = config
        length = config.decay_steps if config.decay_steps is not None else max(1, round(config.decay * steps))
        self.start = max(config.warmup, steps - length)  # the cool-down's first step
        self.length = steps - self.start

    def __call__(self, step: int) -> float:
        """Multiplier for optimizer step ``step`` (0-based)."""
        config = self.config
        if step < config.warmup:
            return (step + 1) / config.warmup
        if step < self.start:
            return 1.0
        # a one-step cool-down is the last step: min_ratio
        p = 1.0 if self.length <= 1 else min(1.0, (step - self.start) / (self.length - 1))
        if config.shape == "exponential":
            return config.min_ratio ** p
        return config.min_ratio + (1 - config.min_ratio) * SHAPES[config.shape](p)


@hookimpl
def hybridlab_register(register):
    register.kind("schedule", "wsd", config=WSDConfig, module=WSD)
