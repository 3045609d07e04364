"""The documentation's examples and links work from a clone of the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SOURCE_DIRS = (
    "motlens",
    "training",
    "predictor",
    "predlog",
    "drift",
    "promotion",
    "bench",
    "manifests",
    "scripts",
    "tests",
)
_CURL = re.compile(r"\bcurl\b(?:[^\n]*\\\n)*[^\n]*")  # a curl command with its `\` continuation lines
_DATA = re.compile(r"\s(?:-d|--data(?:-raw|-binary|-ascii)?|--json)[\s=]")
_JSON_TYPE = re.compile(r"(?i)content-type:\s*application/json|\s--json\s")


def _curls(text: str) -> list[str]:
    return [m.group(0) for m in _CURL.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_curl_examples_that_post_json_say_so(doc):
    """curl's `-d` sends `application/x-www-form-urlencoded`, which the predictor answers with 415."""
    bare = [c for c in _curls(doc.read_text()) if _DATA.search(c) and not _JSON_TYPE.search(c)]
    assert not bare, f"{doc.name}: add -H 'Content-Type: application/json' to: {bare}"


def test_the_curl_check_sees_a_multiline_command():
    text = '```\ncurl -H "Host: x" http://h/v1/models/m:predict \\\n  -d \'{"instances": []}\'\n```\n'
    (cmd,) = _curls(text)
    assert _DATA.search(cmd) and not _JSON_TYPE.search(cmd)
    assert _JSON_TYPE.search(cmd.replace("curl", "curl -H 'Content-Type: application/json'"))


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_refer_only_to_files_in_the_repository(doc):
    """A clone has no design brief beside it: docs/architecture.md is the design of record."""
    text = doc.read_text()
    assert "DESIGN.md" not in text and "../shared" not in text
    for target in _LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(REPO) and path.exists(), f"{doc.name}: broken link {target}"


def test_sources_cite_the_docs_not_the_design_brief():
    sources = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh")]
    citing = [str(p.relative_to(REPO)) for p in sources if p != Path(__file__) and "DESIGN.md" in p.read_text()]
    assert not citing, citing


MAPPED = ("motlens", "training", "predictor", "predlog", "drift", "promotion")


def test_the_module_map_lists_every_module_and_only_those():
    """docs/architecture.md "Module map" stays the living layout: a module added, split or removed shows."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed: dict[str, str] = {}
    package = None
    for line in section.splitlines():
        if m := re.fullmatch(r"`(\w+)/`", line.strip()):
            package = m.group(1)
        elif m := re.match(r"- `(\w+\.py)`: (\S.*)", line):
            assert package is not None, f"module map: {line!r} before any package heading"
            listed[f"{package}/{m.group(1)}"] = m.group(2)
    present = {f"{pkg}/{f.name}" for pkg in MAPPED for f in (REPO / pkg).glob("*.py") if f.name != "__init__.py"}
    assert sorted(present - set(listed)) == [], "modules missing from docs/architecture.md's module map"
    assert sorted(set(listed) - present) == [], "docs/architecture.md's module map lists modules that do not exist"
    stale = {module: entry for module, entry in listed.items() if not _opens_docstring(REPO / module, entry)}
    assert stale == {}, "module map entries that are not their module docstring's opening sentence or clauses"


def _opens_docstring(module: Path, entry: str) -> bool:
    """Whether ``entry`` is the opening of the module docstring's first sentence, cut where a clause ends."""
    doc = ast.get_docstring(ast.parse(module.read_text())) or ""
    opening = " ".join(doc.split("\n\n", 1)[0].split()).replace("``", "`")
    entry = entry.rstrip(".")
    return opening.startswith(entry) and opening[len(entry) : len(entry) + 1] in ("", ".", ",", ":", ";")
