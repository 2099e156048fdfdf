"""block_wrapper ``mod`` (mixture-of-depths): capacity, skipped tokens unchanged, causal
decoding, the router's loss and metrics, model verification."""

import math

import pytest
import torch

from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec
from hybridlab.core.verify import verify_model

ATTN = {"kind": "attention", "heads": 2}


def make(registry, capacity=0.25, residual=None, ffn=None, seed=0):
    layers = [{"mixer": ATTN},
              {"mixer": ATTN, "wrapper": {"kind": "mod", "capacity": capacity}},
              {"mixer": {"kind": "attention", "heads": 4, "kv_heads": 2}, "wrapper": {"kind": "mod", "capacity": 0.5},
               **({"ffn": ffn} if ffn else {})}]
    data = {"name": "mod", "vocab_size": 37, "d_model": 32, "layers": layers}
    if residual is not None:
        data["residual"] = residual
    torch.manual_seed(seed)
    return Model(ModelSpec.model_validate(data, context={"registry": registry}), registry).double()


def block_io(model, index, tokens):
    seen = []
    hook = model.blocks[index].register_forward_hook(lambda m, args, out: seen.append((args[0], out[0])))
    try:
        out = model(tokens)
    finally:
        hook.remove()
    return seen[0][0], seen[0][1], out


@pytest.mark.parametrize("T", [1, 2, 7, 37, 64])
@pytest.mark.parametrize("capacity", [0.125, 0.25, 0.5, 1.0])
def test_training_processes_exactly_the_capacity_of_every_sequence(registry, T, capacity):
    model = make(registry, capacity=capacity).train()
    h_in, h_out, _ = block_io(model, 1, torch.randint(0, 37, (3, T)))
    changed = (h_out != h_in).any(-1)  # [B, T]
    k = math.ceil(capacity * T)
    assert changed.sum(1).tolist() == [k] * 3
    wrapper, block = model.blocks[1].wrapper, model.blocks[1]
    x = torch.nn.functional.rms_norm(block.mixer_residual.reduce(h_in), (32,))
    logits = wrapper.router(x).squeeze(-1)
    top = torch.zeros_like(changed).scatter(1, logits.topk(k, dim=1).indices, True)
    assert torch.equal(changed, top)  # the processed tokens are the router's top-k
    torch.testing.assert_close(h_out[~changed], h_in[~changed], rtol=0, atol=0)  # the rest pass unchanged


def test_evaluation_processes_the_tokens_whose_router_logit_is_positive(registry):
    model = make(registry).eval()
    h_in, h_out, out = block_io(model, 1, torch.randint(0, 37, (2, 40)))
    block = model.blocks[1]
    logits = block.wrapper.router(torch.nn.functional.rms_norm(h_in, (32,))).squeeze(-1)
    changed = (h_out != h_in).any(-1)
    assert torch.equal(changed, logits > 0) and 0 < changed.sum() < changed.numel()
    assert float(out.metrics["layers.1.mod.processed"]) == pytest.approx(float((logits > 0).double().mean()))
    assert out.aux_losses == {}


@pytest.mark.parametrize("residual", [None, {"kind": "hyper_connections", "lanes": 2}, {"kind": "mhc", "lanes": 3}])
def test_decoding_from_state_equals_the_parallel_forward(registry, residual):
    model = make(registry, residual=residual, ffn={"kind": "moe", "experts": 4, "top_k": 2, "hidden": 16}).eval()
    tokens = torch.randint(0, 37, (3, 23))
    full = model(tokens).logits
    state = model.init_state(3)
    assert len(state[1]) == 3  # one batch-1 state per sequence in a wrapped block
    out = model(tokens[:, :8], state)
    logits = [out.logits]
    for t in range(8, 23):
        out = model.step(tokens[:, t], out.state)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-10, atol=1e-10)
    # the sequences did not all choose the same tokens: the per-sequence path mattered
    caches = [s.length for s in out.state[1]]
    assert len(set(caches)) > 1 and max(caches) < 23


def test_evaluation_combines_the_block_losses_and_metrics_of_every_sequence(registry):
    """In evaluation each sequence runs the block alone on its own chosen tokens; the batch's
    MoE loads and losses are the average over sequences weighted by their chosen tokens
    (not the last sequence's alone)."""
    model = make(registry, ffn={"kind": "moe", "experts": 4, "top_k": 2, "hidden": 16, "z_loss": 1e-3}).eval()
    tokens = torch.randint(0, 37, (3, 30))
    with torch.no_grad():
        batch = model(tokens)
        rows = [model(tokens[b:b + 1]) for b in range(3)]
    chosen = [float(r.metrics["layers.2.mod.processed"]) * 30 for r in rows]  # k_b of each sequence
    assert len(set(chosen)) > 1 and min(chosen) > 0
    names = [f"layers.2.moe.load.{e}" for e in range(4)]
    for name in names + ["layers.2.moe.balance_loss", "layers.2.moe.z_loss"]:
        values = [r.metrics[name] if name in r.metrics else r.aux_losses[name] for r in rows]
        expected = sum(k * float(v) for k, v in zip(chosen, values)) / sum(chosen)
        got = batch.metrics[name] if name in batch.metrics else batch.aux_losses[name]
        assert float(got) == pytest.approx(expected, rel=1e-6), name
        assert float(got) != pytest.approx(float(values[-1]), rel=1e-4), name  # not the last row's
    # exact for the loads: the share of each expert among all the batch's chosen tokens
    assert float(sum(batch.metrics[n] for n in names)) == pytest.approx(1.0)


def test_evaluation_is_causal_and_training_is_not_as_documented(registry):
    """The documented caveat (module docstring, docs/research-loop.md): training's top-k
    reads the whole sequence, evaluation's r_t > 0 does not."""
    model = make(registry)
    tokens = torch.randint(0, 37, (2, 40))
    changed = tokens.clone()
    changed[:, 30:] = torch.randint(0, 37, (2, 10))
    model.eval()
    torch.testing.assert_close(model(changed).logits[:, :30], model(tokens).logits[:, :30], rtol=1e-12, atol=1e-12)
    model.train()
    assert (model(changed).logits[:, :30] - model(tokens).logits[:, :30]).abs().max() > 1e-6
    assert (model(tokens).logits - model.eval()(tokens).logits).abs().max() > 1e-6  # train and eval differ


def test_router_loss_and_metrics_flow_through_the_output_and_train_the_router(registry):
    model = make(registry).train()
    out = model(torch.randint(0, 37, (2, 16)))
    assert set(out.aux_losses) == {"layers.1.mod.router_loss", "layers.2.mod.router_loss"}
    assert float(out.metrics["layers.1.mod.processed"]) == 4 / 16
    assert 0 <= float(out.metrics["layers.2.mod.router_agreement"]) <= 1
    # the language-model loss alone reaches the router through the gate
    out.logits.square().mean().backward()
    assert model.blocks[1].wrapper.router.weight.grad.abs().sum() > 0


def test_model_verification_passes(registry):
    spec = make(registry, ffn={"kind": "moe", "experts": 4, "top_k": 1, "hidden": 16}).spec
    report = verify_model(spec, registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems
