"""Load a trained checkpoint safely into a known architecture.

Checkpoints are only ever read with ``torch.load(path, map_location="cpu", weights_only=True)``:
a pickle that would run code (a pickled model object, ``os.system`` in ``__reduce__`` ...) is
refused, never executed. Every failure a user can cause becomes a :mod:`dfq.common.errors` exception
whose message says what is wrong and what to do.
"""
from __future__ import annotations

import hashlib
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfq.common.errors import ArchitectureError, CheckpointError, UnsupportedModelError

from .models import ModelSpec, get_spec, infer_arch, list_archs

# Keys under which training scripts commonly nest the state_dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
DATAPARALLEL_PREFIX = "module."
MAX_LISTED = 10

_RESAVE_HINT = ("re-save it in a trusted Python session as a plain state_dict, e.g. "
                "`torch.save(model.state_dict(), 'model.pth')`, and pass that file")
_RESAVE_SENTENCE = _RESAVE_HINT[0].upper() + _RESAVE_HINT[1:] + "."


@dataclass
class LoadedModel:
    """A model with its weights. ``model`` is in eval mode, float32, on the CPU; ``source``
    records where the weights came from: ``path``, ``sha256`` of the file, ``format``
    ("state_dict", "dict[state_dict]", "dict[model]", "dict[model_state_dict]") and
    ``prefix_stripped`` ("module." or "")."""

    model: nn.Module
    spec: ModelSpec
    source: dict


def _shorten(items: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist. Check the path (it is read relative "
                              f"to the current directory, {Path.cwd()}).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} is not a file (a directory?). Pass the path of the "
                              ".pth/.pt/.th file itself.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes), so the download or save did not "
                              "complete. Download or save it again.")


# The first pickle of a legacy (pre-1.6, non-zip) torch.save file is this long integer.
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_FRAME_OPCODE = 0x95  # first opcode of pickle protocol >= 4, which weights_only cannot read


def _truncated(path: Path) -> CheckpointError:
    return CheckpointError(f"Checkpoint {path} is truncated or corrupted (the file ends early or its bytes are "
                           "damaged). Download or save it again; compare its size or sha256 with the original.")


def _legacy_pickles_complete(path: Path) -> bool:
    """Whether the pickles at the start of a legacy torch.save file (magic, protocol, system info,
    object, storage keys) are complete. Only parses opcodes (pickletools); never unpickles."""
    with open(path, "rb") as f:
        try:
            for _ in range(5):
                for _op in pickletools.genops(f):
                    pass
        except ValueError:
            return False
    return True


def _pickle_protocol(path: Path, is_zip: bool) -> int | None:
    """Protocol of the (main) pickle in a torch.save file, read from its PROTO opcode."""
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as f:
                    head = f.read(2)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except (OSError, StopIteration, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _zip_has_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torch_load(path: Path):
    """``torch.load(path, map_location="cpu", weights_only=True)``; every failure becomes a
    CheckpointError saying what is wrong with the file."""
    with open(path, "rb") as f:
        head = f.read(32)
    is_zip = head[:4] == b"PK\x03\x04"
    is_legacy = head[:1] == b"\x80" and _LEGACY_MAGIC in head
    if is_zip and not zipfile.is_zipfile(path):
        raise _truncated(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing foreign pickles
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if is_legacy and not _legacy_pickles_complete(path):
            raise _truncated(path) from None
        found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        if found:
            name = found.group(1)
            what = ("a pickled model object" if name.startswith(("torch.nn.", "torchvision.")) or ".models." in name
                    else "a pickle")
            raise CheckpointError(
                f"Checkpoint {path} was refused for safety: it is {what} that needs '{name}' to load, and "
                "unpickling it could run arbitrary code. dfq only loads weights (torch.load with "
                f"weights_only=True). If you trust the file, {_RESAVE_HINT}.") from None
        protocol = _pickle_protocol(path, is_zip) if (is_zip or is_legacy) else None
        if protocol is not None and protocol >= 4:
            raise CheckpointError(
                f"Checkpoint {path} was written with pickle protocol {protocol}, which PyTorch's safe loader "
                "(weights_only=True) cannot read. Re-save it with the default protocol: "
                "`torch.save(state_dict, path)` without pickle_protocol.") from None
        if head[:1] == b"\x80" and not is_legacy:
            raise CheckpointError(
                f"{path} is a Python pickle but not a torch.save checkpoint; dfq does not unpickle arbitrary "
                f"pickles because they can run code. If you trust the file, {_RESAVE_HINT}.") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (its bytes are not a torch.save file). "
                              "Check that you passed the weights file (.pth/.pt/.th), not an ONNX model, "
                              "image or archive.") from None
    except Exception as exc:  # EOFError, RuntimeError, KeyError, struct.error ... from damaged or foreign bytes
        if is_zip and not _zip_has_pickle(path):
            raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl inside). "
                                  "Pass the weights file written by torch.save.") from None
        if is_zip or is_legacy or isinstance(exc, EOFError) or "corrupted" in str(exc):
            raise _truncated(path) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__} while reading it). "
                              "Check that you passed the weights file written by torch.save, not an ONNX "
                              "model, image or archive.") from None


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _extract_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, format) from what torch.load returned."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of parameter "
                              f"name -> tensor). {_RESAVE_SENTENCE}")
    for key in WRAPPER_KEYS:
        if key in obj and _is_state_dict(obj[key]):
            return dict(obj[key]), f"dict[{key}]"
    if _is_state_dict(obj):
        return dict(obj), "state_dict"
    keys = [repr(k) for k in obj]
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [repr(k) for k, v in obj.items() if isinstance(v, dict)]
        hint = f" It has nested dicts under {', '.join(nested)}." if nested else ""
        raise CheckpointError(
            f"{path} holds a dict without tensors and without a state_dict under "
            f"{' / '.join(repr(k) for k in WRAPPER_KEYS)} (keys: {_shorten(keys)}).{hint} "
            f"Pass the file with the trained weights, or {_RESAVE_HINT}.")
    odd = [repr(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    raise CheckpointError(
        f"{path} mixes tensors with other entries ({_shorten(odd)}) and has no state_dict under "
        f"{' / '.join(repr(k) for k in WRAPPER_KEYS)}, so it is not clear which entries are the weights. "
        f"{_RESAVE_SENTENCE}")


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    if state_dict and all(k.startswith(DATAPARALLEL_PREFIX) for k in state_dict):
        n = len(DATAPARALLEL_PREFIX)
        return {k[n:]: v for k, v in state_dict.items()}, DATAPARALLEL_PREFIX
    return state_dict, ""


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str, str]:
    _check_file(path)
    state_dict, fmt = _extract_state_dict(_torch_load(path), path)
    state_dict, prefix = _strip_prefix(state_dict)
    return state_dict, fmt, prefix


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state_dict stored in ``path``: a plain state_dict, or one nested under "state_dict",
    "model_state_dict" or "model"; a DataParallel "module." prefix carried by every key is removed.
    Always read with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Raises CheckpointError for a missing, empty, truncated, foreign or unsafe file and for a file
    that holds no state_dict."""
    return _read(Path(path))[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UnsupportedModelError(
            f"{path} has NaN or Inf values in {len(bad)} tensor(s): {_shorten(bad)}. Such weights cannot be "
            "quantized (the training diverged or the file was damaged); use a checkpoint from before the "
            "divergence or retrain.")


def _check_match(model: nn.Module, state_dict: dict[str, torch.Tensor], spec: ModelSpec, path: Path,
                 arch_given: bool) -> None:
    expected = model.state_dict()
    # torch fills in a missing BatchNorm num_batches_tracked itself; do not report it
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} in the file vs {tuple(v.shape)} in {spec.name}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    bn_keys = {f"{name}.{b}" for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in ("running_mean", "running_var")}
    if bn_keys and bn_keys <= set(missing):
        raise UnsupportedModelError(
            f"{path} holds no BatchNorm statistics for '{spec.name}' ({len(bn_keys) // 2} BatchNorm layers, none "
            f"in the file; e.g. {_shorten(sorted(bn_keys))}): the checkpoint was saved with BatchNorm already "
            "folded into the convolutions, or trained without it. Data-free synthesis reads exactly those "
            "running means and variances, so dfq cannot quantize this file without data (it has no real-data "
            "calibration mode). Export the checkpoint from the model before BatchNorm folding.")
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_shorten(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_shorten(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_shorten(mismatched)}")
    how = "given with --arch" if arch_given else "inferred from the file name"
    raise CheckpointError(
        f"The weights in {path} do not fit architecture '{spec.name}' ({how}): {'; '.join(parts)}. "
        f"Check --arch: pass the architecture the checkpoint was trained with (known: {', '.join(list_archs())}).")


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model contains at least one BatchNorm layer (whose running statistics
    data-free synthesis needs)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def load_model(path, arch: str | None = None) -> LoadedModel:
    """Build architecture ``arch`` (default: inferred from the file name) and fill it with the
    weights in ``path``, strictly: every parameter and buffer must be present with its shape.

    Returns the model in eval mode, float32, on the CPU. Raises CheckpointError (file problems,
    weights that do not fit), ArchitectureError (unknown or un-inferable architecture) and
    UnsupportedModelError (NaN/Inf weights)."""
    path = Path(path)
    _check_file(path)
    if arch is not None:
        spec = get_spec(arch)
    else:
        inferred = infer_arch(path)
        if inferred is None:
            raise ArchitectureError(
                f"Cannot tell the architecture from the file name '{path.name}'. Pass it with --arch NAME "
                f"(arch= in Python); known architectures: {', '.join(list_archs())}.")
        spec = get_spec(inferred)
    state_dict, fmt, prefix = _read(path)
    model = spec.build()
    _check_match(model, state_dict, spec, path, arch_given=arch is not None)
    _check_finite(state_dict, path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # pragma: no cover - _check_match catches the known causes first
        raise CheckpointError(f"The weights in {path} do not fit architecture '{spec.name}': "
                              f"{str(exc).splitlines()[0]}. Check --arch.") from None
    model = model.float().eval()
    source = {"path": str(path), "sha256": _sha256(path), "format": fmt, "prefix_stripped": prefix}
    return LoadedModel(model=model, spec=spec, source=source)
