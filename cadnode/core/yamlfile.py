"""Load a YAML file into a pydantic model, naming file:line:column in every error.

ruamel.yaml keeps the position of every key and item, so a pydantic error's location
(a path of keys and indexes) maps back to the line an admin has to fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(Exception):
    """One or more problems in a configuration file, each with its position."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def read_yaml(path: Path, text: str | None = None) -> Any:
    """Parse `path`, or `text` already read from it (so a caller can hash the same bytes)."""
    try:
        text = path.read_text(encoding="utf-8") if text is None else text
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from error
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML: {error.problem}"]) from error


def load_model(
    path: Path,
    model: type[Model],
    document: Any = None,
    origins: Mapping[tuple[str, ...], str] | None = None,
) -> Model:
    """Validate `path` (or an already read `document` from it) against `model`.

    `origins` names where values put into the document after it was read came from (keys
    path -> environment variable): an error in one of them names that, not a line of the file.
    """
    document = read_yaml(path) if document is None else document
    try:
        return model.model_validate(document if document is not None else {})
    except ValidationError as error:
        raise ConfigError(
            [_describe(path, document, e, origins or {}) for e in error.errors()]
        ) from error


def position(document: Any, location: tuple[int | str, ...]) -> tuple[int, int] | None:
    """1-based (line, column) of the deepest node of `location` that the document has.

    A key the mapping lacks before the end of `location` is passed over: a tagged union's tag
    (`destinations.NAME.dicomweb.timeout_s`) is part of the location but not of the file."""
    node, found = document, None
    for index, key in enumerate(location):
        try:
            if isinstance(node, CommentedMap) and key not in node and index < len(location) - 1:
                continue
            if isinstance(node, CommentedMap) and key in node:
                line, column = node.lc.key(key)
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
                line, column = node.lc.item(key)
            else:
                break
        except KeyError:  # put there after reading: no position in the file
            break
        found, node = (line + 1, column + 1), node[key]
    if found is None and isinstance(document, CommentedMap | CommentedSeq):
        found = (document.lc.line + 1, document.lc.col + 1)
    return found


def _describe(path: Path, document: Any, error: Any, origins: Mapping[tuple[str, ...], str]) -> str:
    location = tuple(error["loc"])
    variable = next((v for keys, v in origins.items() if location[: len(keys)] == keys), None)
    where = None if variable else position(document, location)
    prefix = variable or (f"{path}:{where[0]}:{where[1]}" if where else str(path))
    return f"{prefix}: {problem(error)}"


def problem(error: Any) -> str:
    """`key: message (got value)` for one of a pydantic ValidationError's errors()."""
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    value = error.get("input")
    if isinstance(value, str):  # a URL's password (database.url) is never repeated
        value = _URL_PASSWORD.sub(r"\1***@", value)
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    return f"{key}: {error['msg']}{shown}"


_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")
