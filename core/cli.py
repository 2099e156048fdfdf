"""The ``hybridlab`` command line.

Bad input anywhere (a missing file, bad YAML, a bad value, an unknown device) prints
one line per problem naming what and where, and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import hybridlab

from .errors import HybridlabError, format_path

DEFAULT_PIPELINE = "train/default.yaml"


def default_pipeline() -> Path:
    return Path(str(resources.files("hybridlab.specs") / DEFAULT_PIPELINE))


def _registry():
    from hybridlab.registry import default_registry

    return default_registry()


# ---------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry()
    if args.category and args.category not in registry.categories:
        raise HybridlabError(f"unknown category {args.category!r}; categories: {', '.join(sorted(registry.categories))}")
    rows = []
    for kind in registry.kinds(args.category):
        # an implementation another package registered for this kind is credited to that package
        impls = ", ".join(i.name if str(i.owner) == str(kind.owner) else f"{i.name} ({i.owner})"
                          for i in registry.impls(kind.category, kind.name)) or "-"
        rows.append((kind.category, kind.name, impls, str(kind.owner), kind.doc))
    _table(("category", "kind", "implementations", "package", "description"), rows)
    failed = [record for record in registry.plugins if record.error]
    if failed:  # the listing is printed either way; the status lets a script notice
        print(f"{len(failed)} plugin(s) failed to load and are not listed: "
              f"{', '.join(r.name for r in failed)} (see `hybridlab plugins`)", file=sys.stderr)
        return 1
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry()
    failed = 0
    for record in registry.plugins:
        version = f" {record.version}" if record.version else ""
        print(f"{record.package}{version}  [{record.name}] {record.module}")
        if record.error:
            failed += 1
            print(f"    ERROR: {record.error} (skipped)")
        elif record.skipped:
            print(f"    skipped: {record.skipped}")
        else:
            print(f"    registered: {', '.join(record.registered) or 'nothing'}")
    ok = len(registry.plugins) - failed
    print(f"{ok} plugin(s) loaded, {failed} failed")
    return 1 if failed else 0  # the report is printed either way; the status lets a script notice


def _load_any(path: str, overrides: list[str]) -> Any:
    from .spec import is_pipeline, load_model_spec, load_pipeline

    if is_pipeline(path):
        return load_pipeline(path, overrides)
    return load_model_spec(path, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from .errors import SpecError
    from .spec import PipelineSpec

    status = 0
    for path in args.specs:
        try:
            spec = _load_any(path, args.set)
        except SpecError as exc:
            for line in exc.lines():
                print(line, file=sys.stderr)
            status = 2
            continue
        except HybridlabError as exc:
            print(exc, file=sys.stderr)
            status = 2
            continue
        model = spec.model if isinstance(spec, PipelineSpec) else spec
        what = "pipeline" if isinstance(spec, PipelineSpec) else "model"
        print(f"{path}: OK ({what} {spec.name!r}, {len(model.positions())} blocks)")
    return status


def cmd_summary(args: argparse.Namespace) -> int:
    from .dispatch import Dispatched, choose
    from .model import Model, active_parameters, count_parameters
    from .spec import PipelineSpec
    from .train import resolve_device

    spec = _load_any(args.spec, args.set)
    model_spec = spec.model if isinstance(spec, PipelineSpec) else spec
    registry = _registry()
    if args.device.split(":")[0] == "cuda":  # planning for a GPU needs none here: cuda and cuda:N alike
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise HybridlabError(f"unknown device {args.device!r}; expected cpu, cuda or cuda:N") from None
    else:
        device = resolve_device(args.device)
        if device.type not in ("cpu", "cuda"):
            raise HybridlabError(f"summary plans for cpu or cuda, got {args.device!r}")
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        model = Model(model_spec, registry)
    rows = []
    first_use: dict[str, int] = {}
    for pos, block in model.uses():
        i, block_spec = pos.index, pos.block
        mixer = block_spec.mixer
        if registry.impls("mixer", mixer.kind):
            pin = block.mixer.block_pin() if isinstance(block.mixer, Dispatched) else None
            try:
                c = choose("mixer", mixer.kind, mixer, device, dtype, training=True, registry=registry, pin=pin)
            except HybridlabError as exc:  # a pin that cannot serve here: training would stop with this
                impl, why = "-", str(exc)
            else:
                impl, why = c.impl.name, c.why
        else:
            impl, why = "module", "no separate implementations"
        ffn = block_spec.ffn.kind if block_spec.ffn is not None else "-"
        if block_spec.ffn is not None and registry.impls("ffn", ffn):  # e.g. moe: which grouped matmul
            pin = block.ffn.block_pin() if isinstance(block.ffn, Dispatched) else None
            try:
                chosen = choose("ffn", ffn, block_spec.ffn, device, dtype, training=True, registry=registry, pin=pin)
                ffn += f" ({chosen.impl.name})"
            except HybridlabError:
                ffn += " (-)"
        state = block.mixer.state_bytes(model.block_positions(args.seq_len), dtype)
        n, active = count_parameters(block), active_parameters(block)
        params = f"{n:,}" if active == n else f"{n:,} ({active:,} active)"
        if pos.key in first_use:  # a shared or looped block: its weights are counted at their first use
            params = f"shared with {first_use[pos.key]}"
        own = count_parameters(model.uses_modules[str(i)]) if str(i) in model.uses_modules else 0
        if own:  # a use's own adapters and projection
            params += f" + {own:,} own"
        first_use.setdefault(pos.key, i)
        where = format_path(pos.path) + "".join(f" #{it + 1}" for it in pos.iterations)
        notes = mixer.summary_notes()
        rows.append((str(i), where, mixer.kind + (f" ({notes})" if notes else ""), impl, ffn, params, _bytes(state),
                     why))
    unique = len(first_use)
    shape = f"{len(rows)} blocks" + (f" ({unique} sets of weights)" if unique != len(rows) else "")
    print(f"model {model_spec.name!r}: d_model {model_spec.d_model}, vocab {model_spec.vocab_size}, "
          f"{shape}; implementations for {device.type} {args.dtype}, training")
    positions = model.block_positions(args.seq_len)
    at = f"state@{args.seq_len}" if positions == args.seq_len else f"state@{positions} patches"
    header = ("layer", "block", "mixer", "impl", "ffn", "params", at, "why not the others")
    if all(pos.key == str(pos.index) for pos in model.order):  # a plain stack: the block is the layer
        header, rows = header[:1] + header[2:], [row[:1] + row[2:] for row in rows]
    _table(header, rows)
    total = count_parameters(model)
    embed = count_parameters(model.embedding)
    print(f"total parameters: {total:,} ({total - embed:,} without the embedding); "
          f"decoding state per sequence at {args.seq_len} tokens: "
          f"{_bytes(model.state_bytes(args.seq_len, dtype))}"
          + (f" (blocks over at most {positions} patches, and the {model_spec.latent.kind} latent's own)"
             if model.latent is not None else ""))
    if active_parameters(model) != total:  # routed experts: a token uses only some of them
        print(f"active parameters per token: {active_parameters(model):,} of {total:,}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    if args.resume and args.pipeline:
        raise HybridlabError("give either a PIPELINE or --resume RUN_DIR, not both")
    if args.resume and args.out:
        raise HybridlabError("--out does not apply to --resume (the run continues in its own directory)")
    if args.pipeline is not None and not args.pipeline.strip():
        raise HybridlabError("the pipeline path is empty (leave it out for the default job)")
    pipeline = args.pipeline or (None if args.resume else default_pipeline())
    if args.nproc is not None:  # the same command in N processes under torchrun
        from .distributed import launch
        from .train import check_launch

        check_launch(pipeline, args.set, args.out, args.resume, args.nproc)
        again = ([args.pipeline] if args.pipeline else []) + [f for kv in args.set for f in ("--set", kv)]
        for flag, value in (("--out", args.out), ("--resume", args.resume), ("--device", args.device)):
            again += [flag, value] if value else []
        return launch(args.nproc, ["train", *again, *(["--quiet"] if args.quiet else [])])
    run_dir, result = train(pipeline, overrides=args.set, out=args.out, resume=args.resume, device=args.device,
                            progress=not args.quiet)
    parts = [f"{key.split('/')[0]} accuracy: {value:.4f}" for key, value in result.items()
             if key.endswith("/accuracy")]  # one per evaluation split (eval, or len32, len64...)
    parts += [f"{key.split('/')[0]} loss: {value:.4f}" for key, value in result.items() if key.endswith("/loss")][:1]
    parts += [f"in {result['seconds']:.1f} s", f"run directory: {run_dir}"]
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one summary, from rank 0
        print("; ".join(p for p in parts if p))
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from .train import consolidate

    out = args.out or f"{str(args.run_dir).rstrip('/')}-consolidated"
    path = consolidate(args.run_dir, out)
    print(f"wrote {path} (an ordinary checkpoint: train --resume {out}, generate, evaluate)")
    return 0


def cmd_lipschitz(args: argparse.Namespace) -> int:
    from .lipschitz import lipschitz_report

    if os.path.isdir(args.spec):  # a run: its latest checkpoint's weights
        model = hybridlab.load(args.spec, overrides=args.set)
    else:
        from .spec import PipelineSpec

        spec = _load_any(args.spec, args.set)
        model = hybridlab.build(spec.model if isinstance(spec, PipelineSpec) else spec)
    rows = lipschitz_report(model, seq_len=args.seq_len, iterations=args.iterations)

    def bound(row: Any, name: str) -> str:
        if name not in row.parts:
            return "-"
        value = row.parts[name]
        return f"{value:.4g}" if value is not None else f"none ({row.reasons[name]})"

    def verdict(row: Any) -> str:
        if not row.checked:
            return "- (no declared bound to check)"
        return "PASS" if row.passed else "FAIL: " + "; ".join(row.violations())

    _table(("position", "block", "mixer bound", "ffn bound", "block bound", "measured: block (sub-layers)", "verdict"),
           [(str(r.position), r.kinds, bound(r, "mixer"), bound(r, "ffn"),
             "none" if r.declared is None else f"{r.declared:.4g}",
             f"{r.measured:.4g}" + (" (" + ", ".join(f"{k} {v:.4g}" for k, v in r.measured_parts.items()) + ")"
                                    if r.measured_parts else ""),
             verdict(r)) for r in rows])
    declared = [r.declared for r in rows]
    total = math.prod(declared) if all(d is not None for d in declared) else None
    print(f"model (blocks composed): declared bound {'none' if total is None else f'{total:.4g}'}; "
          f"product of the measured {math.prod(r.measured for r in rows):.4g}")
    return 0 if all(r.passed for r in rows) else 1


def cmd_tokenize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import shards

    if not 0 < args.eval_fraction < 1:
        raise HybridlabError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    shards.refuse_existing(Path(args.out))
    files = [f for pattern in args.files for f in _matching(pattern)]
    encode, vocab = shards.encoder(args.tokenizer)
    texts = shards.documents(tqdm(files, desc="tokenize", unit="file", disable=args.quiet or len(files) < 2),
                             args.jsonl_key)
    docs, empty = shards.tokenize_documents(texts, encode)
    meta = shards.write_shards(Path(args.out), shards.split_documents(docs, args.eval_fraction), vocab_size=vocab,
                               tokenizer=args.tokenizer, shard_tokens=args.shard_tokens)
    counts = {split: (sum(e["tokens"] for e in entries), sum(e["documents"] for e in entries), len(entries))
              for split, entries in meta["splits"].items()}
    print("; ".join(f"{split}: {n} tokens in {d} documents, {k} shard(s)" for split, (n, d, k) in counts.items())
          + (f"; {empty} empty document(s) skipped" if empty else "")
          + f"; vocab {vocab} ({meta['dtype']}); written to {args.out}")
    return 0


def _matching(pattern: str) -> list[str]:
    """A path or glob pattern's files, sorted; none is an error naming the pattern."""
    import glob

    found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not found:
        raise HybridlabError(f"no file matches {pattern!r}")
    return found


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import parse_grid, parse_lrs, parse_sweep, parse_wds, run_compare
    from .iso import parse_match

    if args.pipeline is None:
        raise HybridlabError("compare needs --pipeline P: the pipeline every model spec is trained with")
    try:
        seeds = int(args.seeds)
    except ValueError:
        raise HybridlabError(f"--seeds: expected a number of seeds, got {args.seeds!r}") from None
    run_compare(args.specs, args.pipeline, seeds=seeds, lrs=parse_lrs(args.lr), out=args.out, overrides=args.set,
                select=args.select, device=args.device, progress=not args.quiet, sweep=parse_sweep(args.sweep),
                match=parse_match(args.match), grid=parse_grid(args.grid), wds=parse_wds(args.wd))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import decode_run

    if args.prompt is None:
        raise HybridlabError("generate needs --prompt TEXT (ids or token names; bytes for the text task)")
    result = decode_run(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed, device=args.device, overrides=args.set, speculative=args.speculative,
                        compile=args.compile)
    print(result.text)
    if args.speculative:  # on stderr: stdout stays the text alone, as without --speculative
        s = result.stats
        rate = "no draft" if not s.drafted else f"{s.acceptance_rate:.3f}"
        print(f"speculative: acceptance rate {rate} ({s.accepted} of {s.drafted} drafted tokens accepted), "
              f"{s.tokens} tokens in {s.rounds + 1} forwards, {s.tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import check_out, default_out, sample_run, write_images

    try:
        labels = None if args.labels is None else [int(x) for x in args.labels.split(",")]  # '' is refused too
    except ValueError:
        raise HybridlabError(f"--labels takes comma-separated class ids (0,2,3), got {args.labels!r}") from None
    out = args.out or default_out(args.run_dir)
    check_out(out)  # before sampling: a bad path fails at once
    result = sample_run(args.run_dir, count=args.count, labels=labels, steps=args.steps, guidance=args.guidance,
                        seed=args.seed, device=args.device)
    path = write_images(result.images, out)
    shown = "" if result.labels is None else f" (labels {','.join(map(str, result.labels))})"
    print(f"wrote {len(result.images)} samples{shown} to {path}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .prune import prune_run

    result = prune_run(args.run_dir, args.drop, args.out, batches=args.batches, device=args.device)
    rows = [(str(l), "-" if d is None else f"{d:.4f}", "dropped" if l == result.dropped[0] else "")
            for l, d in enumerate(result.distances)]
    print(f"angular distance between the stream entering depth l and depth l+{args.drop}:")
    _table(("l", "distance", ""), rows)
    print(f"dropped depths {result.dropped[0]}..{result.dropped[-1]}; wrote {result.run_dir} "
          f"(heal it with a pipeline whose model: names it)")
    for name in result.before:
        after = result.after.get(name, float("nan"))
        print(f"{name}: {result.before[name]:.4f} before, {after:.4f} after")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .generate import evaluate_run

    results = evaluate_run(args.run_dir, overrides=args.set, device=args.device)
    for name, value in results.items():
        print(f"{name} {value:.6g}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_mup_check(args: argparse.Namespace) -> int:
    import json

    from .mup import coord_check, format_coord_check
    from .spec import PipelineSpec

    def model_spec(overrides: list[str]) -> Any:
        spec = _load_any(args.spec, args.set + overrides)
        return spec.model if isinstance(spec, PipelineSpec) else spec

    pipeline = isinstance(_load_any(args.spec, args.set), PipelineSpec)
    widths = args.widths or [model_spec([]).d_model * k for k in (1, 2, 4)]
    if len(set(widths)) < 2:
        raise HybridlabError(f"--widths: a coordinate check needs at least two different widths, got {widths}")
    # each width validated like --set d_model=W (a width the heads do not divide is a located error)
    specs = {w: model_spec([f"{'model.' if pipeline else ''}d_model={w}"]) for w in set(widths)}
    chosen = ("standard", "mup") if args.parametrization == "both" else (args.parametrization,)
    check = coord_check(specs, steps=args.steps, lr=args.lr, parametrizations=chosen, registry=_registry())
    print(format_coord_check(check))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(check.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _widths(text: str) -> list[int]:
    """argparse type: comma-separated positive widths, e.g. 32,64,128."""
    try:
        return [_positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths such as 32,64,128, got {text!r}")


def _positive_float(text: str) -> float:
    """argparse type: a number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from .spec import PipelineSpec
    from .train import resolve_device
    from .verify import Report, verify_all, verify_model

    device = resolve_device(args.device).type
    report = Report()
    if args.specs:
        if args.kind or args.impl:
            raise HybridlabError("--kind/--impl select components; give either SPEC... or --kind/--impl")
        for path in args.specs:
            spec = _load_any(path, args.set)
            model_spec = spec.model if isinstance(spec, PipelineSpec) else spec
            part = verify_model(model_spec, device=device, dtype=getattr(torch, args.dtype), seq_len=args.seq_len)
            report.extend(part)
            report.seconds += part.seconds
    else:
        def progress(name: str, part: Report) -> None:
            failed = len(part.failures())
            print(f"verify {name}: {len(part.checks)} checks, {failed} failed, {part.seconds:.1f} s",
                  file=sys.stderr, flush=True)

        report = verify_all(kind=args.kind, impl=args.impl, device=device, progress=progress)
    _print_report(report, show_all=args.all)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


def _print_report(report: Any, *, show_all: bool) -> None:
    """One row per (kind, impl, dtype): its worst check; then every failing check."""
    header = ("kind", "impl", "dtype", "shape", "quantity", "error", "ref error", "ratio", "verdict")

    def row(c: Any, count: str = "") -> tuple[str, ...]:
        return (c.kind, c.impl, c.dtype, c.case, c.quantity + count, f"{c.error:.2e}", f"{c.ref_error:.2e}",
                f"{c.ratio:.2f}" if c.ref_error else "-", "PASS" if c.passed else "FAIL")

    if show_all:
        _table(header, [row(c) for c in report.checks])
    else:
        groups: dict[tuple, list] = {}
        for c in report.checks:
            groups.setdefault((c.kind, c.impl, c.dtype), []).append(c)
        worst = [max(cs, key=lambda c: (not c.passed, c.error / c.allowed if c.allowed else math.inf))
                 for cs in groups.values()]
        rows = [row(w, f" (worst of {len(groups[(w.kind, w.impl, w.dtype)])})") for w in worst]
        _table(header, rows)
        failures = report.failures()
        if failures:
            print(f"\nfailing checks ({len(failures)}):")
            _table(header, [row(c) for c in failures])
    for note in report.notes:
        print(f"NOTE: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    n, bad = len(report.checks), len(report.failures())
    verdict = "PASSED" if report.passed else "FAILED"
    print(f"{verdict}: {n - bad}/{n} checks passed in {report.seconds:.1f} s")


# ---------------------------------------------------------------- helpers


def _at_least_two(text: str) -> int:
    """argparse type: a length of at least 2 (a next-token loss needs two tokens)."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 tokens (a next-token loss needs two), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1 (a length, a count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # bad flags: one line and status 2, like any other bad input
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hybridlab", description="Compose, check and train hybrid sequence models.")
    p.add_argument("--version", action="version", version=f"hybridlab {hybridlab.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("list", help="registered kinds, their implementations and packages")
    s.add_argument("category", nargs="?", help="only this category (mixer, ffn, normalization...)")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("plugins", help="loaded plugins: package, version, what each registered, errors")
    s.set_defaults(fn=cmd_plugins)

    s = sub.add_parser("validate", help="check model specs or pipelines; every problem as FILE:LINE: path: message")
    s.add_argument("specs", nargs="+", metavar="SPEC")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("summary", help="per layer: kind, chosen implementation and why, parameters, state size")
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--device", default="cpu", help="device to choose implementations for (default cpu)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--seq-len", type=_positive_int, default=4096,
                   help="sequence length for the state size (default 4096)")
    s.set_defaults(fn=cmd_summary)

    s = sub.add_parser("verify", help="check fast implementations against references (components or a model)")
    s.add_argument("specs", nargs="*", metavar="SPEC", help="model specs or pipelines: verify the whole model")
    s.add_argument("--kind", help="only this kind")
    s.add_argument("--impl", help="only this implementation")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model-level dtype (components run every dtype they declare)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    s.add_argument("--all", action="store_true", help="print every check, not the worst per group")
    s.add_argument("--seq-len", type=_at_least_two, default=131,
                   help="tokens per sequence of a model-level check (default 131: past two 64-token chunks)")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("train", help="train a pipeline (default: the built-in MQAR job)")
    s.add_argument("pipeline", nargs="?", metavar="PIPELINE", help=f"pipeline YAML (default: specs/{DEFAULT_PIPELINE})")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set steps=100 --set model.d_model=128")
    s.add_argument("--out", help="run directory (default runs/<name>-<timestamp>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    s.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the pipeline)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="run N processes on this host under torchrun (the pipeline's parallel: ddp or fsdp)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("consolidate", help="a run's latest checkpoint (an FSDP run's is sharded) as an ordinary "
                       "one-process checkpoint in a new run directory")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    s.add_argument("--out", metavar="NEW_RUN", help="the new run directory (default RUN_DIR-consolidated)")
    s.set_defaults(fn=cmd_consolidate)

    s = sub.add_parser("lipschitz", help="each block's Lipschitz bound: declared by its parts, and measured")
    s.add_argument("spec", metavar="SPEC_OR_RUN", help="a model spec, a pipeline, or a run directory (its weights)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    s.add_argument("--seq-len", type=_positive_int, default=16, help="tokens per measured sequence (default 16)")
    s.add_argument("--iterations", type=_positive_int, default=20, help="power-iteration steps (default 20)")
    s.set_defaults(fn=cmd_lipschitz)

    s = sub.add_parser("tokenize", help="tokenize text files once into memory-mapped shards for the text task")
    s.add_argument("files", nargs="+", metavar="FILE", help="text files or glob patterns; each file is a document")
    s.add_argument("--out", required=True, help="the folder to write (new or empty)")
    s.add_argument("--tokenizer", metavar="TOKENIZER_JSON", help="a local tokenizer.json (default: UTF-8 bytes)")
    s.add_argument("--jsonl-key", metavar="KEY", help="the files are JSON lines; each line's KEY is a document")
    s.add_argument("--eval-fraction", type=float, default=0.1,
                   help="the last fraction of the documents held out (at least one; default 0.1)")
    s.add_argument("--shard-tokens", type=_positive_int, default=2**28,
                   help="about this many tokens per shard file (default 2**28)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_tokenize)

    s = sub.add_parser("compare", help="train every (model spec, seed, lr) cell of a pipeline; tables and plots")
    s.add_argument("specs", nargs="+", metavar="SPEC", help="model specs to compare")
    s.add_argument("--pipeline", metavar="P", help="the pipeline (data, steps, optimizer...) every cell uses")
    s.add_argument("--seeds", default="1", metavar="N", help="seeds per spec: the pipeline's seed, +1, ... (default 1)")
    s.add_argument("--lr", metavar="LRS", help="comma-separated peak learning rates, e.g. 1e-3,3e-3 "
                   "(default: the pipeline's)")
    s.add_argument("--wd", metavar="WDS", help="comma-separated weight decays, e.g. 0,0.1: with --lr an lr x wd "
                   "grid, the best (lr, wd) cell per spec chosen (default: the pipeline's, not swept)")
    s.add_argument("--out", metavar="DIR", help="output directory (default runs/compare-<pipeline name>); "
                   "run the same command again to continue an interrupted comparison")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a pipeline field")
    s.add_argument("--sweep", metavar="KEY=V1,V2",
                   help="train each spec once per value of a pipeline field, e.g. model.layers[1].loop=1,2,4")
    s.add_argument("--match", metavar="MEASURE=N", help="first scale every spec's d_model to params=N or "
                   "state_bytes=N (decoding state at the longest eval length); see docs/research-loop.md")
    s.add_argument("--grid", action="append", default=[], metavar="data.FIELD=V1,V2",
                   help="a difficulty-grid axis (repeat for a cross product), e.g. data.pairs=4,8,16; "
                   "one aggregate score per spec")
    s.add_argument("--select", metavar="METRIC", help="metric that picks each spec's best lr "
                   "(default: the first eval split's accuracy)")
    s.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the pipeline)")
    s.add_argument("--quiet", action="store_true", help="no progress bars (cell lines still print)")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("evaluate", help="a trained run's latest checkpoint on its task's evaluation splits")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (hybridlab train --out, or a compare cell)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's spec first, e.g. model.layers[1].loop=8 (the weights must still fit)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("prune", help="drop the span of blocks that changes the stream least; write a new run")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    s.add_argument("--drop", type=_positive_int, required=True, metavar="N", help="how many consecutive blocks to drop")
    s.add_argument("--out", required=True, metavar="NEW_RUN", help="the pruned run's directory (new or empty)")
    s.add_argument("--batches", type=_positive_int, metavar="N",
                   help="evaluation batches to measure distances on (default: the pipeline's eval_batches)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("mup-check", help="μP coordinate check: activation RMS per layer vs width over a few steps")
    s.add_argument("spec", metavar="SPEC", help="a model spec or a pipeline (its model)")
    s.add_argument("--widths", type=_widths, metavar="W,W,...",
                   help="d_model values (default: 1, 2 and 4 times the spec's); μP's base is the smallest")
    s.add_argument("--steps", type=_positive_int, default=3, metavar="N", help="AdamW steps (default 3)")
    s.add_argument("--lr", type=_positive_float, default=1e-2, help="AdamW's constant lr (default 0.01)")
    s.add_argument("--parametrization", choices=("both", "mup", "standard"), default="both",
                   help="which to check (default both, to compare)")
    s.add_argument("--json", metavar="PATH", help="also write every RMS as JSON")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of the spec")
    s.set_defaults(fn=cmd_mup_check)

    s = sub.add_parser("generate", help="continue a prompt with a trained run (step-wise decoding from state)")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (hybridlab train --out, or a compare cell)")
    s.add_argument("--prompt", help="the prompt: text for the text task, else whitespace-separated token "
                   "names or ids")
    s.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    s.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    s.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    s.add_argument("--speculative", action="store_true",
                   help="draft tokens with the run's drafting objective and verify them in one forward per round: "
                   "the greedy output in fewer model forwards; prints the acceptance rate and tokens/s on stderr")
    s.add_argument("--compile", choices=["eager", "inductor"], default=None,
                   help="capture the decode step with torch.compile: eager (one graph of ops, no code generation; "
                   "a second or two first) or inductor (fused kernels; a C++ compiler and tens of seconds first). "
                   "Same tokens; in one call it pays back its capture only after thousands of tokens (docs/performance.md)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's spec first, e.g. model.layers[1].loop=8 (the weights must still fit)")
    s.set_defaults(fn=cmd_generate)
    s = sub.add_parser("sample", help="draw images from a run trained with a diffusion objective (PNG grid or .npy)")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory trained with a sampling objective (diffusion)")
    s.add_argument("--count", type=int, default=16, metavar="N", help="samples to draw (default 16, at most 1024)")
    s.add_argument("--labels", metavar="L,L,...", help="class ids, cycled over the samples (default: every class "
                   "in turn; not for an unconditional model)")
    s.add_argument("--steps", type=int, default=50, metavar="N", help="sampler steps from t=1 to 0 (default 50)")
    s.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance scale: p_null + W (p_label - p_null); 1 (default) is none")
    s.add_argument("--seed", type=int, default=0, help="the starting noise's seed (default 0)")
    s.add_argument("--out", metavar="PATH", help="a .png grid (needs matplotlib) or a .npy array (default: "
                   "RUN_DIR/samples.png, or samples.npy without matplotlib)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.set_defaults(fn=cmd_sample)
    from .hf import add_commands  # import-hf, export-hf (core/hf)
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        status = args.fn(args)
        sys.stdout.flush()  # a reader that went away shows here rather than at interpreter exit
        return status
    except BrokenPipeError:
        # stdout was closed early (`hybridlab summary SPEC | head`): stop quietly like other
        # Unix tools; stdout goes to devnull so the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except HybridlabError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
