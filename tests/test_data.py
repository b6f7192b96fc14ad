"""Validation data: ImageFolder checks, eval transforms matching the spec, deterministic batches."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from dfq.common.errors import DataError
from dfq.pipeline.data import eval_transform, image_folder, iterate_images
from dfq.pipeline.models import get_spec

CIFAR = get_spec("resnet20")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _image(path, size=(32, 32), color=(200, 30, 90), mode="RGB"):
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def _folder(root, counts: dict[str, int], size=(32, 32)):
    root.mkdir(exist_ok=True)
    for i, (name, n) in enumerate(counts.items()):
        (root / name).mkdir()
        for j in range(n):
            _image(root / name / f"{j:03d}.png", size, color=(10 * i, 5 * j, 128))
    return root


def test_folder_with_empty_classes(tmp_path):
    counts = {name: (3 if i in (1, 7) else 0) for i, name in enumerate(CLASSES)}
    root = _folder(tmp_path / "val", counts)
    (root / "bird" / ".keep").write_text("")
    dataset = image_folder(root, CIFAR)
    assert len(dataset) == 6 and dataset.classes == CLASSES
    batches = list(iterate_images(dataset, 4))
    assert [len(y) for _, y in batches] == [4, 2]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [1, 1, 1, 7, 7, 7] and labels.dtype == torch.int64
    again = torch.cat([x for x, _ in iterate_images(dataset, 5)])
    torch.testing.assert_close(again, images, rtol=0, atol=0)


def test_limit(tmp_path):
    root = _folder(tmp_path / "val", {name: 2 for name in CLASSES})
    dataset = image_folder(root, CIFAR)
    batches = list(iterate_images(dataset, 3, limit=7))
    assert sum(len(y) for _, y in batches) == 7 and len(batches) == 3
    # evenly spaced over the class-sorted folder, not the first 7 images (the first 4 classes)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == sorted(labels) and len(set(labels)) == 7
    assert list(iterate_images(dataset, 3, limit=0)) == []
    assert sum(len(y) for _, y in iterate_images(dataset, 100, limit=1000)) == 20
    with pytest.raises(ValueError):
        list(iterate_images(dataset, 0))


def test_hidden_folders_are_not_classes(tmp_path):
    root = _folder(tmp_path / "val", {name: 1 for name in CLASSES})
    (root / ".ipynb_checkpoints").mkdir()
    assert len(image_folder(root, CIFAR).classes) == 10


def test_cifar_transform_normalises_exactly():
    image = Image.new("RGB", (32, 32), (255, 0, 128))
    x = eval_transform(CIFAR)(image)
    expected = torch.tensor([(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[:, 5, 7], expected)
    # grey-scale input becomes RGB; another size is resized to the input size
    assert eval_transform(CIFAR)(Image.new("L", (40, 48), 7)).shape == (3, 32, 32)


def test_imagenet_transform_resizes_shorter_side_then_crops():
    spec = get_spec("efficientnet_lite0")
    image = Image.new("RGB", (300, 227), (127, 127, 127))
    x = eval_transform(spec)(image)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x, torch.zeros_like(x), rtol=0, atol=1e-6)  # (127 - 127) / 128
    # the crop is the centre of the resized image: a bright right border must not reach it
    image.paste((255, 255, 255), (280, 0, 300, 227))
    assert torch.all(eval_transform(spec)(image).abs() < 1e-6)
    tall = eval_transform(get_spec("efficientnet_b1"))(Image.new("RGB", (240, 500)))
    assert tall.shape == (3, 240, 240)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "nope", CIFAR)


def test_root_is_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        image_folder(path, CIFAR)


def test_no_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    _image(root / "a.png")
    with pytest.raises(DataError, match="no class folders") as info:
        image_folder(root, CIFAR)
    assert "ImageFolder" in str(info.value)


def test_wrong_number_of_classes(tmp_path):
    root = _folder(tmp_path / "val", {name: 1 for name in CLASSES[:7]})
    with pytest.raises(DataError) as info:
        image_folder(root, CIFAR)
    message = str(info.value)
    assert "7 class folders" in message and "10 classes" in message and "--arch" in message
    with pytest.raises(DataError, match="1000 classes"):
        image_folder(root, get_spec("efficientnet_lite0"))


def test_no_images_at_all(tmp_path):
    root = _folder(tmp_path / "val", {name: 0 for name in CLASSES})
    (root / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        image_folder(root, CIFAR)


def test_damaged_image_names_the_file(tmp_path):
    root = _folder(tmp_path / "val", {name: 1 for name in CLASSES})
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    dataset = image_folder(root, CIFAR)
    with pytest.raises(DataError, match="broken.jpg"):
        list(iterate_images(dataset, 4))


def test_custom_class_count(tmp_path):
    spec = dataclasses.replace(CIFAR, num_classes=2)
    root = _folder(tmp_path / "val", {"a": 1, "b": 2})
    assert [y.tolist() for _, y in iterate_images(image_folder(root, spec), 8)] == [[0, 1, 1]]
