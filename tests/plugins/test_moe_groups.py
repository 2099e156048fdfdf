"""moe options for DeepSeek-V3: group-limited routing (groups, top_groups) and the routed
output's scale. Checked against a loop over tokens written from the rule's statement."""

import pytest
import torch

from hybridlab.plugins.ffn.moe import MoEConfig, moe_grouped, moe_reference, route


def _route_by_hand(scores, bias, top_k, groups, top_groups):
    """Per token: rank groups by the sum of their two best biased scores, keep top_groups,
    take the top_k biased scores among the kept experts."""
    N, E = scores.shape
    size = E // groups
    chosen = []
    for n in range(N):
        biased = scores[n] + bias
        rank = sorted(range(groups), key=lambda g: -float(biased[g * size:(g + 1) * size].topk(2).values.sum()))
        allowed = [e for g in rank[:top_groups] for e in range(g * size, (g + 1) * size)]
        chosen.append(sorted(allowed, key=lambda e: -float(biased[e]))[:top_k])
    return chosen


@pytest.mark.parametrize("E, groups, top_groups, K", [(8, 4, 2, 3), (12, 3, 1, 2), (6, 2, 2, 4)])
def test_group_limited_routing_keeps_only_the_best_groups(E, groups, top_groups, K):
    g = torch.Generator().manual_seed(E)
    x, router = torch.randn(40, 10, generator=g), torch.randn(E, 10, generator=g)
    bias = 0.5 * torch.randn(E, generator=g)
    experts, weights, logits = route(x, router, bias, top_k=K, score="sigmoid", groups=groups, top_groups=top_groups)
    expected = _route_by_hand(logits.sigmoid(), bias, K, groups, top_groups)
    assert [sorted(row) for row in experts.tolist()] == [sorted(row) for row in expected]
    chosen = logits.sigmoid().gather(-1, experts)
    assert torch.allclose(weights, chosen / chosen.sum(-1, keepdim=True))  # the bias never enters the weights
    plain = route(x, router, bias, top_k=K, score="sigmoid")[0]
    if top_groups < groups:  # the limit changes some choice in 40 tokens
        assert not torch.equal(plain.sort(-1).values, experts.sort(-1).values)


def test_both_implementations_route_groups_identically():
    g = torch.Generator().manual_seed(0)
    E, D, H = 8, 12, 16
    args = (torch.randn(30, D, generator=g), torch.randn(E, D, generator=g), torch.randn(E, D, 2 * H, generator=g),
            torch.randn(E, H, D, generator=g), torch.randn(E, generator=g))
    a = moe_reference(*args, top_k=2, score="sigmoid", groups=4, top_groups=2)
    b = moe_grouped(*args, top_k=2, score="sigmoid", groups=4, top_groups=2)
    assert torch.equal(a.experts, b.experts)
    assert torch.allclose(a.out, b.out, rtol=1e-5, atol=1e-5)  # fp32 both: summation order only


def test_scale_multiplies_the_routed_output_only(registry):
    import hybridlab

    spec = {"name": "s", "vocab_size": 32, "d_model": 16,
            "layers": [{"mixer": {"kind": "attention", "heads": 2},
                        "ffn": {"kind": "moe", "experts": 4, "top_k": 2, "hidden": 8, "shared_experts": 1,
                                "router": "sigmoid", "groups": 2, "top_groups": 1}}]}
    base = hybridlab.build(spec, registry=registry).eval()
    spec["layers"][0]["ffn"]["scale"] = 2.5
    scaled = hybridlab.build(spec, registry=registry).eval()
    scaled.load_state_dict(base.state_dict())
    ffn_a, ffn_b = base.blocks[0].ffn, scaled.blocks[0].ffn
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        shared = ffn_a.shared["down"](torch.nn.functional.silu(ffn_a.shared["gate_up"](x).chunk(2, -1)[0])
                                      * ffn_a.shared["gate_up"](x).chunk(2, -1)[1])
        assert torch.allclose(ffn_b(x) - shared, 2.5 * (ffn_a(x) - shared), atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"experts": 6, "groups": 4}, "groups (4) must divide experts (6)"),
    ({"experts": 6, "groups": 6}, "groups of two experts or more"),
    ({"experts": 6, "top_groups": 2}, "top_groups (2) applies to groups > 1"),
    ({"experts": 8, "groups": 4, "top_groups": 1, "top_k": 3}, "top_k (3) must be at most the experts of the top_groups"),
])
def test_group_options_that_conflict_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(kind="moe", **options)
