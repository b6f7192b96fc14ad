"""The README's first two commands, as written: the main job runs from a fresh clone (here on a
stand-in ../shared with a random-weight ResNet-20 and a few images, with a tiny budget appended),
and the test command is the one CI runs."""
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY_BUDGET = ["--steps", "2", "--batch", "4", "--synth-images", "16", "--synth-steps", "1", "--threads", "1"]


def readme_commands() -> list[str]:
    """The command lines of the README's first ```bash block (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _fake_shared(root: Path) -> None:
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    (root / "models/cifar10").mkdir(parents=True)
    torch.save({"state_dict": get_spec("resnet20").build().state_dict()}, root / "models/cifar10/resnet20-12fca82f.th")
    rng = np.random.default_rng(0)
    for k in range(10):
        folder = root / "data/cifar10-test" / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_readme_starts_with_the_main_job_and_the_test_command():
    main_job, tests = readme_commands()[:2]
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[openvino]' && .venv/bin/dfq-export ")
    assert tests == "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q"
    ci = (REPO / ".ci/run").read_text()
    assert "install --quiet -e '.[test]'" in ci and '-m pytest -q' in ci


def test_readme_main_job_runs_verbatim_from_a_fresh_clone(tmp_path):
    _fake_shared(tmp_path / "shared")
    clone = tmp_path / "clone"
    clone.mkdir()
    export = readme_commands()[0].split("&& .venv/bin/dfq-export ", 1)[1]
    cmd = [sys.executable, "-m", "dfq.cli", *shlex.split(export), *TINY_BUDGET]
    proc = subprocess.run(cmd, cwd=clone, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [a for a in shlex.split(export) if a.endswith(".onnx")][0]
    assert (clone / out).stat().st_size > 0          # its directory did not exist before the run
    assert "top-1: FP" in proc.stdout
