"""Every pipeline shipped under specs/ validates, with every model spec next to it
(specs/compare/models/, specs/gpu/<setting>/), so a pipeline meant for a GPU or for a
long comparison does not fail only when someone finally runs it."""

from pathlib import Path

import pytest

from hybridlab.core.errors import SpecError
from hybridlab.core.spec import load_model_spec, load_pipeline

SPECS = Path(__file__).resolve().parents[2] / "specs"
PIPELINES = sorted([*(SPECS / "train").glob("*.yaml"), *(SPECS / "compare").glob("*.yaml"),
                    *(SPECS / "gpu").glob("*/pipeline.yaml")])
MODELS = sorted([*(SPECS / "compare" / "models").glob("*.yaml"), *(SPECS / "compare" / "models").glob("*/*.yaml"),
                 *(p for p in (SPECS / "gpu").glob("*/*.yaml") if p.name != "pipeline.yaml"),
                 *(SPECS / "gpu").glob("*.yaml")])  # benchmark models (gdn-hybrid-350m)




@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(SPECS)))
def test_a_shipped_pipeline_validates(path):
    try:
        assert load_pipeline(path).steps >= 1
    except SpecError as exc:  # a teacher that is a run directory exists only once trained (their own tests train it)
        assert all("run directory" in line and "not found" in line for line in exc.lines()), exc.lines()


@pytest.mark.parametrize("path", MODELS, ids=lambda p: str(p.relative_to(SPECS)))
def test_a_shipped_model_spec_validates(path):
    assert load_model_spec(path).layers


def test_the_gpu_factworld_models_are_near_45m_parameters():
    from hybridlab.core.iso import measure

    for name in ("attention", "gated_deltanet", "hybrid"):
        params = measure(load_model_spec(SPECS / "gpu" / "factworld-45m" / f"{name}.yaml"), 1).params
        assert 40e6 < params < 55e6, (name, params)
