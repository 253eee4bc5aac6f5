"""Views: their geometry, their rendering, and cached signals that belong to the image a student sees."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from conftest import invoke, make_imagenet, make_torchvision_teacher
from pipeline.data import DatasetInfo, Geometry, get_dataset, normalize
from pipeline.data.files import ImageFile
from pipeline.errors import PipelineError
from pipeline.explain import explain
from pipeline.store.codec import dequantize_cam, full_logits
from pipeline.store.teacher_store import TeacherStore
from pipeline.stream import BlockStream
from pipeline.teachers import load_teacher
from pipeline.views import PixelSource, ViewPolicy, draft_scale, image_decoder

PHOTOS = DatasetInfo("photos", 5, (224, 224, 3), (0.5,) * 3, (0.5,) * 3, ("train",), geometry=Geometry(256, 224),
                     mirror_symmetric=True)
DIGITS = DatasetInfo("digits-like", 10, (32, 32, 1), (0.5,), (0.5,), ("train",))


def test_the_eval_view_is_the_centre_crop_of_the_data_sets_geometry():
    policy = ViewPolicy.of(PHOTOS, count=4, seed=0)
    boxes, flips = policy.boxes("a.JPEG", 300, 400)
    # shorter side 300 * 224 / 256 = 262.5 -> 262 pixels, centred: 19 from the top, 69 from the left
    assert boxes[0].tolist() == [69, 19, 331, 281] and not flips[0]
    # rendered, it is torchvision's eval transform (resize the shorter side to 256, crop 224) up to resampling
    coarse = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 8, 10)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(300, 400), mode="bicubic")[0].clamp(0, 255).to(torch.uint8)
    eval_transform = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224)])
    reference = eval_transform(smooth).permute(1, 2, 0).numpy().astype(float)
    source = PixelSource(smooth.permute(1, 2, 0).numpy())
    error = lambda box: np.abs(source.view(box, False, (224, 224)).astype(float) - reference).mean()  # noqa: E731
    assert error(boxes[0]) < 2  # of 0..255 (1.4 measured): resampling differs, the region does not
    assert error(boxes[0] + [2, 0, 2, 0]) > 2 * error(boxes[0])  # a box 2 px off differs by far more (5.9)


def test_random_views_have_torchvisions_resized_crop_geometry_and_depend_on_seed_id_and_view_only():
    policy = ViewPolicy.of(PHOTOS, count=5, seed=3)
    height, width = 240, 320
    boxes, flips = zip(*(policy.boxes(f"img{i}", height, width) for i in range(800)))
    boxes, flips = np.stack(boxes)[:, 1:], np.stack(flips)[:, 1:]  # random views only
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= width).all() and (boxes[..., 3] <= height).all()
    area = w * h / (height * width)
    assert area.min() > 0.08 - 0.01 and area.max() <= 1
    assert (w / h).min() > 3 / 4 - 0.03 and (w / h).max() < 4 / 3 + 0.03
    assert 0.45 < flips.mean() < 0.55
    # the distribution of torchvision's own get_params (drawn from torch's generator), as a reference
    torch.manual_seed(0)
    reference = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                          for _ in range(3200)])
    reference_area = reference[:, 2] * reference[:, 3] / (height * width)
    assert abs(area.mean() - reference_area.mean()) < 0.02 and abs(np.median(w / h) - np.median(
        reference[:, 3] / reference[:, 2])) < 0.05
    # a pure function of (seed, sample id, view): more views keep the first ones, another seed or id moves them
    again, _ = ViewPolicy.of(PHOTOS, count=8, seed=3).boxes("img7", height, width)
    first, _ = policy.boxes("img7", height, width)
    assert (again[:5] == first).all()
    assert (ViewPolicy.of(PHOTOS, count=5, seed=4).boxes("img7", height, width)[0][1:] != first[1:]).any()
    assert (policy.boxes("img8", height, width)[0][1:] != first[1:]).any()


def test_in_memory_views_are_padded_crops_flipped_only_where_classes_allow_it():
    policy = ViewPolicy.of(DIGITS, count=6, shift=2)
    boxes, flips = zip(*(policy.boxes(str(i), 32, 32) for i in range(300)))
    boxes, flips = np.stack(boxes), np.stack(flips)
    assert (boxes[:, 0] == [0, 0, 32, 32]).all()
    assert set(boxes[:, 1:, 0].ravel()) == set(range(-2, 3)) and set(boxes[:, 1:, 1].ravel()) == set(range(-2, 3))
    assert ((boxes[..., 2] - boxes[..., 0]) == 32).all() and ((boxes[..., 3] - boxes[..., 1]) == 32).all()
    assert not flips.any()  # a mirrored digit is another symbol
    cifar = DatasetInfo("cifar-like", 10, (32, 32, 3), (0.5,) * 3, (0.5,) * 3, ("train",), mirror_symmetric=True)
    assert 0.4 < np.stack([ViewPolicy.of(cifar, 6).boxes(str(i), 32, 32)[1][1:] for i in range(300)]).mean() < 0.6
    with pytest.raises(PipelineError, match="--views 4: random views of digits-like need --view-shift above 0"):
        ViewPolicy.of(DIGITS, count=4, shift=0)
    with pytest.raises(PipelineError, match="--views must be at least 1"):
        ViewPolicy.of(DIGITS, count=0)


def test_rendering_is_torchvisions_resized_crop_of_a_pil_image_and_pads_with_black():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    inside = PixelSource(image).view((10, 5, 60, 45), True, (32, 32))
    reference = np.asarray(TF.resized_crop(Image.fromarray(image), 5, 10, 40, 50, [32, 32]))[:, ::-1]
    # equal inside; the outermost pixels differ, as the box's resize also weighs the pixels just past it
    # (torchvision crops first), which is what lets a box have fractional edges
    np.testing.assert_array_equal(inside[1:-1, 1:-1], reference[1:-1, 1:-1])
    assert (inside[[0, -1]] != reference[[0, -1]]).any()
    past = PixelSource(image).view((-3, 2, 67, 52), False, (50, 70))  # 3 px past the left, 2 past the bottom
    np.testing.assert_array_equal(past, np.pad(image, ((0, 2), (3, 0), (0, 0)))[2:52, 0:70])
    digit = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)  # one channel stays one channel
    np.testing.assert_array_equal(PixelSource(digit).view((1, -1, 9, 7), True, (8, 8)),
                                  np.pad(digit, ((1, 0), (0, 1), (0, 0)))[:8, 1:9][:, ::-1])


def test_draft_scale_is_the_largest_jpeg_reduction_that_leaves_the_box_the_input_size():
    assert draft_scale((0, 0, 447, 900), (224, 224)) == 1  # 447 < 2 x 224
    assert draft_scale((10, 20, 458, 468), (224, 224)) == 2
    assert draft_scale((0, 0, 900, 1000), (224, 224)) == 4  # 900 >= 4 x 224, 1000 < 8 x 224
    assert draft_scale((0, 0, 1792, 1792), (224, 224)) == 8
    assert draft_scale((0, 0, 1000, 300), (112, 224)) == 2  # size is (h, w): 300 < 4 x 112 though 1000 >= 4 x 224


def test_a_jpeg_view_decoded_at_a_reduced_scale_is_cut_at_its_fractional_box(tmp_path):
    coarse = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 12, 16)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(900, 1200), mode="bicubic")[0].clamp(0, 255)
    pixels = smooth.to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    box = (101, 57, 1001, 857)  # odd edges: at 1/2 and 1/8 scale they fall between pixels
    for size, scale in (((224, 224), 2), ((100, 100), 8)):
        assert draft_scale(box, size) == scale
        whole = ImageFile(tmp_path / "a.jpg", draft=False).view(box, False, size).astype(float)
        source = ImageFile(tmp_path / "a.jpg", draft=True)
        drafted = source.view(box, False, size)
        assert source.decoded[scale].size == (-(-1200 // scale), -(-900 // scale))  # decoded at 1/scale
        shifted = ImageFile(tmp_path / "a.jpg", draft=False).view((105, 57, 1005, 857), False, size)
        # the same region as the full decode's (0.24 and 0.55 of 255 measured), where a box 4 px off is 4.6 away
        assert np.abs(drafted - whole).mean() < 1 < np.abs(shifted - whole).mean() / 4
        # other formats have no draft mode: decoded whole, the same pixels as without it
        np.testing.assert_array_equal(ImageFile(tmp_path / "a.png", draft=True).view(box, True, size),
                                      ImageFile(tmp_path / "a.png", draft=False).view(box, True, size))


def compare_with_live_teachers(store_path, dataset, teachers, rows_per_epoch=4, epochs=3):
    """For a few (sample, view) pairs that the student streams, run each teacher live on the image the
    student was given and compare with what the store cached for that view."""
    store = TeacherStore.open(store_path)
    names = store.teachers
    fields = ["images", "labels", *(f"teachers/{n}/{f}" for n in names
                                    for f in ("logits", "cam", "cam_max", "y_prob", "o_prob"))]
    stream = BlockStream(str(store_path), fields, list(range(store.num_blocks)), batch_size=rows_per_epoch, seed=5,
                         dataset=None if store.attrs["stores_images"] else dataset)
    models = {t.name: t for t in (load_teacher(str(path), dataset.info) for path in teachers)}
    other_than_eval = 0  # rows whose image is not their eval view: the comparison covers random views
    drafted = 0  # rows whose view was decoded from a JPEG at a reduced scale
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        batch = stream.on_device(next(iter(stream)))  # views decoded on the device are cut here
        for row, image in zip(batch["index"].tolist(), batch["images"]):
            view = stream.view(epoch, row // store.block_size)
            box = store.read_rows(row, row + 1, ["view_boxes"], view)["view_boxes"][0]
            drafted += stream.policy.draft and draft_scale(box, image.shape[:2]) > 1
            eval_box = store.read_rows(row, row + 1, ["view_boxes"], 0)["view_boxes"][0]
            source = dataset.view_source(row, stream.policy.draft)
            other_than_eval += not np.array_equal(source.view(eval_box, False, image.shape[:2], stream.interpolation),
                                                  image.numpy())
        for name in names:
            teacher = models[name]
            mean, std = teacher.transform.mean, teacher.transform.std
            live = explain(teacher.model, teacher.layer, normalize(batch["images"], mean, std), batch["labels"],
                           "label", mean, std)
            cached_logits = full_logits(batch, name, dataset.info.num_classes)
            torch.testing.assert_close(cached_logits, live.logits.float(), rtol=2e-3, atol=2e-3)
            cam = dequantize_cam(batch[f"teachers/{name}/cam"], batch[f"teachers/{name}/cam_max"])
            scale = live.cam.flatten(1).amax(1)[:, None, None]
            assert ((cam - live.cam).abs() <= scale / 255 * 0.51 + 1e-6).all(), name
            torch.testing.assert_close(batch[f"teachers/{name}/y_prob"], live.y_prob.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batch[f"teachers/{name}/o_prob"], live.o_prob.float(), rtol=1e-4, atol=1e-5)
    assert other_than_eval >= 2, "the random views were not compared"
    return drafted


def test_cached_signals_of_each_view_equal_live_teachers_on_the_students_image(teachers, tmp_path):
    store = tmp_path / "views.zarr"
    invoke("extract-teachers", "--split", "test", "--teachers", ",".join(map(str, teachers)), "--store", store,
           "--views", 3, "--view-shift", 3, "--block-size", 128)
    compare_with_live_teachers(store, get_dataset("digits", "test"), teachers)


def test_cached_signals_of_each_view_of_image_files_equal_a_live_teacher(tmp_path, monkeypatch):
    make_imagenet(tmp_path / "data", train_per_class=2, sides=(400, 1000))  # some views 2x or 4x the 224 px input
    teacher = make_torchvision_teacher(tmp_path / "resnet18.pt", "resnet18", 5)
    store = tmp_path / "files.zarr"
    invoke("extract-teachers", "--dataset", "ilsvrc2012", "--data-root", tmp_path / "data", "--store", store,
           "--teachers", teacher, "--views", 3, "--block-size", 4)
    group = TeacherStore.open(store)
    assert group.attrs["views"] == {"count": 3, "seed": 0, "flip": True, "shift": 0, "eval_crop": 224 / 256,
                                    "draft": True, "decoder": image_decoder()}
    dataset = get_dataset("ilsvrc2012", "train", str(tmp_path / "data"))
    assert compare_with_live_teachers(store, dataset, [teacher], rows_per_epoch=3) >= 2  # JPEG drafts compared
    # another Pillow or libjpeg build may decode and resize to other pixels: the student is refused
    monkeypatch.setattr("pipeline.stream.image_decoder", lambda: "Pillow 0.0, libjpeg 9")
    with pytest.raises(PipelineError, match="cut its views with Pillow .*, and this machine has Pillow 0.0, libjpeg 9"):
        BlockStream(str(store), ["images", "labels"], [0], batch_size=4, dataset=dataset)
    monkeypatch.undo()
    # an image file replaced after extraction (here resized) is not cut where the teacher looked: refused
    path = dataset.root / dataset.files[0].decode()
    Image.open(path).resize((150, 120)).save(path)
    stream = BlockStream(str(store), ["images", "labels"], [0], batch_size=4, dataset=dataset)
    with pytest.raises(PipelineError, match=f"image {path} is not the image store .* cut its views from \\(it is "
                                            "150x120 now, and view . was"):
        list(stream)


@pytest.mark.slow
def test_three_torchvision_teachers_four_views_topk_logits_and_a_resumed_student(tmp_path, monkeypatch):
    """Three torchvision teachers on a fabricated ImageNet tree of 12 classes: stage one with --views 4 and
    --logits topk:10; a small student (resnet8_slim, at 224 px: a torchvision one trains in test_real_datasets)
    trained two epochs on random-resized-crop views with no teacher constructed, killed after one epoch and resumed,
    ends with an uninterrupted run's weights."""
    from pipeline.train import Resume

    wnids = [f"n{i:08d}" for i in range(12)]
    make_imagenet(tmp_path / "data", classes=wnids, train_per_class=1, meta=False)
    teachers = [make_torchvision_teacher(tmp_path / f"{arch}.pt", arch, 12, seed=i)
                for i, arch in enumerate(("resnet18", "vgg11", "densenet121"))]
    store = tmp_path / "views.zarr"
    data = ["--dataset", "ilsvrc2012", "--data-root", tmp_path / "data"]
    invoke("extract-teachers", *data, "--store", store, "--teachers", ",".join(map(str, teachers)), "--views", 4,
           "--logits", "topk:10", "--block-size", 4, "--batch-size", 4)
    group = TeacherStore.open(store)
    assert group.num_views == 4 and group.logits_mode == {"mode": "topk", "k": 10}
    assert group.group["teachers/densenet121/logits"].shape == (12, 4, 10)
    # each teacher keeps its own map resolution, and the Grad-CAM path its head allows
    assert {name: group.group[f"teachers/{name}/cam"].shape[2:] for name in group.teachers} == \
        {"resnet18": (7, 7), "vgg11": (14, 14), "densenet121": (7, 7)}
    assert {name: group.group[f"teachers/{name}"].attrs["cam_path"] for name in group.teachers} == \
        {"resnet18": "closed-form", "vgg11": "autograd", "densenet121": "closed-form"}
    boxes = group.group["view_boxes"][...]
    assert (boxes[:, 1:] != boxes[:, :1]).any(axis=2).all()  # every random view differs from the eval view
    assert invoke("store", "verify", store).output.startswith("OK")

    for path in teachers:  # stage two must not need them
        path.unlink()
    monkeypatch.setattr("pipeline.teachers.load_teacher", lambda *a, **k: pytest.fail("a teacher was constructed"))
    args = ["train-student", *data, "--store", store, "--method", "explain-kd", "--arch", "resnet8_slim",
            "--epochs", 2, "--batch-size", 4, "--teacher", "resnet18"]  # ImageNet holds out no split to judge by
    invoke(*args, "--out-dir", tmp_path / "whole")
    original = Resume.save

    def save_then_die(self, state):
        original(self, state)
        raise KeyboardInterrupt  # killed right after the first epoch's state was saved

    monkeypatch.setattr(Resume, "save", save_then_die)
    assert "Aborted!" in invoke(*args, "--out-dir", tmp_path / "split", exit_code=1).output
    monkeypatch.setattr(Resume, "save", original)
    assert "resuming at epoch 2, step 0" in invoke(*args, "--out-dir", tmp_path / "split", "--resume").output
    whole, split = (torch.load(tmp_path / run / "explain-kd" / "checkpoint.pt", weights_only=True)["state_dict"]
                    for run in ("whole", "split"))
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
