"""`pipeline bench --quick`: every figure is measured and reported (no timing is asserted)."""

import json
import math

import pytest
import torch

from conftest import invoke


@pytest.mark.slow
def test_bench_quick_measures_every_figure_and_writes_the_table_as_json(tmp_path):
    result = invoke("bench", "--quick", "--json", tmp_path / "bench.json")
    report = json.loads((tmp_path / "bench.json").read_text())
    figures = {f["figure"]: f for f in report["figures"]}
    kinds = ["stage two's reader, samples/s (", "reader / plain zarr reads", "student run explain-kd / ce",
             "online distillation step / cached", "stage one batch work / bare forward (resnet18",
             "stage one batch work / bare forward (vgg11", "grad-cam package / ours",
             "extraction peak memory"] + [f"store bytes/sample/teacher, {s} shape, {m} maps, {l} logits"
                                          for s, m in (("CIFAR-100", "8x8"), ("ImageNet", "7x7"))
                                          for l in ("full", "top-10")]
    for kind in kinds:
        assert any(name.startswith(kind) for name in figures), kind
    for figure in report["figures"]:  # one table row each, with its goal judged where it has one
        assert f"| {figure['figure']} |" in result.output
        assert (figure["met"] is None) == (figure["goal"] == "-"), figure
        if isinstance(figure["value"], float):
            assert math.isfinite(figure["value"]) and figure["value"] > 0, figure
    size = {(s, l): figures[f"store bytes/sample/teacher, {s} shape, {m} maps, {l} logits (synthetic values)"]["value"]
            for s, m in (("CIFAR-100", "8x8"), ("ImageNet", "7x7")) for l in ("full", "top-10")}
    # full logits are float16: at least 2 bytes per class before compression, of random values
    assert size["ImageNet", "full"] > 1000 * 2 * 0.9 > size["ImageNet", "top-10"]
    assert size["CIFAR-100", "full"] > size["CIFAR-100", "top-10"]


def test_only_measures_the_sections_asked_for(tmp_path):
    result = invoke("bench", "--quick", "--only", "bytes", "--json", tmp_path / "bench.json")
    names = [f["figure"] for f in json.loads((tmp_path / "bench.json").read_text())["figures"]]
    assert len(names) == 4 and all(name.startswith("store bytes/sample/teacher") for name in names), names
    assert "| store bytes/sample/teacher, ImageNet shape" in result.output
    assert "Invalid value for '--only': 'disk' is not one of 'reader', 'student'" in invoke(
        "bench", "--only", "disk", exit_code=2).output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there")
def test_gpu_figures_without_a_gpu_are_refused_in_one_line():
    assert "Error: --only gpu needs a CUDA GPU, and torch sees none" in invoke("bench", "--only", "gpu", exit_code=1).output


@pytest.mark.parametrize("warm_up", [True, False])
def test_median_seconds_times_every_setup_repeats_times_in_alternating_order(warm_up, monkeypatch):
    """A fake clock: each call of a setup lasts its turn's number in seconds, so the medians say which turns
    were timed (the warm-up, turn 0, never)."""
    from pipeline import bench

    now, calls = [0.0], []

    def call(name):
        calls.append(name)
        now[0] += 1 + (len(calls) - 1) // 2  # turn t (0, 1, 2, 3 with the warm-up) lasts t + 1 seconds a call

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    seconds = bench.median_seconds({"a": lambda: call("a"), "b": lambda: call("b")}, 3, warm_up=warm_up)
    timed = ["b", "a", "a", "b", "b", "a"]  # turns 1, 2 and 3: every other turn in reverse order
    assert calls == (["a", "b"] if warm_up else []) + timed
    assert seconds == ({"a": 3.0, "b": 3.0} if warm_up else {"a": 2.0, "b": 2.0})  # of lengths 2, 3, 4 (or 1, 2, 3)
