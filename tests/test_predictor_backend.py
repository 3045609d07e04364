"""The backend loader: model references (path, KServe mount layout, MLflow alias), backends by name,
and the gate — a bundle that fails verification or its golden set is never served."""

from __future__ import annotations

import gc
import json
import shutil
import time
import weakref

import httpx
import pytest
from conftest import free_port

from motlens.bundle import MANIFEST, assemble, sha256_file, write_manifest
from predictor.backend import EMBEDDER_FACTORIES, ModelLoadError, find_bundle_root, load_backend, resolve_model


def test_kserve_mount_layout_finds_the_nested_bundle(tiny_bundle, tmp_path):
    mount = tmp_path / "mnt-models"
    shutil.copytree(tiny_bundle.root, mount / "artifacts" / "model")
    assert find_bundle_root(mount) == mount / "artifacts" / "model"
    shutil.copytree(tiny_bundle.root, mount / "other")
    with pytest.raises(ModelLoadError, match="several bundles"):
        find_bundle_root(mount)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no bundle.json"):
        resolve_model(str(tmp_path / "mnt-models" / "artifacts" / "model" / "head"))


def test_models_uri_resolves_through_the_registry(registry, tiny_bundle, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    root = resolve_model("models:/mot-defects@production").root
    assert (root / "bundle.json").is_file() and root != tiny_bundle.root
    with pytest.raises(ModelLoadError, match="canary"):
        resolve_model("models:/mot-defects@canary")


def test_unknown_backend_and_tampered_bundle_are_refused(tiny_bundle, embedder, tmp_path):
    with pytest.raises(ModelLoadError, match="unknown backend 'tensorrt'"):
        load_backend(str(tiny_bundle.root), backend="tensorrt")
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle.root, tampered)
    (tampered / "golden" / "golden.json").write_text((tampered / "golden" / "golden.json").read_text() + "\n")
    with pytest.raises(ModelLoadError, match="sha256 mismatch for golden/golden.json"):
        load_backend(str(tampered), embedder=embedder)


def test_golden_set_not_reproduced_is_refused(bad_golden_bundle, embedder):
    """A bundle whose hashes verify but whose golden embeddings this backend does not reproduce."""
    with pytest.raises(ModelLoadError, match="golden set not reproduced") as info:
        load_backend(str(bad_golden_bundle), embedder=embedder)
    assert info.value.golden is not None and info.value.golden.min_cosine < 0.999


def test_a_closed_backend_still_names_its_backend_and_device(tiny_bundle, embedder):
    """A request still in flight when a drain timed out logs its rows after the unit was closed: its
    backend and device were read through the freed embedder (AttributeError), and the rows were lost."""
    backend = load_backend(str(tiny_bundle.root), embedder=embedder)
    named = (backend.backend_name, backend.device)
    backend.close()
    assert backend.embedder is None and (backend.backend_name, backend.device) == named == ("torch", "cpu")


def test_onnx_backend_plugs_in_by_name(tiny_bundle, onnx_model_dir, tmp_path):
    """The bundle's embedder directory carries the verified ONNX export; the backend is chosen by name."""
    bundle = assemble(tmp_path / "onnx-bundle", onnx_model_dir, tiny_bundle.head(), tiny_bundle.golden(),
                      version="3", run_id="onnx")  # fmt: skip
    backend = load_backend(str(bundle.root), backend="onnx", threads=1)
    assert backend.backend_name == "onnx" and backend.device == "cpu"
    assert backend.golden is not None and backend.golden.passed
    two = load_backend(str(bundle.root), backend="onnx", threads=2, single_thread_tokens=96)
    assert two.embedder.single_thread_tokens == 96 and two.golden is not None and two.golden.passed
    with pytest.raises(ModelLoadError, match="runs on cpu"):
        load_backend(str(bundle.root), backend="onnx", device="cuda")


def test_cpu_bfloat16_backend_passes_the_golden_check_or_is_refused_with_the_reason(tiny_bundle):
    import torch

    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        be = load_backend(str(tiny_bundle.root), backend="torch", device="cpu", dtype="bfloat16")
        assert be.golden is not None and be.golden.passed and be.golden.min_cosine >= 0.999
        assert be.info["device"] == "cpu"
        be.close()
    else:
        with pytest.raises(ModelLoadError, match="AVX512-BF16 or AMX"):
            load_backend(str(tiny_bundle.root), backend="torch", device="cpu", dtype="bfloat16")


class _Shared:
    """A loaded embedder stand-in that delegates to ``real`` (the session's MiniLM)."""

    def __init__(self, real=None) -> None:  # noqa: ANN001
        self._real = real

    def __getattr__(self, name: str):  # noqa: ANN204
        if name == "_real":
            raise AttributeError(name)
        return getattr(self._real, name)


class _Model(_Shared):
    """Stands for a loaded model: its parts reference each other, as torch modules do."""

    def __init__(self, real=None) -> None:  # noqa: ANN001
        super().__init__(real)
        self.cycle = self

    def encode_tokens(self, ids):  # noqa: ANN001, ANN201
        raise RuntimeError("CUDA out of memory (injected)")


def _counted_factory(monkeypatch, name: str, make) -> list[weakref.ref]:  # noqa: ANN001
    """Register embedder backend ``name`` building ``make()`` per load; returns weakrefs to what it built."""
    made: list[weakref.ref] = []

    def factory(*args):  # noqa: ANN001, ANN202
        built = make()
        made.append(weakref.ref(built))
        return built

    monkeypatch.setitem(EMBEDDER_FACTORIES, name, factory)
    return made


def test_close_frees_a_gpu_model_frozen_with_the_heap(tiny_bundle, embedder):
    """With the heap frozen (gc_freeze, the default) a plain collection never reached a model frozen
    with it, so the CUDA cache was emptied while the weights were still allocated."""
    be = load_backend(str(tiny_bundle.root), embedder=embedder)
    be.info["device"] = "cuda"  # torch.cuda.empty_cache() is a no-op without CUDA
    model = _Model()
    alive = weakref.ref(model)
    be.embedder = model  # type: ignore[assignment]
    del model
    gc.freeze()
    be.in_frozen_heap = True
    try:
        be.close()
        assert alive() is None
        assert gc.get_freeze_count() > 0  # the heap is frozen again
    finally:
        gc.unfreeze()


def test_a_failed_warm_up_frees_its_model_before_the_error_leaves(tiny_bundle, embedder, monkeypatch):
    """The traceback's frames held the model, so a retry met the failed attempt's GPU memory."""
    made = _counted_factory(monkeypatch, "injected", lambda: _Model(embedder))
    gc.disable()  # only the loader's own collection may free it
    try:
        try:
            load_backend(str(tiny_bundle.root), backend="injected")
        except ModelLoadError as e:
            assert "CUDA out of memory (injected)" in str(e)
        else:
            pytest.fail("the warm-up failure was not raised")
        assert len(made) == 1 and made[0]() is None
    finally:
        gc.enable()


# --- golden probabilities (audit finding 5): labels alone let a biased head or a wrong normalisation through


def _context_bundle(tiny_bundle, embedder, tmp_path):
    """The tiny bundle with an age-sensitive severity head and a golden set with vehicle context."""
    from motlens.bundle import make_golden
    from motlens.head import DefectHead

    head = tiny_bundle.head()
    w = {k: v.copy() for k, v in head.weights.items()}
    w["severity.weight"][:, embedder.dim] = [-0.4, -0.2, 0.3, 0.3]  # the age feature follows the embedding
    head = DefectHead(w, head.features)
    texts = tiny_bundle.golden().texts
    ctx = {
        "vehicle_age_years": [float(3 + 2 * (i % 7)) for i in range(len(texts))],
        "odometer_miles": [float(20_000 + 9_000 * i) for i in range(len(texts))],
        "fuel_type": ["PE" if i % 2 else "DI" for i in range(len(texts))],
    }
    golden = make_golden(embedder, head, texts, ctx)
    return assemble(tmp_path / "ctx", tiny_bundle.embedder_dir, head, golden, version="5", run_id="ctx"), head


def _with_head(bundle, head, dst):
    """A copy of ``bundle`` with another head, re-signed (its hashes verify): what a faulty export or a
    hand edit of head/ produces."""
    from motlens.bundle import write_manifest

    shutil.copytree(bundle.root, dst)
    head.save(dst / "head")
    write_manifest(dst, version="6", run_id="changed")
    return dst


def _same_labels(bundle, head, embedder):
    g = bundle.golden()
    out = head.predict(embedder.encode(g.texts), g.context)
    return out.section == g.section and out.severity == g.severity


def test_golden_probabilities_refuse_a_biased_severity_head(tiny_bundle, embedder, tmp_path):
    import numpy as np

    from motlens.head import DefectHead
    from motlens.labels import SEVERITIES

    bundle, head = _context_bundle(tiny_bundle, embedder, tmp_path)
    assert load_backend(str(bundle.root), embedder=embedder).golden.passed
    w = {k: v.copy() for k, v in head.weights.items()}
    w["severity.bias"][[SEVERITIES.index("major"), SEVERITIES.index("dangerous")]] += 0.5
    biased = DefectHead(w, head.features)
    assert _same_labels(bundle, biased, embedder)  # every golden label still agrees: only the scores tell
    with pytest.raises(ModelLoadError, match=r"golden set not reproduced.*max \|Δ probability\|") as info:
        load_backend(str(_with_head(bundle, biased, tmp_path / "biased")), embedder=embedder)
    assert info.value.golden.label_agreement == 1.0 and info.value.golden.head_delta > 1e-3
    assert np.isfinite(info.value.golden.max_score_delta)


def test_golden_probabilities_refuse_a_shifted_age_normalisation(tiny_bundle, embedder, tmp_path):
    from dataclasses import replace

    from motlens.head import DefectHead

    bundle, head = _context_bundle(tiny_bundle, embedder, tmp_path)
    shifted = DefectHead(head.weights, replace(head.features, age_mean=head.features.age_mean + 10))
    assert _same_labels(bundle, shifted, embedder)
    with pytest.raises(ModelLoadError, match=r"max \|Δ probability\|") as info:
        load_backend(str(_with_head(bundle, shifted, tmp_path / "shifted")), embedder=embedder)
    assert info.value.golden.label_agreement == 1.0 and info.value.golden.head_delta > 1e-3


def test_onnx_backend_reproduces_the_golden_probabilities(tiny_bundle, embedder, onnx_model_dir, tmp_path):
    """A legitimate backend difference (ONNX Runtime vs torch, both fp32) stays within the tolerance."""
    from motlens.bundle import GOLDEN_MAX_SCORE_DELTA

    bundle, head = _context_bundle(tiny_bundle, embedder, tmp_path)
    onnx = assemble(tmp_path / "ctx-onnx", onnx_model_dir, head, bundle.golden(), version="7", run_id="onnx")
    be = load_backend(str(onnx.root), backend="onnx", threads=1)
    assert be.golden.passed and be.golden.max_score_delta is not None
    assert be.golden.max_score_delta <= GOLDEN_MAX_SCORE_DELTA / 10, be.golden.detail


def test_a_gpu_model_frozen_by_an_earlier_models_close_is_freed_too(tiny_bundle, embedder):
    """Closing the first (frozen) GPU model re-freezes the whole heap, the next model with it; that one
    was not marked, so its close only collected the unfrozen generations and kept its CUDA weights."""
    from predictor.heap import freeze_long_lived

    first = load_backend(str(tiny_bundle.root), embedder=embedder)
    freeze_long_lived()  # what the first load does before it serves
    second = load_backend(str(tiny_bundle.root), embedder=embedder)  # a later version, loaded unfrozen
    refs = []
    for be in (first, second):
        be.info["device"] = "cuda"  # torch.cuda.empty_cache() is a no-op without CUDA
        model = _Model()
        refs.append(weakref.ref(model))
        be.embedder = model  # type: ignore[assignment]
        del model
    first.in_frozen_heap = True
    try:
        first.close()  # a full pass, then every live object frozen again: the second model too
        assert refs[0]() is None and refs[1]() is not None
        second.close()
        assert refs[1]() is None, "the second model's weights stay allocated"
    finally:
        gc.unfreeze()


def test_versions_with_the_same_embedder_files_share_the_loaded_embedder(tiny_bundle, embedder, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """Each load built (and on torch, traced) MiniLM again: torch keeps every frozen graph with its
    weights, so each swap between versions of one embedder grew RSS by ≈ 60 MiB for good."""
    from motlens.bundle import write_manifest

    made = _counted_factory(monkeypatch, "counted", lambda: _Shared(embedder))
    other = tmp_path / "v7"
    shutil.copytree(tiny_bundle.root, other)
    write_manifest(other, version="7", run_id="seven")  # another version, the same embedder files
    a = load_backend(str(tiny_bundle.root), backend="counted")
    b = load_backend(str(other), backend="counted")
    assert len(made) == 1 and a.embedder is b.embedder and (a.version, b.version) != ("7", "7")
    c = load_backend(str(other), backend="counted", threads=1)  # other settings: its own embedder
    assert len(made) == 2 and c.embedder is not b.embedder
    changed = tmp_path / "v8"
    shutil.copytree(tiny_bundle.root, changed)
    (changed / "embedder" / "README.extra").write_text("another embedder build\n")
    write_manifest(changed, version="8", run_id="eight")
    d = load_backend(str(changed), backend="counted")  # other embedder files: its own embedder
    assert len(made) == 3 and d.embedder is not a.embedder
    for be in (a, b, c, d):
        be.close()
    del a, b, c, d
    gc.collect()
    assert all(ref() is None for ref in made), "a shared embedder goes with the last backend holding it"


def test_the_trace_setting_reaches_the_factory_and_keys_the_shared_embedder(tiny_bundle, embedder, monkeypatch):
    """An eager and a traced embedder of the same files are different embedders, never shared."""
    calls: list[tuple] = []

    def factory(*args):  # noqa: ANN001, ANN202
        calls.append(args)
        return embedder

    monkeypatch.setitem(EMBEDDER_FACTORIES, "recorded", factory)
    eager = load_backend(str(tiny_bundle.root), backend="recorded", torch_trace=False)
    traced = load_backend(str(tiny_bundle.root), backend="recorded")
    try:
        assert [c[-1] for c in calls] == [False, True]  # the second load did not share the first's
    finally:
        eager.close()
        traced.close()


def _resigned_copy(bundle_root, dst):
    """What write access to the artifact store allows: a bundle replaced by one that verifies against a
    manifest of its own (here the same files, re-signed, so only the manifest's digest tells them apart)."""
    shutil.copytree(bundle_root, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    write_manifest(dst, **{k: v for k, v in manifest.items() if k not in ("files", "created_at")})
    return dst


def test_a_pinned_bundle_digest_refuses_a_re_signed_bundle(tiny_bundle, embedder, tmp_path):
    mount = tmp_path / "mnt-models"
    shutil.copytree(tiny_bundle.root, mount)
    pin = sha256_file(mount / MANIFEST)
    assert load_backend(str(mount), embedder=embedder, pinned={str(mount): pin}).golden.passed
    swapped = _resigned_copy(tiny_bundle.root, tmp_path / "swapped")
    assert load_backend(str(swapped), embedder=embedder).golden.passed  # it verifies on its own
    refused = f"bundle refused: .*bundle.json has sha256 [0-9a-f]{{64}}, not the pinned {pin}"
    with pytest.raises(ModelLoadError, match=refused):
        load_backend(str(swapped), embedder=embedder, pinned={str(swapped): pin})
    assert load_backend(str(swapped), embedder=embedder, pinned={str(mount): pin}).golden.passed  # another ref's


def test_the_server_pins_its_configured_model_only(tiny_bundle, embedder, tmp_path):
    """MOTLENS_SERVE_MODEL_SHA256 (set beside STORAGE_URI) keeps a swapped /mnt/models unready with the
    reason; versions loaded later through the admin API are checked by the registry, not by this pin."""
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    swapped = _resigned_copy(tiny_bundle.root, tmp_path / "mnt-models")
    pin = sha256_file(tiny_bundle.root / MANIFEST)
    settings = ServeSettings(
        model=str(swapped), model_sha256=pin, http_port=free_port(), enable_grpc=False, admin_enabled=True
    )
    srv = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(srv).start()
    try:
        base = f"http://127.0.0.1:{settings.http_port}"
        deadline = time.monotonic() + 300
        while srv.slots.slots["production"].error is None:
            assert time.monotonic() < deadline and srv.slots.ready is False
            time.sleep(0.05)
        kind, detail = srv.slots.not_ready_reason()
        assert kind == "load_failed" and f"not the pinned {pin}" in detail
        assert httpx.get(f"{base}/v2/models/mot-defects/ready").status_code == 503
        admin = f"{base}/motlens/admin/slots/production/load"
        r = httpx.post(admin, json={"ref": str(tiny_bundle.root)}, timeout=300)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{base}/v2/models/mot-defects/ready").status_code == 200
    finally:
        thread.stop()
