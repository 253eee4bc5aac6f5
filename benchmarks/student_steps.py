"""The student's training step from cached rows, per method, over ce's step, at several batch sizes:
what `pipeline bench`'s student run ratios are made of, without a run's fixed costs (start-up,
the reader, evaluation). With --profile, torch.profiler's count of operators and kernels per step.

    python benchmarks/student_steps.py --device cuda --batches 64,256,1024 --profile

The step is fit()'s (bf16 autocast and channels_last on CUDA), on the digits store that
`pipeline bench` makes (3 teachers with random weights, resnet8_slim student); times are medians
of --repeats timed runs of --steps steps each, after one warm-up run, methods taking turns.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from pipeline.bench import digits_store, median_seconds
from pipeline.bench_gpu import policy_of, step_loop
from pipeline.data import get_dataset
from pipeline.devices import prepare_model, resolve_device
from pipeline.distill import DistillationLoss, LossSettings
from pipeline.explain import CamLayer, probe_input
from pipeline.methods import method_of
from pipeline.methods.explain_kd import RECIPES
from pipeline.models import create_model
from pipeline.store.teacher_store import TeacherStore

METHODS = {"ce": ("ce", {}), "kd": ("kd", {}),
           "explain-kd": ("explain-kd", {"student_map": "attention", "beta": 0.5, "kd_teacher": 0}),  # the map term
           "explain-kd design": ("explain-kd", RECIPES["design"])}


def step_runner(method: str, options: dict, store: TeacherStore, batch: dict, device: torch.device, steps: int):
    info = get_dataset("digits", "train").info
    torch.manual_seed(0)
    student = prepare_model(create_model("resnet8_slim", info.image_shape[2], info.num_classes), device)
    layer = CamLayer.of(student.eval(), probe_input(info.image_shape).to(device))
    student.train()
    options = {key: value for key, value in options.items() if key not in ("kd_source",)}
    beta = options.pop("beta", 1.0)
    if "kd_teacher" in options:
        options["kd_teacher"] = store.teachers[options["kd_teacher"]]
    kd_teacher = options.pop("kd_teacher", None)
    teachers = store.teachers[:1] if method_of(method).one_teacher else store.teachers
    loss_fn = DistillationLoss(method_of(method), teachers, layer, info.mean, info.std, info.num_classes,
                               LossSettings(alpha=0.5, beta=beta, **options), kd_teacher=kd_teacher,
                               policy=policy_of(method))
    return step_loop(loss_fn, student, batch, device, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        store = TeacherStore.open(digits_store(Path(folder), "train"))
        fields = ["images", "labels", *method_of("explain-kd").arrays(store.teachers, store.logit_fields)]
        rows = store.read_rows(0, store.num_samples, fields)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {args.steps} steps per timed run, medians of {args.repeats}\n")
    print("| batch | " + " | ".join(f"{name} ms/step" for name in METHODS) + " | "
          + " | ".join(f"{name} / ce" for name in METHODS if name != "ce") + " |")
    print("|---" * (2 * len(METHODS)) + "|")
    for size in map(int, args.batches.split(",")):
        index = torch.arange(size) % store.num_samples
        batch = {key: torch.from_numpy(value)[index].to(device) for key, value in rows.items()} | {
            "index": index.to(device)}
        runners = {name: step_runner(method, options, store, batch, device, args.steps)
                   for name, (method, options) in METHODS.items()}
        seconds = median_seconds(runners, args.repeats)
        ms = {name: 1000 * value / args.steps for name, value in seconds.items()}
        print(f"| {size} | " + " | ".join(f"{ms[name]:.2f}" for name in METHODS) + " | "
              + " | ".join(f"{ms[name] / ms['ce']:.2f}" for name in METHODS if name != "ce") + " |", flush=True)
        if args.profile and size == int(args.batches.split(",")[0]):
            profiles = {name: profile(runners[name], device, args.steps) for name in METHODS}
    if args.profile:
        print("\nper step, from torch.profiler (first batch size):\n")
        print("| method | aten operators | kernel launches | CPU time of operators, ms | GPU kernel time, ms |\n|---|---|---|---|---|")
        for name, (ops, kernels, cpu_ms, gpu_ms) in profiles.items():
            print(f"| {name} | {ops / args.steps:.0f} | {kernels / args.steps:.0f} | {cpu_ms / args.steps:.2f} | "
                  f"{gpu_ms / args.steps:.2f} |")


def profile(run, device: torch.device, steps: int) -> tuple[int, int, float, float]:
    """aten operators (nested ones included), kernel launches, the operators' own CPU time and the
    kernels' time, over `steps` steps."""
    from torch.profiler import ProfilerActivity  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        run()
    events = prof.events()
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    operators = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
    return (len(operators), len(launches), sum(e.self_cpu_time_total for e in operators) / 1000,
            sum(e.device_time for e in kernels) / 1000)


if __name__ == "__main__":
    main()
