"""mixer ``deltanet``: DeltaNet, linear attention whose memory is written with the delta
rule (Schlag, Irie & Schmidhuber, "Linear Transformers Are Secretly Fast Weight
Programmers", ICML 2021; the chunked form and this layer: Yang, Wang, Zhang, Shen & Kim,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length", NeurIPS 2024).

The core op, ``delta_rule(q, k, v, beta, *, scale, initial_state, doc_ids)``, has two
implementations: ``reference`` (token by token, fp32) and ``chunk`` (chunks of 64 tokens (32 on CPU) with the
UT transform; see linear_recurrence.py for the derivation).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from hybridlab.registry import hookimpl

from .linear_recurrence import check_inputs, chunk_recurrence, recurrent_cases, recurrent_reference
from .recurrent_layer import DeltaRuleConfig, DeltaRuleMixer


class DeltaNetConfig(DeltaRuleConfig):
    """DeltaNet: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""

    kind: Literal["deltanet"] = "deltanet"


# ---------------------------------------------------------------- the op


def delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
                         initial_state: Tensor | None = None,
                         doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The delta rule (Schlag et al. 2021; Yang et al. 2024, Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length):

        S_t = (I - β_t k_t k_t^T) S_{t-1} + β_t k_t v_t^T,    o_t = S_t^T (scale · q_t)

    q, k [B, T, H, K] (k unit-norm for a contraction), v [B, T, H, V], beta [B, T, H]
    (used as given, e.g. a sigmoid), initial_state [B, H, K, V], doc_ids [B, T] (packed
    documents: the state restarts where the id changes); scale defaults to K^-0.5.
    Returns (o [B, T, H, V], final state [B, H, K, V] in fp32, fp64 for fp64 inputs).
    Implementations: reference (token by token), chunk, triton (kernels/, docs/kernels.md), fla (optional)."""
    check_inputs(q, k, v, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return recurrent_reference(q, k, v, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def delta_rule_chunk(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
                     initial_state: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as delta_rule_reference; chunks of 64 tokens (32 on CPU), UT transform."""
    check_inputs(q, k, v, beta=beta, initial_state=initial_state, doc_ids=doc_ids)
    return chunk_recurrence(q, k, v, beta=beta, scale=scale, initial_state=initial_state, doc_ids=doc_ids)


def _gates(B: int, T: int, H: int, K: int, n: int) -> dict[str, Tensor]:
    # every third case has beta in (0, 2), the negative-eigenvalue variant
    return {"beta": torch.rand(B, T, H) * (2.0 if n % 3 == 1 else 1.0)}


delta_rule_cases = recurrent_cases(_gates, unit_keys=True)


# ---------------------------------------------------------------- the module


class DeltaNet(DeltaRuleMixer):
    """The paper's layer: SiLU short convolutions on q, k, v, l2-normalised q and k,
    beta = sigmoid(W_beta x), a per-head RMSNorm on the output (no gate by default)."""

    kind = "deltanet"

    def gates(self, x):
        return {"beta": self.beta_of(x)}


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "deltanet", config=DeltaNetConfig, module=DeltaNet, cases=delta_rule_cases,
                  examples=[{"heads": 2}, {"heads": 3, "head_dim": 6, "expand_v": 1.5, "allow_neg_eigval": True,
                                           "gate": True}, {"heads": 4, "conv_size": 0, "output_norm": False}])
    register.impl("mixer", "deltanet", "reference", fn=delta_rule_reference, doc="token by token in fp32")
    register.impl("mixer", "deltanet", "chunk", fn=delta_rule_chunk, priority=10,
                  doc="chunks of 64 tokens (32 on CPU), UT transform, PyTorch")
