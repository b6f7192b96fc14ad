"""Known architectures: name -> how to build it and how its inputs are prepared.

Every entry is a :class:`ModelSpec`. The spec owns everything a later stage needs to know about
the model's input (size, normalisation, evaluation resize/crop), so synthesis, calibration,
export and evaluation never guess. Names are canonical lower-case torchvision-style names;
lookups accept any case and ``-`` for ``_``.

Input transforms of the torchvision entries are the eval transforms torchvision documents for
each model's ``IMAGENET1K_V1`` weights (the original release): resize the shorter side to 256
(bilinear; bicubic for the EfficientNets) and centre-crop 224 (240 for ``efficientnet_b1``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torchvision
from torch import nn

from dfq.common.errors import ArchitectureError

from .cifar_resnet import CIFAR_RESNET_DEPTHS, cifar_resnet
from .efficientnet_lite import LITE_PARAMS, efficientnet_lite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128 with pixels in 0..255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class ModelSpec:
    """One known architecture.

    ``build()`` returns a freshly initialised (random weights) model in eval mode whose
    ``state_dict`` keys are the ones the matching checkpoints use. The input fields describe
    what the model is evaluated on: an RGB image with values in [0, 1], resized so its shorter
    side is ``resize`` pixels (``None``: used as it is), centre-cropped to ``input_size[1:]``,
    then normalised per channel with ``(x - mean) / std``.
    """

    name: str
    family: str
    build: Callable[[], nn.Module] = field(repr=False, compare=False)
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None
    interpolation: str
    num_classes: int

    def to_dict(self) -> dict:
        """The spec as JSON-able values (everything except ``build``)."""
        return {
            "name": self.name,
            "family": self.family,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "num_classes": self.num_classes,
        }


# torchvision name -> (crop size, resize, interpolation): IMAGENET1K_V1 eval transforms.
TORCHVISION_MODELS: dict[str, tuple[int, int, str]] = {
    "resnet18": (224, 256, "bilinear"),
    "resnet34": (224, 256, "bilinear"),
    "resnet50": (224, 256, "bilinear"),
    "resnet101": (224, 256, "bilinear"),
    "resnet152": (224, 256, "bilinear"),
    "resnext50_32x4d": (224, 256, "bilinear"),
    "wide_resnet50_2": (224, 256, "bilinear"),
    "mobilenet_v2": (224, 256, "bilinear"),
    "mobilenet_v3_small": (224, 256, "bilinear"),
    "mobilenet_v3_large": (224, 256, "bilinear"),
    "efficientnet_b0": (224, 256, "bicubic"),
    "efficientnet_b1": (240, 256, "bicubic"),
    "regnet_x_400mf": (224, 256, "bilinear"),
    "regnet_y_400mf": (224, 256, "bilinear"),
}


def _build_torchvision(name: str) -> nn.Module:
    """A torchvision classifier with random weights, eval mode, activations made out-of-place
    (``inplace=False``) so graph rewrites never see a tensor modified under them."""
    model = torchvision.models.get_model(name, weights=None)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model.eval()


def _make_registry() -> dict[str, ModelSpec]:
    specs: list[ModelSpec] = []
    for depth in CIFAR_RESNET_DEPTHS:
        specs.append(ModelSpec(
            name=f"resnet{depth}", family="cifar_resnet",
            build=lambda depth=depth: cifar_resnet(depth).eval(),
            input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD,
            resize=None, interpolation="bilinear", num_classes=10))
    for variant, params in LITE_PARAMS.items():
        size = params.resolution
        specs.append(ModelSpec(
            name=f"efficientnet_lite{variant}", family="efficientnet_lite",
            build=lambda variant=variant: efficientnet_lite(variant).eval(),
            input_size=(3, size, size), mean=LITE_MEAN, std=LITE_STD,
            resize=size + 32, interpolation="bicubic", num_classes=1000))
    for name, (crop, resize, interpolation) in TORCHVISION_MODELS.items():
        specs.append(ModelSpec(
            name=name, family="torchvision",
            build=lambda name=name: _build_torchvision(name),
            input_size=(3, crop, crop), mean=IMAGENET_MEAN, std=IMAGENET_STD,
            resize=resize, interpolation=interpolation, num_classes=1000))
    return {spec.name: spec for spec in specs}


_REGISTRY = _make_registry()


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def list_archs() -> list[str]:
    """Canonical names of all known architectures, grouped by family."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec of architecture ``name`` (any case, ``-`` or ``_``).

    Raises ArchitectureError, listing the known names, when the name is unknown."""
    key = _normalise(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    squashed = key.replace("_", "")
    for spec in _REGISTRY.values():
        if spec.name.replace("_", "") == squashed:
            return spec
    raise ArchitectureError(
        f"Unknown architecture '{name}'. Known architectures: {', '.join(list_archs())}. "
        "Pass one of these names with --arch (or get_spec(name)); any case, '-' or '_' are accepted.")


def _find_names(text: str, names: dict[str, str]) -> list[str]:
    """Known names occurring in ``text`` as a token: not preceded by a letter, not followed by
    a digit (so 'resnet20' is not found in 'resnet200' or 'preresnet20'). ``names`` maps the
    searched form to the canonical name."""
    found = []
    for form, canonical in names.items():
        if re.search(rf"(?<![a-z]){re.escape(form)}(?![0-9])", text):
            found.append((len(form), canonical))
    return [canonical for _, canonical in sorted(found, reverse=True)]


def infer_arch(path) -> str | None:
    """The architecture named in a checkpoint's file name, or None when no known name occurs.

    The file name is lower-cased with '-' read as '_'; among known names occurring as a token
    (see ``_find_names``) the longest wins ('wide_resnet50_2' over 'resnet50'). When nothing
    matches, names are compared again with all '_' removed ('mobilenetv2.pth' -> mobilenet_v2).
    Examples: 'resnet20-12fca82f.th' -> 'resnet20', 'efficientnet-lite0-57934424.pth' ->
    'efficientnet_lite0', 'my_resnet56_best.pth' -> 'resnet56'.
    """
    text = _normalise(Path(str(path)).name)
    hits = _find_names(text, {name: name for name in _REGISTRY})
    if not hits:
        hits = _find_names(text.replace("_", ""), {name.replace("_", ""): name for name in _REGISTRY})
    return hits[0] if hits else None


# Schedules (synthesis, fine-tuning, bias correction) are sized for two classes of input: CIFAR-like
# images cost ~50x less per image and step than ImageNet-sized ones on the same CPU.
SMALL_INPUT_PIXELS = 64 * 64


def is_small_input(input_size) -> bool:
    """True for inputs of at most 64x64 pixels (``input_size`` is (C, H, W))."""
    return int(input_size[-2]) * int(input_size[-1]) <= SMALL_INPUT_PIXELS
