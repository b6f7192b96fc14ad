"""Labelled real images for evaluation (``--val``): an ImageFolder prepared the way the model's
spec says, and a deterministic batch iterator over it.

Nothing here is used for quantization itself (that is data-free); real images only measure
accuracy of the FP and the exported model on the same inputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torchvision
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dfq.common.errors import DataError

from .models import ModelSpec

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class EvalTransform:
    """PIL image -> float32 tensor (C, H, W) normalised as ``spec`` says.

    With ``spec.resize`` set: resize the shorter side to ``resize`` pixels (PIL, antialiased,
    ``spec.interpolation``), then centre-crop to ``input_size``. With ``resize=None`` (CIFAR) an
    image already of the input size is used as it is; any other size is resized straight to the
    input size. Then RGB values are scaled to [0, 1] and normalised with ``(x - mean) / std``."""

    def __init__(self, spec: ModelSpec) -> None:
        self.size = (spec.input_size[1], spec.input_size[2])  # (H, W)
        self.resize = spec.resize
        self.interpolation = _INTERPOLATION[spec.interpolation]
        self.mean = list(spec.mean)
        self.std = list(spec.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.resize is not None:
            image = TF.resize(image, self.resize, interpolation=self.interpolation)
            image = TF.center_crop(image, list(self.size))
        elif (image.height, image.width) != self.size:
            image = TF.resize(image, list(self.size), interpolation=self.interpolation)
        tensor = TF.pil_to_tensor(image).to(torch.float32).div_(255.0)
        return TF.normalize(tensor, self.mean, self.std, inplace=True)

    def __repr__(self) -> str:
        return (f"EvalTransform(resize={self.resize}, crop={self.size}, interpolation={self.interpolation.value}, "
                f"mean={self.mean}, std={self.std})")


def eval_transform(spec: ModelSpec) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform of ``spec`` (see :class:`EvalTransform`); picklable."""
    return EvalTransform(spec)


class _ValImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder that ignores hidden folders (``.ipynb_checkpoints``, ``.git``) as classes."""

    def find_classes(self, directory):
        classes = sorted(e.name for e in Path(directory).iterdir() if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


def image_folder(root, spec: ModelSpec) -> torchvision.datasets.ImageFolder:
    """The labelled images under ``root`` (one sub-folder per class; labels are the sorted folder
    names' indices, empty class folders allowed), transformed with :func:`eval_transform`.

    Raises DataError when root is missing or not a directory, has no class folders, has a number
    of class folders other than ``spec.num_classes``, or holds no images at all."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"Validation folder {root} does not exist. Pass an existing ImageFolder directory "
                        "(one sub-folder of images per class) with --val.")
    if not root.is_dir():
        raise DataError(f"Validation path {root} is a file, not a directory. Pass an ImageFolder directory "
                        "(one sub-folder of images per class) with --val.")
    class_dirs = [e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"Validation folder {root} has no class folders. Lay it out as ImageFolder: "
                        "root/<class name>/<image>, one sub-folder per class, folder names sorting into "
                        "label order.")
    if len(class_dirs) != spec.num_classes:
        raise DataError(f"Validation folder {root} has {len(class_dirs)} class folders but {spec.name} has "
                        f"{spec.num_classes} classes. Use a folder with exactly {spec.num_classes} class "
                        "folders (empty ones allowed) that sort into the model's label order, or check --arch.")
    dataset = _ValImageFolder(str(root), transform=eval_transform(spec), allow_empty=True)
    if len(dataset) == 0:
        raise DataError(f"Validation folder {root} has {len(class_dirs)} class folders but no images in them "
                        f"(recognised extensions: {', '.join(IMG_EXTENSIONS)}). Put the images inside the "
                        "class folders.")
    return dataset


def iterate_images(dataset, batch_size: int, limit: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(images float32 (B, C, H, W), labels int64 (B,))`` of ``dataset``, in index order;
    the last batch may be smaller. With ``limit``, ``limit`` items evenly spaced over the whole
    dataset (an ImageFolder is sorted by class: its first items would all be of the first classes).
    Loads in this process (no workers). An unreadable image raises DataError naming the file."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    n = len(dataset)
    total = n if limit is None else min(limit, n)
    order = [i * n // total for i in range(total)]
    samples = getattr(dataset, "samples", None)
    for start in range(0, total, batch_size):
        images, labels = [], []
        for index in order[start:start + batch_size]:
            try:
                image, label = dataset[index]
            except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for damaged files
                where = samples[index][0] if samples is not None else f"item {index}"
                raise DataError(f"Cannot read validation image {where} ({type(exc).__name__}: {exc}). "
                                "Remove or replace the damaged file.") from None
            images.append(image)
            labels.append(int(label))
        yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)
