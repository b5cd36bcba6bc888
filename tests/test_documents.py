"""The repository's documents and configs: every relative link resolves (file and heading), every
page is reachable from the README, the README stays short, and no YAML file repeats a key (a
repeated key silently replaces the first block)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked(pattern: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", pattern], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    return [REPO / name for name in listed]


def documents() -> list[Path]:
    """The repository's Markdown pages (tracked, or new in the working tree)."""
    pages = set(tracked("*.md")) | set(REPO.glob("docs/*.md")) | {REPO / "config/README.md"}
    return sorted(page for page in pages if page.exists())


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z]+:", target)]


def test_slug_follows_github():
    assert slug("The first GPU run: `tools/gpu-check.sh`") == "the-first-gpu-run-toolsgpu-checksh"
    assert slug("The profile's own scores, judged") == "the-profiles-own-scores-judged"


@pytest.mark.parametrize("page", documents(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no file {destination}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.name}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_page_is_reachable_from_the_readme():
    readme = REPO / "README.md"
    reached, queue = {readme}, [readme]
    while queue:
        page = queue.pop()
        for target in links(page):
            path = target.partition("#")[0]
            destination = (page.parent / path).resolve() if path else page
            if destination.suffix == ".md" and destination.exists() and destination not in reached:
                reached.add(destination)
                queue.append(destination)
    pages = set(REPO.glob("docs/*.md")) | {REPO / "config/README.md", REPO / "BENCHMARKS.md"}
    assert not pages - reached, sorted(str(p.relative_to(REPO)) for p in pages - reached)


def test_readme_fits_in_a_few_screens():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 260
    assert lines[[i for i, line in enumerate(lines) if line.startswith("## ")][0]] == "## Quickstart"


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"line {key_node.start_mark.line + 1}: key {key!r} repeated")
            seen.add(key)
        return super().construct_mapping(node, deep)


@pytest.mark.parametrize("path", tracked("config/*.yaml") + tracked("profiles/*/*.yaml"),
                         ids=lambda path: str(path.relative_to(REPO)))
def test_yaml_files_repeat_no_key(path):
    yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
