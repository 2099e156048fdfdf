"""ffn ``memory`` (product-key memory): the product path reads the same rows as scoring
every row, forward and backward; only the rows read get a gradient; bad sizes are
located errors; the shipped spec verifies."""

from pathlib import Path

import pytest
import torch

from hybridlab.core.config import Dims
from hybridlab.core.dispatch import forced
from hybridlab.core.errors import SpecError
from hybridlab.core.model import Model, active_parameters, count_parameters
from hybridlab.core.spec import load_model_spec
from hybridlab.core.verify import verify_model
from hybridlab.plugins.ffn.memory import Memory, MemoryConfig, memory_product, memory_reference
from hybridlab.registry import default_registry

SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"


def brute_force(query, keys, values, top_k):
    """Independent: a Python loop over heads and every (i, j) pair, float64."""
    N, H, Dk = query.shape
    K = keys.shape[2]
    out = torch.zeros(N, values.shape[1], dtype=torch.float64)
    rows = []
    for h in range(H):
        full = torch.stack([query[:, h, :Dk // 2].double() @ keys[h, 0, i].double()
                            + query[:, h, Dk // 2:].double() @ keys[h, 1, j].double()
                            for i in range(K) for j in range(K)], dim=-1)  # [N, K²], row i·K + j
        top, idx = full.topk(top_k, dim=-1)
        out += (top.softmax(-1)[..., None] * values.double()[idx]).sum(1)
        rows.append(idx)
    return out, torch.stack(rows, 1)


@pytest.mark.parametrize("N, H, K, k, Dk, Dv", [(7, 2, 8, 3, 6, 5), (13, 1, 5, 5, 4, 9), (3, 3, 16, 1, 2, 4)])
def test_product_path_reads_the_same_rows_as_scoring_every_row(N, H, K, k, Dk, Dv):
    torch.manual_seed(N)
    query = torch.randn(N, H, Dk, requires_grad=True)
    keys = torch.randn(H, 2, K, Dk // 2, requires_grad=True)
    values = torch.randn(K * K, Dv, requires_grad=True)
    expected, rows = brute_force(query, keys, values, k)
    results = {}
    for fn in (memory_reference, memory_product):
        out, indices, weights = fn(query, keys, values, top_k=k)
        assert indices.sort(-1).values.equal(rows.sort(-1).values)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out, (query, keys, values), torch.ones_like(out))
        results[fn.__name__] = grads
    for a, b in zip(results["memory_reference"], results["memory_product"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_only_the_rows_read_get_a_gradient():
    torch.manual_seed(0)
    dims = Dims(d_model=16, vocab_size=11, n_layers=1, registry=default_registry())
    module = Memory(MemoryConfig(keys=8, top_k=2, heads=2, key_dim=8), dims)
    module.registry = default_registry()
    module.init_weights(0.02)
    torch.nn.init.normal_(module.query.weight)
    x = torch.randn(2, 3, 16)
    for impl in ("reference", "product"):
        module.zero_grad()
        with forced({("ffn", "memory"): impl}):
            module(x).sum().backward()
        q = module.query(x).view(6, 2, 8)
        _, indices, _ = memory_reference(q, module.keys, module.values, top_k=2)
        read = torch.zeros(64, dtype=torch.bool)
        read[indices.reshape(-1)] = True
        grad = module.values.grad
        assert (grad[~read] == 0).all() and (grad[read].abs().sum(-1) > 0).all()
    assert active_parameters(module) == count_parameters(module) - (64 - 4) * 16


@pytest.mark.parametrize("options, message", [
    ({"keys": 4, "top_k": 5}, "top_k \\(5\\) is larger than keys \\(4\\)"),
    ({"key_dim": 7}, "key_dim \\(7\\) must be even"),
])
def test_bad_sizes_are_located_errors(tmp_path, options, message):
    ffn = {"kind": "memory", **options}
    (tmp_path / "m.yaml").write_text("vocab_size: 16\nd_model: 16\nlayers:\n  - mixer: {kind: attention, heads: 2}\n"
                                     f"    ffn: {ffn}\n".replace("'", ""))
    with pytest.raises(SpecError, match=f"m.yaml:5: layers\\[0\\].ffn: .*{message}"):
        load_model_spec(tmp_path / "m.yaml")


def test_memory_spec_verifies():
    spec = load_model_spec(SPECS / "memory-tiny.yaml")
    report = verify_model(spec, seq_len=19)
    assert report.passed, [str(c) for c in report.failures()] + report.problems
    model = Model(spec, default_registry())
    assert active_parameters(model) < count_parameters(model) - 1000 * 64  # most value rows are not read
