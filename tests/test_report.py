"""The results table: paired differences to the baseline with t intervals, on hand values."""

import numpy as np
import pandas as pd
import pytest

from stages.report import plot_drops, summarise, teacher_drops
from test_cache import TEACHER, block_arrays, make_store


def test_paired_difference_and_interval():
    runs = pd.DataFrame({
        "variant": ["kd"] * 3 + ["explain-kd"] * 3 + ["ce"],
        "seed": [0, 1, 2, 0, 1, 2, 0],
        "val_top1": [0.8] * 7,
        "test_top1": [0.80, 0.82, 0.84, 0.82, 0.83, 0.87, 0.7],
    })
    table = summarise(runs, "kd").set_index("variant")
    row = table.loc["explain-kd"]
    assert row.test_mean == pytest.approx(0.84)
    assert row.diff_vs_baseline == pytest.approx(0.02)  # paired differences 0.02, 0.01, 0.03
    half = 4.302652729911275 * 0.01 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
    assert (row.ci_low, row.ci_high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert pd.isna(table.loc["kd"].diff_vs_baseline) and pd.isna(table.loc["ce"].diff_vs_baseline)  # one seed
    assert list(table.index) == ["explain-kd", "kd", "ce"]


def test_teacher_drops_are_the_cached_scores_of_readable_rows(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.add_teacher("t1", TEACHER)
    rng = np.random.default_rng(0)
    written = {}
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        written[block] = block_arrays(rng, stop - start)
        written[block]["y_prob"] = np.full(stop - start, 0.8, np.float32)
        written[block]["o_prob"] = np.full(stop - start, 0.2, np.float32)
        store.write_valid(block, np.arange(start, stop) != 1)  # row 1 was unreadable
        store.write_block("t1", block, written[block])
    drops = teacher_drops(store)
    assert drops["t1"].shape == (store.num_samples - 1,)
    np.testing.assert_allclose(drops["t1"], 0.75)
    plot_drops(drops, tmp_path / "drops.png")
    assert (tmp_path / "drops.png").stat().st_size > 0
