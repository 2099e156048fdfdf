"""What the core expects of the modules plugins build, and what a model returns.

Every optional behaviour the core relies on is declared here, as a protocol a module
opts into, never found by probing attributes: a module is checked with ``isinstance``
against these classes (``typing.Protocol``s are runtime-checkable by their methods, the
base classes by inheritance).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

State = Any  # whatever a mixer keeps between calls: a KV cache, a recurrent matrix...


class Aux:
    """The side channel for auxiliary losses and metrics. It is passed explicitly down
    the model (``aux=``) and returned in :class:`ModelOutput`; nothing is kept in
    globals or module attributes. ``aux.scope("layers.3.ffn")`` writes with a prefix."""

    def __init__(self, losses: dict[str, Tensor] | None = None, metrics: dict[str, Tensor] | None = None,
                 prefix: str = "") -> None:
        self.losses = {} if losses is None else losses
        self.metrics = {} if metrics is None else metrics
        self.prefix = prefix

    def scope(self, name: str) -> "Aux":
        return Aux(self.losses, self.metrics, f"{self.prefix}{name}.")

    def add_loss(self, name: str, value: Tensor) -> None:
        """An auxiliary loss, added (already weighted) to the training objective."""
        self.losses[self.prefix + name] = value

    def add_metric(self, name: str, value: Tensor | float) -> None:
        self.metrics[self.prefix + name] = value


@dataclass
class RunContext:
    """What one forward of the model hands each block (replacing loose ``doc_ids``,
    ``aux`` and ``step`` arguments): the block's depth, the residual stream's module, and
    a ``shared`` area where a layer leaves named values for later layers of the same
    forward (an attention layer's K/V for a layer that reads them). ``at(layer)`` gives
    the context of the block at that depth; all of them share one ``shared`` dict."""

    aux: Aux
    doc_ids: Tensor | None = None  # [B, T] packed-sequence ids, or None
    step: bool = False  # decoding one token from state
    stream: Any = None  # the model's residual module: expand([B, T, D]) / reduce(stream)
    layer: int = 0  # depth of the running block (a shared block has one per use)
    n_layers: int = 1  # depth of the model: positions in its order
    shared: dict[str, Any] = field(default_factory=dict)
    iterations: tuple = ()  # inside loops: the iteration of each enclosing loop, outermost first
    loops: tuple = ()  # inside loops: the count of each enclosing loop
    name: str | None = None  # the running block's ``name:`` in the spec, if it has one

    def at(self, layer: int, iterations: tuple = (), loops: tuple = (), name: str | None = None) -> "RunContext":
        return replace(self, layer=layer, aux=self.aux.scope(f"layers.{layer}"), iterations=iterations, loops=loops,
                       name=name)

    def with_(self, **changes: Any) -> "RunContext":
        """The same context with fields replaced (a wrapper running the block on a subset
        of tokens passes their doc_ids and its own aux)."""
        return replace(self, **changes)


class SequenceMixer(nn.Module):
    """Base for mixers: ``forward`` runs a sequence (optionally continuing from a
    state), ``step`` runs one token from a state. With ``state=None`` a mixer runs
    stateless and returns ``None`` as its state; with a state (from ``init_state``) it
    returns the state after the last token."""

    def forward(self, x: Tensor, state: State | None = None, *, doc_ids: Tensor | None = None,
                aux: Aux | None = None) -> tuple[Tensor, State | None]:
        """x [B, T, D] -> (y [B, T, D], state)"""
        raise NotImplementedError

    def step(self, x: Tensor, state: State, *, aux: Aux | None = None) -> tuple[Tensor, State]:
        """One token: x [B, 1, D] -> (y [B, 1, D], new state)."""
        return self.forward(x, state, aux=aux)

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> State:
        raise NotImplementedError(f"{type(self).__name__} cannot decode step by step")

    def state_bytes(self, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of decoding state per sequence after ``seq_len`` tokens."""
        return 0


@dataclass
class ModelOutput:
    logits: Tensor  # the head's output: logits [B, T, V] for an lm head, an image [B, C, H, W] for unpatchify
    state: list[State] | None = None  # one entry per block when decoding
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    hidden: dict[Any, Tensor] = field(default_factory=dict)  # what forward(hidden=...) asked to keep


SubLayer = Callable[[Tensor], Tensor]


class ReadsContext:
    """A mixer that also takes the run context: ``forward(x, state, *, doc_ids, aux, ctx)``
    and ``step(x, state, *, aux, ctx)`` (to leave or read values in ``ctx.shared``, such as
    another layer's K/V). Declared by inheriting this class beside SequenceMixer."""


@runtime_checkable
class InitWeights(Protocol):
    """A module with parameters the model's generic init does not cover (a decay, a
    mixing matrix): ``Model.init_weights`` calls ``init_weights(std)`` after it."""

    def init_weights(self, std: float) -> None: ...


@runtime_checkable
class ActiveParameters(Protocol):
    """A module that routes (a mixture of experts) says how many of its parameters one
    token uses; every other parameter counts in full."""

    def active_parameters(self) -> int: ...


@runtime_checkable
class Lipschitz(Protocol):
    """A module that declares an upper bound on its Lipschitz constant (ℓ2 over the whole
    [B, T, D] input), read by ``hybridlab lipschitz``. ``inner`` is the bound of the map it
    wraps: a norm placement's sub-layer, a residual's branch; modules that wrap nothing
    ignore it. None: no bound for this configuration."""

    def lipschitz(self, inner: float) -> float | None: ...


@runtime_checkable
class TiedHead(Protocol):
    """A head that may share its weight [V, D] with the embedding's (``tied``)."""

    tied: bool
    weight: Tensor


class StreamTaps:
    """An embedding that also writes into the residual stream before later blocks (hashed
    n-gram memories). Declared by inheriting this class; the model then calls

    - ``context(tokens, state, doc_ids=None) -> (context, state)`` once per forward (its
      state keeps what it needs of earlier tokens; with ``doc_ids`` it keeps documents
      apart, and a state passed in belongs to the call's first document; set
      ``packed_sequences = False`` if it cannot, and the model refuses doc_ids);
    - ``inject(layer, h, context, stream) -> h`` before the block at each depth;
    - ``init_state(batch, device, dtype)``: its state is the last entry of the model's."""

    packed_sequences: bool = True

    def context(self, tokens: Tensor, state: Any, doc_ids: Tensor | None = None) -> tuple[Any, Any]:
        raise NotImplementedError

    def inject(self, layer: int, h: Tensor, context: Any, stream: Any) -> Tensor:
        raise NotImplementedError

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        raise NotImplementedError


class BlockWrapper(nn.Module):
    """A block wrapper (category ``block_wrapper``, e.g. mixture-of-depths) decides how its
    block runs. ``forward(block, h, state, ctx) -> (h, state)``, where ``block`` is a
    callable ``block(h, state, ctx) -> (h, state)`` running the block (norms, mixer, FFN,
    residual) on whatever part of ``h`` the wrapper passes; ``init_state(init, batch,
    device, dtype)`` makes the wrapper's decoding state, ``init(batch, device, dtype)``
    making the block's own. Wrapper kinds subclass this class."""

    def forward(self, block: Callable, h: Tensor, state: Any, ctx: RunContext) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def init_state(self, init: Callable, batch: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        return init(batch, device, dtype)


class Latent(nn.Module):
    """A model-level component (category ``latent``, the spec's ``latent:``) that runs the
    model's blocks over a shorter sequence than the tokens: the byte-latent transformer
    pools bytes into patches, runs the blocks over the patches, and decodes bytes from
    the patches that are complete. Latent kinds subclass this class; the model calls

    - ``forward(tokens [B, T], x [B, T, D], state, run_blocks, *, aux) -> (y [B, T, D], state)``
      with ``x`` the embedding's output and ``y`` the input of the final norm. ``state`` is
      None (parallel, training) or what ``init_state`` made (decoding: ``forward`` on T >= 1
      tokens continues from it). ``run_blocks(h [B', P, D], states, *, step) -> (h, states)``
      runs the blocks in order over any batch of patch sequences; ``states`` is None or a
      list with one entry per position, as ``init_blocks`` makes it;
    - ``init_state(batch, device, dtype, init_blocks)``, with ``init_blocks(batch, device,
      dtype)`` making the blocks' empty states. The model's state is ``[latent_state]``."""

    def forward(self, tokens: Tensor, x: Tensor, state: Any, run_blocks: Callable, *,
                aux: Aux) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype, init_blocks: Callable) -> Any:
        raise NotImplementedError

    def positions(self, seq_len: int) -> int:
        """At most how many positions the blocks run over for ``seq_len`` tokens (what their
        decoding state is measured at); the default, ``seq_len``, is a safe upper bound."""
        return seq_len

    def own_state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        """Bytes of the latent's own decoding state (not the blocks') after ``seq_len``
        tokens, for one sequence; ``Model.state_bytes`` adds the blocks' at ``positions``."""
        return 0


class NormPlacement(nn.Module):
    """Where the norms go around one sub-layer (category ``norm_placement``): built as
    ``Module(config, dims, norm)`` with the block's normalization config; ``forward(h,
    sublayer, residual, ctx)`` returns the new stream, joining ``sublayer``'s output with
    ``residual(h, f)`` (the stream's residual module) and placing its norms around it."""

    def forward(self, h: Tensor, sublayer: SubLayer, residual: Any, ctx: RunContext) -> Tensor:
        raise NotImplementedError


class Conditioning:
    """An embedding that also turns a per-sequence condition (a diffusion timestep and a
    class label) into a vector ``c [B, D]``. Declared by inheriting this class; the model's
    ``forward(x, condition={...})`` calls ``condition(fields) -> c`` once and hands ``c`` to
    every block as ``ctx.shared["condition"]``, where an adaptive-norm placement (``adaln``)
    reads it. A model whose embedding is not Conditioning refuses ``condition=``."""

    def condition(self, fields: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class Sampler:
    """An objective module that draws samples from the model it trains (a diffusion
    objective): ``hybridlab sample RUN`` finds it among the run's objectives with
    ``isinstance``, never by kind. ``sample(model, labels [N] long or None, *, count,
    steps, guidance, generator) -> [N, ...]`` (images [N, C, H, W] in the data's range).
    ``guided``: whether it trained the unconditional (null-label) prediction that
    classifier-free guidance mixes in; ``sample`` refuses guidance ≠ 1 otherwise."""

    guided: bool = False

    def sample(self, model: nn.Module, labels: Tensor | None, *, count: int, steps: int, guidance: float,
               generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


class Drafter:
    """An objective module that drafts tokens for speculative decoding (``hybridlab generate
    --speculative``), such as multi-token prediction modules. Declared by inheriting this
    class beside ``Objective``; the core finds it among a run's objectives with
    ``isinstance`` and never names its kind.

    The core decodes greedily and calls the drafter once per round with what became final
    since its last call: ``hidden`` [B, n, D], the model's output at ``draft_layer`` (a key of
    ``ModelOutput.hidden``: a position index or ``"final"``) at the n positions the model
    ran, and ``tokens`` [B, n], the token that follows each of those positions (first the
    prompt's positions and the model's first token, later the accepted drafts and the
    model's own next token). A rejected draft never reaches the drafter, so it keeps no
    rollback of its own.

    - ``draft_layer``: the hidden key it reads; ``max_draft``: most tokens one call drafts;
    - ``draft_state(model, batch, device, dtype) -> state``: its state before the first call;
    - ``draft(model, state, hidden, tokens, count) -> (drafts [B, count], state)``: its guess
      of the ``count`` tokens (1 <= count <= max_draft) after the last of ``tokens``."""

    draft_layer: int | str = "final"
    max_draft: int = 1

    def draft_state(self, model: nn.Module, batch: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def draft(self, model: nn.Module, state: Any, hidden: Tensor, tokens: Tensor,
              count: int) -> tuple[Tensor, Any]:
        raise NotImplementedError
