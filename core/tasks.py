"""What the trainer, ``compare`` and ``generate`` expect of a data task, and small helpers
the built-in tasks share.

A data kind's module is built as ``Task(config, seed=...)`` and offers

    batch(split, index, batch_size) -> {'inputs': [B, T] long, 'targets': [B, T] long, ...}
        a pure function of (seed, split, index); targets are -100 where nothing is scored;
        extra tensors may ride along (the trainer moves every value to the device);
        'doc_ids' [B, T] (packed documents) is handed to the model's forward
    splits() -> list of evaluation split names ('train' is always accepted by batch)

and optionally

    metrics(output, batch) -> {name: tensor or (numerator, denominator)}
                                                extra metrics, e.g. accuracy per query type;
                                                pairs are pooled over evaluation batches
    encode(text) -> list[int], decode(ids) -> str   how ``hybridlab generate`` reads a prompt
                                                    (without them: whitespace-separated ids)
    reward(batch, completions [B, G, N]) -> [B, G]  its symbolic oracle's score of sampled
                                                    answers (:class:`Rewards`; a task whose
                                                    config's fields() has ``answer`` offers it)

Length splits: a split named ``len{N}`` evaluates at length N, in the task's own length
unit (tokens for most tasks, history events for factworld). Tasks with ``eval_lengths``
name their splits this way, so every metric is reported as ``len64/accuracy`` and
``hybridlab compare`` can plot accuracy against length.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from .errors import HybridlabError

_LENGTH_SPLIT = re.compile(r"len(\d+)")


def length_splits(lengths: Iterable[int]) -> list[str]:
    """[32, 64] -> ['len32', 'len64']"""
    return [f"len{n}" for n in lengths]


def split_length(split: str) -> int | None:
    """'len64' -> 64; any other split name -> None."""
    m = _LENGTH_SPLIT.fullmatch(split)
    return int(m.group(1)) if m else None


def torch_seed(seed: int) -> int:
    """A seed for torch's generators, which keep only 32 bits: seeds below 2^32 as they
    are (runs keep their streams), larger ones hashed into 32 bits (they repeated the
    seed their low bits spell)."""
    if 0 <= seed < 2**32:
        return seed
    return int.from_bytes(hashlib.blake2b(f"seed/{seed}".encode(), digest_size=4).digest(), "little")


def generator(seed: int, split: str, index: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, split, index) alone: batches are pure functions
    of these, so a resumed run sees the same data and every split its own stream."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def unknown_split(kind: str, split: str, known: Sequence[str]) -> KeyError:
    return KeyError(f"{kind} has splits {['train', *known]}, not {split!r}")


class Vocabulary:
    """Names for token ids, for tasks whose tokens mean something (``g3``, ``give``...).

    ``encode`` splits the text on whitespace and maps each word to its id, by name or as a
    plain integer; ``decode`` joins the names with spaces."""

    def __init__(self, names: Sequence[str]) -> None:
        assert len(set(names)) == len(names), "token names must be unique"
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word in self.ids:
                out.append(self.ids[word])
            elif word.isascii() and word.isdigit() and int(word) < len(self.names):  # not '²' or '٣'
                out.append(int(word))
            else:
                shown = ", ".join(self.names[:12]) + (", ..." if len(self.names) > 12 else "")
                raise HybridlabError(f"unknown token {word!r} in the prompt; this task's tokens are {shown} "
                                     f"(or ids 0..{len(self.names) - 1})")
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.names[i] if 0 <= i < len(self.names) else f"<{i}>" for i in ids)


@runtime_checkable
class TaskMetrics(Protocol):
    """A task that reports its own metrics beside the objectives' (accuracy per query
    type): ``{name: value or (numerator, denominator)}``; pairs are pooled over batches."""

    def metrics(self, output: Any, batch: dict) -> dict: ...


@runtime_checkable
class Rewards(Protocol):
    """A task whose answers its own symbolic oracle checks (for RL objectives: ``grpo``).

    Its batches carry ``prompt`` [B, P] (token ids up to where an answer starts, one P per
    batch) and ``answer`` [B, A] (a correct answer), and its config's ``fields()`` lists
    them: a task config whose fields include ``answer`` promises this protocol, which is
    how a pipeline is checked at validate time. ``reward(batch, completions)`` scores
    completions [B, G, N] (G per prompt, N tokens each, decoded after ``batch['prompt']``)
    -> [B, G] float in [0, 1]; 1 means correct (a sample "passes")."""

    def reward(self, batch: dict, completions: torch.Tensor) -> torch.Tensor: ...


def exact_match(answer: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """answer [B, A], completions [B, G, N] -> [B, G] float: 1 where a completion's first A
    tokens are the answer (tokens after them are not read), 0 elsewhere and where N < A."""
    A = answer.shape[1]
    if completions.shape[-1] < A:
        return completions.new_zeros(completions.shape[:2], dtype=torch.float)
    return (completions[..., :A] == answer[:, None, :]).all(-1).float()


@runtime_checkable
class TextTask(Protocol):
    """A task that reads and writes text (prompts for generate): ids <-> text."""

    def encode(self, text: str) -> Iterable[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def encode(task: Any, text: str) -> list[int]:
    """The task's ``encode``, or whitespace-separated integer ids."""
    if isinstance(task, TextTask):
        return list(task.encode(text))
    try:
        return [int(word) for word in text.split()]
    except ValueError:
        raise HybridlabError(f"this task reads prompts as whitespace-separated token ids, got {text!r}") from None


def decode(task: Any, ids: Iterable[int]) -> str:
    """The task's ``decode``, or the ids separated by spaces."""
    ids = [int(i) for i in ids]
    if isinstance(task, TextTask):
        return task.decode(ids)
    return " ".join(map(str, ids))
