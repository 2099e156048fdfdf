"""data noisy_recall: answers against the context read back by brute force (noise
dropped, keys and values of several tokens), determinism, length splits, located errors."""

import pytest

from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.noisy_recall import NoisyRecall, NoisyRecallConfig


def check(config, batch):
    Kt, Vt, span = config.key_tokens, config.value_tokens, config.key_tokens + config.value_tokens
    first_noise = config.vocab - config.noise_vocab
    context_len = config.pairs * span + config.noise
    for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
        context = inputs[:context_len]
        assert sum(t >= first_noise for t in context) == config.noise
        clean = [t for t in context if t < first_noise]  # the oracle: drop the noise, cut into pairs
        table = {tuple(clean[i:i + Kt]): tuple(clean[i + Kt:i + span]) for i in range(0, len(clean), span)}
        assert len(table) == config.pairs  # distinct keys
        start = len(inputs) - config.n_queries * span
        assert all(t == 0 for t in inputs[context_len:start])  # the gap
        scored = [t for t, y in enumerate(targets) if y != -100]
        assert len(scored) == config.n_queries * Vt
        for q in range(config.n_queries):
            at = start + q * span
            key, value = tuple(inputs[at:at + Kt]), tuple(inputs[at + Kt:at + span])
            assert table[key] == value
            assert targets[at + Kt - 1:at + span - 1] == list(value)


@pytest.mark.parametrize("fields", [{"noise": 0}, {"noise": 9}, {"key_tokens": 2, "value_tokens": 3, "noise": 5},
                                    {"key_tokens": 3, "pairs": 12, "queries": 4, "vocab": 20, "noise_vocab": 4}])
def test_answers_are_the_paired_values(fields):
    config = NoisyRecallConfig(**fields)
    check(config, NoisyRecall(config, seed=2).batch("train", 1, 16))


def test_deterministic_with_length_splits():
    config = NoisyRecallConfig(pairs=4, noise=4, eval_lengths=[20, 80])
    task = NoisyRecall(config, seed=1)
    assert task.splits() == ["len20", "len80"]
    assert task.batch("train", 2, 4)["inputs"].equal(NoisyRecall(config, seed=1).batch("train", 2, 4)["inputs"])
    assert not task.batch("train", 2, 4)["inputs"].equal(task.batch("train", 3, 4)["inputs"])
    long = task.batch("len80", 0, 8)
    assert long["inputs"].shape == (8, 80)
    check(config, long)
    with pytest.raises(KeyError, match="noisy_recall has splits"):
        task.batch("eval", 0, 1)


@pytest.mark.parametrize("data, message", [
    ("{kind: noisy_recall, vocab: 10, noise_vocab: 8}", "data: vocab (10) leaves no key or value ids"),
    ("{kind: noisy_recall, vocab: 12, noise_vocab: 3, pairs: 5}", "data: pairs (5) exceeds the distinct keys (4 ids"),
    ("{kind: noisy_recall, pairs: 2, noise: 2, seq_len: 9}", "data: seq_len 9 is shorter than the pairs, noise and "
     "queries (10 tokens)"),
    ("{kind: noisy_recall, pairs: 2, noise: 2, eval_lengths: [10, 5]}", "data: eval_lengths: 5 is shorter"),
])
def test_config_errors_point_at_the_data_line(tmp_path, data, message):
    (tmp_path / "m.yaml").write_text("vocab_size: 64\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: m.yaml\ndata: {data}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    (line,) = info.value.lines()
    assert line.startswith(f"{pipeline}:2: ") and message in line, line
