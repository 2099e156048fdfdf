"""What the Hugging Face importer and exporter share: transformers on demand, the tensors
of a ``save_pretrained`` directory (one safetensors file or the shards of an index), and
writing an output directory all at once (staged beside it, renamed into place), so a
failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from hybridlab.core.errors import HybridlabError

INSTALL = "pip install 'hybridlab[hf]'"


def require_transformers(command: str) -> Any:
    """The transformers module, or a one-line error naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise HybridlabError(f"{command} needs the transformers package, an optional extra: {INSTALL}") from None
    _hub_kernels_first()
    return transformers


def _hub_kernels_first() -> None:
    """transformers imports Hugging Face's ``kernels`` package where it is installed. In a
    source checkout run from its root (``python -m hybridlab``, ``python -m pytest``), the
    root is on sys.path and our own ``kernels/`` folder would answer that import; import
    theirs first, with the root hidden (ours is ``hybridlab.kernels``, never ``kernels``)."""
    import importlib
    import importlib.util
    import sys

    import hybridlab

    root = Path(hybridlab.__file__).resolve().parent.parent
    if "kernels" in sys.modules or not (root / "kernels" / "__init__.py").is_file():
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        if len(sys.path) != len(saved) and importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    except ImportError:
        pass  # transformers reads its version from the installed metadata and decides itself
    finally:
        sys.path[:] = saved


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; anything else is an error naming the file."""
    if not path.is_file():
        raise HybridlabError(f"{path}: not found; {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HybridlabError(f"{path}: cannot be read as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise HybridlabError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class Tensors:
    """The tensors of a ``save_pretrained`` directory by name, read on demand from
    ``model.safetensors`` or the shards ``model.safetensors.index.json`` lists. ``take``
    checks a tensor's shape against what the config implies and marks it used, so that
    tensors nothing took can be reported (a checkpoint the config does not describe)."""

    def __init__(self, src: Path) -> None:
        self.src = src
        single, index = src / "model.safetensors", src / "model.safetensors.index.json"
        if single.is_file():
            self.files = {name: single for name in self._names(single)}
        elif index.is_file():
            weight_map = read_json(index, "").get("weight_map")
            if not isinstance(weight_map, dict):
                raise HybridlabError(f"{index}: no weight_map object (expected tensor name -> shard file)")
            self.files = {name: src / file for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise HybridlabError(f"{index}: names shard {file.name}, which is not in {src}")
        else:
            found = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
            why = (f" (it has {', '.join(found[:3])}: load and save_pretrained it again to write safetensors)"
                   if found else "")
            raise HybridlabError(f"{src}: no model.safetensors or model.safetensors.index.json; import-hf reads "
                                 f"safetensors weights{why}")
        self.used: set[str] = set()
        self.dtypes: set[str] = set()  # of the tensors taken, as stored
        self.notes: list[str] = []  # what a family skipped on purpose (e.g. MTP layers), for the import's notes
        self._open: dict[Path, Any] = {}

    @staticmethod
    def _names(file: Path) -> list[str]:
        import safetensors

        try:
            with safetensors.safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # noqa: BLE001 - whatever the reader says, the file is damaged
            raise _damaged(file, exc) from None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, file: Path) -> Any:
        import safetensors

        if file not in self._open:
            try:
                self._open[file] = safetensors.safe_open(str(file), framework="pt")
            except Exception as exc:  # noqa: BLE001
                raise _damaged(file, exc) from None
        return self._open[file]

    def take(self, name: str, shape: tuple[int, ...], why: str) -> torch.Tensor:
        """The tensor ``name`` as float32, which must have ``shape`` (``why``: what in the
        config implies it, for the message)."""
        if name not in self.files:
            raise HybridlabError(f"{self.src}: tensor {name} is missing ({why} implies it, shape {list(shape)})")
        file = self.files[name]
        handle = self._handle(file)
        try:
            found = tuple(handle.get_slice(name).get_shape())
        except Exception as exc:  # noqa: BLE001 - an index naming a tensor its shard lacks, a bad header
            raise _damaged(file, exc, name) from None
        if found != tuple(shape):
            raise HybridlabError(f"{file}: tensor {name} has shape {list(found)}, but {why} implies {list(shape)}")
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - e.g. the data after a good header is cut short
            raise _damaged(file, exc, name) from None
        self.used.add(name)
        self.dtypes.add(str(tensor.dtype).removeprefix("torch."))
        return tensor.to(torch.float32)

    def unused(self) -> list[str]:
        return sorted(set(self.files) - self.used)


def _damaged(file: Path, exc: Exception, name: str | None = None) -> HybridlabError:
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    what = f" (reading {name})" if name else ""
    return HybridlabError(f"{file}: cannot be read{what}: {type(exc).__name__}: {reason}; the file is damaged or "
                          "incomplete")


def check_new(out: Path, what: str) -> None:
    """``out`` must not exist, or be an empty directory."""
    if out.exists() and not out.is_dir():
        raise HybridlabError(f"{what} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise HybridlabError(f"{what} {out}: exists and is not empty; give a new or empty directory")


@contextlib.contextmanager
def staged(out: Path, what: str) -> Iterator[Path]:
    """A fresh directory beside ``out`` to write into; renamed to ``out`` when the block
    ends without an error, removed when it raises (so nothing half-written is left)."""
    out = Path(out)
    check_new(out, what)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HybridlabError(f"{what} {out}: cannot create {parent} ({exc.strerror or exc})") from None
    staging = parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if out.is_dir():  # empty, checked above
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- shared by the families' option checks


def unsupported(family: str, option: str, value: Any, why: str) -> HybridlabError:
    """The one-line error for a config option we cannot represent."""
    return HybridlabError(f"config.json: {option} = {value!r} cannot be imported ({family}): {why}")


def check_quantization(family: str, config: Any) -> None:
    if getattr(config, "quantization_config", None):
        raise unsupported(family, "quantization_config", type(config.quantization_config).__name__,
                          "quantized weights; import the unquantized checkpoint")


def check_rope(family: str, config: Any, *, partial: bool = False) -> tuple[float, float]:
    """(rope theta, rotary fraction) of a default RoPE; any scaling or other key is refused
    by name. ``partial``: the family reads ``partial_rotary_factor`` (else it must be 1)."""
    rope = dict(config.rope_parameters or {})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind != "default":
        raise unsupported(family, "rope_parameters.rope_type", kind,
                          "the rope kind has no RoPE scaling (only rope_type 'default' imports)")
    theta = rope.pop("rope_theta", None)
    if not isinstance(theta, (int, float)) or theta <= 1:
        raise unsupported(family, "rope_parameters.rope_theta", theta, "expected a number above 1")
    fraction = rope.get("partial_rotary_factor", 1.0)
    if fraction == 1.0 or (partial and isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        rope.pop("partial_rotary_factor", None)
    if rope:  # transformers' default RoPE of these families reads nothing else
        key, value = next(iter(rope.items()))
        raise unsupported(family, f"rope_parameters.{key}", value, "not an option of the default RoPE")
    return float(theta), float(fraction)


def check_known(family: str, config: Any, transformers: Any, known: set[str] | tuple[str, ...]) -> None:
    """Every field of the config class that the family neither reads nor knows to be inert
    must hold its default: an option newer than the importer is refused by name."""
    import dataclasses

    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    default = type(config)()
    for field in dataclasses.fields(type(config)):
        name = field.name
        if name in base or name in known:
            continue
        if getattr(config, name, None) != getattr(default, name, None):
            raise unsupported(family, name, getattr(config, name), "an option this importer does not know")


def check_all_taken(tensors: Tensors, family: str, ignore: tuple[str, ...] = ("rotary_emb.inv_freq",)) -> None:
    """No tensor of the checkpoint is left over (a layer or a bias the config does not declare)."""
    left = [n for n in tensors.unused() if not n.endswith(ignore)]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise HybridlabError(f"{tensors.src}: tensor {', '.join(left[:3])}{more} is not part of the {family} "
                             "model config.json describes (a bias or a layer the config does not declare?)")


def plain_stack(spec: Any) -> str:
    """"" when the spec is a token embedding (unscaled), prenorm residual, lm head without
    softcap, affine rmsnorm final norm and top-level blocks only; else why not."""
    if spec.embedding.kind != "token":
        return f"embedding is {spec.embedding.kind}, not token"
    if spec.residual.kind != "prenorm":
        return f"residual is {spec.residual.kind}, not prenorm"
    if spec.head.kind != "lm":
        return f"head is {spec.head.kind}, not lm"
    if spec.norm.kind != "rmsnorm" or not spec.norm.affine:
        return "the final norm is not an rmsnorm with a learned scale"
    for pos in spec.positions():
        if len(pos.path) != 2 or pos.path[0] != "layers":
            return f"block at depth {pos.index} is inside a loop or a shared group"
    return ""


def take_experts(tensors: Tensors, take: Any, full: str, experts: int, width: int, d: int, why: str,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts under ``full`` (``...experts.``, ``take`` adding the model
    prefix) as our moe's gate_up [E, d, 2I] and down [E, I, d]: from the fused tensors
    transformers holds in memory ([E, 2I, d], [E, d, I]) or one tensor per expert, as
    checkpoints store them (``names``: its gate, up and down projections; Mixtral-style
    checkpoints call them w1, w3, w2)."""
    if any(n.endswith(full + "gate_up_proj") for n in tensors.files):
        gate_up = take(full + "gate_up_proj", (experts, 2 * width, d), why).transpose(1, 2)
        down = take(full + "down_proj", (experts, d, width), why).transpose(1, 2)
        return gate_up.contiguous(), down.contiguous()
    gate, up, down = names
    gate_up = torch.stack([torch.cat([take(full + f"{e}.{gate}.weight", (width, d), why),
                                      take(full + f"{e}.{up}.weight", (width, d), why)]).t()
                           for e in range(experts)])
    down = torch.stack([take(full + f"{e}.{down}.weight", (d, width), why).t() for e in range(experts)])
    return gate_up.contiguous(), down.contiguous()


def put_experts(out: dict, full: str, gate_up: torch.Tensor, down: torch.Tensor,
                names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
    """The inverse of take_experts: one tensor per expert under ``full``."""
    width = down.shape[1]
    for e in range(gate_up.shape[0]):
        out[full + f"{e}.{names[0]}.weight"], out[full + f"{e}.{names[1]}.weight"] = gate_up[e].t().split(width)
        out[full + f"{e}.{names[2]}.weight"] = down[e].t()


def skip_extra_layers(tensors: Tensors, prefix: str, layers: int, what: str) -> None:
    """Tensors of layers numbered ``layers`` and up (``{prefix}layers.N.``: DeepSeek's MTP
    modules, stored after the decoder layers) are skipped with a note."""
    import re

    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    extra = [n for n in tensors.unused() if (m := pattern.match(n)) and int(m.group(1)) >= layers]
    if extra:
        tensors.used.update(extra)
        tensors.notes.append(f"skipped the {len(extra)} tensors of {prefix}layers.{layers} and up ({what})")


LEGACY_KEYS = frozenset({"model_type", "transformers_version", "torch_dtype", "rope_theta", "rope_scaling",
                         "partial_rotary_factor", "_name_or_path"})
"""config.json keys no config class declares but transformers reads: the type and version
it writes, and older spellings it folds into ``dtype`` and ``rope_parameters`` (whose
values check_rope then judges)."""
LEGACY_KEYS_OF = {"kimi_linear": frozenset({"linear_attn_config", "first_k_dense_replace"}),
                  "falcon_h1": frozenset({"head_dim"})}
"""Per model_type, keys of the original checkpoints that its config class reads into its
own fields (Kimi Linear: layer types and linear attention sizes, the dense MLP layers),
or its model reads (Falcon-H1's attention: head_dim)."""


def unknown_keys(raw: dict, config_class: Any, transformers: Any) -> list[str]:
    """The keys of config.json that transformers' ``config_class`` neither declares (a
    field of it or of PreTrainedConfig, an ``attribute_map`` name, a key its own
    ``to_dict`` writes) nor reads as a legacy
    spelling: keys transformers' model ignores, typically left by the checkpoint's
    original remote code (DeepSeek-V3's ``scoring_func``, ``topk_method``, ``ep_size``)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_class)}
    known |= {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    known |= set(config_class.attribute_map) | set(config_class.attribute_map.values())
    known |= set(config_class().to_dict())  # what it writes itself, derived attributes included (head_dim)
    known |= LEGACY_KEYS | LEGACY_KEYS_OF.get(raw.get("model_type"), frozenset())
    return sorted(key for key in raw if key not in known)
