"""Where the Triton kernels can run, read at dispatch time (never cached in a module
global): on CUDA tensors, and on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1``, which must be set before the kernels are first imported,
because ``triton.jit`` picks the interpreter when it decorates). Importing this file
does not import Triton, so a registry without Triton installed still loads and says why.
"""

from __future__ import annotations

import importlib.util
import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get(INTERPRET_ENV, "0").strip() not in ("", "0")


def device_reason(device: str) -> str | None:
    """None when the Triton kernels can serve tensors on ``device``; else why not."""
    if not triton_installed():
        return "triton is not installed (pip install 'hybridlab[triton]')"
    if device == "cuda":
        return None
    if device == "cpu":
        if interpreter_active():
            return None
        return f"runs on cpu only under Triton's interpreter ({INTERPRET_ENV}=1, set before the first import)"
    return f"does not run on {device} (cuda, or cpu under {INTERPRET_ENV}=1)"


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of ``dtype`` in. Triton's interpreter (3.9)
    converts fp32 to bf16 by truncating the mantissa, not rounding to nearest as the GPU
    does (and ignores ``fp_downcast_rounding``), which doubles bf16 output error; under the
    interpreter the kernels therefore write bf16 outputs in fp32 and the wrapper rounds
    them with torch. On a GPU this returns ``dtype`` and costs nothing."""
    return torch.float32 if dtype == torch.bfloat16 and interpreter_active() else dtype
