"""``hybridlab sample``: draw images from a run trained with a sampling objective
(``diffusion``), and write them as a PNG grid (matplotlib) or a ``.npy`` array.

The core finds the sampler among the run's objectives with ``isinstance``
(:class:`~hybridlab.core.interfaces.Sampler`), never by kind.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ImageShaped
from .errors import HybridlabError
from .interfaces import Sampler
from .tasks import torch_seed

MAX_COUNT = 1024  # samples per call: the sampler denoises them as one batch (run again with another --seed for more)


@dataclass
class Samples:
    """What :func:`sample_run` returns: images [N, C, H, W] in [−1, 1] and their labels
    (None for an unconditional model)."""

    images: torch.Tensor
    labels: list[int] | None


def sample_run(run_dir: str | Path, *, count: int = 16, labels: list[int] | None = None, steps: int = 50,
               guidance: float = 1.0, seed: int = 0, device: str = "cpu", registry: Any = None) -> Samples:
    """``count`` samples; ``labels`` are cycled over them (default: every class in turn).
    ``guidance`` w: classifier-free guidance, p_null + w (p_label − p_null); 1 is none."""
    from .generate import load_objectives, load_run

    if not 1 <= count <= MAX_COUNT:
        raise HybridlabError(f"--count must be in 1..{MAX_COUNT} (the samples are denoised as one batch; draw more "
                             f"with another --seed), got {count}")
    if steps < 1:
        raise HybridlabError(f"--steps must be >= 1, got {steps}")
    if not math.isfinite(guidance):
        raise HybridlabError(f"--guidance must be a finite number (1: no guidance), got {guidance}")
    if not 0 <= seed < 2 ** 63:
        raise HybridlabError(f"--seed must be in [0, 2^63), got {seed}")
    spec, model, _ = load_run(run_dir, device=device, registry=registry)
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    torch_device = next(model.parameters()).device
    objectives = load_objectives(run_dir, spec, model, registry=registry, device=torch_device).eval()
    sampler = next((item for item in objectives.items if isinstance(item, Sampler)), None)
    if sampler is None:
        kinds = sorted(k.name for k in registry.kinds("loss") if isinstance(k.module, type)
                       and issubclass(k.module, Sampler))
        raise HybridlabError(f"{run_dir}: sample needs a run trained with a sampling objective "
                             f"({', '.join(kinds) or 'none registered'}); its objectives are "
                             f"{', '.join(objectives.names)}")
    embedding = spec.model.embedding
    classes = embedding.label_count() if isinstance(embedding, ImageShaped) else 0
    chosen = _labels(labels, classes, count, guidance, sampler.guided)
    g = torch.Generator(device=torch_device).manual_seed(torch_seed(seed))
    label_tensor = None if chosen is None else torch.tensor(chosen, dtype=torch.long, device=torch_device)
    images = sampler.sample(model, label_tensor, count=count, steps=steps, guidance=guidance, generator=g)
    return Samples(images.cpu(), chosen)


def _labels(labels: list[int] | None, classes: int, count: int, guidance: float, guided: bool) -> list[int] | None:
    """The label of each sample, or None for an unconditional model; errors for labels the
    model does not know and for guidance it was not trained for."""
    if labels is not None and not labels:
        raise HybridlabError("--labels is empty; give comma-separated class ids (0,2,3), or leave --labels out for "
                             "every class in turn")
    if not classes:
        if labels:
            raise HybridlabError(f"--labels {','.join(map(str, labels))}: the model is unconditional "
                                 "(model.embedding.classes is 0); leave --labels out")
        if guidance != 1.0:
            raise HybridlabError(f"--guidance {guidance}: the model is unconditional, so there is nothing to guide "
                                 "towards; leave --guidance at 1")
        return None
    bad = [label for label in labels or () if not 0 <= label < classes]
    if bad:
        raise HybridlabError(f"--labels {bad} are not classes of this model (0..{classes - 1})")
    if guidance != 1.0 and not guided:
        raise HybridlabError(f"--guidance {guidance}: the run trained with label_dropout 0, so it never learned "
                             "the unconditional prediction guidance needs; use --guidance 1 or train with "
                             "label_dropout > 0")
    cycle = labels or list(range(classes))
    return [cycle[i % len(cycle)] for i in range(count)]


def write_images(images: torch.Tensor, out: str | Path) -> Path:
    """images [N, C, H, W] in [−1, 1] -> a PNG grid (``.png``, needs matplotlib) or the
    array itself (``.npy``)."""
    out = check_out(out)
    if out.suffix == ".npy":
        np.save(out, images.numpy())
        return out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(out, grid(images), vmin=0.0, vmax=1.0, cmap="gray" if images.shape[1] == 1 else None)
    return out


def check_out(out: str | Path) -> Path:
    """``out`` if samples can be written there: a .png (with matplotlib) or .npy path in an
    existing directory; an error saying which otherwise."""
    out = Path(out)
    if out.suffix not in (".png", ".npy"):
        raise HybridlabError(f"--out {out}: write a .png (a grid, needs matplotlib) or a .npy (the array)")
    if out.suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise HybridlabError(f"--out {out}: writing a PNG needs matplotlib (pip install matplotlib); or write a .npy")
    if not out.parent.is_dir():
        raise HybridlabError(f"--out {out}: directory {out.parent} does not exist")
    return out


def grid(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] -> one [rows·(H+1)+1, cols·(W+1)+1(, C)] array in [0, 1],
    ceil(sqrt(N)) columns, one-pixel borders of 0.5."""
    N, C, H, W = images.shape
    cols = math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    pixels = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    out = np.full((rows * (H + 1) + 1, cols * (W + 1) + 1, C), 0.5, dtype=np.float32)
    for i in range(N):
        r, c = divmod(i, cols)
        out[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = pixels[i]
    return out[..., 0] if C == 1 else out


def default_out(run_dir: str | Path) -> Path:
    """RUN/samples.png when matplotlib is installed, else RUN/samples.npy."""
    suffix = ".png" if importlib.util.find_spec("matplotlib") is not None else ".npy"
    return Path(run_dir) / f"samples{suffix}"
