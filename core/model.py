"""Assembly: a validated :class:`ModelSpec` becomes a model.

A block reads like the diagram: ``h = place(h, mixer)``, then ``h = place(h, ffn)``, where
the norm placement kind puts the norms (pre: ``h + f(norm(h))``) and the residual scheme
joins the sub-layer to the stream (``prenorm`` adds; hyper-connections keep several lanes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import mup
from .config import Dims
from .dispatch import Dispatched, call_scope, pin_applies
from .errors import HybridlabError
from .interfaces import (ActiveParameters, Aux, BlockWrapper, Conditioning, InitWeights, Latent, ModelOutput, NormPlacement,
                         ReadsContext, RunContext, State, StreamTaps, TiedHead)
from .spec import BlockSpec, ModelSpec, Position


BLOCK_CATEGORIES = ("mixer", "ffn", "normalization", "norm_placement", "residual", "block_wrapper")
STEP_COMPILERS = ("eager", "inductor")  # torch.compile backends Model.compiled_step takes


def build(registry: Any, category: str, config: Any, *args: Any) -> Any:
    """Construct the module of a validated config: ``Module(config, *args)``."""
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    try:
        module = registry.kind(category, config.kind).module(config, *args)
    except HybridlabError:
        raise
    except Exception as exc:  # a plugin's constructor failing on a validated config: one line, not a traceback
        dims = next((a for a in args if isinstance(a, Dims)), None)
        where = f" in layer {dims.layer}" if dims is not None and category in BLOCK_CATEGORIES else ""
        first = str(exc).strip().splitlines()[:1]  # torch's may go on with C++ frames
        raise HybridlabError(f"building {category} kind {config.kind!r}{where} raised {type(exc).__name__}"
                             + (f": {first[0]}" if first else "")) from exc
    if isinstance(module, nn.Module):
        for sub in module.modules():
            if isinstance(sub, Dispatched):
                sub.registry = registry
    return module


class Block(nn.Module):
    """A residual scheme around two sub-layers, the mixer and the FFN; the block's
    ``placement`` kind puts its norms around each (pre, post, sandwich...) and a wrapper,
    if any, decides which tokens run it. Built once per set of weights: a shared or
    looped block runs at several depths, each with its own state."""

    def __init__(self, spec: BlockSpec, dims: Dims, residual: Any) -> None:
        super().__init__()
        # registration order (placement's norm, mixer, residual, ffn...) is the parameter
        # order checkpoints' optimizer states were saved in
        self.d_in, self.d_model = dims.d_in, dims.d_model  # d_in: a wide input ([h; e]) the mixer reads
        self.mixer_place = dims.build("norm_placement", spec.placement, spec.norm)
        self.mixer = dims.build("mixer", spec.mixer)
        dims = replace(dims, d_in=None)  # the mixer returns d_model: everything after it is that wide
        self.mixer_residual = dims.build("residual", residual)
        self.ffn = dims.build("ffn", spec.ffn) if spec.ffn is not None else None
        if self.ffn is not None:
            self.ffn_place = dims.build("norm_placement", spec.placement, spec.norm)
            self.ffn_residual = dims.build("residual", residual)
        self.wrapper = dims.build("block_wrapper", spec.wrapper) if spec.wrapper is not None else None
        for place in [self.mixer_place] + ([self.ffn_place] if self.ffn is not None else []):
            if not isinstance(place, NormPlacement):
                raise HybridlabError(
                    f"norm_placement kind {spec.placement.kind!r}: {type(place).__name__} does not subclass "
                    "hybridlab.core.interfaces.NormPlacement (forward(h, sublayer, residual, ctx)); see docs/plugins.md")
        if self.wrapper is not None and not isinstance(self.wrapper, BlockWrapper):
            raise HybridlabError(
                f"block_wrapper kind {spec.wrapper.kind!r}: {type(self.wrapper).__name__} does not subclass "
                "hybridlab.core.interfaces.BlockWrapper; wrappers now take forward(block, h, state, ctx) with block "
                "a callable (no block.inner, doc_ids/aux/step are ctx.doc_ids/ctx.aux/ctx.step) and "
                "init_state(init, batch, device, dtype); see docs/plugins.md")
        self._register_load_state_dict_pre_hook(_rename_old_norms)
        apply_block_pins(self, spec, dims)
        self.kinds = ", ".join(f"{name} {config.kind}" for name, config in (
            ("mixer", spec.mixer), ("placement", spec.placement), ("wrapper", spec.wrapper)) if config is not None)

    def forward(self, h: Tensor, state: State | None, ctx: RunContext) -> tuple[Tensor, State | None]:
        """h: the residual stream -> (h, state). A wrapper (mixture-of-depths) gets
        ``self.inner`` as a callable and runs it on what it chooses."""
        out = self.wrapper(self.inner, h, state, ctx) if self.wrapper is not None else self.inner(h, state, ctx)
        shape = h.shape if self.d_in is None else (*h.shape[:-1], self.d_model)  # a wide input returns d_model
        return checked_block_output(out, h, ctx, self.kinds, shape)

    def inner(self, h: Tensor, state: State | None, ctx: RunContext) -> tuple[Tensor, State | None]:
        mixed = MixerRun(self.mixer, state, ctx)
        h = self.mixer_place(h, mixed, self.mixer_residual, ctx)
        if self.ffn is not None:
            h = self.ffn_place(h, lambda x: self.ffn(x, aux=ctx.aux), self.ffn_residual, ctx)
        return h, mixed.state

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        if self.wrapper is not None:  # the wrapper owns the block's decoding state
            return self.wrapper.init_state(self.mixer.init_state, batch, device, dtype)
        return self.mixer.init_state(batch, device, dtype)


def checked_block_output(out: Any, h: Tensor, ctx: RunContext, kinds: str,
                         shape: tuple | None = None) -> tuple[Tensor, State | None]:
    """``out`` if it is ``(h', state)`` with h' of h's shape (or ``shape``); otherwise an
    error naming the block (a plugin's wrapper or placement returning the wrong thing is
    said here, not as a shape mismatch three layers later)."""
    shape = tuple(h.shape if shape is None else shape)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and tuple(out[0].shape) == shape:
        return out
    got = (f"a stream of shape {tuple(out[0].shape)}" if isinstance(out, tuple) and len(out) == 2
           and isinstance(out[0], Tensor) else type(out).__name__)
    raise HybridlabError(f"the block at depth {ctx.layer} ({kinds}) returned {got}; expected (h, state) with h of "
                         f"the shape {shape}")


class MixerRun:
    """The mixer as a sub-layer ``x -> y`` for the norm placement and the residual, keeping
    the state it returns (the sub-layer seam passes tensors only)."""

    def __init__(self, mixer: nn.Module, state: State | None, ctx: RunContext) -> None:
        self.mixer, self.state, self.ctx = mixer, state, ctx

    def __call__(self, x: Tensor) -> Tensor:
        ctx, extra = self.ctx, ({"ctx": self.ctx} if isinstance(self.mixer, ReadsContext) else {})
        if ctx.step:
            y, self.state = self.mixer.step(x, self.state, aux=ctx.aux, **extra)
        else:
            y, self.state = self.mixer(x, self.state, doc_ids=ctx.doc_ids, aux=ctx.aux, **extra)
        return y


def apply_block_pins(block: nn.Module, spec: BlockSpec, dims: Dims) -> None:
    """Give each dispatched module of the block the spec's ``impl:`` pin for its kind
    (category.kind before the bare kind); a pin that pins nothing is an error."""
    dispatched = [m for m in block.modules() if isinstance(m, Dispatched)]
    used = set()
    for module in dispatched:
        keys = [k for k in (f"{module.category}.{module.kind}", module.kind) if k in spec.impl and
                pin_applies({k: spec.impl[k]}, module.category, module.kind, dims.registry) is not None]
        if keys:
            module.spec_pin = spec.impl[keys[0]]
            used.update(keys)
    unused = [kind for kind in spec.impl if kind not in used]
    if unused:  # a pin that pins nothing would leave the user believing it took effect
        here = sorted({m.kind for m in dispatched})
        raise HybridlabError(
            f"layers[{dims.layer}].impl: {', '.join(map(repr, unused))} pinned, but no layer of this block is of "
            f"that kind (its kinds with implementations: {', '.join(here) or 'none'})")


def _rename_old_norms(state_dict, prefix, *args) -> None:
    """Checkpoints from before norm placement was its own kind hold a block's norms as
    ``mixer_norm`` / ``ffn_norm``; they are the pre placement's ``norm`` now."""
    for old, new in (("mixer_norm.", "mixer_place.norm."), ("ffn_norm.", "ffn_place.norm.")):
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


class Blocks(nn.ModuleDict):
    """The model's unique blocks by weight key (``Position.key``). Iterating gives the
    blocks, and ``blocks[3]`` means ``blocks["3"]``, as when this was a list of blocks."""

    def __getitem__(self, key: str | int) -> nn.Module:
        return super().__getitem__(str(key))

    def __iter__(self):
        return iter(self.values())


class Model(nn.Module):
    """embedding -> residual stream -> blocks in order -> norm -> head.

    The model holds each set of block weights once (``blocks``, keyed by ``Position.key``)
    and an order that may use one several times (shared blocks, loops). ``forward(tokens)``
    runs in parallel; pass ``state=model.init_state(B)`` to also get the state after the
    last token (one entry per position in the order), and ``step(token, state)`` to decode
    one token."""

    def __init__(self, spec: ModelSpec, registry: Any = None) -> None:
        super().__init__()
        if registry is None:
            from hybridlab.registry import default_registry

            registry = default_registry()
        self.spec = spec
        self.order = spec.positions()
        dims = Dims(spec.d_model, spec.vocab_size, len(self.order), 0, registry)
        self.embedding = dims.build("embedding", spec.embedding)
        if not isinstance(self.embedding, StreamTaps) and callable(getattr(self.embedding, "inject", None)):
            # a migration guard, not a protocol probe: before StreamTaps was declared, an
            # embedding tapped the stream by defining inject(); it would now silently not
            raise HybridlabError(
                f"embedding kind {spec.embedding.kind!r}: {type(self.embedding).__name__} defines inject() but does not "
                "subclass hybridlab.core.interfaces.StreamTaps, which the model now requires to call it "
                "(context(tokens, state, doc_ids=None), inject, init_state); see docs/plugins.md")
        # expand()/reduce() only, so kept outside the module tree: a residual module's own
        # parameters (hyper-connections' mixing weights) belong to the blocks' instances,
        # and this one's would never get a gradient yet be counted, saved and optimized
        object.__setattr__(self, "stream", dims.build("residual", spec.residual))
        self._register_load_state_dict_pre_hook(_drop_stream_parameters)
        self.blocks = Blocks()
        for pos in self.order:  # built at its first use: the depth it sees at construction
            if pos.key not in self.blocks:
                wide = 2 * spec.d_model if pos.use is not None and pos.use.input == "stream_and_embedding" else None
                self.blocks[pos.key] = Block(pos.block, replace(dims, layer=pos.index, loops=pos.loops, d_in=wide),
                                             spec.residual)
        # per-use options (adapters, projection) own parameters per use, by depth: uses_modules.<depth>.
        self.uses_modules = nn.ModuleDict({str(pos.index): UseModules(pos, self.blocks[pos.key], spec.d_model)
                                           for pos in self.order if pos.options()})
        self.active_adapters: dict[str, nn.Module] = {}  # filled while a use with adapters runs
        for pos in self.order:
            for target in (self.uses_modules[str(pos.index)].adapters if str(pos.index) in self.uses_modules else ()):
                linear = self.blocks[pos.key].get_submodule(target.replace("-", "."))
                name = f"{pos.key}/{target}"
                if not any(isinstance(h, AdapterHook) and h.name == name for h in linear._forward_hooks.values()):
                    linear.register_forward_hook(AdapterHook(self.active_adapters, name))
        self.latent = dims.build("latent", spec.latent) if spec.latent is not None else None
        if self.latent is not None and not isinstance(self.latent, Latent):
            raise HybridlabError(f"latent kind {spec.latent.kind!r}: {type(self.latent).__name__} does not subclass "
                                 "hybridlab.core.interfaces.Latent; see docs/plugins.md")
        if self.latent is not None and isinstance(self.embedding, StreamTaps):
            raise HybridlabError(f"embedding kind {spec.embedding.kind!r} taps the stream at each depth, and with "
                                 f"latent kind {spec.latent.kind!r} the blocks run over patches, not tokens")
        self.norm = dims.build("normalization", spec.norm, spec.d_model)
        self.head = dims.build("head", spec.head)
        self.mup = mup.plan(self, spec, registry) if spec.parametrization == "mup" else None
        self.init_weights()
        if isinstance(self.head, TiedHead) and self.head.tied:
            self.head.weight = self.embedding.weight  # [V, D], shared
        self.checkpointed: frozenset[int] = frozenset()  # positions whose activations are recomputed

    def checkpoint_activations(self, every: int) -> None:
        """Activation checkpointing: in training, recompute the activations of every
        ``every``-th position of the order (0, every, 2·every...) in the backward instead of
        keeping them; 0 keeps all. Same gradients, less memory, one more block forward."""
        self.checkpointed = frozenset(range(0, len(self.order), every)) if every else frozenset()

    def uses(self) -> list[tuple[Position, Block]]:
        """Each position of the order with the block (weights) it runs."""
        return [(pos, self.blocks[pos.key]) for pos in self.order]

    def block_positions(self, seq_len: int) -> int:
        """How many positions the blocks' states hold after ``seq_len`` tokens: the tokens,
        or with a latent its (upper bound of) patches."""
        return seq_len if self.latent is None else self.latent.positions(seq_len)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        """The decoding state one sequence holds after ``seq_len`` tokens: every block's
        mixer state at ``block_positions(seq_len)``, plus a latent's own."""
        positions = self.block_positions(seq_len)
        blocks = sum(block.mixer.state_bytes(positions, dtype) for _, block in self.uses())
        return int(blocks + (0 if self.latent is None else self.latent.own_state_bytes(seq_len, dtype)))

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation in one place: normal(0, init_std) for linear and embedding
        weights, zero biases, and residual output projections scaled by 1/sqrt(2·depth)
        (GPT-2; depth counts every use of a shared block). Modules with special parameters
        finish their own in ``init_weights``."""
        std = self.spec.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            if getattr(module, "residual_out", False) and isinstance(module, nn.Linear):
                module.weight.mul_((2 * len(self.order)) ** -0.5)
        for module in self.modules():
            if module is not self and isinstance(module, InitWeights):
                module.init_weights(std)
        if self.mup is not None:  # μP rescales what the standard init drew (core/mup.py)
            mup.scale_init(self, self.mup)

    def forward(self, tokens: Tensor, state: list[State] | None = None, *,
                doc_ids: Tensor | None = None, hidden: tuple = (), logits: bool = True,
                condition: dict[str, Tensor] | None = None) -> ModelOutput:
        """tokens [B, T] -> ModelOutput(logits [B, T, V], state, aux_losses, metrics).
        ``hidden``: positions in the order (ints) whose output to keep in ``output.hidden``
        ([B, T, D], the stream reduced), and ``"final"`` for the input of the head (after the
        final norm); a plain tuple, so a compiled model sees no hooks. ``logits=False`` skips
        the head (``output.logits`` is None): a loss that applies it itself reads ``"final"``.
        T = 0 reads nothing: empty logits, and the state passes through unchanged (every
        kind alike; the attention kinds' reshapes cannot infer a size from no tokens).
        ``tokens`` is whatever the embedding reads (token ids; images [B, C, H, W] for the
        ``patch`` embedding). ``condition``: per-sequence fields (``{"t": [B], "labels":
        [B]}``) a Conditioning embedding turns into ``c [B, D]``, handed to every block as
        ``ctx.shared["condition"]`` (adaptive norms read it)."""
        if tokens.dim() == 2 and tokens.shape[1] == 0:
            logits = next(self.parameters()).new_zeros(tokens.shape[0], 0, self.spec.vocab_size)
            empty = logits.new_zeros(tokens.shape[0], 0, self.spec.d_model)
            return ModelOutput(logits, state, {}, {}, {key: empty for key in hidden})
        with call_scope():  # the pins are read once per call, not per module
            return self._run(tokens, state, doc_ids=doc_ids, step=False, hidden=hidden, with_logits=logits,
                             condition=condition)

    def step(self, tokens: Tensor, state: list[State]) -> ModelOutput:
        """One token per sequence: tokens [B] or [B, 1] -> logits [B, 1, V] and the new state.
        A decoding loop can run ``compiled_step()`` instead: the same step, captured once."""
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, got tokens of shape {tuple(tokens.shape)}")
        with call_scope():
            return self._run(tokens, state, doc_ids=None, step=True)

    def compiled_step(self, compile: str = "eager") -> Callable[[Tensor, list[State]], ModelOutput]:
        """``step`` captured by torch.compile, for a decoding loop (docs/performance.md).
        ``compile="eager"``: Dynamo traces the step once into one graph of tensor ops and runs
        it op by op, so the module tree's Python (blocks, placements, residuals, dispatch
        lookups) is paid at capture, not per token; no code is generated. ``"inductor"``
        also fuses the ops into generated kernels (on the CPU it needs a C++ compiler, and
        its first steps take tens of seconds). A state whose shape changes (an attention
        cache grows by one token per step) is captured a second time with that size
        symbolic, then no more. The implementations are those chosen at capture (pins
        included); results equal ``step``'s to float rounding (tests/core/test_compile.py).
        Torch keeps the captures across calls, keyed by the model and the state's layout."""
        if compile not in STEP_COMPILERS:
            raise ValueError(f"compile must be one of {', '.join(STEP_COMPILERS)}, got {compile!r}")
        from torch._dynamo.exc import BackendCompilerFailed  # here: importing Dynamo costs seconds

        compiled = torch.compile(self.step, backend=compile)

        def step(tokens: Tensor, state: list[State]) -> ModelOutput:
            try:
                return compiled(tokens, state)
            except BackendCompilerFailed as exc:  # e.g. inductor finding no C++ compiler: the user's setup
                inner = getattr(exc, "inner_exception", None) or exc
                first = str(inner).strip().splitlines()[:1]
                raise HybridlabError(f"compile {compile!r}: torch.compile's {compile} backend failed with "
                                     f"{type(inner).__name__}" + (f": {first[0]}" if first else "")
                                     + (" (inductor needs a working C++ compiler on the CPU)" if compile == "inductor"
                                        else "") + "; decode without compile, or with compile 'eager'") from exc
        return step

    def _run(self, tokens: Tensor, state: list[State] | None, *, doc_ids: Tensor | None, step: bool,
             hidden: tuple = (), with_logits: bool = True,
             condition: dict[str, Tensor] | None = None) -> ModelOutput:
        if self.latent is not None:
            return self._run_latent(tokens, state, doc_ids=doc_ids, hidden=hidden, with_logits=with_logits)
        aux = Aux()
        ctx = RunContext(aux=aux, doc_ids=doc_ids, step=step, stream=self.stream, n_layers=len(self.order))
        if condition is not None:
            if not isinstance(self.embedding, Conditioning):
                raise HybridlabError(f"the model was given a condition ({', '.join(sorted(condition))}), but its "
                                     f"embedding kind {self.spec.embedding.kind!r} does not take one (it is not a "
                                     "hybridlab.core.interfaces.Conditioning); use an embedding that does (patch)")
            ctx.shared["condition"] = self.embedding.condition(condition)  # [B, D]
            if ctx.shared["condition"].shape[0] != tokens.shape[0]:  # adaLN would broadcast (or fail) later
                sizes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(condition.items()))
                raise ValueError(f"the condition ({sizes}) is for a batch of {ctx.shared['condition'].shape[0]}, but "
                                 f"the input has {tokens.shape[0]} rows; give one value per row")
        embedded = self.embedding(tokens)  # [B, T, D]; a use with input: stream_and_embedding reads it
        h = self.stream.expand(embedded)
        carry = None  # what a use with into: next adds to the next block's input
        states: list[State | None] = []
        kept: dict = {}
        taps = isinstance(self.embedding, StreamTaps)
        if taps:
            tap = None if state is None else state[len(self.order)]
            if doc_ids is not None and not self.embedding.packed_sequences:  # it would read across documents
                raise ValueError(f"embedding {type(self.embedding).__name__} cannot keep packed sequences apart "
                                 "(packed_sequences = False), so doc_ids would leak between documents")
            context, tap_state = self.embedding.context(tokens, tap, doc_ids=doc_ids)
        for pos, block in self.uses():
            if taps:
                h = self.embedding.inject(pos.index, h, context, self.stream)
            run = block if str(pos.index) not in self.uses_modules else self.uses_modules[str(pos.index)].runner(
                block, pos.key, self.active_adapters)
            if pos.index in self.checkpointed and torch.is_grad_enabled() and not step:  # recomputed in backward
                run = lambda *args, run=run: checkpoint(run, *args, use_reentrant=False)  # noqa: E731
            x = h if carry is None else h + carry
            if pos.use is not None and pos.use.input == "stream_and_embedding":
                x = torch.cat([x, embedded], dim=-1)  # [B, T, 2D]
            out, s = run(x, None if state is None else state[pos.index], ctx.at(pos.index, pos.iterations, pos.loops, pos.block.name))
            h, carry = self._join(pos, h, out, carry)
            states.append(s)
            if pos.index in hidden:
                kept[pos.index] = self.stream.reduce(h)
        if taps:
            states.append(tap_state)
        final = self.norm(self.stream.reduce(h))
        if "final" in hidden:
            kept["final"] = final
        logits = None
        if with_logits:
            logits = self.readout(final)
        return ModelOutput(logits, None if state is None else states, aux.losses, aux.metrics, kept)

    def _run_latent(self, tokens: Tensor, state: list[State] | None, *, doc_ids: Tensor | None, hidden: tuple,
                    with_logits: bool) -> ModelOutput:
        """The blocks over the latent's shorter sequence (core.interfaces.Latent): the
        latent turns the embedded tokens into patches, calls ``run_blocks`` and returns
        the per-token input of the final norm."""
        if doc_ids is not None:
            raise NotImplementedError(f"latent kind {self.spec.latent.kind!r} does not keep packed documents apart; "
                             "train without doc_ids (documents: false)")
        if any(key != "final" for key in hidden):
            raise ValueError(f"with latent kind {self.spec.latent.kind!r} the blocks run over patches, so only "
                             f"hidden=('final',) is per token; asked for {hidden}")
        aux = Aux()

        def run_blocks(h: Tensor, states: list[State] | None, *, step: bool) -> tuple[Tensor, list[State] | None]:
            ctx = RunContext(aux=aux, step=step, stream=self.stream, n_layers=len(self.order))
            h, out = self.stream.expand(h), []
            for pos, block in self.uses():
                h, s = block(h, None if states is None else states[pos.index],
                             ctx.at(pos.index, pos.iterations, pos.loops, pos.block.name))
                out.append(s)
            return self.stream.reduce(h), (None if states is None else out)

        y, latent_state = self.latent(tokens, self.embedding(tokens), None if state is None else state[0],
                                      run_blocks, aux=aux.scope("latent"))
        final = self.norm(y)
        logits = self.readout(final) if with_logits else None
        kept = {"final": final} if "final" in hidden else {}
        return ModelOutput(logits, None if state is None else [latent_state], aux.losses, aux.metrics, kept)

    def _join(self, pos: Position, h: Tensor, out: Tensor, carry: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The stream after the block at ``pos`` returned ``out`` and the carry for the next
        block: a block's output is the stream unless its use says ``project`` or ``into``
        (docs/composition.md); a carry added to this block's input is taken out again."""
        use, nxt = pos.use, None
        if use is not None and str(pos.index) in self.uses_modules:
            out = self.uses_modules[str(pos.index)].project_output(out)
        if use is not None and use.into == "add":
            out = h + out
        elif use is not None and use.into == "next":
            out, nxt = h, out
        return (out if carry is None else out - carry), nxt

    def readout(self, final: Tensor) -> Tensor:
        """The head on the final norm's output [.., D] -> logits [.., V], with μP's logits
        multiplier (base_width / d_model) on its input; a loss or objective that applies the
        head itself calls this (or multiplies by ``self.mup.output_mult``)."""
        return self.head(final if self.mup is None else final * self.mup.output_mult)

    def init_state(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> list[State]:
        """Empty decoding state (KV caches, recurrent matrices), one per position in the
        order (a shared block keeps one per use), then the embedding's if it taps the
        stream (core.interfaces.StreamTaps)."""
        param = next(self.parameters())
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        if self.latent is not None:  # the latent keeps the blocks' states (per patch, not per token)
            return [self.latent.init_state(batch, device, dtype, self._init_block_states)]
        return self._init_block_states(batch, device, dtype)

    def _init_block_states(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> list[State]:
        """One empty state per position of the order, then the tapping embedding's."""
        states = []
        for pos, block in self.uses():
            try:
                states.append(block.init_state(batch, device, dtype))
            except NotImplementedError as exc:  # CannotDecode stays CannotDecode
                i = pos.index
                raise type(exc)(f"layer {i}: {exc}" if str(exc) else
                                f"layer {i}: mixer cannot decode step by step (it has no init_state)") from None
        if isinstance(self.embedding, StreamTaps):
            states.append(self.embedding.init_state(batch, device, dtype))
        return states

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None, compile: str | None = None) -> Tensor:
        """prompt [B, T] -> [B, T + max_new_tokens]; prefill in parallel, then step from state.
        temperature 0 is greedy. ``compile`` ("eager" or "inductor"): the steps run
        ``compiled_step(compile)`` (the prefill does not)."""
        if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.is_floating_point():
            raise ValueError(f"generate takes a prompt of token ids [B, T] with T >= 1, got {prompt.dtype} "
                             f"{tuple(prompt.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        vocab = self.spec.vocab_size
        if int(prompt.min()) < 0 or int(prompt.max()) >= vocab:
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1} (the model's vocabulary), got "
                             f"{int(prompt.min())}..{int(prompt.max())}")
        step = self.step if compile is None else self.compiled_step(compile)
        state = self.init_state(prompt.shape[0], prompt.device)
        out = self.forward(prompt, state)
        tokens = [prompt]
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if temperature > 0:
                # shifted to max 0 first and in float64: a tiny temperature makes the
                # scaled logits -inf, never +inf (inf - inf would be NaN)
                shifted = logits.double() - logits.double().amax(-1, keepdim=True)
                probs = torch.softmax(shifted / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            if len(tokens) <= max_new_tokens:  # no step for the last token: its logits are not read
                out = step(nxt, out.state)
        return torch.cat(tokens, dim=1)


class LowRank(nn.Module):  # an InitWeights (structural protocol)
    """A per-use adapter of one linear layer: ``x -> B A x`` for each of ``parts`` slices of
    its output, A [parts, rank, in] (normal init), B [parts, out/parts, rank] (zero init, so
    a new adapter adds nothing)."""

    def __init__(self, d_in: int, d_out: int, rank: int, parts: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(parts, rank, d_in))
        self.B = nn.Parameter(torch.empty(parts, d_out // parts, rank))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.A, 0.0, std)
        nn.init.zeros_(self.B)

    def forward(self, x: Tensor) -> Tensor:
        low = torch.einsum("...i,pri->...pr", x, self.A)  # [..., parts, rank]
        return torch.einsum("...pr,por->...po", low, self.B).flatten(-2)  # [..., out]


class AdapterHook:
    """A forward hook on a shared block's linear layer: adds the adapter of the use now
    running (``active[name]``), nothing when none is."""

    def __init__(self, active: dict, name: str) -> None:
        self.active, self.name = active, name

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        adapter = self.active.get(self.name)
        return out if adapter is None else out + adapter(args[0])


def adapter_target_problem(block: nn.Module, target: str, parts: int) -> str | None:
    """Why ``target`` with ``parts`` parts cannot be adapted in ``block`` (None: it can)."""
    try:
        linear = block.get_submodule(target)
    except AttributeError:
        linears = ", ".join(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
        return f"the block has no module {target!r} (linear layers: {linears})"
    if not isinstance(linear, nn.Linear):
        return f"{type(linear).__name__} is not a linear layer"
    if linear.out_features % parts:
        return f"{parts} parts must divide the output width {linear.out_features}"
    return None


class UseModules(nn.Module):
    """The parameters one use of a shared block owns: ``adapters`` (LowRank by target, the
    module path with ``-`` for ``.``) and ``project`` (a d_model x d_model linear)."""

    def __init__(self, pos: Position, block: nn.Module, d_model: int) -> None:
        super().__init__()
        use = pos.use
        self.adapters = nn.ModuleDict()
        for target, parts in (use.adapters.targets.items() if use.adapters is not None else ()):
            wrong = adapter_target_problem(block, target, parts)
            if wrong is not None:  # validation reports it located; a spec built in code lands here
                raise HybridlabError(f"the use of {use.use!r} at depth {pos.index}: adapters.targets.{target}: {wrong}")
            linear = block.get_submodule(target)
            self.adapters[target.replace(".", "-")] = LowRank(linear.in_features, linear.out_features,
                                                             use.adapters.rank, parts)
        self.project = nn.Linear(d_model, d_model, bias=False) if use.project else None

    def project_output(self, out: Tensor) -> Tensor:
        return out if self.project is None else self.project(out)

    def runner(self, block: nn.Module, key: str, active: dict) -> Any:
        """``block`` as a callable that runs with this use's adapters active."""
        if not len(self.adapters):
            return block

        def run(*args: Any) -> Any:
            names = [f"{key}/{target}" for target in self.adapters]
            active.update(zip(names, self.adapters.values()))
            try:
                return block(*args)
            finally:
                for name in names:
                    active.pop(name, None)
        return run


def _drop_stream_parameters(state_dict, prefix, *args) -> None:
    """Checkpoints written before the stream left the module tree hold its unused
    parameters (``stream.*``); they load without them."""
    for key in [k for k in state_dict if k.startswith(prefix + "stream.")]:
        del state_dict[key]


def build_model(spec: ModelSpec, registry: Any = None) -> Model:
    return Model(spec, registry)


def count_parameters(module: nn.Module) -> int:
    """Parameters counted once even when shared (tied embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def active_parameters(module: nn.Module) -> int:
    """Parameters one token uses: a module that routes (a mixture of experts) says how many
    of its own it uses with ``active_parameters()``; every other parameter counts in full."""
    unused = sum(count_parameters(m) - m.active_parameters() for m in module.modules()
                 if isinstance(m, ActiveParameters))
    return count_parameters(module) - unused
