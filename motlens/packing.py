"""Sequence packing: several texts share one row of an encoder call, so short texts carry no padding.

A padded batch costs its longest text times its size; a batch of random-length texts wastes ≈ 25 %
of that on padding (MOT free text: mean 37, p90 44, max 56 tokens in 16). Packing lays texts back
to back in rows of a chosen width; the graph (:mod:`motlens.onnx_export`) gets per-text segment ids
(attention stays inside each text) and positions that restart at 0 for every text, so each text's
embedding is the one it gets alone. The price is attention over the whole row, so wider rows are
not free: :func:`plan` picks the width with the lowest modelled cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Per-token cost grows by 1/ATTENTION_TOKENS for each token of row width (attention over the row).
#: Fitted on ONNX Runtime, 2 threads, MiniLM: rows of 80 at 92 % fill ran 91 % of length-sorted
#: batches, rows of 128 at 87 % fill 83 % (docs/benchmarks.md, "Packed rows").
ATTENTION_TOKENS = 1000


@dataclass(frozen=True)
class Packing:
    """Which texts go in which row (left to right), and the row width of the call."""

    rows: tuple[tuple[int, ...], ...]
    width: int

    @property
    def order(self) -> list[int]:
        """Text indices in the order their tokens appear (row by row)."""
        return [i for row in self.rows for i in row]

    def cost(self) -> float:
        return len(self.rows) * self.width * (1.0 + self.width / ATTENTION_TOKENS)


def _first_fit(lengths: Sequence[int], order: Sequence[int], width: int) -> Packing:
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = lengths[i]
        for r, u in enumerate(used):
            if u + n <= width:
                rows[r].append(i)
                used[r] = u + n
                break
        else:
            rows.append([i])
            used.append(n)
    return Packing(tuple(tuple(r) for r in rows), max(used))


def plan(lengths: Sequence[int], widths: Sequence[int] | None = None) -> Packing:
    """The cheapest first-fit-decreasing packing of texts with these token ``lengths``.

    ``widths`` are the row widths to try (default: from the longest text to twice it, in eighths);
    a width below the longest text is raised to it.
    """
    if not lengths:
        raise ValueError("nothing to pack")
    if min(lengths) < 1:
        raise ValueError("every text has at least one token")
    longest = max(lengths)
    if widths is None:
        step = max(1, longest // 8)
        widths = range(longest, 2 * longest + 1, step)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best: Packing | None = None
    for w in dict.fromkeys(max(int(w), longest) for w in widths):
        p = _first_fit(lengths, order, w)
        if best is None or p.cost() < best.cost():
            best = p
    assert best is not None
    return best


def pack_ids(ids: Sequence[Sequence[int]], packing: Packing) -> dict[str, np.ndarray]:
    """``input_ids``, ``position_ids`` and ``segment_ids`` ([rows, width], int64; segment 0 is padding)."""
    shape = (len(packing.rows), packing.width)
    input_ids = np.zeros(shape, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.zeros(shape, dtype=np.int64)
    for r, row in enumerate(packing.rows):
        at = 0
        for k, i in enumerate(row, start=1):
            n = len(ids[i])
            input_ids[r, at : at + n] = ids[i]
            position_ids[r, at : at + n] = np.arange(n)
            segment_ids[r, at : at + n] = k
            at += n
    return {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids}


def mean_pool(hidden: np.ndarray, segment_ids: np.ndarray, packing: Packing, lengths: Sequence[int]) -> np.ndarray:
    """Per-text mean of the token states ``hidden`` [rows, width, dim], in the texts' original order."""
    tokens = np.asarray(hidden, dtype=np.float32)[segment_ids > 0]  # row by row, texts back to back
    order = packing.order
    counts = np.asarray([lengths[i] for i in order])
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pooled = np.add.reduceat(tokens, starts, axis=0) / counts[:, None].astype(np.float32)
    out = np.empty_like(pooled)
    out[order] = pooled
    return out
