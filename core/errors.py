"""Errors a user or plugin author can cause. The CLI prints them as one line each and
exits with status 2; nothing here is for our own invariants (those are asserts)."""

from __future__ import annotations

from dataclasses import dataclass


class HybridlabError(Exception):
    """Bad input: a missing file, a bad value, an unknown device. The message is one
    line that names what is wrong and where, and how to fix it where we know."""

    def lines(self) -> list[str]:
        return [str(self)]


def format_path(path: tuple) -> str:
    """('layers', 0, 'blocks', 3, 'mixer') -> 'layers[0].blocks[3].mixer'"""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class PinCannotServe(HybridlabError):
    """An implementation pinned by name (``HYBRIDLAB_IMPL``, a spec's ``impl:``, ``verify
    --impl``) that declines this call (a dtype, device or option it does not support).
    verify_model notes the checks it cannot run under the pin (its float64 decoding and
    invariance checks) instead of failing them."""


class CannotDecode(NotImplementedError):
    """A layer that by design has no step-by-step decoding (e.g. attention with causal:
    false). verify_model skips its decode checks with a note; a mixer that merely lacks
    init_state raises plain NotImplementedError, which verify reports as a problem."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, where it is, and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(HybridlabError):
    """All problems found in a spec (not only the first)."""

    def __init__(self, problems: list[Problem]):
        unique = list(dict.fromkeys(problems))  # a block repeated N times reports once
        self.problems = unique
        super().__init__("\n".join(str(p) for p in unique))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]
