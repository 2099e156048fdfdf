"""mixer ``shift``: token shift, y_t = W [x_t ; x_{t-1}] (the token shift of RWKV's time
mixing, Peng et al. 2023, with a learned linear map in place of the interpolation).

The smallest useful sequence mixer: each token sees itself and the token before it, so
its decoding state is one token, [B, 1, D], whatever the sequence length. It has no
separate implementations: the module below is the whole computation.
"""

from typing import Literal

import torch
from torch import Tensor

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.registry import hookimpl


class ShiftConfig(Config):
    """Token shift: each output is a linear map of the current and the previous token."""

    kind: Literal["shift"] = "shift"
    bias: bool = False
    """Bias on the output projection."""


def token_shift(x: Tensor, last: Tensor | None = None, *, doc_ids: Tensor | None = None) -> Tensor:
    """x [B, T, D] -> x_{t-1} [B, T, D].

    ``last`` [B, 1, D] is the token before x[:, 0] (from a decoding state); None means
    the sequence starts here, so x[:, 0] sees zeros. With ``doc_ids`` [B, T] (packed
    sequences), a token whose document differs from its predecessor's also sees zeros."""
    B, T, D = x.shape
    first = x.new_zeros(B, 1, D) if last is None else last.to(x.dtype)
    prev = torch.cat([first, x[:, :-1]], dim=1)  # [B, T, D]
    if doc_ids is not None:
        same = torch.ones_like(doc_ids, dtype=torch.bool)  # [B, T]
        same[:, 1:] = doc_ids[:, 1:] == doc_ids[:, :-1]
        prev = prev * same[..., None]
    return prev


class Shift(SequenceMixer):
    """``forward(x, state)`` returns the last token of x as the new state; the base
    class's ``step`` is ``forward`` on one token, which is exactly a decoding step."""

    def __init__(self, config: ShiftConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.d_model = dims.d_model
        self.proj = torch.nn.Linear(2 * dims.d_model, dims.d_model, bias=config.bias)
        self.proj.residual_out = True  # the block's output projection: GPT-2 init scaling

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        prev = token_shift(x, state, doc_ids=doc_ids)  # [B, T, D]
        y = self.proj(torch.cat([x, prev], dim=-1))  # [B, T, 2D] -> [B, T, D]
        if state is not None and x.shape[1] > 0:
            state = x[:, -1:]  # [B, 1, D]: what the next token will see as x_{t-1}
        return y, state

    def init_state(self, batch, device, dtype):
        return torch.zeros(batch, 1, self.d_model, device=device, dtype=dtype)  # nothing before token 0

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        return self.d_model * dtype.itemsize  # one token, independent of seq_len


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "shift", config=ShiftConfig, module=Shift)
