"""Verification for plugin authors' own test suites.

    from hybridlab.testing import assert_verified

    def test_my_kind_matches_its_reference():
        assert_verified("my_kind")   # every implementation, every declared dtype, decoding

The same machinery as ``hybridlab verify``; see :mod:`hybridlab.core.verify`.
"""

from __future__ import annotations

from typing import Any

from hybridlab.core.verify import Case, Report, verify_kind, verify_model

__all__ = ["Case", "Report", "assert_verified", "stepwise_logits", "verify_kind", "verify_model"]


def stepwise_logits(model: Any, tokens: Any, prefill: int) -> Any:
    """Logits [B, T, V] of ``model`` on ``tokens`` [B, T] computed as a decoder would: the
    first ``prefill`` tokens in parallel from an empty state, then one step per token.
    Compare with ``model(tokens).logits`` to check decoding."""
    out = model(tokens[:, :prefill], model.init_state(tokens.shape[0]))
    logits = [out.logits]
    for t in range(prefill, tokens.shape[1]):
        out = model.step(tokens[:, t], out.state)
        logits.append(out.logits)
    import torch

    return torch.cat(logits, 1)


def assert_verified(kind: str, *, impl: str | None = None, device: str = "cpu", registry: Any = None) -> Report:
    """Verify ``kind`` (optionally one implementation) and raise AssertionError listing
    every failing check. Returns the report when everything passed."""
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # not a verification failure
        raise RuntimeError(f"assert_verified: device {device!r} is not available on this machine")
    report = verify_kind(kind, impl=impl, device=device, registry=registry)
    if not report.checks and not report.problems:
        why = "; ".join(report.notes) or "register cases= (or examples= for a mixer)"
        raise AssertionError(f"verify ran no checks for {kind!r}: {why}")
    if not report.passed:
        lines = [f"{c.kind}/{c.impl} {c.dtype} [{c.case}] {c.quantity}: error {c.error:.3g} > allowed {c.allowed:.3g}"
                 for c in report.failures()]
        raise AssertionError("verification failed:\n" + "\n".join(lines + report.problems))
    return report
