"""The command line: every option documented, bad input answered in one line."""

import dataclasses

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import EvaluateConfig, ExtractConfig, TrainTeachersConfig
from pipeline.student_config import TrainStudentConfig

COMMANDS = {"train-teachers": TrainTeachersConfig, "extract-teachers": ExtractConfig,
            "train-student": TrainStudentConfig, "evaluate": EvaluateConfig}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command):
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for field in dataclasses.fields(COMMANDS[command]):
        option = f"--{field.name.replace('_', '-')} "
        lines = result.output.splitlines()
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
        entry = " ".join(lines[at:at + 2])  # a long flag name pushes its help to the next line
        assert field.metadata["help"].split(" (")[0][:30] in entry
    assert "--params" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["train-teachers", "--dataset", "mnist"], "unknown data set 'mnist'; choose one of: cifar10, cifar100, cluttered-digits, cluttered-shapes, digits, ilsvrc2012, imagefolder:<path>"),
    (["train-teachers", "--teachers", "resnet20,resnet999"], "unknown model 'resnet999'; choose one of: resnet20,"),
    (["extract-teachers", "--split", "validation"], "has no split 'validation'; choose one of: train, val, test"),
    (["extract-teachers", "--teachers", "nowhere.pt"], "checkpoint nowhere.pt does not exist"),
    (["extract-teachers", "--target", "best"], "unknown target 'best'; choose one of: label, predicted"),
    (["train-student", "--method", "magic"], "unknown method 'magic'; choose one of: at, aver, ca-mkd, ce, ebkd, explain-kd, kd, kd-avg"),
    (["train-student", "--store", "nowhere.zarr"], "no teacher store at nowhere.zarr"),
    (["train-student", "--method", "kd", "--kd-source", "best"], "--kd-source best applies to explain-kd with"),
    (["train-student", "--method", "at", "--kd-source", "best"], "--kd-source best applies to explain-kd with"),
    (["train-student", "--method", "explain-kd", "--policy", "global", "--kd-source", "best"],
     "--kd-source best applies to explain-kd with --policy agreement | confidence-weighted | confident | correct | drop-rank | drop-z | masked "
     "| per-sample | random | random-batch | weighted (the others"),
    (["evaluate", "--params", "nowhere.yaml"], "params file nowhere.yaml does not exist"),
    (["store", "info", "nowhere.zarr"], "no teacher store at nowhere.zarr"),
    (["cache", "drop-teacher", "nowhere.zarr", "resnet20"], "no teacher store at nowhere.zarr"),
])
def test_bad_input_is_one_line_error(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_unknown_params_key_names_the_valid_ones(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train_student:\n  betta: 3\n")
    result = CliRunner().invoke(main, ["train-student", "--params", str(params)])
    assert result.exit_code == 1
    assert "unknown train_student setting(s) betta; valid: allow_partial, alpha, arch, batch_size, beta, beta_warmup, cache_dir, cache_gb, compile, data_root, dataset, detach_head, device" in result.output


def test_options_override_params_file(tmp_path):
    from pipeline.config import load_config
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  split_seed: 7\ntrain_student:\n  beta: 3.0\n  epochs: 2\n")
    cfg = load_config(TrainStudentConfig, params, epochs=5, beta=None)
    assert (cfg.split_seed, cfg.beta, cfg.epochs, cfg.method) == (7, 3.0, 5, "explain-kd")


def test_a_variant_goes_over_the_stage_section_and_under_options(tmp_path):
    from pipeline.config import load_config
    params = tmp_path / "params.yaml"
    params.write_text("train_student:\n  beta: 3.0\n  epochs: 2\n  lr: 0.1\n"
                      "variants:\n  kd: {method: kd}\n  ekd-b1: {method: explain-kd, beta: 1.0, epochs: 4}\n")
    cfg = load_config(TrainStudentConfig, params, variant="ekd-b1", epochs=6)
    assert (cfg.method, cfg.beta, cfg.epochs, cfg.lr, cfg.variant) == ("explain-kd", 1.0, 6, 0.1, "ekd-b1")
    assert load_config(TrainStudentConfig, params, variant="kd").method == "kd"
    for variant, message in (("ekd", f"--variant ekd: {params} has no such variant; choose one of: kd, ekd-b1"),
                             ("kd", "--variant kd needs --params FILE with a `variants` section (name -> train_student settings)")):
        result = CliRunner().invoke(main, ["train-student", "--variant", variant]
                                    + (["--params", str(params)] if variant == "ekd" else []))
        assert result.exit_code == 1 and message in result.output, result.output
    params.write_text("variants:\n  odd: {betta: 2}\n")
    result = CliRunner().invoke(main, ["train-student", "--params", str(params), "--variant", "odd"])
    assert "unknown train_student setting(s) betta" in result.output
    params.write_text("variants:\n  - {name: kd, args: --method kd}\n")  # the list of earlier versions
    result = CliRunner().invoke(main, ["train-student", "--params", str(params), "--variant", "kd"])
    assert result.exit_code == 1 and "`variants` must map each name to its train_student settings" in result.output


def test_recipes_fill_in_what_is_not_given():
    from pipeline.student_config import TrainStudentConfig

    validated = TrainStudentConfig()
    assert (validated.method, validated.policy, validated.student_map, validated.kd_source, validated.beta) == \
        ("explain-kd", "weighted", "attention", "selected", 0.0)
    design = TrainStudentConfig(recipe="design", beta=1.0)
    assert (design.student_map, design.kd_source, design.beta) == ("gradcam", "selected", 1.0)
    assert TrainStudentConfig(policy="global").kd_source == "selected"  # one teacher already
    assert TrainStudentConfig(method="at").beta == 1.0


def listed_commands(output: str) -> set[str]:
    return {line.split()[0] for line in output.split("Commands:")[1].splitlines() if line.strip()}


def test_cache_is_the_store_group_under_its_former_name():
    store, cache = (CliRunner().invoke(main, [group, "--help"]) for group in ("store", "cache"))
    assert listed_commands(store.output) == listed_commands(cache.output) == {"info", "verify", "drop-teacher",
                                                                                 "selection"}
    assert "store" in listed_commands(CliRunner().invoke(main, ["--help"]).output)
    assert "cache" not in listed_commands(CliRunner().invoke(main, ["--help"]).output)  # hidden: one name shown


def test_mixing_teachers_on_a_store_of_predicted_maps_is_refused_only_with_a_map_term():
    from pipeline.errors import PipelineError
    from pipeline.policies import POLICIES
    from pipeline.student import check_map_mix
    from pipeline.student_config import TrainStudentConfig

    default = TrainStudentConfig()  # --policy weighted, logits alone: no map is mixed
    check_map_mix("s.zarr", "predicted", POLICIES.get(default.policy)(), default)
    with_maps = TrainStudentConfig(beta=0.5)
    check_map_mix("s.zarr", "label", POLICIES.get("weighted")(), with_maps)  # maps of the label: one class
    with pytest.raises(PipelineError, match=r"store s.zarr caches maps of each teacher's predicted class, and --policy "
                                            r"weighted with a map term \(--beta 0.5\) would mix maps of different "
                                            r"classes: pass --beta 0, or --policy agreement \| confident"):
        check_map_mix("s.zarr", "predicted", POLICIES.get("weighted")(), with_maps)
