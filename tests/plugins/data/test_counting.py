"""data majority / counting: targets against brute-force counts, determinism, splits,
located config errors."""

from collections import Counter

import pytest
import torch

from hybridlab.core.errors import SpecError
from hybridlab.core.interfaces import ModelOutput
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.counting import Aggregate, CountingConfig, MajorityConfig


def test_majority_targets_are_the_most_frequent_symbol_ties_to_the_smallest():
    task = Aggregate(MajorityConfig(symbols=3, length=17), seed=4)
    batch = task.batch("train", 2, 12)
    for row_in, row_out in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        seen = Counter()
        for x, y in zip(row_in, row_out):
            seen[x] += 1
            best = max(seen.values())
            assert y == min(s for s, n in seen.items() if n == best)


def test_majority_example_from_the_docs():
    config = MajorityConfig(symbols=2, length=4)
    inputs = torch.tensor([[1, 0, 0, 1]])
    counts = torch.nn.functional.one_hot(inputs, 2).cumsum(1)
    assert counts.argmax(-1).tolist() == [[1, 0, 0, 0]]  # the docstring's example, ties to 0
    assert Aggregate(config).batch("train", 0, 3)["targets"].max() < 2


def test_counting_targets_are_occurrences_so_far():
    task = Aggregate(CountingConfig(symbols=4, length=23), seed=1)
    batch = task.batch("train", 0, 10)
    for row_in, row_out in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        assert row_out == [row_in[:t + 1].count(x) for t, x in enumerate(row_in)]


@pytest.mark.parametrize("config", [MajorityConfig(length=8, eval_lengths=[8, 32]),
                                    CountingConfig(length=8, eval_lengths=[8, 32])])
def test_batches_are_deterministic_with_length_splits(config):
    task, again = Aggregate(config, seed=3), Aggregate(config, seed=3)
    assert task.splits() == ["len8", "len32"]
    assert task.batch("len32", 1, 4)["inputs"].shape == (4, 32)
    assert task.batch("train", 1, 4)["inputs"].equal(again.batch("train", 1, 4)["inputs"])
    assert not task.batch("train", 1, 4)["inputs"].equal(task.batch("train", 2, 4)["inputs"])
    assert not task.batch("train", 1, 4)["inputs"].equal(Aggregate(config, seed=4).batch("train", 1, 4)["inputs"])
    with pytest.raises(KeyError, match=f"{config.kind} has splits"):
        task.batch("len16", 0, 1)


def test_counting_vocabulary_covers_the_longest_count():
    assert CountingConfig(symbols=4, length=8, eval_lengths=[8, 64]).min_vocab_size() == 65
    assert MajorityConfig(symbols=5, length=100).min_vocab_size() == 5


def test_accuracy_last():
    task = Aggregate(MajorityConfig(symbols=2, length=5))
    batch = task.batch("train", 0, 8)
    logits = torch.nn.functional.one_hot(batch["targets"], 2).float()
    assert task.metrics(ModelOutput(logits), batch)["accuracy_last"] == 1.0
    logits[:2, -1] = logits[:2, -1].flip(-1)
    assert task.metrics(ModelOutput(logits), batch)["accuracy_last"] == 0.75


@pytest.mark.parametrize("data, message", [
    ("{kind: counting, length: 16, eval_lengths: [16, 64]}", "data: the task uses 65 token ids but model.vocab_size is 32"),
    ("{kind: majority, symbols: 1}", "data.symbols: "),
    ("{kind: majority, eval_lengths: [8, 0]}", "data.eval_lengths: lengths must be positive, got [8, 0]"),
])
def test_config_errors_point_at_the_data_line(tmp_path, data, message):
    (tmp_path / "m.yaml").write_text("vocab_size: 32\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: m.yaml\ndata: {data}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    (line,) = info.value.lines()
    assert line.startswith(f"{pipeline}:2: ") and message in line, line
