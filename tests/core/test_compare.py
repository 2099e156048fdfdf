"""hybridlab compare: cells, resuming an interrupted comparison, tables, plots, errors."""

import json
import subprocess
import sys

import pytest

from hybridlab.core import train as train_module
from hybridlab.core.cli import main
from hybridlab.core.compare import parse_lrs, run_compare, summarize
from hybridlab.core.errors import HybridlabError

MODEL = """name: {name}
vocab_size: 2
d_model: 8
layers:
{layers}"""
BLOCK = "  - mixer: {kind: attention, heads: 2}\n    ffn: {kind: swiglu, hidden: 16}\n"
PIPELINE = """name: parity-test
model: one.yaml
data: {kind: parity, length: 6, eval_lengths: [6, 12]}
optimizer: {kind: adamw, lr: 1.0e-3}
steps: 6
batch_size: 4
eval_batches: 1
checkpoint_every: 2
log_every: 1
device: cpu
"""


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.yaml").write_text(MODEL.format(name="one", layers=BLOCK))
    (tmp_path / "two.yaml").write_text(MODEL.format(name="two", layers=BLOCK * 2))
    (tmp_path / "p.yaml").write_text(PIPELINE)
    return tmp_path


def compare(out, lines=None, **kwargs):
    options = dict(lrs=[1e-3, 3e-3], out=out, progress=False, echo=(lines.append if lines is not None else lambda s: None))
    options.update(kwargs)
    return run_compare(["one.yaml", "two.yaml"], "p.yaml", **options)


def results(out):
    return {(r["spec"], r["seed"], r["lr"]): r["metrics"]
            for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_compare_trains_every_cell_and_writes_tables_and_plots(files):
    lines = []
    out = compare(files / "out", lines, seeds=2)
    rows = results(out)
    assert set(rows) == {(s, seed, lr) for s in ("one", "two") for seed in (0, 1) for lr in (1e-3, 3e-3)}
    assert all({"len6/accuracy", "len12/accuracy", "len6/loss"} <= set(m) for m in rows.values())
    assert lines[0].startswith("[1/8] one seed 0 lr 0.001: training 6 steps; ETA after this cell")
    assert "ETA " in lines[1] and "for the 7 cell(s) left" in lines[1]
    table = (out / "results.md").read_text()
    assert "8 of 8 cells finished" in table and "best lr per spec is chosen by the mean `len6/accuracy`" in table
    best = table.split("## Best learning rate per spec")[1].split("##")[0]
    assert ("| spec | params | lr | seeds | len6/accuracy | len6/accuracy_last | len12/accuracy | len12/accuracy_last "
            "| len6/loss | len12/loss | s/cell |") in best
    assert sum(line.startswith("| one |") for line in best.splitlines()) == 1
    assert " ± " in best
    assert (out / "accuracy_vs_length.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    assert (out / "cells" / "two" / "seed1-lr0.003" / "checkpoints").is_dir()


def test_an_interrupted_compare_resumes_where_it_stopped(files, monkeypatch):
    reference = results(compare(files / "whole"))

    calls = {"n": 0}
    real_step = train_module.Trainer.train_step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 6 + 5:  # the second cell, after its step-4 checkpoint
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train_module.Trainer, "train_step", dying_step)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        compare(files / "part", lines)
    assert lines[-1] == "interrupted in one seed 0 lr 0.003 at step 4; run the same command again to continue"
    monkeypatch.setattr(train_module.Trainer, "train_step", real_step)
    assert set(results(files / "part")) == {("one", 0, 1e-3)}  # the finished cell is recorded

    started = []
    real_init = train_module.Trainer.__init__

    def recording_init(self, spec, run_dir, **kwargs):
        real_init(self, spec, run_dir, **kwargs)
        started.append((run_dir.name, kwargs["resume"], self.step))

    monkeypatch.setattr(train_module.Trainer, "__init__", recording_init)
    lines = []
    compare(files / "part", lines)
    assert lines[0] == "[1/4] one seed 0 lr 0.001: done, skipped"
    assert lines[1].startswith("[2/4] one seed 0 lr 0.003: resuming at step 4/6")
    assert started == [("seed0-lr0.003", True, 4), ("seed0-lr0.001", False, 0), ("seed0-lr0.003", False, 0)]
    assert results(files / "part") == reference  # exact: resumed cells equal uninterrupted ones
    resumed = json.loads((files / "part" / "cells" / "one" / "seed0-lr0.003" / "result.json").read_text())
    spent_before = float((files / "part" / "cells" / "one" / "seed0-lr0.003" / "seconds.partial").read_text())
    assert resumed["resumed"] and resumed["seconds"] > spent_before > 0


def test_a_cell_killed_before_its_first_checkpoint_starts_over(files, monkeypatch):
    real_step = train_module.Trainer.train_step
    calls = {"n": 0}

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train_module.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        compare(files / "out", lrs=None)
    monkeypatch.setattr(train_module.Trainer, "train_step", real_step)
    lines = []
    compare(files / "out", lines, lrs=None)
    assert lines[0].startswith("[1/2] one seed 0 lr 0.001: training 6 steps")
    assert len(results(files / "out")) == 2


def test_a_changed_pipeline_does_not_mix_into_old_cells(files):
    compare(files / "out", lrs=None)
    with pytest.raises(HybridlabError, match=r"seed0-lr0.001 was trained with a different pipeline \(-steps: 6; \+steps: 8\)"):
        compare(files / "out", lrs=None, overrides=["steps=8"])


def test_without_matplotlib_compare_writes_tables_and_says_so(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    lines = []
    out = compare(files / "out", lines, lrs=None)
    assert not list(out.glob("*.png"))
    assert "matplotlib is not installed (pip install 'hybridlab[plot]')" in (out / "results.md").read_text()
    assert "matplotlib is not installed" in lines[-1]


def test_adding_learning_rates_later_trains_only_the_new_cells(files):
    compare(files / "out", lrs=None)  # the pipeline's lr, 1e-3
    lines = []
    compare(files / "out", lines, lrs=[1e-3, 3e-3])
    assert lines[0] == "[1/4] one seed 0 lr 0.001: done, skipped"
    assert lines[1].startswith("[2/4] one seed 0 lr 0.003: training 6 steps")
    assert lines[2] == "[3/4] two seed 0 lr 0.001: done, skipped"
    assert lines[3].startswith("[4/4] two seed 0 lr 0.003: training 6 steps")
    assert len(results(files / "out")) == 4


def test_specs_with_the_same_name_are_told_apart_by_file_name(files):
    (files / "two.yaml").write_text(MODEL.format(name="one", layers=BLOCK * 2))
    out = compare(files / "out", lrs=None)
    assert {spec for spec, _, _ in results(out)} == {"one", "two"}


def row(spec, lr, acc, loss):
    return {"spec": spec, "lr": lr, "params": 1, "seconds": 1.0, "metrics": {"len8/loss": loss, "len8/accuracy": acc}}


def test_best_lr_by_accuracy_then_by_loss_and_by_loss_for_loss_metrics():
    rows = [row("a", 1e-3, 0.9, 1.0), row("a", 1e-3, 0.7, 1.0), row("a", 3e-3, 0.85, 0.5),
            row("b", 1e-3, 1.0, 0.3), row("b", 3e-3, 1.0, 0.1)]
    summary = summarize(rows, None)
    assert summary["select"] == "len8/accuracy"
    assert summary["best"] == {"a": 3e-3, "b": 3e-3}  # a: mean 0.8 < 0.85; b: a tie, lower loss wins
    assert summarize(rows, "len8/loss")["best"] == {"a": 3e-3, "b": 3e-3}
    assert summarize(rows[:2] + [row("a", 3e-3, 0.85, 2.0)], "len8/loss")["best"] == {"a": 1e-3}
    with pytest.raises(HybridlabError, match="--select 'len9/accuracy': no such metric"):
        summarize(rows, "len9/accuracy")


def test_parse_lrs():
    assert parse_lrs("1e-3, 3e-3,1e-3") == [1e-3, 3e-3]
    assert parse_lrs(None) is None
    for bad in ("abc", "", "0", "-1e-3", "nan", "1e-3,,3e-3", "1e-3,"):
        with pytest.raises(HybridlabError, match="--lr"):
            parse_lrs(bad)


@pytest.mark.parametrize("args, message", [
    (["one.yaml"], "compare needs --pipeline P"),
    (["one.yaml", "--pipeline", "p.yaml", "--seeds", "x"], "--seeds: expected a number of seeds, got 'x'"),
    (["one.yaml", "--pipeline", "p.yaml", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["one.yaml", "--pipeline", "p.yaml", "--lr", "fast"], "--lr: expected comma-separated numbers"),
    (["one.yaml", "--pipeline", "p.yaml", "--lr", "1e-3,1.0000001e-3"], "name the same cells (0.001, 0.001)"),
    (["nope.yaml", "--pipeline", "p.yaml"], "nope.yaml: no such model spec"),
    (["one.yaml", "--pipeline", "missing.yaml"], "missing.yaml: no such file"),
    (["one.yaml", "--pipeline", "p.yaml", "--set", "steps=0"], "steps: input should be greater than or equal to 1"),
    (["one.yaml", "--pipeline", "p.yaml", "--select", "nope/metric"],
     "--select 'nope/metric': expected SPLIT/METRIC with SPLIT one of the parity task's evaluation splits "
     "(len6, len12)"),
    (["one.yaml", "--pipeline", "p.yaml", "--select", "accuracy"], "--select 'accuracy': expected SPLIT/METRIC"),
    (["p.yaml", "--pipeline", "p.yaml"], "p.yaml:2: this is a training pipeline (it has model, data, optimizer), "
                                         "not a model spec"),
])
def test_bad_compare_input_is_one_line_and_exit_2(files, capsys, args, message):
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (files / "runs").exists()  # nothing trained, no directory made


def test_select_is_checked_against_finished_cells_before_training(files, monkeypatch):
    compare(files / "out", lrs=[1e-3])
    monkeypatch.setattr(train_module.Trainer, "run", lambda self: pytest.fail("trained before checking --select"))
    with pytest.raises(HybridlabError, match="--select 'len6/acuracy': no such metric; the runs report len6/loss"):
        compare(files / "out", select="len6/acuracy")


def test_bad_flags_are_one_line_without_a_traceback(files):
    proc = subprocess.run([sys.executable, "-m", "hybridlab", "compare", "one.yaml", "--pipeline", "p.yaml",
                           "--bogus"], capture_output=True, text=True, cwd=files)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hybridlab: error: unrecognized arguments: --bogus (see hybridlab --help)"]
    proc = subprocess.run([sys.executable, "-m", "hybridlab", "compare"], capture_output=True, text=True, cwd=files)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "the following arguments are required: SPEC" in proc.stderr


def test_names_that_make_the_same_directory_are_told_apart(files):
    """'a b' and 'a_b' both became the directory a_b: the second spec was skipped as done
    and results.jsonl held the first one's result twice."""
    (files / "one.yaml").write_text(MODEL.format(name="a b", layers=BLOCK))
    (files / "two.yaml").write_text(MODEL.format(name="a_b", layers=BLOCK * 2))
    out = compare(files / "out", lrs=None)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["spec"] for r in rows) == ["one", "two"] and rows[0]["params"] != rows[1]["params"]


def test_spec_paths_with_yaml_characters_and_every_bad_spec_at_once(files, capsys):
    """A path holding ' #' or ': ' went through --set model=PATH and was read as YAML;
    only the first bad model spec was reported."""
    odd = files / "my specs #1: x"
    odd.mkdir()
    (odd / "m.yaml").write_text(MODEL.format(name="odd", layers=BLOCK))
    out = run_compare([str(odd / "m.yaml")], "p.yaml", out=files / "out", progress=False, echo=lambda s: None)
    assert [json.loads(line)["spec"] for line in (out / "results.jsonl").read_text().splitlines()] == ["odd"]
    (files / "bad1.yaml").write_text("name: b1\nvocab_size: 2\nd_model: 8\nlayers: []\nfoo: 1\n")
    (files / "bad2.yaml").write_text("name: b2\nvocab_size: 2\nd_model: 8\nlayers: []\nbar: 1\n")
    assert main(["compare", "bad1.yaml", "bad2.yaml", "--pipeline", "p.yaml"]) == 2
    err = capsys.readouterr().err
    assert "bad1.yaml:5: foo: unknown field" in err and "bad2.yaml:5: bar: unknown field" in err


def test_a_run_name_cannot_leave_the_runs_directory(tmp_path):
    from hybridlab.core.train import new_run_dir

    for name in ("../../escape/naïve ✓", "/tmp/abs", ""):
        path = new_run_dir(name, tmp_path / "runs")
        assert path.parent == tmp_path / "runs" and "/" not in path.name


def test_a_pipeline_warning_is_printed_once_not_once_per_cell(files, capsys):
    (files / "p.yaml").write_text(PIPELINE + "schedule: {kind: cosine, warmup: 50}\n")
    compare(files / "out", lrs=[1e-3, 3e-3], seeds=2)
    assert capsys.readouterr().err.count("warmup (50 steps) is longer than the run") == 1


def test_results_md_gives_the_command_that_makes_its_tables(files):
    """results.md's command line left --select out, so it did not reproduce the best-lr
    table; a --set value with spaces is quoted."""
    out = compare(files / "out", lrs=[1e-3], select="len12/accuracy", overrides=["data.eval_lengths=[6, 12]"])
    text = (out / "results.md").read_text()
    assert "--select len12/accuracy`" in text and "--set 'data.eval_lengths=[6, 12]'" in text
