"""data memorization: one table per seed across splits and batches (checked by collecting
every answer seen), determinism, accuracy_first, located errors."""

import pytest
import torch

from hybridlab.core.errors import SpecError
from hybridlab.core.interfaces import ModelOutput
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.memorization import Memorization, MemorizationConfig


def test_every_batch_and_split_answers_from_one_table():
    config = MemorizationConfig(facts=20, values=7, length=15)
    task = Memorization(config, seed=3)
    seen = {}
    for split, index in [("train", 0), ("train", 9), ("eval", 0), ("eval", 4)]:
        batch = task.batch(split, index, 8)
        for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
            for t in range(0, len(inputs), 2):
                key, value = inputs[t], inputs[t + 1]
                assert 0 <= key < 20 and 20 <= value < 27
                assert targets[t] == value and targets[t + 1] == -100
                assert seen.setdefault(key, value) == value  # the oracle: one value per key, everywhere
    assert len(seen) == 20
    again = Memorization(config, seed=3)  # a resumed run: the same table
    assert again.table.equal(task.table) and not Memorization(config, seed=4).table.equal(task.table)


def test_batches_are_pure_functions_of_seed_split_and_index():
    task = Memorization(MemorizationConfig(), seed=1)
    assert task.batch("train", 2, 4)["inputs"].equal(Memorization(MemorizationConfig(), seed=1).batch("train", 2, 4)["inputs"])
    assert not task.batch("train", 2, 4)["inputs"].equal(task.batch("train", 3, 4)["inputs"])
    assert not task.batch("train", 2, 4)["inputs"].equal(task.batch("eval", 2, 4)["inputs"])
    assert task.splits() == ["eval"]
    with pytest.raises(KeyError, match="memorization has splits"):
        task.batch("len8", 0, 1)


def test_accuracy_first_counts_first_askings_only():
    task = Memorization(MemorizationConfig(facts=3, values=2, length=6), seed=0)
    batch = task.batch("train", 0, 4)
    keys = batch["inputs"][:, 0::2]
    firsts = sum(len(set(row)) for row in keys.tolist())
    logits = torch.nn.functional.one_hot(batch["targets"].clamp(min=0), 5).float()
    num, den = task.metrics(ModelOutput(logits), batch)["accuracy_first"]
    assert num == den == firsts


def test_vocab_must_cover_keys_and_values(tmp_path):
    (tmp_path / "m.yaml").write_text("vocab_size: 64\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("model: m.yaml\ndata: {kind: memorization, facts: 100, values: 10}\n")
    with pytest.raises(SpecError, match="p.yaml:2: data: the task uses 110 token ids but model.vocab_size is 64"):
        load_pipeline(pipeline)
