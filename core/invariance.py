"""Invariance checks for ``hybridlab verify SPEC``: properties every model must keep,
whatever its kinds, each a named check with its own tolerance.

- ``left padding`` / ``right padding``: padding beside a sequence leaves the real tokens'
  logits unchanged. The model has no attention mask; it keeps packed documents apart with
  ``doc_ids`` [B, T], so padding is expressed as a document of its own (pad tokens get one
  id, the real tokens another), as a user batching prompts of unequal length would.
- ``batch invariance``: a sequence's logits do not depend on what else is in the batch
  (every row of a batch of 3, and two of them reordered in a batch of 2).
- ``packed documents``: documents packed into one row with ``doc_ids`` give the logits of
  the same documents run separately.
- ``chunked prefill``: a prompt fed in uneven pieces through the decoding state (a piece of
  one token among them) gives the logits of the whole prompt in one forward.
- ``decode after packed prefill``: a prompt prefilled with a state behind another document
  (``doc_ids``), then decoded greedily, gives the logits of decoding after the prompt
  alone: the returned state must hold the last document only.
- ``state rollback``: decode k tokens from a snapshot (``copy.deepcopy`` of the state, as
  speculative decoding keeps one), run rejected drafts from another copy, restore the
  snapshot and decode again: the same tokens and logits. A mixer that keeps part of its
  state outside the state object (a cache buffer on the module) fails here.

All run in float64 on the dispatched implementations, in eval mode, so only reordered
rounding separates the two sides. A check a model cannot support (a layer that cannot
decode, a layer or embedding that cannot keep documents apart) is a note
``<check>: not applicable: <reason>``, never a pass.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import CannotDecode, PinCannotServe
from .interfaces import StreamTaps
from .verify import Check, Report, rel_rms


class NotApplicable(Exception):
    """This check cannot run on this model; the message says why."""


@dataclass(frozen=True)
class Invariance:
    """One named check: ``run(model, vocab)`` returns ``(got, expected)`` logits."""

    name: str
    tolerance: float
    reason: str  # why this tolerance
    run: Callable[[Any, int], tuple[Tensor, Tensor]]


def _tokens(vocab: int, *shape: int, seed: int) -> Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _needs_doc_ids(model: Any) -> None:
    """Raise NotApplicable when the model declares it cannot keep documents apart."""
    embedding = model.embedding
    if isinstance(embedding, StreamTaps) and not embedding.packed_sequences:
        raise NotApplicable(f"embedding {model.spec.embedding.kind!r} cannot keep packed documents apart "
                            "(packed_sequences = False), and padding is expressed as a document of its own")


def _forward(model: Any, tokens: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """Logits [B, T, V]; a layer refusing doc_ids (NotImplementedError) makes the check not applicable."""
    try:
        return model(tokens.to(_device(model)), doc_ids=None if doc_ids is None else doc_ids.to(_device(model))).logits
    except NotImplementedError as exc:
        if doc_ids is None:
            raise
        raise NotApplicable(f"a layer cannot keep packed documents apart: {exc}") from None


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# lengths: odd, unequal, a one-token document among them
REAL = (23, 17)  # real tokens of two sequences in one padded batch
PADDED = 30  # the padded length


def padding(side: str) -> Callable[[Any, int], tuple[Tensor, Tensor]]:
    """Two sequences of unequal length padded to PADDED on ``side``; padding is document 0
    (left) or 1 (right), the real tokens the other."""

    def run(model: Any, vocab: int) -> tuple[Tensor, Tensor]:
        _needs_doc_ids(model)
        tokens = _tokens(vocab, len(REAL), PADDED, seed=11)  # the pad positions hold junk: a leak shows
        doc_ids = torch.zeros(len(REAL), PADDED, dtype=torch.long)  # ids rise along a row, as packing gives
        spans = []
        for row, n in enumerate(REAL):
            start = PADDED - n if side == "left" else 0
            doc_ids[row, (start if side == "left" else n):] = 1
            spans.append((row, start, n))
        batched = _forward(model, tokens, doc_ids)
        got = torch.cat([batched[row, start:start + n] for row, start, n in spans])
        alone = torch.cat([_forward(model, tokens[row:row + 1, start:start + n])[0] for row, start, n in spans])
        return got, alone

    return run


def batch_invariance(model: Any, vocab: int) -> tuple[Tensor, Tensor]:
    """Every row of a batch of 3 and of the same sequences reordered in a batch of 2 (other
    neighbours, other positions) against each sequence alone."""
    seqs = [_tokens(vocab, 1, 29, seed=seed) for seed in (12, 13, 14)]
    alone = [_forward(model, seq)[0] for seq in seqs]
    in_three = _forward(model, torch.cat(seqs))
    in_two = _forward(model, torch.cat([seqs[2], seqs[0]]))
    got = torch.cat([*in_three.unbind(0), in_two[0], in_two[1]])
    return got, torch.cat([*alone, alone[2], alone[0]])


DOCS = (11, 1, 19)  # packed document lengths


def packed_documents(model: Any, vocab: int) -> tuple[Tensor, Tensor]:
    _needs_doc_ids(model)
    tokens = _tokens(vocab, 1, sum(DOCS), seed=16)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(DOCS)])[None]  # [1, T]
    packed = _forward(model, tokens, doc_ids)[0]
    cuts = [0, *torch.tensor(DOCS).cumsum(0).tolist()]
    alone = torch.cat([_forward(model, tokens[:, a:b])[0] for a, b in zip(cuts, cuts[1:])])
    return packed, alone


def _init_state(model: Any, batch: int) -> Any:
    """A layer that cannot decode by design (CannotDecode) makes the check not applicable;
    a mixer that merely lacks init_state raises on, a failed check (as for the decode check)."""
    try:
        return model.init_state(batch)
    except CannotDecode as exc:
        raise NotApplicable(f"the model cannot decode from a state: {exc}") from None


def chunked_prefill(reach: int) -> Callable[[Any, int], tuple[Tensor, Tensor]]:
    """A prompt past the spec's longest window/block (``reach``) fed in uneven pieces
    (1, 6, 13 tokens, then the rest in two) through the state, against the whole prompt."""

    def run(model: Any, vocab: int) -> tuple[Tensor, Tensor]:
        state = _init_state(model, 2)
        total = max(41, reach + 5)
        prompt = _tokens(vocab, 2, total, seed=17).to(_device(model))
        rest = total - 20
        pieces, logits, start = (1, 6, 13, rest // 2, rest - rest // 2), [], 0
        for n in pieces:
            out = model(prompt[:, start:start + n], state)
            logits.append(out.logits)
            state, start = out.state, start + n
        return torch.cat(logits, 1), model(prompt).logits

    return run


def _greedy(model: Any, last: Tensor, state: Any, n: int) -> Tensor:
    """n greedy steps from the logits ``last`` [B, V] and ``state``: their logits [B, n, V]."""
    logits = []
    for _ in range(n):
        step = model.step(last.argmax(-1), state)
        logits.append(step.logits)
        last, state = step.logits[:, -1], step.state
    return torch.cat(logits, 1)


def decode_after_packed_prefill(model: Any, vocab: int) -> tuple[Tensor, Tensor]:
    """A prompt prefilled behind another document (left padding, a packed row) with
    ``doc_ids`` and a state, then greedy decoding: the logits of decoding after the prompt
    alone. The state a mixer returns must hold the last document only."""
    _needs_doc_ids(model)
    state = _init_state(model, 1)
    before, prompt = _tokens(vocab, 1, 13, seed=20), _tokens(vocab, 1, 11, seed=21)
    doc_ids = torch.cat([torch.zeros(1, 13), torch.ones(1, 11)], 1).long()
    device = _device(model)
    try:
        packed = model(torch.cat([before, prompt], 1).to(device), state, doc_ids=doc_ids.to(device))
    except NotImplementedError as exc:
        raise NotApplicable(f"a layer cannot take doc_ids with a decoding state: {exc}") from None
    alone = model(prompt.to(device), _init_state(model, 1))
    return (_greedy(model, packed.logits[:, -1], packed.state, ROLLBACK_TOKENS),
            _greedy(model, alone.logits[:, -1], alone.state, ROLLBACK_TOKENS))


ROLLBACK_PROMPT, ROLLBACK_TOKENS = 9, 6


def state_rollback(model: Any, vocab: int) -> tuple[Tensor, Tensor]:
    """Greedy decode from a snapshot; rejected drafts from a copy of it; the snapshot
    restored (copied again) and decoded again: the two greedy runs' logits."""
    state = _init_state(model, 2)
    prompt = _tokens(vocab, 2, ROLLBACK_PROMPT, seed=18).to(_device(model))
    out = model(prompt, state)
    snapshot = copy.deepcopy((out.logits[:, -1], out.state))

    def greedy(start: tuple[Tensor, Any]) -> Tensor:
        return _greedy(model, *copy.deepcopy(start), ROLLBACK_TOKENS)

    first = greedy(snapshot)
    drafts = _tokens(vocab, 2, ROLLBACK_TOKENS, seed=19).to(_device(model))
    _, rejected = copy.deepcopy(snapshot)
    for t in range(ROLLBACK_TOKENS):  # drafts the verifier rejects: they must leave no trace
        rejected = model.step(drafts[:, t], rejected).state
    return greedy(snapshot), first


ROUNDING = ("float64 on both sides: only reordered rounding (another batch size's matmul blocking, a "
            "chunk boundary elsewhere, RoPE angles at shifted positions) separates them, ~1e-15 relative; "
            "a real leak is of order one")


def invariances(reach: int) -> list[Invariance]:
    """The checks, in the order they run; ``reach`` is the spec's longest window/block."""
    return [
        Invariance("left padding", 1e-9, ROUNDING, padding("left")),
        Invariance("right padding", 1e-9, ROUNDING, padding("right")),
        Invariance("batch invariance", 1e-9, ROUNDING, batch_invariance),
        Invariance("packed documents", 1e-9, ROUNDING, packed_documents),
        Invariance("chunked prefill", 1e-9, ROUNDING, chunked_prefill(reach)),
        Invariance("decode after packed prefill", 1e-9, ROUNDING, decode_after_packed_prefill),
        Invariance("state rollback", 1e-9, "float64, and the same operations on the same state twice: "
                   "any difference at all is a state that was not restored", state_rollback),
    ]


def verify_invariance(spec: Any, *, device: str = "cpu", registry: Any = None, weights: dict | None = None,
                      reach: int = 0) -> Report:
    """Every invariance check on ``spec``'s model (float64, dispatched implementations);
    a check the model cannot support is a note saying why."""
    from .model import Model

    report = Report()
    torch.manual_seed(0)
    model = Model(spec, registry).to(device=device, dtype=torch.float64).eval()
    if weights is not None:
        model.load_state_dict(weights)
    name = f"model {spec.name}"
    for check in invariances(reach):
        try:
            with torch.no_grad():
                got, expected = check.run(model, spec.vocab_size)
        except NotApplicable as exc:
            report.notes.append(f"{name}: {check.name}: not applicable: {exc}")
            continue
        except PinCannotServe as exc:  # float64 checks under a pin to an implementation without float64
            report.notes.append(f"{name}: invariance checks (float64) not run under the pin: {exc}")
            break
        except Exception as exc:  # noqa: BLE001 - a plugin's crash is a failed check
            report.checks.append(Check(name, "dispatched", "float64", "invariance",
                                       f"{check.name} raised {type(exc).__name__}: {exc}", math.inf, 0, 0, False))
            continue
        error = rel_rms(got, expected)
        report.checks.append(Check(name, "dispatched", "float64", "invariance", check.name, error, 0.0,
                                   check.tolerance, error <= check.tolerance))
    return report
