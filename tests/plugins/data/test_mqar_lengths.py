"""data mqar: answers against a brute-force lookup; eval_lengths splits; the default data unchanged."""

import pytest
import torch

from hybridlab.plugins.data.mqar import MQAR, MQARConfig


def check_answers(batch):
    for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        scored = [t for t, y in enumerate(targets) if y != -100]
        context = {}
        for t in range(0, min(scored), 2):
            if inputs[t]:
                context[inputs[t]] = inputs[t + 1]
        for t in scored:
            assert targets[t] == context[inputs[t]] == inputs[t + 1]


def test_default_splits_and_data_are_unchanged():
    config = MQARConfig(vocab=32, pairs=4)
    task = MQAR(config, seed=3)
    assert task.splits() == ["eval"]
    # the formula the default job has always used: a resumed old run sees the same data
    g = torch.Generator().manual_seed(((3 * 7919 + 0) << 32) + 5)
    keys = torch.rand(2, 15, generator=g).argsort(dim=1)[:, :4] + 1
    assert task.batch("train", 5, 2)["inputs"][:, 0:8:2].equal(keys)
    check_answers(task.batch("eval", 1, 8))


def test_eval_lengths_pad_before_the_queries():
    task = MQAR(MQARConfig(vocab=32, pairs=4, eval_lengths=[16, 33, 64]), seed=0)
    assert task.splits() == ["len16", "len33", "len64"]
    for split, T in [("train", 16), ("len33", 33), ("len64", 64)]:
        batch = task.batch(split, 0, 8)
        assert batch["inputs"].shape == (8, T)
        check_answers(batch)
    assert (task.batch("len64", 0, 8)["inputs"][:, 8:56] == 0).all()  # the gap
    with pytest.raises(KeyError, match="mqar has splits"):
        task.batch("eval", 0, 1)


def test_eval_lengths_must_hold_the_pairs_and_queries():
    with pytest.raises(ValueError, match="eval_lengths: 10 is shorter than 2·pairs"):
        MQARConfig(vocab=32, pairs=4, eval_lengths=[16, 10])


@pytest.mark.parametrize("seed", [1_000_000, 2**40 + 7, 2**63 - 1])
def test_large_seeds_give_data(seed):
    # the train stream's seed is folded into 63 bits: no overflow for any pipeline seed
    task = MQAR(MQARConfig(vocab=32, pairs=4), seed=seed)
    check_answers(task.batch("train", 3, 4))
    check_answers(task.batch("eval", 0, 4))
    assert task.batch("train", 3, 4)["inputs"].equal(task.batch("train", 3, 4)["inputs"])
