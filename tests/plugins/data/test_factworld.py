"""data factworld: every answer against a brute-force replay of the decoded sequence."""

import pytest
import torch

from hybridlab.core.interfaces import ModelOutput
from hybridlab.plugins.data.factworld import QUERY_TYPES, FactWorld, FactWorldConfig


def replay(words, facts=None):
    """Walk a decoded sequence; yield (position, query type, expected answer) for every query.
    ``facts`` gives the world for fixed facts; with prompt facts they are read from the prompt."""
    facts = {} if facts is None else dict(facts)
    i = 0
    while words[i] != "|":  # the facts: g a v triples
        facts[(words[i], words[i + 1])] = words[i + 2]
        i += 3
    i += 1
    holder = {}
    while words[i] != "|":  # the history: give o g
        assert words[i] == "give"
        holder[words[i + 1]] = words[i + 2]
        i += 3
    i += 1
    while i < len(words) and words[i] != "<pad>":
        if words[i] == "recall":  # recall a g v
            yield i + 2, "recall", facts[(words[i + 2], words[i + 1])]
            i += 4
        elif words[i] == "who":  # who o g
            yield i + 1, "state", holder[words[i + 1]]
            i += 3
        else:  # compose a o v
            assert words[i] == "compose"
            yield i + 2, "composition", facts[(holder[words[i + 2]], words[i + 1])]
            i += 4


def check(task, batch, facts=None):
    targets, qtype = batch["targets"], batch["query_type"]
    for b in range(batch["inputs"].shape[0]):
        words = task.decode(batch["inputs"][b].tolist()).split()
        found = list(replay(words, facts))
        assert len(found) == task.config.queries
        scored = (targets[b] != -100).nonzero().flatten().tolist()
        assert scored == [pos for pos, _, _ in found]  # only the answers are scored
        for pos, name, answer in found:
            assert task.vocabulary.names[targets[b, pos]] == answer
            assert words[pos + 1] == answer  # the answer is the next input token
            assert QUERY_TYPES[qtype[b, pos]] == name
        assert (qtype[b] >= 0).sum() == len(found)


@pytest.mark.parametrize("seed", [0, 7])
def test_prompt_facts_answers_match_a_replay(seed):
    task = FactWorld(FactWorldConfig(agents=5, attributes=3, values=9, objects=3, length=11, queries=7), seed=seed)
    check(task, task.batch("train", 2, 16))


def test_fixed_facts_are_one_world_never_shown():
    config = FactWorldConfig(agents=4, attributes=2, values=7, objects=3, facts="fixed", length=6, queries=5)
    task = FactWorld(config, seed=3)
    world = {(f"g{g}", f"a{a}"): f"v{int(task.world[g, a])}" for g in range(4) for a in range(2)}
    for split, index in [("train", 0), ("train", 9), ("len6", 1)]:
        batch = task.batch(split, index, 8)
        assert (batch["inputs"][:, 0] == task.vocabulary.ids["|"]).all()  # no facts before the history
        check(task, batch, facts=world)
    assert not FactWorld(config, seed=4).world.equal(task.world)  # the world comes from the seed


def test_history_length_knob_and_eval_splits():
    task = FactWorld(FactWorldConfig(length=4, eval_lengths=[4, 8, 16], queries=3), seed=1)
    assert task.splits() == ["len4", "len8", "len16"]
    for split, events in [("train", 4), ("len8", 8), ("len16", 16)]:
        batch = task.batch(split, 0, 4)
        words = task.decode(batch["inputs"][0].tolist()).split()
        assert words.count("give") == events
        assert batch["inputs"].shape[1] == task.seq_len(events)
        check(task, batch)
    with pytest.raises(KeyError, match="factworld has splits"):
        task.batch("len32", 0, 1)


def test_only_the_query_types_asked_appear():
    task = FactWorld(FactWorldConfig(query_types=["state"], length=5, queries=4), seed=0)
    batch = task.batch("train", 0, 8)
    assert set(batch["query_type"][batch["query_type"] >= 0].tolist()) == {QUERY_TYPES.index("state")}


def test_metrics_report_accuracy_per_query_type():
    task = FactWorld(FactWorldConfig(length=5, queries=6), seed=2)
    batch = task.batch("train", 0, 8)
    V = task.config.min_vocab_size()
    perfect = torch.nn.functional.one_hot(batch["targets"].clamp(min=0), V).float()
    def ratios(metrics):  # (correct, asked) pairs
        return {k: float(n) / float(d) for k, (n, d) in metrics.items()}

    assert ratios(task.metrics(ModelOutput(perfect), batch)) == {
        "accuracy_recall": 1.0, "accuracy_state": 1.0, "accuracy_composition": 1.0}
    # right only on state queries
    state = batch["query_type"] == QUERY_TYPES.index("state")
    wrong = torch.nn.functional.one_hot(torch.where(state, batch["targets"], 0).clamp(min=0), V).float()
    metrics = ratios(task.metrics(ModelOutput(wrong), batch))
    assert metrics["accuracy_state"] == 1.0 and metrics["accuracy_recall"] == 0.0
    assert metrics["accuracy_composition"] == 0.0


def test_evaluation_pools_per_type_accuracy_over_batches(registry, tmp_path, monkeypatch):
    """A batch that asks no query of a type counted as accuracy 0 in the batch mean: a
    perfect model scored about 1/3 per type with batches of one sequence and one query."""
    from hybridlab.core.spec import PipelineSpec
    from hybridlab.core.train import Trainer

    spec = PipelineSpec.model_validate({
        "model": {"vocab_size": 64, "d_model": 16, "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
        "data": {"kind": "factworld", "length": 4, "queries": 1}, "steps": 1, "batch_size": 1,
        "eval_batches": 30, "device": "cpu"}, context={"registry": registry})
    trainer = Trainer(spec, tmp_path / "run", registry=registry, progress=False)
    V = spec.model.vocab_size

    def oracle(inputs, hidden=(), logits=True):  # predicts every target: the batch is the one just drawn
        # the task's metrics read the logits; cross_entropy applies the lm head to hidden["final"] itself
        final = torch.zeros(*inputs.shape, spec.model.d_model)
        return ModelOutput(torch.nn.functional.one_hot(oracle.batch["targets"].clamp(min=0), V).float(),
                           hidden={"final": final} if "final" in hidden else {})

    real_batch = trainer._batch

    def batch(split, i):
        oracle.batch = real_batch(split, i)
        return oracle.batch

    monkeypatch.setattr(trainer, "_batch", batch)
    monkeypatch.setattr(trainer, "forward", oracle)
    results = trainer.evaluate()
    assert {k: v for k, v in results.items() if "/accuracy_" in k} == {
        f"len4/accuracy_{t}": 1.0 for t in ("recall", "state", "composition")}


def test_batches_are_deterministic_and_vocab_size_is_declared():
    config = FactWorldConfig(agents=3, attributes=1, values=4, objects=2)
    a, b = FactWorld(config, seed=5), FactWorld(config, seed=5)
    assert a.batch("train", 1, 4)["inputs"].equal(b.batch("train", 1, 4)["inputs"])
    assert not a.batch("train", 1, 4)["inputs"].equal(a.batch("train", 2, 4)["inputs"])
    assert config.min_vocab_size() == len(a.vocabulary.names) == 6 + 3 + 1 + 4 + 2
    assert int(a.batch("train", 0, 4)["inputs"].max()) < config.min_vocab_size()
