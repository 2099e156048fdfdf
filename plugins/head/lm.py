"""head ``lm``: a linear map from the hidden state to next-token logits."""

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims, ImageShaped
from hybridlab.registry import hookimpl


class LMHeadConfig(Config):
    """Hidden [B, T, D] -> logits [B, T, V]."""

    kind: Literal["lm"] = "lm"
    tied: bool = True
    """Share the weight with the embedding (which must expose weight [V, D])."""
    softcap: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Soft-cap the logits: softcap · tanh(logits / softcap) (Gemma 2 uses 30)."""

    def check_embedding(self, embedding: Config) -> str | None:
        """core.config.PairsWithEmbedding: a tied head needs a token table [V, D]; an image
        embedding (ImageShaped) has none."""
        if self.tied and isinstance(embedding, ImageShaped):
            return (f"lm is tied (tied: true, the default) to the embedding's token table, but embedding "
                    f"{embedding.kind!r} reads images and has none; set tied: false, or use a token embedding "
                    "(an image model writes images with head: {kind: unpatchify})")
        return None


class LMHead(nn.Module):
    def __init__(self, config: LMHeadConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.tied = config.tied  # core.interfaces.TiedHead: the model shares the embedding's weight
        self.weight = nn.Parameter(torch.empty(dims.vocab_size, dims.d_model))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, 0.0, std)

    def forward(self, h: Tensor) -> Tensor:
        logits = h @ self.weight.t()  # [B, T, D] @ [D, V]
        if self.config.softcap is not None:
            logits = torch.tanh(logits / self.config.softcap) * self.config.softcap
        return logits


@hookimpl
def hybridlab_register(register):
    register.kind("head", "lm", config=LMHeadConfig, module=LMHead)
