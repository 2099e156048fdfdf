"""data multihop_recall: answers against a brute-force lookup composed hops times,
determinism, length splits, located errors."""

import pytest

from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.multihop_recall import MultihopRecall, MultihopRecallConfig


def check(batch, hops, pairs):
    for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        f = dict(zip(inputs[0:2 * pairs:2], inputs[1:2 * pairs:2]))  # the oracle: read the context back
        assert len(f) == pairs and set(f.values()) <= set(f)  # distinct keys; every value is a key
        scored = [t for t, y in enumerate(targets) if y != -100]
        assert len(scored) > 0 and min(scored) >= 2 * pairs
        for t in scored:
            answer = inputs[t]
            for _ in range(hops):
                answer = f[answer]
            assert targets[t] == answer == inputs[t + 1]


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_answers_are_the_lookup_composed(hops):
    task = MultihopRecall(MultihopRecallConfig(vocab=24, pairs=6, hops=hops, queries=5), seed=hops)
    check(task.batch("train", 1, 16), hops, 6)


def test_two_hops_differ_from_one():
    one = MultihopRecall(MultihopRecallConfig(hops=1), seed=0).batch("train", 0, 32)
    two = MultihopRecall(MultihopRecallConfig(hops=2), seed=0).batch("train", 0, 32)
    assert one["inputs"][:, :16].equal(two["inputs"][:, :16])  # the same context...
    assert not one["targets"].equal(two["targets"])  # ...asked differently


def test_deterministic_with_length_splits():
    config = MultihopRecallConfig(vocab=32, pairs=4, eval_lengths=[16, 64])
    task = MultihopRecall(config, seed=1)
    assert task.splits() == ["len16", "len64"]
    assert task.batch("train", 2, 4)["inputs"].equal(MultihopRecall(config, seed=1).batch("train", 2, 4)["inputs"])
    assert not task.batch("train", 2, 4)["inputs"].equal(task.batch("train", 3, 4)["inputs"])
    long = task.batch("len64", 0, 8)
    assert long["inputs"].shape == (8, 64) and (long["inputs"][:, 8:56] == 0).all()
    check(long, 2, 4)
    with pytest.raises(KeyError, match="multihop_recall has splits"):
        task.batch("eval", 0, 1)


@pytest.mark.parametrize("data, message", [
    ("{kind: multihop_recall, vocab: 8, pairs: 9}", "data: pairs (9) exceeds the distinct keys of vocab 8"),
    ("{kind: multihop_recall, pairs: 4, seq_len: 10}", "data: seq_len (10) is shorter than 2·pairs + 2·queries (16)"),
    ("{kind: multihop_recall, pairs: 4, eval_lengths: [16, 12]}", "data: eval_lengths: 12 is shorter"),
    ("{kind: multihop_recall, hops: 0}", "data.hops: "),
])
def test_config_errors_point_at_the_data_line(tmp_path, data, message):
    (tmp_path / "m.yaml").write_text("vocab_size: 64\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: m.yaml\ndata: {data}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    (line,) = info.value.lines()
    assert line.startswith(f"{pipeline}:2: ") and message in line, line
