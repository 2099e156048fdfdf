"""hybridlab generate: step-wise decoding from state, prompt tokenization per task, errors."""

import subprocess
import sys

import pytest
import torch

from hybridlab.core.cli import main
from hybridlab.core.errors import HybridlabError
from hybridlab.core.generate import generate, load_run
from hybridlab.core.spec import PipelineSpec
from hybridlab.core.train import Trainer
from hybridlab.registry import default_registry


def make_run(registry, run_dir, mixer=None, data=None, steps=3):
    mixer = mixer or {"kind": "attention", "heads": 2}
    spec = PipelineSpec.model_validate({
        "model": {"vocab_size": 40, "d_model": 48, "layers": [{"mixer": mixer}, {"mixer": mixer}]},
        "data": data or {"kind": "mqar", "vocab": 32, "pairs": 4},
        "steps": steps, "batch_size": 4, "eval_batches": 1, "device": "cpu", "threads": 1,
    }, context={"registry": registry})
    Trainer(spec, run_dir, registry=registry, progress=False).run()
    return run_dir


def decoding_mixers():
    """Every registered mixer kind, with its first registered example config (the kind's
    small config for module-level checks, sized for d_model 48 as in core/verify.py), else its defaults."""
    return [{"kind": kind.name, **(kind.examples[0] if kind.examples else {})}
            for kind in default_registry().kinds("mixer")]


@pytest.mark.parametrize("mixer", decoding_mixers(), ids=lambda m: m["kind"])
def test_greedy_generation_from_state_equals_re_running_the_whole_prefix(registry, tmp_path, mixer):
    run_dir = make_run(registry, tmp_path / "run", mixer)
    new, text = generate(run_dir, "3 20 5 21 3", max_new_tokens=6, registry=registry)
    _, model, _ = load_run(run_dir, registry=registry)
    tokens = [3, 20, 5, 21, 3]
    with torch.no_grad():
        for token in new:
            logits = model(torch.tensor([tokens])).logits[0, -1]  # the whole prefix, in parallel
            assert logits[token] >= logits.max() - 1e-4  # the step-decoded choice is the argmax
            tokens.append(token)
    assert text == " ".join(map(str, tokens))


def test_sampling_is_seeded(registry, tmp_path):
    run_dir = make_run(registry, tmp_path / "run")
    a, _ = generate(run_dir, "1 2 3", max_new_tokens=12, temperature=1.0, seed=1, registry=registry)
    b, _ = generate(run_dir, "1 2 3", max_new_tokens=12, temperature=1.0, seed=1, registry=registry)
    c, _ = generate(run_dir, "1 2 3", max_new_tokens=12, temperature=1.0, seed=2, registry=registry)
    assert a == b and a != c and len(a) == 12


def test_named_tokens_in_and_out(registry, tmp_path, capsys):
    data = {"kind": "factworld", "agents": 3, "attributes": 1, "values": 4, "objects": 2, "length": 2, "queries": 1}
    run_dir = make_run(registry, tmp_path / "run", data=data, steps=1)
    assert main(["generate", str(run_dir), "--prompt", "| give o1 g2 | who o1", "--max-new-tokens", "1"]) == 0
    words = capsys.readouterr().out.split()
    assert words[:6] == ["|", "give", "o1", "g2", "|", "who"] and len(words) == 8
    # a Unicode digit is an unknown token, not a crash in int()
    assert main(["generate", str(run_dir), "--prompt", "give ²", "--max-new-tokens", "1"]) == 2
    assert "unknown token '²'" in capsys.readouterr().err


def test_text_prompts_are_bytes(registry, tmp_path):
    (tmp_path / "a.txt").write_text("hello world, hello there. " * 40)
    data = {"kind": "text", "files": [str(tmp_path / "a.txt")], "length": 16}
    spec = PipelineSpec.model_validate({
        "model": {"vocab_size": 256, "d_model": 16, "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
        "data": data, "steps": 2, "batch_size": 2, "eval_batches": 1, "device": "cpu"}, context={"registry": registry})
    Trainer(spec, tmp_path / "run", registry=registry, progress=False).run()
    proc = subprocess.run([sys.executable, "-m", "hybridlab", "generate", str(tmp_path / "run"), "--prompt", "héllo",
                           "--max-new-tokens", "5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("héllo")
    # bytes that are not UTF-8 on the command line reach the byte-level model as bytes
    proc = subprocess.run([sys.executable, "-m", "hybridlab", "generate", str(tmp_path / "run"), "--prompt",
                           b"a\xff\xfe", "--max-new-tokens", "1"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    from hybridlab.plugins.data.text import encode_bytes

    assert encode_bytes("a\udcff\udcfe") == [97, 255, 254]


def test_generate_does_not_repeat_training_warnings(registry, tmp_path, capsys):
    import yaml

    run_dir = make_run(registry, tmp_path / "run")
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    saved["schedule"]["warmup"] = 50  # longer than the run's 3 steps: training warns of it
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "1 2", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().err == ""


def test_seeds_past_32_bits_give_their_own_samples(registry, tmp_path):
    """torch keeps 32 bits of a seed: 2^32 + 1 sampled exactly as 1 did."""
    run_dir = make_run(registry, tmp_path / "run")
    a, _ = generate(run_dir, "1 2 3", max_new_tokens=12, temperature=1.0, seed=1, registry=registry)
    b, _ = generate(run_dir, "1 2 3", max_new_tokens=12, temperature=1.0, seed=2 ** 32 + 1, registry=registry)
    assert a != b


def test_a_tiny_temperature_samples_the_argmax(registry, tmp_path):
    """logits / 1e-40 overflowed to inf and multinomial raised on NaN probabilities."""
    run_dir = make_run(registry, tmp_path / "run")
    greedy, _ = generate(run_dir, "1 2 3", max_new_tokens=5, registry=registry)
    for temperature in (1e-40, 5e-324):
        tiny, _ = generate(run_dir, "1 2 3", max_new_tokens=5, temperature=temperature, registry=registry)
        assert tiny == greedy


def test_errors(registry, tmp_path, capsys):
    run_dir = make_run(registry, tmp_path / "run")
    with pytest.raises(HybridlabError, match=r"prompt token ids \[99\] are outside the model's vocabulary \(0..39\)"):
        generate(run_dir, "1 99", registry=registry)
    with pytest.raises(HybridlabError, match="the prompt is empty"):
        generate(run_dir, "  ", registry=registry)
    for temperature in (-1, float("nan"), float("inf")):
        with pytest.raises(HybridlabError, match="--temperature must be a finite number >= 0"):
            generate(run_dir, "1", temperature=temperature, registry=registry)
    for seed in (-1, 2 ** 64):  # -1 wrapped onto another seed, 2^64 overflowed in torch
        with pytest.raises(HybridlabError, match=r"--seed must be in \[0, 2\^63\)"):
            generate(run_dir, "1", temperature=1.0, seed=seed, registry=registry)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "spec.yaml").write_text((run_dir / "spec.yaml").read_text())
    with pytest.raises(HybridlabError, match="no checkpoint yet"):
        generate(tmp_path / "fresh", "1", registry=registry)
    for args, message in [(["generate", str(run_dir)], "generate needs --prompt"),
                          (["generate", str(tmp_path / "nowhere"), "--prompt", "1"], "not a run directory"),
                          (["generate", str(run_dir), "--prompt", "one"], "whitespace-separated token ids")]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def test_generate_compile_gives_the_same_text_and_refuses_bad_combinations(registry, tmp_path, capsys):
    """``hybridlab generate --compile eager``: the text of the uncompiled call; an unknown
    compiler and ``--compile`` with ``--speculative`` are one-line errors, exit 2."""
    run_dir = make_run(registry, tmp_path / "run")
    args = ["generate", str(run_dir), "--prompt", "3 20 5 21 3", "--max-new-tokens", "5"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--compile", "eager"]) == 0
    assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit) as exc:
        main(args + ["--compile", "fast"])
    assert exc.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    assert main(args + ["--compile", "eager", "--speculative"]) == 2
    err = capsys.readouterr().err
    assert "--compile captures the one-token step; --speculative" in err and "Traceback" not in err
