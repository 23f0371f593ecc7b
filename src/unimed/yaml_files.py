"""The YAML files people write (presets, prompt files, lexicons, the phantom's data files) read by
PyYAML's safe loader, except that a mapping naming a key twice is an error. PyYAML keeps the last
value and drops the other without a word: a preset holding two ``train:`` sections trained with the
first one's keys at their defaults, a lexicon listing a word twice kept one translation."""

from __future__ import annotations

from typing import IO, Any

import yaml
from yaml.constructor import ConstructorError

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base`: its keys are meant to be overridden


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the safe loader's own error says so
                continue
            if earlier is not key_node:
                raise ConstructorError(None, None, f"key {key!r} appears twice in one mapping (first on "
                                       f"line {earlier.start_mark.line + 1}): one of its values would be "
                                       "lost", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load(stream: str | bytes | IO[str]) -> Any:
    """`yaml.safe_load`, with a key repeated in one mapping a `yaml.YAMLError` naming its line."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
