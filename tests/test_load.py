"""Checkpoint loading: accepted layouts, and every user error as a clear dfq error (never code
execution)."""
from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch
from torch import nn

from dfq.common.errors import ArchitectureError, CheckpointError, UnsupportedModelError
from dfq.pipeline.load import LoadedModel, has_batchnorm, load_checkpoint, load_model
from dfq.pipeline.models import get_spec


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """A resnet20 state_dict with non-trivial values (random init, random BN statistics)."""
    torch.manual_seed(0)
    model = get_spec("resnet20").build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(obj, path, legacy: bool = False):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _same_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# --- accepted layouts -------------------------------------------------------------------------------

def test_plain_state_dict(tmp_path, weights):
    path = _save(weights, tmp_path / "resnet20.pth")
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.spec.name == "resnet20" and not loaded.model.training
    assert _same_weights(loaded.model, weights)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.model.parameters())
    assert loaded.source == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                             "format": "state_dict", "prefix_stripped": ""}


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_nested_state_dict_with_dataparallel_prefix(tmp_path, weights, key):
    prefixed = {f"module.{k}": v for k, v in weights.items()}
    path = _save({key: prefixed, "epoch": 3, "best_prec1": 91.7}, tmp_path / "ckpt.th", legacy=key == "model")
    loaded = load_model(path, arch="ResNet-20")
    assert loaded.source["format"] == f"dict[{key}]" and loaded.source["prefix_stripped"] == "module."
    assert _same_weights(loaded.model, weights)
    sd = load_checkpoint(path)
    assert set(sd) == set(weights)


def test_partial_module_prefix_is_kept(tmp_path, weights):
    mixed = {(f"module.{k}" if i % 2 else k): v for i, (k, v) in enumerate(weights.items())}
    assert set(load_checkpoint(_save(mixed, tmp_path / "x.pth"))) == set(mixed)


def test_missing_num_batches_tracked_is_tolerated(tmp_path, weights):
    old = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    loaded = load_model(_save(old, tmp_path / "resnet20_old.pth"))
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items() if k in old)


def test_half_precision_weights_become_float32(tmp_path, weights):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in weights.items()}
    loaded = load_model(_save(half, tmp_path / "resnet20_fp16.pth"))
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_has_batchnorm():
    assert has_batchnorm(get_spec("resnet20").build())
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert has_batchnorm(nn.Sequential(nn.BatchNorm1d(4)))


# --- file problems ----------------------------------------------------------------------------------

def _raises(exc_type, path, *words, arch="resnet20"):
    with pytest.raises(exc_type) as info:
        load_model(path, arch=arch)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    _raises(CheckpointError, tmp_path / "nope.pth", "does not exist", "path")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nope.pth")


def test_directory(tmp_path):
    _raises(CheckpointError, tmp_path, "not a file")


def test_empty_file(tmp_path):
    path = tmp_path / "resnet20.pth"
    path.write_bytes(b"")
    _raises(CheckpointError, path, "empty", "again")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, weights, legacy):
    full = _save(weights, tmp_path / "full.pth", legacy=legacy).read_bytes()
    path = tmp_path / "resnet20.pth"
    path.write_bytes(full[: len(full) // 2])
    _raises(CheckpointError, path, "truncated", "again")


def test_random_bytes(tmp_path):
    path = tmp_path / "resnet20.pth"
    path.write_bytes(os.urandom(4096))
    _raises(CheckpointError, path, "not a PyTorch checkpoint")


def test_text_file(tmp_path):
    path = tmp_path / "resnet20.pth"
    path.write_text("hello, this is not a checkpoint\n" * 20)
    _raises(CheckpointError, path, "not a PyTorch checkpoint", "torch.save")


def test_foreign_zip(tmp_path):
    import zipfile

    path = tmp_path / "resnet20.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    _raises(CheckpointError, path, "PyTorch checkpoint")


class _CreatesFile:
    """Unpickling this object would create ``target`` (stands in for any code execution)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


class _RunsShell:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [_CreatesFile, _RunsShell])
@pytest.mark.parametrize("legacy", [False, True])
def test_code_executing_pickle_is_refused(tmp_path, weights, payload, legacy):
    target = tmp_path / "pwned"
    path = _save({"state_dict": weights, "hook": payload(str(target))}, tmp_path / "resnet20.pth", legacy=legacy)
    message = _raises(CheckpointError, path, "refused for safety", "state_dict", "torch.save")
    assert not target.exists()
    assert "weights_only" in message
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not target.exists()


def test_raw_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "resnet20.pth"
    with open(path, "wb") as f:
        pickle.dump(_CreatesFile(str(target)), f, protocol=pickle.HIGHEST_PROTOCOL)
    _raises(CheckpointError, path, "pickle", "state_dict")
    assert not target.exists()


def test_pickled_module_is_refused_with_resave_hint(tmp_path):
    path = _save(get_spec("resnet20").build(), tmp_path / "resnet20.pth")
    _raises(CheckpointError, path, "refused for safety", "model.state_dict()")


# --- content problems -------------------------------------------------------------------------------

def test_dict_without_tensors(tmp_path):
    path = _save({"epoch": 10, "best_prec1": 91.7, "arch": "resnet20"}, tmp_path / "resnet20.pth")
    _raises(CheckpointError, path, "without tensors", "'epoch'", "state_dict")


def test_nested_dict_without_state_dict(tmp_path, weights):
    path = _save({"weights": weights, "epoch": 1}, tmp_path / "resnet20.pth")
    _raises(CheckpointError, path, "without a state_dict", "'weights'")


def test_not_a_dict(tmp_path):
    path = _save([torch.ones(3)], tmp_path / "resnet20.pth")
    _raises(CheckpointError, path, "holds a list", "state_dict")


def test_mixed_dict(tmp_path, weights):
    path = _save({**weights, "epoch": 3}, tmp_path / "resnet20.pth")
    _raises(CheckpointError, path, "'epoch'", "state_dict")


def test_wrong_architecture_lists_missing_keys(tmp_path, weights):
    path = _save(weights, tmp_path / "resnet20.pth")
    message = _raises(CheckpointError, path, "resnet32", "missing key", "--arch", arch="resnet32")
    assert "layer1.3.conv1.weight" in message and "more" in message  # at most 10 listed, then a count


def test_unexpected_keys_and_shape_mismatch(tmp_path, weights):
    bad = dict(weights)
    bad["linear.weight"] = torch.zeros(100, 64)
    bad["extra.weight"] = torch.zeros(3)
    path = _save(bad, tmp_path / "resnet20.pth")
    message = _raises(CheckpointError, path, "1 unexpected key", "extra.weight", "1 shape mismatch",
                      "linear.weight", "(100, 64)", "(10, 64)", "--arch")
    assert "inferred from the file name" in load_model_error(path)
    assert "given with --arch" in message


def load_model_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    return str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, weights, value):
    bad = dict(weights)
    bad["layer2.1.bn1.running_var"] = bad["layer2.1.bn1.running_var"].clone()
    bad["layer2.1.bn1.running_var"][3] = value
    bad["conv1.weight"] = bad["conv1.weight"].clone()
    bad["conv1.weight"][0, 0, 0, 0] = value
    path = _save(bad, tmp_path / "resnet20.pth")
    _raises(UnsupportedModelError, path, "NaN or Inf", "2 tensor", "layer2.1.bn1.running_var", "conv1.weight")


# --- architecture -----------------------------------------------------------------------------------

def test_uninferable_architecture(tmp_path, weights):
    path = _save(weights, tmp_path / "checkpoint.pth")
    with pytest.raises(ArchitectureError) as info:
        load_model(path)
    message = str(info.value)
    assert "checkpoint.pth" in message and "--arch" in message and "resnet20" in message


def test_unknown_explicit_architecture(tmp_path, weights):
    path = _save(weights, tmp_path / "resnet20.pth")
    with pytest.raises(ArchitectureError) as info:
        load_model(path, arch="resnet21")
    assert "resnet21" in str(info.value) and "efficientnet_lite0" in str(info.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_protocol_the_safe_loader_cannot_read(tmp_path, weights, legacy):
    path = tmp_path / "resnet20.pth"
    torch.save(weights, path, pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    _raises(CheckpointError, path, "protocol 4", "re-save")


@pytest.mark.parametrize("legacy", [False, True])
def test_every_truncation_is_reported_as_truncated(tmp_path, legacy):
    """Cutting a checkpoint anywhere past its first bytes gives the 'truncated' message (never a
    raw exception, never 'refused for safety' for a half-read global name)."""
    full = _save({"w": torch.ones(20), "b": torch.zeros(3)}, tmp_path / "full.pth", legacy=legacy).read_bytes()
    path = tmp_path / "cut.pth"
    for cut in range(32, len(full), 3):
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_checkpoint(path)
