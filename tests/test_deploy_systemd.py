"""The systemd units of deploy/systemd (a single box without Kubernetes, docs/deploy.md).

Structural checks always run: every ExecStart parses with the real ``motlens`` parser, every variable
the env files and units set is one a setting reads, secrets stay in the root-only file, the hardening
keys are there, the timers and jobs mirror the CronJobs of manifests/base, and the stop timeout covers
the server's drain and grace periods. ``systemd-analyze verify`` / ``calendar`` and ``systemd-sysusers``
run where they are installed (skipped with the reason otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"
BASE = REPO / "manifests" / "base"
MOTLENS = "/opt/motlens/venv/bin/motlens"  # where docs/deploy.md installs the venv
HOST = "testhost"  # what %H expands to here

SERVE = "motlens-serve.service"
DRIFT = "motlens-drift@.service"
PROMOTE = "motlens-promote.service"
SERVICES = (SERVE, DRIFT, PROMOTE)
INSTANCES = ("production", "canary")
#: timer → (the unit it starts, the CronJob it mirrors)
TIMERS = {
    "motlens-drift@production.timer": ("motlens-drift@production.service", "cronjob-drift.yaml"),
    "motlens-drift@canary.timer": ("motlens-drift@canary.service", "cronjob-drift-canary.yaml"),
    "motlens-promote.timer": (PROMOTE, "cronjob-promotion.yaml"),
}
#: /etc/motlens/<name> as the units read it → the file shipped for it
ENV_FILES = {
    "/etc/motlens/motlens.env": "motlens.env.example",
    "/etc/motlens/secrets.env": "secrets.env.example",
    **{f"/etc/motlens/drift-{i}.env": f"drift-{i}.env" for i in INSTANCES},
}
SECRETS_FILE = "/etc/motlens/secrets.env"
#: variables outside MOTLENS_*/MLFLOW_* that a file may set: library switches in the units (as the
#: Dockerfile's runtime stage sets them) and the S3 keys boto3 reads (secrets file only)
UNIT_LIBRARY_ENV = {
    "XDG_CACHE_HOME", "MPLCONFIGDIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
    "PYTHONDONTWRITEBYTECODE", "DO_NOT_TRACK",
}  # fmt: skip
SECRETS_LIBRARY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
_ASSIGN = re.compile(r"^#?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")  # a commented setting is "#NAME=value"


# ------------------------------------------------------------------ reading units


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section → key → every value assigned, in order (systemd's repeated keys; comments dropped)."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):  # continuation lines
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        assert section is not None, f"assignment outside a section: {line}"
        key, _, value = line.partition("=")
        out[section][key.strip()].append(value.strip())
    return out


def expand(value: str, instance: str | None = None) -> str:
    """systemd specifiers the units use: %i (instance), %H (host name), %% (a percent sign)."""

    def sub(m: re.Match[str]) -> str:
        spec = m.group(1)
        if spec == "i" and instance is not None:
            return instance
        if spec == "H":
            return HOST
        if spec == "%":
            return "%"
        raise AssertionError(f"unexpected specifier %{spec} in {value!r}")

    return re.sub(r"%(.)", sub, value)


def service(name: str, instance: str | None = None) -> dict[str, dict[str, list[str]]]:
    """A service with its drop-ins (``<unit>.d/*.conf``, for an instance also the template's and its own)."""
    unit = parse_unit((UNITS / name).read_text())
    dirs = [UNITS / f"{name}.d"]
    if instance is not None:
        dirs.append(UNITS / f"{name.replace('@.', f'@{instance}.')}.d")
    for d in dirs:
        for conf in sorted(d.glob("*.conf")) if d.is_dir() else []:
            for section, keys in parse_unit(conf.read_text()).items():
                for key, values in keys.items():
                    unit[section][key].extend(values)
    return unit


def last(unit: dict, key: str, section: str = "Service") -> str | None:
    values = unit[section].get(key, [])
    return values[-1] if values else None


def environment(unit: dict, instance: str | None = None) -> dict[str, str]:
    """Environment= assignments of a unit (later ones win)."""
    env: dict[str, str] = {}
    for line in unit["Service"].get("Environment", []):
        for item in shlex.split(expand(line, instance)):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def env_file(name: str, include_commented: bool = False) -> dict[str, str]:
    """The assignments of a shipped env file; commented ones (``#NAME=value``) too if asked."""
    out = {}
    for line in (UNITS / name).read_text().splitlines():
        m = _ASSIGN.match(line.strip())
        if m and (include_commented or not line.lstrip().startswith("#")):
            out[m.group(1)] = m.group(2)
    return out


def env_files_of(unit: dict, instance: str | None = None) -> list[tuple[str, bool]]:
    """(path, required) of each EnvironmentFile=, in order."""
    out = []
    for value in unit["Service"].get("EnvironmentFile", []):
        value = expand(value, instance)
        out.append((value.lstrip("-"), not value.startswith("-")))
    return out


def effective_env(unit: dict, instance: str | None = None) -> dict[str, str]:
    """What the process sees: Environment= first, then the env files in order (systemd's precedence)."""
    env = environment(unit, instance)
    for path, _ in env_files_of(unit, instance):
        env.update(env_file(ENV_FILES[path]))
    return env


def exec_argv(unit: dict, instance: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """ExecStart as systemd runs it: specifiers, then ``${NAME}`` words from the unit's environment
    (``env``: another one, e.g. an env file that moves MOTLENS_HOME)."""
    (line,) = unit["Service"]["ExecStart"]
    env = effective_env(unit, instance) if env is None else env

    def var(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"ExecStart uses ${{{m.group(1)}}}, which the unit does not set"
        return env[m.group(1)]

    return [re.sub(r"\$\{(\w+)\}", var, word) for word in shlex.split(expand(line, instance))]


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse ``motlens`` arguments with the real parser, without running the command."""
    from motlens.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"motlens rejects {shlex.join(argv)} (exit {e.code})") from None


def seconds(span: str) -> float:
    """A systemd time span (``120``, ``2min``, ``1min 30s``, ``500ms``) in seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == span.replace(" ", ""), f"not a time span: {span}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def cronjob(name: str) -> dict:
    return yaml.safe_load((BASE / name).read_text())


def _known_motlens_env() -> set[str]:
    """Every MOTLENS_* name a setting reads (motlens/envcheck.py's registry), every class loaded."""
    import importlib

    from motlens.envcheck import OTHER, SETTINGS
    from motlens.errors import env_names

    known = set(OTHER)
    for target in SETTINGS.values():
        module, cls = target.split(":")
        known |= {n.upper() for names in env_names(getattr(importlib.import_module(module), cls)).values()
                  for n in names}  # fmt: skip
    return known


def _mlflow_env() -> set[str]:
    import mlflow.environment_variables as ev

    return {v.name for v in vars(ev).values() if isinstance(getattr(v, "name", None), str)}


def _secret_env() -> set[str]:
    """The variables of every SecretStr setting (the ClickHouse password, the admin tokens, …)."""
    import importlib

    from pydantic import SecretStr

    from motlens.envcheck import SETTINGS
    from motlens.errors import env_names

    out = set()
    for target in SETTINGS.values():
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        names = env_names(cls)
        for field, info in cls.model_fields.items():
            if "SecretStr" in repr(info.annotation) or info.annotation is SecretStr:
                out |= {n.upper() for n in names[field]}
    return out


# ------------------------------------------------------------------ the files are there


def test_the_shipped_files() -> None:
    shipped = {p.relative_to(UNITS).as_posix() for p in UNITS.rglob("*") if p.is_file()}
    expected = {
        *SERVICES, *TIMERS, *ENV_FILES.values(), "motlens.sysusers.conf",
        "motlens-serve.service.d/gpu.conf", "motlens-drift@canary.service.d/deadline.conf",
    }  # fmt: skip
    assert shipped == expected, (
        f"new or missing files (add them to this test and to docs/deploy.md): {shipped ^ expected}"
    )


def test_docs_name_every_shipped_file() -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    for name in (*SERVICES, *TIMERS, *ENV_FILES.values(), "motlens.sysusers.conf", "gpu.conf", "deadline.conf"):
        assert name in text, f"docs/deploy.md does not mention {name}"


# ------------------------------------------------------------------ ExecStart: the real CLI


def test_serve_exec_start_parses_and_follows_production() -> None:
    from predictor.settings import DEFAULT_MODEL_REF

    argv = exec_argv(service(SERVE))
    assert argv[0] == MOTLENS
    args = parse_cli(argv[1:])
    assert args.command == "serve"
    assert args.model == DEFAULT_MODEL_REF and args.follow_alias == "production"
    assert args.admin_enabled is True, "motlens promote --target local drives the admin API"
    # without --canary a restarted server restores the canary the registry records (docs/predictor.md)
    assert args.canary is None and args.canary_percent is None
    assert not args.no_predlog


@pytest.mark.parametrize("instance", INSTANCES)
def test_drift_exec_start_parses_with_an_output_per_instance(instance: str) -> None:
    unit = service(DRIFT, instance)
    argv = exec_argv(unit, instance)
    assert argv[0] == MOTLENS
    args = parse_cli(argv[1:])
    assert args.command == "drift"
    home = Path(effective_env(unit, instance)["MOTLENS_HOME"])
    # one run per output directory: the two instances must not share one
    assert Path(args.output) == home / "drift" / instance
    # under the MOTLENS_HOME an env file sets, where docs/deploy.md says summary.json is
    moved = {**effective_env(unit, instance), "MOTLENS_HOME": "/srv/motlens"}
    assert Path(parse_cli(exec_argv(unit, instance, moved)[1:]).output) == Path("/srv/motlens/drift") / instance


def test_promote_exec_start_parses_as_auto_on_the_local_target() -> None:
    argv = exec_argv(service(PROMOTE))
    assert argv[0] == MOTLENS
    args = parse_cli(argv[1:])
    assert (args.command, args.verb, args.target) == ("promote", "auto", "local")
    assert not args.dry_run and not args.force


def test_a_renamed_flag_fails_the_parse() -> None:
    argv = exec_argv(service(SERVE))
    with pytest.raises(AssertionError, match="motlens rejects"):
        parse_cli([a.replace("--follow-alias", "--follow") for a in argv[1:]])


# ------------------------------------------------------------------ environment


def _all_env_names() -> dict[str, set[str]]:
    """file or unit → the names it assigns (env files: commented ones too)."""
    out = {name: set(env_file(name, include_commented=True)) for name in ENV_FILES.values()}
    for name in SERVICES:
        for instance in INSTANCES if "@" in name else (None,):
            out[f"{name}[{instance}]"] = set(environment(service(name, instance), instance))
    out["gpu.conf"] = set(environment(parse_unit((UNITS / "motlens-serve.service.d" / "gpu.conf").read_text())))
    return out


def test_every_variable_is_one_a_setting_reads() -> None:
    from motlens.envcheck import unknown_env

    known, mlflow = _known_motlens_env(), _mlflow_env()
    assert "MOTLENS_SERVE_DRAIN_SECONDS" not in known and "MOTLENS_SERVE_DRAIN_S" in known  # the check bites
    problems = []
    for where, names in _all_env_names().items():
        other = SECRETS_LIBRARY_ENV if where == "secrets.env.example" else UNIT_LIBRARY_ENV if "[" in where else set()
        for name in sorted(names):
            if name.startswith("MOTLENS_"):
                ok = name in known
            elif name.startswith("MLFLOW_"):
                ok = name in mlflow
            else:
                ok = name in other
            if not ok:
                problems.append(f"{where}: {name}")
        # and what every motlens command warns about at start
        problems += [f"{where}: {n} (envcheck)" for n, _ in unknown_env({n: "x" for n in names})]
    assert not problems, problems


def test_secrets_only_in_the_root_only_file() -> None:
    secrets = _secret_env()
    assert {"MOTLENS_SERVE_ADMIN_TOKEN", "MOTLENS_PROMOTE_LOCAL_TOKEN", "MOTLENS_CLICKHOUSE_PASSWORD"} <= secrets
    for where, names in _all_env_names().items():
        if where != "secrets.env.example":
            assert not names & secrets, f"{where} sets a secret: {sorted(names & secrets)}"
    in_secrets = set(env_file("secrets.env.example", include_commented=True))
    assert {"MOTLENS_SERVE_ADMIN_TOKEN", "MOTLENS_PROMOTE_LOCAL_TOKEN", "MOTLENS_CLICKHOUSE_PASSWORD"} <= in_secrets
    assert not env_file("secrets.env.example"), "the example must not carry a value: each box makes its own"
    assert "install -m 0600 -o root -g root" in (UNITS / "secrets.env.example").read_text()
    for name in SERVICES:
        instance = "production" if "@" in name else None
        unit = service(name, instance)
        assert (SECRETS_FILE, False) in env_files_of(unit, instance), f"{name} does not read {SECRETS_FILE}"
        line = " ".join(unit["Service"]["ExecStart"]).lower()
        assert not any(word in line for word in ("token", "password", "secret")), f"{name}: a secret in argv"


@pytest.mark.parametrize("name", SERVICES)
def test_env_files_the_units_read_are_shipped(name: str) -> None:
    for instance in INSTANCES if "@" in name else (None,):
        for path, required in env_files_of(service(name, instance), instance):
            assert path in ENV_FILES, f"{name}: EnvironmentFile {path} has no example in deploy/systemd"
            assert required == (path != SECRETS_FILE), f"{name}: {path} required={required}"


# ------------------------------------------------------------------ hardening and user


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "UMask": "0027",
}


def _sysuser() -> tuple[str, str]:
    (line,) = [ln for ln in (UNITS / "motlens.sysusers.conf").read_text().splitlines() if ln.startswith("u ")]
    fields = shlex.split(line)
    return fields[1], fields[4]  # name, home


@pytest.mark.parametrize("name", SERVICES)
def test_hardening_and_a_static_user(name: str) -> None:
    unit = parse_unit((UNITS / name).read_text())  # the base file: drop-ins may relax it (gpu.conf)
    missing = {k: v for k, v in HARDENING.items() if last(unit, k) != v}
    assert not missing, f"{name}: hardening keys missing or different: {missing}"
    assert set((last(unit, "RestrictAddressFamilies") or "").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    user, home = _sysuser()
    assert last(unit, "User") == user and last(unit, "Group") == user and user != "root"
    assert last(unit, "DynamicUser") in (None, "no"), "a static user keeps MOTLENS_HOME's owner stable"


@pytest.mark.parametrize("name", SERVICES)
def test_motlens_home_is_writable_under_protect_system_strict(name: str) -> None:
    for instance in INSTANCES if "@" in name else (None,):
        unit = service(name, instance)
        writable = [Path("/var/lib") / d for d in " ".join(unit["Service"].get("StateDirectory", [])).split()]
        writable += [Path("/var/cache") / d for d in " ".join(unit["Service"].get("CacheDirectory", [])).split()]
        writable += [Path(p.lstrip("-")) for v in unit["Service"].get("ReadWritePaths", []) for p in v.split()]
        env = effective_env(unit, instance)

        def ok(path: str, writable: list[Path] = writable) -> bool:
            return any(Path(path) == w or Path(path).is_relative_to(w) for w in writable)

        for var in ("MOTLENS_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
            assert ok(env[var]), f"{name}: {var}={env[var]} is read-only under ProtectSystem=strict ({writable})"
        assert ok(last(unit, "WorkingDirectory") or "/"), f"{name}: WorkingDirectory is not writable"
        assert Path(env["MOTLENS_HOME"]) == Path(_sysuser()[1]), "the user's home is MOTLENS_HOME"


def test_the_gpu_drop_in_opens_the_nvidia_devices_only() -> None:
    conf = parse_unit((UNITS / "motlens-serve.service.d" / "gpu.conf").read_text())
    assert last(conf, "PrivateDevices") == "no" and last(conf, "DevicePolicy") == "closed"
    assert conf["Service"]["DeviceAllow"] == ["char-nvidia* rw"]
    # the settings of the GPU overlay (manifests/overlays/gpu/gpu.yaml)
    overlay: dict[str, str] = {}
    tested: dict[str, str] = {}
    for op in yaml.safe_load((REPO / "manifests" / "overlays" / "gpu" / "gpu.yaml").read_text()):
        path = op["path"]
        if op["op"] == "test" and path.endswith("/name"):
            tested[path.rsplit("/", 1)[0]] = op["value"]
        elif op["op"] == "replace" and path.endswith("/value") and path.rsplit("/", 1)[0] in tested:
            overlay[tested[path.rsplit("/", 1)[0]]] = op["value"]
        elif op["op"] == "add" and path.endswith("/env/-"):
            overlay[op["value"]["name"]] = op["value"]["value"]
    assert overlay and environment(conf) == {k: v for k, v in overlay.items() if k.startswith("MOTLENS_SERVE_")}


# ------------------------------------------------------------------ serve: start, stop, restart


def test_serve_stop_timeout_exceeds_drain_and_grace(monkeypatch) -> None:
    from predictor.settings import ServeSettings

    unit = service(SERVE)
    for key in list(os.environ):
        if key.startswith("MOTLENS_"):
            monkeypatch.delenv(key)
    for key, value in effective_env(unit).items():
        monkeypatch.setenv(key, value)
    settings = ServeSettings()
    # listener: drain_s then grace_period_s; then the prediction log's close gets another grace period
    needed = settings.drain_s + 2 * settings.grace_period_s
    stop = seconds(last(unit, "TimeoutStopSec") or "")
    assert stop > needed, f"TimeoutStopSec={stop}s would SIGKILL a drain that may take {needed}s"
    assert last(unit, "KillSignal") == "SIGTERM" and last(unit, "KillMode") == "mixed"
    assert seconds("1min 30s") == 90 and seconds("120") == 120  # the span parser


def test_serve_restarts_on_failure_but_not_on_a_bad_setting() -> None:
    unit = service(SERVE)
    assert last(unit, "Restart") == "on-failure"
    # exit 2: a bad setting or a spool owned by another process (docs/predictor.md): a restart repeats it
    assert "2" in (last(unit, "RestartPreventExitStatus") or "").split()


def test_serve_type_matches_what_the_server_implements() -> None:
    """Type=notify only if the server sends READY=1 (it does not: check, don't invent)."""
    kind = last(service(SERVE), "Type")
    sources = [p for d in ("predictor", "motlens") for p in (REPO / d).rglob("*.py")]
    notifies = any("NOTIFY_SOCKET" in p.read_text() or "sd_notify" in p.read_text() for p in sources)
    assert kind == ("notify" if notifies else "exec")


# ------------------------------------------------------------------ jobs: timers mirror the CronJobs


def _cron_minutes(schedule: str) -> set[int]:
    minute, *rest = schedule.split()
    assert rest == ["*"] * 4, f"only minute schedules are mirrored: {schedule}"
    if minute.startswith("*/"):
        return set(range(0, 60, int(minute[2:])))
    return {int(m) for m in minute.split(",")}


def _calendar_minutes(spec: str) -> set[int]:
    m = re.fullmatch(r"\*-\*-\* \*:(\d\d)(?:/(\d+))?:00", spec)
    assert m, f"OnCalendar={spec}: only '*-*-* *:MM:00' and '*-*-* *:MM/N:00' are mirrored"
    start, step = int(m.group(1)), m.group(2)
    return set(range(start, 60, int(step))) if step else {start}


@pytest.mark.parametrize("timer", TIMERS)
def test_timers_fire_when_the_cronjobs_do(timer: str) -> None:
    unit_name, job = TIMERS[timer]
    unit = parse_unit((UNITS / timer).read_text())
    (spec,) = unit["Timer"]["OnCalendar"]
    cron = cronjob(job)
    assert _calendar_minutes(spec) == _cron_minutes(cron["spec"]["schedule"])
    assert last(unit, "Unit", "Timer") in (None, unit_name)
    assert last(unit, "WantedBy", "Install") == "timers.target"


@pytest.mark.parametrize("timer", TIMERS)
def test_systemd_analyze_calendar_agrees(timer: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: OnCalendar checked by form only")
    (spec,) = parse_unit((UNITS / timer).read_text())["Timer"]["OnCalendar"]
    cron = cronjob(TIMERS[timer][1])
    out = subprocess.run([analyze, "calendar", "--iterations=12", spec], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    minutes = {int(t.split(":")[1]) for t in re.findall(r"(?:Next elapse|Iter\. #\d+): \S+ \S+ (\d\d:\d\d:\d\d)",
                                                          out.stdout)}  # fmt: skip
    assert minutes == _cron_minutes(cron["spec"]["schedule"]), out.stdout


@pytest.mark.parametrize("timer", TIMERS)
def test_job_services_are_oneshots_within_the_cronjobs_deadline(timer: str) -> None:
    unit_name, job = TIMERS[timer]
    instance = unit_name.split("@", 1)[1].split(".")[0] if "@" in unit_name else None
    unit = service(DRIFT if instance else unit_name, instance)
    # a oneshot is "activating" while it runs: a tick meanwhile joins the run (concurrencyPolicy: Forbid)
    assert last(unit, "Type") == "oneshot"
    cron = cronjob(job)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert seconds(last(unit, "TimeoutStartSec") or "0") == deadline


def _cron_env(cron: dict) -> dict[str, str]:
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _cron_args(cron: dict) -> list[str]:
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


@pytest.mark.parametrize("instance", INSTANCES)
def test_drift_instances_configure_what_the_cronjobs_do(instance: str, monkeypatch) -> None:
    """The effective DriftSettings (env + flags, as `motlens drift` builds them) equal the CronJob's."""
    from drift import cli as drift_cli
    from drift.settings import DriftSettings

    def settings(env: dict[str, str], argv: list[str]) -> dict:
        for key in list(os.environ):
            if key.startswith("MOTLENS_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        args = parse_cli(argv)
        dests = [dest for _, dest, _ in drift_cli._FLAGS] + ["canary", "html", "progress", "log_artifact"]
        dumped = DriftSettings(**{d: getattr(args, d) for d in dests if getattr(args, d) is not None}).model_dump()
        return {k: v for k, v in dumped.items() if k not in ("output", "pushgateway", "textfile")}

    job = "cronjob-drift.yaml" if instance == "production" else "cronjob-drift-canary.yaml"
    cron = cronjob(job)
    unit = service(DRIFT, instance)
    ours = settings(effective_env(unit, instance), exec_argv(unit, instance)[1:])
    theirs = settings(_cron_env(cron), _cron_args(cron))
    assert ours == theirs
    assert ours["canary"] is (instance == "canary") and ours["verdict_exit_codes"] is False


def test_promote_mirrors_the_cronjob_but_on_the_local_target() -> None:
    cron = cronjob("cronjob-promotion.yaml")
    unit = service(PROMOTE)
    ours, theirs = vars(parse_cli(exec_argv(unit)[1:])), vars(parse_cli(_cron_args(cron)))
    assert (ours.pop("target"), theirs.pop("target")) == ("local", "k8s")
    assert {k: v for k, v in ours.items() if k != "func"} == {k: v for k, v in theirs.items() if k != "func"}
    assert environment(unit)["MOTLENS_PROMOTE_ACTOR"] == f"systemd/motlens-promote@{HOST}"


# ------------------------------------------------------------------ systemd's own checks


def _verify_tree(tmp_path: Path) -> tuple[Path, str]:
    """A copy of deploy/systemd whose ExecStart names an executable that exists here."""
    real = Path(sys.executable).with_name("motlens")
    exe = str(real if real.is_file() and os.access(real, os.X_OK) else Path(sys.executable))
    tree = tmp_path / "units"
    shutil.copytree(UNITS, tree)
    for path in tree.rglob("*"):
        if path.is_file():
            path.write_text(path.read_text().replace(MOTLENS, exe))
    return tree, exe


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    tree, _ = _verify_tree(tmp_path)
    names = [SERVE, PROMOTE, *TIMERS, *(f"motlens-drift@{i}.service" for i in INSTANCES)]
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tree}:", "SYSTEMD_LOG_LEVEL": "notice"}

    def verify(units: list[str]) -> tuple[int, list[str]]:
        out = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True, env=env,
                             timeout=120)  # fmt: skip
        lines = (out.stdout + out.stderr).splitlines()
        return out.returncode, [ln for ln in lines if str(tree) in ln or any(n in ln for n in units)]

    rc, complaints = verify(names)
    assert rc == 0 and not complaints, "\n".join(complaints)
    # the drop-ins are read (a bad key in one is reported), so the check above covers them too
    gpu = tree / "motlens-serve.service.d" / "gpu.conf"
    gpu.write_text(gpu.read_text() + "ProtectSystem=strikt\n")
    rc, complaints = verify([SERVE])
    assert any("strikt" in ln for ln in complaints), complaints


def test_systemd_sysusers_accepts_the_user(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    out = subprocess.run([sysusers, "--dry-run", f"--root={tmp_path}", str(UNITS / "motlens.sysusers.conf")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"Creating user '{_sysuser()[0]}'" in out.stdout + out.stderr
