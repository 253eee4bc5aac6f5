"""The report: paired differences to the baseline with t intervals on hand values, the
teachers' confidence drops, and the explanation grid read from a test-split store."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from scipy import stats
from click.testing import CliRunner
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import make_teacher
from pipeline.cli import main
from pipeline.config import ReportConfig
from pipeline.data import get_dataset
from pipeline.errors import PipelineError
from pipeline.models.checkpoint import load_checkpoint
from pipeline.report import (compare, comparison_pairs, explanation_rows, make_report, plot_drops, plot_explanations,
                             summarise, teacher_drops, write_metrics)
from pipeline.store.teacher_store import TeacherStore
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


def test_the_summary_is_written_as_dvc_metrics(tmp_path):
    runs = pd.DataFrame({"variant": ["kd"] * 3 + ["explain-kd"] * 3 + ["ce"], "seed": [0, 1, 2, 0, 1, 2, 0],
                         "val_top1": [0.8] * 7, "test_top1": [0.80, 0.82, 0.84, 0.82, 0.83, 0.87, 0.7]})
    write_metrics(summarise(runs, "kd"), compare(runs, [("explain-kd", "kd")]), tmp_path / "metrics" / "study.json")
    near = lambda value: pytest.approx(value, abs=1e-6)  # noqa: E731 (the file rounds to 6 decimals)
    half = 4.302652729911275 * 0.01 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n) of the differences 0.02, 0.01, 0.03
    assert json.loads((tmp_path / "metrics" / "study.json").read_text()) == {
        "explain-kd": {"seeds": 3, "test_mean": near(0.84), "test_std": near(0.0007 ** 0.5), "pairs": 3,
                       "diff_vs_baseline": near(0.02), "ci_low": near(0.02 - half), "ci_high": near(0.02 + half)},
        "kd": {"seeds": 3, "test_mean": near(0.82), "test_std": near(0.02)},
        "ce": {"seeds": 1, "test_mean": near(0.7)},  # one seed: no spread, no paired difference
        "comparisons": {"explain-kd - kd": {  # a family of one: Holm changes nothing
            "pairs": 3, "diff": near(0.02), "p": near(P_EXPLAIN_KD), "ci_low": near(0.02 - half),
            "ci_high": near(0.02 + half), "p_holm": near(P_EXPLAIN_KD), "holm_low": near(0.02 - half),
            "holm_high": near(0.02 + half)}},
    }


P_EXPLAIN_KD = 2 * stats.t.sf(0.02 / (0.01 / 3 ** 0.5), 2)  # paired t = mean / (sd / sqrt(n)), 2 degrees of freedom


def test_several_primary_comparisons_get_holms_adjusted_p_values_and_intervals():
    diffs = {"a": [0.05, 0.06, 0.04, 0.05], "b": [0.01, -0.01, 0.02, 0.00], "c": [0.03, 0.02, 0.04, 0.01]}
    base = [0.80, 0.81, 0.79, 0.80]
    runs = pd.DataFrame([{"variant": v, "seed": s, "test_top1": base[s] + d[s]} for v, d in diffs.items()
                         for s in range(4)] + [{"variant": "kd", "seed": s, "test_top1": base[s]} for s in range(4)])
    table = compare(runs, comparison_pairs(["a:kd", "b:kd", "c:kd"], sorted(runs.variant.unique()), "kd"))
    table = table.set_index("comparison")
    p = {v: stats.ttest_rel(np.add(base, d), base).pvalue for v, d in diffs.items()}  # scipy's paired t test
    assert [table.at[f"{v} - kd", "p"] for v in "abc"] == [pytest.approx(p[v]) for v in "abc"]
    assert p["a"] < p["c"] < p["b"]  # Holm's order: a at 0.05 / 3, c at 0.05 / 2, b at 0.05
    holm = {"a": 3 * p["a"], "c": max(3 * p["a"], 2 * p["c"]), "b": max(3 * p["a"], 2 * p["c"], p["b"])}
    assert {v: table.at[f"{v} - kd", "p_holm"] for v in "abc"} == {v: pytest.approx(min(1, h)) for v, h in holm.items()}
    se = np.std(diffs["a"], ddof=1) / 2
    assert table.at["a - kd", "holm_high"] - 0.05 == pytest.approx(stats.t.ppf(1 - 0.05 / 6, 3) * se)
    assert table.at["a - kd", "ci_high"] - 0.05 == pytest.approx(stats.t.ppf(0.975, 3) * se)
    for row in table.itertuples():  # an adjusted interval excludes 0 exactly where the adjusted p-value is below 0.05
        assert (row.holm_low > 0 or row.holm_high < 0) == (row.p_holm < 0.05), row
        assert row.holm_high - row.holm_low >= row.ci_high - row.ci_low
    assert table.at["a - kd", "p_holm"] < 0.05 < table.at["b - kd", "p_holm"]


def test_a_comparison_without_two_pairs_still_counts_in_holms_family():
    runs = pd.DataFrame([{"variant": "kd", "seed": s, "test_top1": 0.8} for s in range(3)]
                        + [{"variant": "a", "seed": s, "test_top1": 0.8 + d} for s, d in enumerate([0.01, 0.03, 0.02])]
                        + [{"variant": "b", "seed": 0, "test_top1": 0.9}])  # one seed: no test
    table = compare(runs, [("a", "kd"), ("b", "kd")]).set_index("comparison")
    p = stats.ttest_rel([0.81, 0.83, 0.82], [0.8] * 3).pvalue
    assert table.at["a - kd", "p_holm"] == pytest.approx(min(1, 2 * p))  # m = 2, not 1
    assert pd.isna(table.at["b - kd", "p"]) and pd.isna(table.at["b - kd", "p_holm"]) and table.at["b - kd", "pairs"] == 1


def test_comparisons_default_to_every_variant_against_the_baseline_and_name_unknown_variants():
    assert comparison_pairs([], ["ce", "ekd", "kd"], "kd") == [("ce", "kd"), ("ekd", "kd")]
    with pytest.raises(PipelineError, match="no runs of ekd-b1; the runs' variants: ce, ekd, kd"):
        comparison_pairs(["ekd-b1:kd"], ["ce", "ekd", "kd"], "kd")
    with pytest.raises(PipelineError, match="names a comparison twice, which would count it twice in Holm's"):
        comparison_pairs(["ekd:kd", "ce:kd", "ekd:kd"], ["ce", "ekd", "kd"], "kd")


def test_teacher_drops_are_the_cached_scores_of_readable_rows(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.add_teacher("t1", TEACHER)
    rng = np.random.default_rng(0)
    written = {}
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        written[block] = block_arrays(rng, stop - start)
        written[block]["y_prob"] = np.full((stop - start, 1), 0.8, np.float32)
        written[block]["o_prob"] = np.full((stop - start, 1), 0.2, np.float32)
        store.write_samples(block, {"valid": np.arange(start, stop) != 1,  # row 1 was unreadable
                                    "view_boxes": np.tile([0, 0, 4, 4], (stop - start, 1, 1)),
                                    "view_flips": np.zeros((stop - start, 1), bool)})
        store.write_block("t1", block, written[block])
    drops = teacher_drops(store)
    assert drops["t1"].shape == (store.num_samples - 1,)
    np.testing.assert_allclose(drops["t1"], 0.75)
    plot_drops(drops, tmp_path / "drops.png")
    assert (tmp_path / "drops.png").stat().st_size > 0


def test_explanation_grid_shows_cached_teacher_maps_and_student_maps(tmp_path):
    teachers = [make_teacher(tmp_path / f"{arch}.pt", arch, seed=i) for i, arch in enumerate(("resnet8_slim", "vgg8_bn"))]
    result = CliRunner().invoke(main, ["extract-teachers", "--split", "test", "--teachers", ",".join(map(str, teachers)),
                                       "--store", str(tmp_path / "test.zarr")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    student = make_teacher(tmp_path / "students" / "ce-s0" / "checkpoint.pt", "resnet8_slim", seed=7)
    store, test = TeacherStore.open(tmp_path / "test.zarr"), get_dataset("digits", "test")

    rows = explanation_rows(store, test, {"ce-s0": student}, 3)
    picked = [0, 180, 359]  # spread over the 360 test images
    assert [row["label"] for row in rows] == test.labels[picked].tolist()
    cached = {name: {key: store.teacher_group(name)[key][picked] for key in ("y_prob", "o_prob")}
              for name in store.teachers}
    y = torch.stack([torch.from_numpy(cached[name]["y_prob"]) for name in store.teachers], 1)
    o = torch.stack([torch.from_numpy(cached[name]["o_prob"]) for name in store.teachers], 1)
    cams = {name: zarr.open_group(tmp_path / "test.zarr", mode="r")[f"teachers/{name}/cam"][picked, 0].astype(np.float32)
            for name in store.teachers}  # the cached maps, read with plain zarr (their scale cancels in min-max)
    model, _ = load_checkpoint(student)
    pixels = torch.from_numpy(np.stack([test.image(i) for i in picked])).permute(0, 3, 1, 2)
    x = torch.empty(pixels.shape).copy_((pixels.float() / 255 - 0.3) / 0.32)  # default strides (oneDNN's backward
    # crashes on the channel stride 1 that a permuted (B, H, W, 1) batch keeps)
    own = GradCAM(model=model, target_layers=[model.features])(  # the grad-cam package's maps of the student
        input_tensor=x, targets=[ClassifierOutputTarget(int(label)) for label in test.labels[picked]])
    for i, row in enumerate(rows):
        assert list(row["maps"]) == [*store.teachers, "ce-s0"]
        np.testing.assert_array_equal(row["image"], test.image(picked[i]))
        for name in store.teachers:  # upsampled to the image and min-max scaled, as the package scales maps
            expected = scale_cam_image(scale_cam_image(cams[name][i:i + 1], (32, 32)))[0]
            np.testing.assert_allclose(row["maps"][name], expected, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(row["maps"]["ce-s0"], own[i], atol=1e-4)
        drops = [max(0.0, float(y[i, m] - o[i, m])) / float(y[i, m]) for m in range(len(store.teachers))]
        for m, name in enumerate(store.teachers):
            assert row["drops"][name] == pytest.approx(drops[m])
        # lowest drop, drops within 0.01 of it to the larger Y (written out, not with the scoring module)
        tied = [m for m in range(len(drops)) if drops[m] <= min(drops) + 0.01]
        best = max(tied, key=lambda m: (float(y[i, m]), -m))
        assert row["chosen"] == store.teachers[best]
    plot_explanations(rows, tmp_path / "explanations.png")
    assert (tmp_path / "explanations.png").stat().st_size > 0

    zarr.open_group(tmp_path / "test.zarr", mode="r+")["valid"][0] = False  # as if image 0 were unreadable ...
    TeacherStore.open(tmp_path / "test.zarr", mode="r+").digests.bind(None, 0, ["valid"])  # ... when extraction wrote it
    assert [row["label"] for row in explanation_rows(store, test, {}, 3)] == test.labels[[1, 180, 359]].tolist()

    report = dict(students_dir=str(tmp_path / "students"), store=str(tmp_path / "test.zarr"), explain_runs=["ce-s0"])
    with pytest.raises(PipelineError, match="--explain-runs kd-s0: no such run"):
        make_report(ReportConfig(**report | {"explain_runs": ["ce-s0", "kd-s0"]}))
    with pytest.raises(PipelineError, match="made from dataset.name='digits', not 'cluttered-digits'"):
        make_report(ReportConfig(**report | {"dataset": "cluttered-digits"}))  # a store of other data is refused


def test_two_runs_of_one_variant_and_seed_stop_the_report_naming_both(tmp_path):
    for run_name in ("kd-s1", "kd-s01", "ce-s1"):
        make_teacher(tmp_path / "students" / run_name / "checkpoint.pt", "resnet8_slim")
    result = CliRunner().invoke(main, ["report", "--students-dir", str(tmp_path / "students"), "--out-dir",
                                       str(tmp_path / "report")])
    assert result.exit_code == 1
    assert f"Error: runs kd-s01 and kd-s1 under {tmp_path / 'students'} are both variant kd seed 1; rename or " \
           "remove one" in result.output
    assert not (tmp_path / "report").exists()  # nothing written from an ambiguous pairing


def test_the_report_prints_and_writes_the_primary_comparisons_with_holms_correction(tmp_path):
    for run_name in ("kd-s0", "kd-s1", "ce-s0", "ce-s1", "ekd-s0", "ekd-s1"):
        make_teacher(tmp_path / "students" / run_name / "checkpoint.pt", "resnet8_slim")
    args = ["report", "--students-dir", str(tmp_path / "students"), "--out-dir", str(tmp_path / "report")]
    result = CliRunner().invoke(main, [*args, "--comparisons", "ekd:kd,ekd:ce"])
    assert result.exit_code == 0, result.output
    assert "Primary comparisons" in result.output and "Holm's correction over the 2" in result.output
    table = pd.read_csv(tmp_path / "report/comparisons.csv")
    assert list(table.comparison) == ["ekd - kd", "ekd - ce"] and {"p_holm", "holm_low", "holm_high"} <= set(table)
    assert "ekd - ce" in (tmp_path / "report/results.md").read_text()
    runs = pd.read_csv(tmp_path / "report/runs.csv")
    assert len(runs) == 6 and set(runs.test_n) == {360}  # digits' test split: 20 % of 1,797 images
    result = CliRunner().invoke(main, [*args, "--comparisons", "ekd-b1:kd"])
    assert result.exit_code == 1 and "no runs of ekd-b1; the runs' variants: ce, ekd, kd" in result.output
