"""Pre-tokenized text: a folder of memory-mapped token shards written once by
``hybridlab tokenize`` and read by the ``text`` task without loading them.

Layout of a folder ``DIR``::

    DIR/meta.json            {"format": "hybridlab-tokens/1", "tokenizer": "tokenizer.json" | null,
                              "vocab_size": V, "dtype": "uint16" | "uint32",
                              "splits": {"train": [{"file": ..., "tokens": n, "documents": d}, ...],
                                         "eval": [...]}}
    DIR/tokenizer.json       a copy of the tokenizer (absent for bytes)
    DIR/train-00000.bin      the tokens, raw little-endian ``dtype``
    DIR/train-00000.docs.npy int64 start offset of each document in that shard

Each input file (or each JSON line, with ``jsonl_key``) is one document. Documents are
cut, whole, into the training part and the held-out part: the last ``eval_fraction`` of
the documents (at least one) is held out. A shard holds whole documents and about
``shard_tokens`` tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import HybridlabError

FORMAT = "hybridlab-tokens/1"
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class TokenStream:
    """One split: its tokens (a memory map or an array) and where each document starts."""

    tokens: np.ndarray  # [N] integer token ids
    starts: np.ndarray  # [D] int64, increasing, starts[0] == 0

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_ids(self, offsets: np.ndarray) -> np.ndarray:
        """The document index of each token offset (any shape)."""
        return np.searchsorted(self.starts, offsets, side="right") - 1


def load_tokenizer(path: str | Path):
    """A ``tokenizers`` tokenizer from a ``tokenizer.json``, with a clear error when the
    optional library is missing or the file is not one."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise HybridlabError('a tokenizer needs the tokenizers library: pip install "hybridlab[tokenizers]"') from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a missing or malformed file
        raise HybridlabError(f"{path}: not a readable tokenizer.json ({exc})") from None


def encoder(tokenizer_path: str | Path | None) -> tuple[Callable[[str], list[int]], int]:
    """-> (encode(text) -> ids, vocab size): the tokenizer's, or UTF-8 bytes (256)."""
    if tokenizer_path is None:
        return (lambda text: list(text.encode("utf-8", errors="surrogateescape"))), 256
    tokenizer = load_tokenizer(tokenizer_path)
    return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), tokenizer.get_vocab_size()


def documents(files: Iterable[str | Path], jsonl_key: str | None = None) -> Iterator[str]:
    """Each file's text as one document, or with ``jsonl_key`` each JSON line's
    ``[jsonl_key]`` string."""
    for path in files:
        path = Path(path)
        try:
            if jsonl_key is None:
                yield path.read_text(encoding="utf-8", errors="surrogateescape")
                continue
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[jsonl_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise HybridlabError(f"{path}:{number}: not a JSON object with a string {jsonl_key!r}") from None
                    if not isinstance(text, str):
                        raise HybridlabError(f"{path}:{number}: {jsonl_key!r} is not a string")
                    yield text
        except OSError as exc:
            raise HybridlabError(f"cannot read {path}: {exc.strerror}") from None


def tokenize_documents(texts: Iterable[str], encode: Callable[[str], list[int]]) -> tuple[list[np.ndarray], int]:
    """-> (one int64 array per non-empty document, the number of empty ones skipped)."""
    out, empty = [], 0
    for text in texts:
        ids = np.asarray(encode(text), dtype=np.int64)
        if len(ids):
            out.append(ids)
        else:
            empty += 1
    return out, empty


def split_documents(docs: list[np.ndarray], eval_fraction: float) -> dict[str, list[np.ndarray]]:
    """The last ``eval_fraction`` of the documents (at least one) held out."""
    if len(docs) < 2:
        raise HybridlabError(f"{len(docs)} non-empty document(s): need at least 2 (one to train on, one held out); "
                             "give more files, or a JSONL file with --jsonl-key")
    held = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction)))
    return {"train": docs[:-held], "eval": docs[-held:]}


def stream(docs: list[np.ndarray], dtype: str = "int64") -> TokenStream:
    """Documents joined into one in-memory stream."""
    lengths = np.asarray([len(d) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return TokenStream(np.concatenate(docs).astype(dtype), starts)


def write_shards(out: Path, docs: dict[str, list[np.ndarray]], *, vocab_size: int, tokenizer: str | Path | None,
                 shard_tokens: int) -> dict:
    """Write the folder atomically (a temporary sibling renamed into place) -> meta."""
    refuse_existing(out)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = {"format": FORMAT, "tokenizer": None, "vocab_size": vocab_size, "dtype": dtype, "splits": {}}
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
            meta["tokenizer"] = "tokenizer.json"
        for split, split_docs in docs.items():
            meta["splits"][split] = [_write_shard(tmp, f"{split}-{i:05d}", group, dtype)
                                     for i, group in enumerate(_groups(split_docs, shard_tokens))]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def refuse_existing(out: Path) -> None:
    """The folder to write must be new or empty (checked before any work, and again at the end)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HybridlabError(f"{out} exists and is not empty; give a new --out")


def _groups(docs: list[np.ndarray], shard_tokens: int) -> Iterator[list[np.ndarray]]:
    group, size = [], 0
    for doc in docs:
        if group and size + len(doc) > shard_tokens:
            yield group
            group, size = [], 0
        group.append(doc)
        size += len(doc)
    if group:
        yield group


def _write_shard(folder: Path, name: str, docs: list[np.ndarray], dtype: str) -> dict:
    joined = stream(docs, dtype)
    joined.tokens.astype(np.dtype(dtype).newbyteorder("<")).tofile(folder / f"{name}.bin")
    np.save(folder / f"{name}.docs.npy", joined.starts)
    return {"file": f"{name}.bin", "tokens": len(joined.tokens), "documents": len(docs)}


def read_meta(folder: str | Path) -> dict:
    """meta.json of a tokenized folder, checked, with a clear error otherwise."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise HybridlabError(f"{folder}: no meta.json (write the folder with `hybridlab tokenize`)") from None
    except json.JSONDecodeError as exc:
        raise HybridlabError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HybridlabError(f"{path}: not a {FORMAT} folder")
    missing = [s for s in SPLITS if not meta.get("splits", {}).get(s)]
    if missing:
        raise HybridlabError(f"{path}: no {' or '.join(missing)} shards")
    return meta


def open_split(folder: str | Path, split: str) -> list[TokenStream]:
    """The split's shards as memory maps (nothing is read until a batch asks)."""
    folder = Path(folder)
    meta = read_meta(folder)
    shards = []
    for entry in meta["splits"][split]:
        path = folder / entry["file"]
        try:
            tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
            starts = np.load(path.with_suffix(".docs.npy"))
        except (OSError, ValueError) as exc:
            raise HybridlabError(f"{path}: cannot open the shard ({exc})") from None
        if len(tokens) != entry["tokens"]:
            raise HybridlabError(f"{path}: {len(tokens)} tokens, meta.json says {entry['tokens']} (truncated?)")
        shards.append(TokenStream(tokens, starts))
    return shards
