"""block_wrapper ``skip``: a per-layer skip router (FiRST; Jain et al. 2024, "FiRST:
Finetuning Router-Selective Transformers for Input-Adaptive Latency Reduction").

A router reads each token's hidden state and decides, for this layer and this token
alone, whether the token runs the block:

    r_t = w · rms_norm(h_t) + b                          (fp32, autocast off)
    h_t <- h_t + sigmoid(r_t) · (block(h)_t - h_t)        if r_t > 0
    h_t <- h_t                                            otherwise (bitwise)

The processed tokens go through the block as one shorter sequence per sequence (their
mixer sees only them, in time order; its decoding state keeps only them), exactly as in
``mod``'s evaluation path, whose helpers this wrapper imports. The decision reads only
the token's own hidden state, so it is causal in training and in decoding alike (unlike
``mod``'s training top-k), and the same weights give the same outputs in train and eval.

The gate sigmoid(r_t) on a processed token's update carries the task loss to the router;
an auxiliary compute loss ``compute_loss · mean_t sigmoid(r_t)`` pushes it to skip.
Metrics: ``skip.processed`` (fraction of tokens that ran the block) and ``skip.saved``
(1 - processed, the fraction of this block's token-computations saved).

Where it differs from FiRST: FiRST's layer-specific routers decide once per input
sequence, from the prompt at prefill, which layers the whole generation skips, and they
are added to a pretrained model (then LoRA fine-tuning). Here each token decides for
itself at each layer, and the routers train with the model (docs/composition.md,
"Per-token depth").
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.interfaces import BlockWrapper, RunContext
from hybridlab.plugins.block_wrapper.mod import router_logits, run_chosen
from hybridlab.registry import hookimpl


class SkipConfig(Config):
    """FiRST-style skip router: each token runs the block when its router logit is > 0."""

    kind: Literal["skip"] = "skip"
    compute_loss: float = Field(default=0.01, ge=0)
    """Weight of the auxiliary loss ``mean_t sigmoid(r_t)``, which pushes tokens to skip
    (0: no compute pressure; the router then learns from the task loss alone)."""
    router_bias: float = 2.0
    """Initial bias of the router. Positive so that every token starts processed with a
    gate near 1 (sigmoid(2) = 0.88): the model starts close to the unwrapped one and
    learns which tokens to skip. At 0 (the generic init of biases) r_t = w · x with w
    ~ N(0, init_std) would be a near-zero coin toss: about half the tokens would skip at
    random from step 0, each processed update halved, and an r_t near 0 flips with
    rounding."""


class SkipRouter(BlockWrapper):
    def __init__(self, config: SkipConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(dims.d_model, 1)

    def init_weights(self, std: float) -> None:
        """After the model's generic init (which zeroes biases): the bias that makes tokens
        start processed (``SkipConfig.router_bias``)."""
        with torch.no_grad():
            self.router.bias.fill_(self.config.router_bias)

    def forward(self, block, h: Tensor, state, ctx: RunContext):
        """block: ``(h, state, ctx) -> (h, state)``; h: the residual stream [B, T, ...],
        which the router reads as [B, T, D]; state: None or one batch-1 state per sequence."""
        logits = router_logits(self.router, ctx.stream.reduce(h)).squeeze(-1)  # [B, T]
        chosen = logits > 0  # [B, T]
        gate = torch.sigmoid(logits)  # [B, T]
        h, state = run_chosen(block, h, chosen, gate, state, ctx)
        if ctx.aux is not None:
            skip = ctx.aux.scope("skip")
            if self.config.compute_loss > 0:
                skip.add_loss("compute_loss", self.config.compute_loss * gate.mean())
            processed = chosen.float().mean()
            skip.add_metric("processed", processed)
            skip.add_metric("saved", 1 - processed)
        return h, state

    def init_state(self, init, batch: int, device, dtype):
        """One batch-1 state per sequence (``init(batch, device, dtype)`` makes the block's):
        each sequence's block sees only its own processed tokens."""
        return [init(1, device, dtype) for _ in range(batch)]


@hookimpl
def hybridlab_register(register):
    register.kind("block_wrapper", "skip", config=SkipConfig, module=SkipRouter)
