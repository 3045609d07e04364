"""Packaging: the build backend's minimum version, and what the sdist and the wheel built from it
contain (package data the code loads, LICENSE, no tests that cannot run outside the repository)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from manifest_helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGES = tuple(p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
# The sdist's top level: what builds the package, plus README and LICENSE (setuptools adds the rest).
SDIST_TOP = {"PKG-INFO", "pyproject.toml", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "motlens.egg-info"}


def _tree_files() -> list[str]:
    """The working tree's files as a fresh checkout would have them: tracked or untracked, not ignored."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout of the repository")
    return sorted(f for f in out.decode().split("\0") if f and (REPO / f).is_file())


def _package_files() -> set[str]:
    """Every file of the packages, Python or data: the wheel must ship them all."""
    return {f for f in _tree_files() if f.split("/", 1)[0] in PACKAGES}


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel): the sdist of a copy of the working tree and the wheel built from that sdist (as
    ``python -m build`` does), both with the installed setuptools, no build isolation, no index."""
    tmp = tmp_path_factory.mktemp("dists")
    tree, out = tmp / "tree", tmp / "dist"
    for rel in _tree_files():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tree / rel)
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist = out / _run([sys.executable, "-c", hook, str(out)], tree).strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (source,) = (tmp / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(out), str(source)], tmp)
    (wheel,) = out.glob("motlens-*.whl")
    return sdist, wheel


def _sdist_files(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as tar:
        return {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name and m.isfile()}


def test_build_backend_is_new_enough_for_the_spdx_license() -> None:
    # `license = "<SPDX expression>"` (PEP 639) needs setuptools >= 77: 76.1.0 fails the build with
    # "invalid pyproject.toml config: `project.license`".
    assert isinstance(PYPROJECT["project"]["license"], str)
    requires = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    (setuptools,) = [r for r in requires if r.name == "setuptools"]
    assert not setuptools.specifier.contains("76.1.0") and setuptools.specifier.contains("77.0.3")


def test_sdist_ships_sources_readme_and_license_but_no_tests(dists) -> None:
    sdist, _ = dists
    files = _sdist_files(sdist)
    assert not [f for f in files if f.startswith("tests/")], "tests need conftest.py, helpers and the repo"
    tops = {f.split("/", 1)[0] for f in files}
    assert tops <= SDIST_TOP | set(PACKAGES), tops - SDIST_TOP - set(PACKAGES)
    assert {"README.md", "LICENSE", "pyproject.toml"} <= set(files)
    assert _package_files() <= set(files)
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"{tar.getnames()[0].split('/')[0]}/LICENSE")
        assert member is not None and member.read() == (REPO / "LICENSE").read_bytes()


def test_wheel_ships_package_data_and_license(dists) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        meta = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        license_text = zf.read(f"{info}/licenses/LICENSE") if f"{info}/licenses/LICENSE" in names else None
    missing = _package_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    # predlog.migrate.load() reads both variants of the SQL migrations from the installed package
    for variant in ("predlog/migrations/", "predlog/migrations/cluster/"):
        assert [n for n in names if n.startswith(variant) and n.count("/") == variant.count("/")
                and n.endswith(".sql")], variant
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert license_text == (REPO / "LICENSE").read_bytes()
    text = license_text.decode()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def _key(req: Requirement) -> tuple[str, str, frozenset[str]]:
    return canonicalize_name(req.name), str(req.specifier), frozenset(req.extras)


@pytest.mark.parametrize("extras", ["serve", "drift,promote"])
def test_image_dependency_step_installs_what_the_wheel_requires(dists, extras: str) -> None:
    """The Dockerfile installs scripts/extra_requirements.py's list, then the wheel with --no-deps: the
    list must be what the wheel itself requires with those extras (what `pip install motlens[...]` takes)."""
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        info = next(n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info"))
        requires = Parser().parsestr(zf.read(f"{info}/METADATA").decode()).get_all("Requires-Dist") or []
    envs = [{"extra": e} for e in ("", *extras.split(","))]
    wanted = {_key(r) for r in map(Requirement, requires) if r.marker is None or any(map(r.marker.evaluate, envs))}
    helper = [sys.executable, str(REPO / "scripts" / "extra_requirements.py"), str(REPO / "pyproject.toml"), extras]
    listed = {_key(Requirement(line)) for line in _run(helper, REPO).splitlines()}
    assert listed == wanted
