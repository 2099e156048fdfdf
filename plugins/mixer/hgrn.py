"""mixer ``hgrn``: HGRN (Qin, Yang & Zhong, "Hierarchically Gated Recurrent Neural Network
for Sequence Modeling", NeurIPS 2023): an elementwise gated linear RNN, h_t = f_t ⊙ h_{t-1}
+ (1 - f_t) ⊙ i_t, with a data-dependent forget gate and an output gate.

The core op, ``hgrn(x, g, *, initial_state, output_final_state, doc_ids)`` (fla's
``chunk_hgrn`` / ``fused_recurrent_hgrn``: x, g [B, T, D], initial_state [B, D], returns
``(o, final_state or None)``), has two implementations: ``reference`` (token by token,
fp32) and ``chunk`` (a blocked scan: every chunk of 32 tokens scanned in parallel from a
zero state, then the chunks' entering states carried chunk to chunk and added through the
cumulative decay). HGRN2 (plugins/mixer/hgrn2.py) is the outer-product (state-expanded)
form of this recurrence and runs on the GLA op.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import compute_dtype
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl

from .linear_recurrence import new_document

CHUNK = 32  # tokens per chunk of the blocked scan


# ---------------------------------------------------------------- the op


def check_hgrn_inputs(x: Tensor, g: Tensor, initial_state: Tensor | None, doc_ids: Tensor | None) -> None:
    """Raise ValueError naming the expected and received shapes and dtypes (values, g ≤ 0
    and NaN, are checked by the public op in hybridlab.ops)."""
    if x.dim() != 3 or g.shape != x.shape:
        raise ValueError(f"hgrn: expected x and g of one shape [B, T, D]; got x {list(x.shape)}, g {list(g.shape)}")
    for name, value in (("x", x), ("g", g), ("initial_state", initial_state)):
        if value is not None and not value.is_floating_point():
            raise ValueError(f"hgrn: {name} must be floating point, got {value.dtype}")
    B, T, D = x.shape
    if initial_state is not None and tuple(initial_state.shape) != (B, D):
        raise ValueError(f"hgrn: expected initial_state of shape {[B, D]} for x {list(x.shape)}, "
                         f"got {list(initial_state.shape)}")
    if doc_ids is not None:
        if tuple(doc_ids.shape) != (B, T):
            raise ValueError(f"hgrn: expected doc_ids of shape {[B, T]} for x {list(x.shape)}, got {list(doc_ids.shape)}")
        if doc_ids.is_floating_point():
            raise ValueError(f"hgrn: doc_ids must be integers (one id per document), got {doc_ids.dtype}")


def _decays(x: Tensor, g: Tensor, doc_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """x, g -> (x, a = exp(g)) in the compute dtype, a = 0 at each new document's first token."""
    dtype = compute_dtype(x.dtype)
    a = g.to(dtype).exp()
    if doc_ids is not None:
        a = a.masked_fill(new_document(doc_ids)[..., None], 0.0)
    return x.to(dtype), a


def hgrn_reference(x: Tensor, g: Tensor, initial_state: Tensor | None = None, output_final_state: bool = False,
                   *, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """HGRN's elementwise gated recurrence (Qin, Yang & Zhong 2023, Hierarchically Gated
    Recurrent Neural Network for Sequence Modeling), as fla's ``hgrn`` ops:

        h_t = exp(g_t) ⊙ h_{t-1} + x_t,    o_t = h_t

    x, g [B, T, D] (g the log of the forget gate, ≤ 0; the layer passes x = (1 - f) ⊙ i),
    initial_state [B, D], doc_ids [B, T] (packed documents: the state restarts where the id
    changes; not in fla). Returns (o [B, T, D] in x's dtype, final state [B, D] in fp32
    (fp64 for fp64 inputs) when ``output_final_state``, else None), fla's convention.
    Implementations: reference (token by token), chunk."""
    check_hgrn_inputs(x, g, initial_state, doc_ids)
    xs, a = _decays(x, g, doc_ids)
    B, T, D = x.shape
    h = xs.new_zeros(B, D) if initial_state is None else initial_state.to(xs.dtype)
    out = []
    for t in range(T):
        h = a[:, t] * h + xs[:, t]
        out.append(h)
    o = torch.stack(out, 1) if out else xs.new_zeros(B, 0, D)
    return o.to(x.dtype), (h if output_final_state else None)


def hgrn_chunk(x: Tensor, g: Tensor, initial_state: Tensor | None = None, output_final_state: bool = False,
               *, doc_ids: Tensor | None = None, chunk_size: int = CHUNK) -> tuple[Tensor, Tensor | None]:
    """Same contract as hgrn_reference; a blocked scan. With C = chunk_size and N = T / C
    chunks (the tail padded with a = 1, x = 0, which leaves the state alone):

        l_t = a_t ⊙ l_{t-1} + x_t,  P_t = a_t ⊙ P_{t-1}    inside every chunk from l = 0, P = 1,
                                                           all chunks at once (C steps)
        h⁰_{n+1} = P_C ⊙ h⁰_n + l_C                         the state entering chunk n+1 (N steps)
        h_t = l_t + P_t ⊙ h⁰_n                              P_t = exp(Σ_{s≤t in the chunk} g_s)

    C + N sequential steps on [B, N, D] and [B, D] instead of T; linear in T. The products
    run in the same order as the reference's (no differences of cumulative sums, no
    exp(-G)), so a strong decay cannot overflow."""
    check_hgrn_inputs(x, g, initial_state, doc_ids)
    xs, a = _decays(x, g, doc_ids)
    B, T, D = x.shape
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    if pad:
        xs = F.pad(xs, (0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
    xc = xs.view(B, N, C, D).unbind(2)
    ac = a.view(B, N, C, D).unbind(2)
    local, decay = [], []
    lt, pt = xc[0], ac[0]
    local.append(lt), decay.append(pt)
    for t in range(1, C):
        lt = ac[t] * lt + xc[t]
        pt = ac[t] * pt
        local.append(lt), decay.append(pt)
    lc, pc = torch.stack(local, 2), torch.stack(decay, 2)  # [B, N, C, D]
    h = xs.new_zeros(B, D) if initial_state is None else initial_state.to(xs.dtype)
    entering = []
    last_l, last_p = lc[:, :, -1].unbind(1), pc[:, :, -1].unbind(1)
    for n in range(N):
        entering.append(h)
        h = last_p[n] * h + last_l[n]
    h0 = torch.stack(entering, 1)  # [B, N, D]
    o = (lc + pc * h0[:, :, None]).reshape(B, N * C, D)[:, :T]
    return o.to(x.dtype), (h if output_final_state else None)


def hgrn_cases(dtype: torch.dtype, device: str):
    """Every T of the verify grid, both batches, odd widths; forget gates from mild to
    strong; every other case from an initial state; batch 3 from T = 63 on packed with
    documents (one boundary at a chunk start); one case in four without the final state."""
    n = 0
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            D = (5, 12, 33)[(i + B) % 3]
            strength = (0.5, 2.0, 6.0)[n % 3]
            inputs = {"x": torch.randn(B, T, D), "g": F.logsigmoid(torch.randn(B, T, D) * strength + 1.0)}
            label = f"B{B} T{T} D{D}"
            if n % 2:
                inputs["initial_state"] = torch.randn(B, D) * 0.5
                label += " +state"
            if B > 1 and T >= 63:
                starts = torch.rand(B, T) < 0.03
                starts[0, 32 % T] = True
                inputs["doc_ids"] = starts.long().cumsum(1) * 5
                label += " +docs"
            options = {"output_final_state": n % 4 != 3}
            n += 1
            yield Case(label, inputs, options)


# ---------------------------------------------------------------- the module


class HGRNConfig(Config):
    """HGRN: h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ silu(W_i x_t), f_t a gate per channel."""

    kind: Literal["hgrn"] = "hgrn"
    expand: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Width of the recurrence as a multiple of d_model (must give a whole number)."""
    lower_bound: bool = True
    """A learned lower bound on the forget gate, f = lb + (1 - lb) σ(W_f x), for every layer
    past the first (the paper's; see lower_bound_init)."""
    lower_bound_init: float | None = Field(default=None, gt=0, lt=1)
    """Initial lower bound; None: the paper's schedule at initialisation, layer / n_layers
    (0, no bound, in the first layer)."""

    def check(self, dims: Dims):
        width = dims.d_model * self.expand
        if abs(width - round(width)) > 1e-9 or round(width) < 1:
            yield "expand", f"d_model × expand must be a whole number ≥ 1, got {dims.d_model} × {self.expand}"


def lower_bound_param(config, dims: Dims, width: int) -> nn.Parameter | None:
    """The learned per-channel lower bound's logit, or None (no bound). The paper (HGRN,
    Qin et al. 2023, sec. 3; kept by HGRN2 and fla) makes the bounds of all layers one
    [L, D] parameter Γ with lb_l = cumsum(softmax(Γ, over layers))_l - softmax(Γ)_0, so the
    bound grows with depth and is 0 in the first layer. Simplified here to an independent
    parameter per layer (a plugin sees one layer): lb = σ(θ) per channel, θ initialised to
    logit(layer / n_layers), the paper's value at initialisation (Γ = 0); the first layer
    has none, as in the paper. Trained bounds are not tied across layers (not monotone)."""
    if not config.lower_bound:
        return None
    init = config.lower_bound_init
    if init is None:
        if dims.layer <= 0 or dims.n_layers <= 1:
            return None
        init = dims.layer / dims.n_layers
    return nn.Parameter(torch.full((width,), math.log(init / (1 - init))))


def log_forget(f: Tensor, theta: Tensor | None) -> Tensor:
    """log of the forget gate from its logits f: logsigmoid(f), or with the lower bound
    lb = σ(θ), log(lb + (1 - lb) σ(f)) = logaddexp(log lb, log(1 - lb) + logsigmoid(f))
    (fla's form; stable for any f and θ)."""
    g = F.logsigmoid(f)
    if theta is not None:
        theta = theta.to(f.dtype)
        g = torch.logaddexp(F.logsigmoid(theta), F.logsigmoid(-theta) + g)
    return g


class HGRN(Dispatched, SequenceMixer):
    """The paper's layer (as fla's HGRNAttention): f = σ(W_f x) with the lower bound,
    i = silu(W_i x), h_t = f ⊙ h_{t-1} + (1 - f) ⊙ i, y = W_o (RMSNorm(h) ⊙ silu(W_g x)).
    The state is h [B, D·expand] in the compute dtype."""

    category = "mixer"
    kind = "hgrn"
    step_impl = "reference"  # a one-token decode step: the per-token form, not the chunked one

    def __init__(self, config: HGRNConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.width = W = round(dims.d_model * config.expand)
        self.i = nn.Linear(dims.d_model, W, bias=False)
        self.f = nn.Linear(dims.d_model, W, bias=False)
        self.g = nn.Linear(dims.d_model, W, bias=False)
        self.lower_bound = lower_bound_param(config, dims, W)
        self.norm_weight = nn.Parameter(torch.ones(W))
        self.out = nn.Linear(W, dims.d_model, bias=False)
        self.out.residual_out = True

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        dtype = compute_dtype(x.dtype)
        g = log_forget(self.f(x).to(dtype), self.lower_bound)
        i = F.silu(self.i(x).to(dtype)) * -torch.expm1(g)  # (1 - f) ⊙ i
        impl = self.impl_for(self.config, x, decoding=state is not None)
        o, h = impl.fn(i, g, initial_state=state, output_final_state=state is not None, doc_ids=doc_ids)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight.to(dtype)
        o = o * F.silu(self.g(x).to(dtype))
        return self.out(o.to(x.dtype)), h

    def init_state(self, batch, device, dtype):
        return torch.zeros(batch, self.width, device=device, dtype=compute_dtype(dtype))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Independent of seq_len: h [D·expand] in the compute dtype."""
        return self.width * compute_dtype(dtype).itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "hgrn", config=HGRNConfig, module=HGRN, cases=hgrn_cases,
                  examples=[{}, {"expand": 1.5, "lower_bound_init": 0.5}, {"lower_bound": False}])
    register.impl("mixer", "hgrn", "reference", fn=hgrn_reference, doc="token by token in fp32")
    register.impl("mixer", "hgrn", "chunk", fn=hgrn_chunk, priority=10,
                  doc="blocked scan: chunks of 32 tokens in parallel, then the chunks' states carried, PyTorch")
