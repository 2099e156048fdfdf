"""embedding ``token``: a learned vector per token id."""

from typing import Literal

from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class TokenEmbeddingConfig(Config):
    """A learned vector per token id (weight [V, D], tied to the head when it asks)."""

    kind: Literal["token"] = "token"


class TokenEmbedding(nn.Module):
    def __init__(self, config: TokenEmbeddingConfig, dims: Dims) -> None:
        super().__init__()
        self.table = nn.Embedding(dims.vocab_size, dims.d_model)

    @property
    def weight(self) -> nn.Parameter:
        return self.table.weight  # [V, D]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(tokens)  # [B, T] -> [B, T, D]


@hookimpl
def hybridlab_register(register):
    register.kind("embedding", "token", config=TokenEmbeddingConfig, module=TokenEmbedding)
