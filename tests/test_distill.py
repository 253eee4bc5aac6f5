"""Losses on hand-computed inputs, and the per-sample teacher choice of each method."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import Augmentation, Moves, apply, check_flip, shift
from pipeline.data import get_dataset, normalize
from pipeline.distill import kd_per_row, map_term
from pipeline.maps import resize_maps
from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, probe_input
from pipeline.methods import method_of
from pipeline.models import create_model
from pipeline.objective import loss_of
from pipeline.scoring import best_explainer, decided_by_tie
from pipeline.store.layout import teacher_arrays

from conftest import distillation, make_cifar

PROBE = probe_input((32, 32, 1))


def means(terms: dict) -> dict:
    """Each loss term's mean over what it covers, and the step's loss ("loss")."""
    return {key: term.mean for key, term in terms.items()} | {"loss": loss_of(terms)}


def test_kd_golden_value():
    teacher = torch.tensor([[0.75, 0.25]])
    student_logits = torch.zeros(1, 2)
    expected = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))  # T^2 * KL, T = 2
    assert kd_per_row(student_logits, teacher, temperature=2.0).mean().item() == pytest.approx(expected, rel=1e-6)
    assert kd_per_row(torch.tensor([[3.0, 1.0]]), F.softmax(torch.tensor([[3.0, 1.0]]), 1), 1.0).mean().item() == \
        pytest.approx(0.0, abs=1e-7)


def test_map_term_golden_value_and_empty_teacher_maps_are_skipped():
    student = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])  # second teacher map is empty
    # sample 0: [0.6, 0.8] - [0, 1] -> 0.36 + 0.04; sample 1 carries no target
    assert map_term(student, teacher).mean.item() == pytest.approx(0.40, rel=1e-6)
    assert map_term(student, torch.zeros_like(teacher)).mean.item() == 0.0
    # mean-normalised: sample 0 [6/7, 8/7] - [0, 2] -> ((6/7)^2 + (6/7)^2) / 2 cells
    assert map_term(student, teacher, "mean").mean.item() == pytest.approx((6 / 7) ** 2, rel=1e-6)


def test_best_explainer_prefers_lowest_drop_and_breaks_ties_by_confidence_not_by_being_unsure():
    y = torch.tensor([[0.99, 0.02], [0.99, 0.02], [0.5, 0.9], [0.4, 0.5], [0.9, 0.2]])
    o = torch.tensor([[0.99, 0.021], [0.98999, 0.021], [0.3, 0.1], [0.5, 0.9], [0.8, 0.2]])
    # row 0: both drops 0 (the 2 % teacher's explanation nudged it to 2.1 %): the confident teacher wins;
    # row 1: the same with a drop of 1e-5 for the confident one, within the 0.01 tie band: it still wins;
    # row 2: drops 0.4 and 0.889 -> teacher 0; row 3: both raise confidence (drop 0) -> larger Y, teacher 1;
    # row 4: drops 0.111 and 0, further apart than the tie band -> the lower drop, teacher 1
    assert best_explainer(y, o).tolist() == [0, 0, 0, 1, 1]
    assert decided_by_tie(y, o).tolist() == [True, True, False, True, False]


def test_teacher_fields_per_method():
    fields = lambda method, names, logits=("logits",): teacher_arrays(names, method_of(method).teacher_fields(logits))  # noqa: E731
    assert fields("ce", ["a"]) == []
    assert fields("kd", ["a"]) == ["teachers/a/logits"]
    assert fields("kd-avg", ["a", "b"], ("logits", "logit_classes")) == [
        "teachers/a/logits", "teachers/a/logit_classes", "teachers/b/logits", "teachers/b/logit_classes"]
    assert fields("at", ["a"]) == ["teachers/a/logits", "teachers/a/attention", "teachers/a/attention_max"]
    assert "teachers/b/o_prob" in fields("explain-kd", ["a", "b"])


def make_batch():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 32, 32, 1), dtype=torch.uint8)
    batch = {"images": images, "labels": torch.tensor([3, 7]), "index": torch.tensor([0, 1])}
    for name, logits, y, o in (("t1", [[0.0] * 10, [1.0] * 10], [0.9, 0.9], [0.1, 0.9]),  # t1 wins sample 1
                               ("t2", [[2.0] * 10, [3.0] * 10], [0.9, 0.9], [0.8, 0.1])):  # t2 wins sample 0
        batch[f"teachers/{name}/logits"] = torch.tensor(logits).half()
        batch[f"teachers/{name}/logits"][:, 3] += torch.tensor([4.0, -1.0]).half()
        batch[f"teachers/{name}/y_prob"] = torch.tensor(y)
        batch[f"teachers/{name}/o_prob"] = torch.tensor(o)
        batch[f"teachers/{name}/cam"] = torch.randint(0, 256, (2, 4, 4), dtype=torch.uint8)
        batch[f"teachers/{name}/cam_max"] = torch.tensor([1.0, 0.0])
    return batch


def features_of(student, x):
    """(logits, the student's last feature map), recorded with a plain forward hook, not the project's."""
    box = {}
    handle = student.features.register_forward_hook(lambda m, i, out: box.update(a=out))
    logits = student(x)
    handle.remove()
    return logits, box["a"]


def hand_cam(student, activation, classes):
    """Closed-form Grad-CAM of a GAP + Linear student written out: ReLU(sum_k W[c, k] A_k) / (h w)."""
    weights = student.fc.weight[classes]  # (B, K)
    h, w = activation.shape[-2:]
    return torch.relu((weights[:, :, None, None] * activation).sum(1)) / (h * w)


def hand_map_distance(student_maps, teacher_maps):
    """Mean over samples with a non-empty teacher map of ||s/|s| - t/|t|||^2, written out."""
    terms = []
    for s, t in zip(student_maps, teacher_maps):
        if t.max() > 0:
            terms.append(((s / s.pow(2).sum().sqrt() - t / t.pow(2).sum().sqrt()) ** 2).sum())
    return torch.stack(terms).mean()


def standardised(batch):
    return (batch["images"].permute(0, 3, 1, 2).float() / 255 - 0.3) / 0.32


@pytest.mark.parametrize("method", ["ce", "kd", "kd-avg", "explain-kd"])
def test_distillation_loss_components(method):
    batch = make_batch()
    student = create_model("resnet8_slim", 1, 10).eval()
    layer = CamLayer.of(student, PROBE)
    teachers = ["t2"] if method == "kd" else ["t1", "t2"]
    loss_fn = distillation(method, teachers, layer, alpha=0.5, beta=2.0)
    losses = means(loss_fn(student, batch))

    logits, activation = features_of(student, standardised(batch))
    ce = F.cross_entropy(logits, batch["labels"])
    soft = {t: F.softmax(batch[f"teachers/{t}/logits"].float() / 4.0, 1) for t in ("t1", "t2")}
    if method == "ce":
        assert set(losses) == {"ce", "loss"}  # the step's loss is the terms' weighted means: here ce alone
        expected = ce
    elif method == "kd":
        expected = ce + 0.5 * kd_per_row(logits, soft["t2"], 4.0).mean()
    elif method == "kd-avg":
        expected = ce + 0.5 * kd_per_row(logits, (soft["t1"] + soft["t2"]) / 2, 4.0).mean()
    else:
        chosen = torch.stack([soft["t2"][0], soft["t1"][1]])
        assert losses["chosen/t1"].item() == 0.5 and losses["chosen/t2"].item() == 0.5
        teacher_map = batch["teachers/t2/cam"][0].float() / 255 * 1.0  # sample 1's map (t1) is empty
        cam = hand_cam(student, activation, batch["labels"])
        expected_map = hand_map_distance(cam[:1], F.interpolate(teacher_map[None, None], size=(8, 8), mode="bilinear",
                                                                align_corners=False)[:, 0])
        torch.testing.assert_close(losses["map"], expected_map, rtol=1e-4, atol=1e-6)
        expected = ce + 0.5 * kd_per_row(logits, chosen, 4.0).mean() + 2.0 * expected_map
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-4, atol=1e-6)
    losses["loss"].backward()
    assert student.fc.weight.grad is not None


def test_normalized_grayscale_batches_train_the_default_student():
    """A (B, H, W, 1) uint8 batch becomes plain NCHW; the permuted view crashed oneDNN's backward."""
    images = torch.randint(0, 256, (61, 32, 32, 1), dtype=torch.uint8)
    x = normalize(images, (0.3,), (0.32,))
    assert x.stride() == (1024, 1024, 32, 1)
    torch.testing.assert_close(x[5, 0], (images[5, ..., 0].float() / 255 - 0.3) / 0.32)
    model = create_model("resnet8_slim", 1, 10)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_shift_moves_images_and_fills_with_zeros():
    x = torch.arange(1, 49, dtype=torch.float32).view(3, 1, 4, 4)
    moved = shift(x, torch.tensor([[1, -2], [-3, 1], [0, 0]]))  # each sample its own move
    down_left, up_right = torch.zeros(4, 4), torch.zeros(4, 4)
    down_left[1:, :2] = x[0, 0, :3, 2:]  # one row down, two columns left
    up_right[:1, 1:] = x[1, 0, 3:, :3]  # three rows up, one column right
    assert torch.equal(moved[0, 0], down_left) and torch.equal(moved[1, 0], up_right)
    assert torch.equal(moved[2], x[2])


def make_student_batch(method):
    batch = make_batch()
    for name in ("t1", "t2"):
        batch[f"teachers/{name}/attention"] = torch.randint(1, 256, (2, 8, 8), dtype=torch.uint8)
        batch[f"teachers/{name}/attention_max"] = torch.tensor([2.0, 3.0])
    return batch, ["t2"] if method in ("kd", "at") else ["t1", "t2"]


def test_attention_transfer_compares_squared_activation_maps():
    batch, teachers = make_student_batch("at")
    student = create_model("resnet8_slim", 1, 10).eval()
    layer = CamLayer.of(student, PROBE)
    losses = means(distillation("at", teachers, layer, alpha=0.5, beta=2.0)(student, batch))
    _, activation = features_of(student, standardised(batch))
    teacher = batch["teachers/t2/attention"].float() / 255 * batch["teachers/t2/attention_max"][:, None, None]
    expected = hand_map_distance((activation ** 2).mean(1), teacher)  # attention map: mean over channels of A^2
    torch.testing.assert_close(losses["map"], expected, rtol=1e-4, atol=1e-6)


def test_detached_head_keeps_the_map_term_off_the_classifier():
    batch, teachers = make_student_batch("explain-kd")
    for detach in (False, True):
        student = create_model("resnet8_slim", 1, 10).train()
        loss_fn = distillation("explain-kd", teachers, CamLayer.of(student, PROBE), alpha=0.0, beta=1.0,
                               detach_head=detach)
        losses = means(loss_fn(student, batch))
        fc_grad, = torch.autograd.grad(losses["map"], student.fc.weight, allow_unused=True)
        assert (fc_grad is None or not fc_grad.any()) == detach


def test_beta_warms_up_and_maps_follow_the_shift():
    batch, teachers = make_student_batch("explain-kd")
    student = create_model("resnet8_slim", 1, 10)
    loss_fn = distillation("explain-kd", teachers, CamLayer.of(student, PROBE), beta=8.0, beta_warmup=4,
                           augmentation=Augmentation(4, seed=3))
    assert [loss_fn.beta_now() for loss_fn.epoch in range(5)] == [2.0, 4.0, 6.0, 8.0, 8.0]
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 1] = 1.0  # one hot cell at 8x8 pixels of a 32 px image
    down_right = Moves(torch.tensor([[8, 8]]), torch.tensor([False]))
    teacher_maps = lambda moves: loss_fn.teacher_maps(  # noqa: E731
        [maps, torch.zeros_like(maps)], (32, 32), (4, 4), moves)[:, 0]  # t1's of two teachers
    moved = teacher_maps(down_right)
    assert moved[0].argmax().item() == 2 * 4 + 2  # one cell down and right: 8 px = one 4x4 cell
    mirrored = teacher_maps(Moves(torch.tensor([[0, 0]]), torch.tensor([True])))
    assert mirrored[0].argmax().item() == 1 * 4 + 2  # column 1 of 4 -> column 2
    loss_fn.settings = dataclasses.replace(loss_fn.settings, map_follows=False)
    assert teacher_maps(down_right)[0].argmax().item() == 1 * 4 + 1


def test_flips_mirror_only_the_drawn_samples_and_are_refused_for_digits(tmp_path):
    x = torch.arange(8, dtype=torch.float32).view(2, 1, 2, 2)
    moved = apply(x, Moves(torch.zeros(2, 2, dtype=torch.long), torch.tensor([True, False])))
    assert moved[0, 0].tolist() == [[1.0, 0.0], [3.0, 2.0]] and torch.equal(moved[1], x[1])
    draws = Augmentation(0, flip=True, seed=0).draw(1000)
    assert 400 < int(draws.flips.sum()) < 600 and not draws.shifts.any()
    assert Augmentation(0, flip=False).draw(4) is None
    with pytest.raises(PipelineError, match="not mirror-symmetric"):
        check_flip(True, get_dataset("digits", "train").info)
    make_cifar(tmp_path)
    check_flip(True, get_dataset("cifar10", "train", str(tmp_path)).info)  # photos may be mirrored


def test_maps_can_be_compared_on_a_coarser_grid():
    batch, teachers = make_student_batch("at")
    student = create_model("resnet8_slim", 1, 10).eval()
    layer = CamLayer.of(student, PROBE)
    losses = means(distillation("at", teachers, layer, alpha=0.5, beta=2.0, map_size=2)(student, batch))
    _, activation = features_of(student, standardised(batch))
    teacher = batch["teachers/t2/attention"].float() / 255 * batch["teachers/t2/attention_max"][:, None, None]
    quarters = lambda m: m.unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2))  # noqa: E731  8x8 -> 2x2 by 4x4 means
    expected = hand_map_distance(quarters((activation ** 2).mean(1)), quarters(teacher))
    torch.testing.assert_close(losses["map"], expected, rtol=1e-4, atol=1e-6)


def test_teacher_gradcam_can_guide_the_student_attention_and_logits_can_come_from_one_teacher():
    batch, teachers = make_student_batch("explain-kd")
    student = create_model("resnet8_slim", 1, 10).eval()
    layer = CamLayer.of(student, PROBE)
    losses = means(distillation("explain-kd", teachers, layer, alpha=0.5, beta=2.0, student_map="attention",
                                kd_teacher="t1")(student, batch))
    logits, activation = features_of(student, standardised(batch))
    teacher_map = batch["teachers/t2/cam"][0].float() / 255  # sample 0 chooses t2; sample 1's t1 map is empty
    teacher_map = F.interpolate(teacher_map[None, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    expected = hand_map_distance((activation ** 2).mean(1)[:1], teacher_map)
    torch.testing.assert_close(losses["map"], expected, rtol=1e-4, atol=1e-6)
    soft_t1 = F.softmax(batch["teachers/t1/logits"].float() / 4.0, 1)  # every sample: t1's logits
    torch.testing.assert_close(losses["kd"], kd_per_row(logits, soft_t1, 4.0).mean(), rtol=1e-4, atol=1e-6)


def test_shrinking_a_map_averages_cells_and_drops_no_evidence():
    blob = torch.zeros(1, 12, 12)
    blob[0, 5:7, 5:7] = 1.0  # a centred 2x2 blob
    expected = torch.zeros(1, 4, 4)
    expected[0, 1:3, 1:3] = 1 / 9  # each 3x3 cell of the 4x4 grid holds one blob cell
    torch.testing.assert_close(resize_maps(blob, (4, 4)), expected)
    stripes = (torch.arange(12) % 3 == 0).float()[:, None].repeat(1, 4)[None]  # every third row 1
    # rows shrink 12 -> 4 by area (a third of each 3-row cell is 1), columns grow 4 -> 8 (constant)
    torch.testing.assert_close(resize_maps(stripes, (4, 8)), torch.full((1, 4, 8), 1 / 3))
    ramp = torch.arange(4.0).repeat(4, 1)[None]  # m[i, j] = j: enlarging keeps a ramp linear inside
    torch.testing.assert_close(resize_maps(ramp, (8, 8))[0, 0, 1:7], torch.tensor([0.25, 0.75, 1.25, 1.75, 2.25, 2.75]))


def area_shrunk_by_lcm(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The reference: repeat every cell so that both sides become the least common multiple of the input and
    output sides, then take block means (each output cell the mean of the input over its footprint)."""
    (h, w), (oh, ow) = maps.shape[-2:], size
    lh, lw = math.lcm(h, oh), math.lcm(w, ow)
    fine = maps.repeat_interleave(lh // h, dim=-2).repeat_interleave(lw // w, dim=-1)
    return fine.reshape(*maps.shape[:-2], oh, lh // oh, ow, lw // ow).mean(dim=(-3, -1))


@pytest.mark.parametrize("source, size", [((8, 8), (3, 3)), ((7, 5), (3, 2)), ((14, 14), (4, 6)), ((9, 6), (9, 4)),
                                          ((12, 12), (4, 4)), ((5, 7), (1, 1))])
def test_shrinking_by_area_weighs_fractional_overlaps(source, size):
    maps = torch.rand(3, 2, *source, generator=torch.Generator().manual_seed(sum(source + size)))
    torch.testing.assert_close(resize_maps(maps, size), area_shrunk_by_lcm(maps, size), rtol=1e-5, atol=1e-6)
    rows = torch.zeros(1, 8, 1)
    rows[0, 2] = 1.0  # from 8 rows to 3: input row 2 lies 2/3 in output row 0 and 1/3 in row 1
    torch.testing.assert_close(resize_maps(rows, (3, 1))[0, :, 0] * 8 / 3, torch.tensor([2 / 3, 1 / 3, 0.0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as students train on CUDA: maps stay float32
        shrunk = resize_maps(maps, size)
    assert shrunk.dtype == torch.float32
    torch.testing.assert_close(shrunk, area_shrunk_by_lcm(maps, size), rtol=1e-5, atol=1e-6)


def test_a_predicted_store_explains_the_teachers_class_in_the_student_map():
    batch, teachers = make_student_batch("explain-kd")
    other = torch.tensor([5, 2])  # the classes the teachers' maps explain (their predictions), not the labels 3, 7
    for name in teachers:
        batch[f"teachers/{name}/cam_class"] = other
    student = create_model("resnet8_slim", 1, 10).eval()
    layer = CamLayer.of(student, PROBE)
    loss = lambda target, b: distillation("explain-kd", teachers, layer, beta=1.0, target=target)(  # noqa: E731
        student, b)["map"].mean
    relabelled = {**batch, "labels": other}  # the map term depends on the explained class only
    torch.testing.assert_close(loss("predicted", batch), loss("label", relabelled))
    assert not torch.allclose(loss("predicted", batch), loss("label", batch))


def test_teachers_with_maps_of_different_sizes_are_each_resized_to_the_student_map():
    """t1's maps are 2x2 and t2's 4x4 (teachers of other depths); each is enlarged to the student's 8x8."""
    batch, teachers = make_student_batch("explain-kd")
    batch["teachers/t1/cam"] = torch.randint(1, 256, (2, 2, 2), dtype=torch.uint8)
    batch["teachers/t1/cam_max"] = torch.tensor([1.0, 2.0])  # sample 1 chooses t1, and now has a map
    student = create_model("resnet8_slim", 1, 10).eval()
    losses = means(distillation("explain-kd", teachers, CamLayer.of(student, PROBE), alpha=0.5, beta=2.0,
                                student_map="attention", kd_teacher="t1")(student, batch))
    _, activation = features_of(student, standardised(batch))
    up = lambda cam: F.interpolate(cam[None, None].float(), size=(8, 8), mode="bilinear", align_corners=False)[0, 0]  # noqa: E731
    chosen = torch.stack([up(batch["teachers/t2/cam"][0]), up(batch["teachers/t1/cam"][1])])  # t2 wins 0, t1 wins 1
    expected = hand_map_distance((activation ** 2).mean(1), chosen)
    torch.testing.assert_close(losses["map"], expected, rtol=1e-4, atol=1e-6)


def test_teachers_computed_together_equal_each_teacher_computed_alone():
    """Three teachers (two map sizes), four samples each shifted or flipped its own way: the maps the loss
    computes together equal each teacher's map computed on its own."""
    torch.manual_seed(0)
    student = create_model("resnet8_slim", 1, 10)
    names, sides = ["a", "b", "c"], [4, 8, 4]
    loss_fn = distillation("explain-kd", names, CamLayer.of(student, PROBE), beta=1.0)
    maps = [torch.rand(4, side, side) for side in sides]
    moves = Moves(torch.tensor([[3, -2], [0, 0], [-5, 4], [1, 1]]), torch.tensor([False, True, True, False]))
    together = loss_fn.teacher_maps(maps, (32, 32), (6, 6), moves)
    for m, name in enumerate(names):
        alone = torch.stack([apply(resize_maps(maps[m][i:i + 1], (32, 32))[:, None],  # one sample, one map at a time
                                   Moves(moves.shifts[i:i + 1], moves.flips[i:i + 1]))[0, 0] for i in range(4)])
        alone = resize_maps(alone, (6, 6)).flatten(1)
        expected = (alone / alone.pow(2).sum(1, keepdim=True).sqrt()).view(4, 6, 6)
        torch.testing.assert_close(together[:, m], expected, rtol=1e-5, atol=1e-6)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_explain_kd_trains_under_bf16_autocast_in_channels_last(device):
    """fit() runs losses under bf16 autocast with channels_last models on CUDA; the student's Grad-CAM
    (a double backward) must work there. Checked against float32 on the CPU, with the CPU's bf16
    autocast here and, on a machine with one, the GPU's."""
    results = []
    for fast in (False, True):
        where = device if fast else "cpu"
        batch = {key: value.to(where) for key, value in make_batch().items()}
        batch["teachers/t1/cam_max"] = torch.tensor([1.0, 2.0], device=where)  # both samples' maps count
        torch.manual_seed(0)
        student = create_model("resnet8_slim", 1, 10).to(where)
        loss_fn = distillation("explain-kd", ["t1", "t2"], CamLayer.of(student, PROBE.to(where)), alpha=0.5,
                               beta=2.0)
        if fast:
            student = student.to(memory_format=torch.channels_last)
        with torch.autocast(where, dtype=torch.bfloat16, enabled=fast):
            losses = means(loss_fn(student, batch))
        losses["loss"].backward()
        results.append(({key: value.cpu() for key, value in losses.items()},
                        [p.grad.flatten().cpu() for p in student.parameters()]))
    (exact, exact_grads), (fast, fast_grads) = results
    assert fast["map"].dtype == torch.float32 and fast["map"].item() > 0
    # bf16 activations keep 8 bits of mantissa; the losses are taken in float32 (the KL of the bf16
    # logits themselves was 0.761 against 0.789: 4 % off), so they agree to about 0.1 %
    for key in ("ce", "kd", "map", "loss"):
        torch.testing.assert_close(fast[key], exact[key], rtol=5e-3, atol=1e-4)
    # each parameter's gradient points where float32's does: cosine 0.96 to 1.0 measured (kd alone, without
    # the double backward, 0.98 to 1.0); a map term lost under autocast would leave the early layers far off
    assert min(F.cosine_similarity(f, e, dim=0) for f, e in zip(fast_grads, exact_grads)) > 0.95


def test_the_random_policy_follows_each_rows_draw_by_its_store_index():
    """Rows 5 and 2 of the store: the draw names t2 for row 5 and t1 for row 2, whatever their scores say."""
    batch = {**make_batch(), "index": torch.tensor([5, 2])}
    student = create_model("resnet8_slim", 1, 10).eval()
    drawn = torch.tensor([0, 0, 0, 0, 0, 1, 0])  # store rows 0..6: only row 5 drew t2
    losses = means(distillation("explain-kd", ["t1", "t2"], CamLayer.of(student, PROBE), alpha=0.5, policy="random",
                                drawn=drawn)(student, batch))
    assert losses["chosen/t1"].item() == losses["chosen/t2"].item() == 0.5
    logits, _ = features_of(student, standardised(batch))
    soft = {t: F.softmax(batch[f"teachers/{t}/logits"].float() / 4.0, 1) for t in ("t1", "t2")}
    target = torch.stack([soft["t2"][0], soft["t1"][1]])  # row 5 -> t2, row 2 -> t1
    torch.testing.assert_close(losses["kd"], kd_per_row(logits, target, 4.0).mean(), rtol=1e-4, atol=1e-6)


def test_a_one_teacher_method_refuses_more_teachers_and_a_separate_kd_teacher():
    layer = CamLayer.of(create_model("resnet8_slim", 1, 10).eval(), PROBE)
    with pytest.raises(ValueError, match="kd learns from one teacher, not 2"):
        distillation("kd", ["t1", "t2"], layer)
    with pytest.raises(ValueError, match="explain-kd learns from one teacher, not 2"):
        distillation("explain-kd", ["t1", "t2"], layer, policy="global")
    with pytest.raises(ValueError, match="kd-avg takes no separate kd_teacher"):
        distillation("kd-avg", ["t1", "t2"], layer, kd_teacher="t1")
