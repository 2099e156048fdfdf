"""objective ``diffusion`` with its parts: the ``patch`` embedding and ``unpatchify`` head,
the ``adaln`` norm placement, the ``shapes`` task and ``hybridlab sample``. Targets and
schedules are checked against computations written independently of the plugin (autograd
derivatives, DDPM's discrete betas, a strided convolution)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from hybridlab.core.cli import main
from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.interfaces import ModelOutput, Sampler
from hybridlab.core.model import Model
from hybridlab.core.objectives import ObjectiveRun, ObjectiveSetup
from hybridlab.core.spec import ModelSpec, load_pipeline
from hybridlab.plugins.data.shapes import Shapes, ShapesConfig
from hybridlab.plugins.embedding.patch import patchify, unpatchify
from hybridlab.plugins.loss.diffusion import Diffusion, DiffusionConfig, schedule, target_of, to_x0_eps

SCHEDULES = ("cosine", "linear", "rectified")
TARGETS = ("eps", "v", "flow")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread (see tests/plugins/conftest.py)."""


def model_dict(mixer=None, *, classes=4, image_size=8, patch=2, zero=True, layers=2) -> dict:
    return {"vocab_size": 2, "d_model": 16,
            "embedding": {"kind": "patch", "channels": 1, "image_size": image_size, "patch": patch,
                          "classes": classes},
            "layers": [{"mixer": mixer or {"kind": "attention", "heads": 2, "causal": False},
                        "norm": {"kind": "layernorm"}, "placement": {"kind": "adaln", "zero": zero}}] * layers,
            "norm": {"kind": "layernorm"}, "head": {"kind": "unpatchify", "channels": 1, "patch": patch}}


def build(registry, **kwargs) -> Model:
    return Model(ModelSpec.model_validate(model_dict(**kwargs), context={"registry": registry}), registry)


# ---------------------------------------------------------------- schedules and targets


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_derivatives_match_autograd(name):
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64, requires_grad=True)
    a, s, da, ds = schedule(name, t)
    grad_a, = torch.autograd.grad(a.sum(), t, retain_graph=True)
    grad_s, = torch.autograd.grad(s.sum(), t)
    # float64 throughout: the analytic and autograd derivatives agree to rounding
    torch.testing.assert_close(da, grad_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ds, grad_s, rtol=1e-10, atol=1e-12)


def test_cosine_and_linear_are_variance_preserving_and_rectified_interpolates():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for name in ("cosine", "linear"):
        a, s, _, _ = schedule(name, t)
        torch.testing.assert_close(a * a + s * s, torch.ones_like(t), rtol=0, atol=1e-12)
        assert (a[1:] < a[:-1]).all(), f"{name}: the signal must fall with t"
    a, s, _, _ = schedule("rectified", t)
    assert torch.equal(a, 1 - t) and torch.equal(s, t)
    a, s, _, _ = schedule("cosine", t)
    torch.testing.assert_close(a, torch.tensor([math.cos(math.pi * x / 2) for x in t.tolist()], dtype=torch.float64))


def test_linear_schedule_is_ddpm_linear_betas_in_continuous_time():
    """alpha_bar_i = prod_{j<=i} (1 - beta_j), beta_j = linspace(1e-4, 0.02, 1000), against
    the continuous alpha(t)^2 at t = (i + 1) / 1000."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    steps = torch.tensor([9, 99, 299, 499, 799, 999])
    a, _, _, _ = schedule("linear", (steps + 1).double() / 1000)
    # log(1 - b) = -b - b^2/2 ...: the discrete product falls faster by sum(b^2)/2 <= 0.14 in
    # log at t = 1 (plus the midpoint offset), so compare logs to 0.2 absolute
    torch.testing.assert_close(torch.log(a * a), torch.log(alpha_bar[steps]), rtol=0, atol=0.2)
    assert float(torch.log(alpha_bar[steps[0]])) == pytest.approx(float(torch.log(a[0] ** 2)), abs=2e-3)


@pytest.mark.parametrize("name", SCHEDULES)
def test_targets_against_independent_formulas(name):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 1, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64, requires_grad=True)
    a, s, _, _ = schedule(name, t)
    # flow: the velocity dx_t/dt, by autograd (row i depends on t[i] alone: the Jacobian's diagonal)
    per_pixel = torch.autograd.functional.jacobian(
        lambda tt: (schedule(name, tt)[0].reshape(-1, 1, 1, 1) * x0 + schedule(name, tt)[1].reshape(-1, 1, 1, 1) * eps),
        t.detach())  # [5, 1, 4, 4, 5]
    velocity = torch.stack([per_pixel[i, ..., i] for i in range(5)])
    torch.testing.assert_close(target_of("flow", x0, eps, t.detach(), name), velocity)
    assert torch.equal(target_of("eps", x0, eps, t.detach(), name), eps)
    a, s = (v.detach().reshape(-1, 1, 1, 1) for v in (a, s))
    torch.testing.assert_close(target_of("v", x0, eps, t.detach(), name), a * eps - s * x0)
    if name == "cosine":  # Salimans & Ho: v = dx/dphi with phi = pi t / 2
        torch.testing.assert_close(target_of("v", x0, eps, t.detach(), name), velocity / (math.pi / 2))
    if name == "rectified":
        torch.testing.assert_close(target_of("flow", x0, eps, t.detach(), name), eps - x0)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_target_determines_x0_and_eps(name, target):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(4, 2, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    t = torch.tensor([0.01, 0.2, 0.6, 0.99], dtype=torch.float64)
    a, s, _, _ = schedule(name, t)
    xt = a.reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * eps
    x0_hat, eps_hat = to_x0_eps(target, target_of(target, x0, eps, t, name), xt, t, name)
    # float64; the eps target divides by alpha, 0.0157 at t = 0.99 on the cosine schedule
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_schedule_defaults_per_target():
    assert DiffusionConfig(target="eps").schedule_name() == "cosine"
    assert DiffusionConfig(target="v").schedule_name() == "cosine"
    assert DiffusionConfig(target="flow").schedule_name() == "rectified"
    assert DiffusionConfig(target="flow", schedule="cosine").schedule_name() == "cosine"


# ---------------------------------------------------------------- patches, adaln, the model


def test_patchify_round_trips_and_embedding_is_a_strided_convolution(registry):
    x = torch.randn(3, 2, 12, 8)
    tokens = patchify(x, 4)
    assert tokens.shape == (3, 6, 32)
    assert torch.equal(unpatchify(tokens, 4, 2, 12, 8), x)
    assert torch.equal(tokens[1, 4], x[1, :, 8:12, 0:4].permute(1, 2, 0).reshape(-1))  # patch (row 2, col 0)
    model = build(registry, image_size=8, patch=2)
    emb = model.embedding
    image = torch.randn(2, 1, 8, 8)
    weight = emb.proj.weight.reshape(16, 2, 2, 1).permute(0, 3, 1, 2)  # [D, C, p, p]
    conv = F.conv2d(image, weight, emb.proj.bias, stride=2).flatten(2).transpose(1, 2)  # [B, N, D]
    torch.testing.assert_close(emb(image), conv + emb.pos, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes images"):
        emb(torch.randn(2, 1, 6, 6))


def test_adaln_zero_starts_as_identity_and_is_conditioned(registry):
    model = build(registry, classes=4)
    x = torch.randn(3, 1, 8, 8)
    cond = {"t": torch.tensor([0.1, 0.5, 0.9]), "labels": torch.tensor([0, 1, 4])}
    h = model.embedding(x)
    kept = model(x, condition=cond, hidden=(0, 1)).hidden
    torch.testing.assert_close(kept[1], h)  # every gate alpha(c) is 0 at init
    with torch.no_grad():
        for block in model.blocks:
            for place in (block.mixer_place, block.ffn_place):
                place.modulation.weight.normal_(0, 0.3)
    out = model(x, condition=cond, hidden=("final",))
    other = model(x, condition={"t": cond["t"], "labels": torch.tensor([2, 3, 0])}, hidden=("final",))
    assert out.logits.shape == (3, 1, 8, 8)  # the zero-initialised head: zeros until trained
    assert not torch.allclose(out.hidden["final"], other.hidden["final"]), "the label must change the prediction"
    with pytest.raises(HybridlabError, match="adaln.*needs a condition"):
        model(x)


def test_adaln_without_zero_has_no_gate(registry):
    model = build(registry, zero=False)
    assert model.blocks[0].mixer_place.modulation.out_features == 2 * 16
    x = torch.randn(2, 1, 8, 8)
    y = model(x, condition={"t": torch.rand(2), "labels": torch.tensor([0, 1])}).logits
    assert y.shape == (2, 1, 8, 8)


def test_a_token_model_refuses_a_condition(registry):
    spec = ModelSpec.model_validate({"vocab_size": 8, "d_model": 16, "layers": [{"mixer": {"kind": "attention",
                                                                                          "heads": 2}}]},
                                    context={"registry": registry})
    with pytest.raises(HybridlabError, match="does not take one"):
        Model(spec, registry)(torch.zeros(1, 3, dtype=torch.long), condition={"t": torch.zeros(1)})


@pytest.mark.parametrize("mixer", [{"kind": "gated_deltanet", "heads": 2}, {"kind": "mamba2", "heads": 2},
                                   {"kind": "attention", "heads": 2, "causal": False}])
def test_any_mixer_denoises_with_gradients(registry, mixer):
    model = build(registry, mixer=mixer)
    with torch.no_grad():  # past the zero init, so every parameter gets a gradient
        for p in model.head.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 1, 8, 8)
    y = model(x, condition={"t": torch.rand(2), "labels": torch.tensor([1, 4])}).logits
    y.pow(2).mean().backward()
    assert y.shape == x.shape
    assert model.embedding.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the objective: dropout, eval grid, CFG


def objective_run(model, batch, *, training, seen):
    def forward(x, condition=None, **kwargs):
        seen.append(condition)
        return model(x, condition=condition)

    return ObjectiveRun(batch, None, model, forward, {}, None, 0, 1, training)


def test_label_dropout_rate_and_none_in_evaluation(registry):
    model = build(registry, classes=4)
    setup = ObjectiveSetup(model.spec.dims(registry=registry), model.spec, {})
    objective = Diffusion(DiffusionConfig(label_dropout=0.5), setup)
    B = 2000
    batch = {"inputs": torch.zeros(B, 1, 8, 8), "labels": torch.randint(0, 4, (B,))}
    seen = []
    with torch.no_grad():
        loss, metrics = objective(objective_run(model, batch, training=True, seen=seen))
    dropped = (seen[0]["labels"] == 4).float().mean()
    assert 0.45 < float(dropped) < 0.55  # binomial sd 0.011: 4.5 sd either side
    kept = seen[0]["labels"] != 4
    assert torch.equal(seen[0]["labels"][kept], batch["labels"][kept])
    seen.clear()
    with torch.no_grad():
        objective(objective_run(model, batch, training=False, seen=seen))
    assert torch.equal(seen[0]["labels"], batch["labels"])
    t = seen[0]["t"]
    assert torch.allclose(t, 1e-3 + (1 - 2e-3) * (torch.arange(B) + 0.5) / B)  # the fixed evaluation grid
    assert set(metrics) == {"x0_mse"} and loss.dim() == 0


def test_loss_is_mse_to_the_target(registry):
    """A model that predicts exactly eps has zero eps loss (the zero-initialised head predicts 0: loss = E[eps^2])."""
    model = build(registry, classes=4)
    setup = ObjectiveSetup(model.spec.dims(registry=registry), model.spec, {})
    objective = Diffusion(DiffusionConfig(target="eps", label_dropout=0.0), setup)
    batch = {"inputs": torch.zeros(512, 1, 8, 8), "labels": torch.zeros(512, dtype=torch.long)}
    gen = torch.Generator().manual_seed(5)
    run = ObjectiveRun(batch, None, model, lambda x, condition=None: model(x, condition=condition), {}, None, 0, 1,
                       True, generator=gen)
    with torch.no_grad():
        loss, _ = objective(run)
    assert float(loss) == pytest.approx(1.0, abs=0.02)  # E[eps^2] = 1 over 32768 draws (sd 0.008)


class Recorder(torch.nn.Module):
    """A stand-in denoiser: its prediction is a fixed function of (x, t, label)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, condition=None):
        label = condition["labels"].float().reshape(-1, 1, 1, 1)
        return ModelOutput(0.5 * x + 0.1 * label + condition["t"].reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("target", TARGETS)
def test_guidance_mixes_the_null_prediction(registry, target):
    spec = ModelSpec.model_validate(model_dict(classes=4), context={"registry": registry})
    setup = ObjectiveSetup(spec.dims(registry=registry), spec, {})
    objective = Diffusion(DiffusionConfig(target=target), setup)
    assert isinstance(objective, Sampler) and objective.guided
    fake, labels, w = Recorder(spec), torch.tensor([0, 3]), 3.0
    x = objective.sample(fake, labels, count=2, steps=1, guidance=w, generator=torch.Generator().manual_seed(2))
    # by hand: one step from t = 1 - 1e-3 to 0 with the guided prediction
    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 1 - 1e-3)
    cond = 0.5 * x1 + 0.1 * labels.float().reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)
    null = 0.5 * x1 + 0.1 * 4 + t.reshape(-1, 1, 1, 1)
    x0, _ = to_x0_eps(target, null + w * (cond - null), x1, t, objective.schedule_name)
    torch.testing.assert_close(x, x0.clamp(-1, 1))


class Oracle(torch.nn.Module):
    """The ideal denoiser of a data set holding one image x*: from x_t it knows
    eps = (x_t − alpha x*) / sigma, and returns the target that implies."""

    def __init__(self, spec, image, target, schedule_name):
        super().__init__()
        self.spec, self.image, self.target, self.schedule_name = spec, image, target, schedule_name
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, condition=None):
        t = condition["t"]
        a, s, _, _ = (v.reshape(-1, 1, 1, 1) for v in schedule(self.schedule_name, t))
        x0 = self.image.expand_as(x)
        return ModelOutput(target_of(self.target, x0, (x - a * x0) / s, t, self.schedule_name))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("target", TARGETS)
def test_the_sampler_lands_on_the_data_with_an_ideal_denoiser(registry, name, target):
    spec = ModelSpec.model_validate(model_dict(classes=0), context={"registry": registry})
    setup = ObjectiveSetup(spec.dims(registry=registry), spec, {})
    objective = Diffusion(DiffusionConfig(target=target, schedule=name, label_dropout=0.0), setup)
    image = torch.rand(1, 1, 8, 8) * 1.6 - 0.8  # inside [-1, 1]: clipping changes nothing
    out = objective.sample(Oracle(spec, image, target, name), None, count=3, steps=7, guidance=1.0,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, image.expand(3, -1, -1, -1), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- the task


def test_shapes_are_deterministic_and_labelled():
    task = Shapes(ShapesConfig(image_size=16, classes=5), seed=3)
    a, b = task.batch("train", 4, 64), task.batch("train", 4, 64)
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["inputs"], task.batch("train", 5, 64)["inputs"])
    assert not torch.equal(a["inputs"], task.batch("eval", 4, 64)["inputs"])
    assert a["inputs"].shape == (64, 1, 16, 16) and set(a["inputs"].unique().tolist()) == {-1.0, 1.0}
    assert set(a["labels"].tolist()) == set(range(5))
    # a ring has a hole at its centre, a disk does not
    big = task.batch("train", 0, 400)
    centre = big["inputs"][:, 0]
    area = (centre > 0).float().mean((1, 2))
    ring, disk = area[big["labels"] == 4].mean(), area[big["labels"] == 1].mean()
    assert ring < disk
    with pytest.raises(KeyError, match="splits"):
        task.batch("len64", 0, 2)


# ---------------------------------------------------------------- validate errors


PIPELINE = """name: p
model: {model}
data: {data}
objectives:
  - {objective}
steps: 2
batch_size: 4
eval_batches: 1
checkpoint_every: 2
eval_every: 2
device: cpu
"""
SHAPES = json.dumps({"kind": "shapes", "image_size": 8, "classes": 4})


def problems(tmp_path, registry, *, model=None, data=SHAPES, objective='{kind: diffusion}'):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(model=json.dumps(model or model_dict()), data=data, objective=objective))
    with pytest.raises(SpecError) as info:
        load_pipeline(path, registry=registry)
    return "\n".join(str(p) for p in info.value.problems)


def test_validate_errors_are_located(tmp_path, registry):
    text = problems(tmp_path, registry, model=model_dict(image_size=10, patch=4))
    assert "model.embedding.patch" in text and "image_size (10) must be divisible by patch (4)" in text
    text = problems(tmp_path, registry, model={"vocab_size": 16, "d_model": 16,
                                               "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
                    data='{kind: mqar, vocab: 16, pairs: 2}')
    assert "objectives[0].kind" in text and "yields token ids" in text
    text = problems(tmp_path, registry, objective="{kind: cross_entropy}")
    assert "objectives[0].kind" in text and "targets" in text
    text = problems(tmp_path, registry, model={**model_dict(), "head": {"kind": "lm", "tied": False}})
    assert "objectives[0].kind" in text and "model.head is 'lm'" in text
    text = problems(tmp_path, registry, model={**model_dict(), "head": {"kind": "unpatchify", "patch": 4}})
    assert "model.head" in text and "must match embedding 'patch' (channels 1, patch 2)" in text
    text = problems(tmp_path, registry, model=model_dict(classes=3))
    assert "classes is 3 but task 'shapes' has 4" in text
    text = problems(tmp_path, registry, model=model_dict(classes=0))
    assert "objectives[0].label_dropout" in text and "unconditional" in text
    text = problems(tmp_path, registry, data=json.dumps({"kind": "shapes", "image_size": 16, "classes": 4}))
    assert "takes images [1, 8, 8]" in text
    text = problems(tmp_path, registry, model=model_dict(mixer={"kind": "gated_deltanet", "heads": 2,
                                                                "causal": False}))
    assert "layers[0].mixer.causal" in text and "unknown field" in text
    text = problems(tmp_path, registry, objective="{kind: diffusion, target: x0}")
    assert "objectives[0].target" in text


def model_problems(tmp_path, registry, model: dict) -> str:
    """The located problems of a model spec file (YAML written from ``model``)."""
    from hybridlab.core.spec import load_model_spec

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(model, sort_keys=False))
    with pytest.raises(SpecError) as info:
        load_model_spec(path, registry=registry)
    return "\n".join(str(p) for p in info.value.problems)


def test_a_tied_lm_head_after_a_patch_embedding_is_a_model_spec_error(tmp_path, registry):
    # was: validated, then Model() raised AttributeError (the patch embedding has no token table)
    model = {**model_dict(), "head": {"kind": "lm"}}
    with pytest.raises(ValueError, match="embedding 'patch' reads images and has none"):
        ModelSpec.model_validate(model, context={"registry": registry})
    text = model_problems(tmp_path, registry, model)
    assert "m.yaml:" in text and " head:" in text and "set tied: false" in text
    del model["head"]  # the default head is a tied lm
    assert "embedding 'patch' reads images" in model_problems(tmp_path, registry, model)
    untied = ModelSpec.model_validate({**model, "head": {"kind": "lm", "tied": False}}, context={"registry": registry})
    logits = Model(untied, registry)(torch.zeros(2, 1, 8, 8), condition={"t": torch.full((2,), 0.5),
                                                                          "labels": torch.zeros(2, dtype=torch.long)})
    assert logits.logits.shape == (2, 16, 2)  # per-patch logits: a model spec may do this; a token task may not


@pytest.mark.parametrize("head, message", [
    ({"kind": "unpatchify", "channels": 3, "patch": 2}, ("unpatchify (channels 3, patch 2) must match embedding "
                                                         "'patch' (channels 1, patch 2)")),
    ({"kind": "unpatchify", "channels": 1, "patch": 4}, "unpatchify (channels 1, patch 4) must match"),
])
def test_head_and_embedding_mismatch_is_a_model_spec_error(tmp_path, registry, head, message):
    # was: accepted unless a diffusion pipeline checked it; verify then passed (channels, by
    # broadcasting) or failed on a raw size error (patch)
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelSpec.model_validate({**model_dict(), "head": head}, context={"registry": registry})
    text = model_problems(tmp_path, registry, {**model_dict(), "head": head})
    assert " head:" in text and message in text


def test_an_image_head_after_a_token_embedding_is_a_model_spec_error(tmp_path, registry):
    model = {"vocab_size": 16, "d_model": 16, "layers": [{"mixer": {"kind": "attention", "heads": 2}}],
             "head": {"kind": "unpatchify", "channels": 1, "patch": 2}}
    text = model_problems(tmp_path, registry, model)
    assert " head:" in text and "embedding 'token' reads token ids" in text


def test_verify_refuses_an_output_shape_other_than_the_input(registry):
    """A spec built past validation (model_copy does not validate) with a 3-channel head on
    a 1-channel embedding: verify's MSE against the input must not broadcast."""
    from hybridlab.core.verify_model import verify_model
    from hybridlab.plugins.head.unpatchify import UnpatchifyConfig

    spec = ModelSpec.model_validate(model_dict(layers=1), context={"registry": registry})
    bad = spec.model_copy(update={"head": UnpatchifyConfig(channels=3, patch=2)})
    report = verify_model(bad, registry=registry)
    assert not report.passed
    text = " ".join(str(c) for c in report.failures())
    assert "head 'unpatchify' returns images [2, 3, 8, 8], but embedding 'patch' reads [2, 1, 8, 8]" in text


TOKEN_TASK = "{kind: mqar, vocab: 16, pairs: 2}"


@pytest.mark.parametrize("head", [{"kind": "lm"}, {"kind": "lm", "tied": False}])
@pytest.mark.parametrize("objective", ["{kind: cross_entropy}", "{kind: diffusion}"])
def test_a_token_task_with_an_image_embedding_is_a_validate_error(tmp_path, registry, head, objective):
    # was (cross_entropy): validate OK, then train died with AttributeError (tied) or the
    # embedding's "takes images" ValueError (untied)
    model = {**model_dict(classes=0), "vocab_size": 16, "head": head}
    text = problems(tmp_path, registry, model=model, data=TOKEN_TASK, objective=objective)
    if head.get("tied", True):
        assert "model.head" in text and "embedding 'patch' reads images and has none" in text
    else:
        assert "model.embedding.kind" in text and "embedding 'patch' reads images, but task 'mqar' yields token ids" \
            in text


def test_an_image_task_or_image_model_with_a_token_objective_is_a_validate_error(tmp_path, registry):
    text = problems(tmp_path, registry, objective="{kind: cross_entropy}")  # image model, image task
    assert "objectives[0].kind: objective 'cross_entropy' trains on token ids, but model.embedding is 'patch', " \
        "model.head is 'unpatchify' (images)" in text
    token_model = {"vocab_size": 16, "d_model": 16, "layers": [{"mixer": {"kind": "attention", "heads": 2}}]}
    text = problems(tmp_path, registry, model=token_model, objective="{kind: cross_entropy}")  # token model, images
    assert "model.embedding.kind" in text and "embedding 'token' reads token ids, but task 'shapes' yields images" \
        in text


def test_the_condition_is_checked_against_the_model(registry):
    model = build(registry, classes=4, layers=1)
    x, t = torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5)
    model(x, condition={"t": t, "labels": torch.tensor([4, 0])})  # 4: the null label
    with pytest.raises(ValueError, match=re.escape("condition labels [5, 7] are outside the model's 4 classes")):
        model(x, condition={"t": t, "labels": torch.tensor([5, 7])})
    with pytest.raises(ValueError, match=re.escape("the condition (labels [3], t [3]) is for a batch of 3, but the "
                                                   "input has 2 rows")):
        model(x, condition={"t": torch.full((3,), 0.5), "labels": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match=re.escape("'labels' [2] and 't' [3] must both be [B]")):
        model(x, condition={"t": torch.full((3,), 0.5), "labels": torch.zeros(2, dtype=torch.long)})


def test_sample_run_refuses_an_empty_label_list(runs):
    from hybridlab.core.sample import sample_run

    with pytest.raises(HybridlabError, match="--labels is empty"):
        sample_run(runs["guided"], count=2, steps=1, labels=[])


def test_a_recurrent_denoiser_validates(tmp_path, registry):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(model=json.dumps(model_dict(mixer={"kind": "mamba2", "heads": 2})), data=SHAPES,
                                    objective="{kind: diffusion, target: flow}"))
    spec = load_pipeline(path, registry=registry)
    assert spec.objectives[0].schedule_name() == "rectified"


# ---------------------------------------------------------------- training and hybridlab sample


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step runs: conditional with label dropout, and with label_dropout 0."""
    root = tmp_path_factory.mktemp("diffusion")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, dropout in (("guided", 0.1), ("plain", 0.0)):
            path = root / f"{name}.yaml"
            path.write_text(PIPELINE.format(model=json.dumps(model_dict()), data=SHAPES,
                                            objective=f"{{kind: diffusion, target: v, label_dropout: {dropout}}}"))
            assert main(["train", str(path), "--out", str(root / name), "--quiet"]) == 0
            out[name] = root / name
    finally:
        torch.set_num_threads(threads)
    return out


def test_sample_writes_npy_and_png(runs, tmp_path, capsys):
    npy = tmp_path / "s.npy"
    assert main(["sample", str(runs["guided"]), "--count", "5", "--steps", "3", "--guidance", "2",
                 "--labels", "1,3", "--out", str(npy)]) == 0
    images = np.load(npy)
    assert images.shape == (5, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert "labels 1,3,1,3,1" in capsys.readouterr().out
    again = tmp_path / "again.npy"
    assert main(["sample", str(runs["guided"]), "--count", "5", "--steps", "3", "--guidance", "2",
                 "--labels", "1,3", "--out", str(again)]) == 0
    assert np.array_equal(np.load(again), images)  # the seed fixes the noise
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    assert main(["sample", str(runs["guided"]), "--count", "4", "--steps", "2", "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--labels", "9"], "not classes of this model (0..3)"),
    (["--labels", "a,b"], "comma-separated class ids"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--count", "0"], "--count must be in 1..1024"),
    (["--count", "1025"], "--count must be in 1..1024"),
    (["--labels", ""], "comma-separated class ids (0,2,3), got ''"),  # was: every class in turn
    (["--labels", "1,,2"], "comma-separated class ids"),
    (["--out", "x.jpg"], "write a .png"),
    (["--out", "/no/such/dir/x.npy"], "does not exist"),
    (["--guidance", "nan"], "finite"),
])
def test_sample_bad_input_exits_2(runs, capsys, args, message):
    assert main(["sample", str(runs["guided"]), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_guidance_needs_label_dropout(runs, capsys, tmp_path):
    assert main(["sample", str(runs["plain"]), "--guidance", "2", "--out", str(tmp_path / "x.npy")]) == 2
    assert "label_dropout 0" in capsys.readouterr().err
    assert main(["sample", str(runs["plain"]), "--count", "2", "--steps", "1", "--out", str(tmp_path / "x.npy")]) == 0


def test_sample_needs_a_run_with_a_sampler(tmp_path, capsys):
    assert main(["sample", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    path = tmp_path / "tokens.yaml"
    path.write_text(PIPELINE.format(model=json.dumps({"vocab_size": 16, "d_model": 16, "layers": [
        {"mixer": {"kind": "attention", "heads": 2}}]}), data="{kind: mqar, vocab: 16, pairs: 2}",
        objective="{kind: cross_entropy}"))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs a run trained with a sampling objective (diffusion)" in err and "cross_entropy" in err


def test_verify_spec_checks_an_image_model(registry):
    from hybridlab.core.verify_model import verify_model

    spec = ModelSpec.model_validate(model_dict(mixer={"kind": "gated_deltanet", "heads": 2}, layers=1),
                                    context={"registry": registry})
    report = verify_model(spec, registry=registry)
    assert report.passed and report.checks, [str(c) for c in report.failures()]
    assert any("reads images whole" in note for note in report.notes)
    assert {c.case for c in report.checks} == {"B2 1x8x8"}


def test_generate_refuses_an_image_model(runs, capsys):
    assert main(["generate", str(runs["guided"]), "--prompt", "1"]) == 2
    assert "hybridlab sample" in capsys.readouterr().err
