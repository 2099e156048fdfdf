"""data ``retrieval``: find the document that states a FactWorld fact, given a question about it.

The facts are FactWorld's fixed world (``factworld`` with ``facts: fixed`` and the same
seed and sizes has the same one): agent ``g`` has value ``v`` for attribute ``a``. A
query asks about one fact by its entity and relation; its document states the fact.
Queries name the agent and the attribute by aliases that documents never use (``x3`` is
``g3``, ``r1`` is ``a1``), so no token is shared and the match has to be learned:

    query     recall r1 x3          "what is g3's a1?"
    document  g3 a1 v42             "g3's a1 is v42"

(With ``aliases: false`` queries use the documents' names, ``recall a1 g3``; then two of
a query's three tokens are in its document, and an untrained encoder with mean pooling
already ranks many documents first: a lexical match, not a learned one.)

Hard negatives are documents of other facts about the same agent (``g3 a0 v7``) or
with the same attribute (``g5 a1 v13``), drawn without repetition, so telling them apart
needs both the entity and the relation. The queries of a batch ask about distinct facts
(the batch size is at most agents · attributes), so another row's document is never a
second right answer.

Batch fields: ``query`` [B, 3], ``document`` [B, 3], ``negatives`` [B, K, 3] (K =
``negatives``), and an LM view of the documents, ``inputs`` = ``document`` and ``targets``
scoring only the value (the fact; the agent and attribute of a document are random
draws), so ``cross_entropy`` beside ``contrastive`` trains a GritLM-style model. Every
batch is a pure function of (seed, split, index); split ``eval`` draws other batches of
the same facts.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.errors import HybridlabError
from hybridlab.core.tasks import Vocabulary, generator, unknown_split
from hybridlab.registry import hookimpl

from .factworld import RECALL, FactWorld, FactWorldConfig

FIELDS = frozenset({"query", "document", "negatives", "inputs", "targets"})


class RetrievalConfig(DataConfig):
    """Queries about FactWorld facts and the documents that state them, with hard negatives."""

    kind: Literal["retrieval"] = "retrieval"
    agents: int = Field(default=16, ge=2)
    """Agents g0.. (the entities)."""
    attributes: int = Field(default=4, ge=2)
    """Attributes a0.. every agent has a value for (the relations)."""
    values: int = Field(default=16, ge=2)
    """Values v0.. an attribute can take."""
    aliases: bool = True
    """Queries name agents and attributes by their own tokens (x0.., r0..); false: by the
    documents' names (g0.., a0..)."""
    negatives: int = Field(default=4, ge=0)
    """Hard negatives per query (same agent or same attribute, another fact); at most
    (agents - 1) + (attributes - 1)."""

    @field_validator("negatives")
    @classmethod
    def _enough_neighbours(cls, negatives: int, info: ValidationInfo) -> int:
        agents, attributes = info.data.get("agents"), info.data.get("attributes")
        if agents is None or attributes is None:  # already reported
            return negatives
        pool = (agents - 1) + (attributes - 1)
        if negatives > pool:
            raise ValueError(f"{negatives} exceeds the {pool} facts that share an agent or an attribute with a "
                             "given fact ((agents - 1) + (attributes - 1))")
        return negatives

    def fields(self) -> frozenset[str]:
        return FIELDS

    def world_config(self) -> FactWorldConfig:
        """The FactWorld whose fixed world and vocabulary this task uses."""
        return FactWorldConfig(agents=self.agents, attributes=self.attributes, values=self.values, objects=1,
                               facts="fixed")

    def min_vocab_size(self) -> int:
        return self.world_config().min_vocab_size() + self.agents + self.attributes


class Retrieval:
    def __init__(self, config: RetrievalConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        self.world = FactWorld(config.world_config(), seed=seed)
        names = self.world.vocabulary.names
        self.alias_agent0 = len(names)  # the aliases follow FactWorld's tokens
        self.alias_attr0 = self.alias_agent0 + config.agents
        self.vocabulary = Vocabulary([*names, *(f"x{i}" for i in range(config.agents)),
                                      *(f"r{i}" for i in range(config.attributes))])

    def splits(self) -> list[str]:
        return ["eval"]

    @property
    def facts(self) -> int:
        return self.config.agents * self.config.attributes

    def query(self, agent: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        """agent, attr [...] -> the question about that fact [..., 3]: ``recall r x`` (``recall a g``
        without aliases)."""
        w = self.world
        attr0, agent0 = (self.alias_attr0, self.alias_agent0) if self.config.aliases else (w.attr0, w.agent0)
        return torch.stack([torch.full_like(agent, RECALL), attr0 + attr, agent0 + agent], dim=-1)

    def document(self, agent: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        """agent, attr [...] -> the document stating that fact [..., 3]: ``g a v``."""
        w = self.world
        return torch.stack([w.agent0 + agent, w.attr0 + attr, w.value0 + w.world[agent, attr]], dim=-1)

    def corpus(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every fact's (query, document), fact k = agent · attributes + attribute: two [N, 3]."""
        k = torch.arange(self.facts)
        agent, attr = k.div(self.config.attributes, rounding_mode="floor"), k % self.config.attributes
        return self.query(agent, attr), self.document(agent, attr)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> query [B, 3], document [B, 3], negatives [B, K, 3], inputs [B, 3] (= document),
        targets [B, 3] (the value at the attribute's position, -100 elsewhere)."""
        c = self.config
        if split not in ("train", *self.splits()):
            raise unknown_split("retrieval", split, self.splits())
        if batch_size > self.facts:
            raise HybridlabError(f"retrieval: batch_size {batch_size} exceeds the {self.facts} facts "
                                 f"(agents {c.agents} × attributes {c.attributes}); a batch asks about distinct "
                                 "facts, so lower batch_size or add agents")
        g = generator(self.seed, split, index)
        B, A, R, K = batch_size, c.agents, c.attributes, c.negatives
        fact = torch.rand(self.facts, generator=g).argsort()[:B]  # [B] distinct facts
        pick = torch.rand(B, (A - 1) + (R - 1), generator=g).argsort(dim=1)[:, :K]  # [B, K] which neighbours
        agent, attr = fact.div(R, rounding_mode="floor"), fact % R
        # neighbour p < R-1: same agent, attribute shifted by p+1; else same attribute, agent shifted
        same_agent = pick < R - 1
        neg_agent = torch.where(same_agent, agent[:, None], (agent[:, None] + pick - (R - 1) + 1) % A)
        neg_attr = torch.where(same_agent, (attr[:, None] + pick + 1) % R, attr[:, None])
        document = self.document(agent, attr)
        targets = torch.full_like(document, -100)
        targets[:, 1] = document[:, 2]
        return {"query": self.query(agent, attr), "document": document,
                "negatives": self.document(neg_agent, neg_attr).reshape(B, K, 3),
                "inputs": document.clone(), "targets": targets}

    def encode(self, text: str) -> list[int]:
        return self.vocabulary.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.vocabulary.decode(ids)


@hookimpl
def hybridlab_register(register):
    register.kind("data", "retrieval", config=RetrievalConfig, module=Retrieval)
