"""What the core expects of the modules plugins build, and what a model returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

State = Any  # whatever a mixer keeps between calls: a KV cache, a recurrent matrix...


class Aux:
    """The side channel for auxiliary losses and metrics. It is passed explicitly down
    the model (``aux=``) and returned in :class:`ModelOutput`; nothing is kept in
    globals or module attributes. ``aux.scope("layers.3.ffn")`` writes with a prefix."""

    def __init__(self, losses: dict[str, Tensor] | None = None, metrics: dict[str, Tensor] | None = None,
                 prefix: str = "") -> None:
        self.losses = {} if losses is None else losses
        self.metrics = {} if metrics is None else metrics
        self.prefix = prefix

    def scope(self, name: str) -> "Aux":
        return Aux(self.losses, self.metrics, f"{self.prefix}{name}.")

    def add_loss(self, name: str, value: Tensor) -> None:
        """An auxiliary loss, added (already weighted) to the training objective."""
        self.losses[self.prefix + name] = value

    def add_metric(self, name: str, value: Tensor | float) -> None:
        self.metrics[self.prefix + name] = value


class SequenceMixer(nn.Module):
    """Base for mixers: ``forward`` runs a sequence (optionally continuing from a
    state), ``step`` runs one token from a state. With ``state=None`` a mixer runs
    stateless and returns ``None`` as its state; with a state (from ``init_state``) it
    returns the state after the last token."""

    def forward(self, x: Tensor, state: State | None = None, *, doc_ids: Tensor | None = None,
                aux: Aux | None = None) -> tuple[Tensor, State | None]:
        """x [B, T, D] -> (y [B, T, D], state)"""
        raise NotImplementedError

    def step(self, x: Tensor, state: State, *, aux: Aux | None = None) -> tuple[Tensor, State]:
        """One token: x [B, 1, D] -> (y [B, 1, D], new state)."""
        return self.forward(x, state, aux=aux)

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        raise NotImplementedError(f"{type(self).__name__} cannot decode step by step")

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of decoding state per sequence after ``seq_len`` tokens."""
        return 0


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    state: list[State] | None = None  # one entry per block when decoding
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)


SubLayer = Callable[[Tensor], Tensor]
