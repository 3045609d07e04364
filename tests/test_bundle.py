from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from motlens.bundle import Bundle, BundleError, check_golden


def test_bundle_reproduces_golden(tiny_bundle, embedder):
    b = Bundle.open(tiny_bundle.root)
    head, golden = b.head(), b.golden()
    emb = embedder.encode(golden.texts)
    out = head.predict(emb, golden.context)
    res = check_golden(golden, emb, head)
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
    (copy / "head" / "extra.json").write_bytes(b"{}")
    with pytest.raises(BundleError, match="not listed"):
        Bundle.open(copy)


def _resigned(tiny_bundle, tmp_path, change) -> Path:
    """A copy of the bundle changed by ``change`` and re-signed by hand, as a hostile producer would
    (hashes that match again; ``write_manifest`` itself refuses to sign pickle formats)."""
    import json

    from motlens.bundle import MANIFEST, sha256_file

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    change(copy)
    doc = json.loads((copy / MANIFEST).read_text())
    files = [p for p in copy.rglob("*") if p.is_file() and p.name != MANIFEST]
    doc["files"] = {p.relative_to(copy).as_posix(): sha256_file(p) for p in files}
    (copy / MANIFEST).write_text(json.dumps(doc))
    return copy


@pytest.mark.parametrize("name", ["extra.pkl", "pytorch_model.bin", "weights.PT", "state.ckpt"])
def test_pickle_formats_are_refused_even_when_listed(tiny_bundle, tmp_path, name):
    """A re-signed bundle carrying a pickle-based file: the loader would be one step from running it."""
    copy = _resigned(tiny_bundle, tmp_path, lambda root: (root / "embedder" / name).write_bytes(b"\x80\x04."))
    with pytest.raises(BundleError, match="pickle-based formats can run code"):
        Bundle.open(copy)


def test_symlinks_are_refused(tiny_bundle, tmp_path):
    """A linked directory hid its files from the listing; a linked file is read unverified later."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "data.json").write_text("{}")
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    (copy / "embedder" / "extra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError, match="embedder/extra is a symbolic link"):
        Bundle.open(copy)
    (copy / "embedder" / "extra").unlink()
    weights = copy / "head" / "weights.safetensors"
    shutil.copy(weights, outside / "w.safetensors")
    weights.unlink()
    weights.symlink_to(outside / "w.safetensors")
    with pytest.raises(BundleError, match="head/weights.safetensors is a symbolic link"):
        Bundle.open(copy)


def test_special_files_are_refused(tiny_bundle, tmp_path):
    """A FIFO is no regular file: it was neither listed nor extra, passed the digest pin, and the
    embedder's loader then hung opening it."""
    import os

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    os.mkfifo(copy / "embedder" / "NOTES.md")
    with pytest.raises(BundleError, match="embedder/NOTES.md is not a regular file"):
        Bundle.open(copy)


@pytest.mark.parametrize("manifest", ["[]", "null", '{"files": ["a"]}', '{"files": {"a": 1}}', "[" * 200_000])
def test_malformed_manifest_is_a_bundle_error(tiny_bundle, tmp_path, manifest):
    """Not a TypeError: Registry.fetch re-downloads a damaged cache only on BundleError."""
    from motlens.bundle import MANIFEST

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    (copy / MANIFEST).write_text(manifest)
    with pytest.raises(BundleError, match="malformed manifest"):
        Bundle.open(copy)


def _with_manifest(src: Path, dst: Path, **changes: object) -> Path:
    import json

    from motlens.bundle import MANIFEST

    shutil.copytree(src, dst)
    doc = json.loads((dst / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    (dst / MANIFEST).write_text(json.dumps(doc))
    return dst


def test_a_bundle_names_its_format_and_a_newer_one_is_refused_by_name(tiny_bundle, tmp_path):
    """A newer bundle (another file, another field) opened as if it were this format, without a word."""
    from motlens.bundle import BUNDLE_FORMAT

    assert Bundle.open(tiny_bundle.root).manifest["format"] == BUNDLE_FORMAT
    newer = _with_manifest(tiny_bundle.root, tmp_path / "newer", format=BUNDLE_FORMAT + 1)
    with pytest.raises(BundleError, match=f"bundle format {BUNDLE_FORMAT + 1} was written by a newer motlens.*upgrade"):
        Bundle.open(newer)
    # refused by its format before its files are compared: a newer layout's extra file is not the message
    (newer / "head" / "calibration.json").write_text("{}")
    with pytest.raises(BundleError, match="written by a newer motlens"):
        Bundle.open(newer)
    # nor a `files` entry of another shape, or none (what a newer format is most likely to change)
    for files in ({"head/config.json": {"sha256": "ab", "size": 1}}, None):
        other = _with_manifest(tiny_bundle.root, tmp_path / f"newer-{files is None}", format=BUNDLE_FORMAT + 1,
                               files=files)  # fmt: skip
        with pytest.raises(BundleError, match="written by a newer motlens"):
            Bundle.open(other)


@pytest.mark.parametrize("value", ["1", 0, 1.0, True])
def test_a_malformed_format_is_a_malformed_manifest(tiny_bundle, tmp_path, value):
    with pytest.raises(BundleError, match="malformed manifest.*'format' must be a positive integer"):
        Bundle.open(_with_manifest(tiny_bundle.root, tmp_path / "b", format=value))


def test_a_bundle_written_before_the_format_field_still_opens(tiny_bundle, tmp_path):
    legacy = _with_manifest(tiny_bundle.root, tmp_path / "legacy", format=None)
    assert "format" not in Bundle.open(legacy).manifest


def test_the_format_is_not_a_descriptive_field(tiny_bundle, tmp_path):
    from motlens.bundle import set_manifest_fields

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, copy)
    with pytest.raises(ValueError, match="bundle format"):
        set_manifest_fields(copy, format=2)


def test_a_damaged_config_is_a_load_refusal_not_a_crash(tiny_bundle, tmp_path):
    """A re-signed head config missing a key raised KeyError past the slot manager (admin 500, dead loader)."""
    import json

    from predictor.backend import ModelLoadError, load_backend

    def drop_a_key(root: Path) -> None:
        cfg = root / "head" / "config.json"
        doc = json.loads(cfg.read_text())
        doc.pop(next(iter(doc)))
        cfg.write_text(json.dumps(doc))

    copy = _resigned(tiny_bundle, tmp_path, drop_a_key)
    with pytest.raises(ModelLoadError, match="bundle refused"):
        load_backend(str(copy))
    with pytest.raises(ModelLoadError, match="cannot resolve|does not exist"):
        load_backend("/" + "x" * 5000)


def test_golden_set_stores_the_head_probabilities(tiny_bundle, embedder, tmp_path):
    """Audit finding 5: golden.json held labels only, so the head's scores could move without a failed check."""
    import json

    import numpy as np

    from motlens.bundle import GOLDEN_JSON, GOLDEN_MAX_SCORE_DELTA, write_manifest

    b = Bundle.open(tiny_bundle.root)
    golden, head = b.golden(), b.head()
    assert golden.has_scores and golden.section_scores.shape == (len(golden.texts), 9)
    emb = embedder.encode(golden.texts)
    assert np.allclose(golden.fail_probability, head.predict(emb, golden.context).fail_probability, atol=1e-5)
    res = check_golden(golden, emb, head)
    assert res.passed and res.max_score_delta < 1e-4 and res.head_delta < 1e-6, res.detail
    # a backend of lower precision (embeddings rounded to bfloat16): within the tolerance
    bf16 = (emb.view(np.uint32) + 0x8000 & 0xFFFF0000).view(np.float32)
    rounded = check_golden(golden, bf16, head)
    assert rounded.passed and 0 < rounded.max_score_delta <= GOLDEN_MAX_SCORE_DELTA / 4, rounded.detail
    # stored scores that the head no longer gives, every label unchanged: refused
    moved = tmp_path / "moved"
    shutil.copytree(tiny_bundle.root, moved)
    doc = json.loads((moved / GOLDEN_JSON).read_text())
    doc["fail_probability"][0] += 0.01
    (moved / GOLDEN_JSON).write_text(json.dumps(doc))
    write_manifest(moved, version="1", run_id="moved")
    res = check_golden(Bundle.open(moved).golden(), emb, head)
    assert not res.passed and res.label_agreement == 1.0 and "0.01000 on the reference embeddings" in res.detail


def test_a_golden_set_without_scores_is_checked_on_labels_only(tiny_bundle, embedder, tmp_path, caplog):
    """Bundles written before the scores were stored still load (bundle format 1 both ways)."""
    import json
    import logging

    from motlens.bundle import GOLDEN_JSON, write_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle.root, old)
    doc = json.loads((old / GOLDEN_JSON).read_text())
    for key in ("section_scores", "severity_scores", "fail_probability"):
        doc.pop(key)
    (old / GOLDEN_JSON).write_text(json.dumps(doc))
    write_manifest(old, version="1", run_id="old")
    b = Bundle.open(old)
    golden = b.golden()
    assert not golden.has_scores
    emb = embedder.encode(golden.texts)
    with caplog.at_level(logging.INFO, logger="motlens.bundle"):
        res = check_golden(golden, emb, b.head())
    assert res.passed and res.max_score_delta is None and "labels only" in res.detail
    assert "no stored scores" in caplog.text
