"""The defect head: section, severity and fail probability from an embedding plus context.

Weights are torch-``nn.Linear``-shaped arrays stored as safetensors; the feature spec and label
lists as JSON. Loading executes no code. Inference is plain numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from motlens.labels import FAILING_SEVERITIES, SECTIONS, SEVERITIES, fuel_key

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
CONTEXT_FIELDS: tuple[str, ...] = ("make", "model", "fuel_type", "vehicle_age_years", "odometer_miles")
_GATHER_ROWS = 4096  # rows gathered per block by ``featurize(rows=…)`` (6 MB of 384-d float32)


@dataclass(frozen=True)
class FeatureSpec:
    """How context fields become features (fitted on training data)."""

    age_mean: float = 10.0
    age_std: float = 5.0
    log_odo_mean: float = 11.0
    log_odo_std: float = 1.0
    fuel_vocab: tuple[str, ...] = ("PE", "DI", "EL", "HY", "OT")

    @property
    def n_context(self) -> int:
        # age, age-missing, log-odometer, odometer-missing, fuel one-hot + unknown
        return 4 + len(self.fuel_vocab) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "age_mean": self.age_mean,
            "age_std": self.age_std,
            "log_odo_mean": self.log_odo_mean,
            "log_odo_std": self.log_odo_std,
            "fuel_vocab": list(self.fuel_vocab),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            age_mean=float(d["age_mean"]),
            age_std=float(d["age_std"]),
            log_odo_mean=float(d["log_odo_mean"]),
            log_odo_std=float(d["log_odo_std"]),
            fuel_vocab=tuple(d["fuel_vocab"]),
        )

    def context_features(self, n: int, context: Mapping[str, Sequence[Any] | None] | None) -> np.ndarray:
        """[N, n_context] float32 features; missing values get a zero plus a missing flag."""
        ctx = context or {}
        out = np.zeros((n, self.n_context), dtype=np.float32)
        ages = ctx.get("vehicle_age_years")
        odos = ctx.get("odometer_miles")
        fuels = ctx.get("fuel_type")
        fuel_index = {fuel_key(f): i for i, f in enumerate(self.fuel_vocab)}
        unknown = len(self.fuel_vocab)
        for i in range(n):
            age = _num(ages[i]) if ages is not None else None
            if age is None:
                out[i, 1] = 1.0
            else:
                out[i, 0] = (age - self.age_mean) / self.age_std
            odo = _num(odos[i]) if odos is not None else None
            if odo is None or odo < 0:
                out[i, 3] = 1.0
            else:
                out[i, 2] = (math.log1p(odo) - self.log_odo_mean) / self.log_odo_std
            fuel = fuels[i] if fuels is not None else None
            j = fuel_index.get(fuel_key(str(fuel)), unknown) if fuel else unknown
            out[i, 4 + j] = 1.0
        return out


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


@dataclass
class HeadOutput:
    section_index: np.ndarray  # [N] int
    section_scores: np.ndarray  # [N, 9] probabilities
    severity_scores: np.ndarray  # [N, 4] probabilities
    fail_probability: np.ndarray  # [N]

    @property
    def section(self) -> list[str]:
        return [SECTIONS[i] for i in self.section_index]

    @property
    def section_score(self) -> np.ndarray:
        return self.section_scores[np.arange(len(self.section_index)), self.section_index]

    @property
    def severity(self) -> list[str]:
        return [SEVERITIES[i] for i in self.severity_scores.argmax(axis=1)]


@dataclass
class DefectHead:
    """A small MLP (optional hidden layer) with two softmax outputs."""

    weights: dict[str, np.ndarray]
    features: FeatureSpec = field(default_factory=FeatureSpec)
    sections: tuple[str, ...] = SECTIONS
    severities: tuple[str, ...] = SEVERITIES

    def featurize(
        self,
        embeddings: np.ndarray,
        context: Mapping[str, Sequence[Any] | None] | None = None,
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """[N, dim + n_context] float32: the embeddings beside their context features, written into
        one array (no float32 or concatenated copies: training featurises millions of rows).

        ``rows``: featurise only these rows of ``embeddings`` (``context`` then holds theirs),
        gathered a block at a time instead of copying them out first.
        """
        n = len(embeddings) if rows is None else len(rows)
        dim = embeddings.shape[1]
        out = np.empty((n, dim + self.features.n_context), dtype=np.float32)
        if rows is None:
            out[:, :dim] = embeddings
        else:
            for start in range(0, n, _GATHER_ROWS):
                out[start : start + _GATHER_ROWS, :dim] = embeddings[rows[start : start + _GATHER_ROWS]]
        out[:, dim:] = self.features.context_features(n, context)
        return out

    def predict(
        self,
        embeddings: np.ndarray,
        context: Mapping[str, Sequence[Any] | None] | None = None,
        rows: np.ndarray | None = None,
    ) -> HeadOutput:
        x = self.featurize(embeddings, context, rows)
        if "trunk.weight" in self.weights:
            x = np.maximum(x @ self.weights["trunk.weight"].T + self.weights["trunk.bias"], 0.0)
        sec = _softmax(x @ self.weights["section.weight"].T + self.weights["section.bias"])
        sev = _softmax(x @ self.weights["severity.weight"].T + self.weights["severity.bias"])
        failing = [i for i, s in enumerate(self.severities) if s in FAILING_SEVERITIES]
        return HeadOutput(
            section_index=sec.argmax(axis=1),
            section_scores=sec.astype(np.float32),
            severity_scores=sev.astype(np.float32),
            fail_probability=sev[:, failing].sum(axis=1).astype(np.float32),
        )

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.weights.items()},
                  str(directory / WEIGHTS_FILE))
        config = {
            "sections": list(self.sections),
            "severities": list(self.severities),
            "features": self.features.to_json(),
            "context_fields": list(CONTEXT_FIELDS),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, directory: Path) -> DefectHead:
        from safetensors.numpy import load_file

        config = json.loads((directory / CONFIG_FILE).read_text())
        weights = load_file(str(directory / WEIGHTS_FILE))
        head = cls(
            weights=weights,
            features=FeatureSpec.from_json(config["features"]),
            sections=tuple(config["sections"]),
            severities=tuple(config["severities"]),
        )
        if head.sections != SECTIONS or head.severities != SEVERITIES:
            raise ValueError("head label sets differ from the prediction contract")
        return head


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
