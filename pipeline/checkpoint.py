"""Fine-tuning checkpoints: written atomically and checksummed, resumed only by the same run.

The payload is ``torch.save`` of the fine-tuner's state (tensors and JSON strings only, so it loads
with ``weights_only=True``) followed by ``b"DFQSHA256"`` and the hex SHA-256 of the payload. A run
fingerprint (model file hash and every option that changes the schedule) must match on resume.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from dfq.common.errors import CheckpointError
from dfq.common.files import atomic_write_bytes

CHECKPOINT_FORMAT = "dfq-finetune-1"


def checkpoint_fingerprint(**identity) -> str:
    """What a checkpoint must have been made with to be resumed (model file hash, options)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(path: Path, state: dict, fingerprint: str) -> None:
    buf = io.BytesIO()
    torch.save({"fingerprint": fingerprint, **state}, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write_bytes(Path(path), payload + b"DFQSHA256" + digest)


def load_checkpoint(path: Path, fingerprint: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; every problem is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}. Run once without --resume (it writes "
                              "the checkpoint as it goes), or pass --checkpoint with the right path.")
    raw = path.read_bytes()
    payload, sep, digest = raw.rpartition(b"DFQSHA256")
    if not sep or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"the checkpoint {path} is corrupted or truncated (checksum mismatch). Delete it "
                              "and start again without --resume.")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"the checkpoint {path} cannot be read ({exc}). Delete it and start again.") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dfq fine-tuning checkpoint ({CHECKPOINT_FORMAT}).")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"the checkpoint {path} was made by a different run (model, method, bits, target, "
                              "seed or schedule differ). Resume with the same command, or delete it.")
    return state
