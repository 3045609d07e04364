"""The documentation's examples and links work from a clone of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
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
