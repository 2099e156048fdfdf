"""mixer ``parallel``: each combine rule equals its formula over the branches run alone,
decoding from state equals the parallel forward, the state is one entry per branch,
errors are located inside the branch list, and the Hymba / Falcon-H1 tiny specs
validate, verify and train."""

import json
from pathlib import Path

import pytest
import torch

from hybridlab.core.cli import main
from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.errors import CannotDecode, SpecError
from hybridlab.core.interfaces import Aux, SequenceMixer
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_kind, verify_model

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs" / "models"
DEFAULT_JOB = ROOT / "specs" / "train" / "default.yaml"
TINY_SPECS = ["hymba-tiny.yaml", "falcon-h1-tiny.yaml"]

ATTENTION = {"kind": "attention", "heads": 4, "kv_heads": 2, "window": 7}
GDN = {"kind": "gated_deltanet", "heads": 2}
MAMBA2 = {"kind": "mamba2", "heads": 3, "head_dim": 8}


def build(registry, combine, branches=(ATTENTION, GDN), d_model=48):
    dims = Dims(d_model=d_model, vocab_size=11, n_layers=1, registry=registry)
    config = registry.kind("mixer", "parallel").config.model_validate(
        {"kind": "parallel", "combine": combine, "branches": list(branches)}, context={"registry": registry})
    return dims.build("mixer", config).double(), dims


def alone(registry, module, dims):
    """Each branch rebuilt on its own, with the parallel module's weights."""
    out = []
    for config, branch in zip(module.config.branches, module.branches):
        single = dims.build("mixer", config).double()
        single.load_state_dict(branch.state_dict())
        out.append(single)
    return out


@pytest.mark.parametrize("combine", ["mean", "sum", "concat"])
def test_each_rule_is_its_formula_over_the_branches_run_alone(registry, combine, one_thread):
    module, dims = build(registry, combine, (ATTENTION, GDN, MAMBA2))
    if module.beta is not None:  # not the initial ones, so a mix-up of branches would show
        module.beta.data = torch.rand_like(module.beta) + 0.5
    x = torch.randn(2, 23, 48, dtype=torch.float64)
    with torch.no_grad():
        got, state = module(x)
        ys = [single(x)[0] for single in alone(registry, module, dims)]  # 3 × [B, T, D]
    assert state is None
    if combine == "sum":
        expected = ys[0] + ys[1] + ys[2]
    elif combine == "concat":
        expected = torch.cat(ys, -1) @ module.proj.weight.T  # W [y_1; y_2; y_3]
    else:
        normed = [y / y.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for y in ys]
        expected = sum(b * n for b, n in zip(module.beta, normed)) / 3
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_parameters_live_under_each_branch_and_the_rule(registry):
    module, _ = build(registry, "concat")
    names = {n for n, _ in module.named_parameters()}
    assert "proj.weight" in names and "beta" not in names
    assert any(n.startswith("branches.0.q.") for n in names) and any(n.startswith("branches.1.A_log") for n in names)
    assert "beta" in {n for n, _ in build(registry, "mean")[0].named_parameters()}
    assert not any(True for _ in build(registry, "sum")[0].named_parameters(recurse=False))


def test_concat_scales_its_projection_at_init_and_not_the_branches_again(registry):
    module, _ = build(registry, "concat")
    assert module.proj.residual_out is True
    assert not any(getattr(m, "residual_out", False) for m in module.branches.modules())
    module, _ = build(registry, "sum")  # sum: each branch writes into the stream itself
    assert module.branches[0].out.residual_out and module.branches[1].out.residual_out


def test_mean_starts_with_beta_one(registry):
    module, _ = build(registry, "mean")
    assert module.beta.shape == (2, 48) and torch.equal(module.beta, torch.ones(2, 48, dtype=torch.float64))


@pytest.mark.parametrize("combine", ["mean", "sum", "concat"])
def test_the_state_is_one_entry_per_branch_equal_to_each_branch_alone(registry, combine, one_thread):
    module, dims = build(registry, combine)
    singles = alone(registry, module, dims)
    x = torch.randn(3, 19, 48, dtype=torch.float64)
    state = module.init_state(3, "cpu", torch.float64)
    assert isinstance(state, tuple) and len(state) == 2
    assert type(state[0]) is type(singles[0].init_state(3, "cpu", torch.float64))
    assert type(state[1]) is type(singles[1].init_state(3, "cpu", torch.float64))
    with torch.no_grad():
        _, state = module(x, state)
        _, kv = singles[0](x, singles[0].init_state(3, "cpu", torch.float64))
        _, rec = singles[1](x, singles[1].init_state(3, "cpu", torch.float64))
    assert state[0].seen == 19 and torch.equal(state[0].k, kv.k) and torch.equal(state[0].v, kv.v)
    torch.testing.assert_close(state[1].recurrent, rec.recurrent, rtol=0, atol=0)
    assert module.state_bytes(1000, torch.bfloat16) == sum(s.state_bytes(1000, torch.bfloat16) for s in singles)
    with pytest.raises(ValueError, match="expected a tuple of 2 branch states"):
        module(x, state[:1])


def test_a_branch_that_cannot_decode_makes_the_layer_unable_and_is_named(registry):
    module, _ = build(registry, "sum", (GDN, {"kind": "attention", "heads": 4, "causal": False}))
    with pytest.raises(CannotDecode, match=r"branches\[1\] \(attention\): attention with causal: false"):
        module.init_state(1, "cpu", torch.float64)


def test_aux_losses_and_metrics_of_a_branch_are_scoped_by_its_index(registry):
    class Counting(SequenceMixer):
        def forward(self, x, state=None, *, doc_ids=None, aux=None):
            aux.add_metric("calls", 1.0)
            aux.add_loss("zero", x.sum() * 0)
            return x, state

    module, _ = build(registry, "sum")
    module.branches[1] = Counting()
    aux = Aux().scope("layers.3")
    module(torch.randn(1, 5, 48, dtype=torch.float64), aux=aux)
    assert set(aux.metrics) == {"layers.3.branch1.calls"} and set(aux.losses) == {"layers.3.branch1.zero"}


HYBRID = {"name": "parallel-hybrid", "vocab_size": 37, "d_model": 48, "norm": {"kind": "rmsnorm"},
          "head": {"kind": "lm", "tied": True}}
FFN = {"kind": "swiglu", "hidden": 64}


@pytest.mark.parametrize("combine", ["mean", "sum", "concat"])
@pytest.mark.parametrize("impl", ["reference", {}])
def test_decoding_from_state_equals_the_parallel_forward(assert_hybrid_decodes, combine, impl, one_thread):
    layers = [{"mixer": {"kind": "parallel", "combine": combine,
                         "branches": [{"kind": "attention", "heads": 4, "kv_heads": 2, "window": 13},
                                      {"kind": "gated_deltanet", "heads": 2}]}, "ffn": FFN},
              {"mixer": {"kind": "parallel", "combine": combine,
                         "branches": [{"kind": "mamba2", "heads": 2}, {"kind": "attention", "heads": 3}]}, "ffn": FFN}]
    assert_hybrid_decodes({**HYBRID, "layers": layers}, impl)


def test_verify_checks_the_registered_examples(registry):
    report = verify_kind("parallel", registry=registry)
    assert report.passed and not report.problems, report.problems
    assert {c.quantity for c in report.checks} == {"step == parallel", "two pieces == whole"}
    assert len({c.case for c in report.checks}) == 3  # every example decodes


# ---------------------------------------------------------------- located spec errors




def write(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


HEAD = """name: m
vocab_size: 11
d_model: 48
layers:
  - mixer:
      kind: parallel
      combine: mean
"""


def test_a_block_pin_reaches_the_branch_of_its_kind(registry, tmp_path):
    path = write(tmp_path, HEAD + "      branches:\n        - {kind: attention, heads: 4}\n"
                                  "        - {kind: gated_deltanet, heads: 2}\n    impl: {attention: reference}\n")
    model = Model(load_model_spec(path, registry=registry), registry)
    pins = {n: m.spec_pin for n, m in model.named_modules() if ".branches." in n and hasattr(m, "spec_pin")}
    assert pins == {"blocks.0.mixer.branches.0": "reference", "blocks.0.mixer.branches.1": None}


def test_a_single_branch_is_a_located_error(registry, tmp_path):
    path = write(tmp_path, HEAD + "      branches:\n        - {kind: attention, heads: 4}\n")
    with pytest.raises(SpecError) as err:
        load_model_spec(path, registry=registry)
    assert err.value.lines() == [f"{path}:8: layers[0].mixer.branches: needs at least 2 mixers to run in parallel, "
                                 "got 1; for one mixer, give it as the block's mixer directly"]


def test_a_bad_branch_is_located_inside_the_branch(registry, tmp_path):
    path = write(tmp_path, HEAD + "      branches:\n        - {kind: attention, heads: 4}\n"
                                  "        - {kind: mamba2, heads: 5}\n")
    with pytest.raises(SpecError) as err:  # a check(dims) of the branch's own kind
        load_model_spec(path, registry=registry)
    assert err.value.lines() == [f"{path}:10: layers[0].mixer.branches[1].heads: must divide d_model (48) unless "
                                 "head_dim is set, got 5"]
    path = write(tmp_path, HEAD + "      branches:\n        - {kind: attention, heads: 4}\n"
                                  "        - kind: gated_deltanet\n          heads: 0\n          gatee: false\n")
    with pytest.raises(SpecError) as err:  # the branch's own pydantic validation
        load_model_spec(path, registry=registry)
    lines = err.value.lines()
    assert any(line.startswith(f"{path}:11: layers[0].mixer.branches[1].heads: input should be greater than")
               for line in lines), lines
    assert any(line.startswith(f"{path}:12: layers[0].mixer.branches[1].gatee: unknown field 'gatee' "
                               "(did you mean 'gate'?)") for line in lines), lines


def test_an_unknown_branch_kind_lists_the_mixers(registry, tmp_path):
    path = write(tmp_path, HEAD + "      branches:\n        - {kind: attention, heads: 4}\n        - {kind: mamba3}\n")
    message = r"m.yaml:10: layers\[0\].mixer.branches\[1\]: unknown mixer kind 'mamba3' \(did you mean 'mamba2'\?\)"
    with pytest.raises(SpecError, match=message):
        load_model_spec(path, registry=registry)


# ---------------------------------------------------------------- the tiny specs


@pytest.mark.parametrize("name", TINY_SPECS)
def test_the_tiny_spec_validates_summarises_and_verifies(registry, name, capsys):
    assert main(["validate", str(SPECS / name)]) == 0
    assert main(["summary", str(SPECS / name)]) == 0
    spec = load_model_spec(SPECS / name, registry=registry)
    assert {b.mixer.kind for b in spec.layers} == {"parallel"}
    assert [[m.kind for m in b.mixer.branches] for b in spec.layers] == [["attention", "mamba2"]] * len(spec.layers)
    report = verify_model(spec, registry=registry)
    assert report.passed, [(c.quantity, c.error, c.allowed) for c in report.failures()] + report.problems
    assert "greedy decode == parallel" in {c.quantity for c in report.checks}


def test_hymba_tiny_mixes_windowed_and_global_attention_with_mean(registry):
    spec = load_model_spec(SPECS / "hymba-tiny.yaml", registry=registry)
    assert {b.mixer.combine for b in spec.layers} == {"mean"}
    assert [b.mixer.branches[0].window for b in spec.layers] == [None, 16, None]
    assert {b.mixer.combine for b in load_model_spec(SPECS / "falcon-h1-tiny.yaml", registry=registry).layers} == \
        {"concat"}


@pytest.mark.parametrize("pins", ["reference", {}])
def test_packed_documents_equal_separate_sequences(registry, pins, one_thread):
    model = Model(load_model_spec(SPECS / "hymba-tiny.yaml", registry=registry), registry).double().eval()
    lengths = [7, 12, 4]
    tokens = torch.randint(0, 64, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    with torch.no_grad(), forced(pins):
        packed = model(tokens, doc_ids=doc_ids).logits
        separate = torch.cat([model(part).logits for part in tokens.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", TINY_SPECS)
def test_the_default_task_trains_a_few_steps_with_it(tmp_path, name):
    run = tmp_path / "run"
    code = main(["train", str(DEFAULT_JOB), "--set", f"model={SPECS / name}", "--set", "steps=3",
                 "--set", "batch_size=4", "--set", "eval_every=0", "--set", "eval_batches=1",
                 "--set", "checkpoint_every=0", "--set", "log_every=1", "--set", "device=cpu",
                 "--out", str(run), "--quiet"])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "eval/loss" not in r]
    assert len(train) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
