"""hybridlab prune: angular distances between depths, the dropped span, the new run, healing."""

import json

import pytest
import torch

from hybridlab.core.cli import main
from hybridlab.core.errors import HybridlabError
from hybridlab.core.generate import load_run
from hybridlab.core.prune import angular_distances, prune_run
from hybridlab.core.spec import PipelineSpec, load_pipeline
from hybridlab.core.train import train

ATTN = {"mixer": {"kind": "attention", "heads": 2}, "ffn": {"kind": "swiglu", "hidden": 32}}


def trained(tmp_path, registry, layers):
    pipeline = {"name": "p", "model": {"vocab_size": 32, "d_model": 16, "layers": layers},
                "data": {"kind": "mqar", "vocab": 32, "pairs": 2}, "steps": 3, "batch_size": 4,
                "eval_batches": 2, "device": "cpu"}
    run_dir, _ = train(PipelineSpec.model_validate(pipeline, context={"registry": registry}), out=tmp_path / "run",
                       progress=False, registry=registry)
    return run_dir


def test_angular_distance_is_zero_for_equal_states_and_half_for_opposite():
    x = torch.randn(2, 5, 8)
    assert angular_distances([x, x], 1) == [pytest.approx(0.0, abs=1e-7)]
    assert angular_distances([x, -x], 1) == [pytest.approx(1.0)]
    assert angular_distances([x, x, -x], 2) == [pytest.approx(1.0)]


def test_prune_drops_the_closest_span_and_the_new_run_equals_the_old_without_it(tmp_path, registry):
    run_dir = trained(tmp_path, registry, [ATTN] * 4)
    result = prune_run(run_dir, 2, tmp_path / "pruned", registry=registry)
    valid = [d for d in result.distances if d is not None]
    assert len(result.distances) == 3 and result.distances[result.dropped[0]] == min(valid)
    spec, model, _ = load_run(tmp_path / "pruned", registry=registry)
    _, old, _ = load_run(run_dir, registry=registry)
    assert len(model.order) == 2
    # the kept blocks carry their weights to their new depths
    kept = [i for i in range(4) if i not in result.dropped]
    for new, i in enumerate(kept):
        for (n, a), (_, b) in zip(model.blocks[str(new)].state_dict().items(), old.blocks[str(i)].state_dict().items()):
            torch.testing.assert_close(a, b)
    info = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert info["dropped_depths"] == result.dropped
    assert set(result.before) == set(result.after) and "eval/loss" in result.after
    # healing: a pipeline whose model: names the pruned run starts from its weights
    (tmp_path / "heal.yaml").write_text("model: pruned\ndata: {kind: mqar, vocab: 32, pairs: 2}\nsteps: 1\n"
                                        "batch_size: 4\neval_batches: 1\ndevice: cpu\n")
    heal = load_pipeline(tmp_path / "heal.yaml", registry=registry)
    assert heal.init_from == str((tmp_path / "pruned" / "checkpoints" / "step-000000").resolve())  # pinned
    assert len(heal.model.layers) == 2
    healed, _ = train(heal, out=tmp_path / "healed", progress=False, registry=registry)
    assert (healed / "checkpoints").is_dir()


def test_prune_refuses_more_layers_than_exist_and_spans_through_loops(tmp_path, registry, capsys):
    run_dir = trained(tmp_path, registry, [ATTN, {"loop": 2, "blocks": [ATTN]}, ATTN])
    assert main(["prune", str(run_dir), "--drop", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--drop must be between 1 and 3 (the model has 4 blocks), got 4" in capsys.readouterr().err
    with pytest.raises(HybridlabError, match="no span of 3 ordinary top-level blocks"):
        prune_run(run_dir, 3, tmp_path / "y", registry=registry)
    result = prune_run(run_dir, 1, tmp_path / "z", registry=registry)
    assert result.distances[1] is None and result.distances[2] is None  # the loop's two depths


def test_prune_refuses_a_span_that_a_kv_reader_or_a_tapping_embedding_depends_on(tmp_path, registry):
    """Found by an outside-in probe: the pruned spec was only validated field by field, so a
    kv_from naming a dropped block was written out, and an engram's tapped depths shifted
    silently to other blocks (or pointed past the end, leaving an invalid run behind)."""
    named = {"name": "src", **ATTN}
    reader = {"mixer": {"kind": "attention", "heads": 2, "kv_from": "src"}, "ffn": {"kind": "swiglu", "hidden": 32}}
    run_dir = trained(tmp_path, registry, [ATTN, named, reader])
    from hybridlab.core.generate import load_run as load
    from hybridlab.core.prune import pruned_spec

    spec, _, _ = load(run_dir, registry=registry)
    with pytest.raises(HybridlabError, match="kv_from: no block named 'src'"):
        pruned_spec(spec, [1], registry)
    # prune takes the closest span whose removal leaves a valid model: of two blocks, never 'src'
    # without its reader (depths 0..1), whatever the distances
    result = prune_run(run_dir, 2, tmp_path / "kv-pruned", registry=registry)
    assert result.dropped == [1, 2]
    assert load(tmp_path / "kv-pruned", registry=registry)[0].init_from is None
    engram = {"kind": "engram", "orders": [2], "table_size": 31, "heads": 1, "dim": 8, "layers": [2]}
    pipeline = {"name": "e", "model": {"vocab_size": 32, "d_model": 16, "layers": [ATTN] * 3, "embedding": engram},
                "data": {"kind": "mqar", "vocab": 32, "pairs": 2}, "steps": 1, "batch_size": 4, "eval_batches": 1,
                "device": "cpu"}
    tapped, _ = train(PipelineSpec.model_validate(pipeline, context={"registry": registry}), out=tmp_path / "e",
                      progress=False, registry=registry)
    with pytest.raises(HybridlabError, match="taps the residual stream at given depths"):
        prune_run(tapped, 1, tmp_path / "e-pruned", registry=registry)
    assert not (tmp_path / "e-pruned").exists()
