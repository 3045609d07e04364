"""Training, registry and bundle problems a review reproduced: each refused early, by name, or kept safe."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from motlens.bundle import Bundle, BundleError, GoldenSet, assemble, write_manifest
from motlens.cli import main
from motlens.head import DefectHead
from motlens.state import StateSettings
from training.floors import check_floors
from training.registry import Registry, RegistryError
from training.train import MAX_SEED, TrainSettings, fit_head, select_golden, train


def _parts(tmp_path: Path) -> tuple[Path, DefectHead, GoldenSet]:
    """What :func:`assemble` takes, small: an embedder directory, a linear head and a one-text golden set."""
    src = tmp_path / "embedder-src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    weights = {
        "section.weight": np.zeros((9, 4), np.float32), "section.bias": np.zeros(9, np.float32),
        "severity.weight": np.zeros((4, 4), np.float32), "severity.bias": np.zeros(4, np.float32),
    }  # fmt: skip
    golden = GoldenSet(["Brake pipe corroded"], {}, np.zeros((1, 384), np.float32), ["Brakes"], ["major"])
    return src, DefectHead(weights=weights), golden


class _Interrupted:
    """A drift reference whose writing is interrupted (Ctrl-C) part-way through the bundle."""

    def to_parquet(self, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt


def test_a_long_password_is_redacted_before_the_message_is_cut(monkeypatch, tmp_path):
    """The first 300 characters were kept, then redacted: a URI cut inside its user part kept the password."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    reg = Registry("http://user:SECRETTOKEN" + "x" * 400 + "@127.0.0.1:9", state=StateSettings(home=tmp_path))
    with pytest.raises(RegistryError) as e:
        reg.experiment_id()
    assert "unreachable" in str(e.value) and "SECRETTOKEN" not in str(e.value)


def test_a_model_directory_holding_a_pickle_file_is_refused_before_any_work(registry, monkeypatch, capsys, tmp_path):
    """The bundle refused pytorch_model.bin only after the whole training; the settings now refuse it, naming it."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    assert TrainSettings(model_dir=model).model_dir == model
    (model / "sub" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValidationError, match=r"sub/pytorch_model\.bin is a \.bin file"):
        TrainSettings(model_dir=model)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    monkeypatch.setenv("MOTLENS_TRAIN_MODEL_DIR", str(model))
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "bad setting: MOTLENS_TRAIN_MODEL_DIR" in err and "pytorch_model.bin" in err and "Traceback" not in err


def test_an_interrupted_bundle_leaves_the_previous_one_and_a_usable_work_dir(tmp_path):
    """assemble deleted bundle/ and rebuilt it in place: an interrupt left it without bundle.json, and the
    --work-dir check then refused every later run ("holds bundle/, which … no motlens training wrote")."""
    src, head, golden = _parts(tmp_path)
    work = tmp_path / "work"
    assemble(work / "bundle", src, head, golden, version="1")
    with pytest.raises(KeyboardInterrupt):
        assemble(work / "bundle", src, head, golden, _Interrupted(), version="2")
    assert Bundle.open(work / "bundle").manifest["version"] == "1"
    assert [p.name for p in work.iterdir()] == ["bundle"]
    assert TrainSettings(work_dir=work).work_dir == work
    (src / "pytorch_model.bin").write_bytes(b"x")  # refused by the manifest: the previous bundle stays too
    with pytest.raises(BundleError, match="pytorch_model.bin"):
        assemble(work / "bundle", src, head, golden, version="3")
    assert Bundle.open(work / "bundle").manifest["version"] == "1"


def test_a_staging_directory_a_killed_run_left_is_ignored_then_removed(tmp_path):
    src, head, golden = _parts(tmp_path)
    work = tmp_path / "work"
    (work / ".bundle.tmp-killed" / "embedder").mkdir(parents=True)
    assert TrainSettings(work_dir=work).work_dir == work
    assemble(work / "bundle", src, head, golden, version="1")
    assert [p.name for p in work.iterdir()] == ["bundle"]
    assert Bundle.open(work / "bundle").manifest["version"] == "1"


def test_a_bundle_without_its_head_is_refused_by_name_and_never_registered(registry, tmp_path):
    """A manifest listing no files verified, was registered, took the production alias and failed at load."""
    empty = tmp_path / "empty"
    empty.mkdir()
    write_manifest(empty)
    with pytest.raises(BundleError, match=r"bundle.json lists no head/weights\.safetensors"):
        Bundle.open(empty)
    with pytest.raises(BundleError, match="lists no head/"):
        registry.register_bundle(empty, metrics={}, params={}, alias="production")
    assert registry.aliases() == {}
    src, head, golden = _parts(tmp_path)
    root = tmp_path / "bundle"
    assemble(root, src, head, golden)
    (root / "head" / "config.json").unlink()
    write_manifest(root)
    with pytest.raises(BundleError, match=r"bundle.json lists no head/config\.json"):
        Bundle.open(root)


def test_a_bundle_json_below_the_top_is_hashed_and_an_unlisted_one_refused(tmp_path):
    """Every file named bundle.json was skipped at any depth: never hashed, never flagged as unlisted."""
    src, head, golden = _parts(tmp_path)
    (src / "bundle.json").write_text("an embedder's own file")
    root = tmp_path / "bundle"
    assert "embedder/bundle.json" in assemble(root, src, head, golden).manifest["files"]
    (root / "embedder" / "bundle.json").write_text("changed")
    with pytest.raises(BundleError, match="sha256 mismatch for embedder/bundle.json"):
        Bundle.open(root)
    write_manifest(root)
    (root / "head" / "bundle.json").write_bytes(b"\0" * 1000)
    with pytest.raises(BundleError, match="not listed in bundle.json: head/bundle.json"):
        Bundle.open(root)


@pytest.mark.parametrize(("name", "char"), [("run?1", "?"), ("a%41b", "%41")])
def test_a_home_the_sqlite_uri_cannot_carry_is_refused_by_name(name, char, monkeypatch, capsys, tmp_path):
    """MOTLENS_HOME went into sqlite:/// as written: '?' started the URI's query and '%41' was read as 'A',
    so the database opened elsewhere (or failed after long retries). Percent-encoding it is no cure:
    MLflow creates the directory of the path as written, a second, encoded one beside the home."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / name
    refused = rf"^bad setting: MOTLENS_HOME: {re.escape(str(home))} holds '{re.escape(char)}'"
    with pytest.raises(RegistryError, match=refused):
        Registry(state=StateSettings(home=home))
    assert Registry(f"sqlite:///{tmp_path}/elsewhere/mlflow.db", state=StateSettings(home=home)).sqlite_path
    monkeypatch.setenv("MOTLENS_HOME", str(home))
    assert main(["train", "versions"]) == 2
    assert capsys.readouterr().err.startswith(f"motlens train versions: bad setting: MOTLENS_HOME: {home} holds")
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    assert "bad setting: MOTLENS_HOME:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_home_with_a_percent_sign_sqlalchemy_does_not_decode_still_works(monkeypatch, tmp_path):
    """Only '%' and two hex digits is decoded: a home such as 'runs-50%zz' opened where it is, and must still."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "runs-50%zz"
    Registry(state=StateSettings(home=home)).experiment_id()
    assert (home / "mlflow.db").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["runs-50%zz"]


def test_a_percent_encoded_sqlite_uri_is_checked_where_sqlalchemy_opens_it(tmp_path, _mlflow_template_db):
    """SQLAlchemy decodes the path of a sqlite:/// URI: the store check looked for the undecoded file."""
    (tmp_path / "a%41b").mkdir()
    shutil.copy(_mlflow_template_db, tmp_path / "a%41b" / "mlflow.db")
    reg = Registry(f"sqlite:///{tmp_path}/a%2541b/mlflow.db", state=StateSettings(home=tmp_path / "home"))
    assert reg.sqlite_path == tmp_path / "a%41b" / "mlflow.db"
    assert reg.versions() == []


def test_the_seed_is_bounded_by_what_torch_takes():
    """2**64 was accepted and the training crashed after embedding (torch seeds are 64-bit)."""
    with pytest.raises(ValidationError, match="seed"):
        TrainSettings(seed=MAX_SEED + 1)
    s = TrainSettings(seed=MAX_SEED, epochs=1, hidden=0, batch_size=4)
    emb = np.random.default_rng(0).random((8, 384), dtype=np.float32)
    spec = DefectHead({}).features
    head, history = fit_head(DefectHead({}).featurize(emb), np.arange(8) % 9, np.arange(8) % 4, np.ones(8), spec, s)
    assert len(history) == 1
    assert len(select_golden(pd.DataFrame(index=range(8)), head.predict(emb), 4, s.seed)) == 4


def test_a_sqlite_registry_path_that_is_a_directory_is_refused_before_any_data(monkeypatch, capsys, tmp_path):
    """It passed the early check (not a file, so "to be created") and failed after the training with
    "does not exist"."""
    where = tmp_path / "registry.db"
    where.mkdir()
    reg = Registry(f"sqlite:///{where}", state=StateSettings(home=tmp_path / "home"))
    with pytest.raises(RegistryError, match=f"{where} is not a file"):
        train(tmp_path / "nowhere", TrainSettings(), registry=reg)
    with pytest.raises(RegistryError, match=f"{where} is not a file"):
        reg.versions()
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--tracking-uri", f"sqlite:///{where}"]) == 2
    assert f"{where} is not a file" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("baseline", [math.nan, -math.inf])
def test_a_baseline_that_is_not_a_number_fails_its_floor(baseline):
    """A NaN baseline made the floor NaN, and `value < NaN` is False: the floor passed."""
    from promotion.gates import offline_gate
    from promotion.settings import PromoteSettings

    metrics = {"section_macro_f1": 0.9, "baseline_section_macro_f1": baseline, "fail_auc": 0.9}
    floors = check_floors(metrics, ("section_macro_f1", "fail_auc"))
    assert not floors.passed and not floors.unchecked
    assert floors.failed == [
        f"section_macro_f1 0.9000: no floor, its baseline_section_macro_f1 {baseline} is not a number"
    ]
    settings = PromoteSettings(offline_metrics=["section_macro_f1", "fail_auc"])
    gate = offline_gate(metrics, None, settings, candidate_params=None, production_params=None)
    assert gate.status == "fail" and "is not a number" in gate.detail, gate.detail


@pytest.mark.parametrize("ref", ["²", "٣", "models:/mot-defects/٣"])
def test_a_reference_of_other_unicode_digits_is_a_bad_reference(ref, capsys, tmp_path):
    """str.isdigit() (and a regex's \\d) take '²' (int() then failed with a ValueError) and '٣' (read as 3)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RegistryError, match="cannot read model reference"):
        Registry(uri).resolve(ref)
    assert main(["train", "pin", ref, "--tracking-uri", uri]) == 2
    assert "cannot read model reference" in capsys.readouterr().err
    answer = SimpleNamespace(name="mot-defects", version=ref[-1], run_id="", source="", aliases=[], tags={})
    with pytest.raises(RegistryError, match="refused"):  # a registry answering such a version
        Registry(uri)._info(answer, metrics=False)
