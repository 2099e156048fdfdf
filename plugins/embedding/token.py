"""embedding ``token``: a learned vector per token id."""

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class TokenEmbeddingConfig(Config):
    """A learned vector per token id (weight [V, D], tied to the head when it asks)."""

    kind: Literal["token"] = "token"
    scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """A constant multiplying every embedding vector (Gemma: sqrt(d_model)); a tied head
    reads the table itself, unscaled."""


class TokenEmbedding(nn.Module):
    def __init__(self, config: TokenEmbeddingConfig, dims: Dims) -> None:
        super().__init__()
        self.table = nn.Embedding(dims.vocab_size, dims.d_model)
        self.scale = config.scale

    @property
    def weight(self) -> nn.Parameter:
        return self.table.weight  # [V, D]

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.table(tokens)  # [B, T] -> [B, T, D]
        if self.scale != 1.0:  # in the table's dtype, as Gemma rounds it (sqrt(3072) is 55.5 in bf16)
            h = h * torch.tensor(self.scale, dtype=h.dtype, device=h.device)
        return h


@hookimpl
def hybridlab_register(register):
    register.kind("embedding", "token", config=TokenEmbeddingConfig, module=TokenEmbedding)
