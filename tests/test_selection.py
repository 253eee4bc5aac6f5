"""`pipeline store selection` on conftest's digits test-split store: every policy's teacher shares, right share
and expert share, against the same figures computed here from the store's raw arrays with numpy."""

import json

import numpy as np
import pytest
import zarr

from conftest import invoke
from pipeline.data import get_dataset


@pytest.fixture(scope="module")
def raw(digits_test_store):
    """The store's eval-view arrays, read with zarr alone: per teacher (name, Y, O, whether its logits are right)."""
    root = zarr.open_group(digits_test_store, mode="r")
    labels = root["labels"][...]
    teachers = sorted(root["teachers"].group_keys())
    y = np.stack([root[f"teachers/{t}/y_prob"][:, 0] for t in teachers], 1).astype(np.float64)
    o = np.stack([root[f"teachers/{t}/o_prob"][:, 0] for t in teachers], 1).astype(np.float64)
    right = np.stack([root[f"teachers/{t}/logits"][:, 0].astype(np.float32).argmax(1) == labels for t in teachers], 1)
    return teachers, y, o, right


def lowest_drop_by_hand(y, o, allowed=None):
    """The thesis' choice, row by row: the lowest max(0, Y - O) / Y (of the `allowed` teachers), drops within 0.01
    of it to the larger Y; and whether two or more were that close."""
    choice, tied = [], []
    for i, (y_row, o_row) in enumerate(zip(y, o)):
        drops = {m: max(0.0, a - b) / a for m, (a, b) in enumerate(zip(y_row, o_row))
                 if allowed is None or allowed[i, m]}
        near = [m for m, d in drops.items() if d <= min(drops.values()) + 0.01]
        choice.append(max(near, key=lambda m: (y_row[m], -m)))
        tied.append(len(near) > 1)
    return np.array(choice), np.array(tied)


def test_the_shares_right_and_expert_figures_match_numpy_on_the_raw_arrays(digits_test_store, raw, tmp_path):
    teachers, y, o, right = raw
    data = get_dataset("digits", "test")
    ids = [data.sample_id(i) for i in range(len(y))]
    group = np.where(np.arange(len(y)) % 3 == 0, "left", "right")  # every third sample is "left"
    group[5] = "none"  # a group without an expert: left out of the expert share
    pd_rows = ["id,group"] + [f"{i},{g}" for i, g in zip(ids, group)][:-1]  # the last sample has no group at all
    (tmp_path / "groups.csv").write_text("\n".join(pd_rows) + "\n")
    result = invoke("store", "selection", digits_test_store, "--groups", tmp_path / "groups.csv",
                    "--expert", f"left={teachers[0]}", "--expert", f"right={teachers[1]}", "--json", tmp_path / "s.json")
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["rows"] == len(y) and report["any_right"] == pytest.approx(right.any(1).mean())
    assert f"some teacher is right on {right.any(1).mean():.2%}" in result.output

    chosen, tied = lowest_drop_by_hand(y, o)
    thesis = report["policies"]["per-sample"]
    assert thesis["tie"] == pytest.approx(tied.mean()) and tied.any()
    assert thesis["shares"] == {t: pytest.approx((chosen == m).mean()) for m, t in enumerate(teachers)}
    assert thesis["right"] == pytest.approx(right[np.arange(len(y)), chosen].mean())
    expert = np.array([{"left": 0, "right": 1}.get(g, -1) for g in group])
    expert[-1] = -1  # the sample the file leaves out
    counted = expert >= 0
    assert report["expert_rows"] == counted.sum() == len(y) - 2
    assert thesis["expert"] == pytest.approx((chosen[counted] == expert[counted]).mean())

    confident = y.argmax(1)  # no ties of float Y on these teachers
    assert report["policies"]["confident"]["expert"] == pytest.approx((confident[counted] == expert[counted]).mean())
    # global follows one teacher on every row: its expert share is that teacher's groups' share
    best = report["policies"]["global"]["shares"]
    only = teachers.index(max(best, key=best.get))
    assert best[teachers[only]] == 1.0 and only == (np.maximum(0, y - o) / y).mean(0).argmin()  # lowest mean drop
    assert report["policies"]["global"]["expert"] == pytest.approx((expert[counted] == only).mean())
    # correct: the lowest drop among the teachers that are right (all of them where none is)
    allowed = right | ~right.any(1, keepdims=True)
    correct, _ = lowest_drop_by_hand(y, o, allowed)
    assert report["policies"]["correct"]["right"] == pytest.approx(right[np.arange(len(y)), correct].mean())
    # drop-z: each teacher's drops z-scored over the store's rows (sample std), the lowest wins; float32 as stored,
    # so a near tie may fall the other way in a row or two
    drops = np.maximum(0, y - o) / y
    z = (drops - drops.mean(0)) / drops.std(0, ddof=1)
    assert report["policies"]["drop-z"]["shares"] == {
        t: pytest.approx((z.argmin(1) == m).mean(), abs=2 / len(y)) for m, t in enumerate(teachers)}
    # every policy's weights are a distribution over the teachers on every row
    for figures in report["policies"].values():
        assert sum(figures["shares"].values()) == pytest.approx(1.0)
        assert 0 <= figures["right"] <= report["any_right"] + 1e-9


def test_bad_groups_and_experts_stop_in_one_line(digits_test_store, tmp_path):
    groups = tmp_path / "groups.csv"
    groups.write_text("id,group\ndigits-9999,a\n")
    result = invoke("store", "selection", digits_test_store, "--groups", groups, exit_code=1)
    assert "1 id(s) are not samples of this split, first 'digits-9999'" in result.output
    groups.write_text("id,group\ndigits-0021,a\n")
    result = invoke("store", "selection", digits_test_store, "--groups", groups, "--expert", "a=nobody", exit_code=1)
    assert "'nobody' is not a teacher of the store; choose one of: resnet8_slim, vgg8_bn" in result.output
    result = invoke("store", "selection", digits_test_store, "--groups", groups, "--expert", "b=vgg8_bn", exit_code=1)
    assert "no sample has group 'b'; the groups file names: a" in result.output
    result = invoke("store", "selection", digits_test_store, "--expert", "a=vgg8_bn", exit_code=1)
    assert "--expert needs --groups" in result.output
