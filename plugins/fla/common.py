"""What the fla plugins share: whether flash-linear-attention is installed, what its
chunked kernels can serve (``fla_reason``), and the one mapping from our op conventions
to fla's calls (``run_fla``).

Our ops (hybridlab/ops.py) take fla's tensors in fla's order (q, k, v [B, T, H, *],
g the log decay, beta used as given, scale defaulting to K^-0.5, initial_state
[B, H, K, V]). Where they differ, ``run_fla`` converts:

- packed documents: ``doc_ids [B, T]`` (the state restarts where the id changes) become
  fla's ``cu_seqlens [N + 1]`` over the batch flattened to one row [1, B·T]; the first
  document of row b starts from ``initial_state[b]``, the others from zeros, and the
  final state of row b is its last document's (fla returns one per document, [N, ...]);
- the final state: ours is always returned (fp32); fla's only with
  ``output_final_state=True``, which we always pass;
- the output: returned in q's dtype;
- odd key or value widths in bf16/fp16, which fla's backward refuses, are padded with
  one zero channel and cut back (``even_widths``).

fla is imported on first call, never when the registry loads: importing it probes the
GPU and Triton.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from hybridlab.core.numerics import compute_dtype
from hybridlab.kernels.support import triton_installed
from hybridlab.plugins.mixer.recurrent_layer import RecurrentConfig, token_by_token_reason
from torch import Tensor

NOT_INSTALLED = "flash-linear-attention is not installed (pip install 'hybridlab[fla]')"
DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})  # fla's kernels have no fp64 path
MAX_HEAD_DIM = 256  # fla's chunk_fwd_h / chunk_bwd_dhu and KDA assert K <= 256
PRIORITY = 15  # above our PyTorch chunk forms (10): installing the extra asks for fla on CUDA
DOC = "flash-linear-attention's chunked Triton kernel ({}), fwd+bwd, cuda only; optional extra [fla]"


def fla_installed() -> bool:
    """True when a module ``fla`` can be found (fla-core or flash-linear-attention)."""
    return importlib.util.find_spec("fla") is not None


def fla_function(module: str, name: str) -> Any:
    """fla's function ``name`` from ``module`` (e.g. 'fla.ops.gla', 'chunk_gla'), imported now."""
    return getattr(importlib.import_module(module), name)


def cuda_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability; None without CUDA. Called only by
    supports() for a cuda layer, when CUDA is in use already."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def fla_reason(config: Any, device: str, dtype: torch.dtype, *, delta_rule: bool,
               capability: tuple[int, int] | None) -> str | None:
    """None when fla's kernel can serve a layer of ``config`` on (device, dtype), else why
    not. supports() cannot tell training from inference, so a limit of fla's backward
    refuses the layer outright (the PyTorch chunk form serves it instead):

    - CUDA tensors only: fla hands CPU tensors to Triton, which fails on them;
    - fp32, bf16 and fp16 (no fp64 kernels); Triton must be installed;
    - head_dim ≤ 256 (fla asserts it); a head_dim derived from d_model is checked per
      call by ``check_head_dims`` (odd widths in 16-bit, which fla's backward refuses,
      are padded by ``even_widths`` instead of refused);
    - the delta-rule kernels (deltanet, gated_deltanet, kda, gated_deltaproduct) on
      Blackwell (compute capability 10 and up): their backward was reported to fail to
      compile or to return NaN gradients with Triton 3.4-3.7 (fla issues #607, #638,
      #913), and no later version has been checked here."""
    if device != "cuda":
        return f"fla's kernels run on CUDA tensors only (fla hands {device} tensors to Triton, which fails on them)"
    if dtype not in DTYPES:
        return f"fla has no {str(dtype).removeprefix('torch.')} kernels (fp32, bf16, fp16)"
    if not triton_installed():
        return "fla needs Triton, which is not installed"
    if isinstance(config, RecurrentConfig) and config.head_dim is not None:
        reason = head_dims_reason(config.head_dim)
        if reason is not None:
            return reason
    if delta_rule and capability is not None and capability[0] >= 10:
        return (f"fla's delta-rule backward was reported to fail or return NaN gradients on Blackwell "
                f"(sm_{capability[0]}{capability[1]}) with Triton 3.4-3.7 (fla issues #607, #638, #913), not yet "
                f"checked on later versions; the chunk form serves instead")
    return None


def import_reason() -> str | None:
    """None when fla.ops imports, else why not (fla probes the GPU and Triton when
    imported; a broken install is a reason to pass it over, not a crash mid-forward)."""
    try:
        importlib.import_module("fla.ops")
    except Exception as exc:  # noqa: BLE001 - any import failure of fla means it cannot serve
        return f"fla is installed but fails to import: {type(exc).__name__}: {exc}"
    return None


def supports_additive(config: Any, device: str, dtype: torch.dtype) -> str | None:
    """supports() of the kinds without the delta rule: fla_reason, then fla must import."""
    return (fla_reason(config, device, dtype, delta_rule=False, capability=None) or token_by_token_reason(config)
            or import_reason())


def supports_delta_rule(config: Any, device: str, dtype: torch.dtype) -> str | None:
    """supports() of the delta-rule kinds: fla_reason with the GPU's compute capability,
    then fla must import."""
    capability = cuda_capability() if device == "cuda" else None
    return (fla_reason(config, device, dtype, delta_rule=True, capability=capability)
            or token_by_token_reason(config) or import_reason())


def head_dims_reason(K: int) -> str | None:
    """Why fla cannot serve key width K, or None."""
    if K > MAX_HEAD_DIM:
        return f"fla's kernels take head_dim ≤ {MAX_HEAD_DIM}, got {K}"
    return None


def check_head_dims(op: str, q: Tensor) -> None:
    """The per-call form of head_dims_reason: a ValueError naming the op and the width.
    (The device is dispatch's to check: supports() refuses anything but CUDA.)"""
    reason = head_dims_reason(q.shape[-1])
    if reason is not None:
        raise ValueError(f"{op} (impl fla): {reason}; use impl 'chunk' or 'reference'")


def documents(doc_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """doc_ids [B, T] -> (cu_seqlens [N + 1] int64, first [B], last [B]): the boundaries of
    the N documents of the batch flattened to one row, and for each row the index of its
    first and of its last document. A document also ends where a row ends."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # [B, T]
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat = starts.flatten()  # [B·T]
    index = flat.cumsum(0) - 1  # document of each position
    positions = torch.arange(B * T, device=doc_ids.device)
    total = torch.tensor([B * T], device=doc_ids.device)
    cu_seqlens = torch.cat([positions[flat], total]).to(torch.int64)
    rows = torch.arange(B, device=doc_ids.device) * T
    return cu_seqlens, index[rows], index[rows + T - 1]


def even_widths(q: Tensor, k: Tensor, v: Tensor, gates: tuple[Tensor, ...], initial_state: Tensor | None):
    """In bf16/fp16 fla's backward asserts an even key and value width (chunk_bwd_dv:
    Triton miscompiles odd 16-bit tails), so an odd width gets one zero channel: zero
    query/key channels add nothing to q·k or to k k^T, a zero decay channel (per-channel g,
    [B, T, H, K]) keeps a state row that stays zero, and a zero value channel gives a zero
    output channel, cut off afterwards. Returns the tensors, padded where needed."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return q, k, v, gates, initial_state
    pk, pv = q.shape[-1] % 2, v.shape[-1] % 2
    if pk:
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
        gates = tuple(F.pad(x, (0, 1)) if x.dim() == 4 else x for x in gates)  # per-channel decay
    if pv:
        v = F.pad(v, (0, 1))
    if initial_state is not None and (pk or pv):
        initial_state = F.pad(initial_state, (0, pv, 0, pk))  # [B, H, K, V]
    return q, k, v, gates, initial_state


def run_fla(fn: Any, q: Tensor, k: Tensor, v: Tensor, *gates: Tensor, scale: float | None,
            initial_state: Tensor | None, doc_ids: Tensor | None,
            options: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """Call fla's ``fn(q, k, v, *gates, scale=, initial_state=, output_final_state=True,
    cu_seqlens=, **options)`` with our conventions (module docstring; odd 16-bit widths:
    even_widths). Tensors after q have [B, T', ...] with T' = T or T·n (gated_deltaproduct's
    sub-steps); doc_ids is per token. Returns (o [B, T, H, V] in q's dtype, final state
    [B, H, K, V] in fp32; fp64 stays fp64)."""
    (B, T, _, K), V, dtype = q.shape, v.shape[-1], q.dtype
    scale = K ** -0.5 if scale is None else float(scale)  # of the width before any padding
    q, k, v, gates, initial_state = even_widths(q, k, v, gates, initial_state)
    if doc_ids is None:
        o, final = fn(q, k, v, *gates, scale=scale, initial_state=initial_state, output_final_state=True,
                      **(options or {}))
    else:
        cu_seqlens, first, last = documents(doc_ids)
        h0 = None
        if initial_state is not None:  # [N, H, K, V]: row b's state starts its first document
            h0 = initial_state.new_zeros(cu_seqlens.numel() - 1, *initial_state.shape[1:])
            h0 = h0.index_copy(0, first, initial_state)
        flat = [x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v, *gates)]  # [1, B·T', ...]
        o, final = fn(*flat, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                      **(options or {}))
        o, final = o.reshape(B, T, *o.shape[2:]), final[last]
    return o[..., :V].to(dtype), final[..., :K, :V].to(compute_dtype(dtype))
