"""mixer ``linear_attention``: linear attention (Katharopoulos, Vyas, Pappas & Fleuret,
"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", ICML
2020): softmax(q k^T) replaced by phi(q) phi(k)^T, so causal attention is an RNN whose state
is Σ phi(k_t) v_t^T.

The core op, ``linear_attn(q, k, v, *, scale, initial_state, doc_ids)``, has two
implementations: ``reference`` (token by token, fp32) and ``chunk`` (chunks of 64 tokens (32 on CPU); see
linear_recurrence.py). The paper's normaliser phi(q_t)·Σ phi(k_j) is computed by the same
op: the module appends a column of ones to v, whose output is the normaliser.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from hybridlab.core.config import Dims
from hybridlab.registry import hookimpl

from .linear_recurrence import check_inputs, chunk_recurrence, recurrent_cases, recurrent_reference
from .recurrent_layer import RecurrentConfig, RecurrentMixer

FEATURE_MAPS = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}


class LinearAttentionConfig(RecurrentConfig):
    """Linear attention: S_t = S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t) (/ normaliser)."""

    kind: Literal["linear_attention"] = "linear_attention"
    feature_map: Literal["elu", "relu", "identity"] = "elu"
    """phi applied to queries and keys: elu(x) + 1 (the paper's), relu, or none."""
    normalize: bool = Field(default=True, validate_default=True)
    """Divide by phi(q_t)·Σ_j phi(k_j), the paper's normaliser (needs a non-negative phi)."""
    output_norm: bool = False
    """RMSNorm of each head's output before the output projection."""

    @field_validator("normalize")
    @classmethod
    def _needs_positive_features(cls, normalize: bool, info: ValidationInfo) -> bool:
        if normalize and info.data.get("feature_map") == "identity":
            raise ValueError("needs a non-negative feature_map (elu or relu), got feature_map: identity; "
                             "set normalize: false or pick another feature_map")
        return normalize


# ---------------------------------------------------------------- the op


def linear_attn_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                          initial_state: Tensor | None = None,
                          doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal linear attention (Katharopoulos et al. 2020, Transformers are RNNs), q and k
    already through the feature map, unnormalised:

        S_t = S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale · q_t)

    q, k [B, T, H, K], v [B, T, H, V], initial_state [B, H, K, V], doc_ids [B, T] (packed
    documents: the state restarts where the id changes); scale defaults to K^-0.5.
    Returns (o [B, T, H, V], final state [B, H, K, V] in fp32, fp64 for fp64 inputs).
    Implementations: reference (token by token), chunk, triton, fla (optional)."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    return recurrent_reference(q, k, v, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def linear_attn_chunk(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                      initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as linear_attn_reference; chunks of 64 tokens (32 on CPU)."""
    check_inputs(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
    return chunk_recurrence(q, k, v, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


linear_attn_cases = recurrent_cases(lambda B, T, H, K, n: {})


# ---------------------------------------------------------------- the module


class LinearAttention(RecurrentMixer):
    """The paper's layer: phi(x) = elu(x) + 1 on queries and keys (after fla's SiLU short
    convolutions), outputs divided by phi(q_t)·Σ_j phi(k_j). No decay: the state only grows,
    so long contexts blur; the decaying kinds (retention, gla, gated_deltanet) fix that."""

    kind = "linear_attention"
    eps = 1e-6  # keeps the normaliser away from 0 when every feature is 0 (relu)

    def __init__(self, config: LinearAttentionConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        self.value_extra = 1 if config.normalize else 0  # the normaliser's column in the state

    def features(self, q, k, v):
        phi = FEATURE_MAPS[self.config.feature_map]
        q, k, v = super().features(q, k, v)
        return phi(q), phi(k), v

    def recur(self, impl, x, q, k, v, initial_state, doc_ids):
        if not self.config.normalize:
            return impl.fn(q, k, v, initial_state=initial_state, doc_ids=doc_ids)
        ones = torch.ones_like(v[..., :1])
        o, S = impl.fn(q, k, torch.cat([v, ones], dim=-1), initial_state=initial_state, doc_ids=doc_ids)
        return o[..., :-1] / (o[..., -1:] + self.eps), S  # [B, T, H, V]: numerator / phi(q)·Σ phi(k)


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "linear_attention", config=LinearAttentionConfig, module=LinearAttention,
                  cases=linear_attn_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "feature_map": "relu",
                                           "gate": True, "output_norm": True},
                            {"heads": 4, "conv_size": 0, "normalize": False, "feature_map": "identity"}])
    register.impl("mixer", "linear_attention", "reference", fn=linear_attn_reference, doc="token by token in fp32")
    register.impl("mixer", "linear_attention", "chunk", fn=linear_attn_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU), PyTorch")
