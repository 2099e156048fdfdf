"""Optimizers: muon's split between torch.optim.Muon and AdamW, parameter groups (name
globs, categories, first match wins, a group that selects nothing), and μP's lr factors."""

import json

import pytest
import torch
from pydantic import ValidationError

from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.model import Model
from hybridlab.core.mup import parameter_roles
from hybridlab.core.spec import ModelSpec, PipelineSpec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.plugins.optimizer.adamw import AdamWConfig, build_adamw
from hybridlab.plugins.optimizer.muon import MuonConfig, build_muon

MODEL = {"vocab_size": 32, "d_model": 32,
         "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 48}},
                    {"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 48}}],
         "head": {"kind": "lm", "tied": False}}
# attention only: the fast one on the CPU, for the tests that take steps
ATTENTION = [{"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 48}}] * 2


def model(registry, **changes):
    return Model(ModelSpec.model_validate({**MODEL, **changes}, context={"registry": registry}), registry)


def lr_of(opt, param):
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


def cross_entropy(m, tokens):
    logits = m(tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def test_muon_takes_the_hidden_linear_weights_and_adamw_the_rest(registry):
    m = model(registry)
    opt = build_muon(MuonConfig(), m.named_parameters(), parameter_roles(m))
    linear = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    for name, p in m.named_parameters():
        group = lr_of(opt, p)
        hidden = name in linear and not name.startswith(("embedding.", "head."))
        assert group["algorithm"] == ("muon" if hidden else "adamw"), name
        if group["algorithm"] == "adamw":
            assert group["lr"] == MuonConfig().adamw_lr
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
    names = {n for n, p in m.named_parameters() if lr_of(opt, p)["algorithm"] == "adamw"}
    assert {"embedding.table.weight", "head.weight", "norm.weight", "blocks.0.mixer.A_log",
            "blocks.0.mixer.conv.weight"} <= names


def test_muon_steps_lower_the_loss_of_a_fixed_batch(registry):
    m = model(registry, layers=ATTENTION)
    opt = build_muon(MuonConfig(lr=0.02, adamw_lr=3e-3), m.named_parameters(), parameter_roles(m))
    tokens = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    first = cross_entropy(m, tokens).item()
    for _ in range(10):
        cross_entropy(m, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # a fixed batch of 64 tokens is memorised quickly: 10 steps take well over 10% off
    # (an optimizer that skipped the matrices, or stepped uphill, would not)
    assert cross_entropy(m, tokens).item() < 0.9 * first


def test_muon_state_round_trips_through_state_dict(registry):
    tokens = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))

    def steps(m, opt, n):
        for _ in range(n):
            cross_entropy(m, tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    a = model(registry, layers=ATTENTION)
    opt_a = build_muon(MuonConfig(), a.named_parameters(), parameter_roles(a))
    steps(a, opt_a, 2)
    torch.manual_seed(0)
    b = model(registry, layers=ATTENTION)
    opt_b = build_muon(MuonConfig(), b.named_parameters(), parameter_roles(b))
    steps(b, opt_b, 2)
    saved = opt_b.state_dict()
    opt_b = build_muon(MuonConfig(), b.named_parameters(), parameter_roles(b))  # fresh, then loaded
    opt_b.load_state_dict(saved)
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # the momenta came back: the same arithmetic on the CPU


def test_groups_by_pattern_and_category_first_match_wins(registry):
    m = model(registry)
    config = AdamWConfig(lr=1e-3, groups=[{"match": "*.norm*.weight", "weight_decay": 0.05},
                                          {"category": "attention", "lr": 5e-4, "betas": (0.8, 0.9)},
                                          {"category": "recurrent", "lr_scale": 2.0}])
    opt = build_adamw(config, m.named_parameters(), parameter_roles(m))
    params = dict(m.named_parameters())
    # the norm inside the gated_deltanet mixer is taken by the first group, not the third
    for name in ("blocks.0.mixer.norm.weight", "blocks.1.mixer_place.norm.weight"):
        assert lr_of(opt, params[name])["weight_decay"] == 0.05 and lr_of(opt, params[name])["lr"] == 1e-3, name
    assert lr_of(opt, params["norm.weight"])["weight_decay"] == 0.0  # no dot before it: the base's
    attention = lr_of(opt, params["blocks.1.mixer.q.weight"])
    assert (attention["lr"], attention["betas"], attention["weight_decay"]) == (5e-4, (0.8, 0.9), 0.1)
    assert lr_of(opt, params["blocks.0.mixer.qkv.weight"])["lr"] == 2e-3
    assert lr_of(opt, params["blocks.0.mixer.A_log"])["weight_decay"] == 0.0  # a vector keeps no decay
    rest = lr_of(opt, params["blocks.0.ffn.down.weight"])
    assert (rest["lr"], rest["betas"], rest["weight_decay"]) == (1e-3, (0.9, 0.95), 0.1)


def test_a_group_that_selects_nothing_is_an_error_naming_it(registry):
    m = model(registry)
    with pytest.raises(HybridlabError, match=r"optimizer\.groups\[0\]: match 'blocks\.9\.\*' selects no parameter"):
        build_adamw(AdamWConfig(groups=[{"match": "blocks.9.*", "lr": 1e-4}]), m.named_parameters(),
                    parameter_roles(m))
    # everything the second group would select was taken by the first
    with pytest.raises(HybridlabError, match=r"optimizer\.groups\[1\]: category 'norm'"):
        build_adamw(AdamWConfig(groups=[{"match": "*norm*"}, {"category": "norm"}]), m.named_parameters(),
                    parameter_roles(m))


def test_a_model_category_without_roles_is_a_clear_error(registry):
    m = model(registry)
    with pytest.raises(HybridlabError, match=r"groups\[0\]: category 'attention' needs the model's parameter roles"):
        build_adamw(AdamWConfig(groups=[{"category": "attention"}]), m.named_parameters())
    # name-only categories work without the model's roles
    opt = build_adamw(AdamWConfig(groups=[{"category": "norm", "lr": 2e-3}]), m.named_parameters())
    assert lr_of(opt, dict(m.named_parameters())["norm.weight"])["lr"] == 2e-3


def test_bad_groups_are_located_validation_errors(registry, tmp_path):
    with pytest.raises(ValidationError, match="unknown category 'atention'"):
        AdamWConfig(groups=[{"category": "atention"}])
    with pytest.raises(ValidationError, match="needs 'match'"):
        AdamWConfig(groups=[{"lr": 1e-3}])
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"model": MODEL, "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
                                "optimizer": {"kind": "muon", "groups": [{"category": "atention"}]}}))
    with pytest.raises(SpecError, match=r"optimizer\.groups\[0\]\.category"):
        load_pipeline(path, registry=registry)


def test_adamw_without_groups_keeps_its_two_groups(registry):
    m = model(registry)
    opt = build_adamw(AdamWConfig(lr=1e-3, weight_decay=0.1), m.named_parameters())
    assert [(g["weight_decay"], g["lr"]) for g in opt.param_groups] == [(0.1, 1e-3), (0.0, 1e-3)]
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"])


def test_mup_scales_the_adam_lr_of_hidden_matrices_only(registry):
    m = model(registry, d_model=64, parametrization="mup", base_width=32)
    opt = build_adamw(AdamWConfig(lr=1e-3), m.named_parameters(), parameter_roles(m))
    params = dict(m.named_parameters())
    assert lr_of(opt, params["blocks.1.mixer.q.weight"])["lr"] == pytest.approx(1e-3 * 32 / 64)
    for name in ("embedding.table.weight", "head.weight", "norm.weight", "blocks.0.ffn.down.weight"):
        assert lr_of(opt, params[name])["lr"] == 1e-3, name  # input-like / vector-like: standard
    muon = build_muon(MuonConfig(), m.named_parameters(), parameter_roles(m))
    assert lr_of(muon, params["blocks.1.mixer.q.weight"])["lr"] == MuonConfig().lr  # Muon's own scaling


PIPELINE = {"name": "t", "model": {**MODEL, "layers": ATTENTION}, "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
            "optimizer": {"kind": "muon", "groups": [{"match": "blocks.1.*", "lr_scale": 0.5}]},
            "schedule": {"kind": "wsd", "warmup": 1, "decay": 0.5, "shape": "cosine"},
            "steps": 4, "batch_size": 4, "log_every": 1, "eval_batches": 1, "checkpoint_every": 2,
            "device": "cpu", "seed": 3}


def test_muon_and_wsd_train_and_resume_exactly(registry, tmp_path):
    spec = PipelineSpec.model_validate(PIPELINE, context={"registry": registry})
    whole = Trainer(spec, tmp_path / "whole", registry=registry, progress=False)
    whole.run()
    part = Trainer(spec, tmp_path / "part", registry=registry, progress=False)
    part.run(stop_at=2)
    resumed = Trainer(spec, tmp_path / "part", registry=registry, resume=True, progress=False)
    resumed.run()
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_training_selects_groups_by_the_models_categories(registry, tmp_path):
    spec = PipelineSpec.model_validate({**PIPELINE, "optimizer": {"kind": "adamw", "groups": [
        {"category": "attention", "lr": 5e-4}]}}, context={"registry": registry})
    trainer = Trainer(spec, tmp_path / "run", registry=registry, progress=False)
    q = dict(trainer.model.named_parameters())["blocks.0.mixer.q.weight"]
    assert lr_of(trainer.optimizer, q)["peak_lr"] == 5e-4
