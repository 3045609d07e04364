"""Sequence packing: every text placed once, rows within their width, per-text pooling exact."""

from __future__ import annotations

import numpy as np
import pytest

from motlens.packing import ATTENTION_TOKENS, mean_pool, pack_ids, plan


def _check_layout(lengths, packing):
    assert sorted(packing.order) == list(range(len(lengths)))
    assert packing.width >= max(lengths)
    assert max(sum(lengths[i] for i in row) for row in packing.rows) == packing.width


@pytest.mark.parametrize("seed", range(5))
def test_every_text_is_placed_once_within_the_row_width(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(3, 60, size=int(rng.integers(1, 48)))]
    auto = plan(lengths)
    _check_layout(lengths, auto)
    assert auto.width <= 2 * max(lengths)
    wide = plan(lengths, (256,))
    _check_layout(lengths, wide)
    assert len(wide.rows) <= len(auto.rows) and wide.width <= 256


def test_the_cheapest_width_wins():
    # one long text and five short: rows as wide as the long one hold all the short ones
    p = plan([50, 10, 10, 10, 10, 10])
    assert (len(p.rows), p.width) == (2, 50)
    # equal lengths: no width beats one text per row once attention over the row is counted
    p = plan([10] * 8, (10, 80))
    assert (len(p.rows), p.width) == (8, 10)
    assert p.cost() == pytest.approx(8 * 10 * (1 + 10 / ATTENTION_TOKENS))
    # a width below the longest text is raised to it
    assert plan([30, 5], (4,)).width == 30


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="nothing to pack"):
        plan([])
    with pytest.raises(ValueError, match="at least one token"):
        plan([3, 0])


def test_arrays_restart_positions_and_number_segments():
    ids = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]]
    p = plan([3, 2, 5], (8,))
    feed = pack_ids(ids, p)
    assert feed["input_ids"].shape == (len(p.rows), p.width) and feed["input_ids"].dtype == np.int64
    for r, row in enumerate(p.rows):
        at = 0
        for k, i in enumerate(row, start=1):
            n = len(ids[i])
            assert feed["input_ids"][r, at : at + n].tolist() == ids[i]
            assert feed["position_ids"][r, at : at + n].tolist() == list(range(n))
            assert (feed["segment_ids"][r, at : at + n] == k).all()
            at += n
        assert (feed["segment_ids"][r, at:] == 0).all() and (feed["input_ids"][r, at:] == 0).all()


def test_mean_pool_is_each_texts_own_mean_in_input_order():
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(2, 40, size=17)]
    ids = [list(range(n)) for n in lengths]
    p = plan(lengths, (96,))
    feed = pack_ids(ids, p)
    hidden = rng.normal(size=(*feed["input_ids"].shape, 8)).astype(np.float32)
    got = mean_pool(hidden, feed["segment_ids"], p, lengths)
    for r, row in enumerate(p.rows):
        at = 0
        for i in row:
            np.testing.assert_allclose(got[i], hidden[r, at : at + lengths[i]].mean(axis=0), rtol=1e-5, atol=1e-6)
            at += lengths[i]
