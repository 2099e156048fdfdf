"""grpo / gspo: group advantages, clipped ratios per token and per sequence, the KL term,
the objective on a model's own samples, the tasks' prompts and reward oracles, and the
validate-time errors (G < 2, a task without prompts, a reference never read)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from hybridlab.core.config import DataConfig
from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.model import Model
from hybridlab.core.objectives import ObjectiveRun, Objectives, start_copy
from hybridlab.core.spec import ModelSpec, load_pipeline
from hybridlab.core.tasks import Rewards, exact_match
from hybridlab.plugins.data.factworld import COMPOSE, GIVE, RECALL, SEP, WHO, FactWorld, FactWorldConfig
from hybridlab.plugins.data.mqar import MQAR, MQARConfig
from hybridlab.plugins.data.word_problem import CyclicConfig, ParityConfig, S5Config, WordProblem
from hybridlab.plugins.loss.grpo import GRPOConfig, GSPOConfig, group_advantages, grpo_loss

ROOT = Path(__file__).resolve().parents[3]

MODEL = {"name": "t", "vocab_size": 32, "d_model": 16,
         "layers": [{"mixer": {"kind": "attention", "heads": 2}, "norm": {"kind": "rmsnorm"},
                     "ffn": {"kind": "swiglu", "hidden": 32}}],
         "norm": {"kind": "rmsnorm"}, "head": {"kind": "lm", "tied": True}}


def tiny_model(registry, vocab: int = 32, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model(ModelSpec.model_validate({**MODEL, "vocab_size": vocab}, context={"registry": registry}), registry)


def build(registry, config, model) -> Objectives:
    return Objectives([config], model, registry, device=torch.device("cpu"), start=lambda: start_copy(model))


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


PIPELINE = """
    model:
      name: t
      vocab_size: 32
      d_model: 16
      layers:
        - mixer: {kind: attention, heads: 2}
    data: {kind: mqar, vocab: 16, pairs: 2}
    objectives:
"""


# ---------------------------------------------------------------- the functional tier


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3], [2.0, 0.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv.sum(-1), torch.zeros(4), atol=1e-6, rtol=0)
    assert adv[1].eq(0).all() and adv[2].eq(0).all()  # no signal: exactly 0, not 0/eps noise
    torch.testing.assert_close(adv[0].std(), torch.tensor(1.0), atol=1e-3, rtol=0)
    assert adv[3].argmax() == 0 and adv[3].argmin() == 1
    torch.testing.assert_close(group_advantages(rewards, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_at_ratio_one_is_the_policy_gradient(level):
    """One step per batch of samples: old = current, detached. The loss is 0, the gradient
    is -A_i / (B·G·N) on every token of completion i, for both kinds."""
    torch.manual_seed(1)
    logp = (torch.randn(2, 3, 4) - 2).requires_grad_()
    adv = torch.randn(2, 3)
    loss, metrics = grpo_loss(logp, logp.detach(), adv, clip=0.2, level=level)
    loss.backward()
    assert abs(float(loss.detach()) + float(adv.mean())) < 1e-6
    torch.testing.assert_close(logp.grad, (-adv / (2 * 3 * 4))[..., None].expand(2, 3, 4))
    assert float(metrics["clip_fraction"]) == 0


def test_grpo_clips_a_token_gspo_clips_the_sequence():
    """Sequence 0 (advantage +1) has one token whose ratio is 1.5 and one at 1.0: GRPO
    clips the first token (ratio past 1 + 0.3) and still trains the second; GSPO's sequence
    ratio exp(mean log) ≈ 1.22 is inside the range, so both tokens train. Sequence 1
    (advantage -1, ratios 0.5) is clipped by both: below 1 - ε a negative advantage stops."""
    old = torch.zeros(1, 2, 2)
    logp = torch.tensor([[[math.log(1.5), 0.0], [math.log(0.5), math.log(0.5)]]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, metrics = grpo_loss(logp, old, adv, clip=0.3, level="token")
    loss.backward()
    assert logp.grad[0, 0, 0] == 0 and logp.grad[0, 0, 1] < 0 and logp.grad[0, 1].eq(0).all()
    assert float(metrics["clip_fraction"]) == 0.75

    logp.grad = None
    loss, metrics = grpo_loss(logp, old, adv, clip=0.3, level="sequence")
    loss.backward()
    assert (logp.grad[0, 0] < 0).all() and logp.grad[0, 1].eq(0).all()
    assert float(metrics["clip_fraction"]) == 0.5
    s = math.exp(math.log(1.5) / 2)  # the length-normalised ratio of sequence 0
    torch.testing.assert_close(logp.grad[0, 0], torch.full((2,), -s / 2 / 2))  # -A·s·(1/N) / (B·G)


def test_grpo_loss_kl_is_k3_and_pulls_toward_the_reference():
    logp = torch.tensor([[[-1.0, -2.0]]], requires_grad=True)
    reference = torch.tensor([[[-1.0, -1.0]]])
    loss, metrics = grpo_loss(logp, logp.detach(), torch.zeros(1, 1), clip=0.2, reference_logp=reference, kl=0.5)
    loss.backward()
    q = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(metrics["kl"], (q.exp() - q - 1).mean())
    torch.testing.assert_close(loss, 0.5 * (q.exp() - q - 1).mean())
    assert logp.grad[0, 0, 0] == 0 and logp.grad[0, 0, 1] < 0  # raising logp toward the reference lowers the loss


# ---------------------------------------------------------------- the config


def test_config_group_reference_and_clip_defaults():
    assert GRPOConfig().needs().models == () and GRPOConfig().reference is None
    with_kl = GRPOConfig(kl=0.1)
    assert with_kl.reference == "start" and with_kl.needs().models == ("reference",)
    assert GRPOConfig(kl=0.1, reference="runs/x").reference == "runs/x"
    assert set(GRPOConfig().needs().fields) == {"prompt", "answer"} and GRPOConfig().needs().samples
    assert GSPOConfig().clip < GRPOConfig().clip
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        GRPOConfig(group=1)


def test_validate_locates_group_below_two_reference_without_kl_and_a_task_without_prompts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text to read " * 40)
    write(tmp_path, "p.yaml", PIPELINE + "      - {kind: grpo, group: 1}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline("p.yaml")
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.path) == ("p.yaml", 9, "objectives[0].group")
    assert "greater than or equal to 2, got 1" in problem.message

    write(tmp_path, "r.yaml", PIPELINE + "      - {kind: grpo}\n      - {kind: gspo, name: second,\n"
                                         "         reference: start}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline("r.yaml")
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.path) == ("r.yaml", 11, "objectives[1].reference")
    assert "never read: kl is 0" in problem.message

    write(tmp_path, "q.yaml", """
        model: {name: t, vocab_size: 256, d_model: 16, layers: [{mixer: {kind: attention, heads: 2}}]}
        data: {kind: text, files: [corpus.txt], length: 8}
        objectives:
          - {kind: cross_entropy}
          - {kind: grpo, kl: 0.1}
    """)
    with pytest.raises(SpecError) as info:
        load_pipeline("q.yaml")
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.path) == ("q.yaml", 5, "objectives[1].kind")
    assert "reads batch fields prompt, answer, which task 'text' does not yield" in problem.message


def test_cli_validate_group_below_two_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "p.yaml", PIPELINE + "      - {kind: gspo, group: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "hybridlab", "validate", str(path)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{path}:9: objectives[0].group: input should be greater than or equal to 2, got 1"


# ---------------------------------------------------------------- the tasks' prompts and oracles


TASKS = [
    (MQAR, MQARConfig(vocab=16, pairs=3, queries=2, seq_len=14, eval_lengths=[20])),
    (WordProblem, S5Config(length=5, eval_lengths=[3, 7])),
    (WordProblem, CyclicConfig(order=3, length=4)),
    (WordProblem, ParityConfig(length=6)),
    (FactWorld, FactWorldConfig(agents=3, values=5, objects=2, length=4, queries=3, eval_lengths=[2, 6])),
    (FactWorld, FactWorldConfig(facts="fixed", agents=1, values=3, objects=2, length=3, query_types=["state"])),
]


@pytest.mark.parametrize("cls,config", TASKS, ids=lambda x: getattr(x, "kind", ""))
def test_task_fields_are_what_it_yields_and_its_oracle_scores_the_answer(cls, config):
    task = cls(config, seed=5)
    assert isinstance(task, Rewards)
    for split in ["train", *task.splits()]:
        batch = task.batch(split, 3, 7)
        assert set(batch) == config.fields(), split
        prompt, answer, rejected = batch["prompt"], batch["answer"], batch["rejected"]
        assert prompt.shape[0] == 7 and answer.shape == rejected.shape == (7, 1)
        assert prompt.dtype == answer.dtype == rejected.dtype == torch.long
        assert int(prompt.max()) < config.min_vocab_size() and int(rejected.max()) < config.min_vocab_size()
        assert (answer != rejected).all()
        # G = 3 completions of 2 tokens: the answer (then anything), the rejected one, the answer second
        completions = torch.stack([torch.cat([answer, rejected], 1), torch.cat([rejected, answer], 1),
                                   torch.cat([answer, answer], 1)], 1)  # [B, 3, 2]
        reward = task.reward(batch, completions)
        assert reward.dtype == torch.float and reward.tolist() == [[1.0, 0.0, 1.0]] * 7
        assert task.batch(split, 3, 7)["rejected"].equal(rejected)  # drawn deterministically


def test_mqar_and_word_problem_prompts_are_the_training_sequences():
    """A model trained with cross_entropy answers these prompts: MQAR's prompt + answer is
    the sequence itself; a word problem's answer is the product it was trained to give last."""
    mqar = MQAR(MQARConfig(vocab=16, pairs=3), seed=1).batch("train", 0, 5)
    assert torch.cat([mqar["prompt"], mqar["answer"]], 1).equal(mqar["inputs"])
    assert mqar["answer"][:, 0].equal(mqar["targets"][:, -2])
    assert ((mqar["rejected"] > 7) & (mqar["rejected"] < 16)).all()  # a value token, never a key
    s5 = WordProblem(S5Config(length=6), seed=1)
    batch = s5.batch("train", 0, 5)
    assert batch["prompt"].equal(batch["inputs"])
    product = torch.zeros(5, dtype=torch.long)
    for t in range(6):
        product = s5.table[product, batch["prompt"][:, t]]
    assert batch["answer"][:, 0].equal(product)


def _factworld_oracle(task: FactWorld, prompt: list[int]) -> int:
    """An independent reading of a prompt: the listed facts, the last give of each object."""
    sep = prompt.index(SEP)
    facts = {(prompt[i], prompt[i + 1]): prompt[i + 2] for i in range(0, sep, 3)}
    holder, i = {}, sep + 1
    while prompt[i] == GIVE:
        holder[prompt[i + 1]] = prompt[i + 2]
        i += 3
    assert prompt[i] == SEP
    question = prompt[i + 1:]
    if question[0] == RECALL:
        return facts[question[2], question[1]]
    if question[0] == WHO:
        return holder[question[1]]
    assert question[0] == COMPOSE
    return facts[holder[question[2]], question[1]]


def test_factworld_answers_agree_with_an_independent_reading_of_the_prompt():
    task = FactWorld(FactWorldConfig(agents=4, values=6, objects=3, length=5, queries=2), seed=2)
    kinds = set()
    for index in range(12):
        batch = task.batch("train", index, 4)
        first = batch["prompt"][0].tolist()
        kinds.add(first[len(first) - first[::-1].index(SEP)])  # the token after the last '|'
        for prompt, answer, rejected in zip(batch["prompt"].tolist(), batch["answer"][:, 0].tolist(),
                                            batch["rejected"][:, 0].tolist()):
            assert answer == _factworld_oracle(task, prompt)
            same_kind = (task.agent0, task.attr0) if prompt[-2] == WHO else (task.value0, task.object0)
            assert same_kind[0] <= rejected < same_kind[1] and rejected != answer
    assert kinds == {RECALL, WHO, COMPOSE}  # every question type turns up, one per batch


def test_every_task_that_yields_answer_has_a_reward_oracle(registry):
    """The validate-time check reads fields(); the promise behind it is this contract."""
    checked = set()
    for kind in registry.kinds("data"):
        if not issubclass(kind.config, DataConfig):
            continue
        try:
            config = kind.config()
        except ValidationError:  # kinds whose config needs arguments (text's files)
            continue
        if "answer" in config.fields():
            assert issubclass(kind.module, Rewards), kind.name
            checked.add(kind.name)
    assert {"mqar", "s5", "cyclic", "parity", "factworld"} <= checked


def test_exact_match_reads_the_first_answer_tokens():
    answer = torch.tensor([[3, 4], [5, 6]])
    completions = torch.tensor([[[3, 4, 9], [3, 5, 4]], [[5, 6, 6], [6, 5, 0]]])
    assert exact_match(answer, completions).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert exact_match(answer, completions[..., :1]).tolist() == [[0.0, 0.0], [0.0, 0.0]]


# ---------------------------------------------------------------- the objective on a model


def _run(objectives, model, task, batch, seed, training=True):
    return ObjectiveRun(batch, None, model, lambda tokens, hidden=(): model(tokens), objectives.models[0], task,
                        0, 10, training, {}, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["grpo", "gspo"])
def test_objective_gradient_equals_the_full_batch_policy_gradient(registry, kind, one_thread):
    """Groups whose rewards are all equal are left out of the forward: the gradient must be
    that of the loss over every group, computed here by hand from the same samples."""
    config = (GRPOConfig if kind == "grpo" else GSPOConfig)(group=4, temperature=1.5)
    task = WordProblem(CyclicConfig(order=3, length=2), seed=0)
    batch = task.batch("train", 0, 6)
    model = tiny_model(registry, vocab=3)
    objectives = build(registry, config, model)
    loss, metrics = objectives.items[0](_run(objectives, model, task, batch, seed=7))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    run = _run(objectives, model, task, batch, seed=7)
    completions = run.sample(batch["prompt"], 4, 1, temperature=1.5)  # the same generator seed: the same samples
    rewards = task.reward(batch, completions)
    tokens = torch.cat([batch["prompt"].repeat_interleave(4, 0), completions.flatten(0, 1)], 1)
    logits = model(tokens).logits[:, -2:-1].float() / 1.5
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, -1:, None]).view(6, 4, 1)
    expected, _ = grpo_loss(logp, logp.detach(), group_advantages(rewards), clip=config.clip)
    expected.backward()
    flat = (rewards == rewards[:, :1]).all(-1)
    assert 0 < int(flat.sum()) < 6, "the sample should hold groups with and without a signal"
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-6
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert float(metrics["reward"]) == float(rewards.mean())
    assert float(metrics["zero_variance"]) == float(flat.float().mean())
    assert float(metrics["pass@4"]) == float((rewards == 1).any(-1).float().mean())


def test_objective_pass_at_1_is_greedy(registry):
    task = WordProblem(CyclicConfig(order=3, length=2), seed=0)
    batch = task.batch("train", 1, 8)
    model = tiny_model(registry, vocab=3)
    objectives = build(registry, GRPOConfig(group=2), model)
    with torch.no_grad():
        _, metrics = objectives.items[0](_run(objectives, model, task, batch, seed=0, training=False))
        greedy = model(batch["prompt"]).logits[:, -1].argmax(-1)
    assert float(metrics["pass@1"]) == float((greedy == batch["answer"][:, 0]).float().mean())


def test_objective_names_a_task_without_a_reward_oracle(registry):
    class NoOracle:  # yields the fields but breaks the contract behind them
        pass

    model = tiny_model(registry, vocab=8)
    objectives = build(registry, GRPOConfig(), model)
    batch = {"prompt": torch.zeros(2, 3, dtype=torch.long), "answer": torch.zeros(2, 1, dtype=torch.long)}
    with pytest.raises(HybridlabError, match="task NoOracle yields 'answer' but has no reward"):
        objectives.items[0](_run(objectives, model, NoOracle(), batch, seed=0))


def test_objective_kl_reads_the_start_reference(registry):
    task = WordProblem(CyclicConfig(order=3, length=2), seed=0)
    model = tiny_model(registry, vocab=3)
    objectives = build(registry, GRPOConfig(group=3, kl=0.5), model)
    reference = objectives.models[0]["reference"]
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    batch = task.batch("train", 0, 4)
    loss, metrics = objectives.items[0](_run(objectives, model, task, batch, seed=1))
    assert float(metrics["kl"]) == 0.0  # the policy is still its starting weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    loss, metrics = objectives.items[0](_run(objectives, model, task, batch, seed=1))
    assert float(metrics["kl"]) > 0 and abs(float(loss.detach()) - 0.5 * float(metrics["kl"])) < 1e-5


@pytest.mark.parametrize("kind", ["grpo", "gspo"])
def test_training_raises_the_reward(registry, kind, one_thread):
    """Cyclic words of length 1: the answer is the prompt's one token (a copy); a fresh
    model answers right about 1 time in 4. The policy gradient must raise that."""
    config = (GRPOConfig if kind == "grpo" else GSPOConfig)(group=8)
    task = WordProblem(CyclicConfig(order=4, length=1), seed=0)
    model = tiny_model(registry, vocab=4, seed=3)
    objectives = build(registry, config, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)

    def reward(step: int) -> float:
        _, m = objectives.items[0](_run(objectives, model, task, task.batch("train", step, 32), seed=step))
        return float(m["reward"])

    with torch.no_grad():
        before = sum(reward(1000 + i) for i in range(4)) / 4
    for step in range(40):
        loss, _ = objectives.items[0](_run(objectives, model, task, task.batch("train", step, 16), seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sum(reward(1000 + i) for i in range(4)) / 4
    assert after > before + 0.3, (before, after)


# ---------------------------------------------------------------- the example pipeline


def test_grpo_tiny_spec_validates_and_trains_with_a_kl_to_its_start(tmp_path, registry, one_thread):
    """The example pipeline, with kl > 0: the trainer's copy of the starting weights is the
    reference, and the first step's KL to it is 0."""
    from hybridlab.core.train import Trainer

    spec = load_pipeline(ROOT / "specs" / "train" / "grpo-tiny.yaml",
                         ["steps=2", "eval_batches=1", "batch_size=4", "log_every=1", "objectives[0].kl=0.05"])
    assert spec.objectives[0].kind == "grpo" and spec.objectives[0].reference == "start"
    Trainer(spec, run_dir=tmp_path / "run", registry=registry, progress=False).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(line for line in lines if line.get("step") == 1 and "kl" in line)
    assert first["kl"] == 0.0
    final = [line for line in lines if "eval/pass@1" in line]
    expected = {"eval/reward", "eval/zero_variance", "eval/kl", f"eval/pass@{spec.objectives[0].group}"}
    assert final and expected <= set(final[-1])
