"""Static checks of the Dockerfile (no Docker engine here): targets, non-root user, pinned bases, no
secrets, no baked-in model, read-only root filesystem, slim dependency sets per target, and dependency
layers that no source change invalidates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from manifest_helpers import REPO
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = REPO / "Dockerfile"
HELPER = REPO / "scripts" / "extra_requirements.py"
SECRET_NAME = re.compile(
    r"(^|_)(PASSW(OR)?D|SECRET|TOKEN|API_?KEY|ACCESS_KEY(_ID)?|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.I
)
WRITABLE_ROOTS = ("/tmp", "/var/lib/motlens")  # emptyDir mounts in manifests/ (test_manifests_security)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and heredocs attached."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            body = []
            for nxt in lines:
                if nxt.strip() == heredoc.group(1):
                    break
                body.append(nxt)
            line += "\n" + "\n".join(body)
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, line
            stages.append(Stage(m.group(2) or str(len(stages)), m.group(1)))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, not {keyword}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage], list[Stage]]:
    global_args, stages = parse(DOCKERFILE.read_text())
    return global_args, {s.name: s for s in stages}, stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and its ancestors, root first."""
    out = [stages[name]]
    while out[0].base in stages:
        out.insert(0, stages[out[0].base])
    return out


def test_targets(dockerfile) -> None:
    _, stages, ordered = dockerfile
    assert {"predictor", "jobs"} <= set(stages)
    assert ordered[-1].name == "predictor", "a plain `docker build .` should give the predictor"


@pytest.mark.parametrize("target", ["predictor", "jobs"])
def test_final_targets_run_as_non_root(dockerfile, target: str) -> None:
    _, stages, _ = dockerfile
    users = [u for s in chain(stages, target) for u in s.args("USER")]
    assert users, f"{target}: no USER (would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"{target}: USER {users[-1]} (numeric, non-root for runAsNonRoot)"


def test_base_images_are_pinned(dockerfile) -> None:
    global_args, stages, ordered = dockerfile
    external = [s.base for s in ordered if s.base not in stages]
    assert external
    for ref in external:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), ""), ref)
        assert image and "latest" not in image, ref
        digest = re.search(r"@sha256:[0-9a-f]{64}$", image)
        exact = re.search(r":\d+\.\d+\.\d+[\w.-]*$", image)
        assert digest or exact, f"{image}: pin an exact version tag or a digest"


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_no_secrets(dockerfile) -> None:
    _, _, ordered = dockerfile
    for stage in ordered:
        for keyword, rest in stage.instructions:
            if keyword in ("ENV", "ARG"):
                names = re.findall(r"(?:^|\s)(\w+)=", rest) or [rest.split()[0]]
                bad = [n for n in names if SECRET_NAME.search(n)]
                assert not bad, f"{stage.name}: {keyword} {bad} would bake a secret into the image"
            if keyword in ("COPY", "ADD"):
                assert not re.search(r"\.env\b|\.aws|\.pem|id_rsa|kubeconfig|\.netrc", rest), rest
    ignore = _dockerignore()
    assert ignore[0] == "*", ".dockerignore should exclude everything and allow-list the sources"
    allowed = [p for p in ignore if p.startswith("!")]
    assert not [p for p in allowed if re.search(r"env|secret|\.motlens|mlruns|\.venv|\.git", p)]


def test_copied_sources_exist_and_pass_dockerignore(dockerfile) -> None:
    _, _, ordered = dockerfile
    allowed = {p[1:].rstrip("/") for p in _dockerignore() if p.startswith("!")}
    for stage in ordered:
        for keyword, rest in stage.instructions:
            if keyword != "COPY" or "--from=" in rest or "<<" in rest:
                continue
            *sources, _dest = [w for w in rest.split() if not w.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"


def test_model_is_not_baked_in_and_root_fs_can_be_read_only(dockerfile) -> None:
    _, stages, _ = dockerfile
    text = DOCKERFILE.read_text()
    assert not re.search(r"^\s*(COPY|ADD)\b.*(mlruns|\.motlens|bundle|\.safetensors|\.onnx|mnt/models)", text, re.M)
    cmd = stages["predictor"].args("CMD")[-1]
    assert '"--model", "/mnt/models"' in cmd
    env = " ".join(a for s in chain(stages, "predictor") for a in s.args("ENV"))
    settings = dict(re.findall(r"(\w+)=(\S+)", env))
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR", "MOTLENS_HOME"):
        assert settings[name].startswith(WRITABLE_ROOTS), f"{name}={settings[name]} is not on a writable volume"
    assert settings["HF_HUB_OFFLINE"] == "1"


def _venv_stage(stages: dict[str, Stage], target: str) -> str:
    """The stage whose /opt/venv the target copies."""
    (source,) = [m.group(1) for a in stages[target].args("COPY") if (m := re.search(r"--from=(\S+)", a))]
    return source


def _make_venv_extras(stages: dict[str, Stage], target: str) -> str:
    source = _venv_stage(stages, target)
    runs = [a for s in chain(stages, source) for a in s.args("RUN") if a.startswith("make-venv")]
    assert len(runs) == 1, f"{target}: expected one make-venv in {source}"
    return runs[0].split()[1]


def _make_venv_script(ordered: list[Stage]) -> str:
    (copy,) = [a for s in ordered for a in s.args("COPY") if "/usr/local/bin/make-venv" in a.split("\n", 1)[0]]
    return copy.split("\n", 1)[1] + "\n"


def test_targets_install_their_extras_only(dockerfile) -> None:
    _, stages, ordered = dockerfile
    assert _make_venv_extras(stages, "predictor") == "serve"
    assert set(_make_venv_extras(stages, "jobs").split(",")) == {"drift", "promote"}
    script = _make_venv_script(ordered)
    torch_at, deps_at = script.index('pip install "torch=='), script.index("pip install -c /src/constraints.txt -r ")
    assert torch_at < deps_at, "torch (CPU/CUDA build) must be installed before the other dependencies"
    assert "https://download.pytorch.org/whl/cpu" in script
    assert "extra_requirements.py /src/pyproject.toml \"$1\"" in script


def test_dependency_venvs_see_no_sources_and_the_project_comes_after(dockerfile) -> None:
    """A source change must not invalidate the dependency layers (torch and ~150 packages): the stages
    that run make-venv copy only pyproject.toml, constraints.txt and the requirements helper, and the
    project's wheel from the build stage is installed with --no-deps in the final target afterwards."""
    _, stages, _ = dockerfile
    dependency_inputs = {"pyproject.toml", "constraints.txt", "scripts/extra_requirements.py"}
    for target in ("predictor", "jobs"):
        venv = _venv_stage(stages, target)
        assert "build" not in [s.name for s in chain(stages, venv)], f"{venv} descends from the build stage"
        for stage in chain(stages, venv):
            for keyword, rest in stage.instructions:
                assert keyword != "ADD" and "--from=" not in rest, f"{stage.name}: {keyword} {rest}"
                if keyword == "COPY" and "<<" not in rest:
                    *sources, _dest = [w for w in rest.split() if not w.startswith("--")]
                    assert set(sources) <= dependency_inputs, f"{stage.name}: COPY {sources} before make-venv"
        steps = [(k, a) for k, a in stages[target].instructions if k in ("COPY", "RUN")]
        assert steps[0][0] == "COPY" and f"--from={venv} /opt/venv " in steps[0][1] + " "
        install = [a for k, a in steps[1:] if "pip install" in a]
        assert len(install) == 1, f"{target}: one install of the project after its dependency venv"
        assert re.match(r"--mount=type=bind,from=build,source=/wheels,target=/wheels\s", install[0]), install[0]
        assert "pip install --no-deps /wheels/motlens-*.whl && pip check" in install[0]


def test_build_stage_builds_the_wheel_with_readme_and_license(dockerfile) -> None:
    _, stages, _ = dockerfile
    copied = {w for a in stages["build"].args("COPY") if "<<" not in a for w in a.split()[:-1]}
    assert {"pyproject.toml", "README.md", "LICENSE"} <= copied
    assert stages["build"].args("RUN") == ["python -m pip wheel --no-deps --wheel-dir /wheels ."]


def test_torch_version_matches_setup_and_makefile(dockerfile) -> None:
    _, _, ordered = dockerfile
    (default,) = [a.split("=", 1)[1] for s in ordered for a in s.args("ARG") if a.startswith("TORCH_VERSION=")]
    for path in ("Makefile", "scripts/setup.sh"):
        pins = set(re.findall(r"torch==([\w.+]+)", (REPO / path).read_text()))
        assert pins == {default}, f"{path}: torch {pins}, Dockerfile TORCH_VERSION={default}"


def test_make_venv_script_is_valid_sh_and_refuses_unknown_variants(dockerfile, tmp_path) -> None:
    _, _, ordered = dockerfile
    script = _make_venv_script(ordered)
    assert script.startswith("#!/bin/sh\nset -eu\n")
    assert subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True).returncode == 0
    path = tmp_path / "make-venv"
    path.write_text(script)
    out = subprocess.run(["sh", str(path), "serve"], env={"PATH": os.environ["PATH"], "VARIANT": "rocm"},
                         text=True, capture_output=True, cwd=tmp_path)
    assert out.returncode == 1 and "VARIANT must be cpu or cuda, not 'rocm'" in out.stderr
    assert not (tmp_path / "opt").exists()


def _extra_requirements(pyproject: Path, extras: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HELPER), str(pyproject), extras], capture_output=True, text=True)


@pytest.mark.parametrize("extras", ["serve", "drift,promote"])
def test_extra_requirements_are_the_core_and_the_extras_deduplicated(extras: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = _extra_requirements(REPO / "pyproject.toml", extras)
    assert out.returncode == 0, out.stderr
    expected = list(project["dependencies"])
    for extra in extras.split(","):
        expected += [r for r in project["optional-dependencies"][extra] if r not in expected]
    assert out.stdout.splitlines() == expected


def test_extra_requirements_expand_self_references_and_refuse_unknown_extras(tmp_path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('''[project]
name = "My_Pkg"
dependencies = ["numpy>=1.26"]
[project.optional-dependencies]
a = ["requests>=2", "numpy>=1.26"]
b = ["rich; python_version >= '3.11'"]
all = ["my-pkg[a, b]", "pytest"]
''')
    out = _extra_requirements(pyproject, "all")
    assert out.returncode == 0, out.stderr
    # a self-reference would make pip look the project up on the index: its extras are expanded instead
    assert out.stdout.splitlines() == ["numpy>=1.26", "pytest", "requests>=2", "rich; python_version >= '3.11'"]
    out = _extra_requirements(pyproject, "a,serve")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "extra_requirements: no extra 'serve' in the project (it has: a, all, b)\n"


def _closure(extras: set[str]) -> dict[str, set[str]]:
    """Distributions (canonical name → who requires them) that ``pip install motlens[extras]`` brings,
    from pyproject.toml for motlens and the installed metadata for everything below it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    parents: dict[str, set[str]] = {}
    todo = [("motlens", r) for r in reqs]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        parent, req = todo.pop()
        name = canonicalize_name(req.name)
        if name == "motlens":
            continue
        parents.setdefault(name, set()).add(parent)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            envs = [{**default_environment(), "extra": e} for e in ("", *req.extras)]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((name, sub))
    return parents


def test_predictor_image_has_no_evidently_and_jobs_image_no_kserve() -> None:
    serve = _closure({"serve"})
    assert "kserve" in serve and "onnxruntime" in serve
    assert "evidently" not in serve
    # kserve itself requires the kubernetes client (its KServeClient); motlens' serve extra does not.
    assert serve.get("kubernetes", set()) <= {"kserve"}
    jobs = _closure({"drift", "promote"})
    assert {"evidently", "kubernetes"} <= set(jobs) and "kserve" not in jobs and "onnxruntime" not in jobs
    # the jobs download MLflow artifacts from S3 themselves (drift reference bundle, golden gate)
    assert "boto3" in jobs and "botocore" in jobs
    import botocore  # noqa: F401 - the dev venv installs the same extras


def test_images_carry_mlflows_client_not_its_server_and_store() -> None:
    """Both images talk to an MLflow server: ``mlflow-skinny`` (the core's), not the full ``mlflow`` with
    its SQLAlchemy store, Flask server and UI (the ``local`` extra, for a sqlite registry)."""
    server_side = {"mlflow", "sqlalchemy", "alembic", "flask", "gunicorn", "graphene", "docker", "huey", "skops"}
    assert server_side <= set(_closure({"local"}))
    for extras in ({"serve"}, {"drift", "promote"}):
        closure = _closure(extras)
        assert "mlflow-skinny" in closure and not server_side & set(closure), (extras, server_side & set(closure))
    assert "matplotlib" not in _closure({"serve"})
