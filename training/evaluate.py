"""Held-out evaluation of the defect head: macro-F1 per head (over the classes the held-out texts hold), per-class
reports, confusion matrices and the calibration of ``fail_probability`` (reliability curve, ECE,
Brier), per text against its majority label and row-weighted against its observed fail fraction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from motlens.head import HeadOutput
from motlens.labels import FAILING_SEVERITIES, SECTIONS, SEVERITIES

CALIBRATION_BINS = 10


@dataclass
class Evaluation:
    metrics: dict[str, float]
    report: dict[str, Any]


def expected_calibration_error(
    prob: np.ndarray, outcome: np.ndarray, bins: int = CALIBRATION_BINS, weights: np.ndarray | None = None
) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width probability bins, and the per-bin table of the reliability curve.

    ``outcome`` may be fractional (a text's observed fail fraction) and ``weights`` (default 1) weight
    each entry, e.g. by its row count: then this is the ECE of the expanded rows."""
    w = np.ones(len(prob)) if weights is None else np.asarray(weights, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    table, ece, total = [], 0.0, float(w.sum())
    for b in range(bins):
        m = (which == b) & (w > 0)
        if not m.any():
            continue
        conf = float(np.average(prob[m], weights=w[m]))
        acc = float(np.average(outcome[m], weights=w[m]))
        ece += float(w[m].sum()) / total * abs(conf - acc)
        table.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(m.sum()) if weights is None else float(w[m].sum()),
                "mean_probability": conf,
                "observed_rate": acc,
            }
        )
    return float(ece), table


def evaluate(
    out: HeadOutput,
    section: np.ndarray,
    severity: np.ndarray,
    counts: np.ndarray,
    report_dir: Path | None = None,
    *,
    fail_fraction: np.ndarray | None = None,
) -> Evaluation:
    """Metrics on held-out distinct texts (``*_rows`` variants weight each text by its row count).

    ``section`` holds true (majority) section indices, ``severity`` true (majority) severity indices.
    Macro-F1 averages over the classes the held-out texts hold (``*_classes_present`` says how many): a
    prediction of an absent class is an error against the text's true class, not a new class scoring 0
    (averaging over every class the labels or predictions held made one stray prediction move the
    metric by 1/k; over all 9 sections a perfect model scored present/9). ``fail_brier``/``fail_ece``/``fail_auc``
    score ``fail_probability`` per text against its majority severity; with ``fail_fraction`` (each
    text's share of failing rows), ``fail_brier_rows``/``fail_ece_rows``/``fail_auc_rows`` score it
    against what the held-out rows show, each text weighted by its row count.
    """
    from sklearn.metrics import (
        accuracy_score,
        brier_score_loss,
        classification_report,
        f1_score,
        roc_auc_score,
    )

    sev_pred = out.severity_scores.argmax(axis=1)
    failing = np.array([SEVERITIES[i] in FAILING_SEVERITIES for i in severity], dtype=float)
    metrics: dict[str, float] = {}
    for name, y, p in (("section", section, out.section_index), ("severity", severity, sev_pred)):
        f1 = {"labels": np.unique(y), "average": "macro", "zero_division": 0}
        metrics[f"{name}_macro_f1"] = float(f1_score(y, p, **f1))
        metrics[f"{name}_accuracy"] = float(accuracy_score(y, p))
        metrics[f"{name}_macro_f1_rows"] = float(f1_score(y, p, sample_weight=counts, **f1))
        metrics[f"{name}_classes_present"] = float(len(np.unique(y)))
    prob = out.fail_probability.astype(np.float64)
    metrics["fail_brier"] = float(brier_score_loss(failing, prob))
    ece, table = expected_calibration_error(prob, failing)
    metrics["fail_ece"] = ece
    if 0 < failing.sum() < len(failing):
        metrics["fail_auc"] = float(roc_auc_score(failing, prob))
    calibration_rows: dict[str, Any] | None = None
    if fail_fraction is not None:
        f = np.asarray(fail_fraction, dtype=np.float64)
        w = np.asarray(counts, dtype=np.float64)
        # Brier over the held-out rows: a text's rows fail with share f, so (p - f)² + f(1 - f) per row
        metrics["fail_brier_rows"] = float(np.average((prob - f) ** 2 + f * (1 - f), weights=w))
        ece_rows, table_rows = expected_calibration_error(prob, f, weights=w)
        metrics["fail_ece_rows"] = ece_rows
        pos, neg = w * f, w * (1 - f)
        if pos.sum() > 0 and neg.sum() > 0:  # each text as its failing and its passing rows
            metrics["fail_auc_rows"] = float(
                roc_auc_score(
                    np.r_[np.ones(len(f)), np.zeros(len(f))], np.r_[prob, prob], sample_weight=np.r_[pos, neg]
                )
            )
        calibration_rows = {"bins": table_rows, "ece": ece_rows, "brier": metrics["fail_brier_rows"]}
    report = {
        "section": classification_report(
            section,
            out.section_index,
            labels=range(len(SECTIONS)),
            target_names=list(SECTIONS),
            output_dict=True,
            zero_division=0,
        ),
        "severity": classification_report(
            severity,
            sev_pred,
            labels=range(len(SEVERITIES)),
            target_names=list(SEVERITIES),
            output_dict=True,
            zero_division=0,
        ),
        "calibration": {"bins": table, "ece": ece, "brier": metrics["fail_brier"], "against": "majority label"},
        **(
            {"calibration_rows": {**calibration_rows, "against": "observed fail fraction, row-weighted"}}
            if calibration_rows is not None
            else {}
        ),
        "n_texts": int(len(section)),
        "n_rows": int(counts.sum()),
    }
    if report_dir is not None:
        _write_reports(report_dir, out, section, severity, sev_pred, report)
    return Evaluation(metrics, report)


def _write_reports(d: Path, out: HeadOutput, section, severity, sev_pred, report: dict[str, Any]) -> None:
    from sklearn.metrics import classification_report

    d.mkdir(parents=True, exist_ok=True)
    (d / "classification_report.json").write_text(json.dumps(report, indent=2))
    text = [
        "section\n"
        + classification_report(
            section,
            out.section_index,
            labels=range(len(SECTIONS)),
            target_names=list(SECTIONS),
            zero_division=0,
        ),
        "severity\n"
        + classification_report(
            severity, sev_pred, labels=range(len(SEVERITIES)), target_names=list(SEVERITIES), zero_division=0
        ),
    ]
    (d / "classification_report.txt").write_text("\n".join(text))
    _confusion_png(d / "confusion_section.png", section, out.section_index, list(SECTIONS), "section")
    _confusion_png(d / "confusion_severity.png", severity, sev_pred, list(SEVERITIES), "severity")
    _reliability_png(d / "calibration_fail_probability.png", report["calibration"], report.get("calibration_rows"))


def _confusion_png(path: Path, y: np.ndarray, p: np.ndarray, labels: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, p, labels=range(len(labels)))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    short = [lbl[:18] for lbl in labels]
    ax.set_xticks(range(len(labels)), short, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}, held out (counts; colour = row share)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _reliability_png(path: Path, calibration: dict[str, Any], rows: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration["bins"]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot(
        [b["mean_probability"] for b in bins],
        [b["observed_rate"] for b in bins],
        "o-",
        label="held-out texts vs majority label",
    )
    if rows is not None:
        ax.plot(
            [b["mean_probability"] for b in rows["bins"]],
            [b["observed_rate"] for b in rows["bins"]],
            "s-",
            label=f"held-out rows (ECE {rows['ece']:.3f}, Brier {rows['brier']:.3f})",
        )
    ax.set_xlabel("predicted fail_probability (bin mean)")
    ax.set_ylabel("observed fail rate")
    ax.set_title(
        f"fail_probability reliability (texts): ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def trivial_baseline(train_section: np.ndarray, train_severity: np.ndarray, n: int) -> HeadOutput:
    """The trivial model, as a head output for ``n`` held-out texts: the training texts' majority
    section and severity (index labels) for every text, and their fail rate as a constant
    ``fail_probability`` (AUC 0.5). :func:`evaluate` of it gives the ``baseline_*`` run metrics the
    quality floors compare with (:mod:`training.floors`)."""
    sec = int(np.bincount(np.asarray(train_section, dtype=np.int64), minlength=len(SECTIONS)).argmax())
    sev_idx = np.asarray(train_severity, dtype=np.int64)
    sev = int(np.bincount(sev_idx, minlength=len(SEVERITIES)).argmax())
    failing = [i for i, s in enumerate(SEVERITIES) if s in FAILING_SEVERITIES]
    rate = float(np.isin(sev_idx, failing).mean()) if len(sev_idx) else 0.0
    section_scores = np.zeros((n, len(SECTIONS)), dtype=np.float32)
    section_scores[:, sec] = 1.0
    severity_scores = np.zeros((n, len(SEVERITIES)), dtype=np.float32)
    severity_scores[:, sev] = 1.0
    return HeadOutput(
        section_index=np.full(n, sec, dtype=np.int64),
        section_scores=section_scores,
        severity_scores=severity_scores,
        fail_probability=np.full(n, rate, dtype=np.float32),
    )
