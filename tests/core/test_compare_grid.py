"""compare's iso-state axis (--match, state bytes, accuracy_vs_state.png) and difficulty grid
(--grid: per-point table, one aggregate per spec, resuming)."""

import json
import math

import pytest
from hybridlab.core.cli import main
from hybridlab.core.compare import parse_grid, run_compare
from hybridlab.core.errors import HybridlabError
from hybridlab.core.iso import measure, parse_match, scale_to
from hybridlab.core.spec import load_model_spec

MODEL = """name: {name}
vocab_size: 2
d_model: 16
layers:
  - mixer: {mixer}
    ffn: {{kind: swiglu, hidden: 16}}
"""
PIPELINE = """name: grid-test
model: attn.yaml
data: {kind: parity, length: 6, eval_lengths: [6, 12]}
optimizer: {kind: adamw, lr: 1.0e-3}
steps: 2
batch_size: 4
eval_batches: 1
checkpoint_every: 1
log_every: 1
device: cpu
"""


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "attn.yaml").write_text(MODEL.format(name="attn", mixer="{kind: attention, heads: 2}"))
    (tmp_path / "lin.yaml").write_text(MODEL.format(name="lin", mixer="{kind: linear_attention, heads: 2}"))
    (tmp_path / "p.yaml").write_text(PIPELINE)
    return tmp_path


@pytest.mark.parametrize("which", ["params", "state_bytes"])
@pytest.mark.parametrize("name", ["attn", "lin"])
def test_scale_to_picks_the_feasible_width_nearest_the_target(files, which, name):
    spec = load_model_spec(f"{name}.yaml")
    target = 3 * getattr(measure(spec, 12), which) + 1  # not hit exactly by the spec itself
    result = scale_to(f"{name}.yaml", **{which: target}, seq_len=12)
    assert result.measure == which and result.spec.d_model == result.d_model and result.d_model % 8 == 0
    assert result.value == getattr(measure(result.spec, 12), which)
    # the documented tolerance: no other multiple of 8 nearby is closer to the target
    for d in (result.d_model - 8, result.d_model + 8):
        if d >= 8:
            other = spec.model_copy(update={"d_model": d})
            assert abs(getattr(measure(other, 12), which) - target) >= abs(result.value - target)
    assert result.d_model > spec.d_model


def test_scale_to_errors(files):
    with pytest.raises(HybridlabError, match="exactly one of params= or state_bytes="):
        scale_to("attn.yaml", seq_len=12)
    with pytest.raises(HybridlabError, match="the search stops at"):
        scale_to("attn.yaml", params=10**13, seq_len=12)


@pytest.mark.parametrize("text, message", [
    ("params", "expected params=N or state_bytes=N"),
    ("flops=3", "expected params=N or state_bytes=N"),
    ("params=abc", "params must be a whole number"),
    ("state_bytes=-4", "must be a positive whole number"),
    ("params=1.5", "must be a positive whole number"),
])
def test_bad_match_values(text, message):
    with pytest.raises(HybridlabError, match=message):
        parse_match(text)


@pytest.mark.parametrize("texts, message", [
    (["pairs=4,8"], "a grid axis is a task field"),
    (["data.kind=parity,mqar"], "a grid axis is a task field"),
    (["data.length"], "expected data.FIELD=V1,V2"),
    (["data.length=4,4"], "lists a value twice"),
    (["data.length=4", "data.length=6"], "given twice"),
])
def test_bad_grid_values(texts, message):
    with pytest.raises(HybridlabError, match=message):
        parse_grid(texts)


def test_cli_rejects_bad_grid_and_match_with_exit_2(files, capsys):
    assert main(["compare", "attn.yaml", "--pipeline", "p.yaml", "--grid", "steps=1,2"]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(["compare", "attn.yaml", "--pipeline", "p.yaml", "--match", "params=lots"]) == 2
    assert "--match: params must be a whole number" in capsys.readouterr().err
    assert main(["compare", "attn.yaml", "--pipeline", "p.yaml", "--grid", "data.length=x,6"]) == 2
    assert "data.length" in capsys.readouterr().err  # the task's own validation names the field
    assert not (files / "runs").exists()


def test_match_scales_every_spec_and_the_report_gains_state_bytes(files):
    target = 2 * measure(load_model_spec("attn.yaml"), 12).params
    out = run_compare(["attn.yaml", "lin.yaml"], "p.yaml", out=files / "out", progress=False, echo=lambda s: None,
                      match=("params", target))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for row in rows:
        matched = load_model_spec(out / "matched" / f"{row['spec']}.yaml")
        assert row["params"] == measure(matched, 12).params
        assert abs(row["params"] - target) / target < 0.25  # d_model multiples of 8 near 32: steps under 25%
        assert row["state_len"] == 12 and row["state_bytes"] == measure(matched, 12).state_bytes
    table = (out / "results.md").read_text()
    assert "state bytes@12" in table and "--match params=" in table
    assert (out / "accuracy_vs_state.png").stat().st_size > 0


def test_grid_aggregate_is_the_mean_of_the_points_and_resumes(files):
    lines = []
    grid = parse_grid(["data.length=4,6", "data.eval_lengths=[6]"])
    out = run_compare(["attn.yaml", "lin.yaml"], "p.yaml", out=files / "out", progress=False, echo=lines.append,
                      seeds=2, grid=grid)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {r["grid"]["data.length"] for r in rows} == {"4", "6"}
    scores = json.loads((out / "grid.json").read_text())
    for spec in ("attn", "lin"):
        points = []
        for length in ("4", "6"):
            values = [r["metrics"]["len6/accuracy"] for r in rows if r["spec"] == spec and r["grid"]["data.length"]
                      == length]
            assert len(values) == 2
            points.append(sum(values) / 2)
            assert math.isclose(scores[spec]["cells"][f"length={length}, eval_lengths=[6]"], points[-1])
        assert math.isclose(scores[spec]["aggregate"], sum(points) / 2)
    table = (out / "results.md").read_text()
    assert "## Difficulty grid" in table and "| length=4, eval_lengths=[6] |" in table
    assert (out / "cells" / "attn" / "length_4-eval_lengths__6_").is_dir()

    # rerun: every cell is skipped; one removed result is the only cell trained again
    (out / "cells" / "lin" / "length_6-eval_lengths__6_" / "seed1-lr0.001" / "result.json").unlink()
    lines.clear()
    run_compare(["attn.yaml", "lin.yaml"], "p.yaml", out=out, progress=False, echo=lines.append, seeds=2, grid=grid)
    trained = [line for line in lines if "training" in line or "resuming" in line]
    assert len(trained) == 1 and "lin length=6" in trained[0] and "seed 1" in trained[0]
    assert sum("done, skipped" in line for line in lines) == 7


def test_python_api_takes_grid_mapping_and_match(files):
    import hybridlab

    target = measure(load_model_spec("lin.yaml"), 12).state_bytes * 2
    result = hybridlab.compare(["attn.yaml", "lin.yaml"], "p.yaml", out=files / "api", progress=False,
                               grid={"data.length": [4, 6]}, match=f"state_bytes={target}")
    assert set(result.grid) == {"attn", "lin"}
    for scores in result.grid.values():
        assert set(scores["cells"]) == {"length=4", "length=6"}
        assert math.isclose(scores["aggregate"], sum(scores["cells"].values()) / 2)
    assert all(abs(r["state_bytes"] - target) / target < 0.5 for r in result.rows)  # coarse widths at d_model 16-48
    assert files / "api" / "accuracy_vs_state.png" in result.plots
    with pytest.raises(HybridlabError, match="--grid"):
        hybridlab.compare(["attn.yaml"], "p.yaml", out=files / "bad", progress=False, grid=["length=4"])
