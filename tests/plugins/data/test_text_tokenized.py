"""data text with a tokenizer and pre-tokenized shards (`hybridlab tokenize`), packed
documents with doc_ids."""

import json

import numpy as np
import pytest
import torch

from hybridlab.core import shards
from hybridlab.core.cli import main
from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.text import Text, TextConfig

tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers extra is not installed")

LINES = [f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(120)]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=300,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    for i in range(6):  # 6 documents of different lengths
        (tmp_path / f"doc{i}.txt").write_text("".join(LINES[i * 20:i * 20 + 5 + 3 * i]))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tokenize(*args):
    return main(["tokenize", "doc*.txt", "--tokenizer", "tokenizer.json", "--quiet", *args])


def test_tokenize_writes_shards_holding_whole_documents(corpus):
    assert tokenize("--out", "tok", "--eval-fraction", "0.2", "--shard-tokens", "150") == 0
    meta = json.loads((corpus / "tok/meta.json").read_text())
    tok = tokenizers.Tokenizer.from_file("tokenizer.json")
    docs = [tok.encode((corpus / f"doc{i}.txt").read_text(), add_special_tokens=False).ids for i in range(6)]
    assert meta["vocab_size"] == tok.get_vocab_size() and meta["dtype"] == "uint16"
    for split, expected in (("train", docs[:5]), ("eval", docs[5:])):  # the last fifth of the documents held out
        streams = shards.open_split(corpus / "tok", split)
        got = [s.tokens[a:b].tolist() for s in streams
               for a, b in zip(s.starts, [*s.starts[1:], len(s)])]
        assert got == expected
    assert len(meta["splits"]["train"]) > 1  # 150 tokens per shard: several shards


def test_windows_documents_and_targets(corpus):
    assert tokenize("--out", "tok", "--shard-tokens", "150") == 0
    task = Text(TextConfig(tokenized="tok", length=24, documents=True), seed=3)
    streams = task.parts["train"]
    batch = task.batch("train", 7, 16)
    assert batch["inputs"].shape == batch["targets"].shape == batch["doc_ids"].shape == (16, 24)
    assert batch["inputs"].equal(task.batch("train", 7, 16)["inputs"])  # a pure function of (seed, split, index)
    assert not batch["inputs"].equal(task.batch("train", 8, 16)["inputs"])
    flat = [(s, np.asarray(st.tokens).tolist()) for s, st in enumerate(streams)]
    for inputs, targets, doc_ids in zip(*(batch[k].tolist() for k in ("inputs", "targets", "doc_ids"))):
        assert doc_ids[0] == 0 and all(0 <= b - a <= 1 for a, b in zip(doc_ids, doc_ids[1:]))
        # the window is a run of one shard's tokens, and each doc_id change sits at a document start
        hits = [(s, i) for s, tokens in flat for i in range(len(tokens) - 24)
                if tokens[i:i + 24] == inputs]
        assert hits
        s, i = hits[0]
        starts = set(streams[s].starts.tolist())
        changes = [t for t in range(1, 24) if doc_ids[t] != doc_ids[t - 1]]
        assert all(i + t in starts for t in changes)
        for t in range(24):  # the next token is the target, unless it opens another document
            expected = -100 if i + t + 1 in starts else flat[s][1][i + t + 1]
            assert targets[t] == expected


def test_files_with_a_tokenizer_match_the_tokenized_folder(corpus):
    task = Text(TextConfig(files=["doc*.txt"], tokenizer="tokenizer.json", length=16, eval_fraction=0.3))
    tok = tokenizers.Tokenizer.from_file("tokenizer.json")
    joined = sum((tok.encode((corpus / f"doc{i}.txt").read_text(), add_special_tokens=False).ids
                  for i in range(6)), [])
    cut = int(len(joined) * 0.7)
    assert task.parts["train"][0].tokens.tolist() == joined[:cut]
    assert task.parts["eval"][0].tokens.tolist() == joined[cut:]
    assert task.decode(task.encode("the quick fox")) == "the quick fox"
    assert TextConfig(files=["doc*.txt"], tokenizer="tokenizer.json").min_vocab_size() == tok.get_vocab_size()


def test_the_model_gets_the_batch_doc_ids(corpus):
    """Packed documents reach the forward: the training loss equals the model's loss with
    doc_ids passed by hand, and differs from the loss without them."""
    assert tokenize("--out", "tok") == 0
    (corpus / "m.yaml").write_text("vocab_size: 300\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n"
                                   "  - mixer: {kind: gated_deltanet, heads: 2}\n")
    (corpus / "p.yaml").write_text("model: m.yaml\ndata: {kind: text, tokenized: tok, length: 48, documents: true}\n"
                                   "batch_size: 8\n")
    from hybridlab.core.model import Model
    from hybridlab.core.objectives import Objectives
    from hybridlab.registry import default_registry

    spec = load_pipeline(corpus / "p.yaml")
    registry = default_registry()
    torch.manual_seed(0)
    model = Model(spec.model, registry)
    task = Text(spec.data, seed=0)
    batch = task.batch("train", 0, 8)
    assert (batch["doc_ids"][:, -1] > 0).any()  # some windows cross a document start
    objectives = Objectives(spec.objectives, model, registry, device=torch.device("cpu"))
    _, results, _ = objectives.compute(batch, model=model, task=task)
    logits = model(batch["inputs"], doc_ids=batch["doc_ids"]).logits
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    torch.testing.assert_close(results[0][1], by_hand)
    without = model(batch["inputs"]).logits
    assert not torch.allclose(logits, without)


def test_bad_input_is_a_clear_error_and_writes_nothing(corpus, capsys):
    assert tokenize("--out", "tok") == 0
    before = sorted(p.name for p in (corpus / "tok").iterdir())
    assert tokenize("--out", "tok") == 2  # an existing folder is kept as it was
    assert "tok exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (corpus / "tok").iterdir()) == before
    assert main(["tokenize", "nothing*.txt", "--out", "t2", "--quiet"]) == 2
    assert main(["tokenize", "doc*.txt", "--tokenizer", "missing.json", "--out", "t2", "--quiet"]) == 2
    assert main(["tokenize", "doc0.txt", "--out", "t2", "--quiet"]) == 2  # one document: nothing to hold out
    assert "need at least 2" in capsys.readouterr().err
    assert not (corpus / "t2").exists()
    (corpus / "lines.jsonl").write_text('{"text": "a b"}\n{"body": 1}\n')
    assert main(["tokenize", "lines.jsonl", "--jsonl-key", "text", "--out", "t2", "--quiet"]) == 2
    assert "lines.jsonl:2: not a JSON object with a string 'text'" in capsys.readouterr().err

    (corpus / "m.yaml").write_text("vocab_size: 300\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    (corpus / "p.yaml").write_text("model: m.yaml\ndata: {kind: text, tokenized: tok, files: [doc0.txt]}\n")
    with pytest.raises(SpecError, match="p.yaml:2: data: .*give either files"):
        load_pipeline(corpus / "p.yaml")
    (corpus / "p.yaml").write_text("model: m.yaml\ndata: {kind: text, tokenized: doc0.txt}\n")
    with pytest.raises(SpecError, match="p.yaml:2: data.tokenized: .*no meta.json"):
        load_pipeline(corpus / "p.yaml")
    (corpus / "p.yaml").write_text("model: m.yaml\ndata: {kind: text, files: [doc0.txt], tokenizer: nope.json}\n")
    with pytest.raises(SpecError, match="p.yaml:2: data.tokenizer: no tokenizer file 'nope.json'"):
        load_pipeline(corpus / "p.yaml")

    shard = corpus / "tok" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])  # truncated
    with pytest.raises(HybridlabError, match=r"train-00000.bin: .* tokens, meta.json says \d+ \(truncated"):
        Text(TextConfig(tokenized="tok", length=8)).batch("train", 0, 1)
