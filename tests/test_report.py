"""The results table: paired differences to the baseline with t intervals, on hand values."""

import pandas as pd
import pytest

from stages.report import summarise


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
