"""Embedding models: the ``contrastive`` objective (InfoNCE, hard negatives, Matryoshka),
the ``pooling`` kinds, the ``retrieval`` task, and encoders (``causal: false``)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlab.core.config import Dims
from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.generate import evaluate_run
from hybridlab.core.model import Model
from hybridlab.core.objectives import ObjectiveRun, ObjectiveSetup
from hybridlab.core.spec import ModelSpec, PipelineSpec, load_pipeline
from hybridlab.core.train import Trainer, train
from hybridlab.plugins.data.factworld import FactWorld, FactWorldConfig
from hybridlab.plugins.data.retrieval import Retrieval, RetrievalConfig
from hybridlab.plugins.loss.contrastive import Contrastive, ContrastiveConfig, info_nce
from hybridlab.plugins.pooling.pooling import (LastPooling, LastPoolingConfig, LatentAttention,
                                               LatentAttentionConfig, MeanPooling, MeanPoolingConfig)

ROOT = Path(__file__).resolve().parents[3]
DIMS = Dims(d_model=16, vocab_size=40, n_layers=1)
TASK = {"kind": "retrieval", "agents": 8, "attributes": 3, "values": 6, "negatives": 3}
VOCAB = RetrievalConfig(**TASK).min_vocab_size()
ENCODER = {"name": "encoder", "vocab_size": VOCAB, "d_model": 16,
           "layers": [{"mixer": {"kind": "attention", "heads": 2, "causal": False},
                       "ffn": {"kind": "swiglu", "hidden": 32}}]}
PIPELINE = {"name": "contrastive", "model": ENCODER, "data": TASK,
            "objectives": [{"kind": "contrastive", "matryoshka": [4, 8, 16], "symmetric": True,
                            "pooling": {"kind": "latent_attention", "latents": 4, "heads": 2}}],
            "optimizer": {"kind": "adamw", "lr": 1e-2, "weight_decay": 0.0},
            "steps": 40, "batch_size": 16, "log_every": 1, "eval_every": 0, "eval_batches": 2,
            "checkpoint_every": 40, "device": "cpu", "seed": 0, "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(path, registry):
    with pytest.raises(SpecError) as info:
        load_pipeline(path, registry=registry)
    return [str(p) for p in info.value.problems]


def pipeline_yaml(objective: str, data: str = json.dumps(TASK), model: dict = ENCODER) -> str:
    return f"name: p\nmodel: {json.dumps(model)}\ndata: {data}\nobjectives:\n{objective}\nsteps: 1\ndevice: cpu\n"


# ---------------------------------------------------------------- pooling


def test_mean_and_last_pooling_honour_the_mask():
    hidden = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    mean, last = MeanPooling(MeanPoolingConfig(), DIMS), LastPooling(LastPoolingConfig(), DIMS)
    torch.testing.assert_close(mean(hidden), hidden.mean(1))
    expected = torch.stack([hidden[b][mask[b]].mean(0) for b in range(3)])
    torch.testing.assert_close(mean(hidden, mask), expected)
    assert torch.equal(last(hidden), hidden[:, -1])
    assert torch.equal(last(hidden, mask), torch.stack([hidden[0, 4], hidden[1, 1], hidden[2, 3]]))
    with pytest.raises(HybridlabError, match="no token to pool"):
        mean(hidden, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(HybridlabError, match="expected \\[B, T\\]"):
        last(hidden, mask[:, :4])


def test_latent_attention_matches_its_formula_and_starts_as_mean_pooling():
    torch.manual_seed(1)
    pool = LatentAttention(LatentAttentionConfig(latents=5, heads=4), DIMS).double()
    hidden = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    torch.testing.assert_close(pool(hidden, mask), MeanPooling(MeanPoolingConfig(), DIMS)(hidden, mask))
    for p in pool.parameters():  # trained weights: the zero-initialised output maps move
        p.data.normal_(0, 0.3)
    # the formula, one head at a time
    H, Dh, L = 4, 4, pool.latents
    q, k, v = hidden @ pool.q.weight.T, L @ pool.k.weight.T, L @ pool.v.weight.T
    heads = []
    for h in range(H):
        s = slice(h * Dh, (h + 1) * Dh)
        heads.append(torch.softmax(q[..., s] @ k[:, s].T / math.sqrt(Dh), dim=-1) @ v[:, s])
    O = hidden + torch.cat(heads, -1) @ pool.o.weight.T
    Y = O + pool.down(F.gelu(pool.up(O)))
    expected = torch.stack([Y[0].mean(0), Y[1, :5].mean(0)])
    torch.testing.assert_close(pool(hidden, mask), expected)
    pool(hidden, mask).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.parameters())


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_is_the_written_formula_with_hard_negatives_and_both_directions():
    torch.manual_seed(2)
    B, K, D, tau = 4, 3, 6, 0.1
    q, p, n = torch.randn(B, D), torch.randn(B, D), torch.randn(B, K, D)
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1) / tau  # noqa: E731
    forward, backward = 0.0, 0.0
    for i in range(B):
        candidates = [cos(q[i], p[j]) for j in range(B)] + [cos(q[i], n[i, k]) for k in range(K)]
        forward -= (cos(q[i], p[i]) - torch.logsumexp(torch.stack(candidates), 0)) / B
        backward -= (cos(p[i], q[i]) - torch.logsumexp(torch.stack([cos(p[i], q[j]) for j in range(B)]), 0)) / B
    loss, _ = info_nce(q, p, n, temperature=tau)
    torch.testing.assert_close(loss, forward)
    loss, _ = info_nce(q, p, n, temperature=tau, symmetric=True)
    torch.testing.assert_close(loss, (forward + backward) / 2)


def test_recall_at_1_counts_a_tie_with_a_hard_negative_as_a_miss():
    q = torch.eye(3)
    _, hit = info_nce(q, q.clone(), torch.zeros(3, 1, 3), temperature=0.05)
    assert hit.tolist() == [True, True, True]
    negatives = q.clone()[:, None, :]  # each query's hard negative is its own document
    _, hit = info_nce(q, q.clone(), negatives, temperature=0.05)
    assert hit.tolist() == [False, False, False]
    _, hit = info_nce(torch.ones(3, 3), torch.ones(3, 3), temperature=0.05)  # all tied: no hit by index order
    assert not hit.any()


def _objective_run(model, batch):
    return ObjectiveRun(batch, None, model, lambda tokens, hidden=(): model(tokens, hidden=hidden), {}, None, 0, 1,
                        True)


def test_matryoshka_loss_is_the_mean_over_nested_prefixes(registry):
    torch.manual_seed(3)
    spec = ModelSpec.model_validate(ENCODER, context={"registry": registry})
    model = Model(spec, registry)
    config = ContrastiveConfig.model_validate({"kind": "contrastive", "matryoshka": [2, 8, 16], "temperature": 0.1},
                                              context={"registry": registry})
    objective = Contrastive(config, ObjectiveSetup(spec.dims(registry=registry), spec, {}))
    batch = Retrieval(RetrievalConfig(**TASK), seed=0).batch("train", 0, 6)
    loss, metrics = objective(_objective_run(model, batch))
    final = lambda t: model(t, hidden=("final",)).hidden["final"].mean(1)  # noqa: E731
    q, d, n = final(batch["query"]), final(batch["document"]), final(batch["negatives"].flatten(0, 1)).view(6, 3, 16)
    parts = [info_nce(q[:, :k], d[:, :k], n[..., :k], temperature=0.1) for k in (2, 8, 16)]
    torch.testing.assert_close(loss, sum(p[0] for p in parts) / 3)
    assert set(metrics) == {"accuracy", "loss_d2", "accuracy_d2", "loss_d8", "accuracy_d8", "loss_d16",
                            "accuracy_d16"}
    torch.testing.assert_close(metrics["loss_d2"], parts[0][0])
    assert metrics["accuracy_d2"] == parts[0][1].float().mean() and metrics["accuracy"] == metrics["accuracy_d16"]
    wide = ContrastiveConfig.model_validate({"kind": "contrastive", "matryoshka": [8, 32]},
                                            context={"registry": registry})
    with pytest.raises(HybridlabError, match="matryoshka dimensions \\[32\\] exceed d_model \\(16\\)"):
        Contrastive(wide, ObjectiveSetup(spec.dims(registry=registry), spec, {}))  # built in Python, not validated


# ---------------------------------------------------------------- the retrieval task


def test_retrieval_batches_are_pure_functions_yielding_exactly_the_declared_fields():
    config = RetrievalConfig(**TASK)
    task = Retrieval(config, seed=5)
    a = task.batch("train", 3, 8)
    assert set(a) == config.fields()
    assert all(torch.equal(a[k], Retrieval(config, seed=5).batch("train", 3, 8)[k]) for k in a)
    assert not torch.equal(a["query"], task.batch("train", 4, 8)["query"])
    assert not torch.equal(a["query"], task.batch("eval", 3, 8)["query"])
    assert not torch.equal(a["document"], Retrieval(config, seed=6).batch("train", 3, 8)["document"])
    assert a["query"].shape == (8, 3) and a["document"].shape == (8, 3) and a["negatives"].shape == (8, 3, 3)
    assert max(int(v.max()) for v in a.values()) < config.min_vocab_size()
    with pytest.raises(KeyError, match="retrieval has splits"):
        task.batch("test", 0, 8)


def test_documents_state_factworlds_fixed_facts_and_queries_share_no_token_with_them():
    config = RetrievalConfig(**TASK)
    task = Retrieval(config, seed=7)
    world = FactWorld(FactWorldConfig(agents=8, attributes=3, values=6, facts="fixed"), seed=7)
    b = task.batch("train", 0, 24)  # every fact once
    agents = b["document"][:, 0] - world.agent0
    attrs = b["document"][:, 1] - world.attr0
    assert sorted((agents * 3 + attrs).tolist()) == list(range(24))  # distinct facts
    assert torch.equal(b["document"][:, 2] - world.value0, world.world[agents, attrs])
    assert task.decode(b["query"][0].tolist()) == f"recall r{int(attrs[0])} x{int(agents[0])}"
    assert task.encode(task.decode(b["document"][0].tolist())) == b["document"][0].tolist()
    for q, d in zip(b["query"].tolist(), b["document"].tolist()):
        assert not set(q) & set(d)
    plain = Retrieval(RetrievalConfig(**TASK, aliases=False), seed=7).batch("train", 0, 24)
    assert torch.equal(plain["document"], b["document"])
    assert torch.equal(plain["query"][:, 1:], b["document"][:, [1, 0]])  # recall a g
    # the LM view: the documents, scoring the value after agent and attribute
    assert torch.equal(b["inputs"], b["document"])
    assert (b["targets"][:, [0, 2]] == -100).all() and torch.equal(b["targets"][:, 1], b["document"][:, 2])


def test_hard_negatives_share_the_agent_or_the_attribute_and_are_other_facts():
    task = Retrieval(RetrievalConfig(**{**TASK, "negatives": 9}), seed=1)  # every neighbour: 7 + 2
    b = task.batch("train", 2, 16)
    for doc, negatives in zip(b["document"].tolist(), b["negatives"].tolist()):
        keys = {(n[0], n[1]) for n in negatives}
        assert len(keys) == 9 and (doc[0], doc[1]) not in keys
        assert all((n[0] == doc[0]) != (n[1] == doc[1]) for n in negatives)
        assert all(n == task.document(torch.tensor(n[0] - task.world.agent0), torch.tensor(n[1] - task.world.attr0))
                   .tolist() for n in negatives)


def test_retrieval_bad_sizes(registry, tmp_path):
    found = errors(write(tmp_path, pipeline_yaml("  - kind: contrastive", data=json.dumps({**TASK, "negatives": 10}))),
                   registry)
    assert len(found) == 1 and found[0].endswith(
        "p.yaml:3: data.negatives: 10 exceeds the 9 facts that share an agent or an attribute with a given fact "
        "((agents - 1) + (attributes - 1))"), found
    with pytest.raises(HybridlabError, match="batch_size 25 exceeds the 24 facts"):
        Retrieval(RetrievalConfig(**TASK)).batch("train", 0, 25)


# ---------------------------------------------------------------- validate


def _mqar_fields():
    from hybridlab.plugins.data.mqar import MQARConfig

    return MQARConfig(vocab=32, pairs=4).fields()


def test_contrastive_on_a_task_without_queries_is_a_located_error(registry, tmp_path):
    mqar = json.dumps({"kind": "mqar", "vocab": 32, "pairs": 4})
    found = errors(write(tmp_path, pipeline_yaml("  - kind: contrastive", data=mqar)), registry)
    assert len(found) == 1 and found[0].endswith(
        "p.yaml:5: objectives[0].kind: objective 'contrastive' reads batch fields query, document, negatives, "
        "which task 'mqar' does not yield (it yields " + ", ".join(sorted(_mqar_fields())) + ")"), found
    found = errors(write(tmp_path, pipeline_yaml("  - {kind: contrastive, negatives: false}", data=mqar)), registry)
    assert len(found) == 1 and "reads batch fields query, document, which task 'mqar'" in found[0], found


def test_bad_matryoshka_and_pooling_are_located_errors(registry, tmp_path):
    found = errors(write(tmp_path, pipeline_yaml(
        "  - kind: contrastive\n    matryoshka: [4, 32, 64]\n  - kind: contrastive\n    name: two\n"
        "    pooling: {kind: latent_attention, heads: 3}")), registry)
    assert len(found) == 2, found
    assert found[0].endswith("p.yaml:6: objectives[0].matryoshka: dimensions 32, 64 exceed the model's d_model (16): "
                             "the embedding has d_model coordinates"), found
    assert found[1].endswith("p.yaml:9: objectives[1].pooling: heads: must divide d_model (16), got 3"), found
    found = errors(write(tmp_path, pipeline_yaml("  - kind: contrastive\n    matryoshka: [8, 4]")), registry)
    assert len(found) == 1 and found[0].endswith("p.yaml:6: objectives[0].matryoshka: must be strictly increasing "
                                                 "(d_1 < d_2 < ...), got [8, 4]"), found


def test_bad_contrastive_input_exits_2_in_one_line_without_a_traceback(tmp_path):
    write(tmp_path, pipeline_yaml("  - {kind: contrastive, matryoshka: [8, 17]}"))
    proc = subprocess.run([sys.executable, "-m", "hybridlab", "train", "p.yaml"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("p.yaml:5: objectives[0].matryoshka: dimension 17 exceeds the model's d_model "
                                   "(16): the embedding has d_model coordinates"), proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_encoders_causal_false_is_an_attention_option_and_other_mixers_refuse_it(registry, tmp_path):
    def first_token_sees_the_last(mixer):
        spec = ModelSpec.model_validate({**ENCODER, "layers": [{"mixer": mixer}]}, context={"registry": registry})
        model = Model(spec, registry)
        tokens = torch.randint(0, VOCAB, (1, 5))
        other = tokens.clone()
        other[0, -1] = (other[0, -1] + 1) % VOCAB
        with torch.no_grad():
            return not torch.allclose(model(tokens).logits[0, 0], model(other).logits[0, 0])

    for kind, extra in (("attention", {}), ("differential_attention", {}), ("mla", {"kv_rank": 8})):
        assert first_token_sees_the_last({"kind": kind, "heads": 2, "causal": False, **extra}), kind
        assert not first_token_sees_the_last({"kind": kind, "heads": 2, **extra}), kind
    refusing = ("forgetting_attention", "nsa", "gated_deltanet")
    model = {**ENCODER, "layers": [{"mixer": {"kind": kind, "heads": 2, "causal": False}} for kind in refusing]}
    found = errors(write(tmp_path, pipeline_yaml("  - kind: contrastive", model=model)), registry)
    assert len(found) == 3, found
    for i, e in enumerate(found):
        assert f"model.layers[{i}].mixer.causal: unknown field 'causal'; allowed: " in e, found


# ---------------------------------------------------------------- training


def test_aliases_make_an_untrained_encoder_fail_where_shared_names_already_match(registry):
    spec = ModelSpec.model_validate(ENCODER, context={"registry": registry})
    model = Model(spec, registry)
    config = ContrastiveConfig.model_validate({"kind": "contrastive"}, context={"registry": registry})
    objective = Contrastive(config, ObjectiveSetup(spec.dims(registry=registry), spec, {}))
    accuracy = {}
    for aliases in (True, False):
        task = Retrieval(RetrievalConfig(**TASK, aliases=aliases), seed=0)
        hits = [objective(_objective_run(model, task.batch("train", i, 16)))[1]["accuracy"] for i in range(4)]
        accuracy[aliases] = float(sum(hits) / 4)
    assert accuracy[True] < 0.2 < 0.3 < accuracy[False], accuracy  # chance: 1 / (16 + 3)


def test_contrastive_trains_the_model_and_its_pooling_and_saves_them(registry, tmp_path):
    spec = PipelineSpec.model_validate(PIPELINE, context={"registry": registry})
    trainer = Trainer(spec, tmp_path / "r", registry=registry, progress=False)
    start = [p.detach().clone() for p in trainer.objectives.items[0].pooling.parameters()]
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "accuracy_d4" in r]
    chance = 1 / (16 + 3)
    first = sum(r["accuracy"] for r in train_rows[:5]) / 5
    last = sum(r["accuracy"] for r in train_rows[-5:]) / 5
    assert first < 0.5 and last > 0.8 and last > 4 * chance, (first, last)
    assert all(not torch.equal(a, b) for a, b in zip(start, trainer.objectives.items[0].pooling.parameters()))
    assert (tmp_path / "r" / "checkpoints" / "step-000040" / "objectives.safetensors").exists()
    final = rows[-1]
    again = evaluate_run(tmp_path / "r", registry=registry)  # reads the saved pooling weights
    assert again["eval/accuracy_d8"] == pytest.approx(final["eval/accuracy_d8"])
    assert again["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["contrastive-tiny", "gritlm-tiny"])
def test_example_specs_validate_and_train(name, registry, tmp_path):
    path = ROOT / "specs" / "train" / f"{name}.yaml"
    _, metrics = train(path, overrides=["steps=3", "eval_batches=1", "checkpoint_every=0", "device=cpu"],
                       out=tmp_path / name, progress=False, registry=registry)
    assert all(math.isfinite(v) for v in metrics.values())
    expected = {"eval/contrastive.accuracy", "eval/accuracy"} if name == "gritlm-tiny" else \
        {"eval/accuracy", "eval/accuracy_d4", "eval/accuracy_d32"}
    assert expected <= set(metrics), metrics
