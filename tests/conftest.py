import pytest
import torch

from hybridlab.registry import default_registry


@pytest.fixture
def registry():
    return default_registry()


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    """Fixed seed per test; no implementation pin leaks in from the environment."""
    monkeypatch.delenv("HYBRIDLAB_IMPL", raising=False)
    torch.manual_seed(0)
