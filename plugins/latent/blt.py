"""latent ``blt`` and patcher kinds ``entropy``, ``fixed``, ``space``: the Byte Latent
Transformer (Pagnoni et al. 2024, "Byte Latent Transformer: Patches Scale Better Than
Tokens", arXiv:2412.09871), with the spec's blocks as its global model.

Bytes x_0..x_{T-1} (the model's embedding gives their vectors, its head the next-byte
logits). A patcher says where patches start, from earlier bytes only:

    start_0 = 1,  start_t = [H(x_t | x_<t) > threshold]        entropy (bits, a byte model's)
                  start_t = [t mod size = 0]                   fixed
                  start_t = [x_{t-1} is ASCII whitespace]      space

    p(t) = Σ_{s≤t} start_s − 1                                 the patch of byte t

The local encoder, then the pooling of each patch's bytes into one vector (a cross
attention from a learned query per head):

    e_t = x_t + Σ_{i<W} w_i ⊙ x_{t-W+1+i};  e_t ← e_t + MLP(rms(e_t))
    r_p = W_o softmax_{t: p(t)=p}(q · W_k e_t / √d) W_v e_t    per head, heads concatenated

The blocks run over r_0..r_{P-1} (causal over patches): g = blocks(r). The local decoder
reads, for byte t, only the patches complete before it, j < p(t) (the patch a byte
belongs to is not finished, so its g is not available), and a learned null entry:

    d_t = e_t + W_c attn(W_q rms(e_t), [null; g_j for j < p(t)]);  d_t ← d_t + MLP(rms(d_t))

and d_t goes to the model's final norm and head. The loss is the model's next-byte cross
entropy.

Decoding from a state (``init_state``; any ``forward`` with a state) runs byte by byte:
when byte t starts a patch, the previous patch is complete, its pooled vector (kept as an
online softmax: running max, normaliser and weighted sum) goes through the blocks one
step, and its output joins the decoder's memory before byte t reads it. Rows of a batch
finish patches at different bytes, so each row keeps its own block states (batch 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.errors import HybridlabError
from hybridlab.core.interfaces import Latent
from hybridlab.registry import hookimpl

BYTES = 256
WHITESPACE = (9, 10, 11, 12, 13, 32)  # \t \n \v \f \r and space


# ---------------------------------------------------------------- patchers


class EntropyPatcherConfig(Config):
    """A patch starts where a trained byte model's next-byte entropy exceeds ``threshold``."""

    kind: Literal["entropy"] = "entropy"
    model: str
    """The entropy model: a run directory of a byte model (vocab_size 256; its latest
    checkpoint, pinned when the spec is loaded) or one of its checkpoint directories.
    Relative paths are read from the working directory. Frozen; not saved with the model."""
    threshold: float = Field(default=2.0, gt=0)
    """Entropy in bits (0 to 8 for bytes) above which a byte starts a new patch."""

    @field_validator("model")
    @classmethod
    def _pinned(cls, model: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("saved_run"):  # a saved spec holds the pinned path already
            return model
        from hybridlab.core.objectives import START, check_model_reference

        if model == START:
            raise ValueError("needs a trained byte model's run directory, not 'start'")
        where, why = check_model_reference(model, Path.cwd())
        if why is not None:
            raise ValueError(why)
        from hybridlab.core.checkpoint import run_of
        from hybridlab.core.config import _registry_from
        from hybridlab.core.spec import load_pipeline

        try:
            vocab = load_pipeline(run_of(Path(where)) / "spec.yaml", registry=_registry_from(info), warn=False,
                                  saved_run=True).model.vocab_size
        except HybridlabError as exc:
            raise ValueError(f"the run's spec.yaml does not load: {exc}") from None
        if vocab != BYTES:
            raise ValueError(f"the entropy model must be a byte model (vocab_size 256), got vocab_size {vocab}")
        return where


class FixedPatcherConfig(Config):
    """A patch starts every ``size`` bytes (positions 0, size, 2·size...)."""

    kind: Literal["fixed"] = "fixed"
    size: int = Field(default=4, ge=1)
    """Bytes per patch."""


class SpacePatcherConfig(Config):
    """A patch starts after every ASCII whitespace byte (space, \\t, \\n, \\v, \\f, \\r)."""

    kind: Literal["space"] = "space"


class EntropyPatcher(nn.Module):
    """``starts(tokens, state) -> (starts [B, T] bool, state)``; state None: the sequence
    begins at tokens[:, 0]. The entropy model is kept outside the module tree: it is
    frozen, loaded from its run, and the model's init must not redraw its weights."""

    def __init__(self, config: EntropyPatcherConfig, dims: Dims) -> None:
        super().__init__()
        from hybridlab.core.objectives import load_frozen

        self.config = config
        model = load_frozen(config.model, torch.device("cpu"), dims.registry)
        if model.spec.vocab_size != BYTES:
            raise HybridlabError(f"patcher.model {config.model}: the entropy model's vocab_size is "
                                 f"{model.spec.vocab_size}; it must be a byte model (256)")
        object.__setattr__(self, "entropy_model", model)

    def _model_on(self, tokens: Tensor) -> nn.Module:
        model = self.entropy_model
        if next(model.parameters()).device != tokens.device:
            model.to(tokens.device)
        return model

    @torch.no_grad()
    def entropy(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """tokens [B, T] -> H [B, T] in bits: the entropy of the model's prediction of the
        byte after each one, in float64; and the model's state after them."""
        out = self._model_on(tokens)(tokens, state)
        logp = torch.log_softmax(out.logits.double(), dim=-1)
        return -(logp.exp() * logp).sum(-1) / math.log(2), out.state

    def starts(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        pending = None if state is None else state[1]  # H of the next byte, None before the first
        entropy, model_state = self.entropy(tokens, None if state is None else state[0])
        first = torch.ones_like(tokens[:, :1], dtype=torch.bool) if pending is None else (pending > self.config.threshold)[:, None]
        starts = torch.cat([first, entropy[:, :-1] > self.config.threshold], dim=1)
        return starts, (None if state is None else (model_state, entropy[:, -1]))

    def init_state(self, batch: int, device: torch.device | str) -> Any:
        model = self.entropy_model.to(device)
        return (model.init_state(batch, device), None)

    def max_patches(self, seq_len: int) -> int:
        return seq_len  # any byte may start a patch

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        return self.entropy_model.state_bytes(seq_len, dtype)  # the entropy model decodes alongside


class FixedPatcher(nn.Module):
    def __init__(self, config: FixedPatcherConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config

    def starts(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        offset = 0 if state is None else state
        t = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        starts = (t % self.config.size == 0)[None].expand(tokens.shape[0], -1)
        return starts, (None if state is None else offset + tokens.shape[1])

    def init_state(self, batch: int, device: torch.device | str) -> Any:
        return 0

    def max_patches(self, seq_len: int) -> int:
        return -(-seq_len // self.config.size)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        return 0


class SpacePatcher(nn.Module):
    def __init__(self, config: SpacePatcherConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("space", torch.zeros(BYTES + 1, dtype=torch.bool), persistent=False)
        self.space[list(WHITESPACE)] = True  # index 256: "before the first byte", starts a patch too
        self.space[BYTES] = True

    def starts(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        before = tokens.new_full((tokens.shape[0], 1), BYTES) if state is None else state[:, None]
        previous = torch.cat([before, tokens[:, :-1]], dim=1)  # [B, T]
        return self.space[previous], (None if state is None else tokens[:, -1])

    def init_state(self, batch: int, device: torch.device | str) -> Any:
        return torch.full((batch,), BYTES, dtype=torch.long, device=device)

    def max_patches(self, seq_len: int) -> int:
        return seq_len  # a run of whitespace starts a patch at every byte

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        return 8  # the previous byte


# ---------------------------------------------------------------- the latent


class BLTConfig(Config):
    """Byte Latent Transformer: bytes pooled into patches, the blocks over patches, bytes
    decoded from the complete patches."""

    kind: Literal["blt"] = "blt"
    patcher: Component("patcher")
    """Where patches start: ``{kind: entropy, model: RUN_DIR, threshold: 2.0}``, ``{kind:
    fixed, size: 4}`` or ``{kind: space}``."""
    window: int = Field(default=4, ge=1)
    """Taps of the local encoder's causal depthwise convolution over byte vectors."""
    heads: int = Field(default=2, ge=1)
    """Heads of the pooling and of the decoder's cross attention; must divide d_model."""
    hidden: int | None = Field(default=None, ge=1)
    """Width of the local encoder's and decoder's MLPs (default: 2·d_model)."""

    def check(self, dims: Dims):
        if dims.vocab_size != BYTES:
            yield None, (f"a byte-latent model reads bytes: the model's vocab_size must be 256, got "
                         f"{dims.vocab_size} (use the text task without a tokenizer)")
        if dims.d_model % self.heads:
            yield "heads", f"must divide d_model ({dims.d_model}), got {self.heads}"


@dataclass(frozen=True)
class BLTState:
    """Decoding state, per batch row b: the patcher's; the last window−1 byte vectors;
    the open patch's online softmax (max m [B, H], normaliser s [B, H], weighted sum acc
    [B, H, Dh]; ``open`` [B] whether a patch has begun); the blocks' states (a list per
    row, batch 1); the blocks' outputs of the complete patches (one [n_b, D] per row)."""

    patcher: Any
    window: Tensor
    m: Tensor
    s: Tensor
    acc: Tensor
    open: Tensor
    blocks: list
    memory: list


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(F.rms_norm(x, x.shape[-1:]))))


class BLT(Latent):
    def __init__(self, config: BLTConfig, dims: Dims) -> None:
        super().__init__()
        D, H = dims.d_model, config.heads
        self.config, self.heads, self.head_dim = config, H, D // H
        self.patcher = dims.build("patcher", config.patcher)
        self.conv = nn.Parameter(torch.zeros(D, config.window))  # [D, W], w[:, -1] multiplies x_t
        hidden = config.hidden or 2 * D
        self.encoder_mlp = MLP(D, hidden)
        self.pool_query = nn.Parameter(torch.zeros(H, self.head_dim))
        self.pool_kv = nn.Linear(D, 2 * D, bias=False)
        self.pool_out = nn.Linear(D, D, bias=False)
        self.query = nn.Linear(D, D, bias=False)
        self.memory_kv = nn.Linear(D, 2 * D, bias=False)
        self.null = nn.Parameter(torch.zeros(1, D))  # the memory entry every byte may read
        self.cross_out = nn.Linear(D, D, bias=False)
        self.decoder_mlp = MLP(D, hidden)

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            self.conv.zero_()
            self.conv[:, -1] = 1.0  # starts as the identity on x_t
            self.pool_query.normal_(0.0, std)
            self.null.normal_(0.0, std)

    # ---- the parts every path shares

    def encode(self, x: Tensor, before: Tensor) -> Tensor:
        """x [B, T, D], before [B, W-1, D] (the byte vectors before x) -> e [B, T, D]."""
        W, T = self.config.window, x.shape[1]
        xp = torch.cat([before.to(x.dtype), x], dim=1)  # [B, W-1+T, D]
        e = sum(xp[:, i:i + T] * self.conv[:, i] for i in range(W))
        return e + self.encoder_mlp(e)

    def pool_scores(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """e [B, T, D] -> scores [B, H, T] of the pooling query, values [B, H, T, Dh]."""
        B, T, _ = e.shape
        k, v = self.pool_kv(e).view(B, T, 2, self.heads, self.head_dim).unbind(2)  # [B, T, H, Dh] each
        scores = torch.einsum("bthd,hd->bht", k, self.pool_query) / math.sqrt(self.head_dim)
        return scores, v.transpose(1, 2)

    def decode(self, e: Tensor, memory: Tensor, allowed: Tensor) -> Tensor:
        """e [B, T, D], memory [B, M, D] (null first), allowed [B, T, M] -> d [B, T, D]."""
        B, T, D = e.shape
        M = memory.shape[1]
        q = self.query(F.rms_norm(e, (D,))).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k, v = self.memory_kv(memory).view(B, M, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, M, Dh]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # [B, H, T, Dh]
        d = e + self.cross_out(y.transpose(1, 2).reshape(B, T, D))
        return d + self.decoder_mlp(d)

    # ---- parallel

    def forward(self, tokens: Tensor, x: Tensor, state: Any, run_blocks: Callable, *, aux: Any) -> tuple[Tensor, Any]:
        if state is not None:
            return self.steps(tokens, x, state, run_blocks, aux=aux)
        B, T, D = x.shape
        starts, _ = self.patcher.starts(tokens, None)
        patch = starts.long().cumsum(1) - 1  # [B, T], the patch of each byte
        P = int(patch.max()) + 1
        e = self.encode(x, x.new_zeros(B, self.config.window - 1, D))
        scores, v = self.pool_scores(e)  # [B, H, T], [B, H, T, Dh]
        member = patch[:, None, :] == torch.arange(P, device=x.device)[None, :, None]  # [B, P, T]
        member = member | ~member.any(-1, keepdim=True)  # a row with fewer patches pools its padding over all bytes
        weights = torch.softmax(scores[:, :, None, :].masked_fill(~member[:, None], float("-inf")), dim=-1)
        pooled = torch.einsum("bhpt,bhtd->bhpd", weights, v)  # [B, H, P, Dh]
        r = self.pool_out(pooled.transpose(1, 2).reshape(B, P, D))
        g, _ = run_blocks(r, None, step=False)  # [B, P, D]; causal, so padding patches at the end change nothing
        memory = torch.cat([self.null.to(g.dtype).expand(B, 1, D), g], dim=1)  # [B, 1+P, D]
        # byte t reads the null entry and the patches j < p(t): those complete before it
        allowed = torch.arange(P + 1, device=x.device)[None, None, :] <= patch[:, :, None]
        d = self.decode(e, memory, allowed)
        aux.add_metric("bytes_per_patch", (starts.numel() / starts.sum()).detach())
        return d, None

    # ---- from a state, byte by byte

    def positions(self, seq_len: int) -> int:
        return self.patcher.max_patches(seq_len)

    def own_state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        """The complete patches' block outputs (the decoder's memory), the encoder's window,
        the open patch's pooling (m, s, acc), and the patcher's state."""
        D, H, Dh = self.conv.shape[0], self.heads, self.head_dim
        size = torch.empty((), dtype=dtype).element_size()
        elements = self.positions(seq_len) * D + (self.config.window - 1) * D + 2 * H + H * Dh
        return elements * size + self.patcher.state_bytes(seq_len, dtype)

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype, init_blocks: Callable) -> BLTState:
        D, H, Dh = self.conv.shape[0], self.heads, self.head_dim
        return BLTState(
            patcher=self.patcher.init_state(batch, device),
            window=torch.zeros(batch, self.config.window - 1, D, device=device, dtype=dtype),
            m=torch.full((batch, H), float("-inf"), device=device, dtype=dtype),
            s=torch.zeros(batch, H, device=device, dtype=dtype),
            acc=torch.zeros(batch, H, Dh, device=device, dtype=dtype),
            open=torch.zeros(batch, dtype=torch.bool, device=device),
            blocks=[init_blocks(1, device, dtype) for _ in range(batch)],
            memory=[torch.zeros(0, D, device=device, dtype=dtype) for _ in range(batch)])

    def steps(self, tokens: Tensor, x: Tensor, state: BLTState, run_blocks: Callable, *, aux: Any) -> tuple[Tensor, BLTState]:
        out = []
        for t in range(tokens.shape[1]):
            y, state = self.step(tokens[:, t:t + 1], x[:, t:t + 1], state, run_blocks)
            out.append(y)
        return torch.cat(out, dim=1) if out else x, state

    def step(self, token: Tensor, x: Tensor, state: BLTState, run_blocks: Callable) -> tuple[Tensor, BLTState]:
        """One byte per row: token [B, 1], x [B, 1, D] -> (d [B, 1, D], state)."""
        B, _, D = x.shape
        start, patcher = self.patcher.starts(token, state.patcher)
        start = start[:, 0]  # [B]
        blocks, memory = list(state.blocks), list(state.memory)
        for b in torch.nonzero(start & state.open).flatten().tolist():  # these rows' open patch is complete
            pooled = (state.acc[b] / state.s[b][:, None]).reshape(1, 1, D)  # heads concatenated
            g, blocks[b] = run_blocks(self.pool_out(pooled), blocks[b], step=True)
            memory[b] = torch.cat([memory[b], g[0].to(memory[b].dtype)], dim=0)
        e = self.encode(x, state.window)
        scores, v = self.pool_scores(e)  # [B, H, 1], [B, H, 1, Dh]
        scores, v = scores[..., 0], v[:, :, 0]
        m_old = torch.where(start[:, None], torch.full_like(state.m, float("-inf")), state.m)
        s_old = torch.where(start[:, None], torch.zeros_like(state.s), state.s)
        acc_old = torch.where(start[:, None, None], torch.zeros_like(state.acc), state.acc)
        m = torch.maximum(m_old, scores)
        keep, new = torch.exp(m_old - m), torch.exp(scores - m)  # exp(-inf) = 0 for a fresh patch
        s = s_old * keep + new
        acc = acc_old * keep[..., None] + new[..., None] * v
        M = 1 + max(len(mem) for mem in memory)
        padded = x.new_zeros(B, M, D)
        allowed = torch.zeros(B, 1, M, dtype=torch.bool, device=x.device)
        for b, mem in enumerate(memory):
            padded[b, 1:1 + len(mem)] = mem.to(x.dtype)
            allowed[b, 0, :1 + len(mem)] = True
        padded[:, 0] = self.null.to(x.dtype)
        d = self.decode(e, padded, allowed)
        window = torch.cat([state.window, x.to(state.window.dtype)], dim=1)[:, 1:]
        return d, BLTState(patcher, window, m, s, acc, torch.ones_like(state.open), blocks, memory)


@hookimpl
def hybridlab_register(register):
    register.category("patcher", "where a byte-latent model's patches start: module(config, dims); "
                                 "starts(tokens [B, T], state) -> (starts [B, T] bool, state), init_state(batch, device), "
                                 "max_patches(seq_len) -> int, state_bytes(seq_len, dtype) -> int")
    register.kind("patcher", "entropy", config=EntropyPatcherConfig, module=EntropyPatcher)
    register.kind("patcher", "fixed", config=FixedPatcherConfig, module=FixedPatcher)
    register.kind("patcher", "space", config=SpacePatcherConfig, module=SpacePatcher)
    register.kind("latent", "blt", config=BLTConfig, module=BLT)
