"""The training loop: a pipeline spec in, a run directory out.

Resuming is exact: the data of step ``s`` is a pure function of (seed, s), and a
checkpoint holds weights, optimizer, schedule position and RNG states, so on the CPU a
resumed run's losses equal the uninterrupted run's, bit for bit. Resuming with another
``steps`` (``--set steps=N``, N past the current step) continues the weights, optimizer and
data exactly, but the lr schedule is recomputed for N steps (cosine decays over the new
length), so the lr can jump at the resume point; a one-line warning gives the jump.
Optimizer settings changed on resume (``--set optimizer.lr=...``) take effect over the
checkpoint's, keeping its moments, with a one-line warning naming them.

Several processes (``parallel: ddp | fsdp`` under torchrun, core/distributed.py) split the
step's global batch by rows, and each process may split its rows again into micro-batches
(``micro_batch_size``). Each micro-batch's loss is weighted by its share of the global
batch's scored tokens (targets not -100), so the gradients summed over micro-batches and
processes are those of the whole batch's token-mean loss: exactly, up to float rounding,
for token-mean objectives such as cross_entropy (docs/scaling.md says where it is not).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from . import distributed
from .checkpoint import (atomic_write_text, checkpoint_at, fqn_optimizer_state, is_sharded, latest_checkpoint,
                         load_checkpoint, load_checkpoint_state, load_sharded, save_checkpoint, save_sharded)
from .distributed import Ranks
from .errors import HybridlabError
from .interfaces import TiedHead
from .model import Model, active_parameters, count_parameters
from .mup import parameter_roles
from .writers import Writers, device_peak_flops, peak_memory_mib, require_extras, reset_peak_memory
from .spec import PipelineSpec, dump_spec, load_pipeline
from .objectives import Objectives, start_copy
from .tasks import TaskMetrics, generator, torch_seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HybridlabError(f"device {name!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}); use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise HybridlabError("device 'mps' requested but MPS is not available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise HybridlabError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HybridlabError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


RUN_FILES = ("spec.yaml", "metrics.jsonl", "checkpoints")  # what a run directory holds


def make_dir(path: Path, what: str) -> None:
    """mkdir -p, or a one-line error naming ``what`` (an option such as --out)."""
    if path.exists() and not path.is_dir():
        raise HybridlabError(f"{what} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HybridlabError(f"{what} {path}: cannot create the directory ({exc.strerror or exc})") from None


def safe_name(name: str) -> str:
    """A spec's name as one directory name: characters other than letters, digits, '.',
    '_' and '-' become '_' (a name such as '../x' or '/tmp/x' must not leave runs/)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def new_run_dir(name: str, base: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = safe_name(name)
    path, n = base / f"{name}-{stamp}", 1
    while path.exists():
        n += 1
        path = base / f"{name}-{stamp}-{n}"
    return path


class Trainer:
    """Holds what one run needs; ``run()`` trains to ``spec.steps``."""

    def __init__(self, spec: PipelineSpec, run_dir: Path, *, registry: Any = None, resume: bool = False,
                 device: str | None = None, progress: bool = True, ranks: Ranks | None = None) -> None:
        from hybridlab.registry import default_registry

        self.ranks = ranks or Ranks()
        self.spec, self.run_dir, self.progress = spec, Path(run_dir), progress and self.ranks.main
        self.registry = registry or default_registry()
        self.device = resolve_device(device or spec.device)
        if self.device.type == "cuda" and self.ranks.world > 1:  # one GPU per process on its host
            self.device = torch.device("cuda", self.ranks.local)
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        torch.manual_seed(torch_seed(spec.seed))
        random.seed(spec.seed)
        self.model = Model(spec.model, self.registry).to(self.device)
        self.model.checkpoint_activations(int(spec.activation_checkpointing))  # true: 1, every block; false: 0
        self.forward = torch.compile(self.model) if spec.compile else self.model
        kind = lambda category, config: self.registry.kind(category, config.kind).module  # noqa: E731
        self.task = kind("data", spec.data)(spec.data, seed=spec.seed)
        # built before any checkpoint is loaded: a 'start' reference copies the weights as they start
        self.objectives = Objectives(spec.objectives, self.model, self.registry, device=self.device,
                                     start=self._start_weights).to(self.device)
        self.micro_rows = micro_rows(spec, self.ranks.world)
        # an ordinary checkpoint's weights load before FSDP shards them; a sharded one's after
        checkpoint = self._checkpoint_to_resume() if resume else None
        state = self._load_ordinary(checkpoint) if checkpoint is not None and not is_sharded(checkpoint) else None
        if not resume:
            self._check_run_dir()
            self._load_init_from()
        self.loss_module = LossModule(self)
        self.wrapped = distributed.parallelize(spec.parallel, self.model, self.loss_module, device=self.device,
                                               precision=spec.precision,
                                               objective_weights=self.objectives.has_weights())
        params = [*self.model.named_parameters(), *self.objectives.named_parameters(prefix="objectives")]
        # roles: each parameter's categories (mixer kind, norm, bias...) and μP lr factor, for parameter groups
        roles = parameter_roles(self.model)
        self.optimizer = kind("optimizer", spec.optimizer)(spec.optimizer, params, roles=roles)
        names = {id(p): name for name, p in params}  # in the optimizer's order: its groups, one after another
        self.param_names = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        for group in self.optimizer.param_groups:
            group["peak_lr"] = group["lr"]
        self.schedule = kind("schedule", spec.schedule)(spec.schedule, spec.steps)
        self.step = 0
        self.bad_steps = 0
        self.writers: Writers | None = None  # opened by run(), on rank 0
        if self.ranks.main:
            require_extras(spec.log)  # a missing package fails now, not after the first steps
        if resume:
            self._resume(checkpoint, state)
        else:
            self._start()

    def _start_weights(self) -> Model:
        """A copy of the model at its start: the seeded initialisation, or init_from's weights."""
        model = start_copy(self.model)
        if self.spec.init_from is not None:
            path = checkpoint_at(Path(self.spec.init_from))
            if path is None:
                raise HybridlabError(f"init_from {self.spec.init_from}: no checkpoint there")
            load_checkpoint(path, model, self.device)
        return model

    # ---- run directory ----
    def _check_run_dir(self) -> None:
        """Every process checks (they see the same files); only rank 0 writes, in _start."""
        if (self.run_dir / "checkpoints").exists():
            raise HybridlabError(f"{self.run_dir} already holds a run; resume it with --resume {self.run_dir} "
                                 "or choose another --out")
        if self.run_dir.is_dir():  # a run that died before its first checkpoint starts over; other files stay
            other = sorted(p.name for p in self.run_dir.iterdir() if p.name not in RUN_FILES
                           and not p.name.startswith("."))  # .keep, .gitignore
            if other:
                raise HybridlabError(f"{self.run_dir} is not a run directory and is not empty (it holds "
                                     f"{', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); give a new or "
                                     "empty --out")

    def _load_init_from(self) -> None:
        if self.spec.init_from is not None:  # fine-tuning: the weights of another run's latest checkpoint
            path = checkpoint_at(Path(self.spec.init_from))
            if path is None:
                raise HybridlabError(f"init_from {self.spec.init_from}: no checkpoint there")
            load_checkpoint(path, self.model, self.device)

    def _start(self) -> None:
        distributed.barrier()  # every process has checked the directory before rank 0 fills it
        if self.ranks.main:
            make_dir(self.run_dir, "--out")
            atomic_write_text(self.run_dir / "spec.yaml", dump_spec(self.spec))
            atomic_write_text(self.run_dir / "metrics.jsonl", "")
        distributed.barrier()

    def _checkpoint_to_resume(self) -> Path:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise HybridlabError(f"{self.run_dir}: no checkpoint to resume from")
        return path

    def _load_ordinary(self, path: Path) -> dict:
        return load_checkpoint(path, self.model, self.device, extra=self._extra())

    def _load_optimizer(self, path: Path, state: dict | None) -> dict:
        """The checkpoint's optimizer state into ``self.optimizer`` (weights too for a sharded
        checkpoint); returns the trainer state."""
        if state is None:  # sharded: weights and optimizer state from dcp/, the rest from trainer.pt
            load_sharded(path, self.model, self.optimizer)
            return load_checkpoint_state(path)
        try:
            if self.spec.parallel == "fsdp" and distributed.dist.is_initialized():
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                full = fqn_optimizer_state(state["optimizer"], self.param_names)
                set_optimizer_state_dict(self.model, self.optimizer, full,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, IndexError) as exc:
            # e.g. a hyper-connection / mHC run saved before the stream's unused parameters
            # left the model (its weights still load; its optimizer state lists them)
            raise HybridlabError(f"{path}: the optimizer state does not fit the model ({exc}); the weights load "
                                 "(generate works), but training cannot continue from this checkpoint") from None
        return state

    def _resume(self, path: Path, state: dict | None) -> None:
        # the spec's hyperparameters (peak lr, weight decay, betas...) as built; loading the
        # optimizer state puts the checkpoint's back, and --set on resume must win
        fresh = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        state = self._load_optimizer(path, state)
        step, steps = state["step"], self.spec.steps
        saved_steps = _saved_steps(self.run_dir / "spec.yaml")  # before --set changed it
        if steps < step or (steps == step and saved_steps not in (None, steps)):
            raise HybridlabError(f"{self.run_dir}: steps={steps} does not go past the run's current step {step} "
                                 f"(checkpoint {path.name}); set steps above {step} to train on")
        # tuples as lists: a state loaded through torch.distributed.checkpoint has betas as a list
        changed = sorted({k for g, f in zip(self.optimizer.param_groups, fresh) for k in f
                          if _tuple(g.get(k)) != _tuple(f[k])})
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)
        if changed and self.ranks.main:
            print(f"warning: optimizer {', '.join(changed)} changed since {path.name}: the run continues with the "
                  "spec's values (moments and step counts are kept)", file=sys.stderr)
        self.step, self.bad_steps = step, state.get("bad_steps", 0)
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        random.setstate(_tuple(state["rng"]["python"]))
        if saved_steps is not None and saved_steps != steps and self.ranks.main:
            self._warn_schedule_stretched(saved_steps)
        saved = _saved(self.run_dir / "spec.yaml")
        now = self.spec.model_dump(mode="json")
        moved = [key for key in ("data", "objectives", "seed", "batch_size") if key in saved and saved[key] != now[key]]
        if moved and self.ranks.main:  # allowed (a curriculum), but the run's earlier metrics came from the old setting
            print(f"warning: {', '.join(moved)} changed since {path.name}: the run continues with the new "
                  f"setting from step {step}, and its earlier metrics were measured with the old one",
                  file=sys.stderr)
        distributed.barrier()  # every process has read spec.yaml before rank 0 rewrites it
        if self.ranks.main:  # the lines after the checkpoint are about to be computed again
            metrics = self.run_dir / "metrics.jsonl"
            kept = [line for _, line in _metric_lines(metrics) if json.loads(line)["step"] <= self.step]
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))
            atomic_write_text(self.run_dir / "spec.yaml", dump_spec(self.spec))

    def _warn_schedule_stretched(self, saved_steps: int) -> None:
        """A new ``steps`` stretches the schedule over the new length: say so when the lr
        of the next step differs from what the run would have used."""
        config = self.spec.schedule
        before = self.registry.kind("schedule", config.kind).module(config, saved_steps)(self.step)
        after = self.schedule(self.step)
        if math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
            return
        peak = self.optimizer.param_groups[0]["peak_lr"]
        print(f"warning: steps changed from {saved_steps} to {self.spec.steps}: the {config.kind} lr schedule is "
              f"re-stretched over {self.spec.steps} steps, so the lr at step {self.step + 1} jumps from "
              f"{peak * before:.3g} to {peak * after:.3g}", file=sys.stderr, flush=True)

    def save(self) -> Path:
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate())}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"step": self.step, "bad_steps": self.bad_steps, "rng": rng}
        if self.spec.parallel == "fsdp" and distributed.dist.is_initialized():
            return save_sharded(self.run_dir, self.step, self.model, self.optimizer, state, main=self.ranks.main,
                                barrier=distributed.barrier)
        path = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        if self.ranks.main:  # DDP: every process holds the same weights and optimizer state
            state["optimizer"] = self.optimizer.state_dict()
            path = save_checkpoint(self.run_dir, self.step, self.model, state, extra=self._extra())
        distributed.barrier()
        return path

    def _extra(self) -> dict[str, torch.nn.Module]:
        """Weights saved beside the model's: the objectives' own modules, if they have any."""
        return {"objectives": self.objectives} if self.objectives.has_weights() else {}

    def log(self, record: dict[str, Any]) -> None:
        """One record to metrics.jsonl (the source of truth) and the pipeline's writers; rank 0 only."""
        if not self.ranks.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writers is not None:
            self.writers.write(record)

    # ---- steps ----
    def _autocast(self):
        if self.spec.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batch(self, split: str, index: int) -> dict[str, torch.Tensor]:
        batch = self.task.batch(split, index, self.spec.batch_size)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss(self, batch: dict[str, torch.Tensor], *,
              with_aux: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        return objective_loss(self.objectives, batch, model=self.model, forward=self.forward, task=self.task,
                              step=self.step, steps=self.spec.steps, training=True, autocast=self._autocast,
                              with_aux=with_aux, generator=self._generator("train", self.step))

    def _generator(self, split: str, index: int) -> torch.Generator:
        """The objectives' sampling stream at one step: a pure function of (seed, split,
        index) like the data, so a resumed run draws the same samples."""
        seed = int(generator(self.spec.seed, f"samples/{split}", index).initial_seed())
        return torch.Generator(device=self.device).manual_seed(seed)

    def _parts(self, index: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        """This process's micro-batches of training step ``index``, each with its weight: the
        rows ``rank`` owns of the step's global batch, ``micro_rows`` at a time."""
        batch = self.task.batch("train", index, self.spec.batch_size)
        rows = self.spec.batch_size // self.ranks.world
        first = self.ranks.rank * rows
        slices = [slice(a, a + self.micro_rows) for a in range(first, first + rows, self.micro_rows)]
        weights = token_weights(batch, slices, self.spec.batch_size)
        return [({k: v[s].to(self.device, non_blocking=True) for k, v in batch.items()}, w)
                for s, w in zip(slices, weights)]

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; None when the loss was not finite and the step was skipped."""
        self.model.train()
        self.objectives.train()
        lr_scale = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_scale
        parts = self._parts(self.step)
        total = WeightedMetrics()
        for i, (batch, weight) in enumerate(parts):
            with distributed.gradient_sync(self.spec.parallel, self.wrapped, self.model, last=i == len(parts) - 1):
                loss, metrics = self.wrapped(batch)
                # summed over micro-batches and processes (DDP and FSDP average: hence x world)
                (loss * (weight * self.ranks.world)).backward()
            total.add(loss, metrics, weight)
        loss, metrics = total.reduced(self.device)
        bad = None if math.isfinite(loss) else "loss"
        if bad is None:
            # a finite loss can still give inf/NaN gradients; stepping on them would poison the weights
            norm = clip_gradients([*self.model.parameters(), *self.objectives.parameters()], self.spec.grad_clip)
            bad = None if torch.isfinite(norm) else "gradient"
            if self.spec.grad_clip is not None:
                metrics["grad_norm"] = float(norm)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.log({"step": self.step + 1, "skipped": True, "non_finite": bad, "loss": None})  # NaN is not JSON
            if self.bad_steps >= self.spec.max_bad_steps:
                where = latest_checkpoint(self.run_dir)
                raise HybridlabError(
                    f"stopped at step {self.step + 1}: {self.bad_steps} non-finite losses or gradients in a row "
                    f"(lower optimizer.lr or set grad_clip); last good checkpoint: {where or 'none'}")
            self.step += 1
            return None
        self.bad_steps = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics["loss"] = loss
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def flop_parameters(self) -> int:
        """N of the 6·N FLOPs per token: the parameters a token's matmuls use (active ones
        of a mixture of experts), without an untied input embedding (a lookup, no FLOPs)."""
        head = self.model.head
        tied = isinstance(head, TiedHead) and head.tied
        embedding = 0 if tied else count_parameters(self.model.embedding)
        return active_parameters(self.model) - embedding

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.task, self.objectives, batch_size=self.spec.batch_size,
                        eval_batches=self.spec.eval_batches, device=self.device, autocast=self._autocast,
                        forward=self.forward, batch=self._batch, step=self.step, steps=self.spec.steps,
                        generator=self._generator)

    def run(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``spec.steps`` (or stop after step ``stop_at``, with a checkpoint there,
        as an interrupted run would have left it)."""
        if self.ranks.main and self.writers is None:
            self.writers = Writers(self.spec.log, self.run_dir, self.spec.model_dump(mode="json"))
        with distributed.lost_ranks(self.ranks, self.spec.dist_timeout_s):
            try:
                return self._run(stop_at)
            finally:
                if self.writers is not None:
                    self.writers.flush()

    def _run(self, stop_at: int | None) -> dict[str, float]:
        spec = self.spec
        tokens_per_step = spec.batch_size * self.task.batch("train", 0, 1)["inputs"].shape[1]
        peak_flops = spec.peak_flops or device_peak_flops(self.device, spec.precision)
        reset_peak_memory(self.device)
        bar = tqdm(total=spec.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc=spec.name)
        start, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
        result: dict[str, float] = {}
        while self.step < spec.steps:
            metrics = self.train_step()
            window_steps += 1
            if metrics is not None and (self.step % spec.log_every == 0 or self.step == spec.steps):
                elapsed = time.perf_counter() - window_start
                metrics["tokens_per_s"] = tokens_per_step * window_steps / max(elapsed, 1e-9)
                if peak_flops is not None:  # docs/scaling.md: 6 N tokens/s over the processes' peak
                    metrics["mfu"] = 6 * self.flop_parameters() * metrics["tokens_per_s"] / (
                        peak_flops * self.ranks.world)
                metrics["peak_memory_mib"] = peak_memory_mib(self.device)
                self.log({"step": self.step, **metrics})
                shown = {"loss": f"{metrics['loss']:.3f}"}
                if "accuracy" in metrics:  # the first objective's, when it has one (dpo, grpo do not)
                    shown["acc"] = f"{metrics['accuracy']:.3f}"
                bar.set_postfix(**shown, tok_s=f"{metrics['tokens_per_s']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            last = self.step == spec.steps
            if (spec.eval_every and self.step % spec.eval_every == 0) or last:
                result = self.evaluate()
                self.log({"step": self.step, **result})
                if not last and self.progress:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            if (spec.checkpoint_every and self.step % spec.checkpoint_every == 0) or last:
                self.save()
            if stop_at is not None and self.step >= stop_at:
                break
        bar.close()
        if not result:  # resumed a finished run: nothing trained, evaluate what is there
            result = self.evaluate()
        result["seconds"] = time.perf_counter() - start
        return result


class LossModule(torch.nn.Module):
    """The model and the objectives as one module whose forward is a micro-batch's
    ``(loss, metrics)``: what DDP wraps, since DDP syncs the gradients of what its own
    forward ran."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.model, self.objectives = trainer.model, trainer.objectives
        object.__setattr__(self, "trainer", trainer)  # not a submodule

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return self.trainer._loss(batch)


def micro_rows(spec: PipelineSpec, world: int) -> int:
    """Rows per forward on each of ``world`` processes, or an error naming the fields."""
    if spec.batch_size % world:
        raise HybridlabError(f"batch_size {spec.batch_size} does not split over {world} processes; make it a "
                             f"multiple of {world}")
    rows = spec.batch_size // world
    micro = spec.micro_batch_size or rows
    if rows % micro:
        per = f"the {rows} rows each of {world} processes gets" if world > 1 else f"batch_size {rows}"
        raise HybridlabError(f"micro_batch_size {micro} does not divide {per}; choose a divisor of {rows}")
    return micro


def token_weights(batch: dict[str, torch.Tensor], slices: list[slice], batch_size: int) -> list[float]:
    """Each slice's share of the batch's scored tokens (targets other than -100), or of its
    rows when the batch has no targets or scores none. A token-mean loss weighted so and
    summed over slices equals the whole batch's loss."""
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch_size:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise HybridlabError(f"the task's batch field {name!r} is {shape}, not [batch_size={batch_size}, ...]: "
                                 "it cannot be split into micro-batches or over processes")
    targets = batch.get("targets")
    scored = (targets != -100) if targets is not None else None
    total = int(scored.sum()) if scored is not None else 0
    if total == 0:
        return [(s.stop - s.start) / batch_size for s in slices]
    return [int(scored[s].sum()) / total for s in slices]


class WeightedMetrics:
    """A step's loss and metrics summed over its micro-batches with their weights, then
    over the processes: scalars weighted, (numerator, denominator) pairs summed as pairs."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.sums: dict[str, list[float]] = {}  # name -> [value] or [numerator, denominator]

    def add(self, loss: torch.Tensor, metrics: dict[str, Any], weight: float) -> None:
        self.loss += float(loss.detach()) * weight
        for name, value in metrics.items():
            if isinstance(value, (tuple, list)):
                pair = self.sums.setdefault(name, [0.0, 0.0])
                pair[0], pair[1] = pair[0] + float(value[0]), pair[1] + float(value[1])
            else:
                self.sums.setdefault(name, [0.0])[0] += float(value) * weight

    def reduced(self, device: torch.device) -> tuple[float, dict[str, float]]:
        names = sorted(self.sums)
        flat = distributed.all_sum([self.loss, *(v for n in names for v in self.sums[n])], device)
        loss, out, i = flat[0], {}, 1
        for name in names:
            n = len(self.sums[name])
            values, i = flat[i:i + n], i + n
            if n == 1:
                out[name] = values[0]
            elif values[1]:  # a pair with nothing in its denominator logs no value
                out[name] = values[0] / values[1]
        return loss, out


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (None: only measure it) and return it;
    with FSDP the norm of the sharded gradients is reduced over the processes."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm or math.inf, norm)
    return norm


def objective_loss(objectives: Objectives, batch: dict[str, torch.Tensor], *, model: Any, forward: Any = None,
                   task: Any, step: int = 0, steps: int = 1, training: bool = True, autocast: Any = None,
                   with_aux: bool = True, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The weighted sum of the objectives, plus the auxiliary losses (MoE balance, z-loss...)
    when ``with_aux``: training optimises that sum, evaluation reports the objectives alone
    as ``loss`` (so specs with and without auxiliary terms compare fairly) and their sum as ``aux``."""
    out, results, aux = objectives.compute(batch, model=model, forward=forward, task=task, step=step, steps=steps,
                                           training=training, autocast=autocast, generator=generator)
    total, metrics = objectives.combine(results)
    return with_model_metrics(total, metrics, out, batch, task, aux=aux, with_aux=with_aux)


def with_model_metrics(total: torch.Tensor, metrics: dict, out: Any, batch: dict, task: Any, *,
                       aux: dict[str, torch.Tensor] | None = None, with_aux: bool = True) -> tuple[torch.Tensor, dict]:
    """Add the model's auxiliary losses (``aux``; default: those of ``out``), what the
    model's forward on ``inputs`` reports (its metrics) and the task's metrics to the
    objectives' sum; without that forward (``out`` None) only the auxiliary losses."""
    aux = (out.aux_losses if out is not None else {}) if aux is None else aux
    aux_total = torch.zeros((), device=total.device)
    for name, aux_loss in aux.items():
        aux_total = aux_total + aux_loss
        metrics[name] = aux_loss.detach()
    if aux:
        metrics["aux"] = aux_total.detach()
        if with_aux:
            total = total + aux_total
    if out is None:
        return total, metrics
    metrics.update(out.metrics)
    if isinstance(task, TaskMetrics):  # e.g. accuracy per query type
        own = task.metrics(out, batch)
        taken = sorted(set(own) & (set(metrics) | {"loss", "aux"}))
        if taken:  # it would silently replace the objectives' number of the same name
            raise HybridlabError(f"task {type(task).__name__}: its metrics {taken} have the names of the objectives' "
                                 "or the model's metrics; give them other names")
        metrics.update(own)
    return total, metrics


@torch.no_grad()
def evaluate(model: Any, task: Any, objectives: Objectives, *, batch_size: int, eval_batches: int,
             device: torch.device, autocast: Any = contextlib.nullcontext, forward: Any = None, batch: Any = None,
             step: int = 0, steps: int = 1, generator: Any = None) -> dict[str, float]:
    """Every evaluation split of ``task``: ``<split>/<metric>`` over ``eval_batches`` batches
    (the model in eval mode). ``forward``: the callable to run (a compiled model), default
    ``model``; ``batch(split, index)``: the batches, default the task's on ``device``;
    ``generator(split, index)``: the objectives' sampling streams."""
    model.eval()
    objectives.eval()
    forward = model if forward is None else forward
    if batch is None:
        def batch(split: str, index: int) -> dict:
            return {k: v.to(device, non_blocking=True) for k, v in task.batch(split, index, batch_size).items()}
    results: dict[str, float] = {}
    for split in task.splits():
        sums: dict[str, list[float]] = {}  # name -> [numerator, denominator] summed over the batches
        for i in range(eval_batches):
            data = batch(split, i)
            stream = generator(split, i) if generator is not None else None
            loss, metrics = objective_loss(objectives, data, model=model, forward=forward, task=task, step=step,
                                           steps=steps, training=False, autocast=autocast, with_aux=False,
                                           generator=stream)
            for k, v in {"loss": loss, **metrics}.items():
                num, den = (float(v[0]), float(v[1])) if isinstance(v, (tuple, list)) else (float(v), 1.0)
                total = sums.setdefault(k, [0.0, 0.0])
                total[0], total[1] = total[0] + num, total[1] + den
        # a (numerator, denominator) metric is pooled over the batches: a batch that asked
        # nothing of a query type then counts for nothing, not as accuracy 0; a pair whose
        # denominator stayed 0 (no query of that type was asked) is left out: NaN is not
        # JSON, and an absent metric is not a score of 0
        results.update({f"{split}/{k}": num / den for k, (num, den) in sums.items() if den})
    return results


def _saved(path: Path) -> dict:
    """The run directory's spec.yaml as written (before this resume's --set), or {}."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _saved_steps(path: Path) -> int | None:
    """``steps`` as the run directory's spec.yaml has it (None if it does not say)."""
    steps = _saved(path).get("steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _metric_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of each record in metrics.jsonl. A last line that is not JSON
    is what a process killed mid-append leaves: it is dropped with a warning. A bad line
    before the last is damage we cannot explain, and an error naming it."""
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
            why = "" if ok else "a JSON record without an integer 'step'"
        except json.JSONDecodeError as exc:
            why = f"not JSON: {exc.msg}"
        if not why:
            out.append((n, line))
        elif i == len(lines) - 1:
            print(f"warning: {path}:{n}: dropped the last line, cut short ({why}), as a run killed while "
                  "writing it leaves it", file=sys.stderr, flush=True)
        else:
            raise HybridlabError(f"{path}:{n}: {why}; fix or delete that line, then resume again")
    return out


def _tuple(value: Any) -> Any:
    """random.setstate wants tuples where the checkpoint has lists."""
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def train(pipeline: str | Path | PipelineSpec, *, overrides: list[str] = (), out: str | Path | None = None,
          resume: str | Path | None = None, device: str | None = None, progress: bool = True,
          registry: Any = None) -> tuple[Path, dict[str, float]]:
    """Train a pipeline (a path or a spec) or resume a run directory. Returns the run
    directory and the final evaluation metrics. Started by torchrun (WORLD_SIZE set), each
    process joins the process group and trains its share (``parallel``)."""
    spec, run_dir = _spec_to_train(pipeline, overrides, out, resume, registry)
    ranks = distributed.launched()
    if ranks is not None and ranks.world > 1 and spec.parallel == "none":
        raise HybridlabError(f"started as {ranks.world} processes (torchrun) but the pipeline's parallel is none; "
                             "set parallel: ddp or parallel: fsdp (--set parallel=ddp)")
    if ranks is None or spec.parallel == "none":  # one process: ddp and fsdp train as none
        return _train(spec, run_dir or new_run_dir(spec.name), resume, device, progress, registry, Ranks())
    distributed.start(ranks, resolve_device(device or spec.device), spec.dist_timeout_s)
    try:
        with distributed.lost_ranks(ranks, spec.dist_timeout_s, "starting"):
            run_dir = distributed.broadcast(run_dir or new_run_dir(spec.name))  # rank 0's timestamp
        return _train(spec, run_dir, resume, device, progress, registry, ranks)
    finally:
        distributed.stop()


def _spec_to_train(pipeline: Any, overrides: list[str], out: Any, resume: Any,
                   registry: Any) -> tuple[PipelineSpec, Path | None]:
    """The pipeline to train (a resumed run's own spec.yaml) and the run directory, if given."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "spec.yaml").exists():
            raise HybridlabError(f"{run_dir}: not a run directory (no spec.yaml)")
        return load_pipeline(run_dir / "spec.yaml", overrides, registry=registry), run_dir
    if out is not None and not str(out).strip():
        raise HybridlabError("--out is empty; give a directory for the run (or leave --out out)")
    spec = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline, overrides, registry=registry)
    return spec, Path(out) if out is not None else None


def check_launch(pipeline: Any, overrides: list[str], out: Any, resume: Any, nproc: int,
                 registry: Any = None) -> None:
    """What ``train --nproc N`` checks before starting N processes, so a bad pipeline is one
    error (exit 2) rather than one per process and a launcher's traceback."""
    spec, _ = _spec_to_train(pipeline, overrides, out, resume, registry)
    if nproc > 1 and spec.parallel == "none":
        raise HybridlabError(f"--nproc {nproc} starts {nproc} processes but the pipeline's parallel is none; set "
                             "parallel: ddp or parallel: fsdp (--set parallel=ddp)")
    micro_rows(spec, nproc)


def _train(spec: PipelineSpec, run_dir: Path, resume: Any, device: str | None, progress: bool, registry: Any,
           ranks: Ranks) -> tuple[Path, dict[str, float]]:
    with distributed.lost_ranks(ranks, spec.dist_timeout_s, "starting"):
        trainer = Trainer(spec, run_dir, registry=registry, resume=resume is not None, device=device,
                          progress=progress, ranks=ranks)
    if progress and ranks.main:
        n = count_parameters(trainer.model)
        where = f" x {ranks.world} processes ({spec.parallel})" if ranks.world > 1 else ""
        print(f"run directory: {run_dir}", flush=True)
        print(f"model {spec.model.name}: {len(spec.model.positions())} blocks, {n:,} parameters on "
              f"{trainer.device}{where}", flush=True)
    try:
        return run_dir, trainer.run()
    finally:
        if trainer.writers is not None:
            trainer.writers.close()


def consolidate(run_dir: str | Path, out: str | Path, *, registry: Any = None) -> Path:
    """A run's latest checkpoint, sharded or not, as an ordinary one-process checkpoint in
    a new run directory ``out`` (spec.yaml and metrics.jsonl copied): what
    ``hybridlab consolidate RUN_DIR --out NEW_RUN`` does. Returns the checkpoint written."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "spec.yaml").exists():
        raise HybridlabError(f"{run_dir}: not a run directory (no spec.yaml)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HybridlabError(f"--out {out}: exists and is not an empty directory; give a new one")
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise HybridlabError(f"{run_dir}: no checkpoint to consolidate")
    make_dir(out / "checkpoints", "--out")
    for name in ("spec.yaml", "metrics.jsonl"):
        atomic_write_text(out / name, (run_dir / name).read_text(encoding="utf-8"))
    shutil.copytree(latest, out / "checkpoints" / latest.name)
    atomic_write_text(out / "checkpoints" / "latest", latest.name + "\n")
    spec = load_pipeline(out / "spec.yaml", [], registry=registry)
    trainer = Trainer(spec, out, registry=registry, resume=True, progress=False, device="cpu")
    return trainer.save()  # the same step, now model.safetensors + trainer.pt
