"""CIFAR pickles, ImageNet folders, torchvision teachers, top-k logits: on fabricated on-disk layouts."""

import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision
import zarr
from PIL import Image

from conftest import IMAGENET_WNIDS, invoke, make_cifar, make_imagenet, make_teacher, make_torchvision_teacher
from pipeline.data import DATA_ROOT_ENV, get_dataset, normalize
from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, probe_input
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint, weights_sha256
from pipeline.store.teacher_store import TeacherStore
from pipeline.teachers import load_teacher, torchvision_weights


# -- CIFAR ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "classes", "train", "val", "test"), [("cifar10", 10, 18, 2, 4),
                                                                       ("cifar100", 100, 3, 1, 4)])
def test_cifar_pickles_load_in_hwc_order(tmp_path, name, classes, train, val, test):
    make_cifar(tmp_path, name)
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    first = "data_batch_1" if name == "cifar10" else "train"
    with open(folder / first, "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    data = get_dataset(name, "train", str(tmp_path))
    held_out = get_dataset(name, "val", str(tmp_path))
    assert len(data) == train and len(held_out) == val and len(get_dataset(name, "test", str(tmp_path))) == test
    assert not set(data.ids) & set(held_out.ids)  # val is held out of train
    assert data.info.num_classes == classes and data.images.shape == (train, 32, 32, 3)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    for i in range(4):  # row layout is 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32
        split = data if f"{first}:{i}" in data.ids else held_out
        row = list(split.ids).index(f"{first}:{i}")
        assert split.images[row, 2, 5, 0] == raw[b"data"][i][2 * 32 + 5]
        assert split.images[row, 2, 5, 2] == raw[b"data"][i][2048 + 2 * 32 + 5]
        assert split.labels[row] == raw[label_key][i]
    assert get_dataset(name, "train", str(folder)).identity() == data.identity()  # root may be the folder itself


def test_cifar_errors_say_what_was_expected_where(tmp_path):
    with pytest.raises(PipelineError, match=r"expects torchvision's CIFAR python layout .*cifar-10-batches-py/ "
                                            r"\(data_batch_1, \.\.\., test_batch\), which does not exist"):
        get_dataset("cifar10", "train", str(tmp_path))
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_text("garbage")
    with pytest.raises(PipelineError, match="data_batch_3 is not a CIFAR python batch"):
        get_dataset("cifar10", "train", str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(PipelineError, match="data_batch_3 is missing"):
        get_dataset("cifar10", "train", str(tmp_path))


def test_data_root_precedence_command_line_then_params_then_environment(tmp_path, monkeypatch):
    env_root, params_root = make_cifar(tmp_path / "env", seed=1), make_cifar(tmp_path / "params", seed=2)
    cli_root = make_cifar(tmp_path / "cli", seed=3)
    monkeypatch.setenv(DATA_ROOT_ENV, str(env_root))
    assert get_dataset("cifar10", "test").identity() == get_dataset("cifar10", "test", str(env_root)).identity()
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  dataset: cifar10\n  data_root: {params_root}\n")
    from pipeline.config import ExtractConfig, load_config
    assert load_config(ExtractConfig, params).data_root == str(params_root)
    assert load_config(ExtractConfig, params, data_root=str(cli_root)).data_root == str(cli_root)


# -- ImageNet folders --------------------------------------------------------------------

def test_imagenet_class_order_follows_the_devkit_or_the_sorted_folders(tmp_path):
    with_meta = get_dataset("ilsvrc2012", "train", str(make_imagenet(tmp_path / "a")))
    assert with_meta.info.num_classes == 5  # meta.bin lists five wnids; the tree holds three of them
    assert sorted(set(with_meta.labels.tolist())) == [1, 2, 3]  # their standard indices, not 0..2
    assert next(iter(with_meta.ids)) == f"train/{IMAGENET_WNIDS[1]}/{IMAGENET_WNIDS[1]}_0000.JPEG"
    plain = get_dataset("ilsvrc2012", "val", str(make_imagenet(tmp_path / "b", meta=False)))
    assert plain.info.num_classes == 3 and plain.labels.tolist() == [0, 1, 2]
    folder = get_dataset(f"imagefolder:{tmp_path / 'b'}", "val")
    assert folder.labels.tolist() == [0, 1, 2] and folder.info.splits == ("train", "val")
    assert folder.identity()["ids_sha256"] == plain.identity()["ids_sha256"]
    flat = get_dataset(f"imagefolder:{tmp_path / 'b' / 'train'}", "all")  # <path>/<class>/ without splits
    assert flat.info.splits == ("all",) and flat.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    (tmp_path / "b" / "train").rename(tmp_path / "b" / "kept")  # val/ alone still names its classes
    assert get_dataset("ilsvrc2012", "val", str(tmp_path / "b")).labels.tolist() == [0, 1, 2]


def test_an_image_folder_of_32_px_images_is_seen_and_trained_at_32_px(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "small"
    for split, count in (("train", 8), ("test", 3)):
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / f"class{c}" / f"{i}.png")
    name = f"imagefolder:{root}@32"
    data = get_dataset(name, "train")
    assert data.info.image_shape == (32, 32, 3)
    with Image.open(root / "train" / "class0" / "0.png") as image:
        assert np.array_equal(data.image(0), np.asarray(image.convert("RGB")))  # its own pixels, untouched
    assert get_dataset(f"imagefolder:{root}", "train").image(0).shape == (224, 224, 3)  # ImageNet's, by default
    assert get_dataset(f"imagefolder:{root}@40/24", "train").image(0).shape == (24, 24, 3)
    teacher = make_teacher(tmp_path / "teacher.pt", "resnet8_slim", dataset=name)
    store = tmp_path / "small.zarr"
    invoke("extract-teachers", "--dataset", name, "--teachers", teacher, "--store", store, "--views", 2)
    opened = TeacherStore.open(store)
    assert opened.teacher_attrs("resnet8_slim")["map_shape"] == [8, 8]  # a 4x-downsampling net on 32 px inputs
    assert zarr.open_group(store)["view_boxes"][0, 0].tolist() == [0, 0, 32, 32]  # the whole image
    invoke("store", "verify", store)
    refused = invoke("train-student", "--dataset", name, "--store", store, "--epochs", 1, "--kd-source", "best",
                     "--out-dir", tmp_path / "students", exit_code=1)  # logits from the best teacher ...
    assert "has no top-1 measured on this data's held-out split" in refused.output  # ... and this folder has no val
    invoke("train-student", "--dataset", name, "--store", store, "--epochs", 1, "--batch-size", 8, "--kd-source",
           "best", "--out-dir", tmp_path / "students", "--device", "cpu", "--teacher", "resnet8_slim")  # named: runs
    for spec in ("224/256", "0"):
        with pytest.raises(PipelineError, match="after @ give the size images are seen at"):
            get_dataset(f"imagefolder:{root}@{spec}", "train")
    with pytest.raises(PipelineError, match=f"image folder {root}@abc does not exist"):  # no size: part of the path
        get_dataset(f"imagefolder:{root}@abc", "train")


def test_imagenet_images_match_torchvision_eval_transform(tmp_path):
    data = get_dataset("ilsvrc2012", "val", str(make_imagenet(tmp_path)))
    preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()  # resize 232, crop 224
    _, transform = torchvision_weights("resnet50", "IMAGENET1K_V2")
    ours = normalize(torch.from_numpy(data.image(0, transform.geometry))[None], preset.mean, preset.std)[0]
    with Image.open(data.root / next(iter(data.ids))) as image:
        reference = preset(image.convert("RGB"))
    assert ours.shape == reference.shape == (3, 224, 224)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert data.image(0).shape == (224, 224, 3)  # the data set's own 256 -> 224 geometry


def test_imagenet_layout_errors_name_the_expected_place(tmp_path):
    with pytest.raises(PipelineError, match=r"expected .*/train/<wnid>/\*\.JPEG .*; .*train does not exist"):
        get_dataset("ilsvrc2012", "train", str(tmp_path))
    root = make_imagenet(tmp_path / "flat", meta=False)
    for image in list((root / "val").rglob("*.JPEG")):
        image.rename(root / "val" / image.name)
    for folder in (root / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(PipelineError, match="val holds images directly .*sort them into class folders"):
        get_dataset("ilsvrc2012", "val", str(root))
    root = make_imagenet(tmp_path / "extra")
    (root / "val" / "n99999999").mkdir()
    with pytest.raises(PipelineError, match="class folder.s. n99999999 that are not among the 5 classes"):
        get_dataset("ilsvrc2012", "val", str(root))


# -- teachers -----------------------------------------------------------------------------

def test_target_layer_is_the_last_feature_map_and_the_head_decides_the_path():
    probe = probe_input((224, 224, 3))
    found = {}
    for arch in ("resnet18", "vgg11", "densenet121"):
        model = create_model(f"torchvision:{arch}", 3, 5).eval()
        found[arch] = CamLayer.of(model, probe)
    assert found["resnet18"] == CamLayer("layer4", "fc")  # GAP + Linear: closed form
    assert found["vgg11"] == CamLayer("features.19", None)  # last ReLU before the final max-pool
    assert found["densenet121"] == CamLayer("features", "classifier")  # GAP + Linear on the rectified map


def test_weights_enum_resolves_its_transform_without_fetching():
    weights, transform = torchvision_weights("resnet50", "IMAGENET1K_V2")
    assert weights is torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert (transform.geometry.resize, transform.geometry.crop) == (232, 224)
    assert transform.mean == (0.485, 0.456, 0.406)
    with pytest.raises(PipelineError, match="has no weights 'IMAGENET9K'; choose one of: IMAGENET1K_V1, IMAGENET1K_V2"):
        torchvision_weights("resnet50", "IMAGENET9K")
    with pytest.raises(PipelineError, match=r"torchvision:resnet50 needs weights, one of: .*DEFAULT"):
        torchvision_weights("resnet50", "")
    with pytest.raises(PipelineError, match="unknown torchvision architecture 'resnet51'; choose one of: alexnet"):
        torchvision_weights("resnet51", "DEFAULT")


def test_pretrained_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    """A file already in TORCH_HOME is used as is; nothing is downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    info = get_dataset("ilsvrc2012", "val", str(make_imagenet(tmp_path / "in"))).info
    info = type(info)(**{**info.__dict__, "num_classes": 1000})
    teacher = load_teacher("torchvision:resnet18:IMAGENET1K_V1", info)
    assert teacher.name == "resnet18" and teacher.identity["arch"] == "torchvision:resnet18"
    assert teacher.identity["transform"]["resize"] == 256 and teacher.identity["checkpoint_val_top1"] is None  # published: on the test split
    assert torch.equal(teacher.model.fc.weight, torch.load(cached)["fc.weight"])


def test_timm_teachers_need_timm_and_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    info = get_dataset("digits", "test").info
    with pytest.raises(PipelineError, match=r"teacher timm:resnet50.a1_in1k needs the timm package: pip install timm"):
        load_teacher("timm:resnet50.a1_in1k", info)


# -- end to end over a fabricated ImageNet tree ------------------------------------------

class TorchvisionTeachers:
    """The resnet18, vgg11 and densenet121 checkpoints (5 classes, seeds 0, 1, 2) in `root`, each made when a test
    first asks for it: vgg11's 480 MB take 2.5 s, and no test here asks for vgg11."""

    ARCHS = ("resnet18", "vgg11", "densenet121")

    def __init__(self, root):
        self.root = root

    def __len__(self):
        return len(self.ARCHS)

    def __getitem__(self, i):
        arch = self.ARCHS[i]
        path = self.root / f"{arch}.pt"
        if not path.exists():
            make_torchvision_teacher(path, arch, 5, seed=self.ARCHS.index(arch))
        return path

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet(root / "data", corrupt=True)
    return root, TorchvisionTeachers(root)


@pytest.mark.slow  # seconds the default set cannot spare: CI runs it
def test_a_corrupt_image_stops_extraction_until_skip_corrupt_records_it(imagenet, tmp_path):
    root, teachers = imagenet
    store = tmp_path / "store.zarr"
    args = ["extract-teachers", "--dataset", "ilsvrc2012", "--data-root", root / "data", "--store", store,
            "--teachers", teachers[0], "--block-size", 4, "--batch-size", 4]
    failed = invoke(*args, exit_code=1)
    assert f"cannot read image {root / 'data' / 'train' / IMAGENET_WNIDS[1] / 'zz_corrupt.JPEG'}" in failed.output
    error = [line for line in failed.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0].endswith("replace the file, or pass --skip-corrupt to skip and record it")
    result = invoke(*args, "--skip-corrupt")
    assert "skipped unreadable image" in result.output and "zz_corrupt.JPEG" in result.output

    group = zarr.open_group(store, mode="r")
    assert group["labels"].shape == (10,) and "images" not in group  # 224 px images stay in the files
    assert group["valid"][...].tolist() == [True] * 3 + [False] + [True] * 6  # the corrupt file sorts last
    assert not group["teachers/resnet18/logits"][3].any() and group["teachers/resnet18/cam_max"][3] == 0
    assert group["teachers/resnet18/logits"].shape == (10, 1, 5)
    assert invoke("store", "verify", store).output.startswith("OK")
    assert "skipped    1 unreadable image(s)" in invoke("store", "info", store).output


@pytest.mark.slow  # resnet18 extractions at 224 px the default set cannot spare: CI runs it
def test_target_layer_option_and_topk_logits(imagenet, tmp_path):
    root, teachers = imagenet
    store = tmp_path / "topk.zarr"
    invoke("extract-teachers", "--dataset", "ilsvrc2012", "--data-root", root / "data", "--store", store,
           "--teachers", teachers[0], "--target-layer", "resnet18=layer3", "--logits", "topk:2",
           "--block-size", 4, "--skip-corrupt")
    group = zarr.open_group(store, mode="r")
    assert group.attrs["logits"] == {"mode": "topk", "k": 2}
    assert group["teachers/resnet18/cam"].shape == (10, 1, 14, 14)
    assert group["teachers/resnet18"].attrs["cam_path"] == "autograd"  # layer3 does not feed the GAP head
    assert group["teachers/resnet18/logits"].shape == (10, 1, 2)
    assert group["teachers/resnet18/logit_classes"].dtype == np.int16
    full = tmp_path / "full.zarr"
    invoke("extract-teachers", "--dataset", "ilsvrc2012", "--data-root", root / "data", "--store", full,
           "--teachers", teachers[0], "--target-layer", "resnet18=layer3", "--block-size", 4, "--skip-corrupt")
    all_logits = zarr.open_group(full, mode="r")["teachers/resnet18/logits"][:, 0].astype(np.float32)
    top = np.sort(all_logits, axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(group["teachers/resnet18/logits"][:, 0].astype(np.float32), top, atol=1e-2)
    student = invoke("train-student", "--dataset", "ilsvrc2012", "--data-root", root / "data", "--store", store,
                     "--method", "explain-kd", "--arch", "torchvision:resnet18", "--epochs", 1, "--batch-size", 4,
                     "--out-dir", tmp_path / "students", "--teacher", "resnet18")  # its Grad-CAM map term at 224 px
    assert "chosen/resnet18=" in student.output and (tmp_path / "students" / "explain-kd" / "checkpoint.pt").is_file()
    bad = invoke("extract-teachers", "--dataset", "ilsvrc2012", "--data-root", root / "data", "--store",
                 tmp_path / "x.zarr", "--teachers", teachers[0], "--target-layer", "vgg=features.3", exit_code=1)
    assert "--target-layer names unknown teacher(s) vgg; teachers are: resnet18" in bad.output


def test_teacher_for_another_class_count_is_refused(imagenet, tmp_path):
    root, _ = imagenet
    wrong = make_torchvision_teacher(tmp_path / "r.pt", "resnet18", 1000)
    result = invoke("extract-teachers", "--dataset", "ilsvrc2012", "--data-root", root / "data",
                    "--store", tmp_path / "s.zarr", "--teachers", wrong, exit_code=1)
    assert "predicts 1000 classes but data set ilsvrc2012 has 5" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_cifar_end_to_end_with_a_small_teacher(tmp_path):
    make_cifar(tmp_path / "data", per_batch=8)
    invoke("train-teachers", "--dataset", "cifar10", "--data-root", tmp_path / "data", "--teachers", "resnet8",
           "--epochs", 1, "--out-dir", tmp_path / "teachers")
    imagenet_net = make_torchvision_teacher(tmp_path / "resnet18.pt", "resnet18", 10)  # its last maps are 1x1 at 32 px
    result = invoke("extract-teachers", "--dataset", "cifar10", "--data-root", tmp_path / "data", "--teachers",
                    f"{tmp_path / 'teachers' / 'resnet8.pt'},{imagenet_net}", "--store", tmp_path / "c.zarr",
                    "--block-size", 16)
    assert "teacher resnet8: Grad-CAM at features (closed-form), maps 8x8\n" in result.output
    assert "teacher resnet18: Grad-CAM at layer3 (autograd), maps 2x2\n" in result.output  # not a word before
    assert "warning: teacher resnet18's maps are only 2x2 (layer layer3); name a layer with larger maps with " \
           "--target-layer resnet18=<module.path>, or feed larger images" in result.output
    assert "warning: teacher resnet8" not in result.output
    info = invoke("store", "info", tmp_path / "c.zarr").output
    assert any(" layer3 " in line and " 2x2 " in line for line in info.splitlines() if line.startswith("resnet18 "))
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert group["images"].shape == (36, 32, 32, 3) and group["teachers/resnet8/cam"].shape == (36, 1, 8, 8)
    invoke("train-student", "--dataset", "cifar10", "--data-root", tmp_path / "data", "--store", tmp_path / "c.zarr",
           "--method", "explain-kd", "--epochs", 1, "--out-dir", tmp_path / "students")
    assert TeacherStore.open(tmp_path / "c.zarr").attrs["dataset"]["name"] == "cifar10"


@pytest.mark.slow  # seconds the default set cannot spare: CI runs it
def test_a_teacher_added_later_must_see_the_same_images(imagenet, tmp_path):
    root, teachers = imagenet
    added = teachers[2]  # densenet121: any teacher will do, and it loads in 0.8 s where vgg11's 480 MB take 2.8 s
    data = tmp_path / "data"
    make_imagenet(data, corrupt=True)
    args = ["extract-teachers", "--dataset", "ilsvrc2012", "--data-root", data, "--store", tmp_path / "s.zarr",
            "--block-size", 4, "--skip-corrupt"]
    invoke(*args, "--teachers", teachers[0])
    corrupt = data / "train" / IMAGENET_WNIDS[1] / "zz_corrupt.JPEG"
    Image.new("RGB", (300, 300)).save(corrupt, format="JPEG")  # the file was repaired in between
    result = invoke(*args, "--teachers", f"{teachers[0]},{added}", exit_code=1)
    assert "row 3 of" in result.output and "was unreadable when other teachers were extracted" in result.output
    assert zarr.open_group(tmp_path / "s.zarr", mode="r")["valid"][3] == False  # noqa: E712
    # a file resized in between: its views (boxes in its own pixels) are not the ones the first teacher saw
    again = [a if a != tmp_path / "s.zarr" else tmp_path / "t.zarr" for a in args]
    invoke(*again, "--teachers", teachers[0])
    first = sorted((data / "train" / IMAGENET_WNIDS[1]).iterdir())[0]
    Image.open(first).resize((150, 120)).save(first)
    result = invoke(*again, "--teachers", f"{teachers[0]},{added}", exit_code=1)
    assert "row 0 of" in result.output and "had another view 0 (view_boxes; has the image changed size?)" \
        in result.output


def test_a_teacher_trained_on_another_split_of_the_same_data_is_refused(tmp_path):
    make_cifar(tmp_path / "data", per_batch=8)
    data = ["--dataset", "cifar10", "--data-root", tmp_path / "data"]
    invoke("train-teachers", *data, "--teachers", "resnet8", "--epochs", 1, "--out-dir", tmp_path / "t")
    result = invoke("extract-teachers", *data, "--split-seed", 1, "--teachers", tmp_path / "t" / "resnet8.pt",
                    "--store", tmp_path / "s.zarr", exit_code=1)
    assert "was trained on cifar10 split with --split-seed 0, this run uses 1" in result.output
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow  # resnet18 extractions at 224 px the default set cannot spare: CI runs it
def test_bring_your_own_weights_as_a_state_dict_or_a_minimal_checkpoint(imagenet, tmp_path):
    root, _ = imagenet
    data = ["--dataset", "ilsvrc2012", "--data-root", root / "data", "--skip-corrupt", "--block-size", 4]
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=5)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pt"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)  # DataParallel
    for weights in (plain, wrapped):
        store = tmp_path / f"{weights.stem}.zarr"
        invoke("extract-teachers", *data, "--store", store, "--teachers", f"torchvision:resnet18:{weights}")
        attrs = zarr.open_group(store, mode="r")["teachers/resnet18"].attrs
        assert attrs["weights_sha256"] == weights_sha256(model)
        assert attrs["transform"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 256,
                                      "crop": 224, "interpolation": "bilinear"}  # the data set's eval transform
    minimal = tmp_path / "minimal.pt"  # the record README names, without a transform
    save_checkpoint(minimal, model, {"name": "mine", "arch": "torchvision:resnet18", "in_channels": 3,
                                     "num_classes": 5})
    invoke("extract-teachers", *data, "--store", tmp_path / "minimal.zarr", "--teachers", minimal)
    assert "mine" in zarr.open_group(tmp_path / "minimal.zarr", mode="r")["teachers"]

    wrong = invoke("extract-teachers", *data, "--store", tmp_path / "x.zarr", "--teachers",
                   f"torchvision:resnet34:{plain}", exit_code=1)
    assert "does not fit torchvision:resnet34:" in wrong.output and "missing layer1.2." in wrong.output
    assert wrong.output.count("\n") == 1
    no_arch = tmp_path / "no_arch.pt"
    torch.save({"name": "x", "state_dict": model.state_dict()}, no_arch)
    missing = invoke("extract-teachers", *data, "--store", tmp_path / "x.zarr", "--teachers", no_arch, exit_code=1)
    assert "lacks arch, in_channels, num_classes; a checkpoint record holds" in missing.output
    as_checkpoint = invoke("extract-teachers", *data, "--store", tmp_path / "x.zarr", "--teachers", plain, exit_code=1)
    assert "it looks like a plain state_dict: pass it as torchvision:<arch>:<path>" in as_checkpoint.output
    gone = invoke("extract-teachers", *data, "--store", tmp_path / "x.zarr", "--teachers",
                  "torchvision:resnet18:/nowhere/w.pth", exit_code=1)
    assert "weights file /nowhere/w.pth of teacher torchvision:resnet18:/nowhere/w.pth does not exist" in gone.output
    assert not (tmp_path / "x.zarr").exists()
