"""Model registry and architectures: every entry builds, fx-traces with conv->BN adjacency, names
resolve; real checkpoints reach their reference accuracy (slow)."""
from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from dfq.common.errors import ArchitectureError
from dfq.pipeline.models import ModelSpec, get_spec, infer_arch, list_archs
from dfq.pipeline.models.efficientnet_lite import round_filters, same_padding, stage_repeats

# Forward passes are cheap for these; the torchvision models are only traced.
RUN_FORWARD = {"resnet20", "resnet32", "resnet44", "resnet56",
               "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite3",
               "efficientnet_lite4"}


@pytest.fixture
def one_thread():
    """Run forward passes on one intra-op thread: on a busy 2-core machine two OpenMP threads
    make these small forwards ~100x slower (every parallel region waits for a descheduled core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def slow_selected(request):
    """Skip unless slow tests were asked for with ``-m slow``: the plain ``pytest -q`` run is the
    fast suite even where ../shared exists."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("real-model accuracy run (minutes): select it with -m slow")


def _conv_bn_violations(gm: fx.GraphModule) -> list[str]:
    modules = dict(gm.named_modules())
    bad = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            src = node.args[0]
            ok = (isinstance(src, fx.Node) and src.op == "call_module"
                  and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1)
            if not ok:
                bad.append(node.target)
    return bad


@pytest.mark.parametrize("name", list_archs())
def test_every_entry_builds_and_traces(name, one_thread):
    spec = get_spec(name)
    model = spec.build()
    assert not model.training
    gm = fx.symbolic_trace(model)
    assert _conv_bn_violations(gm) == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    json.dumps(spec.to_dict())
    if name in RUN_FORWARD:
        torch.manual_seed(0)
        x = torch.randn(1, *spec.input_size)
        with torch.no_grad():
            expected, traced = model(x), gm(x)
        assert expected.shape == (1, spec.num_classes)
        torch.testing.assert_close(traced, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in list_archs() if get_spec(n).family != "torchvision"])
def test_own_models_follow_graph_rules(name):
    """Activations are out-of-place ReLU/ReLU6 modules, sums are operator.add, pads are modules
    or F.pad (option-A shortcut) and nothing functional sits between conv and BN."""
    model = get_spec(name).build()
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            assert not m.inplace
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert node.target in (operator.add, operator.getitem, torch.flatten,
                                   torch.nn.functional.pad), node.target
        if node.op == "call_module":
            assert type(modules[node.target]) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.ZeroPad2d,
                                                  nn.AdaptiveAvgPool2d, nn.Dropout, nn.Linear)


def test_torchvision_activations_are_not_inplace():
    model = get_spec("mobilenet_v2").build()
    assert all(not getattr(m, "inplace", False) for m in model.modules())


def test_cifar_resnet_layout():
    model = get_spec("resnet20").build()
    keys = list(model.state_dict())
    assert keys[0] == "conv1.weight" and keys[-1] == "linear.bias"
    assert "layer3.2.bn2.running_var" in keys and "layer3.3.conv1.weight" not in keys
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert len(get_spec("resnet56").build().layer1) == 9
    x = torch.randn(2, 16, 8, 8)
    shortcut = model.layer2[0].shortcut(x)
    assert shortcut.shape == (2, 32, 4, 4)
    torch.testing.assert_close(shortcut[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0


def test_efficientnet_lite0_layout():
    model = get_spec("efficientnet_lite0").build()
    sd = model.state_dict()
    assert len(sd) == 296
    assert "_blocks.0._expand_conv.weight" not in sd and "_blocks.1._expand_conv.weight" in sd
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 49 and all(m.eps == 1e-3 for m in bns)
    # stride-2 convs at even sizes get an asymmetric ZeroPad2d, right/bottom heavy, conv padding 0
    assert model._stem_pad.padding == (0, 1, 0, 1) and model._conv_stem.padding == (0, 0)
    assert model._blocks[3]._depthwise_pad.padding == (1, 2, 1, 2)
    assert model._blocks[4]._depthwise_pad is None and model._blocks[4]._depthwise_conv.padding == (2, 2)


def test_tf_same_padding_and_scaling_rules():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(65, 3, 2) == (1, 1)
    assert same_padding(14, 5, 1) == (2, 2)
    assert round_filters(16, 1.4) == 24 and round_filters(320, 1.4) == 448 and round_filters(40, 1.1) == 48
    assert stage_repeats(0, 1, 1.8) == 1 and stage_repeats(6, 1, 1.8) == 1 and stage_repeats(2, 2, 1.8) == 4
    # published parameter counts of EfficientNet-Lite0..4: 4.7M, 5.4M, 6.1M, 8.2M, 13.0M
    counts = [sum(p.numel() for p in get_spec(f"efficientnet_lite{v}").build().parameters()) / 1e6
              for v in range(5)]
    assert [round(c, 1) for c in counts] == [4.7, 5.4, 6.1, 8.2, 13.0]


def test_specs():
    lite = get_spec("efficientnet_lite2")
    assert lite.input_size == (3, 260, 260) and lite.resize == 292 and lite.interpolation == "bicubic"
    assert lite.mean == (127 / 255,) * 3 and lite.std == (128 / 255,) * 3
    cifar = get_spec("resnet56")
    assert cifar.resize is None and cifar.num_classes == 10 and cifar.input_size == (3, 32, 32)
    d = get_spec("resnet18").to_dict()
    assert "build" not in d and d["input_size"] == [3, 224, 224] and d["resize"] == 256
    assert isinstance(get_spec("resnet18"), ModelSpec)


def test_torchvision_specs_match_torchvision_v1_transforms():
    import torchvision

    for name in list_archs():
        spec = get_spec(name)
        if spec.family != "torchvision":
            continue
        t = torchvision.models.get_model_weights(name).IMAGENET1K_V1.transforms()
        assert (spec.input_size[1], spec.resize, spec.interpolation) == (
            t.crop_size[0], t.resize_size[0], t.interpolation.value), name
        assert spec.mean == tuple(t.mean) and spec.std == tuple(t.std)


@pytest.mark.parametrize("alias, name", [
    ("ResNet20", "resnet20"), ("efficientnet-lite0", "efficientnet_lite0"),
    ("MOBILENET-V3-SMALL", "mobilenet_v3_small"), ("mobilenetv2", "mobilenet_v2")])
def test_get_spec_aliases(alias, name):
    assert get_spec(alias).name == name


def test_unknown_arch_lists_names():
    with pytest.raises(ArchitectureError) as info:
        get_spec("vgg16")
    message = str(info.value)
    assert "vgg16" in message and "resnet20" in message and "efficientnet_lite0" in message
    assert "--arch" in message


@pytest.mark.parametrize("filename, arch", [
    ("resnet20-12fca82f.th", "resnet20"),
    ("efficientnet-lite0-57934424.pth", "efficientnet_lite0"),
    ("resnet18.pth", "resnet18"),
    ("my_resnet56_best.pth", "resnet56"),
    ("/some/dir/ResNet101_final.pt", "resnet101"),
    ("resnet152-b121ed2d.pth", "resnet152"),
    ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2"),
    ("mobilenet_v3_large-8738ca79.pth", "mobilenet_v3_large"),
    ("mobilenetv2.pth", "mobilenet_v2"),
    ("EfficientNet_B1_ft.pth", "efficientnet_b1"),
    ("regnet-y-400mf.pth", "regnet_y_400mf"),
    ("resnext50_32x4d.pth", "resnext50_32x4d"),
    ("resnet200.pth", None),
    ("preresnet20.pth", None),
    ("resnet10.pth", None),
    ("model.pth", None),
    ("vgg16_bn.pth", None),
])
def test_infer_arch(filename, arch):
    assert infer_arch(filename) == arch


# --- real checkpoints (../shared) -----------------------------------------------------------------

def _top1(loaded, root, limit=None) -> tuple[float, int]:
    from dfq.pipeline.data import image_folder, iterate_images

    dataset = image_folder(root, loaded.spec)
    correct = total = 0
    with torch.no_grad():
        for images, labels in iterate_images(dataset, 200, limit=limit):
            correct += int((loaded.model(images).argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total, total


@pytest.mark.slow
@pytest.mark.parametrize("filename, expected", [("resnet20-12fca82f.th", 81.03), ("resnet56-4bfd9763.th", 83.20)])
def test_cifar_resnet_reference_accuracy(slow_selected, one_thread, shared_dir, filename, expected):
    from dfq.pipeline.load import load_model

    loaded = load_model(shared_dir / "models" / "cifar10" / filename)
    top1, n = _top1(loaded, shared_dir / "data" / "cifar10-test")
    print(f"{filename}: top-1 {top1:.2f}% on {n} images")
    assert n == 10_000
    assert abs(top1 - expected) <= 0.05


@pytest.mark.slow
def test_efficientnet_lite0_reference_accuracy(slow_selected, one_thread, shared_dir):
    from dfq.pipeline.load import load_model

    loaded = load_model(shared_dir / "models" / "imagenet" / "efficientnet-lite0-57934424.pth")
    assert loaded.spec.name == "efficientnet_lite0" and loaded.source["format"] == "state_dict"
    top1, n = _top1(loaded, shared_dir / "data" / "imagenet-val1300")
    print(f"efficientnet_lite0: top-1 {top1:.2f}% on {n} images")
    assert n == 1300
    assert 80.0 <= top1 <= 86.0
