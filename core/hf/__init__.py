"""Hugging Face interop: ``hybridlab import-hf`` and ``hybridlab export-hf`` (docs/hf.md).

- ``importer.import_hf(src, out)``: a ``save_pretrained`` directory of a supported family
  (llama, qwen3, mamba2, gemma2, diffllama, qwen3_next, deepseek_v3, kimi_linear,
  falcon_h1, zamba2) -> a run directory (spec in our kinds, weights as checkpoint step 0);
- ``exporter.export_hf(run_dir, out)``: a run -> a directory transformers loads, natively
  for specs shaped like one of those families, else as remote code wrapping our Model
  (``configuration_hybridlab.py`` and ``modeling_hybridlab.py``, copied into it);
- ``llama`` (llama, qwen3), ``mamba2``, ``gemma2``, ``diffllama``, ``qwen3_next``,
  ``deepseek_v3``, ``kimi_linear``, ``falcon_h1``, ``zamba2``: the families' mappings, both ways;
  ``common``: reading checkpoints, the shared option checks, and writing directories all
  at once.

transformers is the optional extra ``hf`` and is imported only when a command needs it;
this module imports neither it nor torch, so the CLI pays nothing for it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_import_hf(args: argparse.Namespace) -> int:
    from .importer import import_hf

    result = import_hf(args.src, args.out)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"imported {result.family} from {args.src} into {result.run_dir} ({result.parameters:,} parameters); "
          f"decode with: hybridlab generate {result.run_dir} --prompt IDS")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .exporter import export_hf

    result = export_hf(args.run_dir, args.out, generic=args.generic)
    if result.family == "hybridlab":
        why = f" (not a native family: {result.reason})" if result.reason else ""
        print(f"exported {args.run_dir} to {result.out} as remote code{why}; load it with "
              f"AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)")
    else:
        print(f"exported {args.run_dir} to {result.out} as {result.family}; load it with "
              f"AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``import-hf`` and ``export-hf`` to the CLI's subcommands."""
    s = sub.add_parser("import-hf",
                       help="a Hugging Face save_pretrained directory (llama, qwen3, mamba2, gemma2, diffllama, "
                            "qwen3_next, deepseek_v3, kimi_linear, falcon_h1, zamba2) -> a run directory")
    s.add_argument("src", metavar="SRC", help="a local directory with config.json and model.safetensors")
    s.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run directory (new or empty)")
    s.set_defaults(fn=cmd_import_hf)

    s = sub.add_parser("export-hf", help="a run's latest checkpoint -> a directory transformers loads")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (trained, pruned or imported)")
    s.add_argument("--out", required=True, metavar="DIR", help="the directory to write (new or empty)")
    s.add_argument("--generic", action="store_true",
                   help="write the remote-code form even for a spec of a native family")
    s.set_defaults(fn=cmd_export_hf)
