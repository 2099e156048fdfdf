"""ffn ``moe``: a mixture of SwiGLU experts behind a learned top-k router.

Shazeer et al. 2017 and GShard (top-k routing), Switch Transformer (load-balancing loss),
ST-MoE (router z-loss), DeepSeekMoE (always-on shared experts), DeepSeek-V3 (sigmoid
router with normalised top-k weights; auxiliary-loss-free balancing with a per-expert
bias that only steers the selection). Dropless: every token reaches its top_k experts.

The core op is ``moe(x, router, gate_up, down, bias, *, top_k, score) -> MoEOutput``:
routing (one shared function, fp32, autocast off) then the experts. Its outputs include
the routing decisions and the per-expert load, so ``verify`` checks them between paths:

- ``reference``: a loop over experts, each taking the tokens whose mask selects it, fp32.
- ``grouped``: tokens sorted by expert, one grouped matmul per projection
  (``torch._grouped_mm`` where the device, dtype and strides allow it, else one padded
  ``bmm``), scattered back with their weights.
- ``token``: for a call of one token (a decode step at batch 1), which ``MoE`` declares as
  its ``step_impl``: the chosen experts are read on the host and each runs on views of its
  own weights, with no sort, count or scatter, whose set-up is all the cost at one token.
  Traced by torch.compile (``Model.compiled_step``), where host-side indices would break
  the graph, it gathers the chosen experts' weights by index instead (same roundings).

Balancing with ``balance: bias`` updates the buffer ``expert_bias`` *after* the routing of
a training forward (module in training mode, autograd on), outside the gradient:
``b_e += bias_rate · sign(mean load - load_e)``. Why in the forward and not in an
optimizer hook: the load it needs is an output of this forward's routing, and handing
it to a hook would mean keeping it in a module attribute to be read later; updating
right after routing keeps it explicit, and since the forward has already used the old
bias its output does not depend on the update. It is deterministic (integer loads, a
sign), identical for both implementations (they share the routing), saved with the
weights (a persistent buffer, so a resumed run continues exactly), and skipped in eval
and under ``torch.no_grad`` (evaluation and decoding never move it).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.numerics import upcast
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl


class MoEConfig(Config):
    """Mixture of SwiGLU experts: a router sends each token to its top_k experts."""

    kind: Literal["moe"] = "moe"
    experts: int = Field(ge=1)
    """Number of routed experts."""
    top_k: int = Field(default=2, ge=1)
    """Experts each token is sent to (at most experts)."""
    hidden: int | None = Field(default=None, ge=1)
    """Hidden width of each expert (default: swiglu's, 8/3 · d_model rounded up to a multiple of 8)."""
    shared_experts: int = Field(default=0, ge=0)
    """Always-on experts of width hidden that every token uses (DeepSeekMoE)."""
    shared_gate: bool = False
    """Scale the shared experts' output by a learned sigmoid gate of the FFN's input, one
    scalar per token: y = routed + sigmoid(x·w) · shared(x) (Qwen2-MoE, Qwen3-Next).
    Only with shared_experts."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """Expert scores: softmax over experts (weights are the top-k probabilities), or
    per-expert sigmoid (weights are the top-k scores normalised to sum to 1)."""
    normalize: bool | None = None
    """Rescale each token's top-k weights to sum to 1. Unset: as the router says above
    (sigmoid yes, softmax no); true with softmax is Qwen3-MoE's and Qwen3-Next's
    norm_topk_prob."""
    balance: Literal["aux_loss", "bias", "none"] = "aux_loss"
    """Load balancing: the Switch/GShard auxiliary loss, DeepSeek-V3's loss-free bias
    update (outside the gradient), or nothing."""
    aux_weight: float = Field(default=0.01, ge=0)
    """Weight of the load-balancing loss (balance: aux_loss)."""
    bias_rate: float = Field(default=1e-3, ge=0)
    """Step of the bias update per training forward (balance: bias)."""
    z_loss: float = Field(default=0.0, ge=0)
    """Weight of the router z-loss, mean(logsumexp(logits)^2) (ST-MoE); 0 turns it off."""
    groups: int = Field(default=1, ge=1)
    """Group-limited routing (DeepSeek-V3's n_group): the experts form this many equal
    groups, in order; each token first keeps its top_groups groups, ranked by the sum of
    their two best selection scores (the scores plus the balance bias), then picks its
    top_k experts inside them. 1: no groups. Must divide experts, two experts or more per group."""
    top_groups: int | None = Field(default=None, ge=1)
    """Groups each token keeps (DeepSeek-V3's topk_group; default: all groups). Only with groups > 1."""
    scale: float = Field(default=1.0, gt=0)
    """Multiplies the routed experts' output, after normalize (DeepSeek-V3's
    routed_scaling_factor); the shared experts are not scaled."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most experts ({self.experts})")
        # judged by value, not by model_fields_set: a run's spec.yaml writes every field,
        # defaults included, and must load again (the default is harmless either way)
        defaults = type(self).model_fields
        if self.aux_weight != defaults["aux_weight"].default and self.balance != "aux_loss":
            raise ValueError(f"aux_weight applies to balance: aux_loss, not balance: {self.balance}")
        if self.bias_rate != defaults["bias_rate"].default and self.balance != "bias":
            raise ValueError(f"bias_rate applies to balance: bias, not balance: {self.balance}")
        if self.shared_gate and not self.shared_experts:
            raise ValueError("shared_gate gates the shared experts: set shared_experts (≥ 1) or drop shared_gate")
        if self.experts % self.groups or (self.groups > 1 and self.experts // self.groups < 2):
            raise ValueError(f"groups ({self.groups}) must divide experts ({self.experts}) into groups of two "
                             "experts or more (a group's score is the sum of its two best)")
        if self.top_groups is not None and (self.groups == 1 or self.top_groups > self.groups):
            raise ValueError(f"top_groups ({self.top_groups}) applies to groups > 1 and must be at most groups "
                             f"({self.groups})")
        if self.groups > 1 and self.top_k > (self.top_groups or self.groups) * (self.experts // self.groups):
            raise ValueError(f"top_k ({self.top_k}) must be at most the experts of the top_groups kept "
                             f"({self.top_groups} × {self.experts // self.groups})")
        return self

    def normalizes(self) -> bool:
        """Whether the top-k weights are rescaled to sum to 1."""
        return self.router == "sigmoid" if self.normalize is None else self.normalize


def expert_hidden(config: MoEConfig, d_model: int) -> int:
    return config.hidden or -(-8 * d_model // 3 // 8) * 8


# ---------------------------------------------------------------- the op


class MoEOutput(NamedTuple):
    out: Tensor  # [N, D] in x's dtype: the weighted sum of the chosen experts' outputs
    experts: Tensor  # [N, K] int64: the routing decisions, best first
    weights: Tensor  # [N, K] fp32: the gate of each chosen expert
    logits: Tensor  # [N, E] fp32: router logits (for the z-loss and the balance loss)
    load: Tensor  # [E] int64: tokens sent to each expert (what the bias update reads)


def route(x: Tensor, router: Tensor, bias: Tensor | None, *, top_k: int, score: str,
          normalize: bool | None = None, groups: int = 1, top_groups: int | None = None
          ) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D], router [E, D], bias [E] or None -> experts [N, K], weights [N, K], logits [N, E].
    ``normalize``: rescale the top-k weights to sum to 1 (None: for sigmoid scores only).
    ``groups``, ``top_groups``: choose only among the experts of each token's top_groups
    groups, a group ranked by the sum of its two best selection scores (DeepSeek-V3).

    Shared by every implementation, so their routing decisions are the same function of
    the same numbers. fp32 with autocast off: bf16 logits would tie and flip top-k. The
    bias shifts which experts are chosen, never the weights (DeepSeek-V3)."""
    with torch.autocast(x.device.type, enabled=False):
        logits = upcast(x) @ upcast(router).t()  # [N, E]
        scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
        choice = scores.detach() if bias is None else scores.detach() + bias.detach().to(scores.dtype)
        if groups > 1:
            N, E = choice.shape
            grouped = choice.view(N, groups, E // groups)  # [N, G, E/G]
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(top_groups or groups, dim=-1).indices  # [N, G']
            kept = torch.zeros(N, groups, dtype=torch.bool, device=choice.device).scatter(1, best, True)
            choice = grouped.masked_fill(~kept[..., None], float("-inf")).view(N, E)
        experts = choice.topk(top_k, dim=-1).indices  # [N, K]
        weights = scores.gather(-1, experts)  # [N, K]
        if (score == "sigmoid") if normalize is None else normalize:
            weights = weights / weights.sum(-1, keepdim=True)
    return experts, weights, logits


def _check(x: Tensor, router: Tensor, gate_up: Tensor, down: Tensor, top_k: int) -> None:
    E, D = router.shape
    if x.dim() != 2 or x.shape[1] != D or gate_up.shape[:2] != (E, D) or down.shape != (E, gate_up.shape[2] // 2, D):
        raise ValueError(f"expected x [N, D], router [E, D], gate_up [E, D, 2H], down [E, H, D]; got "
                         f"{tuple(x.shape)}, {tuple(router.shape)}, {tuple(gate_up.shape)}, {tuple(down.shape)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E} (the number of experts), got {top_k}")


def moe_reference(x: Tensor, router: Tensor, gate_up: Tensor, down: Tensor, bias: Tensor | None = None, *,
                  top_k: int, score: str, normalize: bool | None = None, groups: int = 1,
                  top_groups: int | None = None) -> MoEOutput:
    """x [N, D] -> MoEOutput. Readable: for each expert, the tokens that chose it (a mask)
    go through its SwiGLU in fp32 and are added back with their gate."""
    _check(x, router, gate_up, down, top_k)
    experts, weights, logits = route(x, router, bias, top_k=top_k, score=score, normalize=normalize, groups=groups,
                                     top_groups=top_groups)
    with torch.autocast(x.device.type, enabled=False):
        xf = upcast(x)
        out = torch.zeros_like(xf)  # [N, D]
        for e in range(router.shape[0]):
            token, slot = (experts == e).nonzero(as_tuple=True)  # who chose e, and as which of its k choices
            gate, up = (xf[token] @ upcast(gate_up[e])).chunk(2, dim=-1)  # [n_e, H] each
            y = (F.silu(gate) * up) @ upcast(down[e])  # [n_e, D]
            out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1).to(y.dtype))
    load = torch.bincount(experts.flatten(), minlength=router.shape[0])
    return MoEOutput(out.to(x.dtype), experts, weights, logits, load)


# Devices where grouped_matmul may use torch._grouped_mm (when the probe says it runs there
# for the dtype). torch 2.13 runs it on the CPU too (fp32/bf16/fp16, forward and backward),
# 1.2-1.6x faster than the padded bmm per projection (forward+backward, 4096 tokens,
# D = H = 256, 8/64 experts, top-2/top-8, one thread, CPU time). Tests and
# benchmarks/moe.py take devices out to check and time the bmm path.
GROUPED_MM_DEVICES = {"cpu", "cuda"}


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward on this device and dtype
    (probed once with a tiny aligned problem; CUDA needs a recent GPU, no dtype has fp64)."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # with autograd on whatever the caller runs under: probed first inside no_grad (an eval
    # forward, generation), the backward would raise and the answer, cached, be False for good
    with torch.inference_mode(False), torch.enable_grad():
        a = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)  # not randn: leave the RNG alone
        b = torch.ones(2, 16, 8, device=device, dtype=dtype, requires_grad=True)
        try:
            out = torch._grouped_mm(a, b, offs=torch.tensor([3, 8], device=device, dtype=torch.int32))
            out.backward(torch.ones_like(out))
        except (RuntimeError, NotImplementedError):
            return False
    return True


def _aligned(t: Tensor) -> bool:
    """_grouped_mm wants 16-byte aligned rows and base pointers."""
    return t.is_contiguous() and (t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def grouped_matmul(a: Tensor, b: Tensor, counts: Tensor) -> Tensor:
    """a [M, K] with rows grouped by expert (counts [G] rows each, in order), b [G, K, N]
    -> [M, N]: row r of group g times b[g]."""
    device = a.device.type
    # under torch.compile the padded bmm: Dynamo would trace the probe (its lru_cache does
    # not hold there) and the fake kernel of _grouped_mm rejects some dtypes the eager op runs
    if (not torch.compiler.is_compiling() and device in GROUPED_MM_DEVICES and grouped_mm_runs(device, a.dtype)
            and _aligned(a) and _aligned(b)):
        return torch._grouped_mm(a, b, offs=counts.cumsum(0).to(torch.int32))
    # fallback: pad every group to the largest and run one batched matmul
    G = b.shape[0]
    # [M]: the group of each row
    group = torch.repeat_interleave(torch.arange(G, device=a.device), counts, output_size=a.shape[0])
    starts = counts.cumsum(0) - counts
    pos = torch.arange(a.shape[0], device=a.device) - starts[group]  # [M] row within its group
    width = int(counts.max()) if counts.numel() else 0
    padded = a.new_zeros(G, width, a.shape[1]).index_put((group, pos), a)  # [G, C, K]
    return torch.bmm(padded, b)[group, pos]  # [G, C, N] -> [M, N]


def moe_grouped(x: Tensor, router: Tensor, gate_up: Tensor, down: Tensor, bias: Tensor | None = None, *,
                top_k: int, score: str, normalize: bool | None = None, groups: int = 1,
                top_groups: int | None = None) -> MoEOutput:
    """Same contract as moe_reference: sort the (token, choice) pairs by expert, two grouped
    matmuls in x's dtype, scatter back in fp32."""
    _check(x, router, gate_up, down, top_k)
    experts, weights, logits = route(x, router, bias, top_k=top_k, score=score, normalize=normalize, groups=groups,
                                     top_groups=top_groups)
    N, D = x.shape
    flat = experts.flatten()  # [N·K] expert of each (token, choice)
    order = flat.argsort(stable=True)  # pairs grouped by expert, tokens in order inside a group
    token = order // top_k  # [N·K]
    counts = torch.bincount(flat, minlength=router.shape[0])  # [E]
    xs = x[token].contiguous()  # [N·K, D]
    gate, up = grouped_matmul(xs, gate_up.to(x.dtype).contiguous(), counts).chunk(2, dim=-1)  # [N·K, H] each
    # the gate weight is applied to the hidden (H wide, before the linear down projection,
    # not to its D-wide output), in fp32 with the activation: one rounding for all three
    act = (F.silu(upcast(gate)) * upcast(up) * weights.flatten()[order, None]).to(x.dtype)  # [N·K, H]
    ys = grouped_matmul(act, down.to(x.dtype).contiguous(), counts)  # [N·K, D]
    out = torch.zeros(N, D, device=x.device, dtype=weights.dtype).index_add(0, token, ys.to(weights.dtype))
    return MoEOutput(out.to(x.dtype), experts, weights, logits, counts)


def moe_token(x: Tensor, router: Tensor, gate_up: Tensor, down: Tensor, bias: Tensor | None = None, *,
              top_k: int, score: str, normalize: bool | None = None, groups: int = 1,
              top_groups: int | None = None) -> MoEOutput:
    """Same contract as moe_reference, for calls of a few tokens: each (token, choice) pair
    runs its expert's SwiGLU on views of that expert's weights, picked by index on the host
    (``tolist``: a device sync off the CPU). Rounds as ``grouped`` does: matmuls in x's
    dtype, the gated activation and the sum over the k choices in fp32. N·k small matmul
    pairs: right for one token, slower than ``grouped`` for many."""
    _check(x, router, gate_up, down, top_k)
    experts, weights, logits = route(x, router, bias, top_k=top_k, score=score, normalize=normalize, groups=groups,
                                     top_groups=top_groups)
    gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
    E = router.shape[0]
    # [E] tokens per expert; not bincount, whose output size a tracer cannot know
    load = experts.new_zeros(E).index_add_(0, experts.flatten(), torch.ones_like(experts.flatten()))
    if torch.compiler.is_compiling():  # traced (Model.compiled_step): no host-side indices
        return MoEOutput(_token_gathered(x, gate_up, down, experts, weights).to(x.dtype), experts, weights, logits,
                         load)
    rows = []
    for n, chosen in enumerate(experts.tolist()):  # [K] expert ids of token n, best first
        y = None
        for k, e in enumerate(chosen):
            gate, up = (x[n:n + 1] @ gate_up[e]).chunk(2, dim=-1)  # [1, H] each
            act = (F.silu(upcast(gate)) * upcast(up) * weights[n:n + 1, k:k + 1]).to(x.dtype)  # [1, H]
            part = upcast(act @ down[e])  # [1, D] fp32
            y = part if y is None else y + part
        rows.append(y)
    out = rows[0] if len(rows) == 1 else torch.cat(rows) if rows else x.new_zeros(0, x.shape[1], dtype=weights.dtype)
    return MoEOutput(out.to(x.dtype), experts, weights, logits, load)


def _token_gathered(x: Tensor, gate_up: Tensor, down: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
    """moe_token's sum over the chosen experts with their weights gathered by index, in
    x's dtype ([N, K, D, 2H] and [N, K, H, D] copies: shapes a tracer knows, no host
    sync), the same roundings as the loop: the gated activation and the sum in fp32.
    -> [N, D] fp32."""
    gate, up = (x[:, None, None, :] @ gate_up[experts]).chunk(2, dim=-1)  # [N, K, 1, H] each
    act = (F.silu(upcast(gate)) * upcast(up) * weights[:, :, None, None]).to(x.dtype)
    return upcast(act @ down[experts]).sum((1, 2))  # [N, K, 1, D] -> [N, D]


# (experts, top_k, d_model, hidden, score, with bias): softmax and sigmoid, one expert,
# top_k = experts, and a width whose bf16 rows are not 16-byte aligned (the bmm fallback)
CASE_SHAPES = [(8, 2, 32, 24, "softmax", False), (4, 1, 16, 40, "sigmoid", True), (6, 3, 24, 16, "softmax", True),
               (1, 1, 8, 8, "softmax", False), (5, 5, 12, 20, "sigmoid", False), (7, 2, 20, 12, "sigmoid", True)]


def moe_cases(dtype: torch.dtype, device: str):
    """Verification inputs: N = B·T tokens over the usual grid; weights scaled so router
    logits and activations are O(1); a bias large enough to change some choices."""
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            E, K, D, H, score, with_bias = CASE_SHAPES[(i + B) % len(CASE_SHAPES)]
            inputs = {"x": torch.randn(B * T, D), "router": torch.randn(E, D) * D ** -0.5,
                      "gate_up": torch.randn(E, D, 2 * H) * D ** -0.5, "down": torch.randn(E, H, D) * H ** -0.5,
                      "bias": 0.3 * torch.randn(E) if with_bias else None}
            options = {"top_k": K, "score": score}
            if score == "softmax" and K > 1 and i % 2:  # Qwen3-MoE's renormalised softmax weights
                options["normalize"] = True
            if E % 2 == 0 and E >= 4 and i % 3 != 1:  # DeepSeek-V3's group-limited routing: pairs, keep half
                options.update(groups=E // 2, top_groups=-(-K // 2))
            yield Case(f"N{B * T} E{E} k{K} D{D} H{H} {score}{' bias' if with_bias else ''}"
                       f"{' normalize' if 'normalize' in options else ''}"
                       f"{' groups' if 'groups' in options else ''}", inputs, options)


# ---------------------------------------------------------------- the module


class MoE(Dispatched, nn.Module):
    category, kind = "ffn", "moe"
    step_impl = "token"  # a call of one token: its k experts on views of their weights, no sort or scatter

    def __init__(self, config: MoEConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        E, D, H = config.experts, dims.d_model, expert_hidden(config, dims.d_model)
        self.n_layers = dims.n_layers
        self.router = nn.Linear(D, E, bias=False)  # weight [E, D]
        self.gate_up = nn.Parameter(torch.empty(E, D, 2 * H))
        self.down = nn.Parameter(torch.empty(E, H, D))
        if config.balance == "bias":
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.shared = None
        if config.shared_experts:
            width = config.shared_experts * H  # the shared experts run as one dense SwiGLU
            self.shared = nn.ModuleDict({"gate_up": nn.Linear(D, 2 * width, bias=False),
                                         "down": nn.Linear(width, D, bias=False)})
            self.shared["down"].residual_out = True
            if config.shared_gate:  # one logit per token
                self.shared["gate"] = nn.Linear(D, 1, bias=False)

    def init_weights(self, std: float) -> None:
        """Experts like the dense layers: normal(0, std), output projections scaled by
        1/sqrt(2·layers) (see Model.init_weights); the bias starts at zero."""
        nn.init.normal_(self.gate_up, 0.0, std)
        nn.init.normal_(self.down, 0.0, std * (2 * self.n_layers) ** -0.5)
        if self.config.balance == "bias":
            self.expert_bias.zero_()

    def active_parameters(self) -> int:
        """Parameters one token uses: the router, top_k routed experts, the shared experts."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = self.gate_up[0].numel() + self.down[0].numel()
        return total - (self.config.experts - self.config.top_k) * per_expert

    def forward(self, x: Tensor, *, aux=None) -> Tensor:
        B, T, D = x.shape
        cfg = self.config
        bias = self.expert_bias if cfg.balance == "bias" else None
        # passed only when set, so an implementation written before the option keeps working
        extra = {} if cfg.normalize is None else {"normalize": cfg.normalize}
        if cfg.groups > 1:
            extra.update(groups=cfg.groups, top_groups=cfg.top_groups)
        # an FFN keeps no state, so to it a decode step is a call of one token; at batch 1
        # that runs step_impl (traced, moe_token gathers its experts' weights instead)
        one_token = B * T == 1
        routed = self.impl_for(cfg, x, decoding=one_token).fn(x.reshape(B * T, D), self.router.weight, self.gate_up,
                                                              self.down, bias, top_k=cfg.top_k, score=cfg.router,
                                                              **extra)
        y = routed.out.view(B, T, D)
        if cfg.scale != 1.0:
            y = cfg.scale * y
        if self.shared is not None:
            gate, up = self.shared["gate_up"](x).chunk(2, dim=-1)  # [B, T, S·H] each
            shared = self.shared["down"](F.silu(gate) * up)
            if cfg.shared_gate:
                shared = torch.sigmoid(self.shared["gate"](x)) * shared  # [B, T, 1] · [B, T, D]
            y = y + shared
        if aux is not None:
            self.report(routed, aux.scope("moe"))
        if bias is not None and self.training and torch.is_grad_enabled():
            with torch.no_grad():  # after this forward's routing: its output used the old bias
                load = routed.load.to(bias.dtype)
                bias.add_(cfg.bias_rate * torch.sign(load.mean() - load))
        return y

    def report(self, routed: MoEOutput, aux) -> None:
        """Losses into the objective, router statistics into the logs."""
        cfg = self.config
        load = routed.load.float()
        share = load / load.sum()  # [E] fraction of the (token, choice) pairs per expert
        if cfg.balance == "aux_loss" and cfg.aux_weight > 0:
            scores = routed.logits.softmax(-1) if cfg.router == "softmax" else routed.logits.sigmoid()
            scores = scores / scores.sum(-1, keepdim=True)  # [N, E] (softmax: unchanged)
            aux.add_loss("balance_loss", cfg.aux_weight * cfg.experts * (share * scores.mean(0)).sum())
        if cfg.z_loss > 0:
            aux.add_loss("z_loss", cfg.z_loss * routed.logits.logsumexp(-1).square().mean())
        for e, value in enumerate(share.detach().unbind()):  # one op for all experts, not one per expert
            aux.add_metric(f"load.{e}", value)
        aux.add_metric("load_max_over_mean", (load.max() / load.mean()).detach())


@hookimpl
def hybridlab_register(register):
    register.kind("ffn", "moe", config=MoEConfig, module=MoE, cases=moe_cases)
    register.impl("ffn", "moe", "reference", fn=moe_reference, doc="loop over experts with masks, fp32")
    # tolerance 5 (default 2): grouped multiplies in the low dtype, so its output rounds four
    # times (gate/up, the gated activation, the down projection, the result) where the
    # reference, in fp32 to the end, rounds once. On the CPU verify grid (bf16/fp16, 182
    # checks) the median ratio is 1.4 and all but one are <= 2.9; the one is 4.7, the fp16
    # output of a 6-token case (72 numbers, so its reference error is itself a small-sample
    # estimate). Routing decisions and loads match the float64 oracle exactly (ratio 0).
    # verify_model uses the largest tolerance of a model's kinds: 5 for models with moe.
    register.impl("ffn", "moe", "grouped", fn=moe_grouped, priority=10, tolerance=5.0,
                  doc="sort by expert, torch._grouped_mm (else a padded bmm), scatter back")
    # priority below grouped: it wins only as MoE's step_impl, on one-token calls. Tolerance
    # 5 for grouped's reason (matmuls in the low dtype, the same roundings less the scatter).
    # CPU only: it reads the chosen experts on the host, a sync per call on a GPU, where it
    # has not been measured against grouped. Inference only: in bf16/fp16 autograd would sum
    # each expert's weight gradient pair by pair in the low dtype, past the tolerance on
    # verify's longer cases; a training call of one token runs grouped.
    register.impl("ffn", "moe", "token", fn=moe_token, priority=5, tolerance=5.0, devices={"cpu"}, backward=False,
                  doc="one token: each chosen expert on views of its weights (host indices), no sort or scatter")
