"""dpo: the loss and its metrics, answer log-probabilities, the objective against the
frozen starting weights or a run directory, the validate-time errors, and the tasks'
preference pairs (added without changing a single existing batch)."""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlab.core.checkpoint import latest_checkpoint
from hybridlab.core.errors import SpecError
from hybridlab.core.model import Model
from hybridlab.core.objectives import ObjectiveRun, Objectives, start_copy
from hybridlab.core.spec import ModelSpec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.plugins.data.factworld import FactWorld, FactWorldConfig
from hybridlab.plugins.data.mqar import MQAR, MQARConfig
from hybridlab.plugins.data.word_problem import CyclicConfig, ParityConfig, S5Config, WordProblem
from hybridlab.plugins.loss.dpo import DPOConfig, completion_logps, dpo_loss

ROOT = Path(__file__).resolve().parents[3]

LAYER = {"mixer": {"kind": "attention", "heads": 2}, "norm": {"kind": "rmsnorm"},
         "ffn": {"kind": "swiglu", "hidden": 32}}


def tiny_model(registry, vocab: int = 16, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    spec = {"name": "t", "vocab_size": vocab, "d_model": 16, "layers": [LAYER, LAYER]}
    return Model(ModelSpec.model_validate(spec, context={"registry": registry}), registry)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def pipeline(vocab: int, objectives: list[str], model: str | None = None) -> str:
    """A pipeline's text: an inline tiny model (or ``model``'s line), MQAR, ``objectives``
    (one flow mapping per line, from line 9, or line 4 after a one-line model)."""
    model = model or (f"model:\n  name: t\n  vocab_size: {vocab}\n  d_model: 16\n  layers:\n"
                      "    - mixer: {kind: attention, heads: 2}")
    return (f"{model}\ndata: {{kind: mqar, vocab: {vocab}, pairs: 2}}\nobjectives:\n"
            + "".join(f"  - {line}\n" for line in objectives)
            + "steps: 1\nbatch_size: 4\neval_batches: 1\nthreads: 1\n")


# ---------------------------------------------------------------- the functional tier


def test_dpo_loss_is_the_formula_with_label_smoothing():
    torch.manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(6) for _ in range(4))
    chosen.requires_grad_()
    for smoothing in (0.0, 0.2):
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=smoothing)
        h = 0.5 * ((chosen - ref_chosen) - (rejected - ref_rejected))
        expected = (-(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)).mean()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(metrics["reward_margin"], h.mean().detach())
        assert float(metrics["preference_accuracy"]) == float((h > 0).float().mean())
        torch.testing.assert_close(metrics["reward_chosen"], (0.5 * (chosen - ref_chosen)).mean().detach())
        torch.testing.assert_close(metrics["logp_rejected"], rejected.mean())
    chosen.grad = None
    dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)[0].backward()
    assert (chosen.grad < 0).all()  # raising a chosen answer's log-probability always lowers the loss


def test_completion_logps_are_each_tokens_log_probability_given_its_prefix():
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    got = completion_logps(logits, tokens, 4, temperature=0.7)
    expected = torch.stack([torch.stack([torch.log_softmax(logits[b, t - 1] / 0.7, -1)[tokens[b, t]]
                                         for t in range(4, 7)]) for b in range(3)])
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- the objective


def _run(objectives, model, batch):
    return ObjectiveRun(batch, None, model, lambda tokens, hidden=(): model(tokens), objectives.models[0], None,
                        0, 10, True, {}, None)


def test_dpo_starts_at_log_2_against_its_start_and_learns_the_preference(registry, one_thread):
    """At the first step the policy is the reference: h = 0, loss log 2, margin 0, and no
    pair counts as preferred. A few steps on the pairs of a task a tiny model can learn
    (cyclic words of length 1: the answer copies the prompt's token) must raise the
    preference accuracy on held-out pairs, while the reference stays the starting weights."""
    task = WordProblem(CyclicConfig(order=5, length=1), seed=0)
    model = tiny_model(registry)
    objectives = Objectives([DPOConfig(beta=0.5)], model, registry, device=torch.device("cpu"),
                            start=lambda: start_copy(model))
    reference = objectives.models[0]["reference"]
    frozen = [p.clone() for p in reference.parameters()]
    loss, metrics = objectives.items[0](_run(objectives, model, task.batch("train", 0, 16)))
    assert abs(float(loss.detach()) - math.log(2)) < 1e-6
    assert float(metrics["reward_margin"]) == 0 and float(metrics["preference_accuracy"]) == 0

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(25):
        loss, _ = objectives.items[0](_run(objectives, model, task.batch("train", step, 32)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, metrics = objectives.items[0](_run(objectives, model, task.batch("len1", 0, 64)))
    assert float(metrics["preference_accuracy"]) > 0.8 and float(metrics["reward_margin"]) > 0.5, metrics
    assert float(metrics["logp_chosen"]) > float(metrics["logp_rejected"])
    assert all(p.equal(q) for p, q in zip(reference.parameters(), frozen))


def test_dpo_tiny_spec_validates_and_trains(tmp_path, registry, one_thread):
    spec = load_pipeline(ROOT / "specs" / "train" / "dpo-tiny.yaml", ["steps=2", "batch_size=4", "eval_batches=1"])
    assert spec.objectives[0].reference == "start"
    Trainer(spec, run_dir=tmp_path / "run", registry=registry, progress=False).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(line for line in lines if "reward_margin" in line)
    assert {"preference_accuracy", "logp_chosen", "logp_rejected"} <= set(first)
    assert any("eval/reward_margin" in line for line in lines)


def test_dpo_reference_from_a_run_directory_and_its_located_errors(tmp_path, monkeypatch, registry, one_thread):
    """A run as both the starting weights (``model: RUN``) and the reference starts at
    margin 0; a run of another vocabulary, or none at all, is a located error."""
    monkeypatch.chdir(tmp_path)
    for name, vocab in (("base", 16), ("other", 32)):
        write(tmp_path, f"{name}.yaml", pipeline(vocab, ["{kind: cross_entropy}"]))
        Trainer(load_pipeline(f"{name}.yaml"), run_dir=tmp_path / name, registry=registry, progress=False).run()

    write(tmp_path, "p.yaml", pipeline(16, ["{kind: dpo, reference: base, beta: 0.3}"], model="model: base"))
    spec = load_pipeline("p.yaml")
    assert spec.objectives[0].reference == str(latest_checkpoint(tmp_path / "base").resolve())  # pinned to the checkpoint it names now
    trainer = Trainer(spec, run_dir=tmp_path / "dpo", registry=registry, progress=False)
    with torch.no_grad():
        _, metrics = trainer._loss(trainer._batch("train", 0))
    assert abs(float(metrics["reward_margin"])) < 1e-6

    write(tmp_path, "q.yaml", pipeline(16, ["{kind: dpo, reference: other}", "{kind: dpo, name: b, reference: gone}"],
                                       model="model: base"))
    with pytest.raises(SpecError) as info:
        load_pipeline("q.yaml")
    got = {(p.file, p.line, p.path): p.message for p in info.value.problems}
    assert set(got) == {("q.yaml", 4, "objectives[0].reference"), ("q.yaml", 5, "objectives[1].reference")}, got
    assert "vocab_size 32 but the trained model has 16" in got["q.yaml", 4, "objectives[0].reference"]
    assert "run directory 'gone' not found" in got["q.yaml", 5, "objectives[1].reference"]


def test_dpo_config_errors_are_located(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "p.yaml", pipeline(16, ["{kind: dpo, beta: 0, label_smoothing: 0.5}"]))
    with pytest.raises(SpecError) as info:
        load_pipeline("p.yaml")
    got = {(p.file, p.line, p.path): p.message for p in info.value.problems}
    assert set(got) == {("p.yaml", 9, "objectives[0].beta"), ("p.yaml", 9, "objectives[0].label_smoothing")}, got
    assert "greater than 0, got 0" in got["p.yaml", 9, "objectives[0].beta"]

    (tmp_path / "corpus.txt").write_text("some text to read " * 40)
    write(tmp_path, "t.yaml", """
        model: {name: t, vocab_size: 256, d_model: 16, layers: [{mixer: {kind: attention, heads: 2}}]}
        data: {kind: text, files: [corpus.txt], length: 8}
        objectives:
          - {kind: dpo}
    """)
    with pytest.raises(SpecError) as info:
        load_pipeline("t.yaml")
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.path) == ("t.yaml", 4, "objectives[0].kind")
    assert "reads batch fields prompt, answer, rejected, which task 'text' does not yield" in problem.message


# ---------------------------------------------------------------- the tasks' pairs


def test_rejected_answers_are_wrong_of_the_same_kind_and_cover_the_alternatives():
    mqar = MQAR(MQARConfig(vocab=9, pairs=2), seed=0)  # keys 1..4, values 5..8
    seen = set()
    for index in range(20):
        batch = mqar.batch("train", index, 16)
        assert (batch["rejected"] != batch["answer"]).all()
        assert ((batch["rejected"] >= 5) & (batch["rejected"] <= 8)).all()
        seen |= {(a, r) for a, r in zip(batch["answer"][:, 0].tolist(), batch["rejected"][:, 0].tolist())}
    assert seen == {(a, r) for a in range(5, 9) for r in range(5, 9) if a != r}  # every wrong value turns up
    parity = WordProblem(ParityConfig(length=5), seed=0).batch("train", 0, 16)
    assert (parity["rejected"] == 1 - parity["answer"]).all()


# digests of inputs, targets (and query_type) as the tasks yielded them before prompts,
# answers and pairs were added: the new fields are drawn after everything else, so every
# existing run keeps its data (torch 2.13's CPU generator)
BEFORE = {
    "mqar/0/train/0": "698589a8cfe4e7db", "mqar/0/train/5": "819aa9c0607ee128", "mqar/0/eval/2": "2a72197902198656",
    "mqar/3/train/0": "10591a8c5806e91d", "mqar/3/train/5": "6a542e99cf856f5b", "mqar/3/eval/2": "30ce346e305360f5",
    "mqar-lengths/0/train/1": "55e7a3157f2fdf46", "mqar-lengths/0/len40/0": "c1ad4a65a5c07779",
    "mqar-lengths/3/train/1": "54d3623c1facc6f6", "mqar-lengths/3/len40/0": "857b0c7fc89a3c48",
    "s5/0/train/0": "9d3f533b0d02b6ac", "s5/0/train/3": "01844b9f6ca2de9e", "s5/0/len12/1": "1cc6a777b9f218e9",
    "s5/3/train/0": "331f1c31e894742c", "s5/3/train/3": "f491b0727eab14f6", "s5/3/len12/1": "0a6cbab1bca60235",
    "cyclic/0/train/2": "b30d949fc09c02f5", "cyclic/3/train/2": "8c904ec4efaf86ba",
    "parity/0/train/4": "b3da23ec91835ad4", "parity/3/train/4": "4a8c7ce6b042b177",
    "factworld/0/train/0": "73a89407484ada89", "factworld/0/train/7": "5315b8a385080dce",
    "factworld/0/len16/1": "e6935f107539accf", "factworld/3/train/0": "30da8c1752026824",
    "factworld/3/train/7": "bd2cbc39e9b43064", "factworld/3/len16/1": "ee07dddbfda8855d",
    "factworld-fixed/0/len5/0": "72cf7d847fe4cb30", "factworld-fixed/0/len20/3": "37bce6e353ef968e",
    "factworld-fixed/3/len5/0": "ba3d94e8f10778aa", "factworld-fixed/3/len20/3": "b7c4b6252a34ffd1",
}


def test_existing_batches_are_bit_identical_to_before_the_new_fields():
    cases = {
        "mqar": (MQAR, MQARConfig(vocab=64, pairs=8)),
        "mqar-lengths": (MQAR, MQARConfig(vocab=32, pairs=4, queries=3, seq_len=24, eval_lengths=[40])),
        "s5": (WordProblem, S5Config(length=7, eval_lengths=[7, 12])),
        "cyclic": (WordProblem, CyclicConfig(order=7, length=9)),
        "parity": (WordProblem, ParityConfig(length=11)),
        "factworld": (FactWorld, FactWorldConfig()),
        "factworld-fixed": (FactWorld, FactWorldConfig(facts="fixed", agents=3, query_types=["state", "composition"],
                                                       eval_lengths=[5, 20])),
    }
    for key, digest in BEFORE.items():
        name, seed, split, index = key.split("/")
        cls, config = cases[name]
        batch = cls(config, seed=int(seed)).batch(split, int(index), 6)
        h = hashlib.sha256()
        for field in sorted({"inputs", "targets", "query_type"} & set(batch)):
            h.update(field.encode())
            h.update(batch[field].numpy().tobytes())
        assert h.hexdigest()[:16] == digest, key
