"""Reading YAML as params.yaml is read: duplicate keys refused, `1e-4` a number (as YAML 1.2 and DVC read
it), no tags (a safe loader: nothing is constructed from `!!python/...`), and no alias bomb expanded. Every
error is a one-line ConfigError naming the file or the `--set` argument."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mrpo.errors import ConfigError, quote

# More values than any params file holds once its aliases are expanded: past it, a document is an alias bomb
# ("billion laughs"), whose values, or the error quoting one, would fill memory.
MAX_YAML_VALUES = 20_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"duplicate key {quote(key)} at line {line} of {node.start_mark.name}")
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for with every alias expanded; each node counted once (memoized), so an
    alias bomb costs no more to measure than to read."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a placeholder, in case a node is reached again while being measured
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _construct_bounded_document(loader: _UniqueKeyLoader, node: yaml.Node) -> Any:
    if _expanded_size(node, {}) > MAX_YAML_VALUES:
        raise ConfigError(
            f"{node.start_mark.name}: its aliases (*name) expand to more than {MAX_YAML_VALUES} values; "
            "write the values out instead of nesting aliases"
        )
    return yaml.SafeLoader.construct_document(loader, node)


_UniqueKeyLoader.construct_document = _construct_bounded_document
_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
# YAML 1.1 (PyYAML) reads `1e-4` and `1e30` as strings; YAML 1.2 (and DVC, which reads params.yaml too) as
# numbers. Read them as numbers, so `learning_rate: 1e-4` means what it says.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str, where: str = "value") -> Any:
    """One value as params.yaml would read it (for `--set key=value`); `where` names it in an error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"{where}: {quote(text)} holds a YAML tag ({_yaml_problem(exc)}); tags such as !!python/object "
            "are refused, only plain values (numbers, strings, lists, mappings) are read: quote it to pass "
            "it as a string"
        ) from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(
            f"{where}: {quote(text)} is not a YAML value ({_yaml_problem(exc)}); "
            "quote it to pass it as a string"
        ) from None


def _line(exc: yaml.YAMLError) -> int | str:
    mark = getattr(exc, "problem_mark", None)
    return mark.line + 1 if mark else "?"


def _yaml_problem(exc: BaseException) -> str:
    """A YAML error's reason in one line, without its multi-line marks."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    problem = (getattr(exc, "problem", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
    return problem if len(problem) <= 120 else problem[:117] + "..."


def read_yaml_mapping(path: str | Path) -> dict:
    """A params file as written (an overlay not applied): a mapping of sections, duplicate keys refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found (run from the project root or pass --params)")
    with path.open() as f:
        try:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.constructor.ConstructorError as exc:
            raise ConfigError(
                f"{path}: {_yaml_problem(exc)} at line {_line(exc)}; "
                "tags such as !!python/object are refused: write a plain value"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML at line {_line(exc)}: {_yaml_problem(exc)}") from exc
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}"
        )
    return raw
