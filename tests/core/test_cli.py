"""The hybridlab command line: exit status 2 and one clear line for bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybridlab.core.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "specs" / "models" / "tiny-hybrid.yaml"


def run(*args, cwd=None):
    """The CLI in a subprocess, as a user runs it (checks for tracebacks too)."""
    proc = subprocess.run([sys.executable, "-m", "hybridlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def test_version():
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("hybridlab 0.")


def test_list_shows_kinds_implementations_and_package(capsys):
    assert main(["list", "mixer"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("mixer") and " attention " in l)
    assert "sdpa" in line and "reference" in line and "hybridlab 0.1.0" in line


def test_list_unknown_category_exits_2(capsys):
    assert main(["list", "mixers"]) == 2
    assert "unknown category 'mixers'" in capsys.readouterr().err


def test_plugins_lists_builtins_with_what_they_registered(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "[attention] hybridlab.plugins.mixer.attention" in out
    assert "mixer.attention:sdpa" in out


def test_validate_reports_every_problem_with_file_line_and_path(tmp_path):
    bad = tmp_path / "tiny.yaml"
    bad.write_text(TINY.read_text()
                   .replace("heads: 4, kv_heads: 2}", "heads: 4, kv_heads: 3}")
                   .replace("{kind: rmsnorm}\nhead", "{kind: rmsnrm}\nhead"))
    code, out, err = run("validate", bad.name, cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    text = bad.read_text().splitlines()
    kv_line = next(i for i, t in enumerate(text, 1) if "kv_heads: 3" in t)
    norm_line = next(i for i, t in enumerate(text, 1) if t.startswith("norm:"))
    assert f"tiny.yaml:{kv_line}: layers[2].mixer.kv_heads: must divide heads (4), got 3" in lines
    unknown = f"tiny.yaml:{norm_line}: norm: unknown normalization kind 'rmsnrm' (did you mean 'rmsnorm'?)"
    assert any(l.startswith(unknown) for l in lines)


def test_validate_ok_and_set_override(capsys):
    assert main(["validate", str(TINY), "--set", "layers[2].mixer.heads=8"]) == 0
    assert "OK (model 'tiny-hybrid', 3 blocks)" in capsys.readouterr().out
    assert main(["validate", str(TINY), "--set", "layers[2].mixer.heads=3"]) == 2
    # the override made the file's kv_heads wrong: the error points at the file's line
    line = next(i for i, text in enumerate(TINY.read_text().splitlines(), 1) if "kv_heads: 2" in text)
    assert f"tiny-hybrid.yaml:{line}: layers[2].mixer.kv_heads: must divide heads (3), got 2" in capsys.readouterr().err
    assert main(["validate", str(TINY), "--set", "d_model=-4"]) == 2
    assert "--set: d_model: input should be greater than or equal to 1, got -4" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["validate", "missing.yaml"], "missing.yaml: no such file"),
    (["train", "missing.yaml"], "missing.yaml: no such file"),
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "--set", "steps"], "--set steps: expected KEY=VALUE"),
    (["train", "--set", "steps=-1", "--out", "x"], "steps: input should be greater than or equal to 1, got -1"),
    (["train", "--resume", "nowhere"], "nowhere: not a run directory"),
    (["summary", str(TINY), "--device", "cuda:x"], "unknown device 'cuda:x'"),  # cuda:N plans without a GPU
    (["summary", str(TINY), "--seq-len", "-5"], "argument --seq-len: expected a positive whole number, got '-5'"),
    (["summary", str(TINY), "--seq-len", "0"], "argument --seq-len: expected a positive whole number, got '0'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    code, out, err = run(*args, cwd=tmp_path)
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_invalid_yaml_syntax_names_the_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: x\nlayers:\n  - mixer: {kind: attention, heads: 4\nnorm: 1\n")
    code, _, err = run("validate", "broken.yaml", cwd=tmp_path)
    assert code == 2 and err.startswith("broken.yaml:") and "invalid YAML" in err


def test_summary_prints_chosen_implementation_params_and_state(capsys):
    assert main(["summary", str(TINY), "--seq-len", "1000"]) == 0
    out = capsys.readouterr().out
    rows = {l.split()[0]: l for l in out.splitlines() if l.split()[:1] in (["0"], ["1"], ["2"])}
    assert rows["0"].split()[1:3] == rows["1"].split()[1:3] == ["gated_deltanet", "chunk"]
    assert rows["2"].split()[1:3] == ["attention", "sdpa"] and "reference: lower priority than sdpa" in rows["2"]
    # the attention layer: 2 kv heads x head_dim 16 x 2 (k and v) x 1000 tokens x 4 bytes (float32)
    assert "250.0 KiB" in rows["2"]
    assert "total parameters:" in out


def test_output_to_a_closed_pipe_ends_quietly():
    """`hybridlab summary SPEC | head -4`: the reader is gone before the output is written;
    no BrokenPipeError traceback, and the status a SIGPIPE would give (128 + 13)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "hybridlab", "summary", str(TINY)], stdout=write,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_validate_expand_v_inf_is_one_line(tmp_path):
    (tmp_path / "m.yaml").write_text("vocab_size: 64\nd_model: 50\nlayers:\n"
                                     "  - mixer: {kind: gated_deltanet, heads: 2, expand_v: .inf}\n")
    code, _, err = run("validate", "m.yaml", cwd=tmp_path)
    assert (code, err) == (2, "m.yaml:4: layers[0].mixer.expand_v: input should be a finite number, got inf\n")


def test_train_a_few_steps_writes_a_run_directory(tmp_path):
    code, out, err = run("train", "--set", "steps=3", "--set", "eval_batches=1", "--out", tmp_path / "r", "--quiet")
    assert code == 0, err
    assert "eval accuracy:" in out
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "eval/accuracy" in rows[-1]
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    code, out, err = run("train", "--resume", tmp_path / "r", "--set", "steps=5", "--quiet")
    assert code == 0, err
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step-000005"


def test_a_pin_that_can_never_serve_is_a_located_spec_error(tmp_path):
    """SDPA has no logit softcap on any device: a spec pinning it is wrong everywhere,
    so validate says so at the pin's line instead of training failing at its first step."""
    (tmp_path / "m.yaml").write_text(
        "vocab_size: 64\nd_model: 32\nlayers:\n"
        "  - mixer: {kind: attention, heads: 2, softcap: 30.0}\n"
        "    impl: {attention: sdpa}\n"
        "  - mixer: {kind: attention, heads: 2}\n"
        "    impl: {attention: sdpa}\n")
    code, _, err = run("validate", "m.yaml", cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1, err  # the second block's pin is fine
    assert err.startswith("m.yaml:5: layers[0].impl.attention: 'sdpa' can never serve the attention at "
                          "layers[0].mixer:") and "soft-cap" in err


def test_a_pin_for_a_kind_the_block_lacks_is_an_error(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "vocab_size: 64\nd_model: 32\nlayers:\n"
        "  - mixer: {kind: gated_deltanet, heads: 2}\n"
        "    impl: {attention: reference}\n")
    code, _, err = run("validate", "m.yaml", cwd=tmp_path)
    assert (code, err) == (2, "m.yaml:5: layers[0].impl.attention: pins 'attention', but this block has no attention "
                              "(its kinds: gated_deltanet, rmsnorm, swiglu); a pin in defaults applies only to the "
                              "blocks that have the kind\n")


def _summary_rows(tmp_path, text: str) -> dict[str, list[str]]:
    """`hybridlab summary` of a spec written from ``text``: layer -> [mixer, impl]."""
    (tmp_path / "m.yaml").write_text(text)
    code, out, err = run("summary", "m.yaml", cwd=tmp_path)
    assert code == 0, err
    return {l.split()[0]: l.split()[1:3] for l in out.splitlines() if l.split()[:1] in (["0"], ["1"])}


def test_a_pin_in_defaults_applies_to_the_blocks_that_have_the_kind(tmp_path):
    """defaults: {impl: {attention: reference}} in a hybrid validated, then every command
    failed on the recurrent blocks (which have no attention to pin)."""
    hybrid = "  - mixer: {kind: gated_deltanet, heads: 2}\n  - mixer: {kind: attention, heads: 2}\n"
    rows = _summary_rows(tmp_path, "vocab_size: 64\nd_model: 32\ndefaults:\n  impl: {attention: reference}\n"
                                   "layers:\n" + hybrid)
    assert rows == {"0": ["gated_deltanet", "chunk"], "1": ["attention", "reference"]}
    # a block's own pin overrides the defaults' in either spelling (both were kept, and the
    # build called the bare one unused)
    rows = _summary_rows(tmp_path, "vocab_size: 64\nd_model: 32\ndefaults:\n  impl: {attention: sdpa}\n"
                                   "layers:\n" + hybrid + "    impl: {mixer.attention: reference}\n")
    assert rows["1"] == ["attention", "reference"]


def test_summary_shows_the_block_pin(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIDLAB_IMPL", raising=False)
    (tmp_path / "m.yaml").write_text(
        "vocab_size: 64\nd_model: 32\nlayers:\n"
        "  - mixer: {kind: gated_deltanet, heads: 2}\n"
        "    impl: {gated_deltanet: reference}\n"
        "  - mixer: {kind: gated_deltanet, heads: 2}\n")
    code, out, err = run("summary", "m.yaml", cwd=tmp_path)
    assert code == 0, err
    rows = {l.split()[0]: l for l in out.splitlines() if l.split()[:1] in (["0"], ["1"])}
    assert rows["0"].split()[1:3] == ["gated_deltanet", "reference"] and "pinned to reference" in rows["0"]
    assert rows["1"].split()[1:3] == ["gated_deltanet", "chunk"]


def test_validate_reports_size_mistakes_beside_a_field_mistake_in_the_same_block(tmp_path):
    """A block whose norm has a bad field still has its mixer's size check run: one
    validate shows both, instead of the second only after the first is fixed."""
    (tmp_path / "m.yaml").write_text(
        "vocab_size: 64\nd_model: 32\nlayers:\n"
        "  - mixer: {kind: attention, heads: 3}\n"
        "    norm: {kind: rmsnorm, eps: -1.0}\n")
    code, _, err = run("validate", "m.yaml", cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines() == [
        "m.yaml:5: layers[0].norm.eps: input should be greater than 0, got -1.0",
        "m.yaml:4: layers[0].mixer.heads: must divide d_model (32) unless head_dim is set, got 3"], err


def test_numbers_that_cannot_train_are_spec_errors(tmp_path):
    """Each of these validated and then failed in training with a traceback (betas, a
    huge lr) or trained to NaN (.inf); a decimal 2.0 passed for an integer field."""
    (tmp_path / "p.yaml").write_text(
        f"model: {TINY}\ndata: {{kind: mqar, vocab: 64, pairs: 8}}\n"
        "optimizer: {kind: adamw, lr: 1.0e+300, betas: [1.5, -1]}\n"
        "schedule: {kind: cosine, warmup: 5, min_ratio: .inf}\n"
        "batch_size: 2.0\nsteps: 5\n")
    code, _, err = run("validate", "p.yaml", cwd=tmp_path)
    assert code == 2 and err.splitlines() == [
        "p.yaml:3: optimizer.lr: must be at most float32's largest value (3.4e38), got 1e+300",
        "p.yaml:3: optimizer.betas[0]: input should be less than 1, got 1.5",
        "p.yaml:3: optimizer.betas[1]: input should be greater than or equal to 0, got -1",
        "p.yaml:4: schedule.min_ratio: input should be a finite number, got inf",
        "p.yaml:5: batch_size: input should be a valid integer, not a decimal number, got 2.0"], err


def test_a_pipeline_that_gets_its_model_through_extends_is_a_pipeline(tmp_path):
    """validate/summary/verify judged pipeline-or-model on the top file alone and
    rejected it as 'a training pipeline, not a model spec', while train ran it."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "p.yaml").write_text(f"model: {TINY}\ndata: {{kind: mqar, vocab: 64, pairs: 8}}\nsteps: 5\n")
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../p.yaml\nname: child\nsteps: 3\n")
    code, out, err = run("validate", "sub/child.yaml", cwd=tmp_path)
    assert (code, out.strip()) == (0, "sub/child.yaml: OK (pipeline 'child', 3 blocks)"), err


def test_run_directories_that_cannot_be_used_are_one_line_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    quick = ("--set", "steps=1", "--set", "schedule.warmup=0", "--set", "eval_batches=1", "--quiet")
    for args, message in [
        (("--out", "afile"), "--out afile: exists and is not a directory"),
        (("--out", "afile/run"), "--out afile/run: cannot create the directory"),
        (("--out", "notes"), "notes is not a run directory and is not empty (it holds notes.txt)"),
        (("--out", ""), "--out is empty"),
    ]:
        code, _, err = run("train", *quick, *args, cwd=tmp_path)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert (tmp_path / "notes").exists() and sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["notes.txt"]
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / ".keep").write_text("")  # a placeholder is not someone's files
    code, _, err = run("train", *quick, "--out", "kept", cwd=tmp_path)
    assert code == 0, err
    code, _, err = run("train", "", cwd=tmp_path)  # it ran the default 800-step job
    assert code == 2 and "the pipeline path is empty" in err


def test_every_bad_pin_of_a_block_is_reported_at_once(tmp_path):
    (tmp_path / "m.yaml").write_text("vocab_size: 64\nd_model: 32\nlayers:\n  - mixer: {kind: attention, heads: 2}\n"
                                     "    impl: {attention: sdpa, atention: x, gated_deltanet: fast}\n")
    code, _, err = run("validate", "m.yaml", cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert "unknown kind 'atention' (did you mean 'attention'?" in err
    assert re.search(r"gated_deltanet has no implementation 'fast' \(has: chunk, (\w+, )*reference\)", err)


def test_a_model_spec_given_as_a_pipeline_and_a_pipeline_without_model_are_one_line(tmp_path):
    (tmp_path / "p.yaml").write_text("data: {kind: mqar}\nsteps: 3\n")
    code, _, err = run("validate", "p.yaml", cwd=tmp_path)
    assert (code, err.count("\n")) == (2, 1) and "looks like a training pipeline (it has data, steps) without model:" in err
    code, _, err = run("train", TINY, "--quiet", cwd=tmp_path)  # it listed 6 unknown or missing fields
    assert (code, err.count("\n")) == (2, 1) and "this is a model spec (it has layers), not a training pipeline" in err


def test_summary_names_the_ffn_implementation_where_the_kind_has_several():
    code, out, err = run("summary", ROOT / "specs" / "models" / "gdn-moe-mhc.yaml")
    assert code == 0, err
    row = next(l for l in out.splitlines() if l.split()[:1] == ["0"])
    assert "moe (grouped)" in row, row  # the two ffn impls: grouped (priority 10) and reference


def test_summary_plans_for_any_cuda_device_and_refuses_others():
    """--device cuda worked without a GPU (planning) but cuda:0 was refused; meta was
    accepted and showed every layer as '-'."""
    code, out, err = run("summary", TINY, "--device", "cuda:0")
    assert code == 0 and "implementations for cuda float32" in out, err
    code, _, err = run("summary", TINY, "--device", "meta")
    assert (code, err.strip()) == (2, "summary plans for cpu or cuda, got 'meta'")


def test_list_credits_each_implementation_to_its_package_and_fails_with_a_failed_plugin(monkeypatch, capsys):
    """Issue 18's list of what a plugin author hit: an implementation another package adds
    to a built-in kind was shown as the kind owner's; a failed plugin left list at status 0."""
    import types

    from hybridlab.core import cli
    from hybridlab.plugins.normalization.rmsnorm import rmsnorm_reference
    from hybridlab.registry import hookimpl, load_registry

    @hookimpl
    def adds(register):
        register.impl("normalization", "rmsnorm", "mine", fn=rmsnorm_reference)

    @hookimpl
    def broken(register):
        raise RuntimeError("boom")

    registry = load_registry([("adds", types.SimpleNamespace(hybridlab_register=adds)),
                              ("broken", types.SimpleNamespace(hybridlab_register=broken))])
    monkeypatch.setattr(cli, "_registry", lambda: registry)
    assert main(["list", "normalization"]) == 1
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if " rmsnorm " in f" {line} ")
    assert "mine (adds" in row and "1 plugin(s) failed to load and are not listed: broken" in err
