"""data icll: every string is accepted by its sequence's automaton (replayed by brute
force), the allowed mask is the automaton's, determinism, splits, located errors."""

import pytest

from hybridlab.core.errors import SpecError
from hybridlab.core.interfaces import ModelOutput
from hybridlab.core.spec import load_pipeline
from hybridlab.core.tasks import generator
from hybridlab.plugins.data.icll import ICLL, ICLLConfig


def replay(task, config, batch, table):
    """Walk each row through its automaton: every letter must be an edge; the mask and
    targets must be what the automaton and the next token say."""
    for b in range(batch["inputs"].shape[0]):
        seq = batch["inputs"][b].tolist() + [None]
        rows = table[b].tolist()
        alphabet = {v for row in rows for v, s in enumerate(row) if s >= 0}
        assert len(alphabet) <= config.alphabet and 0 not in alphabet
        state, run = None, 0
        for t, token in enumerate(seq[:-1]):
            if token == 0:
                assert t == 0 or config.min_string <= run <= config.max_string
                state, run = 0, 0
            else:
                assert rows[state][token] >= 0, "a letter the automaton does not allow"
                state, run = rows[state][token], run + 1
            allowed = {v for v, s in enumerate(rows[state]) if s >= 0}
            assert set(batch["allowed"][b, t].nonzero().flatten().tolist()) == allowed
            assert len(allowed) == config.edges
            target = batch["targets"][b, t].item()
            nxt = seq[t + 1]
            if nxt is not None:
                assert target == (-100 if nxt == 0 else nxt)
            if target != -100:
                assert target in allowed


def test_strings_follow_each_sequences_automaton():
    config = ICLLConfig(vocab=12, alphabet=5, states=3, edges=2, min_string=2, max_string=6, length=60)
    task = ICLL(config, seed=3)
    batch = task.batch("train", 1, 6)
    table = task.automata(generator(3, "train", 1), 6)  # the batch's automata: drawn first from its generator
    replay(task, config, batch, table)
    assert batch["inputs"][:, 0].eq(0).all()  # a delimiter opens the sequence


def test_languages_differ_between_sequences():
    task = ICLL(ICLLConfig(), seed=0)
    table = task.automata(generator(0, "train", 0), 8)
    assert len({tuple(t.flatten().tolist()) for t in table}) == 8


def test_batches_are_deterministic_with_length_splits():
    config = ICLLConfig(length=32, eval_lengths=[32, 128])
    task = ICLL(config, seed=1)
    assert task.splits() == ["len32", "len128"]
    a, b = task.batch("train", 2, 4), ICLL(config, seed=1).batch("train", 2, 4)
    assert all(a[k].equal(b[k]) for k in a)
    assert not a["inputs"].equal(task.batch("train", 3, 4)["inputs"])
    assert not a["inputs"].equal(ICLL(config, seed=2).batch("train", 2, 4)["inputs"])
    assert task.batch("len128", 0, 2)["inputs"].shape == (2, 128)
    with pytest.raises(KeyError, match="icll has splits"):
        task.batch("len64", 0, 1)


def test_accuracy_valid_counts_any_allowed_letter():
    task = ICLL(ICLLConfig(vocab=10, length=40), seed=0)
    batch = task.batch("train", 0, 4)
    logits = batch["allowed"].float()  # argmax: the first allowed letter, not always the sampled one
    num, den = task.metrics(ModelOutput(logits), batch)["accuracy_valid"]
    assert num == den == (batch["targets"] != -100).sum()
    wrong = (~batch["allowed"]).float()  # argmax: a token not allowed
    num, den = task.metrics(ModelOutput(wrong), batch)["accuracy_valid"]
    assert num == 0 and den > 0


@pytest.mark.parametrize("data, message", [
    ("{kind: icll, vocab: 5, alphabet: 6}", "data: alphabet (6) exceeds the letters of vocab 5"),
    ("{kind: icll, edges: 7}", "data: edges (7) exceeds alphabet (6)"),
    ("{kind: icll, min_string: 9, max_string: 3}", "data: min_string (9) exceeds max_string (3)"),
    ("{kind: icll, vocab: 40}", "data: the task uses 40 token ids but model.vocab_size is 32"),
])
def test_config_errors_point_at_the_data_line(tmp_path, data, message):
    (tmp_path / "m.yaml").write_text("vocab_size: 32\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: m.yaml\ndata: {data}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(pipeline)
    (line,) = info.value.lines()
    assert line.startswith(f"{pipeline}:2: ") and message in line, line


def test_the_shipped_pipeline_trains_and_reports_accuracy_valid(tmp_path):
    from pathlib import Path

    from hybridlab.core.cli import main

    spec = Path(__file__).resolve().parents[3] / "specs" / "train" / "icll-tiny.yaml"
    out = tmp_path / "run"
    assert main(["train", str(spec), "--set", "steps=2", "--set", "eval_every=2", "--set", "eval_batches=1",
                 "--set", "batch_size=4", "--out", str(out), "--quiet"]) == 0
    assert "accuracy_valid" in (out / "metrics.jsonl").read_text()
