"""mixer ``hgrn2``: HGRN2 (Qin, Yang, Sun, Shen, Li, Sun & Zhong, "HGRN2: Gated Linear
RNNs with State Expansion", COLM 2024, arXiv:2404.07904): HGRN's elementwise recurrence
(plugins/mixer/hgrn.py) with its state expanded by an outer product,

    S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_t^T,    y_t = S_t^T o_t

per head (S [K, V]): the forget gate's complement is the key, the input the value, and
HGRN1's output gate becomes the query. This is GLA's recurrence with k_t = 1 - exp(g_t),
g_t = log f_t, so the kind runs on the ``gla`` op's implementations (``reference``, token
by token, and ``chunk``; see gla.py and linear_recurrence.py); there is no op of its own.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Dims
from hybridlab.core.numerics import compute_dtype
from hybridlab.registry import hookimpl

from .gla import gla_cases, gla_chunk, gla_reference
from .hgrn import log_forget, lower_bound_param
from .recurrent_layer import RecurrentConfig, RecurrentMixer


class HGRN2Config(RecurrentConfig):
    """HGRN2: S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_t^T, y_t = S_t^T o_t (GLA with k = 1 - f)."""

    kind: Literal["hgrn2"] = "hgrn2"
    conv_size: int = Field(default=0, ge=0)
    """Short causal conv (with SiLU) on q, f, i; off in the paper and fla's default. On, its
    SiLU also runs over the forget logits and the input (fla's HGRN2 conv has none)."""
    qk_norm: Literal["none"] = "none"
    """No query/key norm: the key is 1 - f, in [0, 1] by construction (the paper's)."""
    gate: bool = False
    """Output gate silu(W_gate x) on the normalised output; off in the paper (HGRN1's output
    gate became the query)."""
    lower_bound: bool = True
    """A learned per-channel lower bound on the forget gate, f = lb + (1 - lb) σ(W_f x), for
    every layer past the first (the paper's; see lower_bound_init)."""
    lower_bound_init: float | None = Field(default=None, gt=0, lt=1)
    """Initial lower bound; None: the paper's schedule at initialisation, layer / n_layers
    (no bound in the first layer)."""


class WidthNorm(nn.Module):
    """RMSNorm over the layer's whole output (all heads together, weight [H·V]), times
    silu(gate) when given: fla's HGRN2 ``g_norm`` over hidden_size (the paper's output
    normalisation), where GLA normalises each head."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, o: Tensor, gate: Tensor | None = None) -> Tensor:
        """o [B, T, H, V], gate [B, T, H, V] or None -> [B, T, H, V]"""
        B, T, H, V = o.shape
        of = o.to(compute_dtype(o.dtype)).reshape(B, T, H * V)
        y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if gate is not None:
            y = y * F.silu(gate.reshape(B, T, H * V).to(y.dtype))
        return y.view(B, T, H, V).to(o.dtype)


def _cases(dtype: torch.dtype, device: str):
    """GLA's cases with the key tied to the decay, k = 1 - exp(g), as HGRN2 calls the op."""
    for case in gla_cases(dtype, device):
        case.inputs["k"] = -torch.expm1(case.inputs["g"])
        yield case


hgrn2_cases = _cases


class HGRN2(RecurrentMixer):
    """The paper's layer, as fla's HGRN2Attention: q = silu(W_q x) (the output gate as the
    query), f = lb + (1 - lb) σ(W_f x) per key channel with the learned lower bound (see
    hgrn.lower_bound_param for the simplified schedule), k = 1 - f, v = W_i x (no
    activation), the GLA recurrence with g = log f (scale K^-0.5, fla's default), then
    RMSNorm over the whole output width and W_o. The forget logits are the middle slice of
    the shared q, k, v projection. Heads: fla sets heads = d_model / expand_ratio (128),
    head_dim = V = expand_ratio; here heads and head_dim are given as for GLA."""

    kind = "hgrn2"

    def __init__(self, config: HGRN2Config, dims: Dims) -> None:
        super().__init__(config, dims)
        if self.norm is not None:
            self.norm = WidthNorm(self.heads * self.value_dim)
        self.lower_bound = lower_bound_param(config, dims, self.heads * self.head_dim)

    def features(self, q, k, v):
        if self.conv is None:  # with a conv its SiLU already ran
            q = F.silu(q)
        return q, k, v  # k: the forget logits, made a key in recur

    def recur(self, impl, x, q, k, v, initial_state, doc_ids):
        H, K = k.shape[2:]
        theta = None if self.lower_bound is None else self.lower_bound.view(H, K)
        g = log_forget(k.to(compute_dtype(k.dtype)), theta)  # [B, T, H, K], log f ≤ 0
        key = -torch.expm1(g)  # 1 - f
        return impl.fn(q, key.to(q.dtype), v, g=g, initial_state=initial_state, doc_ids=doc_ids)


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "hgrn2", config=HGRN2Config, module=HGRN2, cases=hgrn2_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "lower_bound_init": 0.5},
                            {"heads": 4, "conv_size": 4, "gate": True, "output_norm": False}])
    register.impl("mixer", "hgrn2", "reference", fn=gla_reference, doc="GLA's: token by token in fp32")
    register.impl("mixer", "hgrn2", "chunk", fn=gla_chunk, priority=10,
                  doc="GLA's: chunks of 64 tokens (32 on CPU), per-channel decay scores by recursive halving, PyTorch")
