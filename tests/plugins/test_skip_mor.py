"""block_wrappers ``skip`` (FiRST per-layer skip router) and ``mor`` (Mixture-of-Recursions,
token choice): skipped tokens bitwise unchanged, decisions and metrics on hand-made routers,
the depth each token gets respected at every loop iteration, decoding and pieces equal the
parallel forward, packed sequences, errors, training and model verification."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hybridlab.core.errors import HybridlabError
from hybridlab.core.interfaces import Aux, RunContext
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec, load_pipeline
from hybridlab.core.train import train
from hybridlab.core.verify import verify_model
from hybridlab.testing import stepwise_logits

ROOT = Path(__file__).resolve().parents[2]
ATTN = {"kind": "attention", "heads": 2}
GDN = {"kind": "gated_deltanet", "heads": 2}


def build(registry, layers, *, vocab=24, d_model=16, seed=0, **extra):
    spec = ModelSpec.model_validate({"name": "t", "vocab_size": vocab, "d_model": d_model, "layers": layers, **extra},
                                    context={"registry": registry})
    torch.manual_seed(seed)
    return Model(spec, registry).double()


def record(module):
    """Every call of ``module`` (a Block) as (h_in, h_out), in order."""
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append((args[0], out[0])))
    return calls, handle


def routed(router, h):
    """The router's logits on the residual stream h [B, T, D] (prenorm: the stream is h)."""
    return F.linear(F.rms_norm(h, (h.shape[-1],), eps=1e-6), router.weight, router.bias)


def inner_on(block, model, h, idx):
    """The bare block (no wrapper) on the tokens idx of the batch-1 h, as one shorter sequence."""
    ctx = RunContext(aux=Aux(), stream=model.stream, n_layers=len(model.order))
    return block.inner(h[:, idx], None, ctx)[0]


# ------------------------------------------------------------------- skip


def skip_model(registry, compute_loss=0.5):
    """Layer 0 skips odd token ids and runs even ones: column 0 of the embedding is +1 for
    even ids and -1 for odd ones, and the router reads 10 · that column."""
    model = build(registry, [{"mixer": ATTN, "wrapper": {"kind": "skip", "compute_loss": compute_loss}},
                             {"mixer": ATTN}])
    with torch.no_grad():
        emb = model.embedding.weight
        emb.copy_(0.1 * torch.randn_like(emb))
        emb[:, 0] = torch.where(torch.arange(emb.shape[0]) % 2 == 0, 1.0, -1.0)
        router = model.blocks["0"].wrapper.router
        router.weight.zero_()
        router.weight[0, 0] = 10.0
        router.bias.zero_()
    return model


def test_skip_router_bias_starts_every_token_processed(registry):
    model = build(registry, [{"mixer": ATTN, "wrapper": {"kind": "skip"}}])
    assert float(model.blocks["0"].wrapper.router.bias.detach()) == 2.0  # after the generic init zeroed biases
    out = model(torch.randint(0, 24, (2, 20)))
    assert float(out.metrics["layers.0.skip.processed"]) == 1.0


@torch.no_grad()
def test_skip_runs_exactly_the_tokens_with_positive_logit_and_leaves_the_others_bitwise(registry):
    model = skip_model(registry)
    tokens = torch.randint(0, 24, (3, 25))
    calls, handle = record(model.blocks["0"])
    out = model(tokens)
    handle.remove()
    h_in, h_out = calls[0]
    even = tokens % 2 == 0  # [B, T]: the router's choice, by construction
    assert torch.equal(routed(model.blocks["0"].wrapper.router, h_in).squeeze(-1) > 0, even)
    assert torch.equal(h_out[~even], h_in[~even])  # skipped: bitwise the input
    assert torch.equal((h_out != h_in).any(-1), even)  # every processed token changed
    # a processed token: h + sigmoid(r) · (block(h) - h), the block seeing the processed tokens alone
    block, gate = model.blocks["0"], torch.sigmoid(routed(model.blocks["0"].wrapper.router, h_in).squeeze(-1))
    for b in range(3):
        idx = even[b].nonzero().view(-1)
        sub = h_in[b:b + 1, idx]
        expected = sub + gate[b, idx].view(1, -1, 1) * (inner_on(block, model, h_in[b:b + 1], idx) - sub)
        torch.testing.assert_close(h_out[b:b + 1, idx], expected, rtol=1e-12, atol=1e-12)
    # metrics and the compute loss, from the hand-made decisions
    processed = float(even.double().mean())
    assert float(out.metrics["layers.0.skip.processed"]) == pytest.approx(processed)
    assert float(out.metrics["layers.0.skip.saved"]) == pytest.approx(1 - processed)
    xn = F.rms_norm(model.embedding.weight[tokens], (16,), eps=1e-6)
    assert float(out.aux_losses["layers.0.skip.compute_loss"].detach()) == pytest.approx(
        0.5 * float(torch.sigmoid(10 * xn[..., 0]).mean()), rel=1e-12)
    assert set(out.aux_losses) == {"layers.0.skip.compute_loss"}


def test_skip_is_causal_in_training_and_the_same_in_train_and_eval(registry):
    model = skip_model(registry).train()
    tokens = torch.randint(0, 24, (2, 30))
    changed = tokens.clone()
    changed[:, 20:] = (tokens[:, 20:] + 1) % 24  # flips every later token's decision
    torch.testing.assert_close(model(changed).logits[:, :20], model(tokens).logits[:, :20], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(tokens).logits, model.eval()(tokens).logits, rtol=0, atol=0)


def test_skip_router_learns_from_the_task_loss_through_the_gate(registry):
    model = skip_model(registry, compute_loss=0.0)
    out = model(torch.randint(0, 24, (2, 16)))
    assert out.aux_losses == {}
    out.logits.square().mean().backward()
    assert model.blocks["0"].wrapper.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------- mor


def mor_model(registry, balance_loss=0.1, after=True):
    """A loop of 3 whose block gives token id v the depth v % 3 + 1: the embedding's
    columns 0..2 are one-hot in v % 3 and the router reads 10 · those columns."""
    layers = [{"loop": 3, "blocks": [{"mixer": ATTN, "wrapper": {"kind": "mor", "recursions": 3,
                                                                  "balance_loss": balance_loss}}]}]
    model = build(registry, layers + ([{"mixer": ATTN}] if after else []))
    with torch.no_grad():
        emb = model.embedding.weight
        emb.copy_(0.1 * torch.randn_like(emb))
        emb[:, :3] = F.one_hot(torch.arange(emb.shape[0]) % 3, 3).double()
        router = model.blocks["0-0"].wrapper.router
        router.weight.zero_()
        router.weight[:, :3] = 10 * torch.eye(3)
        router.bias.zero_()
    return model


@torch.no_grad()
def test_mor_runs_each_token_for_its_depth_and_leaves_it_bitwise_after(registry):
    model = mor_model(registry)
    tokens = torch.randint(0, 24, (3, 26))
    block = model.blocks["0-0"]
    calls, handle = record(block)
    out = model(tokens)
    handle.remove()
    depth = tokens % 3 + 1  # [B, T], by construction
    logits = routed(block.wrapper.router, calls[0][0])  # read on entering the loop
    assert torch.equal(logits.argmax(-1) + 1, depth)
    assert len(calls) == 3
    for i, (h_in, h_out) in enumerate(calls):
        runs = depth > i
        assert torch.equal(h_out[~runs], h_in[~runs]), i  # done: bitwise unchanged
        assert torch.equal((h_out != h_in).any(-1), runs), i
    # iteration 1: the block sees the tokens of depth >= 2 alone, each update scaled by p(d_t)
    gate = torch.softmax(logits, -1).amax(-1)  # [B, T]
    h_in, h_out = calls[1]
    for b in range(3):
        idx = (depth[b] > 1).nonzero().view(-1)
        sub = h_in[b:b + 1, idx]
        expected = sub + gate[b, idx].view(1, -1, 1) * (inner_on(block, model, h_in[b:b + 1], idx) - sub)
        torch.testing.assert_close(h_out[b:b + 1, idx], expected, rtol=1e-12, atol=1e-12)
    # metrics at the entry depth, processed at every depth, and the balancing loss
    mean_depth = float(depth.double().mean())
    assert float(out.metrics["layers.0.mor.mean_depth"]) == pytest.approx(mean_depth)
    assert float(out.metrics["layers.0.mor.saved"]) == pytest.approx(1 - mean_depth / 3)
    for i in range(3):
        assert float(out.metrics[f"layers.{i}.mor.processed"]) == pytest.approx(float((depth > i).double().mean()))
    share = F.one_hot(depth - 1, 3).double().mean((0, 1))
    balance = 3 * float((share * torch.softmax(logits, -1).mean((0, 1))).sum())
    assert float(out.aux_losses["layers.0.mor.balance_loss"].detach()) == pytest.approx(0.1 * balance, rel=1e-12)
    assert set(out.aux_losses) == {"layers.0.mor.balance_loss"}


@torch.no_grad()
def test_mor_reuses_each_use_s_own_decision_when_a_shared_block_runs_twice_per_iteration(registry):
    """Two uses of one shared mor block per loop pass, and a nested loop: the decision a
    call reuses is the one its own use made on entering the innermost loop."""
    wrapped = {"mixer": ATTN, "wrapper": {"kind": "mor", "recursions": 2}}
    model = build(registry, [{"mixer": ATTN}, {"loop": 2, "blocks": [{"use": "a"}, {"use": "a"}]},
                             {"loop": 2, "blocks": [{"loop": 2, "blocks": [{"use": "a"}]}]}],
                  shared={"a": wrapped}, seed=3, init_std=0.2)  # blocks that move h enough to change decisions
    tokens = torch.randint(0, 24, (2, 30))
    block = model.blocks["a-0"]
    seen = []
    handle = block.wrapper.register_forward_hook(
        lambda m, args, out: seen.append((args[3].iterations, args[1], out[0])))
    out = model(tokens)
    handle.remove()
    assert [it for it, _, _ in seen] == [(0,), (0,), (1,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    entry = {0: 0, 1: 1, 2: 0, 3: 1, 4: 4, 5: 4, 6: 6, 7: 6}  # the call whose input routes each call
    differ = False
    for k, (it, h_in, h_out) in enumerate(seen):
        depth = routed(block.wrapper.router, seen[entry[k]][1]).argmax(-1) + 1
        runs = depth > it[-1]
        assert torch.equal((h_out != h_in).any(-1), runs), k
        assert torch.equal(h_out[~runs], h_in[~runs]), k
        other = routed(block.wrapper.router, seen[entry[k] ^ 1 if k < 4 else entry[k]][1]).argmax(-1) + 1
        differ |= k < 4 and not torch.equal(depth, other)
    assert differ  # the two uses decided differently: pairing them up mattered
    torch.testing.assert_close(decode(model, tokens, 9), out.logits, rtol=1e-10, atol=1e-10)


def test_mor_router_learns_from_the_task_loss_through_the_gate(registry):
    model = mor_model(registry, balance_loss=0.0)
    out = model(torch.randint(0, 24, (2, 16)))
    assert out.aux_losses == {}
    out.logits.square().mean().backward()
    assert model.blocks["0-0"].wrapper.router.weight.grad.abs().sum() > 0


def test_mor_outside_a_loop_is_an_error_naming_the_fix(registry):
    model = build(registry, [{"mixer": ATTN, "wrapper": {"kind": "mor", "recursions": 3}}])
    with pytest.raises(HybridlabError, match=r"mor \(at depth 0\) runs outside any loop.*loop: 3"):
        model(torch.randint(0, 24, (1, 5)))


def test_mor_recursions_must_match_the_loop_count(registry):
    model = build(registry, [{"loop": 2, "blocks": [{"mixer": ATTN, "wrapper": {"kind": "mor", "recursions": 3}}]}])
    with pytest.raises(HybridlabError, match=r"recursions: 3 but its loop runs 2 times.*set recursions: 2"):
        model(torch.randint(0, 24, (1, 5)))


# ------------------------------------------------------------------- both


SKIP_LAYERS = [{"mixer": ATTN, "wrapper": {"kind": "skip", "router_bias": 0.0}},
               {"mixer": GDN, "wrapper": {"kind": "skip", "router_bias": 0.0}},
               {"mixer": ATTN}]
MOR_LAYERS = [{"mixer": GDN},
              {"loop": 3, "blocks": [{"mixer": ATTN, "wrapper": {"kind": "mor", "recursions": 3}},
                                     {"mixer": GDN, "wrapper": {"kind": "mor", "recursions": 3}}]}]
ROUTING = {"skip": (SKIP_LAYERS, ["layers.0.skip.processed", "layers.1.skip.processed"]),
           "mor": (MOR_LAYERS, ["layers.5.mor.processed", "layers.6.mor.processed"])}  # last iteration


decode = stepwise_logits  # prefill in parallel, then one step per token


@pytest.mark.parametrize("kind", ["skip", "mor"])
def test_decoding_and_pieces_equal_the_parallel_forward(registry, kind):
    layers, names = ROUTING[kind]
    model = build(registry, layers, d_model=32, seed=1).eval()
    tokens = torch.randint(0, 24, (3, 23))
    out = model(tokens)
    for name in names:  # routing is not trivial here: some tokens skip, some run
        assert 0 < float(out.metrics[name]) < 1, name
    torch.testing.assert_close(decode(model, tokens, 8), out.logits, rtol=1e-10, atol=1e-10)
    first = model(tokens[:, :11], model.init_state(3))
    second = model(tokens[:, 11:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), out.logits, rtol=1e-10, atol=1e-10)
    state = model.init_state(3)
    wrapped = [s for s in state if isinstance(s, list)]
    assert wrapped and all(len(s) == 3 for s in wrapped)  # one batch-1 state per sequence


@pytest.mark.parametrize("kind", ["skip", "mor"])
def test_packed_sequences_route_and_run_each_document_alone(registry, kind):
    layers, names = ROUTING[kind]
    model = build(registry, layers, d_model=32, seed=1).eval()
    tokens = torch.randint(0, 24, (2, 29))
    doc_ids = torch.tensor([0] * 12 + [1] * 17).expand(2, 29)
    packed = model(tokens, doc_ids=doc_ids)
    alone = torch.cat([model(tokens[:, :12]).logits, model(tokens[:, 12:]).logits], 1)
    torch.testing.assert_close(packed.logits, alone, rtol=1e-10, atol=1e-10)
    assert set(names) <= set(packed.metrics)


@pytest.mark.parametrize("name", ["first-skip-tiny", "mor-tiny"])
def test_each_spec_trains(name, tmp_path, registry):
    pipeline = {"name": name, "model": str(ROOT / "specs" / "models" / f"{name}.yaml"),
                "data": {"kind": "mqar", "vocab": 64, "pairs": 2}, "optimizer": {"kind": "adamw", "lr": 3e-3},
                "steps": 4, "batch_size": 4, "eval_batches": 1, "log_every": 1, "device": "cpu"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    spec = load_pipeline(tmp_path / "p.yaml", registry=registry, warn=False)
    run_dir, result = train(spec, out=tmp_path / "r", progress=False, registry=registry)
    assert math.isfinite(result["eval/loss"]) and (run_dir / "checkpoints").is_dir()
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    key = "skip.saved" if name == "first-skip-tiny" else "mor.mean_depth"
    assert any(k.endswith(key) for row in logged for k in row), key


VERIFY = {"skip": ([{"mixer": ATTN, "wrapper": {"kind": "skip", "router_bias": 0.0}},
                   {"mixer": ATTN, "wrapper": {"kind": "skip", "router_bias": 0.0}}], "layers.1.skip.processed"),
          "mor": ([{"mixer": ATTN},
                   {"loop": 3, "blocks": [{"mixer": ATTN, "wrapper": {"kind": "mor", "recursions": 3}}]}],
                  "layers.3.mor.processed")}


@pytest.mark.parametrize("kind", ["skip", "mor"])
def test_model_verification_passes_with_routing_that_skips(registry, kind):
    """The hard decisions are compared too (read in fp32 with autocast off, as mod's): at
    the weights verify draws (seed 0) routing is mixed (skip's bias 0; mor's router at
    its random init), and no token sits within rounding of a tie."""
    layers, name = VERIFY[kind]
    spec = build(registry, layers, d_model=32).spec
    torch.manual_seed(0)  # the weights verify_model builds
    tokens = torch.randint(0, 24, (2, 131), generator=torch.Generator().manual_seed(0))
    assert 0 < float(Model(spec, registry)(tokens).metrics[name]) < 1
    report = verify_model(spec, registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems


def test_a_misplaced_mor_is_a_located_spec_error(tmp_path, monkeypatch):
    from hybridlab.core.errors import SpecError
    from hybridlab.core.spec import load_model_spec

    (tmp_path / "m.yaml").write_text("vocab_size: 32\nd_model: 16\nlayers:\n"
                                     "  - mixer: {kind: attention, heads: 2}\n    wrapper: {kind: mor, recursions: 2}\n"
                                     "  - loop: 3\n    blocks:\n      - mixer: {kind: attention, heads: 2}\n"
                                     "        wrapper: {kind: mor, recursions: 2}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_model_spec("m.yaml")
    assert [str(p).split(": ", 2)[:2] for p in info.value.problems] == [
        ["m.yaml:5", "layers[0].wrapper.recursions"], ["m.yaml:9", "layers[1].blocks[0].wrapper.recursions"]]
