"""A model-level verify under a pin to an implementation without float64 (the Triton
kernels): the float32 fast-vs-reference checks run and pass; the float64 decoding and
invariance checks, which the pinned kernel cannot serve, are notes that say why, not
failures (they were eight FAIL rows before)."""

import pytest

from hybridlab.core.cli import main

pytest.importorskip("triton")

SPEC = """name: pin-probe
vocab_size: 32
d_model: 32
layers:
  - mixer: {kind: attention, heads: 2}
"""


def test_float64_checks_are_notes_under_a_pin_that_cannot_serve_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.yaml").write_text(SPEC)
    monkeypatch.setenv("HYBRIDLAB_IMPL", "rmsnorm=triton")
    assert main(["verify", str(tmp_path / "m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "rmsnorm: triton  float32" in out and "FAIL" not in out
    for what in ("decode checks", "invariance checks"):
        assert (f"NOTE: model pin-probe: {what} (float64) not run under the pin: implementation 'triton' of "
                "'rmsnorm' cannot serve this layer: does not support float64") in out
