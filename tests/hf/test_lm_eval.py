"""lm-eval-harness on an exported hybrid (docs/hf.md): a local multiple-choice task
(examples/lm_eval, read with the datasets json loader, nothing downloaded) run through
lm_eval's ``hf`` model on a remote-code export, and its accuracy checked against the
choices our own model ranks first by log-likelihood.

Skipped only when lm_eval is not installed (``pip install 'hybridlab[eval]'``)."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hybridlab.core.hf.common import require_transformers  # noqa: E402

require_transformers("tests")  # before lm_eval imports transformers' hub kernels (see that function)
lm_eval = pytest.importorskip("lm_eval")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"

HYBRID = {"name": "eval-hybrid", "vocab_size": 40, "d_model": 32,
          "layers": [{"mixer": {"kind": "gated_deltanet", "heads": 2}},
                     {"mixer": {"kind": "attention", "heads": 4, "kv_heads": 2}}]}


def _our_accuracy(model, tokenizer, docs) -> float:
    """The share of questions whose answer our model scores highest, summing the answer
    tokens' log-probabilities after the context (what lm_eval's acc computes)."""
    right = 0
    for doc in docs:
        context = tokenizer(doc["context"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            answer = tokenizer(" " + choice)["input_ids"]
            tokens = torch.tensor([context + answer])
            with torch.no_grad():
                logp = model(tokens).logits.log_softmax(-1)[0]  # [T, V]
            scores.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(answer)))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


def test_lm_eval_runs_a_local_task_on_an_exported_hybrid(tmp_path, make_run, monkeypatch):
    import importlib.util

    from lm_eval.tasks import TaskManager

    from hybridlab.core.hf.exporter import export_hf

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    ours = make_run(tmp_path / "run", HYBRID)
    assert export_hf(tmp_path / "run", tmp_path / "hf").family == "hybridlab"
    spec = importlib.util.spec_from_file_location("tokenizer_example", EXAMPLES / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = module.write(str(tmp_path / "hf"))
    # the example task, its data file given by absolute path (the example's is relative to the repository root)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = (EXAMPLES / "tiny_choice.yaml").read_text().replace("examples/lm_eval/tiny_choice.jsonl",
                                                               str(EXAMPLES / "tiny_choice.jsonl"))
    (tasks / "tiny_choice.yaml").write_text(task)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
        tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(tasks)), batch_size=1, device="cpu")
    accuracy = results["results"]["tiny_choice"]["acc,none"]
    docs = [json.loads(line) for line in (EXAMPLES / "tiny_choice.jsonl").read_text().splitlines()]
    assert accuracy == pytest.approx(_our_accuracy(ours, tokenizer, docs))
