"""data text: byte windows from local files, next-byte targets, held-out evaluation part."""

import pytest

from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.spec import load_pipeline
from hybridlab.plugins.data.text import Text, TextConfig

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog ü\n" for i in range(60))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(CORPUS[:1500])
    (tmp_path / "b.txt").write_text(CORPUS[1500:])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_windows_come_from_the_files_and_targets_are_the_next_bytes(corpus):
    task = Text(TextConfig(files=["*.txt"], length=37, eval_lengths=[37, 74], eval_fraction=0.25), seed=1)
    data = CORPUS.encode()
    cut = int(len(data) * 0.75)
    for split, part, T in [("train", data[:cut], 37), ("len37", data[cut:], 37), ("len74", data[cut:], 74)]:
        batch = task.batch(split, 3, 5)
        assert batch["inputs"].shape == (5, T)
        for inputs, targets in zip(batch["inputs"].tolist(), batch["targets"].tolist()):
            assert inputs[1:] == targets[:-1]
            assert bytes(inputs + targets[-1:]) in part  # a window of this part of the text
    assert task.batch("train", 3, 5)["inputs"].equal(task.batch("train", 3, 5)["inputs"])
    assert not task.batch("train", 3, 5)["inputs"].equal(task.batch("train", 4, 5)["inputs"])


def test_files_resolve_to_absolute_paths_and_missing_files_are_positioned_errors(corpus):
    config = TextConfig(files=["b.txt", "*.txt"])
    assert config.files == [str(corpus / "b.txt"), str(corpus / "a.txt")]
    (corpus / "m.yaml").write_text("vocab_size: 256\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    (corpus / "p.yaml").write_text("model: m.yaml\ndata:\n  kind: text\n  files: [nothing/*.md]\n")
    with pytest.raises(SpecError, match=r"p.yaml:4: data.files: no file matches 'nothing/\*.md'"):
        load_pipeline(corpus / "p.yaml")


def test_too_little_text_is_a_clear_error(corpus):
    """Known from the files' sizes: a located spec error at validate (it passed validate
    and failed when training started); the task checks again when it reads the files."""
    (corpus / "m.yaml").write_text("vocab_size: 256\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n")
    (corpus / "p.yaml").write_text("model: m.yaml\ndata: {kind: text, files: [a.txt], length: 16, "
                                   "eval_lengths: [1000]}\n")
    with pytest.raises(SpecError, match=r"p.yaml:2: data: eval_lengths: the eval part of the files has \d+ bytes, "
                                        r"fewer than a window of 1001"):
        load_pipeline(corpus / "p.yaml")
    config = TextConfig.model_construct(**{**TextConfig(files=["a.txt"], length=16).model_dump(),
                                           "eval_lengths": [1000]})
    with pytest.raises(HybridlabError, match="the eval part has .* bytes, fewer than a window of 1001"):
        Text(config).batch("train", 0, 1)  # the files are read at the first batch


def test_encode_decode_are_utf8_bytes(corpus):
    task = Text(TextConfig(files=["a.txt"], length=8))
    assert task.encode("fox ü") == list("fox ü".encode())
    assert task.decode(task.encode("fox ü")) == "fox ü"


def test_generate_needs_no_training_files(corpus, registry):
    """A text run's spec.yaml names its files by absolute path; generate validated them
    and read them all, so a run directory moved or shared without its data was unusable."""
    import shutil

    from hybridlab.core.generate import generate
    from hybridlab.core.spec import PipelineSpec
    from hybridlab.core.train import Trainer

    spec = PipelineSpec.model_validate({
        "model": {"vocab_size": 256, "d_model": 16, "layers": [{"mixer": {"kind": "attention", "heads": 2}}]},
        "data": {"kind": "text", "files": ["*.txt"], "length": 16}, "steps": 2, "batch_size": 2,
        "eval_batches": 1, "device": "cpu"}, context={"registry": registry})
    Trainer(spec, corpus / "run", registry=registry, progress=False).run()
    before, _ = generate(corpus / "run", "line", max_new_tokens=4, registry=registry)
    for name in ("a.txt", "b.txt"):
        shutil.move(corpus / name, corpus / f"{name}.gone")
    after, text = generate(corpus / "run", "line", max_new_tokens=4, registry=registry)
    assert after == before and text.startswith("line")
    with pytest.raises(SpecError, match="data.files: no file matches"):  # training still needs them
        load_pipeline(corpus / "run" / "spec.yaml")
