"""What the docs show users matches what the project does."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def yaml_blocks(path):
    """Every ```yaml block of a markdown file, parsed, with its line number."""
    text = path.read_text()
    for match in re.finditer(r"```yaml\n(.*?)```", text, re.S):
        yield text[: match.start()].count("\n") + 1, yaml.safe_load(match.group(1))


def leaves(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*prefix, str(key)))
    else:
        yield prefix, node


def lookup(params, path):
    for part in path:
        if not isinstance(params, dict) or part not in params:
            raise KeyError(".".join(path))
        params = params[part]
    return params


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_params_snippet_in_the_docs_matches_params_yaml(doc):
    """A snippet that shows a params.yaml key shows its value in params.yaml (keys params.yaml lacks, such as
    a hub reference given as an example, are not claims about it)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    wrong = []
    for line, block in yaml_blocks(doc):
        for path, value in leaves(block or {}):
            try:
                expected = lookup(params, path)
            except KeyError:
                continue
            if expected != value:
                wrong.append(
                    f"{doc.name}:{line}: {'.'.join(path)} is {value!r} there, {expected!r} in params.yaml"
                )
    assert not wrong, "\n".join(wrong)
