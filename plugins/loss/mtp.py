"""loss ``mtp``: multi-token prediction with sequential modules (DeepSeek-AI, "DeepSeek-V3
Technical Report", 2024, section 2.2), and the draft for speculative decoding.

Module k (k = 1 … depth) reads, at position i, the representation of depth k−1 (depth 0:
the main model's last block's output, before the final norm) and the embedding of the
token k places ahead, and predicts the token k+1 places ahead:

    h'ᵏᵢ = Mₖ [RMSNorm(hᵏ⁻¹ᵢ); RMSNorm(Emb(tᵢ₊ₖ))]          Mₖ: 2D -> D, no bias
    hᵏ   = TRMₖ(h'ᵏ)                                        a causal block over i = 0 … T−1−k
    Pᵏᵢ₊ₖ₊₁ = head(final_norm(hᵏᵢ))
    loss = (1/depth) Σₖ CE(Pᵏ, t₊ₖ₊₁)                        the pipeline's weight is the paper's λ

The embedding, the final norm and the head are the model's own, read from the model at
every call (so they train through both objectives and are saved once, with the model).
On a batch, depth k at position i reads ``inputs[i + k]`` and is scored against
``targets[i + k]`` (the next token for language modelling), where that target is not
``ignore_index``.

For decoding the modules are a :class:`~hybridlab.core.interfaces.Drafter`: each round
they draft ``depth`` tokens after the model's latest one, module k running from its own
decoding state over the positions whose inputs it has (the accepted tokens), plus the
k−1 positions whose token k ahead is itself a draft.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims, LossConfig, Needs
from hybridlab.core.errors import format_path
from hybridlab.core.interfaces import Aux, Drafter, InitWeights, RunContext
from hybridlab.core.model import Block
from hybridlab.core.objectives import Objective, ObjectiveRun, ObjectiveSetup
from hybridlab.core.spec import BlockSpec
from hybridlab.registry import hookimpl


class MTPConfig(LossConfig):
    """Multi-token prediction: ``depth`` sequential modules, each predicting one more token
    ahead through a block of its own, sharing the model's embedding, final norm and head."""

    kind: Literal["mtp"] = "mtp"
    depth: int = Field(default=1, ge=1)
    """D: extra future tokens predicted (module k predicts the token k+1 places ahead)."""
    block: BlockSpec | None = None
    """The transformer block of every module, written like one block of a model's ``layers``
    (``{mixer: {kind: attention, heads: 2}, ffn: {kind: swiglu, hidden: 64}}``; the model's
    ``defaults:`` are not merged in). null: a copy of the model's last block spec."""
    ignore_index: int = -100
    """Targets equal to this are not scored."""

    def needs(self) -> Needs:
        return Needs(fields=("inputs", "targets"), hidden=(-1,))

    def check_pipeline(self, pipeline, models):
        """The block's own checks with the modules' sizes (what a model's blocks get at
        validate); and no component may read another block (the modules run apart from the
        model's blocks, so a K/V they share is not there)."""
        spec = pipeline.model
        dims = module_dims(spec)
        if self.block is not None:
            for path, message in _block_problems(self.block, (), dims):
                yield ("block", *path), message
            return
        last = spec.positions()[-1]  # what the model's own checks said of it is not repeated here
        said = set(_block_problems(last.block, (), replace(dims, layer=last.index, loops=last.loops),
                                   references=False))
        for path, message in _block_problems(last.block, (), dims):
            if (path, message) not in said:
                yield None, (f"the model's last block (the modules' block when block: is not given) cannot serve "
                             f"outside the model: {format_path(path)}: {message}; give the modules a block: of "
                             "their own")


def module_dims(model_spec: Any, registry: Any = None) -> Dims:
    """The modules' blocks are built like the model's last block: at its depth, outside
    any loop."""
    n = len(model_spec.positions())
    return Dims(model_spec.d_model, model_spec.vocab_size, n, n - 1, registry)


def _block_problems(config: Any, path: tuple, dims: Dims, references: bool = True) -> Iterator[tuple[tuple, str]]:
    if isinstance(config, Config):
        try:
            found = list(config.check(dims))
        except Exception as exc:  # noqa: BLE001 - a plugin's check crashing: reported where it was asked
            found = [(None, f"its check() raised {type(exc).__name__}: {exc}")]
        for name, message in found:
            yield path + ((name,) if name is not None else ()), message
        for name, ref in config.layer_references() if references else ():
            yield path + (name,), (f"reads block {ref!r} of the model, which an MTP module does not run beside; "
                                   "an MTP block reads nothing from other blocks")
        for name in type(config).model_fields:
            yield from _block_problems(getattr(config, name), path + (name,), dims, references)
    elif isinstance(config, (list, tuple)):
        for i, item in enumerate(config):
            yield from _block_problems(item, path + (i,), dims, references)


class MTPModule(nn.Module):
    """One depth: h' = M [norm(h); norm(Emb(t))], then its block. The embedding and the
    residual stream's expand/reduce are the model's, passed in at each call."""

    def __init__(self, block: BlockSpec, dims: Dims, norm: Any, residual: Any) -> None:
        super().__init__()
        d = dims.d_model
        self.hidden_norm = dims.build("normalization", norm, d)
        self.embedding_norm = dims.build("normalization", norm, d)
        self.projection = nn.Linear(2 * d, d, bias=False)
        self.block = Block(block, dims, residual)

    def forward(self, model: nn.Module, hidden: Tensor, tokens: Tensor, state: Any,
                ctx: RunContext) -> tuple[Tensor, Any]:
        """hidden [B, T, D] (depth k−1 at positions i), tokens [B, T] (t_{i+k}) ->
        (depth k's output [B, T, D], the block's state)."""
        joined = torch.cat([self.hidden_norm(hidden), self.embedding_norm(model.embedding(tokens))], dim=-1)  # [B, T, 2D]
        h, state = self.block(model.stream.expand(self.projection(joined)), state, ctx)
        return model.stream.reduce(h), state


@dataclass
class DraftState:
    """What the modules keep between rounds: the inputs that became final (the model's
    hidden at each position run, the token after each), and per depth its block's state
    and its outputs at the positions it has run (``done[k]`` of them)."""

    hidden: list[Tensor] = field(default_factory=list)  # [B, D] per position: depth 0
    tokens: list[Tensor] = field(default_factory=list)  # [B] per position p: t_{p+1}
    outputs: list[list[Tensor]] = field(default_factory=list)  # per depth k ≥ 1: [B, D] per position run
    states: list[Any] = field(default_factory=list)  # per depth: its block's decoding state


class MTP(Objective, Drafter):
    """``depth`` MTP modules; their parameters train with the model and are saved in the
    checkpoint's objectives.safetensors."""

    def __init__(self, config: MTPConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.config = config
        spec = setup.model_spec
        block = config.block if config.block is not None else spec.positions()[-1].block
        self.dims = module_dims(spec, setup.dims.registry)
        self.block_name = block.name
        self.depths = nn.ModuleList(MTPModule(block, self.dims, spec.norm, spec.residual)
                                      for _ in range(config.depth))
        self.draft_layer = len(spec.positions()) - 1  # the key run.hidden(-1) reads
        self.max_draft = config.depth
        self._init_weights(setup.init_std)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        """As the model initialises its own blocks (Model.init_weights): normal(0, std),
        zero biases, residual output projections scaled by 1/sqrt(2·depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            if getattr(module, "residual_out", False) and isinstance(module, nn.Linear):
                module.weight.mul_((2 * self.dims.n_layers) ** -0.5)
        for module in self.modules():
            if module is not self and isinstance(module, InitWeights):
                module.init_weights(std)

    def _context(self, model: nn.Module, aux: Aux) -> RunContext:
        ctx = RunContext(aux=aux, stream=model.stream, n_layers=self.dims.n_layers)
        return ctx.at(self.dims.layer, name=self.block_name)

    def _logits(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return model.readout(model.norm(hidden))  # the head with μP's logits multiplier, as the model's forward

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict]:
        """-> (mean over depths of each depth's mean cross-entropy, metrics): ``loss_k``
        and ``accuracy_k`` (argmax == target) for k = 1 … depth, over scored positions;
        ``aux`` when the modules' blocks add auxiliary losses (MoE), which the loss includes."""
        model, inputs, targets = run.model, run.batch["inputs"], run.batch["targets"]  # [B, T], [B, T]
        hidden = run.hidden(-1)  # [B, T, D]: depth 0
        aux, T = Aux(), inputs.shape[1]
        losses, metrics = [], {}
        for k, module in enumerate(self.depths, start=1):
            n = T - k  # positions i whose token i+k is in the batch
            if n <= 0:
                zero = sum(p.sum() for p in module.parameters()) * 0.0  # keeps the graph: nothing to score
                losses.append(zero)
                metrics[f"loss_{k}"] = metrics[f"accuracy_{k}"] = (zero.detach(), zero.new_zeros(()))
                continue
            hidden, _ = module(model, hidden[:, :n], inputs[:, k:], None, self._context(model, aux))  # [B, n, D]
            logits = self._logits(model, hidden).float()  # [B, n, V]
            target = targets[:, k:]  # [B, n]
            mask = target != self.config.ignore_index
            count = mask.sum()
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=self.config.ignore_index,
                                 reduction="sum")
            losses.append(ce / count.clamp(min=1))
            with torch.no_grad():
                correct = ((logits.argmax(-1) == target) & mask).sum()
            metrics[f"loss_{k}"] = (ce.detach(), count)
            metrics[f"accuracy_{k}"] = (correct, count)
        loss = torch.stack(losses).mean()
        if aux.losses:
            extra = sum(aux.losses.values())
            metrics["block_aux"] = extra.detach()
            loss = loss + extra
        return loss, metrics

    # ---------------------------------------------------------------- the drafter

    def draft_state(self, model: nn.Module, batch: int, device: torch.device | str, dtype: torch.dtype) -> DraftState:
        return DraftState(outputs=[[] for _ in self.depths],
                          states=[m.block.init_state(batch, device, dtype) for m in self.depths])

    @torch.no_grad()
    def draft(self, model: nn.Module, state: DraftState, hidden: Tensor, tokens: Tensor,
              count: int) -> tuple[Tensor, DraftState]:
        """Take the new final positions (hidden [B, n, D], tokens [B, n]: t_{p+1} for each),
        run every depth over the positions all of whose inputs are final, then draft
        ``count`` tokens: depth k, from a copy of its state, over the positions after those
        (their tokens k ahead are drafts), its output at the last position giving draft k."""
        state.hidden += list(hidden.unbind(1))
        state.tokens += list(tokens.unbind(1))
        n = len(state.hidden)  # positions 0 … n−1 run by the model; tokens t_1 … t_n known
        aux = Aux()
        below = state.hidden  # depth k−1's final outputs, per position
        for k, module in enumerate(self.depths, start=1):
            done = state.outputs[k - 1]
            ready = min(len(below), n - k + 1)  # position p needs t_{p+k}: p ≤ n − k
            if ready > len(done):
                start = len(done)
                out, state.states[k - 1] = module(model, torch.stack(below[start:ready], 1),
                                                  torch.stack(state.tokens[start + k - 1:ready + k - 1], 1),
                                                  state.states[k - 1], self._context(model, aux))
                done += list(out.unbind(1))
            below = done
        drafts: list[Tensor] = []
        below_tail: list[Tensor] = []  # depth k−1's draft outputs at the positions after its final ones
        below = state.hidden
        for k, module in enumerate(self.depths[:count], start=1):
            done = state.outputs[k - 1]
            start = len(done)
            if start < n:  # positions start … n−1: their tokens k ahead run into the drafts
                inputs = (below + below_tail)[start:n]
                known = (state.tokens + drafts)[start + k - 1:n + k - 1]
                out, _ = module(model, torch.stack(inputs, 1), torch.stack(known, 1),
                                copy.deepcopy(state.states[k - 1]), self._context(model, aux))
                tail = list(out.unbind(1))
            else:
                tail = []
            last = tail[-1] if tail else done[n - 1]  # [B, D]: depth k at position n − 1
            drafts.append(self._logits(model, last[:, None]).argmax(-1)[:, 0])  # [B]
            below, below_tail = done, tail
        return torch.stack(drafts, 1), state


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "mtp", config=MTPConfig, module=MTP)
