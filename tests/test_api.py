"""The Python API (hybridlab.build, load, train, evaluate, generate, verify, compare) on
tiny specs: a mapping is read exactly as a file is, results come back as objects, and
nothing is printed with progress=False."""

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from hybridlab.core.spec import PipelineSpec
from hybridlab.core.train import Trainer
from hybridlab.plugins.mixer.attention import attention_sdpa
from hybridlab.registry import hookimpl, load_registry

import hybridlab

ROOT = Path(__file__).resolve().parents[1]

# repeat, defaults, a loop, a shared block and its use: 2 + 2 + 1 = 5 blocks
MODEL = {
    "name": "tiny",
    "vocab_size": 32,
    "d_model": 16,
    "defaults": {"ffn": {"kind": "swiglu", "hidden": 24}},
    "shared": {"att": {"mixer": {"kind": "attention", "heads": 2}}},
    "layers": [
        {"repeat": 2, "blocks": [{"mixer": {"kind": "attention", "heads": 2}}]},
        {"loop": 2, "blocks": [{"mixer": {"kind": "attention", "heads": 2, "kv_heads": 1}}]},
        {"use": "att"},
    ],
}
PLAIN = {"name": "plain", "vocab_size": 32, "d_model": 16,
         "layers": [{"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 24}}]}


def pipeline(model=PLAIN, **settings):
    return {"name": "api", "model": model, "data": {"kind": "mqar", "vocab": 32, "pairs": 4},
            "optimizer": {"kind": "adamw", "lr": 3e-3}, "steps": 3, "batch_size": 4, "eval_batches": 1,
            "log_every": 1, "device": "cpu", "threads": 1, **settings}


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# ---------------------------------------------------------------- the package


def test_import_hybridlab_stays_light_and_the_api_loads_on_first_use():
    code = ("import sys, hybridlab\n"
            "light = not {'torch', 'hybridlab.api', 'pydantic'} & set(sys.modules)\n"
            "from hybridlab.core.errors import SpecError, HybridlabError\n"
            "ok = hybridlab.SpecError is SpecError and hybridlab.HybridlabError is HybridlabError\n"
            "names = all(callable(getattr(hybridlab, n)) for n in hybridlab.__all__ if n != '__version__')\n"
            "try:\n    hybridlab.nope\nexcept AttributeError:\n    missing = True\n"
            "print(light, ok, names, missing, 'build' in dir(hybridlab))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"] * 5


# ---------------------------------------------------------------- build


def test_a_mapping_builds_what_the_same_yaml_file_builds(tmp_path):
    given = copy.deepcopy(MODEL)
    from_file = hybridlab.build(write(tmp_path / "m.yaml", MODEL), seed=0)
    from_mapping = hybridlab.build(given, seed=0)
    assert given == MODEL  # the caller's mapping is not expanded in place
    assert from_mapping.spec == from_file.spec
    positions = from_mapping.spec.positions()
    assert len(positions) == 5 and all(p.block.ffn.hidden == 24 for p in positions)  # repeat, loop, use; defaults
    assert [p.key for p in positions] == ["0", "1", "2-0", "2-0", "att-0"]
    a, b = from_mapping.state_dict(), from_file.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_mapping.training  # torch's default for a new module; load() gives eval mode


def test_a_pipeline_gives_its_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "m.yaml", MODEL)
    (tmp_path / "train").mkdir()
    from_file = hybridlab.build(write(tmp_path / "train" / "p.yaml", pipeline("../m.yaml")))  # beside the file
    from_mapping = hybridlab.build(pipeline("m.yaml"))  # a mapping's paths: the working directory
    inline = hybridlab.build(pipeline(MODEL))
    assert from_file.spec == from_mapping.spec == inline.spec == hybridlab.build("m.yaml").spec


def test_overrides_as_set_strings_or_a_mapping(tmp_path):
    strings = hybridlab.build(MODEL, ["d_model=32", "layers[0].blocks[0].mixer.heads=4"])
    mapping = hybridlab.build(MODEL, {"d_model": 32, "layers[0].blocks[0].mixer.heads": 4})
    assert strings.spec == mapping.spec
    assert strings.spec.d_model == 32
    assert [p.block.mixer.heads for p in strings.spec.positions()] == [4, 4, 2, 2, 2]  # the repeat group, expanded
    rope = hybridlab.build(MODEL, {"shared.att.mixer.position": {"kind": "rope", "fraction": 0.5}}, seed=0)
    assert rope.spec.positions()[-1].block.mixer.position.fraction == 0.5
    assert hybridlab.build(pipeline(MODEL), {"model.d_model": 24}).spec.d_model == 24


def test_a_seed_gives_the_weights_a_training_run_starts_from(tmp_path):
    before = torch.get_rng_state()
    built = hybridlab.build(PLAIN, seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    spec = PipelineSpec.model_validate(pipeline(seed=3), context={"registry": hybridlab.api._registry(None)})
    start = Trainer(spec, tmp_path / "run", progress=False).model.state_dict()
    assert all(torch.equal(built[k], start[k]) for k in start)
    other = hybridlab.build(PLAIN, seed=4).state_dict()
    assert not torch.equal(other["embedding.table.weight"], built["embedding.table.weight"])


# ---------------------------------------------------------------- errors


BAD = {
    "vocab_size": 32, "d_model": 16,
    "layers": [
        {"repeat": 2, "blocks": [{"mixer": {"kind": "attention", "heads": 2, "bogus": 1}}]},
        {"mixer": {"kind": "attention", "heads": 0}},
        {"use": "missing"},
    ],
}


def test_spec_errors_carry_every_problem_at_its_path_as_a_file_would(tmp_path):
    with pytest.raises(hybridlab.SpecError) as mapping:
        hybridlab.build(BAD)
    with pytest.raises(hybridlab.SpecError) as from_file:
        hybridlab.build(write(tmp_path / "bad.yaml", BAD))
    lines = str(mapping.value).splitlines()
    assert len(mapping.value.problems) == len(lines) >= 2
    assert lines[0].startswith("<spec>: layers[0].blocks[0].mixer.bogus: unknown field 'bogus'")
    assert "<spec>: layers[1].mixer.heads: input should be greater than or equal to 1, got 0" in lines
    assert all(p.file == "<spec>" and p.line is None for p in mapping.value.problems)
    # the same problems as the file's, which carry its lines
    assert [(p.path, p.message) for p in mapping.value.problems] == \
           [(p.path, p.message) for p in from_file.value.problems]
    assert all(p.file.endswith("bad.yaml") and p.line for p in from_file.value.problems)


def test_other_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hybridlab.SpecError, match=r"^<spec>: d_model: a value of type object cannot be written"):
        hybridlab.build({**PLAIN, "d_model": object()})
    with pytest.raises(hybridlab.SpecError, match=r"^<spec>: extends: extended file 'base.yaml' not found"):
        hybridlab.build({"extends": "base.yaml", "d_model": 8})
    write(tmp_path / "base.yaml", PLAIN)
    assert hybridlab.build({"extends": "base.yaml", "d_model": 8}).spec.d_model == 8  # relative to the cwd
    with pytest.raises(hybridlab.HybridlabError, match="nope.yaml: no such file"):
        hybridlab.build("nope.yaml")
    with pytest.raises(hybridlab.HybridlabError, match=r"--set layers\[5\].mixer.heads=2: layers\[5\]: no such list"):
        hybridlab.build(PLAIN, ["layers[5].mixer.heads=2"])
    with pytest.raises(hybridlab.SpecError) as bad:
        hybridlab.train(pipeline({**PLAIN, "d_model": 0}, steps=0), out=tmp_path / "never")
    assert str(bad.value).splitlines() == [
        "<pipeline>: model.d_model: input should be greater than or equal to 1, got 0",
        "<pipeline>: steps: input should be greater than or equal to 1, got 0"]
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- train, load, evaluate, generate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return hybridlab.train(pipeline(MODEL), out=out, progress=False)


def test_train_returns_the_run_directory_and_the_final_metrics(trained):
    assert (trained.run_dir / "spec.yaml").exists() and (trained.run_dir / "checkpoints").is_dir()
    assert {"eval/accuracy", "eval/loss", "seconds"} <= set(trained.metrics)
    records = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert records[-1]["eval/loss"] == trained.metrics["eval/loss"]


def test_load_gives_the_trained_models_logits(trained):
    model = hybridlab.load(trained.run_dir)
    assert not model.training
    tokens = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(1))
    out = logits(model, tokens)
    assert out.shape == (2, 10, 32)
    assert torch.equal(out, logits(trained.model, tokens))
    start = hybridlab.build(MODEL, seed=0).eval()  # the weights training started from
    assert not torch.allclose(out, logits(start, tokens))
    # the run stores the expanded spec: layers[2] is the loop; a count the weights allow
    wider = hybridlab.load(trained.run_dir, overrides={"model.layers[2].loop": 3})
    assert len(wider.spec.positions()) == 6


def test_evaluate_reproduces_the_final_evaluation(trained):
    again = hybridlab.evaluate(trained.run_dir)
    assert again == pytest.approx({k: v for k, v in trained.metrics.items() if k != "seconds"})


def test_generate_decodes_the_argmax_step_by_step(trained):
    result = hybridlab.generate(trained.run_dir, "3 20 5 21 3", max_new_tokens=4)
    assert len(result.tokens) == 4
    assert result.text == " ".join(map(str, [3, 20, 5, 21, 3, *result.tokens]))
    model, tokens = hybridlab.load(trained.run_dir), [3, 20, 5, 21, 3]
    for token in result.tokens:
        last = logits(model, torch.tensor([tokens]))[0, -1]
        assert last[token] >= last.max() - 1e-4
        tokens.append(token)


def test_quiet_training_prints_nothing_and_warns_through_python(tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"^<pipeline>: schedule.warmup: warmup \(5 steps\) is longer than the run"):
        hybridlab.train(pipeline(steps=1, schedule={"kind": "cosine", "warmup": 5}), out=tmp_path / "a",
                        progress=False)
    assert capsys.readouterr() == ("", "")
    hybridlab.train(pipeline(steps=1), out=tmp_path / "b")
    assert capsys.readouterr().out.startswith(f"run directory: {tmp_path / 'b'}\nmodel plain: 1 blocks")


# ---------------------------------------------------------------- verify


def no_scale(q, k, v, *, causal, scale):
    return attention_sdpa(q, k, v, causal=causal, scale=1.0)


def eps_outside(x, weight, eps):
    xf = x.float()
    y = xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps)
    return (y * weight.float() if weight is not None else y).to(x.dtype)


@hookimpl
def planted_register(register):  # a wrong attention the dispatcher prefers
    register.impl("mixer", "attention", "no_scale", fn=no_scale, priority=100, decode=False)


def test_verify_a_spec_passes_and_a_planted_implementation_fails():
    report = hybridlab.verify(MODEL, seq_len=17)
    assert report.passed, report.failures()
    assert {"logits", "loss", "greedy decode == parallel"} <= {c.quantity for c in report.checks}
    planted = load_registry([("planted", types.SimpleNamespace(hybridlab_register=planted_register))])
    bad = hybridlab.verify(MODEL, seq_len=17, registry=planted)
    assert not bad.passed and "logits" in {c.quantity for c in bad.failures()}
    kind = hybridlab.verify(kind="attention", impl="no_scale", registry=planted)
    assert not kind.passed and {c.impl for c in kind.checks} == {"no_scale"}


def test_verify_everything_in_a_registry_and_bad_arguments():
    from hybridlab.plugins.normalization import rmsnorm

    @hookimpl
    def hybridlab_register(register):
        register.impl("normalization", "rmsnorm", "eps_outside", fn=eps_outside)

    planted = types.SimpleNamespace(hybridlab_register=hybridlab_register)
    small = load_registry([("rmsnorm", rmsnorm), ("planted", planted)], entry_points=False)  # rmsnorm alone
    seen = []
    report = hybridlab.verify(registry=small, progress=lambda name, part: seen.append(name))
    assert seen == ["rmsnorm"] and {c.impl for c in report.failures()} == {"eps_outside"}
    assert {"torch", "reference"} <= {c.impl for c in report.checks if c.passed}
    with pytest.raises(hybridlab.HybridlabError, match="give either a spec or kind="):
        hybridlab.verify(MODEL, kind="attention")
    with pytest.raises(hybridlab.SpecError, match=r"^<specs\[1\]>: layers\[0\].blocks\[0\].mixer.bogus"):
        hybridlab.verify([MODEL, BAD])
    with pytest.raises(hybridlab.HybridlabError, match="seq_len: expected at least 2"):
        hybridlab.verify(MODEL, seq_len=1)


# ---------------------------------------------------------------- compare


def test_compare_two_specs_returns_the_rows_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "b.yaml", {**PLAIN, "name": "b", "layers": PLAIN["layers"] * 2})
    settings = {k: v for k, v in pipeline(steps=2).items() if k != "model"}  # the first spec stands in
    a = {"extends": "b.yaml", "name": "a", "layers": PLAIN["layers"]}  # b.yaml with one layer
    result = hybridlab.compare([a, "b.yaml"], settings, lrs=[1e-3, 2e-3], out="cmp", progress=False)
    assert capsys.readouterr() == ("", "")
    assert sorted((r["spec"], r["lr"]) for r in result.rows) == [(s, lr) for s in "ab" for lr in (1e-3, 2e-3)]
    assert set(result.best) == set(result.means) == {"a", "b"} and result.select == "eval/accuracy"
    assert result.means["a"]["eval/loss"] == pytest.approx(
        next(r["metrics"]["eval/loss"] for r in result.rows if (r["spec"], r["lr"]) == ("a", result.best["a"])))
    assert result.report.exists() and result.out == Path("cmp")
    # written where results.md's command line finds it, its extends still the working directory's b.yaml
    assert hybridlab.build("cmp/specs/a.yaml").spec == hybridlab.build({**PLAIN, "name": "a"}).spec
    again = hybridlab.compare([a, "b.yaml"], settings, lrs=[1e-3, 2e-3], out="cmp", progress=False)
    assert again.rows == result.rows  # every cell finished: skipped, not trained again (seconds unchanged)


def test_compare_reports_every_bad_mapping_before_training(tmp_path):
    with pytest.raises(hybridlab.SpecError) as bad:
        hybridlab.compare([PLAIN, BAD, {**PLAIN, "d_model": 0}], pipeline(), out=tmp_path / "cmp", progress=False)
    files = {p.file for p in bad.value.problems}
    assert files == {"<specs[1]>", "<specs[2]>"}
    assert not (tmp_path / "cmp").exists()


def test_notebook_mistakes_are_hybridlab_errors(tmp_path):
    """Found by an outside-in probe: overrides passed where the device goes, a torch.device,
    a non-Registry registry and a string seed gave AttributeErrors or blamed a validator;
    a list of token ids as a prompt crashed."""
    import torch

    import hybridlab

    with pytest.raises(hybridlab.HybridlabError, match="device: expected a name"):
        hybridlab.load(tmp_path, {"model.layers[0].mixer.window": 4})
    with pytest.raises(hybridlab.HybridlabError, match="registry: expected a hybridlab.registry.Registry"):
        hybridlab.build({"vocab_size": 8, "d_model": 8, "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
                        registry=5)
    with pytest.raises(hybridlab.HybridlabError, match="seed: expected a whole number"):
        hybridlab.build({"vocab_size": 8, "d_model": 8, "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
                        seed="a")
    with pytest.raises(hybridlab.HybridlabError, match="not a run directory"):  # a torch.device is taken
        hybridlab.load(tmp_path, device=torch.device("cpu"))
    with pytest.raises(hybridlab.HybridlabError, match="prompt: expected text or a list of token ids"):
        hybridlab.generate(tmp_path, {"a": 1})


def test_speculative_generate_equals_greedy_and_reports_its_acceptance(tmp_path):
    run = hybridlab.train(pipeline(MODEL, objectives=[{"kind": "cross_entropy"}, {"kind": "mtp", "depth": 2}]),
                          out=tmp_path / "mtp", progress=False)
    plain = hybridlab.generate(run.run_dir, "3 20 5 21 3", max_new_tokens=8)
    fast = hybridlab.generate(run.run_dir, "3 20 5 21 3", max_new_tokens=8, speculative=True)
    assert fast.tokens == plain.tokens and plain.acceptance_rate is None
    assert 0.0 <= fast.acceptance_rate <= 1.0
    with pytest.raises(hybridlab.HybridlabError, match="speculative"):
        hybridlab.generate(run.run_dir, "3 20", temperature=1.0, speculative=True)
