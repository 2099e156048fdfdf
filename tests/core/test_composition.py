"""Composition beyond a stack: shared blocks, loops (and nested loops at two timescales),
norm placement kinds, and the located errors of each."""

import math
from pathlib import Path
from typing import Literal

import pytest
import torch

from hybridlab.core.errors import SpecError
from hybridlab.core.model import Model
from hybridlab.core.spec import ModelSpec, PipelineSpec, load_model_spec
from hybridlab.core.train import train
from hybridlab.core.verify import verify_model
from hybridlab.testing import stepwise_logits

ROOT = Path(__file__).resolve().parents[2]
ATTN = {"mixer": {"kind": "attention", "heads": 2}}
GDN = {"mixer": {"kind": "gated_deltanet", "heads": 2}}


def model_of(registry, **spec):
    spec = ModelSpec.model_validate({"vocab_size": 19, "d_model": 16, **spec}, context={"registry": registry})
    torch.manual_seed(0)
    return Model(spec, registry).double()


def spec_errors(tmp_path, text, overrides=()):
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(SpecError) as info, pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        load_model_spec("m.yaml", overrides)
    return [str(p) for p in info.value.problems]


decode = stepwise_logits  # prefill in parallel, then one step per token


# ---------------------------------------------------------------- shared blocks


def test_a_shared_block_has_one_set_of_weights_and_a_state_per_use(registry):
    model = model_of(registry, shared={"attn": ATTN}, layers=[GDN, {"use": "attn"}, GDN, {"use": "attn"}])
    assert [p.key for p in model.order] == ["0", "attn-0", "2", "attn-0"]
    assert sorted(model.blocks.keys()) == ["0", "2", "attn-0"]
    assert not any(k.startswith("blocks.1.") or k.startswith("blocks.3.") for k in model.state_dict())
    state = model.init_state(2)
    assert len(state) == 4 and state[1] is not state[3]  # each use its own KV cache
    tokens = torch.randint(0, 19, (2, 9))
    logits = model(tokens).logits
    torch.testing.assert_close(decode(model, tokens, 4), logits, rtol=1e-10, atol=1e-10)
    # both uses train the one weight: its gradient is the sum of what each use contributes
    logits.sum().backward()
    assert model.blocks["attn-0"].mixer_place.norm.weight.grad.abs().sum() > 0


def test_summary_counts_shared_weights_once_and_shows_each_use(capsys):
    from hybridlab.core.cli import main

    assert main(["summary", str(ROOT / "specs/models/zamba2-tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "6 blocks (5 sets of weights)" in out
    uses = [line for line in out.splitlines() if "shared.attn[0]" in line]
    assert len(uses) == 2 and "shared with 2" in uses[1]


# ---------------------------------------------------------------- loops


def test_a_loop_runs_its_group_n_times_with_one_set_of_weights(registry):
    loop3 = model_of(registry, layers=[GDN, {"loop": 3, "blocks": [ATTN, GDN]}])
    assert [(p.key, p.iterations) for p in loop3.order] == [
        ("0", ()), ("1-0", (0,)), ("1-1", (0,)), ("1-0", (1,)), ("1-1", (1,)), ("1-0", (2,)), ("1-1", (2,))]
    # the depth can change after training: the same weights load into a model looped 5 times
    loop5 = model_of(registry, layers=[GDN, {"loop": 5, "blocks": [ATTN, GDN]}])
    loop5.load_state_dict(loop3.state_dict())
    tokens = torch.randint(0, 19, (2, 8))
    assert not torch.allclose(loop5(tokens).logits, loop3(tokens).logits)
    torch.testing.assert_close(decode(loop5, tokens, 3), loop5(tokens).logits, rtol=1e-10, atol=1e-10)


def test_nested_loops_run_a_fast_module_several_times_per_slow_step(registry):
    fast, slow = {"mixer": {"kind": "attention", "heads": 2}}, {"mixer": {"kind": "attention", "heads": 4}}
    model = model_of(registry, layers=[{"loop": 2, "blocks": [{"loop": 3, "blocks": [fast]}, slow]}])
    assert [p.key for p in model.order] == ["0-0-0"] * 3 + ["0-1"] + ["0-0-0"] * 3 + ["0-1"]


def test_loop_count_is_set_from_the_command_line_on_a_saved_run(tmp_path, registry):
    """--set layers[i].loop=N on a finished run's spec: generate runs the deeper model on the same weights."""
    from hybridlab.core.generate import generate

    pipeline = {"name": "loop", "model": {"vocab_size": 32, "d_model": 16, "layers": [
        {"loop": 2, "blocks": [{"mixer": {"kind": "attention", "heads": 2}}]}]},
        "data": {"kind": "mqar", "vocab": 32, "pairs": 2}, "steps": 2, "batch_size": 4, "eval_batches": 1,
        "device": "cpu"}
    run_dir, _ = train(PipelineSpec.model_validate(pipeline, context={"registry": registry}), out=tmp_path / "r",
                       progress=False, registry=registry)
    from hybridlab.core.generate import load_run

    spec, model, _ = load_run(run_dir, overrides=["model.layers[0].loop=4"], registry=registry)
    assert len(model.order) == 4 and spec.model.layers[0].loop == 4
    deeper, _ = generate(run_dir, "1 2 3", max_new_tokens=3, overrides=["model.layers[0].loop=4"], registry=registry)
    assert len(deeper) == 3
    from hybridlab.core.cli import main

    assert main(["evaluate", str(run_dir), "--set", "model.layers[0].loop=4", "--json", str(tmp_path / "e.json")]) == 0
    assert "eval/loss" in __import__("json").loads((tmp_path / "e.json").read_text())


# ---------------------------------------------------------------- norm placement


def one_block(registry, placement, layers=1):
    return model_of(registry, layers=[{**ATTN, "placement": placement, "ffn": None, "norm": {"kind": "rmsnorm"}}]
                    * layers)


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich", "depth_scaled"])
def test_each_placement_puts_its_norms_where_its_formula_says(registry, placement):
    model = one_block(registry, {"kind": placement}, layers=2)
    with torch.no_grad():
        for block in model.blocks.values():  # norms with distinct weights, so a swapped one shows
            for p in block.mixer_place.parameters():
                p.copy_(torch.rand_like(p) + 0.5)
    tokens = torch.randint(0, 19, (2, 7))
    h = model.embedding(tokens)
    for depth, (_, block) in enumerate(model.uses()):
        place, mix = block.mixer_place, (lambda x, b=block: b.mixer(x)[0])
        if placement == "pre":
            h = h + mix(place.norm(h))
        elif placement == "post":
            h = place.norm(h + mix(h))
        elif placement == "sandwich":
            h = h + place.post_norm(mix(place.norm(h)))
        else:
            h = h + mix(place.norm(h) / math.sqrt(depth + 1))
    torch.testing.assert_close(model(tokens).logits, model.head(model.norm(h)), rtol=1e-12, atol=1e-12)


def test_mix_ln_is_post_norm_in_the_first_fraction_of_the_depth_then_pre(registry):
    model = one_block(registry, {"kind": "mix_ln", "post_fraction": 0.5}, layers=4)
    tokens = torch.randint(0, 19, (1, 6))
    h = model.embedding(tokens)
    for depth, (_, block) in enumerate(model.uses()):
        norm, mix = block.mixer_place.norm, (lambda x, b=block: b.mixer(x)[0])
        h = norm(h + mix(h)) if depth < 2 else h + mix(norm(h))
    torch.testing.assert_close(model(tokens).logits, model.head(model.norm(h)), rtol=1e-12, atol=1e-12)


def test_checkpoints_from_before_placement_kinds_load(registry):
    """A block's norms were mixer_norm / ffn_norm; they are the pre placement's norm now."""
    model = model_of(registry, layers=[ATTN])
    old = {k.replace("mixer_place.norm.", "mixer_norm.").replace("ffn_place.norm.", "ffn_norm."): v
           for k, v in model.state_dict().items()}
    assert any("mixer_norm" in k for k in old)
    fresh = model_of(registry, layers=[ATTN])
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())


# ---------------------------------------------------------------- cross-layer KV sharing


def test_a_layer_reading_another_layers_kv_attends_over_exactly_those(registry):
    producer = {"name": "src", "mixer": {"kind": "attention", "heads": 4, "kv_heads": 2, "qk_norm": True}}
    reader = {"mixer": {"kind": "attention", "heads": 4, "kv_from": "src"}}
    model = model_of(registry, layers=[producer, GDN, reader])
    attn = model.blocks[2].mixer
    assert not any(n.startswith("kv.") or "k_norm" in n for n, _ in attn.named_parameters())
    assert attn.state_bytes(100) == 0 and model.blocks[0].mixer.state_bytes(100) > 0
    tokens = torch.randint(0, 19, (2, 9))
    seen = {}  # the producer's K/V and the reader's input, captured on the way
    from hybridlab.plugins.mixer.attention import attention_reference

    original = model.blocks[0].mixer.forward

    def capture(x, state=None, **kw):
        out = original(x, state, **kw)
        seen["kv"] = kw["ctx"].shared[("kv", "src")]
        return out

    model.blocks[0].mixer.forward = capture
    model.blocks[2].mixer_place.register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    logits = model(tokens).logits
    k, v = seen["kv"]
    x = model.blocks[2].mixer_place.norm(seen["h"])
    q = attn.position.rotate(attn.q(x).view(2, 9, 4, 4).transpose(1, 2), 0)
    o = attention_reference(q, k, v, causal=True, scale=4 ** -0.5)
    expected = attn.out(o.transpose(1, 2).reshape(2, 9, -1))
    y, _ = attn(x, ctx=__import__("types").SimpleNamespace(shared={("kv", "src"): (k, v)}, name=None))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    model.blocks[0].mixer.forward = original
    torch.testing.assert_close(decode(model, tokens, 3), logits, rtol=1e-10, atol=1e-10)


def test_kv_from_errors_are_located(tmp_path):
    errors = spec_errors(tmp_path, """vocab_size: 32
d_model: 16
layers:
  - mixer: {kind: attention, heads: 4, kv_from: later}
  - name: later
    mixer: {kind: attention, heads: 4}
  - name: rec
    mixer: {kind: gated_deltanet, heads: 2}
  - mixer: {kind: attention, heads: 4, kv_from: rec}
  - mixer: {kind: attention, heads: 4, kv_from: nowhere}
  - mixer: {kind: attention, heads: 4, kv_from: later, window: 8}
""")
    assert errors == [
        "m.yaml:4: layers[0].mixer.kv_from: 'later' (at layers[1]) does not run before this block; a layer can only "
        "read an earlier one",
        "m.yaml:9: layers[3].mixer.kv_from: 'rec' is a gated_deltanet layer; kv_from reads an attention layer's K/V",
        "m.yaml:10: layers[4].mixer.kv_from: no block named 'nowhere' (named blocks: later, rec)",
        "m.yaml:11: layers[5].mixer.kv_from: 'later' has causal True, window None; this layer must match (it has "
        "causal True, window 8): it reads that layer's cache"]


def test_a_checkpoint_file_from_before_placement_kinds_loads(registry, tmp_path):
    """Through load_checkpoint (safetensors), as generate and --resume read old runs."""
    import safetensors.torch

    from hybridlab.core.checkpoint import load_checkpoint

    model = model_of(registry, layers=[ATTN, GDN]).float()
    old = {k.replace("mixer_place.norm.", "mixer_norm.").replace("ffn_place.norm.", "ffn_norm."): v.clone()
           for k, v in model.state_dict().items() if k != "head.weight"}  # tied: saved once
    (tmp_path / "step").mkdir()
    safetensors.torch.save_file(old, str(tmp_path / "step" / "model.safetensors"))
    torch.save({"step": 1}, tmp_path / "step" / "trainer.pt")
    fresh = model_of(registry, layers=[ATTN, GDN]).float()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert load_checkpoint(tmp_path / "step", fresh, torch.device("cpu")) == {"step": 1}
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())


# ---------------------------------------------------------------- errors, all at once


def test_structure_errors_are_located_and_reported_together(tmp_path):
    text = """vocab_size: 32
d_model: 16
shared:
  attn: {mixer: {kind: attention, heads: 2}}
  unused: {mixer: {kind: attention, heads: 2}}
  nested:
    blocks:
      - use: attn
layers:
  - loop: 0
    blocks:
      - mixer: {kind: attention, heads: 2}
  - use: atn
  - use: nested
  - mixer: {kind: attention, heads: 2}
    name: a
  - mixer: {kind: attention, heads: 2}
    name: a
  - use: attn
"""
    errors = spec_errors(tmp_path, text)
    assert any(e.startswith("m.yaml:10: layers[0].loop: input should be greater than or equal to 1") for e in errors)
    # once the fields validate, one run reports every structural problem
    text_ok_loop = text.replace("loop: 0", "loop: 2")
    errors = spec_errors(tmp_path, text_ok_loop)
    assert "m.yaml:13: layers[1].use: no shared block or group named 'atn' (shared: attn, nested, unused)" in errors
    assert ("m.yaml:8: shared.nested.blocks[0].use: a shared group cannot use another shared group; write its blocks here"
            in errors)
    assert any(e.startswith("m.yaml:5: shared.unused: is never used") for e in errors)
    assert "m.yaml:18: layers[4].name: 'a' already names the block at layers[3]" in errors


def test_a_block_error_inside_a_loop_or_shared_group_names_its_written_path(tmp_path):
    text = """vocab_size: 32
d_model: 16
shared:
  attn: {mixer: {kind: attention, heads: 3}}
layers:
  - loop: 2
    blocks:
      - mixer: {kind: attention, heads: 5}
      - use: attn
"""
    errors = spec_errors(tmp_path, text)
    assert errors == ["m.yaml:8: layers[0].blocks[0].mixer.heads: must divide d_model (16) unless head_dim is set, got 5",
                      "m.yaml:4: shared.attn.mixer.heads: must divide d_model (16) unless head_dim is set, got 3"]


def test_unknown_fields_in_a_loop_or_use_are_suggested(tmp_path):
    errors = spec_errors(tmp_path, "vocab_size: 32\nd_model: 16\nlayers:\n  - loop: 2\n    blcks: []\n"
                                   "  - mixer: {kind: attention, heads: 2}\n    placment: {kind: post}\n")
    assert any("layers[0].blcks: unknown field 'blcks' (did you mean 'blocks'?)" in e for e in errors), errors
    assert any("layers[1].placment: unknown field 'placment' (did you mean 'placement'?)" in e for e in errors), errors


# ---------------------------------------------------------------- the shipped specs

SPECS = ["zamba2-tiny", "looped-tiny", "hrm-tiny", "gemma-sandwich-tiny", "mix-ln-tiny", "depth-scaled-tiny",
         "yoco-tiny"]


@pytest.mark.parametrize("name", SPECS)
def test_each_composition_spec_verifies_at_two_lengths(name):
    spec = load_model_spec(ROOT / "specs" / "models" / f"{name}.yaml")
    for seq_len in (20, 67):  # inside one 64-token chunk, and past it with an odd tail
        report = verify_model(spec, seq_len=seq_len)
        assert report.passed, (seq_len, [str(c) for c in report.failures()], report.problems)


@pytest.mark.parametrize("name", SPECS)
def test_each_composition_spec_trains(name, tmp_path, registry):
    from hybridlab.core.spec import load_pipeline

    (tmp_path / "p.yaml").write_text(f"name: {name}\nmodel: {ROOT / 'specs' / 'models' / (name + '.yaml')}\n"
                                     "data: {kind: mqar, vocab: 64, pairs: 2}\noptimizer: {kind: adamw, lr: 3.0e-3}\n"
                                     "steps: 6\nbatch_size: 4\neval_batches: 1\nlog_every: 1\ndevice: cpu\n")
    run_dir, result = train(load_pipeline(tmp_path / "p.yaml", registry=registry), out=tmp_path / "r",
                            progress=False, registry=registry)
    assert math.isfinite(result["eval/loss"]) and (run_dir / "checkpoints").is_dir()


def test_compare_sweeps_a_loop_count(tmp_path, registry):
    from hybridlab.core.compare import parse_sweep, plan

    with pytest.raises(Exception, match="expected KEY=V1,V2"):
        parse_sweep("model.layers[1].loop")
    spec = ROOT / "specs/models/looped-tiny.yaml"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"model: {spec}\ndata: {{kind: mqar, vocab: 64, pairs: 2}}\nsteps: 2\nbatch_size: 4\n"
                        "device: cpu\n")
    cells = plan([spec], pipeline, out=tmp_path / "out", registry=registry,
                 sweep=parse_sweep("model.layers[1].loop=1,4"))
    assert [c.label for c in cells] == ["looped-tiny-loop_1", "looped-tiny-loop_4"]
    assert [c.spec.model.layers[1].loop for c in cells] == [1, 4]
    assert len({c.dir for c in cells}) == 2


def test_a_layer_reference_across_a_wrapper_is_a_spec_error(tmp_path):
    """Found by an outside-in probe: a wrapper runs its block on a subset of the tokens, so
    the K/V one layer leaves in the run context cover other positions than the other
    reads (a crash, or future tokens leaking in silently); now refused at validate."""
    errors = spec_errors(tmp_path, """vocab_size: 32
d_model: 16
layers:
  - name: src
    mixer: {kind: attention, heads: 2}
    wrapper: {kind: mod, capacity: 0.5}
  - mixer: {kind: attention, heads: 2, kv_from: src}
  - name: plain
    mixer: {kind: attention, heads: 2}
  - mixer: {kind: attention, heads: 2, kv_from: plain}
    wrapper: {kind: skip}
""")
    assert errors == [
        "m.yaml:7: layers[1].mixer.kv_from: 'src' has a wrapper (mod), which runs it on a subset of the tokens; a layer "
        "reference needs both blocks to run on every token",
        "m.yaml:10: layers[3].mixer.kv_from: this block has a wrapper (skip), which runs it on a subset of the tokens; "
        "a layer reference needs both blocks to run on every token"]


def test_a_placement_that_is_not_a_norm_placement_is_refused_when_built(registry):
    """Found by an outside-in probe: only wrappers were checked for their base class."""
    import types

    from torch import nn

    from hybridlab.core.config import Config
    from hybridlab.core.errors import HybridlabError
    from hybridlab.registry import hookimpl, load_registry

    class LooseConfig(Config):
        kind: Literal["loose"] = "loose"

    class Loose(nn.Module):
        def __init__(self, config, dims, norm):
            super().__init__()

        def forward(self, h, sublayer, residual, ctx):
            return residual(h, sublayer)

    @hookimpl
    def hybridlab_register(register):
        register.kind("norm_placement", "loose", config=LooseConfig, module=Loose)

    reg = load_registry([("loose", types.SimpleNamespace(hybridlab_register=hybridlab_register))])
    with pytest.raises(HybridlabError, match="'loose': Loose does not subclass hybridlab.core.interfaces.NormPlacement"):
        model_of(reg, layers=[{**ATTN, "placement": {"kind": "loose"}}])


def test_verify_model_decoding_imports_first():
    """Found by an outside-in probe: importing the model-level verifier before core.verify
    was a circular ImportError."""
    import subprocess
    import sys

    code = "from hybridlab.core.verify_model import verify_model_decoding; from hybridlab.core.verify import verify_model"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_shared_and_defaults_shapes_that_cannot_work_are_located_errors(tmp_path):
    """Found by an outside-in probe: an empty shared group validated (a use added nothing),
    defaults: {use/loop/name} was merged into every block, a shared entry with extra keys
    got the repeat group's message, and a shared mor block used in another loop passed."""
    errors = spec_errors(tmp_path, """vocab_size: 32
d_model: 16
defaults:
  use: s
  name: x
shared:
  empty: {blocks: []}
  mixed: {mixer: {kind: attention, heads: 2}, blocks: []}
  five: 5
layers:
  - use: empty
  - mixer: {kind: attention, heads: 2}
""")
    assert "m.yaml:4: defaults.use: 'use' cannot be a default: defaults are merged into every block (use, loop and " \
           "repeat are layer entries, not block fields)" in errors
    assert "m.yaml:5: defaults.name: 'name' cannot be a default: defaults are merged into every block (a name must " \
           "be unique)" in errors
    assert any(e.startswith("m.yaml:8: shared.mixed: a shared group is {blocks: [...]} alone") for e in errors)
    assert any(e.startswith("m.yaml:9: shared.five: must be one block (a mapping with mixer:)") for e in errors)
    assert any(e.startswith("m.yaml:7: shared.empty") and "at least 1 item" in e for e in errors), errors
    errors = spec_errors(tmp_path, """vocab_size: 32
d_model: 16
shared:
  s: {mixer: {kind: attention, heads: 2}, wrapper: {kind: mor, recursions: 2}}
layers:
  - {loop: 2, blocks: [{use: s}]}
  - {loop: 3, blocks: [{use: s}]}
""")
    assert errors == ["m.yaml:4: shared.s.wrapper.recursions: must equal the count of the loop around this block (3), "
                      "got 2"]
