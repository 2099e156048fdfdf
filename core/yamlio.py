"""YAML loading that remembers where every value came from.

Mappings load as :class:`LocDict`, sequences as :class:`LocList`: plain ``dict`` /
``list`` subclasses that also carry the :class:`Loc` (file, line, YAML path) of
themselves and of each child. Merging and expansion keep these, so an error found
after ``extends``/``defaults``/``repeat`` still points at the line that wrote the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import HybridlabError, Problem, SpecError, format_path


@dataclass(frozen=True)
class Loc:
    file: str
    line: int | None
    path: tuple  # YAML path in the file that wrote the value

    def problem(self, message: str, extra: tuple = ()) -> Problem:
        return Problem(self.file, self.line, format_path(self.path + extra), message)


class LocDict(dict):
    def __init__(self, *args: Any, loc: Loc | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loc = loc
        self.locs: dict[Any, Loc] = {}


class LocList(list):
    def __init__(self, *args: Any, loc: Loc | None = None) -> None:
        super().__init__(*args)
        self.loc = loc
        self.locs: list[Loc | None] = [None] * len(self)


def display_name(path: str | Path) -> str:
    """A path as the user would write it: relative to the working directory if inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError, RuntimeError):  # outside the working directory; a symlink loop
        return str(p)


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.constructor = yaml.SafeLoader("")  # only its construct_* helpers are used
        self.problems: list[Problem] = []
        self.explicit: dict[int, set[int]] = {}  # per mapping node, its explicit keys' nodes

    def line(self, node: yaml.Node) -> int:
        return node.start_mark.line + 1

    def build(self, node: yaml.Node, path: tuple) -> Any:
        loc = Loc(self.file, self.line(node), path)
        if isinstance(node, yaml.MappingNode):
            # YAML merge keys (<<: *anchor): merged pairs come first and explicit keys
            # override them; only an explicit key written twice is a duplicate
            # an anchored mapping is built again at each alias, and flatten_mapping rewrote it
            # the first time: its explicit keys are remembered from before that
            explicit = self.explicit.setdefault(
                id(node), {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"})
            self.constructor.flatten_mapping(node)
            out = LocDict(loc=loc)
            explicit_keys: set = set()
            for key_node, value_node in node.value:
                key = self.scalar(key_node, path)
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    key = str(key)
                is_explicit = id(key_node) in explicit
                # merged pairs may repeat a key (<<: [*a, *b]): the first map listed wins,
                # as in YAML; an explicit key overrides merged ones; only an explicit key
                # written twice is a duplicate
                if key in out and is_explicit and key in explicit_keys:
                    self.problems.append(Loc(self.file, self.line(key_node), path).problem(
                        f"duplicate key {key!r} (first at line {out.locs[key].line})", (key,)))
                    continue
                if key in out and not is_explicit:
                    continue
                if is_explicit:
                    explicit_keys.add(key)
                out[key] = self.build(value_node, path + (key,))
                out.locs[key] = Loc(self.file, self.line(key_node), path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            out = LocList(items, loc=loc)
            out.locs = [Loc(self.file, self.line(item), path + (i,)) for i, item in enumerate(node.value)]
            return out
        return self.scalar(node, path)

    def scalar(self, node: yaml.Node, path: tuple) -> Any:
        """A scalar's value; an explicit tag it does not fit (``!!int "abc"``) is a problem."""
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError, KeyError...
            tag = node.tag.rsplit(":", 1)[-1]
            self.problems.append(Loc(self.file, self.line(node), path).problem(
                f"invalid YAML: {getattr(node, 'value', '')!r} is not a valid !!{tag} ({type(exc).__name__})"))
            return None


def _yaml_problem(exc: yaml.YAMLError, file: str, text: str) -> Problem:
    """One line from PyYAML's error (its message quotes the source over several lines)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: PyYAML gives its position only
        line = text[:exc.position].count("\n") + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        what = f"character {char!r} is not allowed in YAML"
    elif isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(filter(None, [exc.context, exc.problem]))
    else:
        line, what = None, " ".join(str(exc).split())
    return Problem(file, line, "", f"invalid YAML: {what}")


def parse_yaml(text: str, file: str) -> Any:
    """Parse YAML text into LocDict/LocList/scalars. Raises SpecError on bad syntax."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return LocDict(loc=Loc(file, 1, ()))
        builder = _Builder(file)
        data = builder.build(node, ())
    except yaml.YAMLError as exc:  # bad syntax, a bad merge (<<: 5), an unknown !!tag
        raise SpecError([_yaml_problem(exc, file, text)]) from None
    except RecursionError:
        raise SpecError([Problem(file, None, "", "nested too deeply to read")]) from None
    if builder.problems:
        raise SpecError(builder.problems)
    return data


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    name = display_name(path)
    try:
        path.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # e.g. a symlink loop
        raise HybridlabError(f"{name}: cannot read: {exc}") from None
    if not path.exists():
        raise HybridlabError(f"{name}: no such file")
    if path.is_dir():
        raise HybridlabError(f"{name}: is a directory, expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HybridlabError(f"{name}: cannot read: {exc}") from None
    return parse_yaml(text, name)


def to_plain(value: Any) -> Any:
    """LocDict/LocList -> dict/list (for dumping)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value
