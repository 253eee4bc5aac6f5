"""Is ReLabel's shortcut exact enough? Per-view logits pooled from one pass's class-score map.

For a global-average-pool + Linear teacher, the logits of an image are the mean over cells of
the class-score map S = W A + b (A the last feature map). ReLabel pools such a map over a
crop's box (RoIAlign) instead of running the teacher on the crop. This script compares, on
random views (pipeline.views) of a data set's images:

  - exact: the teacher run on each view, what `extract-teachers --views K` caches;
  - roi: S of the eval view (one pass per image), averaged over the view's box with
    torchvision.ops.roi_align (flipped with the view);
  - eval: the eval view's logits reused for every view (a one-view store's behaviour).

It prints top-1 agreement with the exact logits and the mean KL(exact || other) of the
softmaxes at T = 1 and T = 4 (one run; a trained teacher is needed, e.g. the default
pipeline's data_cache/teachers/resnet20.pt on digits).

    python benchmarks/roi_logits.py --teacher data_cache/teachers/resnet20.pt --dataset digits --views 8
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipeline.data import get_dataset, normalize
from pipeline.explain import captured
from pipeline.teachers import load_teacher
from pipeline.views import ViewPolicy


def kl(exact: torch.Tensor, other: torch.Tensor, temperature: float) -> float:
    p, q = F.log_softmax(exact / temperature, 1), F.log_softmax(other / temperature, 1)
    return float((p.exp() * (p - q)).sum(1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--view-shift", type=int, default=4)
    parser.add_argument("--images", type=int, default=360)
    args = parser.parse_args()
    dataset = get_dataset(args.dataset, args.split, args.data_root)
    teacher = load_teacher(args.teacher, dataset.info)
    if teacher.layer.linear_head is None:
        raise SystemExit(f"{args.teacher}: its head is not global-average-pool + Linear; the shortcut does not apply")
    head = teacher.model.get_submodule(teacher.layer.linear_head)
    policy = ViewPolicy.of(dataset.info, args.views, shift=args.view_shift)
    size = tuple(dataset.info.image_shape[:2]) if dataset.info.geometry is None else (dataset.info.geometry.crop,) * 2
    exact, roi, reused = [], [], []
    mean, std = teacher.transform.mean, teacher.transform.std
    with torch.no_grad():
        for i in range(min(args.images, len(dataset))):
            source = dataset.view_source(i)
            boxes, flips = policy.boxes(dataset.sample_id(i), source.height, source.width)
            views = torch.from_numpy(np.stack([source.view(b, f, size) for b, f in zip(boxes, flips)]))
            logits = teacher.model(normalize(views, mean, std))
            with captured(teacher.model, teacher.layer.target_layer) as box:
                teacher.model(normalize(views[:1], mean, std))  # the eval view
            scores = torch.einsum("kc,bchw->bkhw", head.weight, box["activation"]) + head.bias[None, :, None, None]
            eval_box = boxes[0]
            scale = scores.shape[-1] / (eval_box[2] - eval_box[0])  # feature cells per source pixel
            rois = torch.tensor([[0, *((b - eval_box[[0, 1, 0, 1]]) * scale)] for b in boxes], dtype=torch.float32)
            pooled = roi_align(scores, rois, (4, 4), spatial_scale=1.0, sampling_ratio=2, aligned=True)
            pooled = torch.where(torch.from_numpy(flips)[:, None, None, None], pooled.flip(-1), pooled).mean((2, 3))
            exact.append(logits[1:])
            roi.append(pooled[1:])
            reused.append(logits[:1].expand(len(logits) - 1, -1))
    exact, roi, reused = torch.cat(exact), torch.cat(roi), torch.cat(reused)
    print(f"{args.teacher} on {args.dataset}/{args.split}: {len(exact)} random views ({args.views - 1} per image)")
    print("| per-view logits from | top-1 agrees with exact | KL at T = 1 | KL at T = 4 |\n|---|---|---|---|")
    for name, other in (("roi: pooled class-score map of the eval view", roi), ("eval: the eval view's, reused", reused)):
        agree = float((other.argmax(1) == exact.argmax(1)).float().mean())
        print(f"| {name} | {agree:.1%} | {kl(exact, other, 1.0):.4f} | {kl(exact, other, 4.0):.4f} |")


if __name__ == "__main__":
    main()
