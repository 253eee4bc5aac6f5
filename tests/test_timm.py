"""timm teachers for real: timm models with random weights (no download) through extraction, fed with
timm's own resolved eval transform, their Grad-CAM layer found; vision transformers refused in one line."""

import pytest
import timm
import timm.data
import torch
from PIL import Image

from conftest import invoke, make_imagenet
from pipeline.data import get_dataset, normalize
from pipeline.errors import PipelineError
from pipeline.store.teacher_store import TeacherStore
from pipeline.teachers import load_teacher


def timm_weights(path, name, num_classes=3):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    torch.save(model.state_dict(), path)
    return model.eval()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("timm") / "imagenet", meta=False)  # 3 classes


@pytest.mark.parametrize("name,layer", [("resnet18", "layer4"), ("efficientnet_b0", "bn2")])
def test_a_timm_teacher_sees_images_through_timms_eval_transform(imagenet, tmp_path, name, layer):
    model = timm_weights(tmp_path / "weights.pth", name)
    data = get_dataset("ilsvrc2012", "val", str(imagenet))
    teacher = load_teacher(f"timm:{name}:{tmp_path / 'weights.pth'}", data.info)
    assert teacher.layer.target_layer == layer and teacher.layer.linear_head  # GAP + Linear heads: closed form
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))  # timm's own pipeline
    with Image.open(data.root / next(iter(data.ids))) as image:
        expected = reference(image.convert("RGB"))
    ours = normalize(torch.from_numpy(data.image(0, teacher.geometry))[None], teacher.transform.mean,
                     teacher.transform.std)[0]
    assert ours.shape == expected.shape
    # the same resize, crop and normalisation (one grey level is 0.017 here); PIL's and torch's bicubic
    # kernels differ at a few pixels: mean 9e-5 measured for both models
    assert (ours - expected).abs().mean() < 1e-3


def test_a_timm_teachers_store_verifies(imagenet, tmp_path):
    timm_weights(tmp_path / "r18.pth", "resnet18")
    store = tmp_path / "timm.zarr"
    invoke("extract-teachers", "--dataset", "ilsvrc2012", "--data-root", imagenet, "--split", "val",
           "--teachers", f"timm:resnet18:{tmp_path / 'r18.pth'}", "--store", store)
    assert invoke("store", "verify", store).output.startswith(f"OK {store}: complete")
    config = timm.data.resolve_data_config({}, model=timm.create_model("resnet18", pretrained=False))
    recorded = TeacherStore.open(store).teacher_attrs("resnet18")["transform"]
    assert (recorded["crop"], recorded["interpolation"], recorded["mean"]) == (
        config["input_size"][-1], config["interpolation"], list(config["mean"]))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                  "levit_128s"])
def test_a_vision_transformer_is_refused_with_the_way_out(imagenet, tmp_path, name):
    timm_weights(tmp_path / "vit.pth", name)
    info = get_dataset("ilsvrc2012", "val", str(imagenet)).info
    with pytest.raises(PipelineError, match="into a sequence of tokens .a vision transformer, or an attention-pooling "
                                            "head.: its Grad-CAM would explain that layer.*choose a CNN teacher"):
        load_teacher(f"timm:{name}:{tmp_path / 'vit.pth'}", info)
