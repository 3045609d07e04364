from __future__ import annotations

import json

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


def test_bad_data_arguments_are_clear(registry, monkeypatch, capsys, tmp_path):
    _use(registry, monkeypatch)
    assert main(["train"]) == 2
    assert "give --data DIR or --clickhouse" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty")]) == 2
    assert "no test_result, test_item, item_detail table" in capsys.readouterr().err
