"""mixer ``mesa_net``: MesaNet (von Oswald, Scherrer, Kobayashi, Versari, Yang, Schlegel,
Maile, Schimpf, Sieberling, Meulemans, Saurous, Lajoie, Frenkel, Pascanu, Agüera y Arcas &
Sacramento, "MesaNet: Sequence Modeling by Locally Optimal Test-Time Training",
arXiv:2506.05233, 2025). Each token's output is the prediction of the ridge regression fitted
to all (k, v) pairs so far, solved exactly, not by one gradient step as the delta rule:

    H_t = γ_t H_{t-1} + β_t k_t k_tᵀ         (H_kk [K, K], the keys' decayed Gram matrix)
    G_t = γ_t G_{t-1} + β_t k_t v_tᵀ         (H_kv [K, V])
    q*_t = (H_t + Diag(λ))⁻¹ q_t,   o_t = G_tᵀ q*_t,   γ_t = exp(g_t)

The core op follows flash-linear-attention's ``chunk_mesa_net`` (fla/ops/mesa_net): names,
order and layouts (``q, k, v, g, beta, lamb``, ``lamb [H, K]``, the two states
``h_kk_init``/``h_kv_init``, ``max_CG_iteration``, three results ``(o, h_kk, h_kv)``), with
two solvers: ``"cg"`` (fla's kernels: ``max_CG_iteration`` steps of conjugate gradients from
x = 0, with fla's 1e-5 guards in both step sizes) and ``"exact"`` (a linear solve per token,
fla's ``naive_mesa_net_exact``). Where it differs from fla: packed documents come as
``doc_ids`` (not ``cu_seqlens``); V may differ from K; no ``output_final_state`` (the states
are always returned, in fp32, fp64 for fp64 inputs); no ``use_qk_l2norm_in_kernel`` (the
layer normalises q and k before the op).

Gradients of the CG solver are those of the solve (implicit differentiation, as fla's
backward): with A = H_t + Diag(λ) and q* its CG solution, dq = A⁻¹ dq* (by the same CG),
dA = −dq q*ᵀ; not the derivative of the CG iterations themselves (which differ from it by the
CG's residual). The exact solver's gradients are autograd's through the solve.

Implementations: ``reference`` (the states token by token, every H_t kept, the solve batched
over tokens; fp32) and ``chunk`` (chunks of 32 tokens on CPU, 64 elsewhere: the states only
at chunk starts, each token's H_t applied as Γ_t H_chunk + Σ_j w_tj k_j k_jᵀ through two
matrix products, the CG over all chunks at once; the exact solver forms each H_t).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Dims
from hybridlab.core.numerics import compute_dtype
from hybridlab.core.verify import Case
from hybridlab.registry import hookimpl

from .linear_recurrence import (default_chunk, first_order_only, new_document, no_autocast, recurrent_cases,
                                segment_decay)
from .recurrent_layer import RecurrentConfig, RecurrentMixer, inverse_softplus

CG_EPS = 1e-5  # fla's guard in both CG step sizes (alpha and the direction's beta)


class MesaNetConfig(RecurrentConfig):
    """MesaNet: o_t = H_kv,tᵀ (H_kk,t + Diag(λ))⁻¹ q_t, both states decayed by exp(g_t)."""

    kind: Literal["mesa_net"] = "mesa_net"
    qk_norm: Literal["l2", "none"] = "l2"
    """Normalisation of queries and keys per head (fla's layer: l2)."""
    gate: bool = False
    """Output gate: the normalised output times silu(W_gate x) (fla's use_output_gate)."""
    lambda_lower_bound: float = Field(default=0.25, gt=0, allow_inf_nan=False)
    """λ = softplus(θ) + lambda_lower_bound per head and key channel (fla: 0.25): the
    regulariser keeps H + Diag(λ) well conditioned."""
    lambda_init: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Initial λ (fla: 1.0); must exceed lambda_lower_bound."""
    solver: Literal["cg", "exact"] = "cg"
    """How q* = (H + Diag(λ))⁻¹ q is found: 'cg' (conjugate gradients, fla's kernels) or
    'exact' (a linear solve per token; O(T·K²) memory)."""
    cg_steps: int = Field(default=30, ge=1)
    """Conjugate-gradient steps per token (fla's max_CG_iteration; training and decoding use
    the same count, so decoding reproduces the parallel forward)."""

    @field_validator("lambda_init")
    @classmethod
    def _above_lower_bound(cls, value: float, info) -> float:
        bound = info.data.get("lambda_lower_bound")
        if bound is not None and value <= bound:
            raise ValueError(f"must exceed lambda_lower_bound ({bound}), got {value}")
        return value


# ---------------------------------------------------------------- the solve


def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tensor:
    """x ≈ A⁻¹ b for a symmetric positive definite A given as ``apply(p) = A p`` over the
    last axis of b [..., K] (one system per leading index), as fla's kernels: x_0 = 0 and
    ``steps`` iterations, each step size guarded by CG_EPS (so a converged system stays put)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    delta = (r * r).sum(-1, keepdim=True)
    for _ in range(steps):  # in place: the solve runs outside autograd (see _SolveCG)
        Ap = apply(p)
        alpha = delta / ((p * Ap).sum(-1, keepdim=True) + CG_EPS)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, Ap, value=-1.0)
        new = (r * r).sum(-1, keepdim=True)
        p.mul_(new / (delta + CG_EPS)).add_(r)
        delta = new
    return x


class _SolveCG(torch.autograd.Function):
    """x = CG(A, b) with A p = operator(p, *params), symmetric. Backward by implicit
    differentiation (fla's): db = CG(A, dx) (A = Aᵀ), and each parameter's gradient is the
    vector-Jacobian product of −db with operator(x, ·) at the solution x."""

    @staticmethod
    def forward(ctx, b: Tensor, steps: int, operator: Callable, *params: Tensor) -> Tensor:
        x = conjugate_gradient(lambda p: operator(p, *params), b, steps)
        ctx.save_for_backward(x, *params)
        ctx.steps, ctx.operator = steps, operator
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dx: Tensor):
        x, *params = ctx.saved_tensors
        operator = ctx.operator
        db = conjugate_gradient(lambda p: operator(p, *params), dx, ctx.steps)
        needs = ctx.needs_input_grad[3:]
        grads: list[Tensor | None] = [None] * len(params)
        wanted = [i for i, need in enumerate(needs) if need]
        if wanted:
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(i in wanted) for i, p in enumerate(params)]
                applied = operator(x, *leaves)
                found = torch.autograd.grad(applied, [leaves[i] for i in wanted], -db, allow_unused=True)
            for i, grad in zip(wanted, found):
                grads[i] = grad
        return (db if ctx.needs_input_grad[0] else None, None, None, *grads)


def _solve(b: Tensor, operator: Callable, params: tuple[Tensor, ...], dense: Callable[[], Tensor], solver: str,
           steps: int) -> Tensor:
    """q* for every token: the CG through ``operator`` or, for 'exact', one linear solve with
    the matrices ``dense()`` builds ([..., K, K], b [..., K])."""
    if solver == "exact":
        return torch.linalg.solve(dense(), b.unsqueeze(-1)).squeeze(-1)
    return _SolveCG.apply(b, steps, operator, *params)


# ---------------------------------------------------------------- the op


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, h_kk_init: Tensor | None,
           h_kv_init: Tensor | None, solver: str, max_CG_iteration: int, doc_ids: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"mesa_net: expected q, k [B, T, H, K] and v [B, T, H, V] (time-major); got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    expected = {"g": (B, T, H), "beta": (B, T, H), "lamb": (H, K), "h_kk_init": (B, H, K, K),
                "h_kv_init": (B, H, K, V), "doc_ids": (B, T)}
    given = {"g": g, "beta": beta, "lamb": lamb, "h_kk_init": h_kk_init, "h_kv_init": h_kv_init, "doc_ids": doc_ids}
    for name, value in given.items():
        if value is None:
            continue
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"mesa_net: expected {name} of shape {list(expected[name])} for q {list(q.shape)} and "
                             f"v {list(v.shape)}, got {list(value.shape)}")
        if (name == "doc_ids") == value.is_floating_point():
            raise ValueError(f"mesa_net: {name} must be " + ("integers (one id per document)" if name == "doc_ids"
                             else "floating point") + f", got {value.dtype}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"mesa_net: expected floating q, k and v, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not torch.compiler.is_compiling() and bool((lamb <= 0).any()):  # (a host sync: eager only) the regulariser keeps H + Diag(λ) positive definite (NaN is the gates' check)
        raise ValueError(f"mesa_net: lamb must be > 0 (the ridge λ of H + Diag(λ)), got a minimum of "
                         f"{float(lamb.min()):.3g}")
    if solver not in ("cg", "exact"):
        raise ValueError(f"mesa_net: solver must be 'cg' or 'exact', got {solver!r}")
    if isinstance(max_CG_iteration, bool) or not isinstance(max_CG_iteration, int) or max_CG_iteration < 1:
        raise ValueError(f"mesa_net: max_CG_iteration must be an integer ≥ 1, got {max_CG_iteration!r}")


def _reference_operator(p: Tensor, H_all: Tensor, lamb: Tensor) -> Tensor:
    """(H_t + Diag(λ)) p_t for every token: p [B, T, H, K], H_all [B, T, H, K, K], lamb [H, K]."""
    return (p.unsqueeze(-2) @ H_all).squeeze(-2) + lamb * p


@no_autocast
def mesa_net_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, *,
                       h_kk_init: Tensor | None = None, h_kv_init: Tensor | None = None, max_CG_iteration: int = 30,
                       solver: str = "cg", doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MesaNet's layer (von Oswald et al. 2025, MesaNet: Sequence Modeling by Locally Optimal
    Test-Time Training), as fla's ``chunk_mesa_net``:

        H_t = exp(g_t) H_{t-1} + β_t k_t k_tᵀ,   G_t = exp(g_t) G_{t-1} + β_t k_t v_tᵀ
        q*_t = (H_t + Diag(λ))⁻¹ q_t,            o_t = G_tᵀ q*_t

    q, k [B, T, H, K] (unit-norm in the layer), v [B, T, H, V], g [B, T, H] (log decay, ≤ 0),
    beta [B, T, H] (used as given), lamb [H, K] (> 0), h_kk_init [B, H, K, K] (symmetric,
    positive semidefinite), h_kv_init [B, H, K, V], doc_ids [B, T] (packed documents: both
    states restart where the id changes). ``solver``: 'cg' (``max_CG_iteration`` conjugate
    gradient steps from 0, fla's kernels; gradients by implicit differentiation, see the
    module docstring) or 'exact' (a linear solve per token). Returns (o [B, T, H, V] in v's
    dtype, h_kk [B, H, K, K], h_kv [B, H, K, V] in fp32, fp64 for fp64 inputs).
    Implementations: reference (the states token by token, the solve batched over tokens), chunk."""
    _check(q, k, v, g, beta, lamb, h_kk_init, h_kv_init, solver, max_CG_iteration, doc_ids)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    # one slice per token, taken once (indexing inside the loop would cost T² in the backward)
    kbs = (k.to(dtype) * beta.to(dtype)[..., None]).unsqueeze(-1).unbind(1)  # T × [B, H, K, 1]: β k
    ks, vs = k.to(dtype).unsqueeze(-2).unbind(1), v.to(dtype).unsqueeze(-2).unbind(1)  # [B, H, 1, K | V]: rows
    decays = g.to(dtype).exp()[..., None, None].unbind(1)  # [B, H, 1, 1]
    keeps = None if doc_ids is None else (~new_document(doc_ids)).to(dtype)[:, :, None, None, None].unbind(1)
    Hkk = q.new_zeros(B, H, K, K, dtype=dtype) if h_kk_init is None else h_kk_init.to(dtype)
    Hkv = q.new_zeros(B, H, K, V, dtype=dtype) if h_kv_init is None else h_kv_init.to(dtype)
    kks, kvs = [], []
    for t in range(T):
        if keeps is not None:  # a new document starts from empty states
            Hkk, Hkv = Hkk * keeps[t], Hkv * keeps[t]
        Hkk = Hkk * decays[t] + kbs[t] * ks[t]  # β k kᵀ: symmetric
        Hkv = Hkv * decays[t] + kbs[t] * vs[t]  # β k vᵀ
        kks.append(Hkk)
        kvs.append(Hkv)
    if T == 0:
        return v.new_zeros(B, 0, H, V), Hkk, Hkv
    H_all, G_all = torch.stack(kks, 1), torch.stack(kvs, 1)  # [B, T, H, K, K], [B, T, H, K, V]
    lam = lamb.to(dtype)
    x = _solve(q.to(dtype), _reference_operator, (H_all, lam), lambda: H_all + torch.diag_embed(lam), solver,
               max_CG_iteration)  # q* [B, T, H, K]
    o = (x.unsqueeze(-2) @ G_all).squeeze(-2)  # [B, T, H, V]
    return o.to(out_dtype), Hkk, Hkv


def _chunks(x: Tensor, C: int, pad: int) -> Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...], the tail padded with zeros to N·C tokens."""
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    B, T, H = x.shape[:3]
    return x.reshape(B, T // C, C, H, *x.shape[3:]).movedim(3, 1).contiguous()


def _chunk_operator(p: Tensor, Kc: Tensor, KT: Tensor, W: Tensor, gamma: Tensor, Hkk: Tensor,
                    lamb: Tensor) -> Tensor:
    """(H_t + Diag(λ)) p_t for every token of every chunk without forming H_t:
    H_t = Γ_t H_chunk + Σ_{j ≤ t} W_tj k_j k_jᵀ. p, Kc [B, H, N, C, K], KT = Kcᵀ contiguous
    [B, H, N, K, C] (a transposed view would be copied by every product of every CG step),
    W [B, H, N, C, C], gamma [B, H, N, C, 1], Hkk [B, H, N, K, K] (entering each chunk),
    lamb [H, 1, 1, K]."""
    scores = (p @ KT) * W  # [B, H, N, C, C]: w_tj (p_t · k_j)
    return (scores @ Kc).add_((gamma * p) @ Hkk).addcmul_(lamb, p)


@first_order_only
@no_autocast
def mesa_net_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, *,
                   h_kk_init: Tensor | None = None, h_kv_init: Tensor | None = None, max_CG_iteration: int = 30,
                   solver: str = "cg", doc_ids: Tensor | None = None,
                   chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as mesa_net_reference, in chunks of ``chunk_size`` tokens (32 on CPU,
    64 elsewhere). Inside a chunk, with Γ_t the decay from the chunk's start to t and
    W_tj = β_j Γ_t / Γ_j (j ≤ t, same document),

        H_t = Γ_t H_c + Σ_j W_tj k_j k_jᵀ,   G_t = Γ_t G_c + Σ_j W_tj k_j v_jᵀ

    so (H_t + Diag(λ)) p_t = ((P Kᵀ) ⊙ W) K + (Γ ⊙ P) H_c + λ ⊙ P and O = ((Q* Kᵀ) ⊙ W) V
    + (Γ ⊙ Q*) G_c: matrix products over all chunks at once; only the states entering each
    chunk (H_c, G_c) run chunk after chunk. The exact solver forms each H_t (W times the
    chunk's k kᵀ, one matrix product). First order only (use ``reference`` for a gradient
    of a gradient)."""
    _check(q, k, v, g, beta, lamb, h_kk_init, h_kv_init, solver, max_CG_iteration, doc_ids)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = compute_dtype(q.dtype), v.dtype
    Hkk = q.new_zeros(B, H, K, K, dtype=dtype) if h_kk_init is None else h_kk_init.to(dtype)
    Hkv = q.new_zeros(B, H, K, V, dtype=dtype) if h_kv_init is None else h_kv_init.to(dtype)
    if T == 0:
        return v.new_zeros(B, 0, H, V), Hkk, Hkv
    C = chunk_size or default_chunk(q.device)
    C = min(C, T)
    N = -(-T // C)
    pad = N * C - T
    Q, Kc, Vc = (_chunks(x.to(dtype), C, pad) for x in (q, k, v))  # [B, H, N, C, K | V]
    gc, bc = _chunks(g.to(dtype), C, pad), _chunks(beta.to(dtype), C, pad)  # [B, H, N, C]; padding: g 0, β 0
    # W_tj = β_j · decay from j to t; Γ_t from the chunk start to t; to_end from t to the chunk end
    W = segment_decay(gc) * bc[..., None, :]  # [B, H, N, C, C], lower triangular with the diagonal
    cumulative = gc.double().cumsum(-1)
    gamma = cumulative.exp().to(dtype)  # [B, H, N, C]
    to_end = (cumulative[..., -1:] - cumulative).exp().to(dtype)
    chunk_decay = gamma[..., -1]  # [B, H, N]
    if doc_ids is not None:  # r_t: document starts in the chunk up to t
        starts = new_document(doc_ids)
        r = (F.pad(starts, (0, pad)) if pad else starts).reshape(B, 1, N, C).long().cumsum(-1)
        W = W * (r[..., :, None] == r[..., None, :])  # pairs within one document
        gamma = gamma * (r == 0)  # only the chunk's first document continues the entering state
        to_end = to_end * (r == r[..., -1:])  # only the last document leaves the chunk
        chunk_decay = chunk_decay * (r[..., -1] == 0)
    # the states entering each chunk: H_{c+1} = Γ_C H_c + (β ⊙ to_end ⊙ K)ᵀ [K | V]
    written = (Kc * (bc * to_end)[..., None]).transpose(-1, -2)  # [B, H, N, K, C]
    kk_updates, kv_updates = (written @ Kc).unbind(2), (written @ Vc).unbind(2)
    decays = chunk_decay[..., None, None].unbind(2)  # N × [B, H, 1, 1]
    entering_kk, entering_kv = [], []
    for n in range(N):
        entering_kk.append(Hkk)
        entering_kv.append(Hkv)
        Hkk = Hkk * decays[n] + kk_updates[n]
        Hkv = Hkv * decays[n] + kv_updates[n]
    Hc, Gc = torch.stack(entering_kk, 2), torch.stack(entering_kv, 2)  # [B, H, N, K, K | V]
    gamma = gamma[..., None]  # [B, H, N, C, 1]
    lam = lamb.to(dtype)[:, None, None, :]  # [H, 1, 1, K]

    def dense() -> Tensor:  # every token's H_t + Diag(λ): [B, H, N, C, K, K]
        outer = (Kc[..., :, None] * Kc[..., None, :]).flatten(-2)  # [B, H, N, C, K·K]
        own = (W @ outer).unflatten(-1, (K, K))
        return gamma[..., None] * Hc[:, :, :, None] + own + torch.diag_embed(lamb.to(dtype))[:, None, None]

    KT = Kc.transpose(-1, -2).contiguous()
    X = _solve(Q, _chunk_operator, (Kc, KT, W, gamma, Hc, lam), dense, solver, max_CG_iteration)  # q* [B, H, N, C, K]
    out = ((X @ KT) * W) @ Vc + (gamma * X) @ Gc  # [B, H, N, C, V]
    o = out.movedim(1, 3).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), Hkk, Hkv


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # decays from mild to strong; λ from the layer's range (softplus + 0.25)
    strength = (0.5, 2.0, 6.0)[n % 3]
    return {"g": F.logsigmoid(torch.randn(B, T, H) * strength + 1.0), "beta": torch.rand(B, T, H),
            "lamb": F.softplus(torch.randn(H, K)) + 0.25}


_grid = recurrent_cases(_gates, unit_keys=True)


def mesa_net_cases(dtype: torch.dtype, device: str):
    """The recurrent grid (every T, both batches, packed documents) with unit q and k (the
    layer's), both initial states (h_kk a random Gram matrix: symmetric, positive
    semidefinite), every fourth case the exact solver and every third a short CG (8 steps,
    not converged: both forms must agree on the iterate, not only on the solution)."""
    for i, case in enumerate(_grid(dtype, device)):
        inputs = case.inputs
        inputs["q"] = F.normalize(inputs["q"], dim=-1)
        case.options.pop("scale", None)  # fla's op has no scale: q is unit length
        state = inputs.pop("initial_state", None)
        if state is not None:
            B, H, K, _ = state.shape
            X = torch.randn(B, H, K, 3)
            inputs["h_kk_init"], inputs["h_kv_init"] = X @ X.transpose(-1, -2) * 0.3, state
        if i % 4 == 3:
            case.options["solver"] = "exact"
            case.label += " exact"
        elif i % 3 == 1:
            case.options["max_CG_iteration"] = 8
            case.label += " cg8"
        yield Case(case.label, inputs, case.options)


# ---------------------------------------------------------------- the module


class MesaNet(RecurrentMixer):
    """fla's MesaNet layer (the paper's, von Oswald et al. 2025): short SiLU convolutions,
    l2-normalised q and k, beta = sigmoid(W_b x + b), g = logsigmoid(W_a x + b) (both
    projections with a bias), λ = softplus(θ) + lambda_lower_bound per head and key channel
    (θ initialised so that λ = lambda_init), a per-head RMSNorm of the output (times
    silu(W_gate x) with ``gate``). Where it differs from fla's layer: the shared recurrent
    layer's short convolution runs over v too (fla's convolves q and k only). The decoding
    state packs H_kk and H_kv as one [B, H, K, K + V] matrix (fp32) and the conv tail."""

    kind = "mesa_net"

    def __init__(self, config: MesaNetConfig, dims: Dims) -> None:
        super().__init__(config, dims)
        H, K = self.heads, self.head_dim
        self.value_extra = K  # the state carries H_kk [K, K] beside H_kv [K, V]
        self.a = nn.Linear(dims.d_model, H, bias=True)
        self.b = nn.Linear(dims.d_model, H, bias=True)
        start = inverse_softplus(torch.tensor(config.lambda_init - config.lambda_lower_bound))
        self.lambda_params = nn.Parameter(torch.full((H, K), float(start)))

    def features(self, q, k, v):
        if self.conv is None:  # fla's layer always has SiLU on q and k (through its conv)
            q, k = F.silu(q), F.silu(k)
        return super().features(q, k, v)

    def recur(self, impl: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None,
              doc_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(x.dtype)
        K = self.head_dim
        g = F.logsigmoid(self.a(x).to(dtype))  # [B, T, H]
        beta = torch.sigmoid(self.b(x).to(dtype))
        lamb = F.softplus(self.lambda_params.to(dtype)) + self.config.lambda_lower_bound  # [H, K]
        h_kk = h_kv = None
        if initial_state is not None:
            h_kk, h_kv = initial_state[..., :K], initial_state[..., K:]
        o, h_kk, h_kv = impl.fn(q, k, v, g, beta, lamb, h_kk_init=h_kk, h_kv_init=h_kv,
                                max_CG_iteration=self.config.cg_steps, solver=self.config.solver, doc_ids=doc_ids)
        return o, torch.cat([h_kk, h_kv], dim=-1)


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "mesa_net", config=MesaNetConfig, module=MesaNet, cases=mesa_net_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "gate": True,
                                           "solver": "exact"},
                            {"heads": 2, "conv_size": 0, "output_norm": False, "cg_steps": 8, "lambda_init": 0.5}])
    register.impl("mixer", "mesa_net", "reference", fn=mesa_net_reference,
                  doc="states token by token, every H_t kept, the solve batched over tokens, fp32")
    register.impl("mixer", "mesa_net", "chunk", fn=mesa_net_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU): CG through two matrix products per chunk, PyTorch")
