"""Text mixes for the load generator: a realistic MOT mix and a novel-only mix.

The catalogue reuses the synthetic generator's vocabulary (``training.synth``: manual references,
defect and advisory texts, locations, tester comments). Realistic mix: catalogue texts drawn with
Zipf-distributed popularity, plus a configurable share of novel free text (a catalogue text with a
unique tester comment, as real records carry). Novel-only: every text is new, so no cache can help.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Used only when training.synth is unavailable: (manual ref, [(defect, category)], advisory, has location).
_FALLBACK = [
    ("1.1.14 (a) (ii)", [("Brake disc significantly and obviously worn", "Major")],
     "Brake disc worn, pitted or scored", True),
    ("1.1.11 (c)", [("Brake pipe excessively corroded", "Major")], "Brake pipe slightly corroded", True),
    ("2.2.1 (c)", [("Steering rack gaiter split", "Minor")], "Steering rack gaiter perished", True),
    ("3.2 (a)", [("Windscreen damaged in zone A", "Major")], "Windscreen chipped outside zone A", False),
    ("4.1.2 (a)", [("Headlamp aim too high", "Major")], "Headlamp lens slightly deteriorated", True),
    ("5.2.3 (e)", [("Tyre tread depth below requirements of 1.6mm", "Major")],
     "Tyre worn close to legal limit", True),
    ("5.3.1 (b)", [("Coil spring fractured or seriously weakened", "Major")], "Coil spring corroded", True),
    ("6.1.1 (c)", [("Body seriously corroded", "Major")], "Sill corroded but not seriously weakened", True),
    ("7.1.1 (b)", [("Seat belt buckle not working", "Major")], "Seat belt webbing slightly frayed", False),
    ("8.2.1.2 (a)", [("Exhaust emits excessive smoke", "Major")], "Exhaust leaking slightly", False),
]  # fmt: skip
_FALLBACK_LOCATIONS = ["Nearside Front", "Offside Front", "Nearside Rear", "Offside Rear"]
_FALLBACK_COMMENTS = ["both sides", "slight", "recommend replacement", "advised to monitor", "inner edge"]
_DETAILS = (
    "tread at {a}.{b}mm", "pressure {n}psi", "quote £{n} given", "job ref {u}", "odometer {u} miles",
    "noted at {n}° to wheel", "{a}{b}mm split", "customer {u} advised", "see sheet {u}",
)  # fmt: skip


@dataclass(frozen=True)
class CatalogueText:
    text: str
    section: int
    severity: str


def _vocabulary() -> tuple[list, list[str], list[str]]:
    try:
        from training import synth

        rows = [(ref, defects, advisory, loc) for ref, _g, _i, defects, advisory, loc in synth._CATALOGUE]
        locations = [f"{lat} {lon}" for lat, lon, vert in synth._LOCATIONS if lon and not vert]
        return rows, locations, list(synth._COMMENTS)
    except (ImportError, AttributeError, ValueError):
        return _FALLBACK, _FALLBACK_LOCATIONS, _FALLBACK_COMMENTS


def build_catalogue(max_locations: int = 4) -> list[CatalogueText]:
    """Distinct catalogue texts as testers' records show them: location + defect + (manual reference)."""
    rows, locations, _ = _vocabulary()
    out: list[CatalogueText] = []
    for ref, defects, advisory, has_loc in rows:
        section = int(ref.split(".")[0])
        entries = [(d, c.lower()) for d, c in defects] + [(advisory, "advisory")]
        for (text, severity), loc in itertools.product(entries, locations[:max_locations] if has_loc else [""]):
            full = f"{loc} {text} ({ref})".strip()
            out.append(CatalogueText(full, section, severity))
    return out


DRAW_CHUNK = 4096


class TextMix:
    """An endless, seeded stream of texts: Zipf over the catalogue plus a share of novel text."""

    def __init__(self, novel_share: float, seed: int = 0, zipf_s: float = 1.1) -> None:
        if not 0.0 <= novel_share <= 1.0:
            raise ValueError(f"novel_share must be in [0, 1], got {novel_share}")
        self.catalogue = [c.text for c in build_catalogue()]
        self.novel_share = novel_share
        self._rng = np.random.default_rng(seed)
        order = self._rng.permutation(len(self.catalogue))
        weights = 1.0 / np.arange(1, len(order) + 1) ** zipf_s
        self._p = np.empty(len(order))
        self._p[order] = weights / weights.sum()
        _, _, self._comments = _vocabulary()
        self._serial = itertools.count(100_000 + int(seed) * 10_000_000)
        self._novel: np.ndarray = np.zeros(0, dtype=bool)
        self._picks: list[int] = []
        self._next = 0

    def novel(self) -> str:
        """A text no one has sent before (catalogue text + tester comment + a unique detail)."""
        base = self.catalogue[int(self._rng.integers(len(self.catalogue)))]
        comment = self._comments[int(self._rng.integers(len(self._comments)))]
        serial = next(self._serial)
        detail = _DETAILS[int(self._rng.integers(len(_DETAILS)))].format(
            a=int(self._rng.integers(1, 9)), b=int(self._rng.integers(0, 9)),
            n=int(self._rng.integers(10, 400)), u=serial,
        )  # fmt: skip
        return f"{base} {comment}, {detail}" + ("" if str(serial) in detail else f", ref {serial}")

    def take(self, n: int) -> list[str]:
        """The next ``n`` texts. Draws are made :data:`DRAW_CHUNK` at a time: the load generator takes one
        text per request, and a weighted ``choice`` per call cost more CPU than the server's cache hit."""
        out: list[str] = []
        while len(out) < n:
            if self._next >= len(self._picks):
                self._novel = self._rng.random(DRAW_CHUNK) < self.novel_share
                self._picks = self._rng.choice(len(self.catalogue), size=DRAW_CHUNK, p=self._p).tolist()
                self._next = 0
            i = self._next
            self._next += 1
            out.append(self.novel() if self._novel[i] else self.catalogue[self._picks[i]])
        return out


def make_mix(name: str, novel_share: float = 0.1, seed: int = 0) -> TextMix:
    """``realistic`` (catalogue Zipf + ``novel_share`` novel) or ``novel`` (novel only)."""
    if name == "realistic":
        return TextMix(novel_share, seed)
    if name == "novel":
        return TextMix(1.0, seed)
    raise ValueError(f"unknown mix {name!r}; expected 'realistic' or 'novel'")
