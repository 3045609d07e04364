"""`motlens promote` from the command line: bad input gets a clear error and changes nothing; the
audit (actor, events, tags) and the exported metrics follow each action."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest
from promotion_support import REPO, log_traffic, make_env

from motlens.cli import main

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture
def env(registry, tiny_bundle, tmp_path, monkeypatch):
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61])
    monkeypatch.setenv("MOTLENS_PROMOTE_TARGET", "gitops")
    monkeypatch.setenv("MOTLENS_PROMOTE_MANIFESTS_DIR", str(env.manifests))
    monkeypatch.setenv("MOTLENS_PROMOTE_GOLDEN_CHECK", "false")
    monkeypatch.setenv("MOTLENS_PROMOTE_ACTOR", "alice")
    return env


def _snapshot(env):
    return (env.manifests / "overlays" / "cpu" / "rollout.yaml").read_text(), env.registry.aliases()


BAD_INPUT = [
    (["canary", "start", "99", "--percent", "10"], "version 99 of registered model 'mot-defects' does not exist"),
    (["canary", "start", "--percent", "10"], "no 'candidate' alias"),
    (["canary", "set", "20"], "no canary is running"),
    (["advance"], "no canary is running"),
    (["rollback"], "no canary to roll back"),
    (["promote"], "no canary to promote"),
    (["promote", "2"], "version 1 is in production"),
    (["canary", "start", "2", "--percent", "10", "--steps", "50,10"], "steps must rise"),
    (
        ["canary", "start", "2", "--percent", "10", "--overlay", "arm"],
        "has no kustomization.yaml (--manifests-dir or MOTLENS_PROMOTE_MANIFESTS_DIR: ",
    ),
    (
        ["canary", "start", "2", "--percent", "10", "--paired-confidence", "1.5"],
        "bad setting: --paired-confidence: Input should be less than 1",
    ),
]


def test_bad_input_is_a_clear_error_and_changes_nothing(env, capsys):
    assert main(["promote", "promote", "1", "--force"]) == 0
    before = _snapshot(env)
    for argv, message in BAD_INPUT:
        capsys.readouterr()
        assert main(["promote", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert _snapshot(env) == before, argv


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["canary", "start", "2", "--percent", "150"],
            "argument --percent: must be a whole number from 0 to 100, got '150'",
        ),
        (["canary", "set", "--", "-5"], "argument percent: must be a whole number from 0 to 100, got '-5'"),
        (["canary", "set", "12.5"], "argument percent: must be a whole number from 0 to 100, got '12.5'"),
    ],
)
def test_a_canary_share_out_of_range_is_refused_by_its_argument(env, capsys, argv, message):
    """These were refused only once the promoter ran, without naming the argument."""
    before = _snapshot(env)
    with pytest.raises(SystemExit) as exc:
        main(["promote", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert _snapshot(env) == before


def test_a_missing_registry_is_a_clear_error_and_is_not_created(env, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/missing/mlflow.db")
    assert main(["promote", "status"]) == 2
    err = capsys.readouterr().err
    assert "missing/mlflow.db does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()


UNREACHABLE = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_no_cluster_access_is_a_clear_error(env, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    for argv in (["status"], ["canary", "start", "2", "--percent", "10"]):
        assert main(["promote", *argv, "--target", "k8s"]) == 2
        err = capsys.readouterr().err
        assert "no cluster access" in err and "Traceback" not in err
    (tmp_path / "kubeconfig").write_text(UNREACHABLE)  # a kubeconfig whose API server does not answer
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    for argv in (["canary", "start", "2", "--percent", "10"], ["auto"], ["rollback"], ["status"]):
        assert main(["promote", *argv, "--target", "k8s"]) == 2, argv
        err = capsys.readouterr().err
        assert "no cluster access" in err and "Traceback" not in err
    assert env.registry.aliases() == {}


def test_actions_audit_and_metrics(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns when not on a terminal
    prom = tmp_path / "promotion.prom"
    assert main(["promote", "promote", "1", "--force", "--textfile", str(prom)]) == 0
    text = prom.read_text()
    assert 'motlens_registry_alias_info{alias="production",version="1"} 1.0' in text
    assert "motlens_canary_percent 0.0" in text and "motlens_promotion_last_run_timestamp_seconds" in text

    before = _snapshot(env)
    capsys.readouterr()
    assert main(["promote", "canary", "start", "2", "--percent", "10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"canaryTrafficPercent": 10' in out and "dry run" in out
    assert _snapshot(env) == before

    assert main(["promote", "canary", "start", "2", "--percent", "10", "--textfile", str(prom)]) == 0
    assert "motlens_canary_percent 10.0" in prom.read_text()
    assert 'motlens_registry_alias_info{alias="canary",version="2"} 1.0' in prom.read_text()
    log_traffic("2", "canary", 30, errors=3)
    capsys.readouterr()
    assert main(["promote", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["aliases"] == {"production": "1", "canary": "2"}
    [counted] = [r for r in status["live_requests"] if r["model_version"] == "2"]  # what the live gate tests
    assert (counted["requests"], counted["failed_requests"], counted["items"]) == (30, 3, 30)
    assert not [k for k in counted if k.endswith(("latencies", "_texts"))]  # the samples stay out of status
    assert status["live"]["percent"] == 10 and status["disagreements"] == []
    assert status["tag_disagreements"] == []  # tags and aliases tell one story after motlens' own steps
    assert [e["action"] for e in status["events"]][:3] == ["canary_start", "canary_start", "deploy"]
    assert status["events"][0]["actor"] == "alice" and status["events"][1]["dry_run"]
    assert main(["promote", "status"]) == 0
    table = capsys.readouterr().out
    assert "production v1 at 90%, canary v2 at 10%" in table and "agree" in table
    assert "30 requests (30 rows), 3 failed (10.00%)" in table
    # the maps' counts are numbers, as `motlens log stats --json` gives them (status printed "27")
    [stats] = [s for s in status["live_stats"] if s["model_version"] == "2"]
    assert stats["section_counts"] == {"1 Brakes": 27} and stats["severity_counts"] == {"major": 27}
    assert main(["log", "stats", "--json"]) == 0
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [same] = [s for s in logged if s["model_version"] == "2"]
    assert (same["section_counts"], same["severity_counts"]) == (stats["section_counts"], stats["severity_counts"])

    # the gates refuse a step without evidence (exit 3), and the refusal is on record
    assert main(["promote", "advance"]) == 3
    assert "live: wait" in capsys.readouterr().err
    tags = env.registry.resolve("2").tags
    assert tags["promotion.last_action"] == "advance" and tags["promotion.last_success"] == "false"
    assert tags["promotion.last_actor"] == "alice"
    assert main(["promote", "rollback", "--reason", "not today"]) == 0
    assert env.registry.resolve("2").tags["promotion.rejected_reason"] == "not today"


def test_status_names_tags_that_contradict_an_alias_moved_by_hand(env, capsys, monkeypatch):
    """After a rollback rejected version 2, someone pointed ``production`` at it by hand (a follower
    serves it): the tags still said 1 is production and 2 rejected, and ``status`` printed nothing."""
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["promote", "promote", "1", "--force"]) == 0
    assert main(["promote", "canary", "start", "2", "--percent", "10"]) == 0
    assert main(["promote", "rollback", "--reason", "bad canary"]) == 0
    env.registry.set_alias("production", "2")  # outside motlens (MlflowClient, the UI)
    capsys.readouterr()
    assert main(["promote", "status", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)["tag_disagreements"]
    assert said == [
        "alias production names version 2, tagged promotion.status=rejected: moved outside motlens? "
        "(a server following it serves it; see its follow event)",
        "version 1 is tagged promotion.status=production, but alias production names version 2",
    ]
    assert main(["promote", "status"]) == 0
    assert "registry tags vs aliases" in capsys.readouterr().out


def test_promoted_retired_and_rejected_versions_are_no_longer_canaries(env):
    """After a rollback the rejected version kept its last canary share (50 % on a version serving
    nothing); a promoted one kept its share too. The ``candidate`` alias stays where it was: ``auto``
    and ``canary start`` name the rejected candidate and refuse it."""
    assert main(["promote", "promote", "1", "--force"]) == 0
    env.registry.set_alias("candidate", "2")
    assert main(["promote", "canary", "start", "2", "--percent", "10"]) == 0
    assert main(["promote", "rollback", "--reason", "bad canary"]) == 0
    assert env.registry.aliases().get("candidate") == "2"
    tags = env.registry.resolve("2").tags
    assert (tags["promotion.status"], tags["promotion.canary_percent"]) == ("rejected", "0")
    assert main(["promote", "canary", "start", "2", "--percent", "10", "--force"]) == 0
    assert main(["promote", "promote", "--force"]) == 0
    promoted, retired = env.registry.resolve("2").tags, env.registry.resolve("1").tags
    assert (promoted["promotion.status"], promoted["promotion.canary_percent"]) == ("production", "0")
    assert (retired["promotion.status"], retired["promotion.canary_percent"]) == ("retired", "0")
    assert main(["promote", "rollback", "--force"]) == 0  # production back to 1; 2 rejected
    rejected = env.registry.resolve("2").tags
    assert (rejected["promotion.status"], rejected["promotion.canary_percent"]) == ("rejected", "0")


def test_status_exits_2_when_the_live_state_cannot_be_read(env, capsys, monkeypatch):
    """The local target's unreachable server was exit 0 (the k8s target's, 2): 2 is "no access" for both."""
    from conftest import free_port

    monkeypatch.setenv("COLUMNS", "250")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["promote", "status", "--target", "local", "--local-url", url]) == 2
    out, err = capsys.readouterr()
    assert "unreadable: cannot reach local motlens serve" in out and "versions" in out  # what could be read
    assert err.startswith("motlens promote: live state unreadable: cannot reach") and err.count("\n") == 1
    assert main(["promote", "status", "--target", "local", "--local-url", url, "--json"]) == 2
    status = json.loads(capsys.readouterr().out)
    assert status["live"] is None and status["live_error"] and len(status["versions"]) == 2


def test_status_names_a_bad_prediction_log_setting_by_its_variable(env, capsys, monkeypatch):
    """It showed pydantic's whole multi-line error (field name, error URL) in the table and the JSON."""
    monkeypatch.setenv("MOTLENS_PREDLOG_TTL_DAYS", "0")
    main(["promote", "status", "--json"])
    error = json.loads(capsys.readouterr().out)["predlog_error"]
    assert error == "MOTLENS_PREDLOG_TTL_DAYS: Input should be greater than or equal to 1", error


def test_status_marks_dry_runs_and_tells_refusals_from_failures(env, capsys, monkeypatch):
    """`status` listed a dry run ("rollback 2→1 by … auto: drift: …") as if it had happened, and a gate's
    refusal as "(failed)", the word an error gets."""
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["promote", "promote", "1", "--force"]) == 0
    assert main(["promote", "canary", "start", "2", "--percent", "10", "--dry-run"]) == 0
    assert main(["promote", "canary", "start", "2", "--percent", "10"]) == 0
    assert main(["promote", "advance"]) == 3  # no live evidence yet: the gates refuse
    assert main(["promote", "rollback", "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["promote", "status"]) == 0
    events = [line for line in capsys.readouterr().out.splitlines() if "│ event " in line]
    said = [line.split("│")[2].strip() for line in events]
    assert said[0] == "rollback 2→1 by alice (dry run) manual rollback", said
    assert said[1].startswith("advance 1→2 by alice (refused) gates wait: "), said
    assert said[2] == "canary_start 1→2 by alice", said
    assert said[3] == "canary_start 1→2 by alice (dry run)", said
    assert said[4] == "deploy 1→1 by alice", said
    assert main(["promote", "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["events"]
    assert [(e["action"], e["dry_run"], e["success"]) for e in rows] == [
        ("rollback", True, True), ("advance", False, False), ("canary_start", False, True),
        ("canary_start", True, True), ("deploy", False, True),
    ]  # fmt: skip
    assert json.loads(rows[1]["details"])["refused"] is True and "refused" not in json.loads(rows[2]["details"])


def test_a_server_without_the_admin_api_is_named_with_the_fix(env, tiny_server, capsys):
    """`motlens serve` without --admin answers the admin routes 404: `status` and `canary start` exited 2
    with "GET /motlens/admin/slots … HTTP 404 Not Found" and no hint."""
    _, url = tiny_server  # a real server, admin API off (the default)
    hint = "HTTP 404 Not Found: the predictor's admin API is off; start it with `motlens serve --admin` " \
           "(or MOTLENS_SERVE_ADMIN_ENABLED=true)"  # fmt: skip
    for argv in (["status"], ["canary", "start", "2", "--percent", "10"]):
        assert main(["promote", *argv, "--target", "local", "--local-url", url]) == 2, argv
        err = capsys.readouterr().err
        assert f"GET /motlens/admin/slots on local motlens serve at {url}: {hint}\n" in err, err
        assert err.count("\n") == 1 and err.startswith("motlens promote: "), err


def test_other_admin_api_errors_are_unchanged():
    """Only a 404 for a route the server does not have gets the --admin hint: an admin route's own 404
    (an unknown slot) and a refused token say what the server said."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from promotion.local_target import ADMIN_OFF, LocalTarget
    from promotion.settings import PromoteSettings
    from promotion.targets import TargetError

    answers = {"/motlens/admin/slots": (401, b'{"error": "admin API needs \'Authorization: Bearer <token>\'"}'),
               "/motlens/admin/slots/x/load": (404, b'{"error": "unknown slot \'x\'"}'),
               "/motlens/admin/promote": (404, b'{"error": "Not Found"}')}  # fmt: skip

    class Admin(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            code, body = answers[self.path]
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = LocalTarget(PromoteSettings(target="local", local_url=f"http://127.0.0.1:{server.server_port}"))
        with pytest.raises(TargetError) as e:
            target.read()
        assert str(e.value).endswith(
            "HTTP 401 admin API needs 'Authorization: Bearer <token>' "
            "(set MOTLENS_PROMOTE_LOCAL_TOKEN to the server's MOTLENS_SERVE_ADMIN_TOKEN)"
        )
        wrong = PromoteSettings(target="local", local_url=target.base, local_token="a-token-the-server-does-not-take")
        with pytest.raises(TargetError) as e:
            LocalTarget(wrong).read()
        assert str(e.value).endswith("(MOTLENS_PROMOTE_LOCAL_TOKEN is not the server's MOTLENS_SERVE_ADMIN_TOKEN)")
        with pytest.raises(TargetError) as e:
            target._request("POST", "/motlens/admin/slots/x/load", {"ref": "models:/mot-defects/1"})
        assert str(e.value).endswith("HTTP 404 unknown slot 'x'")
        with pytest.raises(TargetError) as e:
            target._request("POST", "/motlens/admin/promote")
        assert str(e.value).endswith(f"HTTP 404 Not Found: {ADMIN_OFF}")
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_http_cannot_send_is_not_echoed():
    """http.client refuses a header with a control character and quotes it whole: the token went into
    the one-line error."""
    from pydantic import SecretStr

    from promotion.local_target import LocalTarget
    from promotion.settings import PromoteSettings
    from promotion.targets import TargetError

    odd = PromoteSettings.model_construct(local_url="http://127.0.0.1:9", local_token=SecretStr("SECRETtok\nen"))
    with pytest.raises(TargetError) as e:
        LocalTarget(odd).read()
    assert "SECRET" not in str(e.value) and "MOTLENS_PROMOTE_LOCAL_TOKEN" in str(e.value)


def test_credentials_in_the_local_url_are_refused_and_never_echoed(env, capsys, caplog):
    """The URL went into the status title, TargetError messages and audit events, password and all."""
    from promotion.local_target import LocalTarget
    from promotion.settings import PromoteSettings

    for url in ("http://adm:SECRET@127.0.0.1:1", "http://SECRET@127.0.0.1:1", "http://127.0.0.1:1/?token=SECRET"):
        assert main(["promote", "status", "--target", "local", "--local-url", url]) == 2, url
        out, err = capsys.readouterr()
        assert "SECRET" not in out + err + caplog.text, url
        assert "MOTLENS_PROMOTE_LOCAL_TOKEN" in err and err.count("\n") == 1, err
    unchecked = PromoteSettings.model_construct(local_url="http://adm:SECRET@127.0.0.1:1")
    assert "SECRET" not in LocalTarget(unchecked).describe()
    # not a URL at all: named, not urllib's "unknown url type" at the first request
    assert main(["promote", "status", "--target", "local", "--local-url", "notaurl"]) == 2
    assert "an http:// or https:// URL of a `motlens serve --admin`" in capsys.readouterr().err


def test_an_empty_motlens_home_is_the_default_not_the_working_directory(monkeypatch):
    from pathlib import Path

    from motlens.state import StateSettings

    monkeypatch.setenv("MOTLENS_HOME", "")
    assert StateSettings().home == Path(".motlens")


def test_a_registry_write_failure_is_reported_without_mlflow_tracebacks(env, capsys, monkeypatch):
    """MLflow's store logs every SQLAlchemy error with its traceback before raising it: a read-only
    mlflow.db printed ~280 lines, 8 tracebacks, before the command's own lines."""
    assert main(["promote", "promote", "1", "--force"]) == 0
    db = sqlite3.connect(env.registry.tracking_uri.removeprefix("sqlite:///"))
    with db:  # setting an alias now fails with an OperationalError, as a read-only database does
        db.execute("CREATE TRIGGER fail BEFORE INSERT ON registered_model_aliases "
                   "BEGIN INSERT INTO gone VALUES (1); END")  # fmt: skip
    db.close()
    capsys.readouterr()
    assert main(["promote", "canary", "start", "2", "--percent", "10"]) == 1  # the rollout file changed: part-way
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mlflow.store" not in err, err
    assert err.splitlines()[0].startswith("motlens promote: canary_start failed part-way: model registry")
    assert "no such table: main.gone" in err and len(err.splitlines()) == 2, err
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["promote", "status"]) == 0  # an error, not a refusal; the overlay took it: "(partly done)"
    assert "│ canary_start 1→2 by alice (partly done) failed: model registry" in capsys.readouterr().out


def _overlay(env):
    return env.manifests / "overlays" / "cpu"


def test_a_rollout_yaml_that_is_not_a_file_is_one_line_naming_it(env, capsys):
    """kubectl's 10-line klog error (`run.go:72] "command failed" err=<` …) was passed through."""
    rollout = _overlay(env) / "rollout.yaml"
    rollout.unlink()
    rollout.mkdir()
    for argv in (["status"], ["canary", "start", "2", "--percent", "10"]):
        assert main(["promote", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err == f"motlens promote: {rollout} is not a regular file: restore it from git\n", err


@pytest.mark.parametrize(
    ("content", "expected"),
    [  # kubectl writes the first as a multi-line err=<…>, the second on one line as err="…"
        ("- op: [bad\n",
         'trouble configuring builtin PatchTransformer: unable to parse SM or JSON patch from [path: "rollout.yaml"]'),
        ("- {op: replace, path: /spec/nothing/x, value: 1}\n",
         "replace operation does not apply: doc is missing path: /spec/nothing/x: missing value"),
    ],
)  # fmt: skip
def test_a_kustomize_failure_is_its_one_meaningful_line(env, capsys, caplog, content, expected):
    (_overlay(env) / "rollout.yaml").write_text(content)
    with caplog.at_level("DEBUG", logger="promotion.targets"):
        assert main(["promote", "canary", "start", "2", "--percent", "10"]) == 2
    err = capsys.readouterr().err
    assert err == f"motlens promote: kubectl kustomize {_overlay(env)} failed: {expected}\n", err
    assert "run.go" in caplog.text  # kubectl's own text, for -v


def test_a_standalone_kustomize_failure_is_one_line_too():
    from promotion.targets import tool_error

    stderr = ("Error: trouble configuring builtin PatchTransformer with config: `\npath: rollout.yaml\n"
              "target:\n  kind: InferenceService\n`: failed to get the patch file from path(rollout.yaml): "
              "'/m/overlays/cpu/rollout.yaml' must resolve to a file\n")  # fmt: skip
    expected = ("trouble configuring builtin PatchTransformer: failed to get the patch file from path(rollout.yaml): "
                "'/m/overlays/cpu/rollout.yaml' must resolve to a file")  # fmt: skip
    assert tool_error(stderr) == expected


def test_a_write_killed_before_its_rename_leaves_no_temp_file_after_the_next(env):
    """A run killed between writing the temp file and renaming it left `.rollout.yaml.<random>` in the
    overlay for good (and `git add -A` would commit it)."""
    overlay = _overlay(env)
    (overlay / ".rollout.yaml.original").write_text("someone's own file")  # not a temp file: kept
    kill_at_rename = (
        "import os, signal, sys\n"
        "real = os.replace\n"
        "def replace(src, dst, **kw):\n"
        "    if os.path.basename(dst) == 'rollout.yaml':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst, **kw)\n"
        "os.replace = replace\n"
        "from motlens.cli import main\n"
        "sys.exit(main(['promote', 'promote', '1', '--force']))\n"
    )
    child = subprocess.run([sys.executable, "-c", kill_at_rename], env={**os.environ, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    hidden = sorted(p.name for p in overlay.iterdir() if p.name.startswith("."))
    assert len(hidden) == 2 and ".rollout.yaml.original" in hidden  # the killed write's temp file
    assert main(["promote", "promote", "1", "--force"]) == 0
    assert sorted(p.name for p in overlay.iterdir() if p.name.startswith(".")) == [".rollout.yaml.original"]


@pytest.mark.parametrize("flag", ["--textfile", "--pushgateway-url"])
def test_metrics_without_prometheus_client_are_refused_before_any_change(env, capsys, monkeypatch, tmp_path, flag):
    """The change was applied, then the export failed: exit 1, "the change stands, but the audit trail
    is incomplete"."""
    assert main(["promote", "promote", "1", "--force"]) == 0
    before = _snapshot(env)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not installed
    value = str(tmp_path / "promotion.prom") if flag == "--textfile" else "http://127.0.0.1:1"
    capsys.readouterr()
    assert main(["promote", "canary", "start", "2", "--percent", "10", flag, value]) == 2
    assert capsys.readouterr().err == "motlens: prometheus_client is not installed: pip install 'motlens[promote]'\n"
    assert _snapshot(env) == before and not (tmp_path / "promotion.prom").exists()
    assert main(["promote", "status", flag, value]) == 0  # status exports nothing: no need


def test_a_missing_kubernetes_client_is_the_install_hint_like_every_other_extra(env, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # not installed
    assert main(["promote", "status", "--target", "k8s"]) == 2
    assert capsys.readouterr().err == "motlens: kubernetes is not installed: pip install 'motlens[promote]'\n"


@pytest.mark.parametrize("target", ["local", "gitops"])
def test_status_without_a_registry_creates_nothing(capsys, monkeypatch, tmp_path, target):
    """`promote status` on a MOTLENS_HOME that does not exist: exit 2 naming the registry, and the home
    is not created (the local target made it for its lock file, which only a change takes)."""
    home = tmp_path / "emptyhome"
    monkeypatch.setenv("MOTLENS_HOME", str(home))
    for var in ("MLFLOW_TRACKING_URI", "MOTLENS_CLICKHOUSE_URL", "MOTLENS_PROMOTE_TARGET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MOTLENS_PROMOTE_MANIFESTS_DIR", str(REPO / "manifests"))  # read, never written
    assert main(["promote", "status", "--target", target]) == 2
    assert "emptyhome/mlflow.db does not exist" in capsys.readouterr().err
    assert not home.exists()


def test_promote_brings_the_registrys_production_live(env, capsys, monkeypatch):
    """The state `motlens demo` leaves (alias production → 2, the overlay serving another version):
    `promote promote 2` was exit 2, 'version 2 is already production on gitops overlay …' (it served v1)."""
    env.registry.set_alias("production", "2")
    assert main(["promote", "status", "--json"]) == 0
    assert "the registry's 'production' alias is 2" in json.loads(capsys.readouterr().out)["disagreements"][0]
    assert main(["promote", "promote", "2"]) == 0
    assert "deploy" in capsys.readouterr().out
    assert main(["promote", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["disagreements"] == [] and status["live"]["production_version"] == "2"
    before = _snapshot(env)
    assert main(["promote", "promote", "2"]) == 2  # nothing to do
    err = capsys.readouterr().err
    assert err.startswith("motlens promote: version 2 is already production on gitops overlay ")
    assert err.endswith(": it serves it and the registry's 'production' alias names it\n") and _snapshot(env) == before


def test_paired_flags_reach_the_settings():
    import argparse

    from promotion.cli import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    plain = settings_from_args(parser.parse_args(["promote", "auto"]))
    assert plain.paired is True and plain.paired_confidence == 0.9
    flags = settings_from_args(parser.parse_args(["promote", "auto", "--no-paired", "--paired-confidence", "0.8"]))
    assert flags.paired is False and flags.paired_confidence == 0.8
