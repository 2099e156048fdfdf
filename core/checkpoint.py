"""Run directories and atomic checkpoints.

    RUN_DIR/spec.yaml                    the resolved pipeline (what `--resume` reads)
    RUN_DIR/metrics.jsonl                one JSON object per logged step / evaluation
    RUN_DIR/checkpoints/step-000200/     model.safetensors, trainer.pt, meta.json
    RUN_DIR/checkpoints/latest           names the newest complete checkpoint

Every file is written to a temporary name, fsynced and renamed into place, and
``latest`` moves only after the whole checkpoint is on disk, so a process killed
mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from .errors import HybridlabError

KEEP = 3  # checkpoints kept per run (the newest ones)


def _step_of(path: Path) -> int:
    """step-000800 -> 800; by number, not by name: past step 999,999 the names grow a digit."""
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_path)`` fills a temporary file beside ``path``; then fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    extra: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write checkpoints/step-NNNNNN and then point ``latest`` at it. ``extra``: modules
    trained beside the model (an objective's MTP modules), each saved as ``<name>.safetensors``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    if final.exists():  # a re-save of the same step (e.g. resumed, then finished)
        shutil.rmtree(final)
    staging = root / f".{name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    atomic_write(staging / "model.safetensors", lambda tmp: safetensors.torch.save_model(model, str(tmp)))
    for part, module in (extra or {}).items():
        atomic_write(staging / f"{part}.safetensors",
                     lambda tmp, module=module: safetensors.torch.save_model(module, str(tmp)))
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    atomic_write_bytes(staging / "trainer.pt", buffer.getvalue())
    atomic_write_text(staging / "meta.json", json.dumps({"step": step}) + "\n")
    os.replace(staging, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    for old in sorted((p for p in root.glob("step-*") if p.is_dir()), key=_step_of)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for litter in [*root.glob(".*.partial"), *root.glob(".latest.tmp-*")]:  # left by a run killed mid-save
        shutil.rmtree(litter, ignore_errors=True) if litter.is_dir() else litter.unlink(missing_ok=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "model.safetensors").exists() or not (path / "trainer.pt").exists():
        raise HybridlabError(f"{pointer}: names {path.name}, which is incomplete; the run directory is damaged")
    return path


def checkpoint_at(path: Path) -> Path | None:
    """A checkpoint named by ``path``: a checkpoint directory itself (``RUN/checkpoints/
    step-NNNNNN``, as a pinned reference stores it), or a run directory's latest."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    return latest_checkpoint(path)


def run_of(path: Path) -> Path:
    """The run directory of a run or checkpoint directory."""
    path = Path(path)
    return path.parent.parent if (path / "model.safetensors").is_file() else path


def load_checkpoint(path: Path, model: torch.nn.Module, device: torch.device,
                    extra: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Load weights into ``model`` (strict: same names, same shapes) and ``extra``'s modules
    (from ``<name>.safetensors``), and return the trainer state. A file that cannot be read
    or does not fit is a HybridlabError naming it."""
    load_weights(path / "model.safetensors", model, device)
    for name, module in (extra or {}).items():
        file = path / f"{name}.safetensors"
        if not file.exists():
            raise HybridlabError(f"{path}: no {file.name}, which this pipeline's {name} need (the checkpoint was "
                                 f"written by a pipeline without them)")
        load_weights(file, module, device)
    # on the CPU: RNG states must stay there; the optimizer moves its state to the parameters
    try:
        return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise _damaged(path / "trainer.pt", exc) from None


def load_weights(weights: Path, model: torch.nn.Module, device: torch.device) -> None:
    """One safetensors file into ``model``, strictly; errors name the file."""
    path = weights.parent
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001 - whatever the reader says, the file is damaged
        raise _damaged(weights, exc) from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [f"{name} is {list(shapes[name])} in the checkpoint, {list(expected[name])} in the model"
             for name in sorted(shapes) if name in expected and shapes[name] != expected[name]]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise HybridlabError(f"{path}: checkpoint does not fit the model (shape mismatch: {'; '.join(wrong[:3])}"
                             f"{more}); was the model changed with --set?")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=str(device))
    except Exception as exc:  # noqa: BLE001 - e.g. the data after a good header is cut short
        raise _damaged(weights, exc) from None
    if missing or unexpected:
        raise HybridlabError(f"{path}: checkpoint does not fit the model (missing: {sorted(missing)[:5]}, "
                             f"unexpected: {sorted(unexpected)[:5]})")


def _damaged(file: Path, exc: Exception) -> HybridlabError:
    """One line: which file, what the reader said, and the checkpoints to fall back to."""
    reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's go on for lines
    step_dir = file.parent
    earlier = [p.name for p in sorted(step_dir.parent.glob("step-*"), key=_step_of)
               if p.is_dir() and _step_of(p) < _step_of(step_dir)]
    fix = (f"earlier checkpoints: {', '.join(earlier)} (write one's name into {step_dir.parent / 'latest'} "
           "to resume from it)" if earlier else "no earlier checkpoint to fall back to")
    return HybridlabError(f"{file}: damaged checkpoint file, cannot be read ({type(exc).__name__}: {reason}); "
                          f"{fix}")
