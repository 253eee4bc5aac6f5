"""The `pipeline` command: thin wrappers that build a stage's config and call the stage.

Each command's options are generated from its config dataclass (pipeline/config.py, pipeline/student_config.py), so
`--help`, params.yaml and the code never disagree about a setting.
"""

import dataclasses
import errno
import importlib
import json
import traceback
import typing
from pathlib import Path

import click

from pipeline.config import BENCH_SECTIONS, load_config
from pipeline.errors import PipelineError


def click_type(annotation):
    """int / float (also `float | None`) stay themselves; everything else (str, a list, comma-separated) is text."""
    if typing.get_origin(annotation) is list:
        return str
    kinds = set(typing.get_args(annotation)) - {type(None)} or {annotation}
    return kinds.pop() if len(kinds) == 1 and kinds <= {int, float} else str


def config_options(cls):
    """Add one --option per dataclass field, plus --params, to a click command."""

    def decorate(command):
        for field in reversed(dataclasses.fields(cls)):
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            is_list = typing.get_origin(field.type) is list
            shown = ",".join(default) if is_list else default
            help_text = field.metadata["help"] + (" (comma-separated)" if is_list else "")
            help_text += f" [default: {shown}]" if default not in (None, []) else ""
            flag = "--" + field.name.replace("_", "-")
            if field.type is bool:  # --x / --no-x; unset stays None so params.yaml can decide
                command = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None, help=help_text)(command)
            else:
                command = click.option(flag, field.name, type=click_type(field.type), default=None,
                                       help=help_text)(command)
        return click.option(
            "--params", "params_file", type=click.Path(dir_okay=False), default=None,
            help="YAML file whose `data` and stage sections replace the defaults (options still win)",
        )(command)

    return decorate


def build_config(cls, params_file, options: dict):
    lists = {f.name for f in dataclasses.fields(cls) if typing.get_origin(f.type) is list}
    for name in lists & {k for k, v in options.items() if v is not None}:
        options[name] = [item.strip() for item in options[name].split(",") if item.strip()]
    return load_config(cls, params_file, **options)


def own_line(error: PipelineError) -> str:
    """The error's message; raised in a DataLoader worker, it arrives inside the worker's traceback."""
    text = str(error)
    return text.rsplit("PipelineError: ", 1)[-1].strip() if text.startswith("Caught PipelineError") else text


STAGES = {  # command -> its module under stages/, its config class (module:name) and its help; each is built
    # when it is asked for, so a command imports what it runs and no other stage's code
    "train-teachers": ("train_teachers", "pipeline.config:TrainTeachersConfig", """Train each teacher with cross-entropy; save <out-dir>/<name>.pt and test metrics.

    A teacher is named by its architecture, or as <arch>-s<seed> when given as <arch>@<seed> (several of one
    architecture). Example: pipeline train-teachers --teachers resnet20,vgg8_bn --epochs 8
    """),
    "extract-teachers": ("extract_teachers", "pipeline.config:ExtractConfig", """Run every teacher once over a split; write logits, Grad-CAM maps and Y/O scores to a Zarr store.

    Rerunning the same command resumes an interrupted extraction; a new teacher is added
    to an existing store. Example: pipeline extract-teachers --dataset digits --target predicted
    """),
    "train-student": ("train_student", "pipeline.student_config:TrainStudentConfig", """Train a student from a teacher store (no teacher is loaded).

    --method chooses what it learns (labels, one or all teachers' logits, attention maps, or
    explain-kd's per-sample teacher choice by explanation, --policy); both list their choices below.
    Example: pipeline train-student --method explain-kd --epochs 15 (--recipe design: the method's original
    formulation)
    """),
    "evaluate": ("evaluate", "pipeline.config:EvaluateConfig", """Test top-1/top-5 and Grad-CAM confidence drop of every student next to the teachers.

    Example: pipeline evaluate --students-dir data_cache/students --out data_cache/metrics.json
    """),
    "report": ("report", "pipeline.config:ReportConfig", """Aggregate student runs (<variant>-s<seed>): test top-1 mean, std and the paired difference
    to the baseline with its 95 % interval; writes results.csv, results.md and a figure.

    Example: pipeline report --dataset cluttered-digits --students-dir data_cache/cluttered/students
    """),
}


def stage_command(name: str) -> click.Command:
    """`pipeline <name>`, which runs stages.<stage>.run(config), its options made from its config class."""
    stage, config, help_text = STAGES[name]
    module, _, class_name = config.partition(":")
    cls = getattr(importlib.import_module(module), class_name)

    @click.command(name, help=help_text)
    @config_options(cls)
    def command(params_file, **options):
        importlib.import_module(f"stages.{stage}").run(build_config(cls, params_file, options))

    return command


class Commands(click.Group):
    """The command group that builds a stage's command when it is asked for, and turns the library's errors
    into one line each (and exit status 1)."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *STAGES])

    def get_command(self, ctx, name):
        return stage_command(name) if name in STAGES else super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PipelineError as error:
            # the failed run's frames hold what it opened (a DataLoader's workers): freed now, not at a later collection
            traceback.clear_frames(error.__traceback__)
            raise click.ClickException(own_line(error)) from None
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise click.ClickException(
                "no space left on device; finished blocks and checkpoints are kept: "
                "free space (or move --store / --out-dir) and rerun the same command"
            ) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="explain-kd-pipeline")
def main():
    """Multi-teacher knowledge distillation guided by Grad-CAM explanations.

    Stage one (extract-teachers) runs every teacher once and caches logits, Grad-CAM
    maps and explanation scores in a Zarr v3 store; stage two (train-student) trains
    students from that store without loading a teacher.
    """


@main.group()
def store():
    """Inspect, check and edit a teacher store (`pipeline cache` is the same group)."""


main.add_command(click.Group("cache", commands=store.commands, hidden=True, help="The same as `pipeline store`."))


def open_store(path: str, mode: str = "r"):
    from pipeline.store.teacher_store import TeacherStore

    return TeacherStore.open(path, mode=mode)


@store.command("info")
@click.argument("path")
def store_info(path):
    """Per teacher: accuracy on the cached split, mean confidence drop, share of samples where it
    is the best explainer, map resolution, bytes on disk, finished blocks."""
    from pipeline.store.info import describe

    click.echo(describe(open_store(path)))


@store.command("verify")
@click.argument("path")
@click.option("--quick", is_flag=True, help="read only each shard file's index (present, not empty, index "
              "checksum, chunks inside the file), not every chunk and value")
@click.option("--repair", is_flag=True, help="delete the damaged shard files and mark their blocks unfinished, "
              "so that the `pipeline extract-teachers` command that wrote the store recomputes just those")
def store_verify(path, quick, repair):
    """Check completeness, shapes, fingerprints and every shard: by default every chunk is decoded (its
    crc32c checksum) and every value range-checked; exit 0 only if all hold."""
    from pipeline.store.info import verify
    from pipeline.store.integrity import find_damage, repair_damage

    opened = open_store(path, mode="r+" if repair else "r")
    damage = find_damage(opened, quick)
    problems = verify(opened, damage, quick)
    for problem in problems:
        click.echo(f"FAIL {problem}")
    if repair and damage:
        repair_damage(opened, damage)
        click.echo(f"repaired {path}: {len(damage)} damaged shard(s) deleted and their blocks marked unfinished; "
                   "now rerun the `pipeline extract-teachers` command that wrote it")
    if problems:
        raise click.ClickException(f"{path}: {len(problems)} problem(s)")
    checked = "shard files and indexes present" if quick else "every chunk's checksum, values valid"
    click.echo(f"OK {path}: complete, shapes valid, fingerprints match, {checked}")


@store.command("selection")
@click.argument("path")
@click.option("--groups", "groups_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CSV file with columns id,group: each sample's group (by the data set's sample id), for --expert")
@click.option("--expert", "experts", multiple=True, metavar="GROUP=TEACHER",
              help="the teacher that is the expert of a group (repeatable): adds the share of rows given to it")
@click.option("--data-root", default=None, help="where the data set lives, to read its sample ids (with --groups)")
@click.option("--split-seed", type=int, default=0, show_default=True,
              help="the split seed the store was extracted with (with --groups)")
@click.option("--seed", type=int, default=0, show_default=True, help="the draw of the random policies")
@click.option("--policy-temperature", type=float, default=0.1, show_default=True, help="the weighted policy's t")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="also write the figures to this JSON file (a DVC metrics file)")
def store_selection(path, groups_file, experts, data_root, split_seed, seed, policy_temperature, json_path):
    """What every selection policy chooses on the store's rows, with no student trained and no teacher
    loaded: each teacher's share, how often the chosen teacher is right, how often a tie decided, and
    with --groups and --expert how often each group's expert is chosen."""
    from pipeline.selection import parse_experts, read_groups, selection, selection_text

    opened, groups = open_store(path), None
    if groups_file:
        from pipeline.data import get_dataset

        dataset = opened.attrs["dataset"]
        data = get_dataset(dataset["name"], dataset["split"], data_root, split_seed)
        opened.check_holds(data.identity())
        groups = read_groups(groups_file, [data.sample_id(i) for i in range(len(data))])
    report = selection(opened, seed, policy_temperature, groups, parse_experts(experts, opened.teachers, groups))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    click.echo(selection_text(report))


@main.command("groups")
@click.option("--dataset", required=True, help="data set registry name")
@click.option("--split", default="train", show_default=True, help="the split whose samples are listed")
@click.option("--data-root", default=None, help="where the data set lives")
@click.option("--split-seed", type=int, default=0, show_default=True, help="seed of the split")
@click.option("--class-group", "class_groups", multiple=True, metavar="NAME=CLASS,CLASS,...",
              help="a group of classes (repeatable); without it, the data set's own groups (shape-domains' domains)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the CSV file to write (id,group)")
def groups(dataset, split, data_root, split_seed, class_groups, out):
    """Write each sample's group as a CSV file (id,group): the --groups file of `pipeline store selection`."""
    from pipeline.data import get_dataset
    from pipeline.selection import sample_groups

    table = sample_groups(get_dataset(dataset, split, data_root, split_seed), class_groups)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    counts = table.group.replace("", "(none)").value_counts().sort_index()
    click.echo(f"{out}: {len(table)} samples of {dataset} {split}; " + ", ".join(f"{g} {n}" for g, n in counts.items()))


@store.command("drop-teacher")
@click.argument("path")
@click.argument("teacher")
def store_drop_teacher(path, teacher):
    """Remove one teacher's arrays from the store at PATH; the other teachers stay as they are."""
    opened = open_store(path, mode="r+")
    opened.drop_teacher(teacher)
    click.echo(f"dropped {teacher} from {path}; it holds: {', '.join(opened.teachers) or 'no teachers'}")


@main.command("bench")
@click.option("--quick", is_flag=True, help="small sizes and one repeat: checks that every figure runs (CI)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="also write the figures to this JSON file")
@click.option("--repeats", type=click.IntRange(1), default=None, help="timed runs per figure (default: 3, whole student runs 7; 1 with --quick)")
@click.option("--only", multiple=True, type=click.Choice(BENCH_SECTIONS),
              help="measure only this section (repeatable; default: all; gpu needs a CUDA GPU)")
def bench(quick, json_path, repeats, only):
    """Measure speed and size figures against their peers in one run (a few minutes on 2 CPU cores);
    prints one markdown table (figure, value, peer, goal, met?); on a CUDA machine adds GPU figures."""
    from pipeline.bench import run_bench

    click.echo(run_bench(quick, json_path, repeats, only))
