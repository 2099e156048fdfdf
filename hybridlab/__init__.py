"""hybridlab: compose hybrid sequence models from YAML; every fast path is checked
against a plain PyTorch reference.

The sub-packages live in top-level folders of the source tree (``core/``, ``registry/``,
``plugins/``, ``kernels/``, ``specs/``) and are mapped to ``hybridlab.<folder>`` by
``pyproject.toml``. In a wheel they sit inside this package. In a source checkout they
sit beside this folder, so when this folder has no ``core/`` we also look one level up;
that keeps ``python -c "import hybridlab.core"`` from the repository root working even
though the root's ``hybridlab/`` shadows the installed package.

The Python API (docs/python.md) is loaded on first use, so ``import hybridlab`` (which the
CLI does) stays cheap: ``hybridlab.build``, ``load``, ``train``, ``evaluate``,
``generate``, ``verify``, ``compare``, ``import_hf``, ``export_hf`` (docs/hf.md), their
result types, and the errors they raise (``SpecError``, a ``HybridlabError``).
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "core")):
    __path__.append(_os.path.dirname(_here))  # type: ignore[name-defined]  # noqa: F821

_API = ("build", "load", "train", "evaluate", "generate", "verify", "compare", "import_hf", "export_hf",
        "TrainResult", "CompareResult", "Generation")
_ERRORS = ("SpecError", "HybridlabError")
__all__ = ["build", "load", "train", "evaluate", "generate", "verify", "compare",  # noqa: RUF022 (by topic)
           "import_hf", "export_hf",
           "TrainResult", "CompareResult", "Generation", "SpecError", "HybridlabError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from hybridlab import api

        return getattr(api, name)
    if name in _ERRORS:
        from hybridlab.core import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'hybridlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_ERRORS})
