"""Random hybrid specs, as a user might write them: every kind of mixer with random
options, mixed with attention variants, MoE, mixture-of-depths, residual streams and
engram. Each spec either fails validation with an error that names where, or passes
`hybridlab verify SPEC` (dispatched vs references, gradients, greedy decoding). Random
specs of this kind found three real problems: a decay gradient 6x the reference's error
(now summed without cancellation), a structurally zero gradient that made the pooled
reference error 1e8, and differential attention's λ gradient (now its own tolerance)."""

import random

import pytest
import yaml

from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_model

RECURRENT = ["linear_attention", "retention", "gla", "deltanet", "gated_deltanet", "gated_deltaproduct", "kda",
             "mamba2"]
ATTENTION = ["attention", "mla", "nsa", "differential_attention"]


def heads_and_kv(rng):
    heads = rng.choice([1, 2, 4])
    return heads, rng.choice([d for d in (1, 2, 4) if heads % d == 0])


def random_mixer(rng):
    kind = rng.choice(RECURRENT + ATTENTION)
    if kind == "attention":
        heads, kv = heads_and_kv(rng)
        m = {"kind": kind, "heads": heads, "kv_heads": kv}
        for key, values in (("window", [2, 5, 16]), ("sinks", [True]), ("qk_norm", [True]), ("softcap", [5.0]),
                            ("gate", ["headwise", "elementwise"]),
                            ("position", [{"kind": "alibi"}, {"kind": "none"}, {"kind": "rope", "fraction": 0.5}])):
            if rng.random() < 0.25:
                m[key] = rng.choice(values)
        return m
    if kind == "mla":
        m = {"kind": kind, "heads": rng.choice([1, 2, 3]), "kv_rank": rng.choice([4, 8])}
        if rng.random() < 0.5:
            m["rope_dim"] = rng.choice([2, 4])
        return m
    if kind == "nsa":
        heads, kv = heads_and_kv(rng)
        block = rng.choice([2, 4, 8])
        return {"kind": kind, "heads": heads, "kv_heads": kv, "block": block,
                "stride": rng.choice([s for s in (1, 2, 4) if s <= block]), "select": rng.choice([3, 4]),
                "window": rng.choice([2, 8, 64])}
    if kind == "differential_attention":
        heads, kv = heads_and_kv(rng)
        return {"kind": kind, "heads": heads, "kv_heads": kv}
    m = {"kind": kind, "heads": rng.choice([1, 2, 3])}  # 3 heads need head_dim: an error case
    for key, values in (("head_dim", [5, 8, 12]), ("expand_v", [0.5, 2.0]), ("conv_size", [0, 1, 3]),
                        ("gate", [True, False])):
        if rng.random() < 0.3:
            m[key] = rng.choice(values)
    if kind in ("deltanet", "gated_deltanet", "gated_deltaproduct", "kda") and rng.random() < 0.4:
        m["allow_neg_eigval"] = rng.choice([True, False])
    if kind == "gated_deltaproduct":
        m["householder"] = rng.choice([1, 2, 3])
    if kind == "linear_attention" and rng.random() < 0.3:
        m["feature_map"] = rng.choice(["relu", "identity"])  # identity with normalize: an error case
    return m


def random_ffn(rng, d):
    kind = rng.choice(["swiglu", "mlp", "moe"])
    if kind != "moe":
        return {"kind": kind, "hidden": 2 * d}
    return {"kind": "moe", "experts": rng.choice([2, 4, 5]), "top_k": rng.choice([1, 2]), "hidden": 8,
            "shared_experts": rng.choice([0, 1]), "router": rng.choice(["softmax", "sigmoid"]),
            "balance": rng.choice(["aux_loss", "bias", "none"])}


def random_spec(rng, index):
    d = rng.choice([24, 32])
    layers = []
    for _ in range(rng.choice([1, 2])):
        block = {"mixer": random_mixer(rng), "ffn": random_ffn(rng, d)}
        if rng.random() < 0.15:
            block["wrapper"] = {"kind": "mod", "capacity": 0.5}
        layers.append(block)
    spec = {"name": f"random{index}", "vocab_size": rng.choice([17, 32]), "d_model": d,
            "defaults": {"norm": {"kind": rng.choice(["rmsnorm", "layernorm"])}}, "layers": layers,
            "head": {"kind": "lm", "tied": rng.choice([True, False])}}
    if rng.random() < 0.25:
        spec["residual"] = rng.choice([{"kind": "mhc", "lanes": 2}, {"kind": "hyper_connections", "lanes": 2}])
    if rng.random() < 0.2:
        spec["embedding"] = {"kind": "engram", "orders": [2], "table_size": 31, "heads": 1, "dim": 8, "layers": [0]}
    return spec


def verified_specs(seed, folder, registry):
    """The two random specs of ``seed``, written to ``folder``: yields (path, SpecError or
    verify_model's Report) for each (benchmarks/random_specs.py sweeps more seeds)."""
    rng = random.Random(seed)
    for index in range(2):
        path = folder / f"random{seed}_{index}.yaml"
        path.write_text(yaml.safe_dump(random_spec(rng, index), sort_keys=False))
        try:
            spec = load_model_spec(path, registry=registry)
        except SpecError as exc:  # e.g. 3 heads that do not divide d_model: said where
            yield path, exc
            continue
        yield path, verify_model(spec, registry=registry)


@pytest.mark.parametrize("seed", range(16))
def test_random_hybrid_specs_validate_with_located_errors_or_verify(seed, tmp_path, registry):
    for path, result in verified_specs(seed, tmp_path, registry):
        if isinstance(result, SpecError):
            assert f"{path}:" in str(result) and "layers[" in str(result), str(result)
            continue
        assert result.passed, (path.read_text(), [str(c) for c in result.failures()], result.problems)
