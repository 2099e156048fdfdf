"""loss ``mtp`` (DeepSeek-V3 multi-token prediction) and speculative decoding with it:
per-depth alignment and causality, training and exact resume, validate-time errors, and
speculative output == greedy output for every mixer kind, with good and bad drafts."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hybridlab.core.cli import main
from hybridlab.core.errors import HybridlabError, SpecError
from hybridlab.core.generate import decode_run, generate, speculative_decode
from hybridlab.core.interfaces import Drafter
from hybridlab.core.model import Model
from hybridlab.core.objectives import Objectives
from hybridlab.core.spec import PipelineSpec, load_pipeline
from hybridlab.core.train import Trainer
from hybridlab.registry import default_registry

ATTENTION = {"kind": "attention", "heads": 2}
GDN = {"kind": "gated_deltanet", "heads": 2}
MAMBA2 = {"kind": "mamba2", "heads": 2}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread (see tests/plugins/conftest.py)."""


def pipeline(registry, layers, *, depth=2, block=None, vocab=32, d_model=16, mtp=True, **changes) -> PipelineSpec:
    own = {"kind": "mtp", "depth": depth, "weight": 0.5, **({"block": block} if block is not None else {})}
    return PipelineSpec.model_validate({
        "model": {"vocab_size": vocab, "d_model": d_model, "layers": [{"mixer": m} for m in layers]},
        "data": {"kind": "mqar", "vocab": vocab, "pairs": 4},
        "objectives": [{"kind": "cross_entropy"}, *([own] if mtp else [])],
        "optimizer": {"kind": "adamw", "lr": 3e-3},
        "steps": 8, "batch_size": 4, "log_every": 1, "eval_batches": 1, "checkpoint_every": 4,
        "device": "cpu", "seed": 3, **changes,
    }, context={"registry": registry})


def built(registry, layers, **kwargs) -> tuple[Model, Objectives]:
    spec = pipeline(registry, layers, **kwargs)
    model = Model(spec.model, registry)
    return model, Objectives(spec.objectives, model, registry, device=torch.device("cpu"))


def mtp_logits(model, mtp, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Depth k's logits [B, T − k, V] on ``tokens`` [B, T], run in parallel as in training."""
    layer = mtp.draft_layer
    hidden = model(tokens, hidden=(layer,)).hidden[layer]
    out = []
    for k, module in enumerate(mtp.depths, start=1):
        n = tokens.shape[1] - k
        hidden, _ = module(model, hidden[:, :n], tokens[:, k:], None, mtp._context(model, mtp_aux()))
        out.append(model.head(model.norm(hidden)))
    return out


def mtp_aux():
    from hybridlab.core.interfaces import Aux

    return Aux()


# ---------------------------------------------------------------- the objective


def test_depth_k_at_position_i_reads_tokens_up_to_i_plus_k_and_nothing_after(registry):
    model, objectives = built(registry, [ATTENTION, GDN], depth=3)
    mtp = objectives.items[1]
    tokens = torch.randint(0, 32, (1, 12))
    base = mtp_logits(model, mtp, tokens)
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1) % 32
    after = mtp_logits(model, mtp, changed)
    for k, (a, b) in enumerate(zip(base, after), start=1):
        moved = (a - b).abs().amax(-1)[0] > 1e-6  # [T − k]: which positions changed
        # position i reads tokens 0 … i + k: token 7 reaches positions 7 − k and later
        assert moved.tolist() == [i + k >= 7 for i in range(12 - k)], k


def test_depth_k_is_scored_against_the_target_k_places_on(registry):
    model, objectives = built(registry, [ATTENTION], depth=2)
    inputs = torch.randint(0, 32, (1, 9))
    logits = mtp_logits(model, objectives.items[1], inputs)
    for q in range(9):  # one scored target, at position q
        targets = torch.full((1, 9), -100)
        targets[0, q] = 5
        _, results, _ = objectives.compute({"inputs": inputs, "targets": targets}, model=model, task=None)
        _, _, metrics = results[1]
        for k in (1, 2):
            total, count = metrics[f"loss_{k}"]
            assert int(count) == (q >= k)  # depth k scores targets[i + k]: position q is i = q − k
            if q >= k:
                want = torch.nn.functional.cross_entropy(logits[k - 1][0, q - k], torch.tensor(5))
                torch.testing.assert_close(total, want)


def test_loss_is_the_mean_over_depths_and_trains_the_modules_and_the_shared_parts(registry):
    model, objectives = built(registry, [ATTENTION, ATTENTION], depth=2)
    batch = {"inputs": torch.randint(0, 32, (2, 11)), "targets": torch.randint(0, 32, (2, 11))}
    batch["targets"][0, 4] = -100
    _, results, _ = objectives.compute(batch, model=model, task=None)
    _, loss, metrics = results[1]
    means = [float(metrics[f"loss_{k}"][0] / metrics[f"loss_{k}"][1]) for k in (1, 2)]
    assert float(loss.detach()) == pytest.approx(sum(means) / 2, rel=1e-6)
    assert {f"accuracy_{k}" for k in (1, 2)} <= set(metrics)
    loss.backward()  # the MTP loss alone: its modules, the shared embedding and head, and the main blocks
    mtp = objectives.items[1]
    for name, p in [*mtp.named_parameters(), ("embedding", model.embedding.weight),
                    ("final norm", next(model.norm.parameters())),
                    ("block 0", next(model.blocks[0].parameters()))]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # shared, not copied: the objective holds no embedding, norm or head of its own
    assert not any(p is model.embedding.weight for p in mtp.parameters())
    assert sum(p.numel() for p in mtp.parameters()) == 2 * (
        sum(p.numel() for p in mtp.depths[0].parameters()))


def test_depth_logits_carry_the_mup_logits_multiplier(registry):
    """Under μP the model's head reads final · base_width / d_model (Model.readout); the
    MTP depths share that head and must apply the same multiplier (they called the head
    directly, so their logits were d_model / base_width times too large)."""
    spec = pipeline(registry, [ATTENTION], depth=1, d_model=32)
    model_spec = spec.model.model_copy(update={"parametrization": "mup", "base_width": 16})
    model = Model(model_spec, registry)
    objectives = Objectives(spec.objectives, model, registry, device=torch.device("cpu"))
    mtp = objectives.items[1]
    hidden = torch.randn(2, 5, 32)
    assert model.mup is not None and model.mup.output_mult == pytest.approx(0.5)
    torch.testing.assert_close(mtp._logits(model, hidden), model.head(model.norm(hidden) * 0.5))


def test_a_block_of_its_own_and_the_default_last_block(registry):
    model, objectives = built(registry, [ATTENTION, GDN], depth=1)
    assert type(objectives.items[1].depths[0].block.mixer) is type(model.blocks[1].mixer)  # the last block's kind
    block = {"mixer": MAMBA2, "ffn": {"kind": "mlp", "hidden": 24}}
    model, objectives = built(registry, [ATTENTION, GDN], depth=1, block=block)
    module = objectives.items[1].depths[0].block
    assert type(module.mixer).__name__ == "Mamba2" and module.ffn.up.out_features == 24


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A byte-level model trained with cross_entropy + mtp on a text that repeats: every
    token is predictable, at any distance."""
    registry, root = default_registry(), tmp_path_factory.mktemp("text")
    torch.set_num_threads(1)
    (root / "abc.txt").write_text("abcdefghij" * 300)
    spec = PipelineSpec.model_validate({
        "model": {"vocab_size": 256, "d_model": 16, "layers": [{"mixer": ATTENTION, "ffn": None}]},
        "data": {"kind": "text", "files": [str(root / "abc.txt")], "length": 16},
        "objectives": [{"kind": "cross_entropy"}, {"kind": "mtp", "depth": 2, "weight": 0.5}],
        "optimizer": {"kind": "adamw", "lr": 1e-2}, "steps": 50, "batch_size": 8, "log_every": 10,
        "eval_batches": 1, "device": "cpu", "seed": 0}, context={"registry": registry})
    result = Trainer(spec, root / "run", registry=registry, progress=False).run()
    return root / "run", result


def test_training_with_mtp_learns_a_predictable_sequence_and_logs_each_depth(text_run):
    run_dir, result = text_run
    assert result["len16/mtp.accuracy_1"] > 0.9 and result["len16/mtp.accuracy_2"] > 0.9, result
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "mtp.loss_2" in r and "len16/loss" not in r)
    assert {"mtp.loss", "mtp.loss_1", "mtp.accuracy_1", "mtp.accuracy_2"} <= set(first)
    assert first["mtp.loss_2"] > result["len16/mtp.loss_2"]


def test_resume_with_mtp_is_exact_and_the_checkpoint_holds_its_weights(registry, tmp_path):
    spec = lambda: pipeline(registry, [ATTENTION, GDN], depth=2)  # noqa: E731
    whole = Trainer(spec(), tmp_path / "whole", registry=registry, progress=False)
    whole.run()
    part = Trainer(spec(), tmp_path / "part", registry=registry, progress=False)
    part.run(stop_at=5)  # killed after step 5: the last checkpoint is step 4
    resumed = Trainer(spec(), tmp_path / "part", registry=registry, resume=True, progress=False)
    assert resumed.step == 4
    resumed.run()

    def logged(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["mtp.loss_2"]) for r in rows if "loss" in r and "eval/loss" not in r]

    assert logged(tmp_path / "part")[-4:] == logged(tmp_path / "whole")[-4:]  # exact float equality
    for a, b in zip(whole.objectives.state_dict().values(), resumed.objectives.state_dict().values()):
        assert torch.equal(a, b)
    saved = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000008" / "objectives.safetensors"))
    mine = {f"items.1.{k}": v for k, v in whole.objectives.items[1].state_dict().items()}
    assert set(mine) == set(saved) and any(".depths.1.projection." in k for k in saved)
    for key, value in mine.items():
        assert torch.equal(saved[key], value), key


# ---------------------------------------------------------------- validate-time errors


def write(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


PIPE = """
model:
  vocab_size: 32
  d_model: 16
  layers:
    - mixer: {kind: attention, heads: 2}
data: {kind: mqar, vocab: 32, pairs: 4}
objectives:
  - {kind: cross_entropy}
  - kind: mtp
"""


@pytest.mark.parametrize("body, line, path, fragment", [
    ("    depth: 0\n", 10, "objectives[1].depth", "greater than or equal to 1"),
    ("    depth: true\n", 10, "objectives[1].depth", "valid integer"),
    ("    block: {mixer: {kind: attention, heads: 3}}\n", 10, "objectives[1].block.mixer.heads", "must divide"),
    ("    block: {mixer: {kind: nope}}\n", 10, "objectives[1].block.mixer", "unknown"),
    ("    block: {mixer: {kind: attention, heads: 2}, loop: 2}\n", 10, "objectives[1].block.loop", "unknown field"),
], ids=["depth-0", "depth-bool", "block-check", "block-kind", "block-field"])
def test_bad_mtp_configs_are_located_spec_errors_and_exit_2(tmp_path, capsys, body, line, path, fragment):
    spec = write(tmp_path, PIPE + body)
    with pytest.raises(SpecError) as info:
        load_pipeline(spec)
    problems = [p for p in info.value.problems if p.path == path]
    assert problems and problems[0].line == line and fragment in problems[0].message, info.value.problems
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"p.yaml:{line}: {path}" in err and "Traceback" not in err


def test_a_default_block_that_cannot_serve_outside_its_loop_is_an_error_at_the_objective(tmp_path):
    spec = write(tmp_path, """
        model:
          vocab_size: 32
          d_model: 16
          layers:
            - loop: 2
              blocks:
                - mixer: {kind: attention, heads: 2}
                  wrapper: {kind: mor, recursions: 2}
        data: {kind: mqar, vocab: 32, pairs: 4}
        objectives:
          - {kind: cross_entropy}
          - {kind: mtp, depth: 1}
        """)
    with pytest.raises(SpecError) as info:
        load_pipeline(spec)
    [problem] = info.value.problems
    assert (problem.line, problem.path) == (12, "objectives[1]")
    assert "last block" in problem.message and "wrapper.recursions" in problem.message
    assert "block:" in problem.message  # the fix


def test_a_bad_last_block_is_reported_once_at_the_model_not_again_at_the_objective(tmp_path):
    spec = write(tmp_path, PIPE.replace("heads: 2}", "heads: 3}"))
    with pytest.raises(SpecError) as info:
        load_pipeline(spec)
    assert [p.path for p in info.value.problems] == ["model.layers[0].mixer.heads"], info.value.problems


def test_a_block_reading_another_layers_kv_is_an_error(tmp_path):
    spec = write(tmp_path, """
        model:
          vocab_size: 32
          d_model: 16
          layers:
            - {mixer: {kind: attention, heads: 2}, name: a}
        data: {kind: mqar, vocab: 32, pairs: 4}
        objectives:
          - kind: mtp
            block: {mixer: {kind: attention, heads: 2, kv_from: a}}
        """)
    with pytest.raises(SpecError) as info:
        load_pipeline(spec)
    [problem] = info.value.problems
    assert (problem.line, problem.path) == (9, "objectives[0].block.mixer.kv_from")
    assert problem.message.startswith("reads block 'a'")


# ---------------------------------------------------------------- speculative decoding


class OracleDrafter(Drafter):
    """Drafts the known greedy continuation, wrong wherever ``wrong(position)`` says: every
    pattern of acceptance (all, none, a prefix) on purpose."""

    def __init__(self, greedy: torch.Tensor, k: int, wrong) -> None:
        self.greedy, self.max_draft, self.wrong, self.draft_layer = greedy, k, wrong, "final"

    def draft_state(self, model, batch, device, dtype):
        return {"seen": 1}  # token 0 of the sequence precedes the first hidden position

    def draft(self, model, state, hidden, tokens, count):
        assert hidden.shape[:2] == tokens.shape
        assert torch.equal(tokens[0], self.greedy[state["seen"]:state["seen"] + tokens.shape[1]])  # only final tokens
        state["seen"] += tokens.shape[1]
        at = range(state["seen"], state["seen"] + count)
        drafts = [int(self.greedy[q]) + (1 if self.wrong(q) else 0) for q in at]
        return torch.tensor([[d % 32 for d in drafts]]), state


def mixer_examples():
    """Every registered mixer kind with its first example config (sized for d_model 48)."""
    return [{"kind": kind.name, **(kind.examples[0] if kind.examples else {})}
            for kind in default_registry().kinds("mixer")]


@pytest.mark.parametrize("mixer", mixer_examples(), ids=lambda m: m["kind"])
def test_speculative_output_is_greedy_for_every_mixer_kind_whatever_the_drafts(registry, mixer):
    """Rollback: a rejected draft restores the state copy and re-runs the accepted tokens."""
    model = Model(pipeline(registry, [mixer], vocab=32, d_model=48).model, registry).eval()
    prompt = torch.randint(0, 32, (1, 5))
    greedy = model.generate(prompt, 14)
    for k, wrong, rate in [(3, lambda q: False, 1.0), (3, lambda q: True, 0.0), (3, lambda q: q % 3 == 0, None)]:
        drafter = OracleDrafter(greedy[0], k, wrong)
        out, stats = speculative_decode(model, drafter, prompt, 14)
        assert torch.equal(out, greedy), (mixer["kind"], k)
        assert stats.tokens == 14 and stats.drafted > 0
        if rate is not None:
            assert stats.acceptance_rate == rate
        else:
            assert 0 < stats.accepted < stats.drafted


class Counter(torch.nn.Module):
    """A stand-in model that updates its state in place (as a plugin's preallocated cache
    might): the state counts the tokens read, and the next token is that count mod 32. A
    rejected draft left in the state would shift every later token."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def init_state(self, batch, device=None, dtype=None):
        return [torch.zeros(batch, dtype=torch.long)]

    def forward(self, tokens, state=None, *, hidden=()):
        from hybridlab.core.interfaces import ModelOutput

        count = state[0][:, None] + torch.arange(1, tokens.shape[1] + 1)  # [B, T]: tokens read after each
        state[0] += tokens.shape[1]  # in place
        logits = torch.nn.functional.one_hot(count % 32, 32).float()  # [B, T, 32]
        return ModelOutput(logits, state, hidden={key: logits for key in hidden})


def test_a_state_updated_in_place_is_rolled_back_from_its_copy():
    prompt = torch.tensor([[7, 7, 7]])
    greedy = torch.arange(15)[None] % 32
    greedy[0, :3] = 7
    out, stats = speculative_decode(Counter(), OracleDrafter(greedy[0], 3, lambda q: q % 2 == 0), prompt, 12)
    assert torch.equal(out, greedy) and 0 < stats.accepted < stats.drafted
    with pytest.raises(ValueError, match=r"one prompt of token ids \[1, T\]"):
        speculative_decode(Counter(), OracleDrafter(greedy[0], 3, lambda q: False), prompt.repeat(2, 1), 4)


@pytest.mark.parametrize("layers", [[ATTENTION, ATTENTION], [GDN, GDN], [MAMBA2, ATTENTION, GDN]],
                         ids=["attention", "gated_deltanet", "hybrid"])
def test_speculative_with_untrained_mtp_drafts_equals_greedy(registry, layers):
    model, objectives = built(registry, layers, depth=3)
    model.eval()
    mtp = objectives.items[1].eval()
    for length, new in ((1, 17), (6, 23)):
        prompt = torch.randint(0, 32, (1, length))
        out, stats = speculative_decode(model, mtp, prompt, new)
        assert torch.equal(out, model.generate(prompt, new))
        assert stats.rounds + 1 + stats.accepted == new and stats.drafted >= stats.rounds - 1


def test_modules_in_a_hyper_connection_stream_with_an_moe_block(registry):
    """The modules expand and reduce the model's own residual stream (several lanes here),
    and their blocks' auxiliary losses (MoE balance) join the MTP loss as ``aux``."""
    moe = {"mixer": ATTENTION, "ffn": {"kind": "moe", "experts": 4, "top_k": 2, "hidden": 16}}
    spec = pipeline(registry, [ATTENTION, GDN], depth=2, block=moe)
    spec = PipelineSpec.model_validate({**spec.model_dump(), "model": {
        **spec.model.model_dump(), "residual": {"kind": "hyper_connections", "lanes": 2}}},
        context={"registry": registry})
    model = Model(spec.model, registry)
    objectives = Objectives(spec.objectives, model, registry, device=torch.device("cpu"))
    batch = {"inputs": torch.randint(0, 32, (2, 9)), "targets": torch.randint(0, 32, (2, 9))}
    _, results, _ = objectives.compute(batch, model=model, task=None)
    _, loss, metrics = results[1]
    assert float(metrics["block_aux"]) > 0
    assert float(loss.detach()) > float(metrics["loss_1"][0] / metrics["loss_1"][1] +
                                        metrics["loss_2"][0] / metrics["loss_2"][1]) / 2
    model.eval(), objectives.eval()
    prompt = torch.randint(0, 32, (1, 4))
    out, _ = speculative_decode(model, objectives.items[1], prompt, 10)
    assert torch.equal(out, model.generate(prompt, 10))


def test_mtp_drafts_equal_the_modules_run_in_parallel_over_the_accepted_and_drafted_tokens(registry):
    """The drafter's incremental state (each depth's final positions, then k − 1 draft
    positions from a copy) gives what the training-time parallel form gives."""
    model, objectives = built(registry, [GDN, ATTENTION], depth=3)
    model, mtp = model.double().eval(), objectives.items[1].double().eval()
    sequence = torch.randint(0, 32, (1, 30))
    layer = mtp.draft_layer
    hidden = model(sequence, hidden=(layer,)).hidden[layer]  # [1, 30, D]
    state = mtp.draft_state(model, 1, "cpu", torch.float64)
    n = 0
    for chunk in (4, 1, 3, 2, 1, 5, 1):  # positions made final per round, as accepted runs would be
        drafts, state = mtp.draft(model, state, hidden[:, n:n + chunk], sequence[:, n + 1:n + chunk + 1], 3)
        n += chunk
        want, known = [], sequence[:, :n + 1]  # t_0 … t_n
        with torch.no_grad():
            h = model(known[:, :n], hidden=(layer,)).hidden[layer]  # positions 0 … n − 1
            for k, module in enumerate(mtp.depths, start=1):
                tokens = torch.cat([known, torch.tensor([want], dtype=torch.long)], 1)[:, k:n + k]  # t_{i+k}
                h, _ = module(model, h, tokens, None, mtp._context(model, mtp_aux()))
                want.append(int(model.head(model.norm(h[:, -1])).argmax(-1)))
        assert drafts[0].tolist() == want, n


def test_a_trained_mtp_draft_is_accepted(text_run, registry):
    run_dir, _ = text_run
    fast = decode_run(run_dir, "abc", max_new_tokens=20, speculative=True, registry=registry)
    plain = decode_run(run_dir, "abc", max_new_tokens=20, registry=registry)
    assert fast.tokens == plain.tokens and fast.text == plain.text
    assert fast.stats.acceptance_rate > 0.8 and fast.stats.rounds < 20


# ---------------------------------------------------------------- the generate command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    registry = default_registry()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    Trainer(pipeline(registry, [ATTENTION, GDN], depth=2, steps=2, checkpoint_every=0), root / "mtp",
            registry=registry, progress=False).run()
    Trainer(pipeline(registry, [ATTENTION], mtp=False, steps=1, checkpoint_every=0), root / "plain",
            registry=registry, progress=False).run()
    encoder = {"mixer": {**ATTENTION, "causal": False}}
    Trainer(pipeline(registry, [ATTENTION], block=encoder, depth=1, steps=1, checkpoint_every=0), root / "encoder",
            registry=registry, progress=False).run()
    return root


def test_generate_speculative_prints_the_greedy_text_and_the_acceptance_rate(runs, capsys):
    assert main(["generate", str(runs / "mtp"), "--prompt", "1 2 3", "--max-new-tokens", "9"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", str(runs / "mtp"), "--prompt", "1 2 3", "--max-new-tokens", "9", "--speculative"]) == 0
    captured = capsys.readouterr()
    assert captured.out == greedy
    assert "acceptance rate" in captured.err and "tokens/s" in captured.err
    new, _ = generate(runs / "mtp", "1 2 3", max_new_tokens=9, speculative=True)
    assert " ".join(map(str, [1, 2, 3, *new])) == greedy.strip()


def test_generate_speculative_refuses_sampling_and_runs_without_a_drafter(runs, capsys):
    assert main(["generate", str(runs / "mtp"), "--prompt", "1 2", "--speculative", "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "--speculative" in err and "--temperature 0.7" in err and "Traceback" not in err
    assert main(["generate", str(runs / "plain"), "--prompt", "1 2", "--speculative"]) == 2
    err = capsys.readouterr().err
    assert "needs a drafter" in err and "cross_entropy" in err and "mtp" in err and "Traceback" not in err
    with pytest.raises(HybridlabError, match="needs a drafter"):
        generate(runs / "plain", "1 2", speculative=True)
    # a run made before encoder MTP blocks were refused at validate: its spec no longer loads
    assert main(["generate", str(runs / "encoder"), "--prompt", "1 2", "--speculative"]) == 2
    err = capsys.readouterr().err
    assert "objectives[1].block.mixer: attention reads later positions" in err and "Traceback" not in err


def test_an_mtp_block_that_reads_ahead_or_another_blocks_kv_is_refused_at_validate(tmp_path):
    """Found by an outside-in probe: a `causal: false` MTP block validated and trained on
    the tokens it predicts; a default block with kv_from validated and died at step 1."""
    (tmp_path / "y").mkdir()
    encoder = write(tmp_path, PIPE + "    block: {mixer: {kind: attention, heads: 2, causal: false}}\n")
    with pytest.raises(SpecError) as info:
        load_pipeline(encoder)
    assert [p.path for p in info.value.problems] == ["objectives[1].block.mixer"], info.value.problems
    assert "reads later positions" in info.value.problems[0].message
    yoco = write(tmp_path / "y", PIPE.replace("    - mixer: {kind: attention, heads: 2}\n",
                                        "    - {mixer: {kind: attention, heads: 2}, name: g}\n"
                                        "    - mixer: {kind: attention, heads: 2, kv_from: g}\n"))
    with pytest.raises(SpecError) as info:
        load_pipeline(yoco)
    assert any("objectives[1]" in p.path and "reads block 'g'" in p.message for p in info.value.problems), \
        info.value.problems
