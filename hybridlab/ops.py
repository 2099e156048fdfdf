"""Functional recurrences, usable without the module layer, with flash-linear-attention's
conventions so results can be checked against it:

- inputs are time-major: q, k [B, T, H, K], v [B, T, H, V];
- ``g`` is the log of the decay (≤ 0): [B, T, H] per head or [B, T, H, K] per key channel;
- ``beta`` is used as given (already through a sigmoid);
- ``scale`` defaults to K ** -0.5; ``initial_state`` is [B, H, K, V];
- ``doc_ids`` [B, T] marks packed documents: the state restarts where the id changes;
- every op returns ``(o, final_state)``, the state in fp32 (fp64 for fp64 inputs);
  ``forgetting_attn`` (softmax attention, stateless like fla's) returns ``o`` alone, and
  its k, v and g may be longer than q (a cached prefix: queries are the last positions);
  ``causal_conv1d`` (the short_conv mixer's) keeps fla's conv state, the last W inputs
  [B, D, W] in x's dtype (copies of inputs, no rounding to avoid); ``stickbreaking_attn``
  (stateless like forgetting_attn, with a cached prefix likewise) returns ``(o, rem)``, rem
  the unallocated stick [B, Tq, HQ], as fla's ``sb_attn``; ``mesa_net`` returns fla's
  three results ``(o, h_kk, h_kv)`` (its two states, taken as ``h_kk_init``/``h_kv_init``);
  ``path_attn`` and ``deltaformer_attn`` (with a cached prefix likewise) return ``(o,
  cache)``, the cache (PaTH's transformed keys, DeltaFormer's first-stage values u, fp32)
  only with ``use_cache=True``, else None; ``gsa`` takes and returns fla's state pair
  ``(hk [B, H, K, M], hv [B, H, M, V])``; ``log_linear_attn`` (fla's op, plus ``beta=``
  for the gated delta rule; ``scale`` defaults to 1 as fla's has none) takes and returns
  ``(levels [B, H, L, K, V], positions [B] int64)``.

Arguments are checked before anything runs: tensors where tensors belong, one floating
dtype for q, k, v, one device, shapes against each other, and g ≤ 0 (-inf, a hard reset,
is allowed; NaN is not; this value check costs one host sync on a GPU and is skipped
under torch.compile), and no NaN in the further gates an op names (gdn2's b and w, gsa's
s, log_linear_attn's level_scales and beta). The ``chunk`` implementations have written backwards: one gradient;
differentiating that gradient (create_graph=True) raises, and ``reference`` (autograd's
throughout) serves it.

``impl=`` names an implementation ("reference", "chunk", or a plugin's); by default the
dispatcher picks the best one that can serve the inputs, and ``HYBRIDLAB_IMPL`` pins it
as everywhere else. ``ssd`` and ``gated_delta_rule`` take ``state_clip=`` (Stuffed
Mamba's state normalisation, see recurrent_layer.CollapseConfig): it acts after every
token, so a call that sets it runs the reference unless ``impl`` names another, and the
chunked forms refuse it. Each op's docstring writes its recurrence and cites its paper.

    from hybridlab.ops import gated_delta_rule
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=state)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from hybridlab.core.dispatch import choose
from hybridlab.plugins.mixer.comba import comba_reference
from hybridlab.plugins.mixer.deltaformer import deltaformer_attn_reference
from hybridlab.plugins.mixer.deltanet import delta_rule_reference
from hybridlab.plugins.mixer.forgetting_attention import forgetting_attn_reference
from hybridlab.plugins.mixer.gated_deltanet import gated_delta_rule_reference
from hybridlab.plugins.mixer.gated_deltaproduct import gated_delta_product_reference
from hybridlab.plugins.mixer.gdn2 import gdn2_reference
from hybridlab.plugins.mixer.gla import gla_reference
from hybridlab.plugins.mixer.gsa import gsa_reference
from hybridlab.plugins.mixer.hgrn import hgrn_reference
from hybridlab.plugins.mixer.kda import kda_reference
from hybridlab.plugins.mixer.linear_attention import linear_attn_reference
from hybridlab.plugins.mixer.log_linear_gdn import log_linear_attn_reference
from hybridlab.plugins.mixer.mamba2 import ssd_reference
from hybridlab.plugins.mixer.mesa_net import mesa_net_reference
from hybridlab.plugins.mixer.path_attention import path_attn_reference
from hybridlab.plugins.mixer.retention import retention_reference
from hybridlab.plugins.mixer.rwkv7 import rwkv7_reference
from hybridlab.plugins.mixer.short_conv import causal_conv1d_reference
from hybridlab.plugins.mixer.stickbreaking_attention import stickbreaking_attn_reference

__all__ = ["linear_attn", "retention", "gla", "delta_rule", "gated_delta_rule", "gated_delta_product", "kda", "ssd",
           "hgrn", "forgetting_attn", "causal_conv1d", "stickbreaking_attn",
           "rwkv7", "comba", "mesa_net", "path_attn", "deltaformer_attn", "gdn2", "gsa", "log_linear_attn", "op"]


def op(name: str, kind: str, reference: Callable, *, gates: tuple[str, ...] = ()) -> Callable:
    """The public op ``name``: the signature and docstring of ``reference`` (the mixer
    kind's reference implementation) plus ``impl=``; runs the implementation of ``kind``
    that ``impl`` names, or the dispatcher's choice. ``gates``: further gate arguments
    (beside the log decay g) that must not hold NaN. A tensor argument may be a tuple of
    tensors (gsa's initial_state, fla's (hk, hv))."""

    signature = inspect.signature(reference)
    tensor_args = [p for p, param in signature.parameters.items() if "Tensor" in str(param.annotation)]

    @functools.wraps(reference)
    def run(*args: Any, impl: str | None = None, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}{signature}: {exc}") from None
        for arg in tensor_args:
            value = bound.arguments.get(arg)
            parts = value if isinstance(value, tuple) and value else (value,)
            if value is not None and not all(isinstance(x, torch.Tensor) for x in parts):
                raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(value).__name__}")
        if "q" in signature.parameters:
            q, k, v = (bound.arguments[x] for x in ("q", "k", "v"))
            if not (k.dtype == q.dtype == v.dtype):
                raise ValueError(f"{name}: expected q, k and v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        else:  # ops without q, k, v (hgrn's x, g): the first tensor argument sets the device
            q = bound.arguments[tensor_args[0]]
        tensors = [a for a in bound.arguments.values() if isinstance(a, torch.Tensor)]
        devices = {n: x.device for n, a in bound.arguments.items() for x in (a if isinstance(a, tuple) else (a,))
                   if isinstance(x, torch.Tensor) and x.device != q.device}
        if devices:
            raise ValueError(f"{name}: every tensor must be on q's device ({q.device}); "
                             + ", ".join(f"{n} is on {d}" for n, d in devices.items()))
        gate = "gk" if "gk" in signature.parameters else "g"  # rwkv7 (fla's DPLR form) names it gk
        g = bound.arguments.get(gate)
        # g is a log decay; a positive one (a growing state) is outside every op's contract
        # (the chunked forms cap decay ratios at 1), and so is NaN. One host sync; skipped
        # while compiling and for meta tensors (no values)
        if g is not None and not torch.compiler.is_compiling() and g.is_floating_point() and g.device.type != "meta" \
                and not bool((g <= 0).all()):
            bad = g[~(g <= 0)]
            raise ValueError(f"{name}: {gate} is the log of the decay and must be ≤ 0 (or -inf), "
                             + ("got NaN" if bad.isnan().any() else f"got a largest value of {bad.max().item():g}"))
        for extra in gates:  # one host sync each, as for g
            value = bound.arguments.get(extra)
            if value is not None and not torch.compiler.is_compiling() and value.device.type != "meta" \
                    and bool(value.isnan().any()):
                raise ValueError(f"{name}: {extra} holds NaN")
        if impl is None and bound.arguments.get("state_clip") is not None:
            impl = "reference"  # the clip acts after every token: only the token-by-token form holds those states
        first = tensors[0]
        training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        chosen = choose("mixer", kind, None, first.device, first.dtype, training=training, pin=impl).impl
        return chosen.fn(*args, **kwargs)

    impl_param = inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), impl_param])
    run.__name__ = run.__qualname__ = name
    return run


# one line per op: public name, mixer kind whose implementations run it, its reference
linear_attn = op("linear_attn", "linear_attention", linear_attn_reference)
retention = op("retention", "retention", retention_reference)
gla = op("gla", "gla", gla_reference)
delta_rule = op("delta_rule", "deltanet", delta_rule_reference)
gated_delta_rule = op("gated_delta_rule", "gated_deltanet", gated_delta_rule_reference)
gated_delta_product = op("gated_delta_product", "gated_deltaproduct", gated_delta_product_reference)
kda = op("kda", "kda", kda_reference)
ssd = op("ssd", "mamba2", ssd_reference)
hgrn = op("hgrn", "hgrn", hgrn_reference)  # x, g [B, T, D]; HGRN2 runs on gla
forgetting_attn = op("forgetting_attn", "forgetting_attention", forgetting_attn_reference)
causal_conv1d = op("causal_conv1d", "short_conv", causal_conv1d_reference)  # x [B, T, D], weight [D, W]
stickbreaking_attn = op("stickbreaking_attn", "stickbreaking_attention", stickbreaking_attn_reference)
rwkv7 = op("rwkv7", "rwkv7", rwkv7_reference)  # q, k, v, a, b, gk [B, T, H, K] (fla's DPLR form)
comba = op("comba", "comba", comba_reference)  # q, k, v, p, g, beta (fla's chunk_comba order)
mesa_net = op("mesa_net", "mesa_net", mesa_net_reference, gates=("beta", "lamb"))  # fla's chunk_mesa_net
path_attn = op("path_attn", "path_attention", path_attn_reference, gates=("w", "beta"))  # fla's parallel_path_attn
deltaformer_attn = op("deltaformer_attn", "deltaformer", deltaformer_attn_reference, gates=("beta",))
gdn2 = op("gdn2", "gdn2", gdn2_reference, gates=("b", "w"))  # q, k, v, g, b, w (fla's chunk_gdn2 order)
gsa = op("gsa", "gsa", gsa_reference, gates=("s",))  # q, k, v, s, g; state (hk, hv) (fla's chunk_gsa)
# q, k, v, g, level_scales (fla's chunk_log_linear_attn), beta= for the gated delta rule; state (levels, positions)
log_linear_attn = op("log_linear_attn", "log_linear_gdn", log_linear_attn_reference, gates=("level_scales", "beta"))
