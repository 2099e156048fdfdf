"""objective ``contrastive``: InfoNCE for embedding models (van den Oord et al. 2018;
with in-batch and hard negatives as in DPR, Karpukhin et al. 2020, and NV-Embed, Lee et
al. 2024), optionally over Matryoshka nested dimensions (Kusupati et al. 2022).

The trained model embeds the task's ``query`` and ``document`` token rows: its final
hidden states (after the final norm, the head's input) are pooled by a ``pooling`` kind
into one vector per row. Each query must pick its own document among the batch's
documents and its own hard negatives (``negatives``). With ``matryoshka: [d_1, ..., d_n]``
the loss is averaged over the prefixes ``e[:d_i]`` of each embedding, so the first d_i
coordinates are an embedding on their own.

The model is used as given: for an encoder, give its attention layers ``causal: false``
(see docs/objectives.md for which mixers can); the pooling module's weights train with
the model and are saved with it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from hybridlab.core.config import Component, LossConfig, Needs
from hybridlab.core.errors import HybridlabError
from hybridlab.core.interfaces import InitWeights
from hybridlab.core.objectives import Objective, ObjectiveRun, ObjectiveSetup
from hybridlab.registry import hookimpl


class ContrastiveConfig(LossConfig):
    """InfoNCE between pooled query and document embeddings, with in-batch and hard negatives."""

    kind: Literal["contrastive"] = "contrastive"
    temperature: float = Field(default=0.05, gt=0)
    """τ: the similarities (cosines) are divided by it before the softmax."""
    pooling: Component("pooling") = Field(default_factory=lambda: {"kind": "mean"}, validate_default=True)
    """How the final hidden states [B, T, D] become one vector per row: mean, last, latent_attention."""
    matryoshka: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    """Nested embedding sizes d_1 < ... < d_n, each at most d_model: the loss is the mean of
    the losses of the prefixes e[:d_i] (default: the full embedding only)."""
    symmetric: bool = False
    """Also the document -> query direction (each document picks its query among the
    batch's queries); the loss is the mean of the two directions."""
    negatives: bool = True
    """Score each query against its hard negatives, the task's ``negatives`` [B, K, T]
    field (the task must yield it); false: in-batch negatives only."""

    @field_validator("matryoshka")
    @classmethod
    def _increasing(cls, dims: list[int] | None) -> list[int] | None:
        if dims is not None and any(a >= b for a, b in zip(dims, dims[1:])):
            raise ValueError(f"must be strictly increasing (d_1 < d_2 < ...), got {dims}")
        return dims

    def needs(self) -> Needs:
        return Needs(fields=("query", "document", *(("negatives",) if self.negatives else ())), forward=False,
                     causal=False)

    def check_pipeline(self, pipeline: Any, models: dict[str, Any]):
        d = pipeline.model.d_model
        too_wide = [n for n in self.matryoshka or () if n > d]
        if too_wide:
            yield "matryoshka", (f"dimension{'s' if len(too_wide) > 1 else ''} {', '.join(map(str, too_wide))} "
                                 f"exceed{'' if len(too_wide) > 1 else 's'} the model's d_model ({d}): the "
                                 "embedding has d_model coordinates")
        for field, message in self.pooling.check(pipeline.model.dims()):
            yield "pooling", f"{field}: {message}" if field else message


def info_nce(query: Tensor, document: Tensor, negatives: Tensor | None = None, *, temperature: float,
             symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """InfoNCE with in-batch negatives: query q_i [B, D], its document p_i [B, D], its hard
    negatives n_ik [B, K, D] (optional). With s(x, y) = cos(x, y) / τ,

        L_i = -log( exp s(q_i, p_i) / (Σ_j exp s(q_i, p_j) + Σ_k exp s(q_i, n_ik)) )

    averaged over i; ``symmetric`` averages it with the document -> query direction
    -log( exp s(p_i, q_i) / Σ_j exp s(p_i, q_j) ). Returns (loss, hit [B] bool): hit_i when
    the positive scores strictly above every other candidate of query i (recall@1; a tie
    is a miss). Computed in fp32."""
    q, p = F.normalize(query.float(), dim=-1), F.normalize(document.float(), dim=-1)
    B = q.shape[0]
    scores = q @ p.T / temperature  # [B, B]
    if negatives is not None and negatives.shape[1] > 0:
        n = F.normalize(negatives.float(), dim=-1)
        hard = torch.einsum("bd,bkd->bk", q, n) / temperature  # [B, K]
        logits = torch.cat([scores, hard], dim=1)  # [B, B + K]
    else:
        logits = scores
    labels = torch.arange(B, device=q.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(scores.T, labels)) / 2
    with torch.no_grad():
        positive = logits.gather(1, labels[:, None])  # [B, 1]
        others = logits.scatter(1, labels[:, None], float("-inf"))
        hit = positive[:, 0] > others.amax(dim=1)
    return loss, hit


class Contrastive(Objective):
    def __init__(self, config: ContrastiveConfig, setup: ObjectiveSetup) -> None:
        super().__init__()
        self.config = config
        self.width = setup.dims.d_model
        too_wide = [n for n in config.matryoshka or () if n > self.width]
        if too_wide:  # validate reports this with its line; a config built in Python gets it here
            raise HybridlabError(f"contrastive: matryoshka dimensions {too_wide} exceed d_model ({self.width})")
        self.pooling = setup.build("pooling", config.pooling)
        if isinstance(self.pooling, InitWeights):
            self.pooling.init_weights(setup.init_std)

    def embed(self, run: ObjectiveRun, tokens: Tensor) -> Tensor:
        """tokens [N, T] -> pooled final hidden states [N, D] (fp32)."""
        hidden = run.forward(tokens, hidden=("final",)).hidden["final"]  # [N, T, D]
        return self.pooling(hidden.float())

    def forward(self, run: ObjectiveRun) -> tuple[Tensor, dict[str, Any]]:
        batch = run.batch
        query, document = batch["query"], batch["document"]  # [B, Tq], [B, Td]
        B = query.shape[0]
        negatives = batch["negatives"] if self.config.negatives else None  # [B, K, Td]
        q = self.embed(run, query)
        if negatives is not None and negatives.shape[1] > 0 and negatives.shape[2] == document.shape[1]:
            K = negatives.shape[1]
            both = self.embed(run, torch.cat([document, negatives.flatten(0, 1)]))  # one forward: [B + B·K, D]
            d, n = both[:B], both[B:].view(B, K, -1)  # [B, D], [B, K, D]
        else:
            d = self.embed(run, document)
            n = None if negatives is None or negatives.shape[1] == 0 else \
                self.embed(run, negatives.flatten(0, 1)).view(B, negatives.shape[1], -1)
        dims = self.config.matryoshka or [self.width]
        losses, metrics = [], {}
        for dim in dims:
            loss, hit = info_nce(q[:, :dim], d[:, :dim], None if n is None else n[..., :dim],
                                 temperature=self.config.temperature, symmetric=self.config.symmetric)
            losses.append(loss)
            if self.config.matryoshka:
                metrics[f"loss_d{dim}"] = loss.detach()
                metrics[f"accuracy_d{dim}"] = hit.float().mean()
            if dim == self.width:
                metrics["accuracy"] = hit.float().mean()
        if "accuracy" not in metrics:
            with torch.no_grad():
                _, hit = info_nce(q, d, n, temperature=self.config.temperature)
            metrics["accuracy"] = hit.float().mean()
        return torch.stack(losses).mean(), metrics


@hookimpl
def hybridlab_register(register):
    register.kind("loss", "contrastive", config=ContrastiveConfig, module=Contrastive)
