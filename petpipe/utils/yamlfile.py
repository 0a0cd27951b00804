"""Read YAML as DVC reads it, as plain data, and refuse a key written twice with its line.

DVC loads params.yaml with ruamel.yaml's safe loader (YAML 1.2: `1e-4` is a number, `yes`, `on` and
`010` are what they look like, a string and ten); petpipe reads the same file the same way
(`dvc/utils/serialize/_yaml.py: parse_yaml`), so `dvc params diff` and a stage never disagree on a
value. Safe types only: no tag builds an object.

YAML's loaders keep the last of two equal keys (ruamel refuses them, in a message of its own); here the
first mapping (depth first) that holds one is an error naming the file, the line and the dotted key.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["DuplicateKeyError", "YAMLError", "parse_yaml"]

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *defaults` may repeat keys on purpose: they are overridden


class DuplicateKeyError(YAMLError):
    """A mapping holds the same key twice; str() is `<source>:<line>: key '<dotted.key>' ...`."""


def parse_yaml(text: str, source: str) -> Any:
    """The one YAML document in text as plain Python data, as DVC's parser reads it; `source` names it in
    errors (a file path)."""
    node = YAML(typ="safe").compose(text)
    if node is None:
        return None
    refuse_duplicate_keys(node, source)
    return YAML(typ="safe").load(text)


def _tag(node: Node) -> str:
    return str(getattr(node.tag, "value", node.tag))  # ruamel >= 0.18 wraps tags in a Tag


def refuse_duplicate_keys(node: Node, source: str, path: str = "", seen: set[int] | None = None) -> None:
    """Raise DuplicateKeyError at the first mapping (depth first) that holds one key twice."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: already checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for position, item in enumerate(node.value):
            refuse_duplicate_keys(item, source, f"{path}[{position}]", seen)
    elif isinstance(node, MappingNode):
        first_lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if _tag(key) == MERGE_TAG or not isinstance(key, ScalarNode):
                continue
            dotted = f"{path}.{key.value}" if path else str(key.value)
            line = key.start_mark.line + 1
            if (_tag(key), key.value) in first_lines:
                raise DuplicateKeyError(
                    f"{source}:{line}: key '{dotted}' is written twice (first on line "
                    f"{first_lines[_tag(key), key.value]}); YAML would silently keep the last value. Keep one."
                )
            first_lines[_tag(key), key.value] = line
            refuse_duplicate_keys(value, source, dotted, seen)
