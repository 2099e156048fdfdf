"""Third-party plugins end to end: the example package and the broken fixture packages are
pip-installed into a temporary directory (never into the test environment), and each
check runs in a fresh interpreter with that directory on PYTHONPATH, so the entry points
are discovered exactly as they would be for a user who ran ``pip install``.

Installs are shared per module; every check is its own subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "hybridlab-plugin-example"
MODEL_SPEC = EXAMPLE / "specs" / "scalenorm-tiny.yaml"
PIPELINE = EXAMPLE / "specs" / "train-scalenorm-tiny.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "plugins"
BROKEN = ["import-error", "duplicate-kind", "invalid-config"]


# ---------------------------------------------------------------- helpers


def pip_install(sources: list[Path], root: Path) -> Path:
    """Install ``sources`` into ``root/site`` and return that directory. Each source is
    copied first, because an in-tree setuptools build writes build/ and *.egg-info next
    to the sources, and the checkout must stay clean."""
    site, copies = root / "site", []
    for src in sources:
        copy = root / "src" / src.name
        shutil.copytree(src, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        copies.append(str(copy))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
           "--disable-pip-version-check", "--target", str(site), *copies]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return site


def run(args: list[str], sites: list[Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with ``sites`` prepended to PYTHONPATH, in ``cwd`` (outside the
    checkout, so its top-level folders cannot shadow anything)."""
    env = dict(os.environ)
    env.pop("HYBRIDLAB_IMPL", None)  # the dispatcher's choice is part of what we check
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def python(code: str, sites: list[Path], cwd: Path) -> str:
    """Run a ``python -c`` snippet that must succeed; returns its stdout."""
    proc = run(["-c", code], sites, cwd)
    assert proc.returncode == 0, f"snippet failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


# What load_registry() found, as JSON: every plugin record and every kind with its owner.
REGISTRY_SNIPPET = """
import json
from hybridlab.registry import load_registry

registry = load_registry()
print(json.dumps({
    "plugins": [{"name": p.name, "package": p.package, "version": p.version, "module": p.module,
                 "error": p.error, "registered": p.registered} for p in registry.plugins],
    "kinds": {f"{k.category}.{k.name}": {"package": k.owner.package, "version": k.owner.version,
                                         "impls": [i.name for i in registry.impls(k.category, k.name)]}
              for k in registry.kinds()},
}))
"""


def plugin(registry: dict, name: str) -> dict:
    found = [p for p in registry["plugins"] if p["name"] == name]
    assert len(found) == 1, f"expected one plugin record named {name!r}, got {found}"
    return found[0]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    return pip_install([EXAMPLE], tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    return pip_install([FIXTURES / name for name in BROKEN], tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def example_registry(example_site, workdir) -> dict:
    return last_json(python(REGISTRY_SNIPPET, [example_site], workdir))


@pytest.fixture(scope="module")
def broken_registry(example_site, broken_site, workdir) -> dict:
    """The example and all three broken packages installed side by side."""
    return last_json(python(REGISTRY_SNIPPET, [broken_site, example_site], workdir))


# ---------------------------------------------------------------- load_registry


def test_load_registry_finds_example_kinds(example_registry):
    kinds = example_registry["kinds"]
    assert kinds["normalization.scalenorm"] == {
        "package": "hybridlab-plugin-example", "version": "0.1.0", "impls": ["torch", "reference"]}
    assert kinds["mixer.shift"] == {"package": "hybridlab-plugin-example", "version": "0.1.0", "impls": []}
    for name, module, registered in [
        ("scalenorm", "hybridlab_plugin_example.scalenorm",
         ["normalization.scalenorm", "normalization.scalenorm:reference", "normalization.scalenorm:torch"]),
        ("shift", "hybridlab_plugin_example.shift", ["mixer.shift"]),
    ]:
        record = plugin(example_registry, name)
        assert record == {"name": name, "package": "hybridlab-plugin-example", "version": "0.1.0",
                          "module": module, "error": None, "registered": registered}
    assert [p for p in example_registry["plugins"] if p["error"]] == []


def test_load_registry_reports_import_error(broken_registry):
    record = plugin(broken_registry, "fixture_import_error")
    assert record["package"] == "hybridlab-fixture-import-error"
    assert record["version"] == "0.1.0"
    assert record["error"] == ("import failed: RuntimeError: "
                               "hybridlab_fixture_import_error fails on import on purpose")
    assert record["registered"] == []


def test_load_registry_reports_duplicate_kind(broken_registry):
    record = plugin(broken_registry, "fixture_duplicate_rmsnorm")
    error = record["error"]
    assert error is not None
    assert "'rmsnorm'" in error and "registered twice" in error
    assert "hybridlab 0.1.0" in error  # the package that had it first
    assert "hybridlab-fixture-duplicate-kind 0.1.0" in error  # the newcomer
    # the built-in keeps the kind, and nothing of the failed plugin is kept, not even
    # the valid kind it registered before the clash
    assert broken_registry["kinds"]["normalization.rmsnorm"]["package"] == "hybridlab"
    assert "normalization.fixture_staged" not in broken_registry["kinds"]
    assert record["registered"] == []


def test_load_registry_reports_invalid_config(broken_registry):
    record = plugin(broken_registry, "fixture_invalid_config")
    assert record["package"] == "hybridlab-fixture-invalid-config"
    assert "fixture_loose" in record["error"] and "LooseConfig" in record["error"]
    assert "extra='forbid'" in record["error"]
    assert "normalization.fixture_loose" not in broken_registry["kinds"]


def test_load_registry_keeps_builtins_beside_broken_plugins(broken_registry, example_registry):
    failed = sorted(p["name"] for p in broken_registry["plugins"] if p["error"])
    assert failed == ["fixture_duplicate_rmsnorm", "fixture_import_error", "fixture_invalid_config"]
    # everything that loads without the broken packages loads with them, unchanged
    assert broken_registry["kinds"] == example_registry["kinds"]
    kinds = broken_registry["kinds"]
    assert kinds["mixer.attention"]["package"] == "hybridlab"
    assert kinds["mixer.attention"]["impls"] == ["sdpa", "flex", "reference"]
    assert kinds["normalization.scalenorm"]["package"] == "hybridlab-plugin-example"


# ---------------------------------------------------------------- the example kinds at work


def test_load_model_spec_with_example_kinds(example_site, workdir):
    code = f"""
import json, torch
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec

spec = load_model_spec({str(MODEL_SPEC)!r})
torch.manual_seed(0)
model = Model(spec)
tokens = torch.randint(0, spec.vocab_size, (2, 37))
out = model(tokens)
assert out.logits.shape == (2, 37, spec.vocab_size), out.logits.shape
assert torch.isfinite(out.logits).all()
norm = model.blocks[0].mixer_place.norm
print(json.dumps({{
    "mixers": [b.mixer.kind for b in spec.layers],
    "norms": sorted({{b.norm.kind for b in spec.layers}} | {{spec.norm.kind}}),
    "final_eps": spec.norm.eps,
    "g": norm.g.item(),
    "impl": norm.impl_for(norm.config, torch.zeros(1, 64)).name,
}}))
"""
    result = last_json(python(code, [example_site], workdir))
    assert result["mixers"] == ["shift", "attention", "shift"]
    assert result["norms"] == ["scalenorm"]
    assert result["final_eps"] == 1e-6
    assert result["g"] == pytest.approx(math.sqrt(64))  # init sqrt(d_model)
    assert result["impl"] == "torch"


def test_load_model_spec_rejects_unknown_field_of_example_kind(example_site, workdir, tmp_path):
    """extra='forbid' on the plugin's config: a typo is an error at its line."""
    spec = tmp_path / "typo.yaml"
    spec.write_text("vocab_size: 16\nd_model: 8\nlayers:\n  - mixer: {kind: shift, bais: true}\n")
    code = f"""
from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_model_spec
try:
    load_model_spec({str(spec)!r})
except SpecError as exc:
    print(exc)
else:
    raise SystemExit("no error")
"""
    out = python(code, [example_site], workdir)
    assert "typo.yaml:4: layers[0].mixer.bais: unknown field 'bais' (did you mean 'bias'?)" in out


def test_shift_step_decoding_equals_parallel_forward(example_site, workdir):
    code = f"""
import torch
from hybridlab.core.config import Dims
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec
from hybridlab.registry import default_registry
from hybridlab_plugin_example.shift import Shift, ShiftConfig

torch.manual_seed(0)
B, T, D = 3, 13, 24
dims = Dims(d_model=D, vocab_size=16, n_layers=1, registry=default_registry())
mixer = Shift(ShiftConfig(bias=True), dims).double()
x = torch.randn(B, T, D, dtype=torch.float64)

# stateless parallel forward
y, state = mixer(x)
assert state is None and y.shape == (B, T, D)
# y_t depends on x_t and x_(t-1) only
expected = mixer.proj(torch.cat([x, torch.cat([torch.zeros(B, 1, D, dtype=x.dtype), x[:, :-1]], 1)], -1))
torch.testing.assert_close(y, expected, rtol=0, atol=0)

# one token at a time from init_state
state = mixer.init_state(B, "cpu", torch.float64)
assert state.shape == (B, 1, D) and not state.any()
steps = []
for t in range(T):
    y_t, state = mixer.step(x[:, t:t + 1], state)
    assert y_t.shape == (B, 1, D) and state.shape == (B, 1, D)
    steps.append(y_t)
torch.testing.assert_close(torch.cat(steps, 1), y, rtol=0, atol=1e-12)
torch.testing.assert_close(state, x[:, -1:])

# prefill 5 tokens in parallel with a state, then step the rest
y_pre, state = mixer(x[:, :5], mixer.init_state(B, "cpu", torch.float64))
outs = [y_pre]
for t in range(5, T):
    y_t, state = mixer.step(x[:, t:t + 1], state)
    outs.append(y_t)
torch.testing.assert_close(torch.cat(outs, 1), y, rtol=0, atol=1e-12)

# packed documents: the first token of each document sees zeros, as if run alone
doc_ids = torch.tensor([[0] * 6 + [1] * 7] * B)
y_packed, _ = mixer(x, doc_ids=doc_ids)
torch.testing.assert_close(y_packed[:, :6], mixer(x[:, :6])[0], rtol=0, atol=1e-12)
torch.testing.assert_close(y_packed[:, 6:], mixer(x[:, 6:])[0], rtol=0, atol=1e-12)

# the state is one token whatever the length
assert mixer.state_bytes(1, torch.bfloat16) == mixer.state_bytes(4096, torch.bfloat16) == D * 2
assert mixer.state_bytes(10, torch.float32) == D * 4

# the whole model (shift, attention and scalenorm) decodes like its parallel forward
model = Model(load_model_spec({str(MODEL_SPEC)!r})).double()
tokens = torch.randint(0, 64, (2, 11))
full = model(tokens).logits
state = model.init_state(2)
logits = []
for t in range(tokens.shape[1]):
    out = model.step(tokens[:, t], state)
    state = out.state
    logits.append(out.logits)
torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)
print("ok")
"""
    assert python(code, [example_site], workdir).strip().endswith("ok")


def test_scalenorm_torch_matches_reference(example_site, workdir):
    """The fast implementation against the reference, by the rule verify uses: relative
    RMS error against the reference in float64 at most ``tolerance`` times the reference's
    own error in the same dtype, plus ``floor``; forward and both gradients."""
    code = """
import json, torch
from hybridlab.registry import default_registry

registry = default_registry()
impls = {i.name: i for i in registry.impls("normalization", "scalenorm")}
ref, fast = impls["reference"], impls["torch"]

def rel_rms(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()

def run(fn, x, g, dtype, dy):
    x = x.detach().to(dtype).clone().requires_grad_()  # a fresh leaf per run
    g = g.detach().to(dtype).clone().requires_grad_()
    y = fn(x, g, 1e-5)
    assert y.dtype == dtype, (y.dtype, dtype)
    y.backward(dy.to(dtype))
    return y, x.grad, g.grad

results = []
torch.manual_seed(0)
for shape in [(1, 1, 8), (2, 63, 40), (3, 100, 257)]:
    x = torch.randn(shape, dtype=torch.float64) * 3
    g = torch.tensor(shape[-1] ** 0.5, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    gold = run(ref.fn, x, g, torch.float64, dy)
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        ref_out = run(ref.fn, x, g, dtype, dy)
        fast_out = run(fast.fn, x, g, dtype, dy)
        for what, r, f, o in zip(["y", "dx", "dg"], ref_out, fast_out, gold):
            assert torch.isfinite(f).all(), (shape, dtype, what)
            err_ref, err_fast = rel_rms(r, o), rel_rms(f, o)
            ok = err_fast <= fast.tolerance * err_ref + fast.floor
            results.append([str(shape), str(dtype), what, err_ref, err_fast, ok])

# an all-zero row (padding) gives zeros and finite gradients; not in fp16, where the
# true gradient there, g / eps, is itself beyond the largest fp16 number
x = torch.randn(2, 5, 16, dtype=torch.float64)
x[0, 1] = 0
for dtype in [torch.float64, torch.float32, torch.bfloat16]:
    for impl in (ref, fast):
        y, dx, dg = run(impl.fn, x, torch.tensor(4.0), dtype, torch.randn(2, 5, 16))
        assert (y[0, 1] == 0).all(), (impl.name, dtype)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dg).all(), (impl.name, dtype)
print(json.dumps(results))
"""
    results = last_json(python(code, [example_site], workdir))
    bad = [r for r in results if not r[-1]]
    assert not bad, "fast scalenorm beyond its tolerance ([shape, dtype, output, err_ref, err_fast, ok]):\n" + \
        "\n".join(map(str, bad))


def test_train_one_step_stays_finite(example_site, workdir):
    """One optimizer step on the example model with each implementation of scalenorm:
    the loss and every gradient are finite, every parameter (ScaleNorm's g included)
    gets a gradient, and both implementations give the same loss."""
    code = f"""
import json, os, torch
import torch.nn.functional as F
from hybridlab.core.model import Model
from hybridlab.core.spec import load_model_spec

spec = load_model_spec({str(MODEL_SPEC)!r})
losses = {{}}
for impl in ["torch", "reference"]:
    os.environ["HYBRIDLAB_IMPL"] = "scalenorm=" + impl
    torch.manual_seed(0)
    model = Model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, spec.vocab_size, (4, 33))
    logits = model(tokens[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.isfinite(loss), loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.blocks[0].mixer_place.norm.g.grad.abs() > 0
    opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    after = F.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.isfinite(after), after
    losses[impl] = [loss.item(), after.item()]
print(json.dumps(losses))
"""
    losses = last_json(python(code, [example_site], workdir))
    assert losses["torch"] == pytest.approx(losses["reference"], rel=1e-5)
    assert losses["torch"][1] < losses["torch"][0]  # one step on the same batch helps


# ---------------------------------------------------------------- the command line


def test_cli_list_shows_example_kinds(example_site, workdir):
    proc = run(["-m", "hybridlab", "list"], [example_site], workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    scalenorm = [line for line in lines if "scalenorm" in line]
    assert len(scalenorm) == 1, proc.stdout
    for word in ["normalization", "torch", "reference", "hybridlab-plugin-example"]:
        assert word in scalenorm[0], scalenorm[0]
    shift = [line for line in lines if line.split()[1:2] == ["shift"]]  # the kind column, not a description
    assert len(shift) == 1 and "mixer" in shift[0] and "hybridlab-plugin-example" in shift[0], proc.stdout

    proc = run(["-m", "hybridlab", "list", "mixer"], [example_site], workdir)
    assert proc.returncode == 0, proc.stderr
    assert "shift" in proc.stdout and "attention" in proc.stdout
    assert "scalenorm" not in proc.stdout


def test_cli_plugins_shows_packages_and_errors(example_site, broken_site, workdir):
    proc = run(["-m", "hybridlab", "plugins"], [broken_site, example_site], workdir)
    out = proc.stdout
    lines = out.splitlines()

    def about(entry_point: str, package: str) -> str:
        """The first line naming the entry point and its package, and the indented lines
        after it (up to the next plugin)."""
        start = [i for i, line in enumerate(lines) if entry_point in line and package in line]
        assert start, f"no line names {entry_point} of {package}:\n{out}"
        text = [lines[start[0]]]
        for line in lines[start[0] + 1:]:
            if line and not line[0].isspace():
                break
            text.append(line)
        return "\n".join(text)

    scalenorm = about("scalenorm", "hybridlab-plugin-example")
    assert "0.1.0" in scalenorm and "normalization.scalenorm" in scalenorm and "ERROR" not in scalenorm
    assert "mixer.shift" in about("shift", "hybridlab-plugin-example")
    assert "mixer.attention" in about("attention", "hybridlab")

    text = about("fixture_import_error", "hybridlab-fixture-import-error")
    assert "ERROR: import failed: RuntimeError: hybridlab_fixture_import_error fails on import on purpose" in text
    text = about("fixture_duplicate_rmsnorm", "hybridlab-fixture-duplicate-kind")
    assert "ERROR:" in text and "registered twice" in text and "hybridlab 0.1.0" in text
    text = about("fixture_invalid_config", "hybridlab-fixture-invalid-config")
    assert "ERROR:" in text and "extra='forbid'" in text
    assert proc.returncode == 1 and "3 failed" in out  # a failed plugin is reported and shows in the status
    assert run(["-m", "hybridlab", "plugins"], [example_site], workdir).returncode == 0


def test_cli_train_example_pipeline(example_site, workdir, tmp_path):
    out = tmp_path / "run"
    proc = run(["-m", "hybridlab", "train", str(PIPELINE), "--set", "steps=2", "--out", str(out)],
               [example_site], workdir)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert records, "metrics.jsonl is empty"
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), records
    assert max(r["step"] for r in records) == 2
