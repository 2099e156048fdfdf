"""data ``text``: byte-level language modelling over local text files.

A sanity check on real data: token ids are the 256 byte values, the target at every
position is the next byte. The files are read once and joined; the last
``eval_fraction`` of the bytes is held out for evaluation. A batch is ``batch_size``
windows at offsets drawn from (seed, split, index), so it is a pure function of them.

``files`` are paths or glob patterns relative to the working directory at load time; the
resolved spec (and so the run directory) keeps them as absolute paths.
"""

from __future__ import annotations

import functools
import glob
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from hybridlab.core.config import DataConfig
from hybridlab.core.errors import HybridlabError
from hybridlab.core.tasks import generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl


class TextConfig(DataConfig):
    """Byte-level next-token prediction over local text files."""

    kind: Literal["text"] = "text"
    files: list[str] = Field(min_length=1)
    """Paths or glob patterns (``data/*.txt``), relative to the working directory."""
    length: int = Field(default=128, ge=1)
    """Bytes per training window."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate on windows of these lengths, one split ``len{N}`` each (default: [length])."""
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    """The last part of the joined bytes, held out for evaluation."""

    @field_validator("files")
    @classmethod
    def _resolve(cls, patterns: list[str], info: ValidationInfo) -> list[str]:
        if (info.context or {}).get("saved_run"):  # a finished run's absolute paths: generate needs no data
            return patterns
        out: list[str] = []
        for pattern in patterns:
            matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
            files = [str(Path(m).resolve()) for m in matches if Path(m).is_file()]
            if not files:
                raise ValueError(f"no file matches {pattern!r} (relative to {Path.cwd()})")
            out += [f for f in files if f not in out]
        return out

    @model_validator(mode="after")
    def _long_enough(self, info: ValidationInfo) -> "TextConfig":
        """The held-out and training parts must each hold a window (+1 byte for its last
        target): known from the files' sizes, so a spec that cannot train fails here, at
        its line, rather than when training starts."""
        if (info.context or {}).get("saved_run"):
            return self
        try:
            total = sum(Path(f).stat().st_size for f in self.files)
        except OSError:
            return self  # unreadable: the task says so when it reads them
        cut = int(total * (1 - self.eval_fraction))
        for name, size, longest, field in (("train", cut, self.length, "length"),
                                           ("eval", total - cut, max(self.lengths()), "eval_lengths")):
            if size < longest + 1:
                raise ValueError(f"{field}: the {name} part of the files has {size} bytes, fewer than a window of "
                                 f"{longest + 1}; add text, lower the lengths or change eval_fraction")
        return self

    def min_vocab_size(self) -> int:
        return 256

    def lengths(self) -> list[int]:
        return list(self.eval_lengths or [self.length])


class Text:
    def __init__(self, config: TextConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    @functools.cached_property
    def parts(self) -> dict[str, torch.Tensor]:
        """The files' bytes, read at the first batch (encode/decode, all generate uses,
        need none), cut into the training part and the held-out part."""
        config = self.config
        try:
            data = b"".join(Path(f).read_bytes() for f in config.files)
        except OSError as exc:
            raise HybridlabError(f"text: cannot read {exc.filename}: {exc.strerror}") from None
        everything = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        cut = int(len(data) * (1 - config.eval_fraction))
        parts = {"train": everything[:cut], "eval": everything[cut:]}
        for name, longest in (("train", config.length), ("eval", max(config.lengths()))):
            if len(parts[name]) < longest + 1:
                raise HybridlabError(
                    f"text: the {name} part has {len(parts[name])} bytes, fewer than a window of {longest + 1}; "
                    f"add text, lower the lengths or change eval_fraction")
        return parts

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T] bytes, 'targets': [B, T] the next bytes}"""
        if split == "train":
            part, T = self.parts["train"], self.config.length
        elif split in self.splits():
            part, T = self.parts["eval"], split_length(split)
        else:
            raise unknown_split("text", split, self.splits())
        g = generator(self.seed, split, index)
        starts = torch.randint(0, len(part) - T, (batch_size,), generator=g)  # [B]
        windows = part[starts[:, None] + torch.arange(T + 1)].long()  # [B, T + 1]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def encode(self, text: str) -> list[int]:
        # surrogateescape: bytes that are not UTF-8 (a command-line argument such as
        # $'\xff') reach Python as lone surrogates; the byte-level model gets them back
        try:
            return list(text.encode("utf-8", errors="surrogateescape"))
        except UnicodeEncodeError as exc:  # a lone surrogate that stands for no byte
            raise HybridlabError(f"the prompt cannot be encoded as bytes: {exc.reason} at character {exc.start}") from None

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@hookimpl
def hybridlab_register(register):
    register.kind("data", "text", config=TextConfig, module=Text)
