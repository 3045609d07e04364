from __future__ import annotations

import json
import os

import pytest

from motlens.cli import main


def _use(registry, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))


def test_versions_lists_aliases_and_metrics(registry, tiny_bundle, monkeypatch, capsys):
    _use(registry, monkeypatch)
    assert main(["train", "versions"]) == 0
    assert "no registered versions" in capsys.readouterr().out
    registry.register_bundle(tiny_bundle.root, metrics={"section_macro_f1": 0.9}, params={}, alias="production")
    registry.register_bundle(tiny_bundle.root, metrics={"section_macro_f1": 0.8}, params={}, alias="candidate")
    assert main(["train", "versions", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["aliases"], v["metrics"]["section_macro_f1"]) for v in listed] == [
        ("2", ["candidate"], 0.8),
        ("1", ["production"], 0.9),
    ]
    assert main(["train", "versions"]) == 0
    out = capsys.readouterr().out
    assert "production" in out and "0.900" in out
    assert main(["train", "versions", "--json", "--limit", "1"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == ["2"]


def test_bad_data_arguments_are_clear(registry, monkeypatch, capsys, tmp_path):
    _use(registry, monkeypatch)
    assert main(["train"]) == 2
    assert "give --data DIR or --clickhouse" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--clickhouse"]) == 2  # --data was ignored
    assert "give --data DIR or --clickhouse, not both" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--ch-path", str(tmp_path)]) == 2  # --ch-path was ignored
    assert "--ch-path is the chdb data --clickhouse reads" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty")]) == 2
    assert "no test_result, test_item, item_detail table" in capsys.readouterr().err


def test_unreachable_registry_is_one_line_without_the_password(registry, monkeypatch, capsys, tmp_path):
    """MLflow's own messages carry the full tracking URI: they once reached stderr in a traceback."""
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cretPW@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    assert main(["train", "versions"]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "s3cretPW" not in err and "Traceback" not in err
    (tmp_path / "data").mkdir()
    assert main(["train", "--data", str(tmp_path / "data")]) == 2  # checked before any data or model work
    err = capsys.readouterr().err
    assert "unreachable" in err and "s3cretPW" not in err


def test_a_missing_registry_is_exit_2_and_is_not_created(monkeypatch, capsys, tmp_path):
    """A mistyped sqlite URI must not become a new, empty registry; nor does a failed run create one."""
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/missing/mlflow.db")
    assert main(["train", "versions"]) == 2
    assert "missing/mlflow.db does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_bad_settings_are_exit_2(registry, monkeypatch, capsys, tmp_path):
    _use(registry, monkeypatch)
    assert main(["train", "--data", str(tmp_path), "--epochs", "0"]) == 2
    assert "bad setting: --epochs" in capsys.readouterr().err


def test_settings_training_cannot_use_are_refused_before_any_work(registry, monkeypatch, capsys, tmp_path):
    """Each of these once trained (or loaded the model) first and then failed with a library's message."""
    _use(registry, monkeypatch)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "mine" / "bundle").mkdir(parents=True)
    (tmp_path / "mine" / "bundle" / "notes.txt").write_text("mine")  # deleted by the training before
    cases = [
        (["--seed", "-1"], {}, "bad setting: --seed"),
        (["--split-seed", "-1"], {}, "bad setting: --split-seed"),
        (["--lr", "inf"], {}, "bad setting: --lr"),
        ([], {"MOTLENS_TRAIN_WEIGHT_DECAY": "inf"}, "bad setting: MOTLENS_TRAIN_WEIGHT_DECAY"),
        (["--device", "bogus"], {}, "bad setting: --device"),
        (["--alias", "bad!"], {}, "bad setting: --alias: invalid alias 'bad!': letters, digits"),
        ([], {"MOTLENS_TRAIN_ALIAS": ""}, "bad setting: MOTLENS_TRAIN_ALIAS: invalid alias ''"),
        (["--alias", "v3"], {}, "bad setting: --alias: invalid alias 'v3': MLflow reserves"),
        ([], {"MOTLENS_TRAIN_MODEL_DIR": str(tmp_path / "nowhere")}, "is not a model directory"),
        ([], {"MOTLENS_TRAIN_WORK_DIR": str(tmp_path / "afile")}, "afile is not a directory"),
        (["--work-dir", str(tmp_path / "mine")], {}, "holds bundle/, which a training replaces whole"),
    ]
    for args, env, message in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert main(["train", "--data", str(tmp_path), *args]) == 2, (args, env)
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, env, err)
    assert (tmp_path / "mine" / "bundle" / "notes.txt").read_text() == "mine"


def test_a_version_whose_run_is_gone_still_lists(registry, tiny_bundle, monkeypatch, capsys):
    """A run deleted and garbage-collected (`mlflow gc`) once broke the listing of every version."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    _use(registry, monkeypatch)
    v = registry.register_bundle(tiny_bundle.root, metrics={"section_macro_f1": 0.9}, params={}, alias=None)
    registry.register_bundle(tiny_bundle.root, metrics={"section_macro_f1": 0.8}, params={}, alias=None)
    MlflowClient(tracking_uri=registry.tracking_uri).delete_run(v.run_id)
    mlflow = Path(sys.executable).with_name("mlflow")
    subprocess.run([str(mlflow), "gc", "--backend-store-uri", registry.tracking_uri, "--run-ids", v.run_id],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    assert main(["train", "versions", "--json"]) == 0
    listed = {x["version"]: x["metrics"] for x in json.loads(capsys.readouterr().out)}
    assert listed[v.version] == {} and listed[str(int(v.version) + 1)]["section_macro_f1"] == 0.8


def test_a_bundle_always_carries_a_drift_reference(registry, monkeypatch, capsys, tmp_path):
    _use(registry, monkeypatch)
    monkeypatch.setenv("MOTLENS_TRAIN_REFERENCE_ROWS", "0")  # once a KeyError deep in the data preparation
    assert main(["train", "--data", str(tmp_path)]) == 2
    assert "bad setting: MOTLENS_TRAIN_REFERENCE_ROWS: Input should be" in capsys.readouterr().err


def test_the_printed_artifact_uri_is_one_copyable_line(registry, tiny_bundle, monkeypatch, capsys, tmp_path):
    """A narrow terminal must not wrap the URI (it was split across lines mid-path)."""
    from types import SimpleNamespace

    import training.train

    _use(registry, monkeypatch)
    monkeypatch.setenv("COLUMNS", "40")
    v = registry.register_bundle(tiny_bundle.root, metrics={"section_macro_f1": 0.9}, params={}, alias="candidate")
    fingerprint = {"sha256": "ab" * 32, "rows_labelled": 10, "distinct_texts": 5, "train_texts": 4, "holdout_texts": 1}
    result = SimpleNamespace(version=v, metrics={"section_macro_f1": 0.9}, fingerprint=fingerprint,
                             timings={"total_s": 1.0, "embed_s": 0.5}, floors=None, alias_withheld=None,
                             audit_gaps=[])  # fmt: skip
    monkeypatch.setattr(training.train, "train", lambda *a, **k: result)
    assert main(["train", "--data", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"artifact URI {v.artifact_uri}" in lines and f"run {v.run_id}" in lines


def _settings_seen(registry, monkeypatch) -> list:
    """The TrainSettings each `motlens train` builds, recorded by a train() that stops there (exit 2)."""
    import training.train
    from training.dataset import DataError

    _use(registry, monkeypatch)
    seen = []

    def fake_train(data, settings, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(settings)
        raise DataError("stop here")

    monkeypatch.setattr(training.train, "train", fake_train)
    return seen


def test_split_seed_is_its_own_flag(registry, monkeypatch, tmp_path):
    """One ``--seed`` seeded both the split and the head's initialisation."""
    seen = _settings_seen(registry, monkeypatch)
    assert main(["train", "--data", str(tmp_path), "--seed", "3", "--split-seed", "7"]) == 2
    assert main(["train", "--data", str(tmp_path), "--seed", "4"]) == 2
    assert main(["train", "--data", str(tmp_path), "--split-by", "defect"]) == 2
    assert [(s.seed, s.split_seed, s.split_by) for s in seen] == [(3, 7, "text"), (4, 0, "text"), (0, 0, "defect")]


def test_a_version_below_the_floors_is_registered_without_its_alias_exit_3(registry, tiny_bundle, monkeypatch,
                                                                            capsys, tmp_path):  # fmt: skip
    """Audit finding 3: `motlens train` set `candidate` ("passed offline evaluation") on a shuffled-label model."""
    import training.train as train_mod
    from training.floors import check_floors
    from training.train import TrainResult

    _use(registry, monkeypatch)
    metrics = {"section_macro_f1": 0.09, "severity_macro_f1": 0.247, "fail_auc": 0.5,
               "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.137}  # fmt: skip
    seen = {}

    def fake_train(data, settings, registry, **_):  # noqa: ANN001, ANN003, ANN202 - what train() does after its fit
        seen["settings"] = settings
        floors = check_floors(metrics, margin=settings.floor_margin, auc_margin=settings.floor_auc_margin)
        alias = settings.alias if floors.passed else None
        info = registry.register_bundle(tiny_bundle.root, metrics=metrics, params={}, alias=alias)
        fp = {"sha256": "0" * 64, "rows_labelled": 1, "distinct_texts": 1, "train_texts": 1, "holdout_texts": 0}
        timings = {"total_s": 1.0, "embed_s": 0.5}
        return TrainResult(info, metrics, fp, timings, None, floors, None if floors.passed else settings.alias)

    monkeypatch.setattr(train_mod, "train", fake_train)
    (tmp_path / "data").mkdir()
    assert main(["train", "--data", str(tmp_path / "data")]) == 3
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert line.startswith(
        "motlens train: version 1 registered without alias 'candidate': below the quality floors (exit 3): "
        "section_macro_f1 0.0900 < 0.2490 (baseline 0.0490 + 0.2); severity_macro_f1"
    )
    assert "MOTLENS_TRAIN_FLOOR_MARGIN" in line  # what to do
    assert registry.resolve("1").aliases == [] and seen["settings"].alias_requires_floors
    assert main(["train", "--data", str(tmp_path / "data"), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["alias_withheld"] == "candidate" and out["floors"]["passed"] is False
    assert "severity_macro_f1 0.2470 < 0.3370" in out["floors"]["detail"]
    monkeypatch.setenv("MOTLENS_TRAIN_FLOOR_MARGIN", "0.03")
    monkeypatch.setenv("MOTLENS_TRAIN_FLOOR_AUC_MARGIN", "0")
    assert main(["train", "--data", str(tmp_path / "data")]) == 0
    assert registry.resolve("candidate").version == "3"


def _unpin(registry, version: str) -> str:
    """Make ``version`` look registered before the digest tag existed; its stored bundle.json's sha256."""
    import hashlib
    from pathlib import Path
    from urllib.parse import urlparse

    from training.registry import DIGEST_TAG

    registry.client.delete_model_version_tag("mot-defects", version, DIGEST_TAG)
    stored = Path(urlparse(registry.resolve(version).artifact_uri).path)
    return hashlib.sha256((stored / "bundle.json").read_bytes()).hexdigest()


def test_pin_records_an_older_versions_digest_which_fetches_then_check(registry, tiny_bundle, monkeypatch, capsys):
    """`motlens train pin` gives a version registered before 2026-12-01 its digest tag, marked as set
    later; from then on a re-hashed stored bundle is refused as for a version pinned at registration."""
    from pathlib import Path
    from urllib.parse import urlparse

    from motlens.bundle import BundleError, write_manifest
    from training.registry import DIGEST_TAG, PINNED_LATER_TAG, Registry

    _use(registry, monkeypatch)
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    digest = _unpin(registry, "1")
    assert main(["train", "pin", "production", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"version": "1", "bundle_sha256": digest, "pinned_now": True}
    tags = registry.resolve("1").tags
    assert tags[DIGEST_TAG] == digest
    assert tags[PINNED_LATER_TAG].endswith("Z") and tags[PINNED_LATER_TAG].startswith("20")
    # pinned already: verified and left as it was
    assert main(["train", "pin", "1"]) == 0
    assert (
        f"version 1 was pinned by `motlens train pin` at {tags[PINNED_LATER_TAG]}: bundle.json sha256 {digest} "
        "(verified)" in capsys.readouterr().out
    )
    assert registry.resolve("1").tags[PINNED_LATER_TAG] == tags[PINNED_LATER_TAG]
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)
    assert main(["train", "pin", "2"]) == 0
    assert "version 2 was pinned at registration: bundle.json sha256 " in capsys.readouterr().out
    # a bundle rewritten into a manifest of its own after the pin is refused, by fetch and by pin
    stored = Path(urlparse(registry.resolve("1").artifact_uri).path)
    manifest = json.loads((stored / "bundle.json").read_text())
    weights = stored / "head" / "weights.safetensors"
    weights.write_bytes(b"\0" + weights.read_bytes())
    write_manifest(stored, **{k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(BundleError, match="the registry recorded"):
        Registry(registry.tracking_uri, state=registry.state).fetch("1", dst=registry.state.home / "dl")
    assert main(["train", "pin", "1"]) == 2
    assert "motlens train pin: version 1 refused: stored bundle of mot-defects version 1 refused: " in (
        capsys.readouterr().err
    )


def test_pin_refuses_a_bundle_that_does_not_verify_or_is_not_the_expected_one(
    registry, tiny_bundle, monkeypatch, capsys
):
    from pathlib import Path
    from urllib.parse import urlparse

    from training.registry import DIGEST_TAG

    _use(registry, monkeypatch)
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="candidate")
    digest = _unpin(registry, "1")
    other = "0" * 64
    assert main(["train", "pin", "1", "--sha256", other]) == 2
    err = capsys.readouterr().err
    assert f"version 1 not pinned: its stored bundle.json has sha256 {digest}, not the expected {other}" in err
    with pytest.raises(SystemExit) as exc:  # refused as the command is read, by its flag
        main(["train", "pin", "1", "--sha256", "ABC"])
    assert exc.value.code == 2
    assert "argument --sha256: expected 64 lowercase hex characters, got 'ABC'" in capsys.readouterr().err
    assert DIGEST_TAG not in registry.resolve("1").tags
    # a damaged stored file: nothing is pinned
    weights = Path(urlparse(registry.resolve("1").artifact_uri).path) / "head" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["train", "pin", "1"]) == 2
    assert "version 1 not pinned: stored bundle of mot-defects version 1 refused: " in capsys.readouterr().err
    assert DIGEST_TAG not in registry.resolve("1").tags
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["train", "pin", "candidate", "--sha256", digest]) == 0
    assert capsys.readouterr().out == f"version 1 pinned: bundle.json sha256 {digest}\n"
    assert registry.resolve("1").tags[DIGEST_TAG] == digest
    assert main(["train", "pin", "7"]) == 2
    assert "motlens train pin: " in capsys.readouterr().err


def test_registry_options_count_before_or_after_the_subcommand(registry, tiny_bundle, monkeypatch, capsys):
    """`train --tracking-uri URI pin V` pinned V of the default registry: the subcommand's own default
    overwrote the URI given to `train` (and `train --json versions` printed a table)."""
    from training.registry import DIGEST_TAG

    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home / "elsewhere"))  # the default: no registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    digest = _unpin(registry, "1")
    assert main(["train", "--tracking-uri", registry.tracking_uri, "--json", "pin", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle_sha256"] == digest == registry.resolve("1").tags[DIGEST_TAG]
    assert main(["train", "--json", "--tracking-uri", registry.tracking_uri, "versions"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == ["1"]
    assert main(["train", "versions", "--json", "--tracking-uri", registry.tracking_uri]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == ["1"]


def test_a_floor_that_could_not_be_checked_withholds_the_alias(capsys):
    """A held-out set of one fail class has no fail AUC: its floor went "not checked", the check
    passed and `candidate` was set, though the alias says all three floors were cleared."""
    from types import SimpleNamespace

    from training.floors import check_floors
    from training.train import TrainSettings, alias_after_floors
    from training.train_cli import say_withheld

    metrics = {"section_macro_f1": 0.95, "severity_macro_f1": 0.8,
               "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.137}  # fmt: skip
    one_class = check_floors(metrics)
    assert one_class.passed and one_class.unchecked  # what promotion reads for runs older than a metric
    assert alias_after_floors(TrainSettings(), one_class) == (None, "candidate")
    assert alias_after_floors(TrainSettings(alias_requires_floors=False), one_class) == ("candidate", None)
    assert alias_after_floors(TrainSettings(), check_floors({**metrics, "fail_auc": 0.9})) == ("candidate", None)
    result = SimpleNamespace(alias_withheld="candidate", floors=one_class, version=SimpleNamespace(version="4"))
    assert say_withheld(result) == 3
    assert "not checked: " in capsys.readouterr().err


def test_an_untracked_source_file_makes_the_tree_dirty(tmp_path):
    """``git_dirty`` ignored untracked files: a run importing a new, uncommitted module was recorded as
    reproducible from its commit. Untracked data and outputs still do not count."""
    import subprocess
    import sys
    from pathlib import Path

    clone = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", str(Path(__file__).resolve().parents[1]), str(clone)], check=True)

    def dirty() -> str:
        code = "import json; from training.train import git_commit; print(json.dumps(git_commit()))"
        out = subprocess.run([sys.executable, "-c", code], cwd=clone, env={**os.environ, "PYTHONPATH": str(clone)},
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return json.loads(out)["git_dirty"]

    assert dirty() == "false"
    (clone / "outputs.csv").write_text("x\n")
    assert dirty() == "false"
    (clone / "training" / "extra_module.py").write_text("")
    assert dirty() == "true"


def test_json_says_an_unchecked_floor_did_not_pass(registry, tiny_bundle, monkeypatch, capsys, tmp_path):
    """The alias was withheld for an unchecked floor while --json said the floors passed."""
    import training.train as train_mod
    from training.floors import check_floors
    from training.train import TrainResult, alias_after_floors

    _use(registry, monkeypatch)
    metrics = {"section_macro_f1": 0.95, "severity_macro_f1": 0.8,
               "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.137}  # fmt: skip

    def fake_train(data, settings, registry, **_):  # noqa: ANN001, ANN003, ANN202 - what train() does after its fit
        floors = check_floors(metrics)
        alias, withheld = alias_after_floors(settings, floors)
        info = registry.register_bundle(tiny_bundle.root, metrics=metrics, params={}, alias=alias)
        fp = {"sha256": "0" * 64, "rows_labelled": 1, "distinct_texts": 1, "train_texts": 1, "holdout_texts": 0}
        return TrainResult(info, metrics, fp, {"total_s": 1.0, "embed_s": 0.5}, None, floors, withheld)

    monkeypatch.setattr(train_mod, "train", fake_train)
    (tmp_path / "data").mkdir()
    assert main(["train", "--data", str(tmp_path / "data"), "--json"]) == 3
    floors = json.loads(capsys.readouterr().out)["floors"]
    assert floors["passed"] is False and floors["unchecked"] and "fail_auc" in floors["unchecked"][0]


def test_reason_and_actor_reach_the_settings_flags_over_the_environment(registry, monkeypatch, tmp_path):
    seen = _settings_seen(registry, monkeypatch)
    monkeypatch.setenv("MOTLENS_TRAIN_REASON", "nightly retrain")
    assert main(["train", "--data", str(tmp_path), "--alias", "production"]) == 2
    assert main(["train", "--data", str(tmp_path), "--reason", "hotfix", "--actor", "alice@box"]) == 2
    assert [(s.alias, s.reason, s.actor) for s in seen] == [
        ("production", "nightly retrain", None),
        ("candidate", "hotfix", "alice@box"),
    ]
