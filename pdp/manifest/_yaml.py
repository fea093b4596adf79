"""YAML for ABC's own files: safe, no implicit timestamps, no duplicate keys, positions kept."""

from __future__ import annotations

from typing import Any

import yaml

from pdp.errors import ConfigError

__all__ = ["YamlDocument", "load_yaml"]


class _Loader(yaml.SafeLoader):
    """SafeLoader whose timestamps stay strings, so the schema alone decides their format."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class YamlDocument:
    """Parsed data plus the node tree, to point errors at ``source:line:column``."""

    def __init__(self, root: yaml.Node | None, data: Any, source: str) -> None:
        self.root, self.data, self.source = root, data, source

    def where(self, loc: tuple[int | str, ...]) -> str:
        """``source:line:column`` of the value at ``loc``, or of its nearest parent."""
        node = self.root
        if node is None:
            return self.source
        for part in loc:
            child: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == part:
                        child = value_node
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and part < len(node.value)
            ):
                child = node.value[part]
            if child is None:
                break
            node = child
        return f"{self.source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _check_duplicates(node: yaml.Node, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.value in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"{source}:{mark.line + 1}:{mark.column + 1}: duplicate key {key_node.value!r}"
                )
            seen.add(key_node.value)
            _check_duplicates(value_node, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, source)


def load_yaml(text: str, source: str) -> YamlDocument:
    """Parse one YAML document; ``ConfigError`` names ``source:line:column``."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        context = exc.context_mark
        started = f" ({exc.context} at line {context.line + 1})" if exc.context and context else ""
        raise ConfigError(f"{where}: invalid YAML: {exc.problem}{started}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if root is not None:
        _check_duplicates(root, source)
    return YamlDocument(root, data, source)
