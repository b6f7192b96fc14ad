"""Shared pytest fixtures. Real models and images are read in place from ../shared (or
$DFQ_SHARED); tests that need them skip with a reason when that folder is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("DFQ_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if not (root / "models").is_dir():
        pytest.skip(f"real models not found at {root} (set DFQ_SHARED to the shared/ folder)")
    return root
