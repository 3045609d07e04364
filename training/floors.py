"""Absolute quality floors: a version must beat the trivial baseline on its own held-out set.

Training logs, beside every held-out metric, the same metric of the trivial baseline on the same
held-out texts (``baseline_<metric>``, :func:`training.evaluate.trivial_baseline`: the training
majority class for both heads, the training fail rate as a constant ``fail_probability``). A gated
metric's floor is its baseline plus :data:`DEFAULT_MARGIN`; a ranking metric (``*auc``) needs no
logged baseline — any constant score has AUC 0.5 — and its floor is ``0.5 +``
:data:`DEFAULT_AUC_MARGIN`. All gated metrics are higher-is-better.

``motlens train`` sets its alias only when the floors pass; the promotion offline gate re-checks them
from the candidate's run metrics (docs/promotion.md "Gates"). A floor whose metric or baseline the run
does not have (a version registered by hand, or by a motlens that logged no baselines) is *not
checked* and named as such: a missing reference is skipped, as the offline comparison skips metrics
production lacks. A baseline that is not a finite number (NaN) fails its floor: no value clears it.

Margins (docs/training.md "Quality floors"): on 20,000 generated rows, clean and with ambiguous
severities, shuffled-label trainings beat the majority baseline by up to 0.14 in macro-F1 (their
predictions spread over all classes) and reached AUC 0.46-0.52; the weakest real training measured (a
linear head after 3 epochs) beat it by 0.34 and reached AUC 0.71.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: the metrics floored by default (``motlens train``; promotion floors its ``OFFLINE_METRICS``)
FLOOR_METRICS: tuple[str, ...] = ("section_macro_f1", "severity_macro_f1", "fail_auc")
#: every higher-is-better held-out metric training logs (``training.evaluate``): what the offline gate
#: and the floors may be given
GATEABLE_METRICS: tuple[str, ...] = (
    *(f"{head}_{m}" for head in ("section", "severity") for m in ("macro_f1", "accuracy", "macro_f1_rows")),
    "fail_auc",
    "fail_auc_rows",
)
BASELINE_PREFIX = "baseline_"
#: how far a macro-F1 (or accuracy) must lie above the trivial baseline's on the same held-out set
DEFAULT_MARGIN = 0.2
#: how far an AUC must lie above 0.5 (what any constant score gets)
DEFAULT_AUC_MARGIN = 0.1
CHANCE_AUC = 0.5


def is_auc(metric: str) -> bool:
    return metric == "auc" or metric.endswith("_auc")


@dataclass
class FloorCheck:
    """The outcome: ``failed`` (metric < floor, or a baseline that is not a number), ``unchecked`` (metric
    or baseline missing), ``values`` (value, baseline, floor of each checked metric)."""

    failed: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    values: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def checked(self) -> list[str]:
        return list(self.values)

    def describe(self) -> str:
        """One line: what failed, what passed, what could not be checked and why."""
        parts = []
        if self.failed:
            parts.append("below the quality floor: " + "; ".join(self.failed))
        elif self.checked:
            parts.append(
                "above the quality floors: "
                + ", ".join(f"{m} {self.values[m]['value']:.4f} ≥ {self.values[m]['floor']:.4f}" for m in self.checked)
            )
        if self.unchecked:
            parts.append("floors not checked: " + "; ".join(self.unchecked))
        return "; ".join(parts) if parts else "no floors configured"


def check_floors(
    metrics: Mapping[str, Any],
    gated: Sequence[str] = FLOOR_METRICS,
    margin: float = DEFAULT_MARGIN,
    auc_margin: float = DEFAULT_AUC_MARGIN,
) -> FloorCheck:
    """Each of ``gated`` in ``metrics`` must reach its floor (module docstring)."""
    out = FloorCheck()
    for m in gated:
        if m not in metrics:
            out.unchecked.append(f"run has no {m}")
            continue
        value = float(metrics[m])
        if is_auc(m):
            baseline, floor, how = CHANCE_AUC, CHANCE_AUC + auc_margin, f"0.5 + {auc_margin}"
        elif BASELINE_PREFIX + m in metrics:
            baseline = float(metrics[BASELINE_PREFIX + m])
            if not math.isfinite(baseline):  # a NaN floor compares False: anything would pass it
                out.failed.append(f"{m} {value:.4f}: no floor, its {BASELINE_PREFIX}{m} {baseline} is not a number")
                continue
            floor, how = baseline + margin, f"baseline {baseline:.4f} + {margin}"
        else:
            out.unchecked.append(f"run has no {BASELINE_PREFIX}{m} (registered by hand or by an older motlens)")
            continue
        out.values[m] = {"value": value, "baseline": baseline, "floor": floor}
        if not math.isfinite(value) or value < floor:  # NaN compares False: it would pass
            out.failed.append(f"{m} {value:.4f} < {floor:.4f} ({how})")
    return out
