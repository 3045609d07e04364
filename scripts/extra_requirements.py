"""Print the third-party requirements of a project's core and extras, one a line, from its pyproject.toml.

    python extra_requirements.py pyproject.toml drift,promote

The Dockerfile installs these before the project, so its dependency layers never see the sources. A
self-reference (``name[a,b]`` in an extra) brings in extras a and b rather than the project itself.
Standard library only: it runs on the base image's Python.
"""

from __future__ import annotations

import re
import sys
import tomllib

_NAME_AND_EXTRAS = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The core dependencies, then those of ``extras`` (and the extras they name), each once."""
    optional = project.get("optional-dependencies", {})
    out = list(project.get("dependencies", []))
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise ValueError(f"no extra {extra!r} in the project (it has: {', '.join(sorted(optional))})")
        seen.add(extra)
        for req in optional[extra]:
            m = _NAME_AND_EXTRAS.match(req)
            if m and _canonical(m.group(1)) == _canonical(project["name"]):
                todo += [e.strip() for e in (m.group(2) or "").split(",") if e.strip()]
            elif req not in out:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: extra_requirements.py PYPROJECT EXTRA[,EXTRA...]", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        project = tomllib.load(f)["project"]
    try:
        lines = requirements(project, [e.strip() for e in argv[1].split(",") if e.strip()])
    except ValueError as e:
        print(f"extra_requirements: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
