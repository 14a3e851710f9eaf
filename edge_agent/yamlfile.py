"""Strict YAML files with errors that name the file, the line and the field (inventories, agent configs).

One loader for every YAML file a person writes: a typo is an error that points at its line with a
suggestion, never a silent default.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

Lines = dict[tuple, int]

MAX_FILE_BYTES = 1 << 20
# Aliases let a few hundred bytes stand for billions of values ("billion laughs"); every consumer that
# walks or copies the loaded document would pay for them. No hand-written config comes near this.
MAX_NODES = 100_000


class YamlFileError(ValueError):
    """A YAML file that cannot be used; ``problems`` lists every one as ``file:line: where: field: why``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def read_yaml(path: Path) -> tuple[Any, Lines]:
    """The document and the line of every key in it; a missing file or bad YAML raises :class:`YamlFileError`."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise YamlFileError([f"{path}: larger than {MAX_FILE_BYTES} bytes; not a config file"])
        text = path.read_text()
    except FileNotFoundError:
        raise YamlFileError([f"{path}: no such file"]) from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise YamlFileError([f"{path}: not a text file ({type(exc).__name__})"]) from None
    try:
        _check_expanded_size(yaml.compose(text, Loader=yaml.SafeLoader), path)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else f"{path}"
        raise YamlFileError([f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    return raw, line_map(text)


def _check_expanded_size(root: yaml.Node | None, path: Path) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_NODES` values (counted without expanding)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:  # an alias is the same node object: its size is known, not recounted
            return sizes[id(node)]
        children = [] if isinstance(node, yaml.ScalarNode) else (
            [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else node.value)
        sizes[id(node)] = 0  # a recursive alias counts as nothing more
        total = 1 + sum(size(child) for child in children)
        sizes[id(node)] = total
        if total > MAX_NODES:
            raise YamlFileError([f"{path}:{node.start_mark.line + 1}: aliases expand to more than {MAX_NODES} "
                                 f"values; refusing to load"])
        return total

    if root is not None:
        size(root)


def line_map(text: str) -> dict[tuple, int]:
    """Map every key/item path in a YAML document to its 1-based line (for error messages)."""
    lines: Lines = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                walk(child, (*path, key.value))
                lines[(*path, key.value)] = key.start_mark.line + 1  # the key's line, not its value's
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


def line_of(lines: Lines, *candidates: tuple) -> int | None:
    """The line of the longest existing prefix of the first candidate path that has one."""
    for path in candidates:
        for end in range(len(path), 0, -1):
            if path[:end] in lines:
                return lines[path[:end]]
    return None


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (to suggest a near-miss key)."""
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return model if part == loc[-1] else None
        model = _unwrap_model(info.annotation)
    return model


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def suggest(model: type[BaseModel] | None, loc: tuple) -> str:
    holder = _model_at(model, loc)
    if holder is None or not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(holder.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(holder.model_fields)})"


def format_problem(file: Path, line: int | None, where: str, loc: tuple, msg: str) -> str:
    field = ".".join(str(p) for p in loc)
    place = f"{file}:{line}" if line else f"{file}"
    return f"{place}: {where}{': field ' + repr(field) if field else ''}: {msg}"


def validate(model: type[BaseModel], data: Any, file: Path, lines: Lines, prefix: tuple, where: str,
              problems: list[str], fallback: tuple | None = None) -> Any:
    """Validate ``data`` against ``model``; each problem is appended to ``problems`` with file and line."""
    if data is None:
        problems.append(format_problem(file, line_of(lines, prefix), where, (), "missing section"))
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field" + suggest(model, loc)
            elif err["type"] == "missing":
                msg = "required field is missing"
            elif "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
            candidates = [(*prefix, *loc)] + ([(*fallback, *loc)] if fallback and loc else [])
            exact = [c for c in candidates if c in lines]
            line = lines[exact[0]] if exact else line_of(lines, candidates[0])
            problems.append(format_problem(file, line, where, loc, msg))
        return None
