from __future__ import annotations

import shutil

import pytest

from motlens.bundle import Bundle, BundleError, check_golden


def test_bundle_reproduces_golden(tiny_bundle, embedder):
    b = Bundle.open(tiny_bundle.root)
    head, golden = b.head(), b.golden()
    emb = embedder.encode(golden.texts)
    out = head.predict(emb, golden.context)
    res = check_golden(golden, emb, out.section, out.severity)
    assert res.passed, res.detail
    assert out.section[2] == "1 Brakes"


def test_tampered_bundle_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    cfg = copy / "head" / "config.json"
    cfg.write_text(cfg.read_text().replace("Brakes", "Brakez"))
    with pytest.raises(BundleError, match="sha256 mismatch for head/config.json"):
        Bundle.open(copy)


def test_unlisted_file_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    (copy / "head" / "evil.pkl").write_bytes(b"x")
    with pytest.raises(BundleError, match="not listed"):
        Bundle.open(copy)
