"""data ``text``: language modelling over local text, as bytes or through a tokenizer.

The target at every position is the next token. Three sources:

- ``files`` alone: the 256 byte values are the tokens (as before tokenizers existed);
- ``files`` with ``tokenizer`` (a local ``tokenizer.json``, read with the optional
  ``tokenizers`` library): the files are tokenized in memory at the first batch;
- ``tokenized``: a folder written once by ``hybridlab tokenize`` (core/shards.py), read
  through memory maps, so corpora larger than memory train without a load step.

With ``files`` the documents (one per file) are joined and the last ``eval_fraction`` of
the tokens is held out; a tokenized folder holds its training and held-out documents
apart already. A batch is ``batch_size`` windows at offsets drawn from (seed, split,
index), so it is a pure function of them (distributed ranks take their rows of the same
batch, and a resumed run sees the same data). With ``documents: true`` every batch also
carries ``doc_ids`` (the document of each token, numbered from 0 within its window), the
model restarts its attention and state at each document start, and the target of a
document's last token (the next document's first) is not scored.

``files`` are paths or glob patterns relative to the working directory at load time; the
resolved spec (and so the run directory) keeps them as absolute paths, and so with
``tokenizer`` and ``tokenized``.
"""

from __future__ import annotations

import functools
import glob
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from hybridlab.core import shards
from hybridlab.core.config import DataConfig
from hybridlab.core.errors import HybridlabError
from hybridlab.core.tasks import generator, length_splits, split_length, unknown_split
from hybridlab.registry import hookimpl


class TextConfig(DataConfig):
    """Next-token prediction over local text: bytes, a tokenizer, or pre-tokenized shards."""

    kind: Literal["text"] = "text"
    files: list[str] | None = Field(default=None, min_length=1)
    """Paths or glob patterns (``data/*.txt``), relative to the working directory; each file
    is one document. Give ``files`` or ``tokenized``."""
    tokenizer: str | None = None
    """With ``files``: a local ``tokenizer.json`` (the ``tokenizers`` library, extra
    ``tokenizers``) instead of bytes. A tokenized folder carries its own."""
    tokenized: str | None = None
    """A folder written by ``hybridlab tokenize`` (memory-mapped token shards)."""
    length: int = Field(default=128, ge=1)
    """Tokens per training window."""
    eval_lengths: list[int] | None = Field(default=None, min_length=1)
    """Evaluate on windows of these lengths, one split ``len{N}`` each (default: [length])."""
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    """With ``files``: the last part of the joined tokens, held out for evaluation."""
    documents: bool = False
    """Yield ``doc_ids`` so that no token attends to or carries state from another document
    in its window, and leave the cross-document targets unscored. Every mixer of the model
    must honour ``doc_ids`` (the model refuses them otherwise)."""

    @field_validator("files")
    @classmethod
    def _resolve(cls, patterns: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if patterns is None or (info.context or {}).get("saved_run"):  # generate needs no data
            return patterns
        out: list[str] = []
        for pattern in patterns:
            matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
            files = [str(Path(m).resolve()) for m in matches if Path(m).is_file()]
            if not files:
                raise ValueError(f"no file matches {pattern!r} (relative to {Path.cwd()})")
            out += [f for f in files if f not in out]
        return out

    @field_validator("tokenizer", "tokenized")
    @classmethod
    def _absolute(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None or (info.context or {}).get("saved_run"):
            return path
        resolved = Path(path).expanduser().resolve()
        if info.field_name == "tokenizer" and not resolved.is_file():
            raise ValueError(f"no tokenizer file {path!r} (relative to {Path.cwd()})")
        if info.field_name == "tokenized":
            try:
                shards.read_meta(resolved)
            except HybridlabError as exc:
                raise ValueError(str(exc)) from None
        return str(resolved)

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> "TextConfig":
        if (self.files is None) == (self.tokenized is None):
            raise ValueError("give either files (bytes, or with tokenizer) or tokenized (a `hybridlab tokenize` "
                             "folder)")
        if self.tokenized is not None and self.tokenizer is not None:
            raise ValueError("tokenizer: a tokenized folder carries its own tokenizer; leave tokenizer out")
        if (info.context or {}).get("saved_run") or self.files is None or self.tokenizer is not None:
            return self
        # bytes: the parts' sizes are known from the files', so a spec that cannot train
        # fails here, at its line, rather than when training starts
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
        if self.tokenized is not None:
            return int(shards.read_meta(self.tokenized)["vocab_size"])
        return shards.encoder(self.tokenizer)[1]

    def fields(self) -> set[str]:
        return super().fields() | ({"doc_ids"} if self.documents else set())

    def lengths(self) -> list[int]:
        return list(self.eval_lengths or [self.length])


class Text:
    def __init__(self, config: TextConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    @functools.cached_property
    def tokenizer_path(self) -> str | None:
        config = self.config
        if config.tokenized is not None:
            name = shards.read_meta(config.tokenized)["tokenizer"]
            return None if name is None else str(Path(config.tokenized) / name)
        return config.tokenizer

    @functools.cached_property
    def codec(self):
        return shards.load_tokenizer(self.tokenizer_path) if self.tokenizer_path is not None else None

    @functools.cached_property
    def parts(self) -> dict[str, list[shards.TokenStream]]:
        """Each part's token streams, read at the first batch (encode/decode, all generate
        uses, need none)."""
        config = self.config
        if config.tokenized is not None:
            parts = {split: shards.open_split(config.tokenized, split) for split in shards.SPLITS}
        else:
            encode, _ = shards.encoder(config.tokenizer)
            docs, _ = shards.tokenize_documents(shards.documents(config.files), encode)
            if not docs:
                raise HybridlabError("text: the files hold no text")
            joined = shards.stream(docs)
            cut = int(len(joined) * (1 - config.eval_fraction))
            cut_doc = int(np.searchsorted(joined.starts, cut, side="right"))
            parts = {"train": [shards.TokenStream(joined.tokens[:cut], joined.starts[:cut_doc])],
                     "eval": [shards.TokenStream(joined.tokens[cut:],
                                                 np.concatenate([[0], joined.starts[cut_doc:] - cut]))]}
        unit = "bytes" if self.tokenizer_path is None else "tokens"
        for name, longest in (("train", config.length), ("eval", max(config.lengths()))):
            usable = [s for s in parts[name] if len(s) >= longest + 1]
            if not usable:
                most = max(len(s) for s in parts[name])
                where = " in its largest shard" if len(parts[name]) > 1 else ""
                raise HybridlabError(
                    f"text: the {name} part has {most} {unit}{where}, fewer than a window of "
                    f"{longest + 1}; add text, lower the lengths or change eval_fraction")
        return parts

    def splits(self) -> list[str]:
        return length_splits(self.config.lengths())

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """-> {'inputs': [B, T], 'targets': [B, T] the next tokens, 'doc_ids': [B, T] with documents}"""
        if split == "train":
            streams, T = self.parts["train"], self.config.length
        elif split in self.splits():
            streams, T = self.parts["eval"], split_length(split)
        else:
            raise unknown_split("text", split, self.splits())
        g = generator(self.seed, split, index)
        room = torch.tensor([max(len(s) - T, 0) for s in streams], dtype=torch.float64)
        which = (torch.zeros(batch_size, dtype=torch.long) if len(streams) == 1
                 else torch.multinomial(room, batch_size, replacement=True, generator=g))
        starts = (torch.rand(batch_size, generator=g, dtype=torch.float64) * room[which]).long() if len(streams) > 1 \
            else torch.randint(0, int(room[0]), (batch_size,), generator=g)  # one stream: the byte task's draw
        offsets = starts[:, None].numpy() + np.arange(T + 1)  # [B, T + 1]
        windows = np.stack([np.asarray(streams[s].tokens[o], dtype=np.int64) for s, o in zip(which.tolist(), offsets)])
        windows = torch.from_numpy(windows)
        out = {"inputs": windows[:, :-1], "targets": windows[:, 1:].clone()}
        if self.config.documents:
            docs = torch.from_numpy(np.stack([streams[s].doc_ids(o) for s, o in zip(which.tolist(), offsets)]))
            docs = docs - docs[:, :1]  # [B, T + 1], from 0 in each window
            out["targets"][docs[:, 1:] != docs[:, :-1]] = -100  # the next document's first token
            out["doc_ids"] = docs[:, :-1].contiguous()
        return out

    def encode(self, text: str) -> list[int]:
        if self.codec is not None:
            return self.codec.encode(text, add_special_tokens=False).ids
        return encode_bytes(text)

    def decode(self, ids: list[int]) -> str:
        if self.codec is not None:
            return self.codec.decode([i for i in ids if 0 <= i < self.codec.get_vocab_size()])
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def encode_bytes(text: str) -> list[int]:
    """UTF-8 bytes. surrogateescape: bytes that are not UTF-8 (a command-line argument such
    as $'\\xff') reach Python as lone surrogates; the byte-level model gets them back."""
    try:
        return list(text.encode("utf-8", errors="surrogateescape"))
    except UnicodeEncodeError as exc:  # a lone surrogate that stands for no byte
        raise HybridlabError(f"the prompt cannot be encoded as bytes: {exc.reason} at character {exc.start}") from None


@hookimpl
def hybridlab_register(register):
    register.kind("data", "text", config=TextConfig, module=Text)
