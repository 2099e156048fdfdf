"""Assembly: a validated :class:`ModelSpec` becomes a model.

A block reads like the diagram: ``h = res(h, mixer∘norm)``, then ``h = res(h, ffn∘norm)``;
the residual scheme is a plugin (``prenorm`` adds; hyper-connections keep several lanes).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .config import Dims
from .dispatch import Dispatched, pin_applies
from .errors import HybridlabError
from .interfaces import Aux, ModelOutput, State
from .spec import BlockSpec, ModelSpec


BLOCK_CATEGORIES = ("mixer", "ffn", "normalization", "residual", "block_wrapper")


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
    def __init__(self, spec: BlockSpec, dims: Dims, residual: Any) -> None:
        super().__init__()
        self.mixer_norm = dims.build("normalization", spec.norm, dims.d_model)
        self.mixer = dims.build("mixer", spec.mixer)
        self.mixer_residual = dims.build("residual", residual)
        self.ffn = dims.build("ffn", spec.ffn) if spec.ffn is not None else None
        if self.ffn is not None:
            self.ffn_norm = dims.build("normalization", spec.norm, dims.d_model)
            self.ffn_residual = dims.build("residual", residual)
        # optional, generic: a block wrapper decides how the block runs (see forward)
        self.wrapper = dims.build("block_wrapper", spec.wrapper) if spec.wrapper is not None else None
        dispatched = [m for m in self.modules() if isinstance(m, Dispatched)]
        used = set()
        for module in dispatched:  # the block's ``impl:`` pins; category.kind before the bare kind
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

    def forward(self, h: Tensor, state: State | None = None, *, doc_ids: Tensor | None = None,
                aux: Aux, step: bool = False) -> tuple[Tensor, State | None]:
        """A wrapper (e.g. mixture-of-depths) gets this block and the same arguments; it runs
        ``block.inner`` on what it chooses and returns ``(h, state)`` like ``inner``."""
        if self.wrapper is not None:
            return self.wrapper(self, h, state, doc_ids=doc_ids, aux=aux, step=step)
        return self.inner(h, state, doc_ids=doc_ids, aux=aux, step=step)

    def inner(self, h: Tensor, state: State | None = None, *, doc_ids: Tensor | None = None,
              aux: Aux, step: bool = False) -> tuple[Tensor, State | None]:
        out: list[State | None] = []

        def mix(x: Tensor) -> Tensor:
            args = (self.mixer_norm(x), state)
            y, new_state = self.mixer.step(*args, aux=aux) if step else self.mixer(*args, doc_ids=doc_ids, aux=aux)
            out.append(new_state)
            return y

        h = self.mixer_residual(h, mix)
        if self.ffn is not None:
            h = self.ffn_residual(h, lambda x: self.ffn(self.ffn_norm(x), aux=aux))
        return h, out[0]

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        if self.wrapper is not None:  # the wrapper owns the block's decoding state
            return self.wrapper.init_state(self, batch, device, dtype)
        return self.mixer.init_state(batch, device, dtype)


class Model(nn.Module):
    """embedding -> residual stream -> blocks -> norm -> head.

    ``forward(tokens)`` runs in parallel; pass ``state=model.init_state(B)`` to also get
    the state after the last token, and ``step(token, state)`` to decode one token."""

    def __init__(self, spec: ModelSpec, registry: Any = None) -> None:
        super().__init__()
        if registry is None:
            from hybridlab.registry import default_registry

            registry = default_registry()
        self.spec = spec
        dims = spec.dims(registry=registry)
        self.embedding = dims.build("embedding", spec.embedding)
        # expand()/reduce() only, so kept outside the module tree: a residual module's own
        # parameters (hyper-connections' mixing weights) belong to the blocks' instances,
        # and this one's would never get a gradient yet be counted, saved and optimized
        object.__setattr__(self, "stream", dims.build("residual", spec.residual))
        self._register_load_state_dict_pre_hook(_drop_stream_parameters)
        self.blocks = nn.ModuleList(Block(b, spec.dims(i, registry), spec.residual) for i, b in enumerate(spec.layers))
        self.norm = dims.build("normalization", spec.norm, spec.d_model)
        self.head = dims.build("head", spec.head)
        self.init_weights()
        if getattr(spec.head, "tied", False):
            self.head.weight = self.embedding.weight  # [V, D], shared

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation in one place: normal(0, init_std) for linear and embedding
        weights, zero biases, and residual output projections scaled by 1/sqrt(2·layers)
        (GPT-2). Modules with special parameters finish their own in ``init_weights``."""
        std = self.spec.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            if getattr(module, "residual_out", False) and isinstance(module, nn.Linear):
                module.weight.mul_((2 * len(self.blocks)) ** -0.5)
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights(std)

    def forward(self, tokens: Tensor, state: list[State] | None = None, *,
                doc_ids: Tensor | None = None) -> ModelOutput:
        """tokens [B, T] -> ModelOutput(logits [B, T, V], state, aux_losses, metrics).
        T = 0 reads nothing: empty logits, and the state passes through unchanged (every
        kind alike; the attention kinds' reshapes cannot infer a size from no tokens)."""
        if tokens.dim() == 2 and tokens.shape[1] == 0:
            logits = next(self.parameters()).new_zeros(tokens.shape[0], 0, self.spec.vocab_size)
            return ModelOutput(logits, state, {}, {})
        return self._run(tokens, state, doc_ids=doc_ids, step=False)

    def step(self, tokens: Tensor, state: list[State]) -> ModelOutput:
        """One token per sequence: tokens [B] or [B, 1] -> logits [B, 1, V] and the new state."""
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, got tokens of shape {tuple(tokens.shape)}")
        return self._run(tokens, state, doc_ids=None, step=True)

    def _run(self, tokens: Tensor, state: list[State] | None, *, doc_ids: Tensor | None, step: bool) -> ModelOutput:
        aux = Aux()
        h = self.stream.expand(self.embedding(tokens))
        states: list[State | None] = []
        taps = hasattr(self.embedding, "inject")  # optional, generic: see Model.init_state
        if taps:
            tap = None if state is None else state[len(self.blocks)]
            if doc_ids is None:
                context, tap_state = self.embedding.context(tokens, tap)
            elif "doc_ids" in inspect.signature(self.embedding.context).parameters:
                context, tap_state = self.embedding.context(tokens, tap, doc_ids=doc_ids)
            else:  # it would read across document boundaries
                raise ValueError(f"embedding {type(self.embedding).__name__}: its context() takes no doc_ids, so packed "
                                 "sequences (doc_ids) would leak between documents")
        for i, block in enumerate(self.blocks):
            if taps:
                h = self.embedding.inject(i, h, context, self.stream)
            h, s = block(h, None if state is None else state[i], doc_ids=doc_ids, aux=aux.scope(f"layers.{i}"), step=step)
            states.append(s)
        if taps:
            states.append(tap_state)
        logits = self.head(self.norm(self.stream.reduce(h)))
        return ModelOutput(logits, None if state is None else states, aux.losses, aux.metrics)

    def init_state(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> list[State]:
        """Empty decoding state (KV caches, recurrent matrices), one per block.

        An embedding may also write into the stream before later blocks (e.g. hashed
        n-gram memories): it defines ``context(tokens, state) -> (context, state)``, run
        once per forward on the tokens (its state: what it keeps of earlier tokens; it
        takes ``doc_ids=`` too if it supports packed sequences, which it must then keep
        apart, and the state belongs to the call's first document),
        ``inject(layer, h, context, stream) -> h``, run before each block (``stream`` is the
        model's residual module, for ``expand``/``reduce``), and ``init_state``; its state
        is the last entry of the list."""
        param = next(self.parameters())
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        states = []
        for i, block in enumerate(self.blocks):
            try:
                states.append(block.init_state(batch, device, dtype))
            except NotImplementedError as exc:  # CannotDecode stays CannotDecode
                raise type(exc)(f"layer {i}: {exc}" if str(exc) else
                                f"layer {i}: mixer cannot decode step by step (it has no init_state)") from None
        if hasattr(self.embedding, "inject"):
            states.append(self.embedding.init_state(batch, device, dtype))
        return states

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """prompt [B, T] -> [B, T + max_new_tokens]; prefill in parallel, then step from state.
        temperature 0 is greedy."""
        if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.is_floating_point():
            raise ValueError(f"generate takes a prompt of token ids [B, T] with T >= 1, got {prompt.dtype} "
                             f"{tuple(prompt.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        vocab = self.spec.vocab_size
        if int(prompt.min()) < 0 or int(prompt.max()) >= vocab:
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1} (the model's vocabulary), got "
                             f"{int(prompt.min())}..{int(prompt.max())}")
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
            out = self.step(nxt, out.state)
        return torch.cat(tokens, dim=1)


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
                 if hasattr(m, "active_parameters"))
    return count_parameters(module) - unused
