"""data mqar: answers against a brute-force lookup; eval_lengths splits; the default data unchanged."""

import pytest

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


def test_seeds_and_splits_have_their_own_streams():
    """The former seed formula, (seed * 7919 + split) << 32 | index, lost everything but
    the index in torch's 32-bit CPU generator: eval was training batches 0..7 and every
    seed trained on the same data."""
    config = MQARConfig(vocab=32, pairs=4)
    task, other = MQAR(config, seed=3), MQAR(config, seed=4)
    assert task.splits() == ["eval"]
    train = [task.batch("train", i, 8)["inputs"] for i in range(8)]
    assert not any(task.batch("eval", i, 8)["inputs"].equal(train[i]) for i in range(8))
    assert not any(other.batch("train", i, 8)["inputs"].equal(train[i]) for i in range(8))
    assert task.batch("train", 5, 8)["inputs"].equal(train[5])  # a pure function of (seed, split, index)
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
    # any pipeline seed (0 <= seed < 2**63) gives data, its own stream past 32 bits too
    task = MQAR(MQARConfig(vocab=32, pairs=4), seed=seed)
    check_answers(task.batch("train", 3, 4))
    check_answers(task.batch("eval", 0, 4))
    assert task.batch("train", 3, 4)["inputs"].equal(task.batch("train", 3, 4)["inputs"])


def test_seeds_that_differ_past_32_bits_see_different_data():
    config = MQARConfig(vocab=32, pairs=4)
    a, b = MQAR(config, seed=5), MQAR(config, seed=5 + 2**32)
    assert not a.batch("train", 0, 8)["inputs"].equal(b.batch("train", 0, 8)["inputs"])
