"""residual ``hyper_connections`` and ``mhc``: the residual contract, the Sinkhorn
projection, decoding and model-level verification."""

import pytest
import torch

from hybridlab.core.config import Dims
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec
from hybridlab.core.verify import verify_model
from hybridlab.plugins.residual.hyper_connections import HyperConnections, HyperConnectionsConfig
from hybridlab.plugins.residual.mhc import MHC, MHCConfig, sinkhorn

RESIDUALS = [{"kind": "hyper_connections", "lanes": 4}, {"kind": "hyper_connections", "lanes": 2, "dynamic": False},
             {"kind": "mhc", "lanes": 4}, {"kind": "mhc", "lanes": 2, "sinkhorn_iters": 5}]


def spec(registry, residual, d_model=32):
    return ModelSpec.model_validate(
        {"name": "streams", "vocab_size": 37, "d_model": d_model, "residual": residual,
         "layers": [{"mixer": {"kind": "attention", "heads": 2}}, {"mixer": {"kind": "attention", "heads": 4}},
                    {"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "mlp", "hidden": 40}}]},
        context={"registry": registry})


def test_sinkhorn_makes_every_matrix_doubly_stochastic():
    logits = torch.randn(5, 7, 4, 4, dtype=torch.float64)
    p = sinkhorn(logits, 30)
    assert (p > 0).all()
    torch.testing.assert_close(p.sum(-2), torch.ones(5, 7, 4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, 7, 4, dtype=torch.float64), rtol=0, atol=1e-6)
    # huge logits stay finite (log space) and a doubly stochastic input is a fixed point
    assert torch.isfinite(sinkhorn(torch.full((3, 3), 1e4) + torch.eye(3) * 50, 20)).all()
    twice = sinkhorn(p.log(), 1)
    torch.testing.assert_close(twice, p, rtol=0, atol=1e-6)


def test_mhc_mixing_is_doubly_stochastic_per_token_and_keeps_the_lane_sum():
    module = MHC(MHCConfig(lanes=4, sinkhorn_iters=30), Dims(d_model=8, vocab_size=5, n_layers=1)).double()
    with torch.no_grad():  # input-dependent mixing (logits ~ 1), not the initial near-identity
        module.phi.normal_(0, 0.2)
        module.alpha.fill_(1.0)
        module.bias[:, 2:] = 0.0
    h = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    pre, post, res = module.weights(h)
    assert res.shape == (2, 5, 4, 4) and not torch.allclose(res[0, 0], res[1, 3])
    torch.testing.assert_close(res.sum(-1), torch.ones(2, 5, 4, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(res.sum(-2), torch.ones(2, 5, 4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (pre > 0).all() and (post > 0).all() and (post < 2).all()
    # a sub-layer that writes nothing leaves the sum over lanes unchanged (columns sum to 1)
    out = module(h, lambda x: torch.zeros_like(x))
    torch.testing.assert_close(module.reduce(out), module.reduce(h), rtol=0, atol=1e-10)


def test_hyper_connections_start_as_plain_residual_lanes():
    dims = Dims(d_model=6, vocab_size=5, n_layers=3, layer=2)
    module = HyperConnections(HyperConnectionsConfig(lanes=3, dynamic=False), dims).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    h = module.expand(x)
    assert h.shape == (2, 4, 3, 6)
    read = []
    out = module(h, lambda inp: read.append(inp) or 2 * inp)
    torch.testing.assert_close(read[0], x)  # layer 2 reads lane 2 (a copy of x)
    torch.testing.assert_close(out, h + 2 * x[:, :, None])  # A_r = I, B = 1: every lane gets f(x)
    torch.testing.assert_close(module.reduce(out), 3 * x + 3 * 2 * x)


def test_dynamic_hyper_connections_depend_on_the_input():
    module = HyperConnections(HyperConnectionsConfig(lanes=2), Dims(d_model=6, vocab_size=5, n_layers=1)).double()
    with torch.no_grad():
        module.dynamic.normal_()
        module.scales.fill_(0.5)
    w = module.weights(torch.randn(3, 4, 2, 6, dtype=torch.float64))
    assert w.shape == (3, 4, 2, 4) and not torch.allclose(w[0, 0], w[1, 1])


@pytest.mark.parametrize("residual", RESIDUALS, ids=lambda r: f"{r['kind']}-{r['lanes']}")
def test_decoding_from_state_equals_the_parallel_forward(registry, residual):
    torch.manual_seed(0)
    model = Model(spec(registry, residual), registry).double().eval()
    tokens = torch.randint(0, 37, (2, 19))
    full = model(tokens).logits
    out = model(tokens[:, :6], model.init_state(2))
    logits = [out.logits]
    for t in range(6, 19):
        out = model.step(tokens[:, t], out.state)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("residual", RESIDUALS, ids=lambda r: f"{r['kind']}-{r['lanes']}")
def test_models_with_lanes_pass_model_verification(registry, residual):
    report = verify_model(spec(registry, residual), registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems


@pytest.mark.parametrize("residual", RESIDUALS[:1] + RESIDUALS[2:3], ids=lambda r: r["kind"])
def test_the_lanes_get_different_gradients_from_the_first_step(registry, residual):
    """The lanes start as copies; each block reading mostly its own lane is what makes
    their write weights learn differently (with a uniform read and write they would
    stay copies for the whole run)."""
    torch.manual_seed(0)
    model = Model(spec(registry, residual), registry).double()
    model(torch.randint(0, 37, (2, 15))).logits.logsumexp(-1).mean().backward()
    module = model.blocks[0].mixer_residual
    grad = module.static.grad[:, -1] if residual["kind"] == "hyper_connections" else module.bias.grad[:, 1]
    assert grad.std() > 1e-2 * grad.abs().mean(), grad  # the write weight of each lane (B / b_post)


@pytest.mark.parametrize("residual", RESIDUALS, ids=lambda r: f"{r['kind']}-{r['lanes']}")
def test_every_parameter_of_a_model_with_lanes_is_used(registry, residual):
    """The model's own residual module only expands and reduces the stream: it is kept out
    of the module tree, so no mixing weights sit unused (counted, saved, optimized) beside
    the blocks' ones; an old checkpoint that still holds them loads."""
    from hybridlab.core.model import count_parameters

    torch.manual_seed(0)
    model = Model(spec(registry, residual), registry).double()
    tokens = torch.randint(0, 37, (2, 15))
    logits = model(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == []
    used = {id(p): p for m in (model.embedding, model.blocks, model.norm, model.head) for p in m.parameters()}
    assert count_parameters(model) == sum(p.numel() for p in used.values())
    assert not any(key.startswith("stream.") for key in model.state_dict())
    old = {**model.state_dict(), **{f"stream.{k}": v for k, v in model.stream.state_dict().items()}}
    assert len(old) > len(model.state_dict())
    Model(spec(registry, residual), registry).double().load_state_dict(old)  # strict
