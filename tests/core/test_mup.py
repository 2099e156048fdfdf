"""μP: the base width reproduces the standard parametrization, the planned init and lr
factors, the coordinate check (flat in width under mup, growing under standard), the
parameter roles, and the mup-check command."""

import json

import pytest
import torch

from hybridlab.core.cli import main
from hybridlab.core.errors import SpecError
from hybridlab.core.model import Model
from hybridlab.core.mup import coord_check, parameter_roles
from hybridlab.core.spec import ModelSpec, load_model_spec

MODEL = {"vocab_size": 32, "d_model": 32,
         "layers": [{"mixer": {"kind": "short_conv"}, "ffn": {"kind": "swiglu"}},
                    {"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 48}}]}


def spec(registry, **changes):
    return ModelSpec.model_validate({**MODEL, **changes}, context={"registry": registry})


def test_mup_at_the_base_width_is_the_standard_model(registry):
    torch.manual_seed(0)
    standard = Model(spec(registry), registry)
    torch.manual_seed(0)
    mup = Model(spec(registry, parametrization="mup", base_width=32), registry)
    for (name, a), b in zip(standard.state_dict().items(), mup.state_dict().values()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 32, (2, 8))
    assert torch.equal(standard(tokens).logits, mup(tokens).logits)


def test_the_plan_classifies_linear_weights_by_which_dims_grow(registry):
    m = Model(spec(registry, d_model=128, parametrization="mup", base_width=32), registry)
    plan = m.mup
    assert plan.output_mult == 32 / 128
    # attention q: [128, 128] against [32, 32]: hidden, std x (1/4)^1/2, lr x 1/4
    assert plan.init_scale["blocks.1.mixer.q"] == 0.5 and plan.lr_scale["blocks.1.mixer.q.weight"] == 0.25
    # swiglu with the default hidden (8/3 d_model) grows on both sides: hidden
    hidden = m.blocks["0"].ffn.down.weight.shape[1]  # 344 against the base's 88 (rounded to multiples of 8)
    assert plan.init_scale["blocks.0.ffn.down"] == pytest.approx((hidden / 88) ** -0.5)
    # a fixed hidden of 48: gate_up [96, 128] is output-like (std x 1/4), down [128, 48] input-like (standard)
    assert plan.init_scale["blocks.1.ffn.gate_up"] == 0.25 and plan.lr_scale["blocks.1.ffn.gate_up.weight"] == 0.25
    assert "blocks.1.ffn.down" not in plan.init_scale
    roles = parameter_roles(m)
    assert roles["embedding.table.weight"].lr_scale == 1.0 and roles["blocks.1.mixer.q.weight"].lr_scale == 0.25


def test_mup_init_std_follows_the_plan(registry):
    torch.manual_seed(0)
    wide = Model(spec(registry, d_model=256, parametrization="mup", base_width=32), registry)
    std = wide.blocks["1"].mixer.q.weight.std().item()
    # 65,536 normal draws: the sample std is within 1% of 0.02 · (32/256)^1/2 (its own
    # relative spread is about 1/sqrt(2·65536) = 0.3%)
    assert std == pytest.approx(0.02 * (32 / 256) ** 0.5, rel=0.01)


def test_coordinate_check_is_flat_under_mup_and_grows_under_standard(registry):
    specs = {w: spec(registry, d_model=w) for w in (32, 128)}
    check = coord_check(specs, steps=3, lr=1e-2, batch=4, length=16, registry=registry)
    blocks = [layer for layer in check.rms["mup"][32][0] if layer.startswith("block")]
    # Under the standard parametrization an Adam step moves each hidden weight by about
    # lr per entry, so the change of a layer's output sums fan_in aligned terms: it grows
    # in proportion to the width (x4 here) and soon dominates the stream's small start.
    # μP divides that lr by the width ratio, so theory says Θ(1) and only finite-width
    # noise is left. The thresholds (above 3 and 1.8; within ±30%) sit between the two
    # regimes with room on both sides (docs/evidence.md has the numbers).
    assert max(check.growth("standard", 3, layer) for layer in blocks) > 3
    assert check.growth("standard", 3, "logits") > 1.8
    for layer in [*blocks, "logits"]:
        assert 0.7 < check.growth("mup", 3, layer) < 1.3, layer


def test_base_width_without_mup_is_a_located_error(tmp_path, registry):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({**MODEL, "base_width": 16}))
    with pytest.raises(SpecError, match=r"base_width: .*applies only with parametrization: mup"):
        load_model_spec(path, registry=registry)


def test_roles_name_attention_and_recurrent_layers(registry):
    roles = parameter_roles(Model(spec(registry), registry))
    assert {"attention", "mixer", "mixer:attention", "linear"} <= roles["blocks.1.mixer.q.weight"].categories
    assert {"recurrent", "mixer:short_conv", "matrix"} <= roles["blocks.0.mixer.weight"].categories
    assert "linear" not in roles["blocks.0.mixer.weight"].categories  # a convolution kernel
    assert "norm" in roles["blocks.0.mixer_place.norm.weight"].categories
    assert roles["embedding.table.weight"].categories >= {"embedding", "matrix"}


def test_mup_check_command_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(MODEL))
    out = tmp_path / "check.json"
    assert main(["mup-check", str(path), "--widths", "16,32", "--steps", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mup: activation RMS by width" in printed and "standard:" in printed
    data = json.loads(out.read_text())
    assert data["widths"] == [16, 32] and len(data["rms"]["mup"]["32"]) == 2
    assert main(["mup-check", str(path), "--widths", "15,32"]) == 2  # heads 2 do not divide 15
    assert "must divide d_model (15)" in capsys.readouterr().err


def test_readout_applies_the_logits_multiplier(registry):
    m = Model(spec(registry, d_model=64, parametrization="mup", base_width=32), registry)
    tokens = torch.randint(0, 32, (2, 8))
    out = m(tokens, hidden=("final",))
    assert torch.equal(m.readout(out.hidden["final"]), out.logits)
    assert torch.allclose(out.logits, m.head(out.hidden["final"]) * 0.5, atol=1e-6)  # a linear head: x 32/64


def test_a_base_width_the_heads_do_not_divide_is_a_located_error(tmp_path, registry):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({**MODEL, "parametrization": "mup", "base_width": 15}))
    with pytest.raises(SpecError, match=r"base_width: the base model \(d_model = 15\) is not valid: "
                                        r"layers\[1\]\.mixer\.heads: must divide d_model \(15\)"):
        load_model_spec(path, registry=registry)
