"""mixer ``gated_deltaproduct``: Gated DeltaProduct (Siems, Carstensen, Zela, Hutter, Pontil
& Grazzi, "DeltaProduct: Improving State-Tracking in Linear RNNs via Householder Products",
2025). Gated DeltaNet taking n delta-rule steps per token, each with its own key, value
and beta, so each token's transition is a product of n generalised Householder matrices:
more expressive (rotations, permutations) for n times the recurrent work.

The core op, ``gated_delta_product(q, k, v, g, beta, *, scale, initial_state, doc_ids)``,
takes fla's layout: n keys, values and betas per token, token-major (row t·n + i of k is
step i of token t). Two implementations: ``reference`` (token by token, the n steps in an
inner loop, fp32) and ``chunk``: the n steps are n sub-tokens of a gated delta rule whose
query reads only after the last step and whose decay acts only before the first (as fla
does), run by the chunked form with the UT transform (linear_recurrence.py) in chunks of
whole tokens (64 sub-tokens for n = 2, 63 for n = 3), computing outputs only for the rows
that are read (``read_every=n``).
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

from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from .linear_recurrence import chunk_recurrence, new_document, no_autocast, recurrent_cases
from .recurrent_layer import RecurrentState, ShortConv


class GatedDeltaProductConfig(GatedDeltaNetConfig):
    """Gated DeltaProduct: Gated DeltaNet taking n = householder delta-rule steps per token.

    S_t = H_tn ... H_t1 exp(g_t) S_{t-1} + (the n writes), H_ti = I - beta_ti k_ti k_ti^T."""

    kind: Literal["gated_deltaproduct"] = "gated_deltaproduct"
    householder: int = Field(default=2, ge=1)
    """Delta-rule steps (generalised Householder transitions) per token; 1 is Gated DeltaNet."""
    allow_neg_eigval: bool = True
    """beta in (0, 2) instead of (0, 1), so each Householder factor may reflect (as in the
    paper's state-tracking results and fla's layer)."""

    def check(self, dims):
        yield from super().check(dims)
        if self.v_heads is not None and self.v_heads != self.heads:
            yield "v_heads", "gated_deltaproduct has one value head per key head; leave v_heads unset"


# ---------------------------------------------------------------- the op


def _householder_steps(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
                       doc_ids: Tensor | None) -> int:
    """Check the shapes (ValueError naming expected and received); return n, the steps per token."""
    ok = q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.shape[1] > 0
    if ok:
        B, T, H, K = q.shape
        ok = (k.shape[1] % T == 0 and k.shape[1] > 0 and (k.shape[0], k.shape[2], k.shape[3]) == (B, H, K)
              and v.shape[:3] == k.shape[:3])
    if not ok:
        raise ValueError(f"expected q [B, T, H, K], k [B, T·n, H, K] and v [B, T·n, H, V] with T ≥ 1 (n steps per "
                         f"token, row t·n + i is step i of token t); got q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}")
    n, V = k.shape[1] // T, v.shape[-1]
    expected = {"g": (B, T, H), "beta": (B, T * n, H), "initial_state": (B, H, K, V), "doc_ids": (B, T)}
    for name, value in (("g", g), ("beta", beta), ("initial_state", initial_state), ("doc_ids", doc_ids)):
        if value is not None and tuple(value.shape) != expected[name]:
            raise ValueError(f"expected {name} of shape {list(expected[name])} for q {list(q.shape)} and "
                             f"v {list(v.shape)} ({n} steps per token), got {list(value.shape)}")
    if doc_ids is not None and doc_ids.is_floating_point():
        raise ValueError(f"doc_ids must be integers (one id per document), got {doc_ids.dtype}")
    return n


@no_autocast
def gated_delta_product_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                                  scale: float | None = None, initial_state: Tensor | None = None,
                                  doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta product (Siems et al. 2025, DeltaProduct: Improving State-Tracking in
    Linear RNNs via Householder Products), n delta-rule steps per token:

        S_{t,0} = exp(g_t) S_{t-1}
        S_{t,i} = (I - β_{t,i} k_{t,i} k_{t,i}^T) S_{t,i-1} + β_{t,i} k_{t,i} v_{t,i}^T,    i = 1..n
        S_t = S_{t,n},    o_t = S_t^T (scale · q_t)

    q [B, T, H, K], k [B, T·n, H, K] (unit-norm for a contraction) and v [B, T·n, H, V] with
    row t·n + i holding step i of token t (fla's layout), g [B, T, H] (log decay, ≤ 0, once
    per token), beta [B, T·n, H] (used as given), initial_state [B, H, K, V], doc_ids [B, T]
    (packed documents: the state restarts where the id changes); scale defaults to K^-0.5.
    Returns (o [B, T, H, V], final state [B, H, K, V] in fp32, fp64 for fp64 inputs).
    Implementations: reference (token by token), chunk, triton (kernels/, docs/kernels.md), fla (optional)."""
    n = _householder_steps(q, k, v, g, beta, initial_state, doc_ids)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    scale = K ** -0.5 if scale is None else scale
    # one slice per token, taken once: indexing x[:, t] inside the loop would make the
    # backward add a full-size zero gradient per token (T² work)
    qs = (q.to(dtype) * scale)[..., None, :].unbind(1)  # T × [B, H, 1, K]: rows for matmuls
    ks = k.to(dtype).view(B, T, n, H, K, 1).unbind(1)  # T × [B, n, H, K, 1]
    vs = v.to(dtype).view(B, T, n, H, 1, V).unbind(1)  # T × [B, n, H, 1, V]
    betas = beta.to(dtype).view(B, T, n, H, 1, 1).unbind(1)  # T × [B, n, H, 1, 1]
    decays = g.to(dtype).exp()[..., None, None].unbind(1)  # T × [B, H, 1, 1]
    keeps = None if doc_ids is None else (~new_document(doc_ids)).to(dtype)[:, :, None, None, None].unbind(1)
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    out = []
    for t in range(T):
        if keeps is not None:
            S = S * keeps[t]  # a new document starts from an empty state
        S = S * decays[t]
        for k_i, v_i, beta_i in zip(ks[t].unbind(1), vs[t].unbind(1), betas[t].unbind(1)):  # the n steps
            recalled = k_i.transpose(-1, -2) @ S  # [B, H, 1, V]
            S = S + k_i * (beta_i * (v_i - recalled))
        out.append(qs[t] @ S)  # [B, H, 1, V]
    o = torch.cat(out, dim=2).transpose(1, 2)  # [B, T, H, V]
    return o.to(out_dtype), S


def gated_delta_product_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                              scale: float | None = None, initial_state: Tensor | None = None,
                              doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as gated_delta_product_reference: a gated delta rule over T·n
    sub-tokens in chunks (see default_chunk), UT transform."""
    n = _householder_steps(q, k, v, g, beta, initial_state, doc_ids)
    B, T, H, K = q.shape
    # sub-token t·n + i is step i of token t: token t's decay acts before its first step, its
    # query reads after its last, and a new document starts at its first step
    q_steps = torch.cat([q.new_zeros(B, T, n - 1, H, K), q[:, :, None]], dim=2).view(B, T * n, H, K)
    g_steps = torch.cat([g[:, :, None], g.new_zeros(B, T, n - 1, H)], dim=2).view(B, T * n, H)
    doc_steps = None if doc_ids is None else doc_ids.repeat_interleave(n, dim=1)  # [B, T·n]
    # only the rows after each token's last step are read; chunks hold whole tokens (on CPU 32
    # sub-steps for n = 2, 30 for n = 3)
    return chunk_recurrence(q_steps, k, v, g=g_steps, beta=beta, scale=K ** -0.5 if scale is None else scale,
                            initial_state=initial_state, doc_ids=doc_steps,
                            read_every=n)


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # decays from mild to strong (a chunk's cumulative decay underflows fp32 at the strong end)
    strength = (0.5, 2.0, 6.0)[n % 3]
    return {"g": F.logsigmoid(torch.randn(B, T, H) * strength + 1.0)}


_token_cases = recurrent_cases(_gates, unit_keys=True)


def gated_delta_product_cases(dtype: torch.dtype, device: str):
    """The recurrent grid (every T, both batches, initial states, packed documents) with
    n = 2 steps per token, n = 3 in every third case, and beta in (0, 2) in every other."""
    for i, case in enumerate(_token_cases(dtype, device)):
        B, T, H, K = case.inputs["q"].shape
        V = case.inputs["v"].shape[-1]
        n = 3 if i % 3 == 2 else 2
        case.inputs["k"] = F.normalize(torch.randn(B, T * n, H, K), dim=-1)
        case.inputs["v"] = torch.randn(B, T * n, H, V)
        case.inputs["beta"] = torch.rand(B, T * n, H) * (2.0 if i % 2 else 1.0)
        case.label += f" n{n}"
        yield case


# ---------------------------------------------------------------- the module


class GatedDeltaProduct(GatedDeltaNet):
    """The paper's layer (as fla's GatedDeltaProduct): Gated DeltaNet's (one query, one
    decay g_t = -exp(A_log) · softplus(W_a x_t + dt_bias) and one output gate per token)
    with n keys, values and betas per token from wider projections, all through the SiLU
    short convolution; keys l2-normalised."""

    kind = "gated_deltaproduct"

    def __init__(self, config: GatedDeltaProductConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        H, K, V, n = self.heads, self.head_dim, self.value_dim, config.householder
        width = H * (K + n * K + n * V)  # q, then n keys and n values per head, step-major (fla's (n h d))
        self.qkv = nn.Linear(dims.d_model, width, bias=False)
        self.conv = ShortConv(width, config.conv_size) if config.conv_size else None
        self.beta = nn.Linear(dims.d_model, n * H, bias=False)

    def gates(self, x):
        B, T, _ = x.shape
        gates = super().gates(x)  # g [B, T, H], beta [B, T, n·H]
        gates["beta"] = gates["beta"].view(B, T * self.config.householder, self.heads)  # [B, T·n, H]
        return gates

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        B, T, _ = x.shape
        H, K, V, n = self.heads, self.head_dim, self.value_dim, self.config.householder
        qkv = self.qkv(x)  # [B, T, H·(K + nK + nV)]
        tail = None
        if self.conv is not None:
            qkv, tail = self.conv(qkv, None if state is None else state.conv, doc_ids)
        q, k, v = qkv.split([H * K, n * H * K, n * H * V], dim=-1)
        q, k, v = self.features(q.view(B, T, H, K), k.reshape(B, T * n, H, K), v.reshape(B, T * n, H, V))
        impl = self.impl_for(self.config, x, decoding=state is not None)
        o, S = impl.fn(q, k, v, **self.gates(x), initial_state=None if state is None else state.recurrent,
                       doc_ids=doc_ids)  # [B, T, H, V]
        if self.norm is not None or self.gate is not None:
            gate = None if self.gate is None else self.gate(x).view(B, T, H, V)
            o = self.norm(o, gate) if self.norm is not None else o * F.silu(gate)
        y = self.out(o.reshape(B, T, H * V))  # [B, T, D]
        return y, None if state is None else RecurrentState(S, tail)


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "gated_deltaproduct", config=GatedDeltaProductConfig, module=GatedDeltaProduct,
                  cases=gated_delta_product_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "householder": 3,
                                           "allow_neg_eigval": False},
                            {"heads": 4, "conv_size": 0, "gate": False, "output_norm": False, "householder": 1}])
    register.impl("mixer", "gated_deltaproduct", "reference", fn=gated_delta_product_reference,
                  doc="token by token (the n steps in an inner loop) in fp32")
    register.impl("mixer", "gated_deltaproduct", "chunk", fn=gated_delta_product_chunk, priority=10,
                  doc="n sub-tokens per token, chunks of sub-tokens (64 on GPU, 32 on CPU), UT transform, PyTorch")
