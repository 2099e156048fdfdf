"""block_wrapper ``mor``: Mixture-of-Recursions with token-choice routing (Bae et al. 2025,
"Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive Token-Level
Computation").

Wraps a block inside a ``loop: N`` group (one set of weights run N times). When a token
enters the loop (iteration 0 of the innermost enclosing loop) a router reads its hidden
state and gives it a depth d_t in 1..N; at iteration i the block runs only the tokens with
d_t > i, the others pass bitwise unchanged:

    p_t = softmax(W · rms_norm(h_t) + b)           [N], fp32, autocast off, at iteration 0
    d_t = 1 + argmax_j p_t,j          g_t = max_j p_t,j
    h_t <- h_t + g_t · (block(h)_t - h_t)        at iteration i < d_t;   h_t unchanged after

The gate g_t (the probability of the chosen depth) scales every update of the token, so
the task loss reaches the router. A balancing loss keeps the depths in use (the Switch
Transformer load-balancing loss over depths, one of the paper's two options):

    balance_loss · N · sum_j f_j · P_j,   f_j = share of tokens given depth j (no gradient),
                                          P_j = mean_t p_t,j

which is 1 · balance_loss when both are uniform. The decision reads only the token's own
hidden state, so routing is causal and decoding one token at a time equals the parallel
forward. Each iteration's block sees its chosen tokens as one shorter sequence per
sequence and keeps a decoding state (a KV cache) of those tokens alone: the paper's
recursion-wise KV caching.

The decision made at iteration 0 is reused at the later iterations through ``ctx.shared``
(one dict per forward call of the model). Metrics at the entry depth: ``mor.mean_depth``
(mean d_t) and ``mor.saved`` (1 - mean d_t / N, the share of the loop's N block runs per
token that routing saves); at every iteration, ``mor.processed`` (share of tokens with
d_t > i).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.errors import HybridlabError
from hybridlab.core.interfaces import BlockWrapper, RunContext
from hybridlab.plugins.block_wrapper.mod import router_logits, run_chosen
from hybridlab.registry import hookimpl


class MoRConfig(Config):
    """Mixture-of-Recursions (token choice): each token chooses how many of its loop's
    iterations run this block. Only inside a ``loop: N`` group."""

    kind: Literal["mor"] = "mor"
    recursions: int = Field(ge=1)
    """N, the count of the enclosing loop (the router has one output per depth 1..N); a
    loop that runs another number of times is an error at the first forward."""
    balance_loss: float = Field(default=0.01, ge=0)
    """Weight of the balancing loss ``N · sum_j f_j · P_j`` over depths (0: none)."""

    def check(self, dims: Dims):
        if not dims.loops:
            yield "recursions", ("mor routes each token to 1..N iterations of the `loop: N` group around its block, "
                                 "but this block is in no loop; put it in `loop: N` blocks, or use wrapper kind skip")
        elif dims.loops[-1] != self.recursions:
            yield "recursions", (f"must equal the count of the loop around this block ({dims.loops[-1]}), got "
                                 f"{self.recursions}")


class MixtureOfRecursions(BlockWrapper):
    def __init__(self, config: MoRConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        # bias 0 (the generic init): depths start near uniform, every token runs at least once
        self.router = nn.Linear(dims.d_model, config.recursions)

    def forward(self, block, h: Tensor, state, ctx: RunContext):
        """block: ``(h, state, ctx) -> (h, state)``; h: the residual stream [B, T, ...],
        which the router reads as [B, T, D]; state: None or one batch-1 state per sequence."""
        n, i = self.loop(ctx)
        key = self.decision_key(ctx, i)
        mor = None if ctx.aux is None else ctx.aux.scope("mor")
        if i == 0:
            probs = torch.softmax(router_logits(self.router, ctx.stream.reduce(h)), dim=-1)  # [B, T, N], fp32
            choice = probs.argmax(-1)  # [B, T]
            depth, gate = choice + 1, probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)  # [B, T]
            ctx.shared[key] = (depth, gate)
            if mor is not None:
                if self.config.balance_loss > 0:
                    share = F.one_hot(choice, n).to(probs.dtype).mean((0, 1))  # [N] f_j, no gradient
                    balance = n * (share * probs.mean((0, 1))).sum()
                    mor.add_loss("balance_loss", self.config.balance_loss * balance)
                mean_depth = depth.to(probs.dtype).mean()
                mor.add_metric("mean_depth", mean_depth)
                mor.add_metric("saved", 1 - mean_depth / n)
        elif key in ctx.shared:
            depth, gate = ctx.shared[key]
        else:  # our invariant: a loop replays its group from iteration 0 within one forward
            raise RuntimeError(f"mor at depth {ctx.layer}: iteration {i} of its loop ran without iteration 0 in the "
                               "same forward, so there is no routing decision to reuse")
        chosen = depth > i  # [B, T]
        h, state = run_chosen(block, h, chosen, gate, state, ctx)
        if mor is not None:
            mor.add_metric("processed", chosen.float().mean())
        return h, state

    def loop(self, ctx: RunContext) -> tuple[int, int]:
        """(N, i): the count and the iteration of the innermost loop around this block."""
        r = self.config.recursions
        if not ctx.loops:
            raise HybridlabError(
                f"block_wrapper mor (at depth {ctx.layer}) runs outside any loop: it routes each token to 1..N "
                f"iterations of the `loop: N` group around its block; put the block in a group `loop: {r}` "
                "(blocks: [...]), or use wrapper kind skip to skip single layers")
        n = ctx.loops[-1]
        if n != r:
            raise HybridlabError(
                f"block_wrapper mor (at depth {ctx.layer}) has recursions: {r} but its loop runs {n} times; they must "
                f"agree (the router has one output per depth): set recursions: {n}, or loop: {r}")
        return n, ctx.iterations[-1]

    def decision_key(self, ctx: RunContext, i: int) -> str:
        """Where this use of the wrapper keeps its decision in ``ctx.shared``. ``ctx.shared``
        lives for one forward call of the model, during which ``id(self)`` names this
        module. Under the same outer-loop iterations, the j-th call at iteration i reads
        the decision of the j-th call at iteration 0: a loop replays its group in order,
        so this pairs the uses of a block that runs more than once per loop pass (a
        shared block used twice in the group) and loops that run one after the other."""
        outer = ctx.iterations[:-1]
        calls = ctx.shared.setdefault(f"mor:{id(self)}:{outer}:calls", {})  # iteration -> calls so far
        j = calls.get(i, 0)
        calls[i] = j + 1
        return f"mor:{id(self)}:{outer}:{j}"

    def init_state(self, init, batch: int, device, dtype):
        """One batch-1 state per sequence (``init(batch, device, dtype)`` makes the block's):
        each sequence's block sees only its own tokens that reach this iteration."""
        return [init(1, device, dtype) for _ in range(batch)]


@hookimpl
def hybridlab_register(register):
    register.kind("block_wrapper", "mor", config=MoRConfig, module=MixtureOfRecursions)
