"""Run directories and atomic checkpoints.

    RUN_DIR/spec.yaml                    the resolved pipeline (what `--resume` reads)
    RUN_DIR/metrics.jsonl                one JSON object per logged step / evaluation
    RUN_DIR/checkpoints/step-000200/     model.safetensors, trainer.pt, meta.json
                                         (parallel: fsdp: dcp/ instead of model.safetensors,
                                         and the optimizer state in dcp/, not trainer.pt)
    RUN_DIR/checkpoints/latest           names the newest complete checkpoint

Every file is written to a temporary name, fsynced and renamed into place, and
``latest`` moves only after the whole checkpoint is on disk, so a process killed
mid-save leaves the previous checkpoint loadable. An FSDP run's checkpoint is sharded
(torch.distributed.checkpoint, one file per process, loadable by any number of
processes); every process writes its shard into the staging directory before rank 0
renames it into place. ``hybridlab consolidate RUN_DIR`` turns it into an ordinary one.
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


def is_sharded(path: Path) -> bool:
    """A checkpoint directory written by an FSDP run (torch.distributed.checkpoint)."""
    return (Path(path) / "dcp" / ".metadata").is_file()


def is_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / "model.safetensors").is_file() or is_sharded(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not is_checkpoint(path) or not (path / "trainer.pt").exists():
        raise HybridlabError(f"{pointer}: names {path.name}, which is incomplete; the run directory is damaged")
    return path


def checkpoint_at(path: Path) -> Path | None:
    """A checkpoint named by ``path``: a checkpoint directory itself (``RUN/checkpoints/
    step-NNNNNN``, as a pinned reference stores it), or a run directory's latest."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    return latest_checkpoint(path)


def run_of(path: Path) -> Path:
    """The run directory of a run or checkpoint directory."""
    path = Path(path)
    return path.parent.parent if is_checkpoint(path) else path


def load_checkpoint(path: Path, model: torch.nn.Module, device: torch.device,
                    extra: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Load weights into ``model`` (strict: same names, same shapes) and ``extra``'s modules
    (from ``<name>.safetensors``), and return the trainer state. A file that cannot be read
    or does not fit is a HybridlabError naming it. A sharded checkpoint's weights load too
    (the optimizer state stays in its dcp/ folder: see :func:`load_sharded`)."""
    if is_sharded(path):
        load_sharded(path, model)
    else:
        load_weights(path / "model.safetensors", model, device)
    for name, module in (extra or {}).items():
        file = path / f"{name}.safetensors"
        if not file.exists():
            raise HybridlabError(f"{path}: no {file.name}, which this pipeline's {name} need (the checkpoint was "
                                 f"written by a pipeline without them)")
        load_weights(file, module, device)
    return load_checkpoint_state(path)


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.pt: step, RNG states, the optimizer state (not in a sharded one's)."""
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


# ---------------------------------------------------------------- sharded (FSDP) checkpoints


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 trainer_state: dict[str, Any], *, main: bool, barrier: Callable[[], None]) -> Path:
    """Every process calls this: each writes its shard of the model and optimizer state to
    checkpoints/.step-NNNNNN.partial/dcp with torch.distributed.checkpoint; then rank 0
    (``main``) adds trainer.pt and meta.json, renames the directory into place and moves
    ``latest``, as :func:`save_checkpoint` does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:06d}"
    staging = root / f".{name}.partial"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    barrier()
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(staging / "dcp"))
    if main:
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        atomic_write_bytes(staging / "trainer.pt", buffer.getvalue())
        atomic_write_text(staging / "meta.json", json.dumps({"step": step, "format": "sharded"}) + "\n")
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", name + "\n")
        for old in sorted((p for p in root.glob("step-*") if p.is_dir()), key=_step_of)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / name


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """A sharded checkpoint into ``model`` (and ``optimizer``): plain, DDP's or FSDP's, in
    one process or several, whatever number of processes wrote it (DCP reshards)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, checkpoint_id=str(Path(path) / "dcp"))
    except Exception as exc:  # noqa: BLE001 - a missing shard, a model that does not fit
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise HybridlabError(f"{path}: sharded checkpoint cannot be loaded into this model ({type(exc).__name__}: "
                             f"{first}); was the model changed with --set?") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def fqn_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` (parameters numbered group after group, ``names`` in that order) keyed by
    parameter name instead, as torch.distributed.checkpoint.state_dict sets it."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
