"""The README and docs stay true to the tree: the recipes table lists exactly the shipped
recipes, the README stays short, and every relative link points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: The issue that set the README's shape asked for at most this many lines.
MAX_README_LINES = 250


def readme_recipe_names(text: str) -> list[str]:
    """The first backticked name of each row of the README's ``## Recipes`` table."""
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]


def test_the_recipes_table_lists_exactly_the_shipped_recipes():
    names = readme_recipe_names(README.read_text())
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert len(names) == len(set(names)), "a recipe is listed twice in the README"
    missing, extra = sorted(set(shipped) - set(names)), sorted(set(names) - set(shipped))
    assert not missing and not extra, f"README recipes table: missing {missing}, extra {extra}"


def test_the_table_reader_sees_a_missing_row():
    text = README.read_text()
    first = readme_recipe_names(text)[0]
    pruned = "\n".join(line for line in text.splitlines() if not line.startswith(f"| `{first}`"))
    assert first not in readme_recipe_names(pruned)


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=str)
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
