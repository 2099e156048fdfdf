"""hybridlab: compose hybrid sequence models from YAML; every fast path is checked
against a plain PyTorch reference.

The sub-packages live in top-level folders of the source tree (``core/``, ``registry/``,
``plugins/``, ``kernels/``, ``specs/``) and are mapped to ``hybridlab.<folder>`` by
``pyproject.toml``. In a wheel they sit inside this package. In a source checkout they
sit beside this folder, so when this folder has no ``core/`` we also look one level up;
that keeps ``python -c "import hybridlab.core"`` from the repository root working even
though the root's ``hybridlab/`` shadows the installed package.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "core")):
    __path__.append(_os.path.dirname(_here))  # type: ignore[name-defined]  # noqa: F821
