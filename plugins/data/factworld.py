"""data ``factworld``: a small world of agents, static facts and objects passed around.

Recall, state tracking and their composition in one task. Agents ``g0, g1, ...`` each
have a value for every attribute (``g3 a0 v42``: "g3's a0 is v42"); objects are handed
from agent to agent over a history of events (``give o3 g1``: "g1 now holds o3"). After
the history come queries of three types:

    recall       recall a0 g3   -> v42    the fact (a0 of g3)
    state        who o3         -> g1     the holder of o3 (the last give wins)
    composition  compose a0 o3  -> v7     the fact a0 of the holder of o3

A sequence (``|`` separates the parts; trailing ``<pad>`` fills it to a fixed length):

    [g a v ...] | give o g  give o g ... | recall a g v  who o g  compose a o v ... <pad>...

With ``facts: prompt`` every agent's facts are listed first, in a shuffled order, drawn
anew per sequence. With ``facts: fixed`` the facts are one world drawn from the seed and
never shown: the model has to learn them into its weights (the recall part becomes
memorisation, the composition part combines a memorised table with tracked state).

Only the answers are scored (target at the query's last token = the answer, which is the
next input token). Queried objects are ones the history moved at least once. ``length``
counts history events; evaluation splits ``len{N}`` use N events, so histories can be
longer than any seen in training. Metrics: ``accuracy`` (from the loss) and
``accuracy_recall`` / ``accuracy_state`` / ``accuracy_composition`` per split.

For preference and RL objectives every batch also carries ``prompt``: the sequence's facts
and history, then one question of its own (``... | recall a0 g3``), drawn after the
sequence's other draws; ``answer``: the oracle's answer to it [B, 1]; ``rejected``: another
token of the answer's kind (a value, or an agent for ``who``; a value when there is only
one agent) [B, 1]. The three question types differ in length, so every row of a batch asks
the same type (drawn per batch from ``query_types``); ``reward`` checks sampled answers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.tasks import Vocabulary, exact_match, generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl

QUERY_TYPES = ("recall", "state", "composition")
SPECIALS = ("<pad>", "|", "give", "recall", "who", "compose")
PAD, SEP, GIVE, RECALL, WHO, COMPOSE = range(len(SPECIALS))


class FactWorldConfig(DataConfig):
    """Agents with static facts and objects passed around; recall, state and composition queries."""

    kind: Literal["factworld"] = "factworld"
    agents: int = Field(default=8, ge=1)
    """Agents g0..g{agents-1}."""
    attributes: int = Field(default=2, ge=1)
    """Attributes a0.. every agent has a value for."""
    values: int = Field(default=16, ge=2)
    """Values v0.. an attribute can take."""
    objects: int = Field(default=4, ge=1)
    """Objects o0.. handed around."""
    facts: Literal["prompt", "fixed"] = "prompt"
    """prompt: facts drawn per sequence and listed first; fixed: one world per seed, never shown."""
    length: int = Field(default=16, ge=1)
    """History events (``give o g``) per training sequence."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate with these history lengths, one split ``len{N}`` each (default: [length])."""
    queries: int = Field(default=8, ge=1)
    """Queries per sequence."""
    query_types: list[Literal["recall", "state", "composition"]] = Field(
        default_factory=lambda: list(QUERY_TYPES), min_length=1)
    """Which query types to ask, each drawn with equal probability."""

    @field_validator("query_types")
    @classmethod
    def _unique(cls, types: list[str]) -> list[str]:
        if len(set(types)) != len(types):
            raise ValueError(f"each query type at most once, got {types}")
        return types

    @field_validator("eval_lengths")
    @classmethod
    def _positive(cls, lengths: list[int] | None) -> list[int] | None:
        if lengths is not None and min(lengths) < 1:
            raise ValueError(f"history lengths must be positive, got {lengths}")
        return lengths

    def min_vocab_size(self) -> int:
        return len(SPECIALS) + self.agents + self.attributes + self.values + self.objects

    def lengths(self) -> list[int]:
        return list(self.eval_lengths or [self.length])

    def fields(self) -> frozenset[str]:
        return frozenset({"inputs", "targets", "query_type", "prompt", "answer", "rejected"})


class FactWorld:
    def __init__(self, config: FactWorldConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        c = config
        self.agent0 = len(SPECIALS)  # first id of each group of names
        self.attr0 = self.agent0 + c.agents
        self.value0 = self.attr0 + c.attributes
        self.object0 = self.value0 + c.values
        self.vocabulary = Vocabulary([*SPECIALS, *(f"g{i}" for i in range(c.agents)),
                                      *(f"a{i}" for i in range(c.attributes)),
                                      *(f"v{i}" for i in range(c.values)), *(f"o{i}" for i in range(c.objects))])
        # facts: world[g, a] = value index; used when facts are fixed
        self.world = torch.randint(0, c.values, (c.agents, c.attributes), generator=generator(seed, "world", 0))

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def seq_len(self, events: int) -> int:
        c = self.config
        facts = 3 * c.agents * c.attributes if c.facts == "prompt" else 0
        return facts + 1 + 3 * events + 1 + 4 * c.queries

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> inputs, targets [B, T] and query_type [B, T] (index into QUERY_TYPES at each
        scored position, -1 elsewhere); prompt [B, P] (facts, history, one question of one
        type for the whole batch), answer and rejected [B, 1]."""
        c = self.config
        if split == "train":
            L = c.length
        elif split in self.splits():
            L = split_length(split)
        else:
            raise unknown_split("factworld", split, self.splits())
        g = generator(self.seed, split, index)
        B, Q, A, R = batch_size, c.queries, c.agents, c.attributes
        # every random draw for the batch, up front
        if c.facts == "prompt":
            facts = torch.randint(0, c.values, (B, A, R), generator=g)  # [B, A, R]
            order = torch.rand(B, A * R, generator=g).argsort(dim=1)  # [B, A*R] listing order
        else:
            facts = self.world.expand(B, A, R)
        moved = torch.randint(0, c.objects, (B, L), generator=g)  # [B, L] which object
        receiver = torch.randint(0, A, (B, L), generator=g)  # [B, L] to whom
        qtype = torch.randint(0, len(c.query_types), (B, Q), generator=g)  # [B, Q]
        qattr = torch.randint(0, R, (B, Q), generator=g)
        qagent = torch.randint(0, A, (B, Q), generator=g)
        qpick = torch.rand(B, Q, generator=g)  # picks among the objects the history moved
        # the prompt's question, drawn after the rest: inputs and targets are as they were without it
        ptype = c.query_types[int(torch.randint(0, len(c.query_types), (), generator=g))]
        pattr, pagent = torch.randint(0, R, (B,), generator=g), torch.randint(0, A, (B,), generator=g)
        ppick, pwrong = torch.rand(B, generator=g), torch.rand(B, generator=g)

        T = self.seq_len(L)
        inputs = torch.full((B, T), PAD, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        query_type = torch.full((B, T), -1, dtype=torch.long)
        prompts, answers, rejected = [], [], []
        for b in range(B):
            seq: list[int] = []
            if c.facts == "prompt":
                for k in order[b].tolist():
                    agent, attr = divmod(k, R)
                    seq += [self.agent0 + agent, self.attr0 + attr, self.value0 + int(facts[b, agent, attr])]
            seq.append(SEP)
            holder: dict[int, int] = {}
            for o, r in zip(moved[b].tolist(), receiver[b].tolist()):
                seq += [GIVE, self.object0 + o, self.agent0 + r]
                holder[o] = r
            seq.append(SEP)
            candidates = sorted(holder)
            question, answer = self._question(ptype, int(pattr[b]), int(pagent[b]), float(ppick[b]), facts[b],
                                              holder, candidates)
            prompts.append(seq + question)
            answers.append(answer)
            rejected.append(self._wrong(answer, ptype, float(pwrong[b])))
            for q in range(Q):
                name = c.query_types[int(qtype[b, q])]
                attr, agent = int(qattr[b, q]), int(qagent[b, q])
                obj = candidates[int(qpick[b, q] * len(candidates))]
                if name == "recall":
                    seq += [RECALL, self.attr0 + attr, self.agent0 + agent]
                    answer = self.value0 + int(facts[b, agent, attr])
                elif name == "state":
                    seq += [WHO, self.object0 + obj]
                    answer = self.agent0 + holder[obj]
                else:
                    seq += [COMPOSE, self.attr0 + attr, self.object0 + obj]
                    answer = self.value0 + int(facts[b, holder[obj], attr])
                targets[b, len(seq) - 1] = answer
                query_type[b, len(seq) - 1] = QUERY_TYPES.index(name)
                seq.append(answer)
            inputs[b, :len(seq)] = torch.tensor(seq)
        return {"inputs": inputs, "targets": targets, "query_type": query_type, "prompt": torch.tensor(prompts),
                "answer": torch.tensor(answers)[:, None], "rejected": torch.tensor(rejected)[:, None]}

    def _question(self, name: str, attr: int, agent: int, pick: float, facts: torch.Tensor, holder: dict[int, int],
                  candidates: list[int]) -> tuple[list[int], int]:
        """One question of type ``name`` about a sequence -> (its tokens, the oracle's answer)."""
        obj = candidates[int(pick * len(candidates))]
        if name == "recall":
            return [RECALL, self.attr0 + attr, self.agent0 + agent], self.value0 + int(facts[agent, attr])
        if name == "state":
            return [WHO, self.object0 + obj], self.agent0 + holder[obj]
        return [COMPOSE, self.attr0 + attr, self.object0 + obj], self.value0 + int(facts[holder[obj], attr])

    def _wrong(self, answer: int, name: str, draw: float) -> int:
        """A token of the answer's kind that is not the answer (``draw`` in [0, 1) picks it)."""
        c = self.config
        if name == "state" and c.agents > 1:
            first, count = self.agent0, c.agents
        else:  # a value (for 'who' with a single agent too: no other agent exists)
            first, count = self.value0, c.values
        if not first <= answer < first + count:
            return first + int(draw * count)
        return first + (answer - first + 1 + int(draw * (count - 1))) % count

    def reward(self, batch: dict[str, torch.Tensor], completions: torch.Tensor) -> torch.Tensor:
        """completions [B, G, N] -> [B, G]: 1.0 where the first token answers the prompt's question."""
        return exact_match(batch["answer"], completions)

    def metrics(self, output, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Accuracy per query type asked, as (correct, asked) pairs: evaluation pools them
        over its batches (a batch that asked no query of a type does not count as 0)."""
        with torch.no_grad():
            correct = output.logits.argmax(-1) == batch["targets"]  # [B, T]
            out = {}
            for name in self.config.query_types:
                mask = batch["query_type"] == QUERY_TYPES.index(name)
                out[f"accuracy_{name}"] = ((correct & mask).sum(), mask.sum())
            return out

    def encode(self, text: str) -> list[int]:
        return self.vocabulary.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.vocabulary.decode(ids)


@hookimpl
def hybridlab_register(register):
    register.kind("data", "factworld", config=FactWorldConfig, module=FactWorld)
