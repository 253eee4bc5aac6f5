"""Grad-CAM: closed form == autograd on GAP heads; autograd == the `grad-cam` package."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, explain, explanation_confidences, grad_cam, upsample_minmax, probe_input
from pipeline.scoring import confidence_drop
from pipeline.models import create_model

PROBE = probe_input((32, 32, 1))


def random_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, in_channels=1, num_classes=10)
    for module in model.modules():  # non-trivial BN statistics, so eval mode differs from identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet8_slim", "resnet20", "wrn16_2"])
@pytest.mark.parametrize("target_mode", ["label", "predicted"])
def test_closed_form_equals_autograd_on_gap_heads(name, target_mode):
    model = random_model(name)
    layer = CamLayer.of(model, PROBE)
    assert layer.path == "closed-form"
    x = torch.randn(6, 1, 32, 32)
    target = torch.tensor([0, 1, 2, 3, 4, 9]) if target_mode == "label" else None
    logits_cf, cam_cf, _ = grad_cam(model, x, target, layer)
    logits_ag, cam_ag, _ = grad_cam(model, x, target, CamLayer(layer.target_layer, None))
    torch.testing.assert_close(logits_cf, logits_ag)
    assert cam_cf.shape == (6, 8, 8)
    assert cam_cf.max() > 0
    torch.testing.assert_close(cam_cf, cam_ag, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["vgg8_bn", "resnet8_slim"])
def test_autograd_path_matches_grad_cam_package(name):
    model = random_model(name, seed=1)
    layer = CamLayer(CamLayer.of(model, PROBE).target_layer, None)  # force the autograd path
    x = torch.randn(5, 1, 32, 32)
    target = torch.tensor([3, 1, 4, 1, 5])
    _, ours, _ = grad_cam(model, x, target, layer)
    ours = upsample_minmax(ours, (32, 32)).numpy()
    reference = GradCAM(model=model, target_layers=[model.features])(
        input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in target]
    )
    assert reference.shape == ours.shape
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_vgg_takes_autograd_path_and_has_coarser_maps():
    model = random_model("vgg8_bn")
    layer = CamLayer.of(model, PROBE)
    assert layer.path == "autograd"
    _, cam, _ = grad_cam(model, torch.randn(2, 1, 32, 32), torch.tensor([0, 1]), layer)
    assert cam.shape == (2, 4, 4)


def test_differentiable_student_map_carries_gradient_to_weights():
    model = random_model("resnet8_slim").train()
    _, cam, _ = grad_cam(model, torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]), CamLayer.of(model, PROBE),
                      create_graph=True)
    cam.sum().backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert model.features[0].weight.grad.abs().sum() > 0


def test_maps_without_graph_when_not_requested():
    model = random_model("vgg8_bn")
    logits, cam, _ = grad_cam(model, torch.randn(2, 1, 32, 32), None, CamLayer.of(model, PROBE))
    assert not cam.requires_grad and not logits.requires_grad


def test_unknown_target_layer_lists_modules():
    model = random_model("resnet8_slim")
    with pytest.raises(PipelineError, match="has no module 'layer9'; modules are: features"):
        CamLayer.of(model, PROBE, "layer9")


def test_upsample_minmax_scales_to_unit_range_and_keeps_empty_maps_zero():
    cam = torch.zeros(2, 2, 2)
    cam[0] = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    up = upsample_minmax(cam, (4, 4))
    assert up[0].min() == 0 and up[0].max() == 1
    assert torch.equal(up[1], torch.zeros(4, 4))


def test_confidence_drop_hand_values():
    y = torch.tensor([0.8, 0.5, 0.4])
    o = torch.tensor([0.2, 0.6, 0.4])
    torch.testing.assert_close(confidence_drop(y, o), torch.tensor([0.75, 0.0, 0.0]))


def test_explanation_image_is_the_masked_image_not_the_masked_input():
    """O is the probability on normalise(up(L) * I): check against a hand-built explanation image."""
    model = random_model("resnet8_slim")
    mean, std = (0.3,), (0.32,)
    image = torch.rand(3, 1, 32, 32)
    x = (image - 0.3) / 0.32
    labels = torch.tensor([1, 2, 3])
    result = explain(model, CamLayer.of(model, PROBE), x, labels, "label", mean, std)
    mask = upsample_minmax(result.cam, (32, 32))[:, None]
    with torch.no_grad():
        expected_o = torch.softmax(model((mask * image - 0.3) / 0.32), 1)[torch.arange(3), labels]
        expected_y = torch.softmax(model(x), 1)[torch.arange(3), labels]
    torch.testing.assert_close(result.o_prob, expected_o)
    torch.testing.assert_close(result.y_prob, expected_y)
    _, masked_input_o = explanation_confidences(model, x, result.logits, result.cam, labels, (0.0,), (1.0,))
    assert not torch.allclose(masked_input_o, expected_o)  # masking the normalised tensor is different


class RectifiedDenseNet(torch.nn.Module):
    """torchvision's DenseNet with its functional in-place ReLU before pooling as a module of its own,
    so that the grad-cam package can take the map of the rectified features the classifier pools."""

    def __init__(self, densenet):
        super().__init__()
        self.features, self.relu, self.classifier = densenet.features, torch.nn.ReLU(), densenet.classifier

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(self.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(pooled, 1))


def test_densenet_maps_are_those_of_the_rectified_features_as_the_package_gives_them():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    x, target = torch.randn(8, 3, 64, 64), torch.arange(8)
    layer = CamLayer.of(model, probe_input((64, 64, 3)))
    assert (layer.target_layer, layer.path) == ("features", "closed-form")  # GAP + Linear on the rectified map
    wrapped = RectifiedDenseNet(model).eval()
    torch.testing.assert_close(wrapped(x), model(x), rtol=1e-5, atol=1e-5)
    reference = GradCAM(model=wrapped, target_layers=[wrapped.relu])(
        input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in target])
    for path in (layer, CamLayer(layer.target_layer, None)):  # closed form, and autograd
        _, ours, _ = grad_cam(model, x, target, path)
        np.testing.assert_allclose(upsample_minmax(ours, (64, 64)).numpy(), reference, atol=1e-4)


def test_a_layer_changed_in_place_by_a_residual_addition_is_refused():
    import torchvision

    model = torchvision.models.resnet18(num_classes=5).eval()
    with pytest.raises(PipelineError, match="output of ResNet.layer4.1.bn2 is changed in place later"):
        CamLayer.of(model, probe_input((64, 64, 3)), "layer4.1.bn2")  # `out += identity` follows it
    assert CamLayer.of(model, probe_input((64, 64, 3)), "layer4.1").target_layer == "layer4.1"


class ChannelsLastMlp(torch.nn.Module):
    """A convolution, then a per-position Linear on the channels-last map (as timm's ConvNeXt blocks)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.mlp = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.mlp(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_the_layer_search_takes_maps_laid_out_as_the_image_only():
    import torchvision

    assert CamLayer.of(ChannelsLastMlp().eval(), probe_input((32, 32, 3))).target_layer == "conv"  # not (B, H, W, C)
    # a non-square input: layer4's 3 x 2 map of a 96 x 40 image keeps the image's proportions within a cell
    model = torchvision.models.resnet18(num_classes=5).eval()
    assert CamLayer.of(model, probe_input((96, 40, 3))).target_layer == "layer4"
