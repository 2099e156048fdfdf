"""ffn ``moe``: reference vs grouped (outputs and routing decisions), the side channel,
the loss-free bias update, decoding, exact resume (also from the run directory) and the
parameter summary."""

import json

import pytest
import torch
from pydantic import ValidationError

from hybridlab.core import checkpoint as ckpt
from hybridlab.core.cli import main
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.generate import generate
from hybridlab.core.model import Model, count_parameters
from hybridlab.core.spec import ModelSpec, PipelineSpec
from hybridlab.core.train import Trainer, train
from hybridlab.plugins.ffn import moe as moe_plugin
from hybridlab.plugins.ffn.moe import MoE, MoEConfig, grouped_matmul, moe_grouped, moe_reference
from hybridlab.testing import assert_verified

ROUTING = {"out[1]": "experts", "out[4]": "load"}


def test_both_implementations_pass_verification_with_identical_routing():
    report = assert_verified("moe")
    assert {c.impl for c in report.checks} == {"reference", "grouped", "token"}
    assert {c.dtype for c in report.checks} == {"float32", "bfloat16", "float16"}
    routing = [c for c in report.checks if c.quantity in ROUTING]
    # every case, every dtype, each implementation: the same experts and loads as the float64 reference, exactly
    assert len(routing) == 3 * 2 * 3 * 14 and all(c.error == 0 for c in routing)


def _inputs(N, E, D, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(N, D, generator=g).to(dtype), router=(torch.randn(E, D, generator=g) * D ** -0.5).to(dtype),
                gate_up=(torch.randn(E, D, 2 * H, generator=g) * D ** -0.5).to(dtype),
                down=(torch.randn(E, H, D, generator=g) * H ** -0.5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("E, K, D, H, score", [(8, 2, 32, 24, "softmax"), (64, 8, 16, 8, "sigmoid"),
                                                (5, 3, 12, 20, "sigmoid")])
def test_reference_and_grouped_route_identically(dtype, E, K, D, H, score):
    inputs = _inputs(301, E, D, H, dtype)
    bias = torch.randn(E) * 0.2
    ref = moe_reference(**inputs, bias=bias, top_k=K, score=score)
    fast = moe_grouped(**inputs, bias=bias, top_k=K, score=score)
    assert torch.equal(ref.experts, fast.experts) and torch.equal(ref.load, fast.load)
    assert torch.equal(ref.weights, fast.weights) and torch.equal(ref.logits, fast.logits)
    assert int(ref.load.sum()) == 301 * K  # dropless
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(fast.out.float(), ref.out.float(), rtol=tol, atol=tol)


def test_the_bias_steers_the_choice_but_not_the_weights():
    inputs = _inputs(50, 4, 8, 8, torch.float64)
    plain = moe_reference(**inputs, top_k=1, score="sigmoid")
    pushed = moe_reference(**inputs, bias=torch.tensor([0.0, 0.0, 10.0, 0.0]), top_k=1, score="sigmoid")
    assert (pushed.experts == 2).all() and not (plain.experts == 2).all()
    softmax = moe_reference(**inputs, bias=torch.tensor([0.0, 0.0, 10.0, 0.0]), top_k=2, score="softmax")
    probs = softmax.logits.softmax(-1)
    torch.testing.assert_close(softmax.weights, probs.gather(-1, softmax.experts))  # unbiased probabilities


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_matmul_and_its_fallback_agree_with_a_loop(dtype, monkeypatch):
    counts = torch.tensor([3, 0, 5, 1, 0, 7])  # empty groups included
    a = torch.randn(int(counts.sum()), 16).to(dtype)
    b = torch.randn(6, 16, 24).to(dtype)
    starts = counts.cumsum(0) - counts
    loop = torch.cat([a[s:s + c].double() @ b[g].double() for g, (s, c) in enumerate(zip(starts, counts))])
    fast = grouped_matmul(a, b, counts)  # torch._grouped_mm where it runs (not fp64)
    monkeypatch.setattr(moe_plugin, "GROUPED_MM_DEVICES", set())
    fallback = grouped_matmul(a, b, counts)  # one padded bmm
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(fast.double(), loop, rtol=tol, atol=tol)
    torch.testing.assert_close(fallback.double(), loop, rtol=tol, atol=tol)


def test_both_matmul_paths_of_grouped_pass_verification(monkeypatch):
    """On the CPU the grouped implementation takes torch._grouped_mm for fp32/bf16/fp16
    with 16-byte aligned rows and the padded bmm otherwise; here each path alone."""
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_verified("moe", impl="grouped")
    assert calls
    monkeypatch.setattr(moe_plugin, "GROUPED_MM_DEVICES", set())
    calls.clear()
    assert_verified("moe", impl="grouped")
    assert not calls


def test_grouped_mm_is_probed_per_device_and_dtype():
    assert moe_plugin.grouped_mm_runs("cpu", torch.float64) is False  # no fp64 grouped matmul
    assert moe_plugin.grouped_mm_runs("cpu", torch.float32) == hasattr(torch, "_grouped_mm")


def test_a_compiled_moe_matches_eager_forward_and_backward(registry, one_thread):
    """torch.compile traces grouped_matmul without its probe (Dynamo ignores the lru_cache,
    and the fake _grouped_mm rejects fp32): compiled, it takes the padded bmm."""
    from hybridlab.core.interfaces import Aux

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = MoE(MoEConfig(**{**MOE, "experts": 4, "hidden": 8}), Dims(d_model=16, vocab_size=5, n_layers=1))
    module.registry = registry
    module.init_weights(0.1)
    x = torch.randn(2, 6, 16)

    def run(fn):
        aux = Aux()
        y = fn(x, aux=aux)
        grads = torch.autograd.grad(y.square().sum() + sum(aux.losses.values()), list(module.parameters()))
        return y, aux.losses, grads

    moe_plugin.grouped_mm_runs.cache_clear()  # as in a fresh process: the first forward is compiled
    cy, closses, cgrads = run(torch.compile(module, backend="aot_eager"))
    y, losses, grads = run(module)
    torch.testing.assert_close(cy, y)
    torch.testing.assert_close(closses, losses)
    for c, g in zip(cgrads, grads):
        torch.testing.assert_close(c, g)
    torch._dynamo.reset()


# ---------------------------------------------------------------- the module and the model


def block(ffn, **layer):
    return {"mixer": {"kind": "attention", "heads": 2}, "ffn": ffn, **layer}


MOE = {"kind": "moe", "experts": 6, "top_k": 2, "hidden": 16, "shared_experts": 1, "z_loss": 1e-3}


def model_spec(registry, ffn=MOE, **changes):
    return ModelSpec.model_validate({"name": "moe", "vocab_size": 37, "d_model": 32,
                                     "layers": [block(ffn), block({"kind": "swiglu", "hidden": 24}), block(ffn)],
                                     **changes}, context={"registry": registry})


def test_aux_losses_and_router_metrics_arrive_in_the_model_output(registry):
    torch.manual_seed(0)
    model = Model(model_spec(registry), registry)
    out = model(torch.randint(0, 37, (3, 20)))
    assert set(out.aux_losses) == {f"layers.{i}.moe.{name}" for i in (0, 2) for name in ("balance_loss", "z_loss")}
    loads = [out.metrics[f"layers.0.moe.load.{e}"] for e in range(6)]
    assert float(sum(loads)) == pytest.approx(1.0) and all(0 <= float(v) <= 1 for v in loads)
    ratio = out.metrics["layers.0.moe.load_max_over_mean"]
    assert float(ratio) == pytest.approx(max(float(v) for v in loads) * 6) and float(ratio) >= 1
    # uniform routing gives balance loss == aux_weight; any routing gives at least ~that
    assert out.aux_losses["layers.0.moe.balance_loss"].item() >= 0.01 * 0.9
    # the balance loss reaches the router through its probabilities
    out.aux_losses["layers.0.moe.balance_loss"].backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0
    # nothing is kept on the module for later: a second forward starts from scratch
    assert not any(isinstance(v, torch.Tensor) for v in vars(model.blocks[0].ffn).values())
    assert set(model(torch.randint(0, 37, (1, 5))).aux_losses) == set(out.aux_losses)


def test_balance_none_and_bias_add_no_balance_loss(registry):
    for balance in ("none", "bias"):
        model = Model(model_spec(registry, {**MOE, "balance": balance, "z_loss": 0.0}), registry)
        assert model(torch.randint(0, 37, (2, 7))).aux_losses == {}


def test_config_errors_say_which_fields_conflict():
    with pytest.raises(ValidationError, match=r"top_k \(5\) must be at most experts \(4\)"):
        MoEConfig(experts=4, top_k=5)
    with pytest.raises(ValidationError, match="bias_rate applies to balance: bias"):
        MoEConfig(experts=4, bias_rate=0.1)
    with pytest.raises(ValidationError, match="aux_weight applies to balance: aux_loss"):
        MoEConfig(experts=4, balance="bias", aux_weight=0.1)


def test_decoding_from_state_equals_the_parallel_forward(registry):
    for ffn in (MOE, {**MOE, "router": "sigmoid", "balance": "bias", "shared_experts": 0}):
        torch.manual_seed(0)
        model = Model(model_spec(registry, ffn), registry).double().eval()
        tokens = torch.randint(0, 37, (2, 17))
        full = model(tokens).logits
        out = model(tokens[:, :5], model.init_state(2))
        logits = [out.logits]
        for t in range(5, 17):
            out = model.step(tokens[:, t], out.state)
            logits.append(out.logits)
        torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-10, atol=1e-10)


def test_model_verification_passes(registry):
    from hybridlab.core.verify import verify_model

    report = verify_model(model_spec(registry, {**MOE, "balance": "bias"}), registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems


# ---------------------------------------------------------------- the loss-free bias update


def biased_moe(rate=0.01):
    torch.manual_seed(0)
    module = MoE(MoEConfig(experts=4, top_k=1, hidden=8, balance="bias", bias_rate=rate, router="sigmoid"),
                 Dims(d_model=16, vocab_size=5, n_layers=1))
    module.init_weights(0.1)
    with torch.no_grad():
        module.router.weight.normal_(0, 0.1)
        module.router.weight[0] += 0.5  # with inputs of mean 0.5: expert 0 overloaded from the start
    return module


def test_the_bias_moves_toward_balance_only_in_training_forwards():
    module = biased_moe()
    x = torch.randn(2, 50, 16) + 0.5
    module.eval()
    module(x)
    with torch.no_grad():
        module.train()(x)
    assert torch.equal(module.expert_bias, torch.zeros(4))  # eval and no_grad never move it
    module.train()
    reference = module.eval()(x)  # the output with the bias before the update
    module.train()
    load = torch.bincount(moe_reference(x.view(-1, 16), module.router.weight, module.gate_up, module.down,
                                        module.expert_bias, top_k=1, score="sigmoid").experts.flatten(), minlength=4)
    y = module(x)
    torch.testing.assert_close(y, reference, rtol=0, atol=0)  # this forward used the old bias
    expected = 0.01 * torch.sign(load.float().mean() - load.float())
    assert torch.equal(module.expert_bias, expected) and module.expert_bias[0] < 0
    assert not module.expert_bias.requires_grad and "expert_bias" in module.state_dict()


def test_the_bias_update_is_identical_for_both_implementations_and_balances_the_load():
    x = torch.randn(4, 64, 16) + 0.5
    runs = {}
    for impl in ("reference", "grouped"):
        module = biased_moe(rate=0.02)
        ratios = []
        with forced({"moe": impl}):
            for _ in range(40):
                routed = moe_reference(x.view(-1, 16), module.router.weight, module.gate_up, module.down,
                                       module.expert_bias, top_k=1, score="sigmoid")
                ratios.append(float(routed.load.max() / routed.load.float().mean()))
                module(x)
        runs[impl] = (module.expert_bias.clone(), ratios)
    assert torch.equal(runs["reference"][0], runs["grouped"][0])
    ratios = runs["grouped"][1]
    assert ratios[0] > 2.0 and ratios[-1] < 1.5, ratios


PIPELINE = {
    "name": "moe-resume",
    "model": {"vocab_size": 32, "d_model": 32,
              "layers": [block({"kind": "moe", "experts": 4, "top_k": 2, "hidden": 16, "balance": "bias",
                                "bias_rate": 0.01})]},
    "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
    "optimizer": {"kind": "adamw", "lr": 3e-3},
    "steps": 8, "batch_size": 4, "log_every": 1, "eval_batches": 1, "checkpoint_every": 4,
    "device": "cpu", "seed": 5,  # a seed whose bias ends non-zero (with 3 the ±0.01 steps cancel)
}


def test_a_resumed_run_continues_the_bias_exactly(registry, tmp_path):
    spec = PipelineSpec.model_validate(PIPELINE, context={"registry": registry})
    whole = Trainer(spec, tmp_path / "whole", registry=registry, progress=False)
    whole.run()
    part = Trainer(spec, tmp_path / "part", registry=registry, progress=False)
    part.run(stop_at=5)  # the last checkpoint is step 4
    resumed = Trainer(spec, tmp_path / "part", registry=registry, resume=True, progress=False)
    resumed.run()
    bias = [m.state_dict()["blocks.0.ffn.expert_bias"] for m in (whole.model, resumed.model)]
    assert torch.equal(*bias) and bias[0].abs().sum() > 0

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["layers.0.moe.load_max_over_mean"]) for r in map(json.loads, lines)
                if "loss" in r and "eval/loss" not in r]

    assert rows("part") == rows("whole") and len(rows("whole")) == 8


def test_a_run_directory_of_every_balance_resumes_and_generates(registry, tmp_path):
    """The run's spec.yaml writes every field (aux_weight and bias_rate both), and
    --resume and generate load it again: the config's checks judge values, not which
    fields were written. (They judged model_fields_set, so no MoE run could resume.)"""
    for balance in ("aux_loss", "bias", "none"):
        config = MoEConfig(experts=4, balance=balance)
        assert MoEConfig.model_validate(config.model_dump(mode="json")) == config
        model = {**PIPELINE["model"], "layers": [block({"kind": "moe", "experts": 4, "hidden": 16,
                                                         "balance": balance})]}
        spec = PipelineSpec.model_validate({**PIPELINE, "model": model, "steps": 4}, context={"registry": registry})
        Trainer(spec, tmp_path / balance, registry=registry, progress=False).run()
        run_dir, _ = train(None, resume=tmp_path / balance, overrides=["steps=6"], progress=False, registry=registry)
        assert ckpt.latest_checkpoint(run_dir).name == "step-000006"
        new, _ = generate(run_dir, "1 2", max_new_tokens=2, registry=registry)
        assert len(new) == 2


def test_summary_shows_total_and_active_parameters(registry, tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"name": "m", "vocab_size": 37, "d_model": 32,
                                "layers": [block({**MOE, "shared_experts": 0}), block({"kind": "swiglu", "hidden": 24})]}))
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    model = Model(ModelSpec.model_validate(json.loads(path.read_text()), context={"registry": registry}), registry)
    total = count_parameters(model)
    inactive = (6 - 2) * (32 * 32 + 16 * 32)  # 4 unchosen experts: gate_up [32, 2·16] + down [16, 32]
    assert f"total parameters: {total:,}" in out
    assert f"active parameters per token: {total - inactive:,}" in out
