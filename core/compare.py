"""``hybridlab compare``: train every (model spec, seed, learning rate[, weight decay])
cell of one pipeline, then tabulate and plot.

    OUT/cells/<spec>/seed<S>-lr<LR>/   a run directory per cell (what ``hybridlab train`` writes),
                                       plus result.json once the cell has finished; with
                                       ``wds`` (--wd): seed<S>-lr<LR>-wd<WD>/
    OUT/results.jsonl                  one line per finished cell: spec, seed, lr, final eval metrics
    OUT/results.md                     mean ± std over seeds per spec and metric at each spec's
                                       best lr, then every (spec, lr)
    OUT/accuracy_vs_length.png         accuracy against eval length (``len{N}`` splits), per spec
    OUT/loss_curves.png                training loss against step, per spec
    OUT/accuracy_vs_state.png          the selected metric against decoding-state bytes, per spec
    OUT/matched/<spec>.yaml            with ``match``: each spec at the width that hits the target
    OUT/cells/<spec>/<point>/seed<S>-lr<LR>/   with ``grid``: a run directory per grid point
    OUT/grid.json                      with ``grid``: per spec, each point's primary metric and their mean

Resuming: run the same command again. A finished cell (result.json) is skipped; a cell
with a checkpoint resumes from it, exactly (core/train.py); the others start. A cell
directory that was trained with a different pipeline (say another ``--set steps``) is an
error, never silently mixed into the table. Plots need matplotlib
(``pip install 'hybridlab[plot]'``); without it compare writes the tables and says so.

Losses: an evaluation's ``<split>/loss`` is the weighted sum of the objectives alone, without
auxiliary losses (MoE balance, z-loss, router losses), which are logged as ``<split>/aux``;
so the loss columns and the lower-loss tie-break compare an MoE spec and a dense one on the
same terms. The training loss (``loss_curves.png``) is what was optimised, auxiliary terms
included. Runs made before this rule have auxiliary terms inside ``<split>/loss``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .checkpoint import atomic_write_text, latest_checkpoint
from .errors import HybridlabError, SpecError
from .iso import measure, scale_to
from .model import count_parameters
from .spec import PipelineSpec, dump_spec, load_model_spec, load_pipeline
from .tasks import split_length
from .train import make_dir, safe_name


@dataclass
class Cell:
    label: str  # the model spec's name in tables and directories
    seed: int
    lr: float | None  # None only for an optimizer without an ``lr``
    spec: PipelineSpec
    dir: Path
    grid: dict[str, str] = field(default_factory=dict)  # the difficulty-grid point: {"data.pairs": "8", ...}
    wd: float | None = None  # the swept weight decay (--wd); None: the pipeline's, not swept

    @property
    def name(self) -> str:
        point = "".join(f" {key.removeprefix('data.')}={value}" for key, value in self.grid.items())
        return (f"{self.label}{point} seed {self.seed}" + (f" lr {self.lr:g}" if self.lr is not None else "")
                + (f" wd {self.wd:g}" if self.wd is not None else ""))

    def done(self) -> bool:
        return (self.dir / "result.json").exists()

    def resume_step(self) -> int:
        path = latest_checkpoint(self.dir) if (self.dir / "checkpoints").exists() else None
        return 0 if path is None else int(path.name.removeprefix("step-"))


def parse_lrs(text: str | None) -> list[float] | None:
    """'1e-3,3e-3' -> [0.001, 0.003]"""
    if text is None:
        return None
    try:
        lrs = [float(part) for part in text.split(",")]  # an empty item is not a number either
    except ValueError:
        raise HybridlabError(f"--lr: expected comma-separated numbers such as 1e-3,3e-3, got {text!r}") from None
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise HybridlabError(f"--lr: expected positive learning rates, got {text!r}")
    return list(dict.fromkeys(lrs))


def parse_wds(text: str | None) -> list[float] | None:
    """'0,0.1' -> [0.0, 0.1]: the weight decays of an lr x weight-decay grid."""
    if text is None:
        return None
    try:
        wds = [float(part) for part in text.split(",")]  # an empty item is not a number either
    except ValueError:
        raise HybridlabError(f"--wd: expected comma-separated numbers such as 0,0.1, got {text!r}") from None
    if not wds or any(not (wd >= 0 and math.isfinite(wd)) for wd in wds):
        raise HybridlabError(f"--wd: expected weight decays >= 0, got {text!r}")
    wds = list(dict.fromkeys(wds))
    tags = [f"{wd:g}" for wd in wds]
    if len(set(tags)) != len(tags):
        raise HybridlabError(f"--wd: {text!r} names the same cells twice ({', '.join(tags)}); give weight decays "
                             "that differ in their first 6 significant digits")
    return wds


def _labels(paths: Sequence[Path], names: Sequence[str]) -> list[str]:
    """The model specs' names as directory names; file stems where those clash; an error
    where those clash too. Compared after making them directory names: 'a b' and 'a_b'
    would otherwise share a cell directory, and the second would be skipped as done."""
    labels = [safe_name(n) for n in names]
    if len(set(labels)) != len(labels):
        labels = [safe_name(p.stem) for p in paths]
    if len(set(labels)) != len(labels):
        raise HybridlabError(f"two model specs share a name and a file name ({', '.join(map(str, paths))}); "
                             "rename one")
    return labels


def parse_sweep(text: str | None) -> tuple[str, list[str]] | None:
    """'model.layers[1].loop=1,2,4' -> ('model.layers[1].loop', ['1', '2', '4'])."""
    if text is None:
        return None
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise HybridlabError(f"--sweep: expected KEY=V1,V2,..., got {text!r}")
    if len(set(items)) != len(items):
        raise HybridlabError(f"--sweep: {text!r} lists a value twice")
    return key.strip(), items


def parse_grid(texts: Sequence[str] | None) -> list[tuple[str, list[str]]]:
    """['data.pairs=4,8', 'data.seq_len=32,64'] -> [('data.pairs', ['4', '8']), ('data.seq_len', ['32', '64'])]:
    task fields only (``data.``), each key once, each value once."""
    axes: list[tuple[str, list[str]]] = []
    for text in texts or ():
        key, sep, values = text.partition("=")
        key, items = key.strip(), [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise HybridlabError(f"--grid: expected data.FIELD=V1,V2,..., got {text!r}")
        if not key.startswith("data.") or key == "data.kind":
            raise HybridlabError(f"--grid {text!r}: a grid axis is a task field (data.FIELD, not data.kind), "
                                 f"got {key!r}")
        if key in (k for k, _ in axes):
            raise HybridlabError(f"--grid: {key} is given twice; list all its values in one --grid")
        if len(set(items)) != len(items):
            raise HybridlabError(f"--grid: {text!r} lists a value twice")
        axes.append((key, items))
    return axes


def grid_points(axes: Sequence[tuple[str, list[str]]]) -> list[tuple[dict[str, str], str]]:
    """The cross product of the axes: (point, directory tag); [({}, '')] without a grid."""
    points = []
    for values in itertools.product(*(items for _, items in axes)):
        point = {key: value for (key, _), value in zip(axes, values)}
        tag = "-".join(f"{k.removeprefix('data.')}={v}" for k, v in point.items())
        points.append((point, safe_name(tag) if tag else ""))  # no grid: cells/<spec>/seed<S>-lr<LR>/ as before
    tags = [tag for _, tag in points]
    if len(set(tags)) != len(tags):
        raise HybridlabError("--grid: two grid points name the same cell directory "
                             f"({', '.join(t for t in tags if tags.count(t) > 1)}); give values that differ "
                             "in letters or digits")
    return points


def plan(model_specs: Sequence[str | Path], pipeline: str | Path, *, seeds: int = 1,
         lrs: Sequence[float] | None = None, overrides: Sequence[str] = (), out: Path,
         registry: Any = None, sweep: tuple[str, list[str]] | None = None,
         grid: Sequence[tuple[str, list[str]]] = (), wds: Sequence[float] | None = None) -> list[Cell]:
    """Every cell, its resolved pipeline validated up front (a bad spec fails before any
    training). ``sweep`` (key, values): each spec once per value, labelled
    ``<spec>-<field>=<value>`` (e.g. a loop count: ``model.layers[1].loop``). ``grid``
    (:func:`parse_grid`): every cell once per point of the axes' cross product, in
    ``cells/<spec>/<point>/``. ``wds``: every cell once per weight decay (the lr x wd grid)."""
    cells = []
    for point, tag in grid_points(grid):
        sets = [*overrides, *(f"{key}={value}" for key, value in point.items())]
        if sweep is None:
            part = _plan(model_specs, pipeline, seeds=seeds, lrs=lrs, overrides=sets, out=out, registry=registry,
                         point=tag, wds=wds)
        else:
            key, values = sweep
            name = key.rpartition(".")[2]
            part = [cell for value in values
                    for cell in _plan(model_specs, pipeline, seeds=seeds, lrs=lrs, overrides=[*sets, f"{key}={value}"],
                                      out=out, registry=registry, suffix=safe_name(f"-{name}={value}"), point=tag,
                                      wds=wds)]
        for cell in part:
            cell.grid = point
        cells += part
    return cells


def _plan(model_specs: Sequence[str | Path], pipeline: str | Path, *, seeds: int = 1,
          lrs: Sequence[float] | None = None, overrides: Sequence[str] = (), out: Path,
          registry: Any = None, suffix: str = "", point: str = "",
          wds: Sequence[float] | None = None) -> list[Cell]:
    if not model_specs:
        raise HybridlabError("give at least one model spec to compare")
    if seeds < 1:
        raise HybridlabError(f"--seeds must be at least 1, got {seeds}")
    base = load_pipeline(pipeline, overrides, registry=registry)
    given = lrs
    # without --lr every cell uses the pipeline's lr, and is named after it, so that adding
    # --lr later only trains the new cells
    lrs = list(lrs) if lrs else [getattr(base.optimizer, "lr", None)]
    tags = [f"{lr:g}" for lr in lrs if lr is not None]
    if len(set(tags)) != len(tags):  # cells are named by the lr's %g form: two would share one
        raise HybridlabError(f"--lr: {', '.join(map(repr, lrs))} name the same cells ({', '.join(tags)}); give "
                             "learning rates that differ in their first 6 significant digits")
    if wds and "weight_decay" not in type(base.optimizer).model_fields:
        raise HybridlabError(f"--wd: the {base.optimizer.kind} optimizer has no weight_decay to sweep")
    paths = [Path(p).resolve() for p in model_specs]
    for given_path, path in zip(model_specs, paths):
        if not path.exists():
            raise HybridlabError(f"{given_path}: no such model spec")
    names, problems = [], []
    for given_path in model_specs:  # every bad spec reported at once, by the path as given
        try:
            names.append(load_model_spec(given_path, registry=registry).name)
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(problems)
    cells = []
    for path, label in zip(paths, _labels(paths, names)):
        label += suffix
        for seed in range(base.seed, base.seed + seeds):
            for lr, wd in itertools.product(lrs, wds or [None]):
                tag = (f"seed{seed}" + (f"-lr{lr:g}" if lr is not None else "")
                       + (f"-wd{wd:g}" if wd is not None else ""))
                # the path as a quoted YAML string: ' #' or ': ' in it would be read as YAML
                run_name = f"{label}-{point}-{tag}" if point else f"{label}-{tag}"
                sets = [*overrides, f"model={json.dumps(str(path))}", f"seed={seed}", f"name={run_name}"]
                optimizer = base.optimizer.model_dump(mode="json")
                optimizer.update({"lr": lr} if given else {})
                optimizer.update({"weight_decay": wd} if wd is not None else {})
                if given or wd is not None:  # the whole optimizer mapping: the pipeline may leave it to the default
                    sets.append(f"optimizer={json.dumps(optimizer)}")
                spec = load_pipeline(pipeline, sets, registry=registry, warn=False)  # the base load warned once
                cells.append(Cell(label, seed, lr, spec, out / "cells" / label / point / tag, wd=wd))
    return cells


def state_length(spec: PipelineSpec, *, registry: Any = None) -> int | None:
    """The length at which the tables give each spec's decoding-state bytes: the task's
    longest ``len{N}`` evaluation split, else the data's ``seq_len``, else None."""
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    splits = registry.kind("data", spec.data.kind).module(spec.data, seed=spec.seed).splits()
    lengths = [n for n in map(split_length, splits) if n is not None]
    if lengths:
        return max(lengths)
    seq_len = spec.data.model_dump().get("seq_len")
    return seq_len if isinstance(seq_len, int) else None


def match_specs(model_specs: Sequence[str | Path], pipeline: str | Path, match: tuple[str, int], *,
                overrides: Sequence[str] = (), out: Path, registry: Any = None,
                echo: Callable[[str], None] = print) -> list[Path]:
    """Each spec scaled (its d_model, core/iso.py) to ``match`` = (params|state_bytes, N),
    written to OUT/matched/<file stem>.yaml; returns those paths."""
    which, target = match
    base = load_pipeline(pipeline, overrides, registry=registry, warn=False)
    length = state_length(base, registry=registry)
    if which == "state_bytes" and length is None:
        raise HybridlabError(f"--match state_bytes: the {base.data.kind} task has no len{{N}} split or seq_len "
                             "to measure the state at")
    scaled = [scale_to(path, **{which: target}, seq_len=length or 1, registry=registry)  # params: any length
              for path in model_specs]
    make_dir(out / "matched", "--out")
    paths, used = [], set()
    for path, result in zip(model_specs, scaled):
        stem = safe_name(Path(path).stem)
        stem = stem if stem not in used else f"{stem}-{len(used)}"
        used.add(stem)
        target_path = (out / "matched" / f"{stem}.yaml").resolve()
        text = dump_spec(result.spec)
        if not target_path.exists() or target_path.read_text() != text:
            atomic_write_text(target_path, text)
        echo(f"--match {which}={target}: {result.describe()}")
        paths.append(target_path)
    return paths


def check_selection(select: str, cells: Sequence[Cell], *, registry: Any = None) -> None:
    """--select before any training. Metrics are named SPLIT/NAME after the task's
    evaluation splits; the names themselves (accuracy, loss, what the objectives and the
    task add) are known once a cell has run, so they are checked against finished cells
    when there are any (resuming), and otherwise after the first cell."""
    if registry is None:
        from hybridlab.registry import default_registry

        registry = default_registry()
    data, seed = cells[0].spec.data, cells[0].spec.seed
    splits = registry.kind("data", data.kind).module(data, seed=seed).splits()
    split, _, name = select.partition("/")
    if not name or split not in splits:
        raise HybridlabError(f"--select {select!r}: expected SPLIT/METRIC with SPLIT one of the {data.kind} task's "
                             f"evaluation splits ({', '.join(splits)}), e.g. {splits[0]}/accuracy or {splits[0]}/loss")
    summarize(finished_rows(cells), select)


def _check_same_pipeline(cell: Cell) -> None:
    stored_path = cell.dir / "spec.yaml"
    if not stored_path.exists():
        return
    stored, new = stored_path.read_text().splitlines(), dump_spec(cell.spec).splitlines()
    if stored != new:
        diff = [line for line in difflib.unified_diff(stored, new, lineterm="", n=0)
                if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        raise HybridlabError(f"{cell.dir} was trained with a different pipeline ({'; '.join(diff[:2])}); "
                             "use another --out or remove that directory")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _eta(cells: Sequence[Cell], rates: dict[str, list[float]]) -> str:
    """Seconds per step measured per spec (specs differ in speed), else over all specs so far."""
    steps, seconds = sum(r[0] for r in rates.values()), sum(r[1] for r in rates.values())
    if not steps:
        return "ETA after this cell"
    left = 0.0
    for cell in cells:
        own = rates.get(cell.label)
        per_step = own[1] / own[0] if own and own[0] else seconds / steps
        left += (cell.spec.steps - cell.resume_step()) * per_step
    return f"ETA {_duration(left)}"


def run_compare(model_specs: Sequence[str | Path], pipeline: str | Path, *, seeds: int = 1,
                lrs: Sequence[float] | None = None, out: str | Path | None = None, overrides: Sequence[str] = (),
                select: str | None = None, device: str | None = None, progress: bool = True,
                registry: Any = None, echo: Callable[[str], None] = print,
                sweep: tuple[str, list[str]] | None = None, match: tuple[str, int] | None = None,
                grid: Sequence[tuple[str, list[str]]] = (), wds: Sequence[float] | None = None) -> Path:
    """Train every cell not yet finished, then write the tables and plots. Returns OUT.
    ``match`` (``("params", N)`` or ``("state_bytes", N)``, see :func:`match_specs`):
    every spec is first scaled to that size. ``grid`` (:func:`parse_grid`): a difficulty
    grid, one aggregate score per spec (:func:`grid_scores`). ``wds``: weight decays, each
    cell once per value (an lr x wd grid; the best (lr, wd) per spec is chosen)."""
    from .train import Trainer

    if out is None:
        out = Path("runs") / f"compare-{load_pipeline(pipeline, overrides, registry=registry).name}"
    out = Path(out)
    given_specs = model_specs
    if match is not None:
        model_specs = match_specs(model_specs, pipeline, match, overrides=overrides, out=out, registry=registry,
                                  echo=echo)
    cells = plan(model_specs, pipeline, seeds=seeds, lrs=lrs, overrides=overrides, out=out, registry=registry,
                 sweep=sweep, grid=grid, wds=wds)
    if select is not None:
        check_selection(select, cells, registry=registry)
    # shell-quoted, so results.md's line runs as written (paths with spaces or '#' included)
    command = shlex.join(["hybridlab", "compare", *map(str, given_specs), "--pipeline", str(pipeline), "--seeds",
                          str(seeds), *(["--lr", ",".join(f"{lr:g}" for lr in lrs)] if lrs else []),
                          *(["--wd", ",".join(f"{wd:g}" for wd in wds)] if wds else []),
                          *(x for o in overrides for x in ("--set", o)),
                          *(["--sweep", f"{sweep[0]}={','.join(sweep[1])}"] if sweep else []),
                          *(["--match", f"{match[0]}={match[1]}"] if match else []),
                          *(x for key, values in grid for x in ("--grid", f"{key}={','.join(values)}")),
                          "--out", str(out),
                          *(["--select", select] if select is not None else [])])  # the best-lr table depends on it

    def report() -> dict[str, Any]:
        return write_reports(out, cells, select=select, command=command, title=str(pipeline))

    for cell in cells:
        if cell.done() or cell.resume_step():
            _check_same_pipeline(cell)
    make_dir(out, "--out")
    if cells[0].spec.checkpoint_every == 0:
        echo("note: checkpoint_every is 0, so an interrupted cell restarts from its first step")
    rates: dict[str, list[float]] = {}  # per spec: [steps trained, seconds] in this invocation
    for i, cell in enumerate(cells, 1):
        if cell.done():
            echo(f"[{i}/{len(cells)}] {cell.name}: done, skipped")
            continue
        start = cell.resume_step()
        if start == 0 and cell.dir.exists():  # killed before its first checkpoint: start over
            shutil.rmtree(cell.dir)
        eta = _eta([c for c in cells[i - 1:] if not c.done()], rates)
        what = f"resuming at step {start}/{cell.spec.steps}" if start else f"training {cell.spec.steps} steps"
        echo(f"[{i}/{len(cells)}] {cell.name}: {what}; {eta} for the {sum(not c.done() for c in cells)} cell(s) left")
        earlier = cell.dir / "seconds.partial"  # wall time of interrupted sessions of this cell
        spent = float(earlier.read_text()) if start and earlier.exists() else 0.0
        tic = time.perf_counter()
        trainer = Trainer(cell.spec, cell.dir, registry=registry, resume=start > 0, device=device, progress=progress)
        try:
            result = trainer.run()
        except KeyboardInterrupt:
            atomic_write_text(earlier, f"{spent + time.perf_counter() - tic}\n")
            echo(f"interrupted in {cell.name} at step {trainer.step}; run the same command again to continue")
            raise
        seconds = time.perf_counter() - tic
        rate = rates.setdefault(cell.label, [0, 0.0])
        rate[0] += trainer.step - start
        rate[1] += seconds
        result.pop("seconds")
        length = state_length(cell.spec, registry=registry)
        row = {"spec": cell.label, "model": cell.spec.model.name, "seed": cell.seed, "lr": cell.lr, "wd": cell.wd,
               "steps": cell.spec.steps, "params": count_parameters(trainer.model), "seconds": spent + seconds,
               "resumed": start > 0, "run_dir": str(cell.dir.relative_to(out)), "metrics": result,
               "grid": cell.grid, "state_len": length,
               "state_bytes": measure(cell.spec.model, length, registry=registry).state_bytes if length else None}
        atomic_write_text(cell.dir / "result.json", json.dumps(row) + "\n")
        report()
    notes = report()
    echo(f"wrote {out / 'results.jsonl'}, {out / 'results.md'}" +
         "".join(f", {p}" for p in notes["plots"]) + (f" ({notes['note']})" if notes["note"] else ""))
    return out


# ---------------------------------------------------------------- tables


def finished_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    return [json.loads((c.dir / "result.json").read_text()) for c in cells if c.done()]


def _is_shown(metric: str) -> bool:
    name = metric.split("/")[-1]
    return "/" in metric and (name.startswith("accuracy") or name == "loss")


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric.split("/")[-1] or metric.split("/")[-1] in ("ce", "ppl")


def default_selection(rows: Sequence[dict[str, Any]]) -> str | None:
    """The first eval split's accuracy (the training length when splits go by length), else its loss."""
    metrics = list(rows[0]["metrics"]) if rows else []
    for suffix in ("/accuracy", "/loss"):
        found = [m for m in metrics if m.endswith(suffix)]
        if found:
            return found[0]
    return metrics[0] if metrics else None


def _setting(row: dict[str, Any]) -> tuple[Any, Any]:
    """A row's optimizer setting: (lr, weight decay); the wd is None where it was not swept."""
    return row["lr"], row.get("wd")


def _setting_text(setting: tuple[Any, Any]) -> str:
    lr, wd = setting
    return (f"lr {lr:g}" if lr is not None else "") + (f" wd {wd:g}" if wd is not None else "")


def summarize(rows: Sequence[dict[str, Any]], select: str | None) -> dict[str, Any]:
    """Group the rows by (spec, lr, wd) and pick each spec's best (lr, wd) by the mean of
    ``select``. -> {"groups": {(spec, lr, wd): rows}, "best": {spec: lr},
    "best_wd": {spec: wd or None}, "chosen": {spec: (lr, wd)}, ...}"""
    columns: list[str] = []
    for row in rows:
        columns += [m for m in row["metrics"] if _is_shown(m) and m not in columns]
    columns.sort(key=lambda m: m.endswith("/loss"))  # accuracies first, each group in split order
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["spec"], *_setting(row)), []).append(row)
    given = select
    select = select or default_selection(rows)
    gridded = any(r.get("grid") for r in rows)
    if rows and select not in {m for r in rows for m in r["metrics"]}:
        raise HybridlabError(f"--select {select!r}: no such metric; the runs report {', '.join(rows[0]['metrics'])}")
    best: dict[str, Any] = {}
    sign = 1 if select and _lower_is_better(select) else -1
    tie_break = select.rsplit("/", 1)[0] + "/loss" if select and "/" in select else None  # equal accuracy: lower loss

    def score(members: list[dict[str, Any]]) -> tuple[float, float]:
        if gridded:  # the aggregate: the mean over grid points of each point's primary metric
            primary = _mean([sign * v for v in _per_point(members, given).values()])
            return (math.inf if math.isnan(primary) else primary, 0.0)
        values = [(sign * r["metrics"].get(select, math.nan), r["metrics"].get(tie_break, 0.0)) for r in members]
        primary, secondary = _mean([v[0] for v in values]), _mean([v[1] for v in values])
        return (math.inf if math.isnan(primary) else primary, secondary)

    for (spec, lr, wd), members in groups.items():
        if spec not in best or score(members) < best[spec][1]:
            best[spec] = ((lr, wd), score(members))
    chosen = {s: v[0] for s, v in best.items()}
    return {"columns": columns, "groups": groups, "select": select, "chosen": chosen,
            "best": {s: v[0] for s, v in chosen.items()}, "best_wd": {s: v[1] for s, v in chosen.items()},
            "swept_wd": any(r.get("wd") is not None for r in rows),
            "grid": grid_scores(rows, chosen, given) if gridded else {}, "given": given}


def _point_key(row: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('data.')}={v}" for k, v in (row.get("grid") or {}).items())


def _per_point(members: Sequence[dict[str, Any]], select: str | None) -> dict[str, float]:
    """Grid point -> the mean over seeds of its primary metric: ``select`` where given,
    else the point's own default (its first eval split's accuracy: the split names may
    differ between points, e.g. with data.seq_len on the grid)."""
    points: dict[str, list[dict[str, Any]]] = {}
    for row in members:
        points.setdefault(_point_key(row), []).append(row)
    return {point: _mean([r["metrics"].get(select or default_selection(rs), math.nan) for r in rs])
            for point, rs in points.items()}


def grid_scores(rows: Sequence[dict[str, Any]], chosen: dict[str, tuple[Any, Any]],
                select: str | None) -> dict[str, Any]:
    """Per spec at its best (lr, wd): {"lr", "wd", "cells": {point: primary metric},
    "aggregate": their mean}."""
    out = {}
    for spec, setting in chosen.items():
        cells = _per_point([r for r in rows if r["spec"] == spec and _setting(r) == setting], select)
        out[spec] = {"lr": setting[0], "wd": setting[1], "cells": cells, "aggregate": _mean(list(cells.values()))}
    return out


def lr_wd_table(summary: dict[str, Any]) -> list[str]:
    """Per spec, the mean of the selected metric (the grid aggregate with a grid) in every
    (lr, wd) cell, lrs as rows and weight decays as columns; the chosen cell in bold."""
    select, given = summary["select"], summary["given"]
    gridded = bool(summary["grid"])
    lines = ["## Learning rate x weight decay", "",
             f"Per spec, the mean over seeds of `{select}`" + (" (the grid aggregate)" if gridded else "")
             + " in each cell; the chosen cell is in bold.", ""]
    for spec in summary["chosen"]:
        keys = [k for k in summary["groups"] if k[0] == spec]
        lrs = sorted({k[1] for k in keys}, key=lambda v: v or 0)
        wds = sorted({k[2] for k in keys}, key=lambda v: v or 0)
        lines += [f"**{spec}**", "", "| lr \\ wd | " + " | ".join(f"{wd:g}" for wd in wds) + " |",
                  "|" + "---|" * (len(wds) + 1)]
        for lr in lrs:
            cells = []
            for wd in wds:
                members = summary["groups"].get((spec, lr, wd), [])
                if gridded:
                    value = _mean(list(_per_point(members, given).values()))
                else:
                    value = _mean([r["metrics"].get(select, math.nan) for r in members])
                text = _number(value) if members else "-"
                cells.append(f"**{text}**" if summary["chosen"][spec] == (lr, wd) else text)
            lines.append("| " + " | ".join([f"{lr:g}" if lr is not None else "-", *cells]) + " |")
        lines.append("")
    return lines


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _cell_text(members: Sequence[dict[str, Any]], metric: str) -> str:
    values = [r["metrics"].get(metric, math.nan) for r in members]
    mean = _mean(values)
    return "-" if math.isnan(mean) else f"{mean:.3f} ± {_std(values):.3f}"


def markdown(rows: Sequence[dict[str, Any]], summary: dict[str, Any], *, title: str, command: str,
             total: int, plots: Sequence[str], note: str) -> str:
    columns, groups, chosen, select = summary["columns"], summary["groups"], summary["chosen"], summary["select"]
    swept_wd = summary["swept_wd"]
    lengths = {r.get("state_len") for r in rows if r.get("state_bytes") is not None}
    state = f"state bytes@{lengths.pop()}" if len(lengths) == 1 else None  # rows from before the column: none
    header = ["spec", "params", "lr", *(["wd"] if swept_wd else []), "seeds", *columns, "s/cell",
              *([state] if state else [])]
    lines = [f"# compare: {title}", "", f"`{command}`", "",
             f"{len(rows)} of {total} cells finished. Each value is the mean ± sample standard deviation "
             f"over seeds; the best lr{' and weight decay' if swept_wd else ''} per spec is chosen by the mean "
             f"`{select}` "
             f"({'lower' if select and _lower_is_better(select) else 'higher'} is better); s/cell is the "
             "wall time per cell, with any interrupted sessions"
             + (f"; {state} is the decoding state one sequence holds after that many tokens (float32)"
                if state else "") + ".", ""]

    def table(keys: Sequence[tuple[str, Any, Any]]) -> list[str]:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in keys:
            members = groups[key]
            out.append("| " + " | ".join([
                key[0], f"{members[0]['params']:,}", f"{key[1]:g}" if key[1] is not None else "-",
                *([f"{key[2]:g}" if key[2] is not None else "-"] if swept_wd else []), str(len(members)), *(_cell_text(members, c) for c in columns),
                f"{_mean([r['seconds'] for r in members]):.3g}",
                *([f"{members[0]['state_bytes']:,}"] if state else [])]) + " |")
        return out

    lines += ["## Best learning rate per spec", "", *table([(s, *v) for s, v in chosen.items()]), ""]
    if summary["grid"]:
        lines += _grid_table(summary["grid"], select=summary["given"])
    if swept_wd:
        lines += lr_wd_table(summary)
    if len(groups) > len(chosen):
        lines += ["## Every learning rate", "",
                  *table(sorted(groups, key=lambda k: (k[0], k[1] or 0, k[2] or 0))), ""]
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    if note:
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def _grid_table(grid: dict[str, Any], *, select: str | None) -> list[str]:
    points = list(dict.fromkeys(p for g in grid.values() for p in g["cells"]))
    what = f"`{select}`" if select else "its first eval split's accuracy (else loss)"
    lines = ["## Difficulty grid", "",
             (f"Per grid point, at each spec's best lr: the mean over seeds of {what}; aggregate is the mean "
              f"over the {len(points)} grid points (points not finished yet are left out of it)."), "",
             "| spec | lr | aggregate | " + " | ".join(points) + " |", "|" + "---|" * (len(points) + 3)]
    for spec, g in grid.items():
        values = [g["cells"].get(p, math.nan) for p in points]
        setting = _setting_text((g["lr"], g.get("wd"))).removeprefix("lr ") or "-"
        lines.append("| " + " | ".join([spec, setting, _number(g["aggregate"]),
                                        *map(_number, values)]) + " |")
    return [*lines, ""]


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def write_reports(out: Path, cells: Sequence[Cell], *, select: str | None, command: str,
                  title: str) -> dict[str, Any]:
    """results.jsonl, results.md and the plots, from every finished cell."""
    rows = finished_rows(cells)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(rows, select)
    if summary["grid"]:
        atomic_write_text(out / "grid.json", json.dumps(summary["grid"], indent=1) + "\n")
    plots, note = write_plots(out, rows, cells, summary) if rows else ([], "")
    text = markdown(rows, summary, title=f"{title} ({cells[0].spec.data.kind})", command=command, total=len(cells),
                    plots=plots, note=note)
    atomic_write_text(out / "results.md", text)
    return {"plots": [str(out / p) for p in plots], "note": note}


# ---------------------------------------------------------------- plots


def _loss_curve(run_dir: Path) -> dict[int, float]:
    """Training loss by step from a run's metrics.jsonl (evaluation and skipped lines left out)."""
    curve = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if record.get("loss") is not None and not any("/" in k for k in record):
            curve[record["step"]] = record["loss"]
    return curve


def write_plots(out: Path, rows: Sequence[dict[str, Any]], cells: Sequence[Cell],
                summary: dict[str, Any]) -> tuple[list[str], str]:
    """-> (the file names written, a note when something could not be plotted)"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'hybridlab[plot]')"
    best = summary["chosen"]
    chosen = [r for r in rows if best.get(r["spec"]) == _setting(r)]
    written, notes = [], []

    # accuracy against eval length, one panel per accuracy metric (accuracy, accuracy_recall...)
    by_length: dict[str, dict[str, dict[int, list[float]]]] = {}
    for row in chosen:
        for metric, value in row["metrics"].items():
            split, _, name = metric.partition("/")
            if split_length(split) is not None and name.startswith("accuracy"):
                by_length.setdefault(name, {}).setdefault(row["spec"], {}).setdefault(
                    split_length(split), []).append(value)
    if by_length:
        names = list(by_length)
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
        for ax, name in zip(axes[0], names):
            for spec, points in by_length[name].items():
                xs = sorted(points)
                ax.errorbar(xs, [_mean(points[x]) for x in xs], yerr=[_std(points[x]) for x in xs],
                            marker="o", capsize=3,
                            label=f"{spec} ({_setting_text(best[spec]).strip()})" if _setting_text(best[spec])
                            else spec)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({x for p in by_length[name].values() for x in p}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("eval length")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("mean ± std over seeds, at each spec's best lr", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_length.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_length.png")
    else:
        notes.append("no len{N} eval splits, so no accuracy-vs-length plot")

    # iso-state view: the selected metric against decoding-state bytes (as zoology plots it)
    select = summary["select"]
    points: dict[str, tuple[int, list[float]]] = {}  # spec -> (state bytes, the metric per seed)
    for row in chosen:
        if row.get("state_bytes"):  # None in rows from before the column; 0 has no place on a log axis
            points.setdefault(row["spec"], (row["state_bytes"], []))[1].append(row["metrics"].get(select, math.nan))
    if points and select:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for spec, (state_bytes, values) in points.items():
            ax.errorbar([state_bytes], [_mean(values)], yerr=[_std(values)], marker="o", capsize=3, label=spec)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"decoding-state bytes per sequence at {chosen[0].get('state_len')} tokens (float32)")
        ax.set_ylabel(select)
        ax.set_title("mean ± std over seeds, at each spec's best lr", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_state.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_state.png")
    else:
        notes.append("no state bytes recorded (runs from before they were), so no accuracy-vs-state plot")

    # training loss: mean over the seeds at each spec's best lr
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for spec in best:
        curves = [_loss_curve(c.dir) for c in cells if c.label == spec and c.done() and
                  _setting(json.loads((c.dir / "result.json").read_text())) == best[spec]]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ax.plot(steps, [_mean([c[s] for c in curves]) for s in steps], label=spec)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("mean over seeds, at each spec's best lr", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    written.append("loss_curves.png")
    return written, "; ".join(notes)
