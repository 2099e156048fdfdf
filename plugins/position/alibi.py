"""position ``alibi``: attention with linear biases (Press et al. 2022, "Train Short, Test
Long"). Nothing rotates; instead each head h subtracts slope_h · |i − j| from the score of
query i on key j. The attention op applies the bias (its ``alibi=`` option); this module
only says which slopes, through ``distance_slopes(heads)``."""

from typing import Literal

import torch
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.registry import hookimpl


class ALiBiConfig(Config):
    """Linear distance bias on attention scores, one geometric slope per head."""

    kind: Literal["alibi"] = "alibi"


def alibi_slopes(heads: int) -> Tensor:
    """[H] float32: the geometric sequence 2^(-8/n · (1..n)) for n = heads a power of two;
    otherwise those of the nearest lower power of two, then every other one of 2n."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    n = 2 ** (heads.bit_length() - 1)
    return torch.tensor(powers(n) + powers(2 * n)[0::2][: heads - n], dtype=torch.float32)


class ALiBi(nn.Module):
    def __init__(self, config: ALiBiConfig, dims: Dims, head_dim: int) -> None:
        super().__init__()

    def rotate(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        return x  # ALiBi does not touch q or k

    def distance_slopes(self, heads: int) -> Tensor:
        return alibi_slopes(heads)


@hookimpl
def hybridlab_register(register):
    register.kind("position", "alibi", config=ALiBiConfig, module=ALiBi)
