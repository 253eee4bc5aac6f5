"""The cluttered-digits data set: deterministic, stratified three-way split, what the spec says."""

import numpy as np

from pipeline.data import get_dataset
from pipeline.data.cluttered import render


def test_splits_are_disjoint_stratified_and_deterministic():
    splits = {s: get_dataset("cluttered-digits", s) for s in ("train", "val", "test")}
    assert [len(d) for d in splits.values()] == [1078, 359, 360]
    ids = [set(d.ids) for d in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert all(np.bincount(d.labels, minlength=10).min() >= 34 for d in splits.values())
    assert splits["train"].images.shape[1:] == (48, 48, 1)
    again = get_dataset("cluttered-digits", "val")
    assert np.array_equal(again.images, splits["val"].images)


def test_a_sample_is_its_digit_plus_dimmer_fragments_and_noise():
    digits = np.zeros((3, 20, 20), np.float32)
    digits[0] = 1.0  # the sample's digit: a bright square
    digits[1:] = 0.5
    canvas = render(0, digits, np.array([0, 1, 2]))
    assert canvas.shape == (48, 48)
    assert (canvas > 0.8).sum() >= 20 * 20 * 0.9  # the digit, at full intensity (noise aside)
    fragments = (canvas > 0.15) & (canvas < 0.55)  # fragments: 0.5 * (0.5 to 0.7)
    assert fragments.sum() > 0
    np.testing.assert_array_equal(canvas, render(0, digits, np.array([0, 1, 2])))
