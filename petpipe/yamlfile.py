"""Read YAML as plain data: safe types only (no tags that build objects), and no key written twice.

YAML's loaders keep the last of two equal keys without a word, so a typo or a merge that writes
`epochs` twice in one section would silently choose a value; here it is an error naming the line.
"""

from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *defaults` may repeat keys on purpose: they are overridden


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice; str() is `<source>:<line>: key '<dotted.key>' ...`."""


def parse_yaml(text: str, source: str) -> Any:
    """The one YAML document in text as plain Python data; `source` names it in errors (a file path)."""
    loader = yaml.SafeLoader(text)
    loader.name = source  # marks in yaml's own errors then name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        refuse_duplicate_keys(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def refuse_duplicate_keys(node: yaml.Node, source: str, path: str = "", seen: set[int] | None = None) -> None:
    """Raise DuplicateKeyError at the first mapping (depth first) that holds one key twice."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: already checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for position, item in enumerate(node.value):
            refuse_duplicate_keys(item, source, f"{path}[{position}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first_lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if key.tag == MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                continue
            dotted = f"{path}.{key.value}" if path else str(key.value)
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_lines:
                raise DuplicateKeyError(
                    f"{source}:{line}: key '{dotted}' is written twice (first on line "
                    f"{first_lines[key.tag, key.value]}); YAML would silently keep the last value. Keep one."
                )
            first_lines[key.tag, key.value] = line
            refuse_duplicate_keys(value, source, dotted, seen)
