"""`--decode gpu`: image files read as bytes by the loader, decoded and cut on the device, every view of an
image from one decode. Without a GPU the decoding runs here on the CPU device (torchvision's libjpeg where
a GPU runs nvJPEG), with the CUDA check lifted; the refusals are those a machine without one gives."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import extract_args, invoke, make_imagenet, make_torchvision_teacher
from pipeline.data import get_dataset
from pipeline.data.files import ImageFile
from pipeline.device_views import DeviceDecoder, read_encoded
from pipeline.errors import PipelineError
from pipeline.store.teacher_store import TeacherStore
from pipeline.views import ViewPolicy, gpu_decoder
from test_views import compare_with_live_teachers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small tree of photo-like JPEGs in ImageNet's layout (3 classes) and a random-weight resnet18 of its
    classes."""
    root = tmp_path_factory.mktemp("photos")
    make_imagenet(root / "data", train_per_class=2, sides=(200, 420))
    return root / "data", make_torchvision_teacher(root / "resnet18.pt", "resnet18", 3)


def folder(root) -> str:
    """The photos as an image folder seen at 64 px (teachers' work 12 times smaller than at 224)."""
    return f"imagefolder:{root}@73/64"


def data_args(root):
    return ["--dataset", folder(root)]


def without_cuda_check(monkeypatch):
    for module in ("pipeline.extraction", "pipeline.stream"):
        monkeypatch.setattr(f"{module}.require_cuda", lambda *args: None)


def test_decode_gpu_without_cuda_stops_before_the_store_is_touched(photos, tmp_path):
    root, teacher = photos
    result = invoke(*extract_args([teacher], tmp_path / "s.zarr"), *data_args(root), "--decode", "gpu",
                    "--device", "cpu", exit_code=1)
    assert result.output.splitlines() == [
        "Error: --decode gpu decodes JPEGs on a CUDA GPU with nvJPEG, and this run's device is cpu; run on a "
        "machine with one (--device cuda), or pass --decode cpu"]  # before any teacher loads
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(PipelineError, match="--decode gpu decodes image files, and digits is held in memory; use "
                                            "--decode cpu"):
        ViewPolicy.of(get_dataset("digits", "train").info, decode="gpu")
    result = invoke(*extract_args([teacher], tmp_path / "s.zarr"), "--decode", "tpu", exit_code=1)
    assert "unknown decoder 'tpu'; choose one of: cpu, gpu" in result.output


def test_views_cut_on_the_device_are_pillows_within_one_level(photos):
    """The same decode (torchvision's libjpeg here, Pillow's there) and the same boxes: Pillow resizes in the
    order it picks, the device in Resample.c's, so a pixel may move by one level, no more."""
    root, _ = photos
    dataset = get_dataset(folder(root), "train")
    policy = ViewPolicy.of(dataset.info, count=4, seed=3)
    files = [ImageFile(dataset.path(i), draft=False) for i in range(len(dataset))]
    boxes, flips = zip(*(policy.boxes(dataset.sample_id(i), f.height, f.width) for i, f in enumerate(files)))
    encoded = [read_encoded(f) for f in files]
    sizes = [((224, 224), "bilinear"), ((96, 64), "bicubic")]
    (large, small), errors = DeviceDecoder(CPU).views(encoded, torch.tensor(np.stack(boxes)),
                                                       torch.tensor(np.stack(flips)), sizes, [""] * len(files))
    assert errors == [""] * len(files) and large.shape == (len(files), 4, 224, 224, 3)
    assert any(f.any() for f in flips), "no flipped view was compared"
    largest = 0
    for n, f in enumerate(files):
        for v in range(4):
            pillow = f.view(boxes[n][v], bool(flips[n][v]), (224, 224))
            largest = max(largest, int(np.abs(pillow.astype(int) - large[n, v].numpy()).max()))
            pillow = f.view(boxes[n][v], bool(flips[n][v]), (96, 64), "bicubic")
            assert np.abs(pillow.astype(int) - small[n, v].numpy()).mean() < 0.5
    assert largest <= 1


def test_a_file_the_device_refuses_is_decoded_by_pillow_and_named_once(photos, tmp_path, monkeypatch):
    root, _ = photos
    path, other = sorted((root / "train").rglob("*.JPEG"))[:2]
    cmyk = tmp_path / "cmyk.jpg"  # routed to Pillow by its header: never offered to the device
    Image.open(path).convert("CMYK").save(cmyk, quality=95)
    original, offered = DeviceDecoder.decode_jpegs, []

    def refuse_one(self, images):
        offered.extend(image.path for image in images)
        if any(image.path == str(path) for image in images):
            raise RuntimeError("nvjpeg: unsupported JPEG\ncode 4")
        return original(self, images)

    monkeypatch.setattr(DeviceDecoder, "decode_jpegs", refuse_one)
    said = []
    decoder = DeviceDecoder(CPU, said.append)
    encoded = [read_encoded(ImageFile(p, draft=False)) for p in (path, other, cmyk)]
    for _ in range(2):  # a second epoch names it no more
        pixels = decoder.decode(encoded)
    assert said == [f"decoding {path} with Pillow on the CPU (cpu refused it: code 4)"]
    assert str(cmyk) not in offered
    for pixels_of, file in zip(pixels, (path, other, cmyk)):
        assert np.array_equal(pixels_of.permute(1, 2, 0).numpy(), np.asarray(Image.open(file).convert("RGB")))


def test_an_error_of_the_device_stops_the_run_and_sends_no_file_to_pillow(photos, monkeypatch):
    """Out of memory is no property of a file: sending the batch to Pillow would let the moment decide which
    decoder an image gets (and stage two decide otherwise)."""
    root, _ = photos
    monkeypatch.setattr(DeviceDecoder, "decode_jpegs", lambda self, images: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    said = []
    files = sorted((root / "train").rglob("*.JPEG"))[:2]
    with pytest.raises(torch.OutOfMemoryError):
        DeviceDecoder(CPU, said.append).decode([read_encoded(ImageFile(p, draft=False)) for p in files])
    assert said == []


def test_a_damaged_jpeg_stops_extraction_or_is_skipped_and_recorded(photos, tmp_path, monkeypatch):
    root, teacher = photos
    without_cuda_check(monkeypatch)
    damaged = tmp_path / "data"
    make_imagenet(damaged, train_per_class=2, sides=(200, 420))
    path = sorted((damaged / "train").rglob("*.JPEG"))[1]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # the header survives, the scan does not
    Image.open(path)  # (the header reads)
    args = [*extract_args([teacher], tmp_path / "s.zarr", block_size=4), *data_args(damaged), "--decode", "gpu",
            "--device", "cpu"]
    result = invoke(*args, exit_code=1)
    assert f"cannot read image {path}" in result.output and "pass --skip-corrupt" in result.output
    result = invoke(*args, "--skip-corrupt")
    assert f"decoding {path} with Pillow on the CPU" in result.output
    assert f"skipped unreadable image {path} (row 1, recorded as valid = False)" in result.output
    valid = TeacherStore.open(tmp_path / "s.zarr").group["valid"][...]
    assert valid.tolist() == [i != 1 for i in range(len(valid))]


def test_a_store_cut_on_the_device_trains_students_that_cut_alike(photos, tmp_path, monkeypatch):
    """Stage one decodes on the device and records it; stage two follows the store: its images are the views
    the teacher saw (cached signals equal a live teacher on them), and without the device it is refused."""
    root, teacher = photos
    store = tmp_path / "gpu.zarr"
    with monkeypatch.context() as patched:
        without_cuda_check(patched)
        invoke(*extract_args([teacher], store, block_size=4), *data_args(root), "--decode", "gpu", "--device", "cpu",
               "--views", 3, "--batch-size", 3)
        views = TeacherStore.open(store).attrs["views"]
        assert views["decoder"] == gpu_decoder() and views["draft"] is False  # nvJPEG decodes whole images
        dataset = get_dataset(folder(root), "train")
        compare_with_live_teachers(store, dataset, [teacher], rows_per_epoch=3)
    with pytest.raises(PipelineError, match=f"store {store} was extracted with --decode gpu, so its students decode "
                                            "JPEGs on a CUDA GPU with nvJPEG, and this run's device is cpu; train on"):
        compare_with_live_teachers(store, dataset, [teacher])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_nvjpeg_stores_train_captured_students(photos, tmp_path):
    """The real thing: stage one decodes with nvJPEG on the GPU, a student trains from the store on the GPU with
    its step captured (CUDA graphs); nvJPEG gives a file the same pixels in a batch of any size (stage one
    and stage two batch the files otherwise), and its views stay near Pillow's."""
    root, teacher = photos
    store = tmp_path / "nvjpeg.zarr"
    invoke(*extract_args([teacher], store, block_size=4), *data_args(root), "--decode", "gpu", "--device", "cuda",
           "--views", 2)
    result = invoke("train-student", *data_args(root), "--store", store, "--method", "kd", "--teacher", "resnet18",
                    "--arch", "resnet8_slim", "--epochs", 2, "--batch-size", 4, "--compile", "--device", "cuda",
                    "--out-dir", tmp_path / "students")
    assert "epoch 2/2" in result.output
    dataset = get_dataset(folder(root), "train")
    files = [ImageFile(dataset.path(i), draft=False) for i in range(len(dataset))]
    encoded = [read_encoded(f) for f in files]
    boxes = torch.tensor([[[0, 0, f.width, f.height]] for f in files], dtype=torch.float32)
    unflipped = torch.zeros(len(files), 1, dtype=torch.bool)
    (views,), errors = DeviceDecoder(torch.device("cuda")).views(encoded, boxes, unflipped, [((224, 224), "bilinear")],
                                                                 [""] * len(files))
    decoder = DeviceDecoder(torch.device("cuda"))
    batched = decoder.decode(encoded)
    for image, pixels in zip(encoded, batched):
        assert torch.equal(decoder.decode([image])[0], pixels), image.path
    pillow = np.stack([f.view((0, 0, f.width, f.height), False, (224, 224)) for f in files])
    difference = np.abs(views[:, 0].cpu().numpy().astype(int) - pillow)
    print(f"nvJPEG + exact resize vs Pillow, whole images at 224 px: largest {difference.max()}, mean "
          f"{difference.mean():.3f} levels")
    assert errors == [""] * len(files) and difference.mean() < 2
