"""Lipschitz-constrained blocks (issue 20): the 1-Lipschitz MLP, the convex residual, no
norm, and `hybridlab lipschitz` (declared bounds composed from the parts, measured σ_max
of each block's Jacobian, a wrong declaration caught)."""

import types
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from hybridlab.core.cli import main
from hybridlab.core.config import Config, Dims
from hybridlab.core.lipschitz import declared_bounds, largest_singular_value, lipschitz_report
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec
from hybridlab.plugins.ffn.lipschitz_mlp import LipschitzMLP, LipschitzMLPConfig, spectral_normalized
from hybridlab.registry import default_registry, hookimpl
from hybridlab.registry.manager import load_registry

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"


def test_spectral_normalization_caps_sigma_at_one_and_keeps_small_weights():
    big, small = torch.randn(12, 7) * 5, torch.randn(12, 7) * 0.01
    assert torch.linalg.matrix_norm(spectral_normalized(big), 2) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(spectral_normalized(small), small)


def test_lipschitz_mlp_is_one_lipschitz_even_with_large_weights():
    """Random pairs of inputs: |f(x) - f(y)| <= |x - y| (relu), with weights scaled far
    outside the unit ball; its Jacobian's σ_max measured below its declared bound."""
    dims = Dims(d_model=8, vocab_size=11, n_layers=1, registry=default_registry())
    mlp = LipschitzMLP(LipschitzMLPConfig(hidden=16), dims)
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(50)
    x, y = torch.randn(2, 200, 8, dtype=torch.float64).unbind(0)
    mlp = mlp.double()
    ratio = (mlp(x) - mlp(y)).norm(dim=-1) / (x - y).norm(dim=-1)
    assert ratio.max() <= 1 + 1e-9
    assert mlp.lipschitz(1.0) == pytest.approx(1.0, rel=1e-6)  # both weights at σ = 1
    sigma = largest_singular_value(mlp, torch.randn(1, 5, 8, dtype=torch.float64), iterations=30,
                                   generator=torch.Generator().manual_seed(0))
    assert 0.1 < sigma <= 1 + 1e-4


def test_convex_residual_and_no_norm_compose_the_ffn_bound():
    spec = load_model_spec(SPECS / "lipschitz-tiny.yaml")
    model = Model(spec, default_registry())
    block = model.blocks[0]
    bounds, reasons = declared_bounds(block)
    alpha = block.ffn_residual.alpha
    assert alpha == pytest.approx(1 / 4)  # 2 blocks: 4 sub-layers
    assert bounds["ffn"] == pytest.approx((1 - alpha) + alpha * block.ffn.lipschitz(1.0))
    assert bounds["mixer"] is None and "Attention declares no bound" in reasons["mixer"]
    h = torch.randn(2, 5, 64)
    out = block.ffn_residual(h, lambda x: torch.zeros_like(x))
    torch.testing.assert_close(out, (1 - alpha) * h)


class ScaleConfig(Config):
    kind: Literal["scale"] = "scale"
    factor: float = 2.0
    claim: float = 2.0
    """What the mixer declares (a planted bug when it differs from factor)."""


class Scale(nn.Module):
    """y = factor · x (no state): Lipschitz constant exactly |factor|."""

    def __init__(self, config: ScaleConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        return self.config.factor * x, state

    def step(self, x, state, *, aux=None):
        return self.config.factor * x, state

    def init_state(self, batch, device, dtype):
        return None

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        return 0

    def lipschitz(self, inner):
        return self.config.claim


@pytest.fixture(scope="module")
def scale_registry():
    @hookimpl
    def hybridlab_register(register):
        register.kind("mixer", "scale", config=ScaleConfig, module=Scale)

    return load_registry([("scale", types.SimpleNamespace(hybridlab_register=hybridlab_register))])


def scale_model(registry, claim):
    from hybridlab.core.spec import ModelSpec

    spec = ModelSpec.model_validate({
        "vocab_size": 16, "d_model": 8, "residual": {"kind": "convex", "alpha": 0.5},
        "layers": [{"mixer": {"kind": "scale", "factor": 3.0, "claim": claim}, "norm": {"kind": "none"},
                    "ffn": {"kind": "lipschitz_mlp"}}]}, context={"registry": registry})
    return Model(spec, registry)


def test_a_fully_declared_block_is_bounded_and_measured_below(scale_registry):
    """mixer join: 0.5 + 0.5·3 = 2; ffn join <= 1: the block's bound is their product,
    and the measured σ_max sits below it."""
    model = scale_model(scale_registry, claim=3.0)
    (row,) = lipschitz_report(model, seq_len=6, iterations=30)
    assert row.parts["mixer"] == pytest.approx(2.0)
    assert row.declared == pytest.approx(2.0 * row.parts["ffn"]) and row.passed
    assert row.measured <= row.declared * (1 + 1e-4)


def test_a_wrong_declaration_fails_the_check(scale_registry):
    """The mixer claims 0.1 where it scales by 3: through the joins the block maps h to
    about 0.5·(0.5·h + 1.5·h) = h (the small MLP adds little), far above the composed
    bound (0.55 · the FFN's)."""
    model = scale_model(scale_registry, claim=0.1)
    (row,) = lipschitz_report(model, seq_len=6, iterations=30)
    assert row.declared < 0.6 and row.measured > 0.9 and not row.passed


def test_cli_reports_each_block(capsys):
    assert main(["lipschitz", str(SPECS / "lipschitz-tiny.yaml"), "--iterations", "5"]) == 0
    out = capsys.readouterr().out
    assert "none (mixer Attention declares no bound)" in out and "PASS" in out
    assert main(["lipschitz", "nowhere.yaml"]) == 2


def test_a_wrong_ffn_declaration_fails_even_when_the_mixer_declares_nothing(monkeypatch, capsys):
    """Found probing: with attention (no bound) every block's bound is none, and only
    whole blocks were measured, so an FFN declaring too small a bound passed. Each
    declared sub-layer is now measured on its own."""
    import hybridlab.plugins.ffn.lipschitz_mlp as lm

    monkeypatch.setattr(lm, "spectral_normalized",  # weights at full strength, σ = 1
                        lambda w: w / torch.linalg.matrix_norm(w.float(), ord=2).to(w.dtype))
    monkeypatch.setattr(lm.LipschitzMLP, "lipschitz", lambda self, inner: 0.0)
    assert main(["lipschitz", str(SPECS / "lipschitz-tiny.yaml"), "--seq-len", "4", "--iterations", "10"]) == 1
    assert "FAIL: ffn: measured" in capsys.readouterr().out


def test_nothing_declared_is_not_reported_as_a_pass(capsys):
    assert main(["lipschitz", str(SPECS / "tiny-hybrid.yaml"), "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASS" not in out and "no declared bound to check" in out
