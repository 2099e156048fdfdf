"""mixer ``short_conv``: a gated short causal convolution as a layer of its own, LFM2's
conv block (Liquid AI 2025, "LFM2 Technical Report", arXiv:2511.23404; the
``Lfm2ShortConv`` of transformers), in the line of H3's shift SSM and BaseConv's gated
convolution (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models") and Hyena's data-controlled gating (Poli et al. 2023):

    b, c, x = split(W_in h)                     three projections of the block input
    u_t = b_t ⊙ x_t                             the input gate
    y_t = c_t ⊙ Σ_{i<W} w_i ⊙ u_{t-W+1+i}       a depthwise causal conv of W taps, output gate
    out = W_out y

The gates are linear (no sigmoid), as in LFM2; LFM2 uses W = 3 and no biases.

The core op is flash-linear-attention's ``causal_conv1d`` (fla/modules/conv)::

    causal_conv1d(x, weight, bias=None, residual=None, initial_state=None,
                  output_final_state=False, activation=None, *, doc_ids=None) -> (y, final_state)

x [B, T, D], weight [D, W] (w[:, -1] multiplies x_t), bias [D], residual [B, T, D] added
after the activation (fla's Canon form), ``activation`` None or "silu"/"swish";
initial_state and final_state [B, D, W] in fla's layout: the last W inputs, oldest first
(only the last W − 1 are read; where T < W the final state keeps the initial state's newest
entries). Where it differs from fla: packed documents come as ``doc_ids [B, T]`` instead of
``cu_seqlens`` (a tap never reads a token of another document, a state passed in belongs
to the first document, and the final state holds the last document's inputs only, zeros
where it is shorter than W), and the final state is None unless asked for, as in fla.

Implementations: ``reference`` (token by token: a window of the last W inputs rolled one
token at a time, exactly what decoding does) and ``chunk`` (every tap over the whole
sequence at once: W shifted multiply-adds over [B, T, D], a document mask per lag).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hybridlab.core.config import Config, Dims
from hybridlab.core.dispatch import Dispatched
from hybridlab.core.interfaces import SequenceMixer
from hybridlab.core.numerics import compute_dtype
from hybridlab.core.verify import BATCHES, SEQ_LENS, Case
from hybridlab.registry import hookimpl

from .linear_recurrence import new_document, segments

ACTIVATIONS = (None, "silu", "swish")


# ---------------------------------------------------------------- the op


def check_conv_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                      initial_state: Tensor | None, activation: str | None, doc_ids: Tensor | None) -> None:
    """Raise ValueError naming the expected and received shapes, dtypes and options."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv1d: expected x [B, T, D] and weight [D, W]; got x {list(x.shape)}, "
                         f"weight {list(weight.shape)}")
    B, T, D = x.shape
    W = weight.shape[1]
    for name, value in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual),
                        ("initial_state", initial_state)):
        if value is not None and not value.is_floating_point():
            raise ValueError(f"causal_conv1d: {name} must be floating point, got {value.dtype}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"causal_conv1d: expected bias of shape {[D]}, got {list(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"causal_conv1d: expected residual of x's shape {list(x.shape)}, got {list(residual.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, D, W):
        raise ValueError(f"causal_conv1d: expected initial_state of shape {[B, D, W]} (fla's [B, D, W]: the last "
                         f"W inputs) for x {list(x.shape)} and weight {list(weight.shape)}, "
                         f"got {list(initial_state.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    if doc_ids is not None:
        if tuple(doc_ids.shape) != (B, T):
            raise ValueError(f"causal_conv1d: expected doc_ids of shape {[B, T]} for x {list(x.shape)}, "
                             f"got {list(doc_ids.shape)}")
        if doc_ids.is_floating_point():
            raise ValueError(f"causal_conv1d: doc_ids must be integers (one id per document), got {doc_ids.dtype}")


def _finish(y: Tensor, bias: Tensor | None, residual: Tensor | None, activation: str | None) -> Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    if activation is not None:
        y = F.silu(y)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                            initial_state: Tensor | None = None, output_final_state: bool = False,
                            activation: str | None = None, *,
                            doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """A depthwise causal convolution (fla's ``causal_conv1d``; the short conv of Mamba,
    DeltaNet and LFM2's conv block), token by token in fp32 (fp64 stays fp64):

        window_t = [x_{t-W+1}, ..., x_t]           the last W inputs, zeros before the start
        y_t = act(Σ_i weight[:, i] ⊙ window_t[i] + bias) + residual_t

    x [B, T, D], weight [D, W], bias [D], residual [B, T, D], initial_state [B, D, W] (the
    window before x_0, fla's layout), doc_ids [B, T] (the window empties where the id
    changes). Returns (y [B, T, D] in x's dtype, final window [B, D, W] in x's dtype
    when ``output_final_state``, else None). Implementations: reference, chunk."""
    check_conv_inputs(x, weight, bias, residual, initial_state, activation, doc_ids)
    dtype = compute_dtype(x.dtype)
    B, T, D = x.shape
    W = weight.shape[1]
    xs, w = x.to(dtype), weight.to(dtype)
    window = xs.new_zeros(B, D, W) if initial_state is None else initial_state.to(dtype)
    starts = None if doc_ids is None else new_document(doc_ids)
    out = []
    for t in range(T):
        if starts is not None:  # a new document sees none of the previous one's inputs
            window = window * (~starts[:, t, None, None]).to(dtype)
        window = torch.cat([window[..., 1:], xs[:, t, :, None]], dim=-1)  # [B, D, W], newest last
        out.append((window * w).sum(-1))
    y = torch.stack(out, 1) if out else xs.new_zeros(B, 0, D)
    y = _finish(y, bias, residual, activation)
    return y.to(x.dtype), (window.to(x.dtype) if output_final_state else None)


def causal_conv1d_chunk(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                        initial_state: Tensor | None = None, output_final_state: bool = False,
                        activation: str | None = None, *,
                        doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Same contract as causal_conv1d_reference; every tap over the whole sequence at once:
    with xp = [the window before x_0, x] [B, W-1+T, D],

        y = Σ_i weight[:, i] ⊙ xp[:, i : i+T] ⊙ [token t-(W-1-i) is in t's document]

    W multiply-adds over [B, T, D] (no im2col, no F.conv1d: on CPU the shifted sums ran
    2.8x faster than a depthwise conv1d forward and backward at T = 1024, D = 256)."""
    check_conv_inputs(x, weight, bias, residual, initial_state, activation, doc_ids)
    dtype = compute_dtype(x.dtype)
    B, T, D = x.shape
    W = weight.shape[1]
    xs, w = x.to(dtype), weight.to(dtype)
    before = xs.new_zeros(B, W, D) if initial_state is None else initial_state.to(dtype).transpose(1, 2)  # [B, W, D]
    xp = torch.cat([before, xs], dim=1)  # [B, W+T, D]; xp[:, W + t] = x_t
    seg = None
    if doc_ids is not None:
        seg = segments(doc_ids)  # [B, T]; the window before x_0 belongs to the first document
        seg = torch.cat([seg[:, :1].expand(B, W), seg], dim=1)  # [B, W+T]
    y = xp[:, W:] * w[:, W - 1]
    for i in range(W - 1):  # the input at lag W-1-i
        lagged = xp[:, i + 1:i + 1 + T]
        if seg is not None:
            lagged = lagged * (seg[:, i + 1:i + 1 + T] == seg[:, W:])[..., None].to(dtype)
        y = y.addcmul(lagged, w[:, i])  # one fused multiply-add: a temporary fewer per tap
    y = _finish(y, bias, residual, activation)
    final = None
    if output_final_state:
        final = xp[:, T:]  # [B, W, D], the last W inputs
        if seg is not None:  # only the last document's
            final = final * (seg[:, T:] == seg[:, -1:])[..., None].to(dtype)
        final = final.transpose(1, 2).to(x.dtype).contiguous()  # [B, D, W], fla's layout
    return y.to(x.dtype), final


def conv_cases(dtype: torch.dtype, device: str):
    """Every T of the verify grid, both batches; widths 2 to 5 and odd channel counts;
    with and without bias, silu, a residual; every other case from an initial state; batch
    3 packed with documents (one boundary at t = 1, right after the state); one case in
    four without the final state."""
    n = 0
    for i, T in enumerate(SEQ_LENS):
        for B in BATCHES:
            D, W = (5, 12, 33)[(i + B) % 3], (2, 3, 4, 5)[n % 4]
            inputs = {"x": torch.randn(B, T, D), "weight": torch.randn(D, W) * W ** -0.5}
            options = {"output_final_state": n % 4 != 3}
            label = f"B{B} T{T} D{D} W{W}"
            if n % 3 == 1:
                inputs["bias"] = torch.randn(D)
                label += " +bias"
            if n % 3 == 2:
                options["activation"] = "silu"
                inputs["residual"] = torch.randn(B, T, D)
                label += " silu +residual"
            if n % 2:
                inputs["initial_state"] = torch.randn(B, D, W)
                label += " +state"
            if B > 1 and T >= 2:
                starts = torch.rand(B, T) < 0.1
                starts[0, 1] = True
                inputs["doc_ids"] = starts.long().cumsum(1) * 3
                label += " +docs"
            n += 1
            yield Case(label, inputs, options)


# ---------------------------------------------------------------- the module


class ShortConvConfig(Config):
    """Gated short convolution (LFM2's conv block): out = W_out (c ⊙ conv(b ⊙ x))."""

    kind: Literal["short_conv"] = "short_conv"
    conv_size: int = Field(default=3, ge=2, le=64)
    """Taps of the causal depthwise convolution (LFM2: 3); decoding keeps the last
    conv_size − 1 gated inputs."""
    expand: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Width of the convolution as a multiple of d_model (LFM2: 1; must give a whole number)."""
    pre_gate: bool = True
    """Gate the input before the conv, u = b ⊙ x (LFM2); False: u = x and the projection
    makes only c and x (BaseConv's gated convolution)."""
    activation: Literal["none", "silu"] = "none"
    """After the conv, before the output gate (LFM2: none; fla's ShortConvolution: silu)."""
    bias: bool = False
    """Biases on the projections and the conv (LFM2's conv_bias, off in the released models)."""

    def check(self, dims: Dims):
        width = dims.d_model * self.expand
        if abs(width - round(width)) > 1e-9 or round(width) < 1:
            yield "expand", f"d_model × expand must be a whole number ≥ 1, got {dims.d_model} × {self.expand}"


class ShortConvMixer(Dispatched, SequenceMixer):
    """LFM2's ``Lfm2ShortConv``: W_in makes (b, c, x) in that order, y = c ⊙ conv(b ⊙ x),
    out = W_out y. The gates and the conv run in the compute dtype (fp32 for low-precision
    models, fp64 stays fp64). The decoding state is the last conv_size − 1 gated inputs,
    [B, width, conv_size − 1] in the compute dtype (fla's window without its unused oldest
    slot)."""

    category = "mixer"
    kind = "short_conv"
    step_impl = "reference"  # a one-token decode step: the per-token form, not the chunked one

    def __init__(self, config: ShortConvConfig, dims: Dims) -> None:
        super().__init__()
        self.config = config
        self.width = D = round(dims.d_model * config.expand)
        self.in_proj = nn.Linear(dims.d_model, (3 if config.pre_gate else 2) * D, bias=config.bias)
        W = config.conv_size
        bound = W ** -0.5  # nn.Conv1d's default for a depthwise kernel (LFM2 builds an nn.Conv1d)
        self.weight = nn.Parameter(torch.empty(D, W).uniform_(-bound, bound))  # [D, W]; w[:, -1] on x_t
        self.bias = nn.Parameter(torch.empty(D).uniform_(-bound, bound)) if config.bias else None
        self.out_proj = nn.Linear(D, dims.d_model, bias=config.bias)
        self.out_proj.residual_out = True

    def forward(self, x, state=None, *, doc_ids=None, aux=None):
        dtype = compute_dtype(x.dtype)
        parts = self.in_proj(x).to(dtype).chunk(3 if self.config.pre_gate else 2, dim=-1)  # each [B, T, D]
        if self.config.pre_gate:
            b, c, u = parts
            u = b * u
        else:
            c, u = parts
        impl = self.impl_for(self.config, x, decoding=state is not None)
        window = None if state is None else F.pad(state, (1, 0))  # [B, D, W-1] -> fla's [B, D, W]
        bias = None if self.bias is None else self.bias.to(dtype)
        y, final = impl.fn(u, self.weight.to(dtype), bias, initial_state=window, output_final_state=state is not None,
                           activation=None if self.config.activation == "none" else "silu", doc_ids=doc_ids)
        out = self.out_proj((c * y).to(x.dtype))
        return out, (None if final is None else final[..., 1:])

    def init_state(self, batch, device, dtype):
        return torch.zeros(batch, self.width, self.config.conv_size - 1, device=device, dtype=compute_dtype(dtype))

    def state_bytes(self, seq_len, dtype=torch.bfloat16):
        """Independent of seq_len: conv_size − 1 gated inputs of the width, compute dtype."""
        return (self.config.conv_size - 1) * self.width * compute_dtype(dtype).itemsize


@hookimpl
def hybridlab_register(register):
    register.kind("mixer", "short_conv", config=ShortConvConfig, module=ShortConvMixer, cases=conv_cases,
                  examples=[{}, {"conv_size": 4, "expand": 1.5, "bias": True},
                            {"pre_gate": False, "activation": "silu", "conv_size": 2}])
    register.impl("mixer", "short_conv", "reference", fn=causal_conv1d_reference,
                  doc="token by token: a window of the last W inputs, in fp32")
    register.impl("mixer", "short_conv", "chunk", fn=causal_conv1d_chunk, priority=10,
                  doc="every tap over the whole sequence at once: W shifted multiply-adds, PyTorch")
