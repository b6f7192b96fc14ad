"""Issue 5: every bad input through the CLI — documented exit code, a message that names the
problem and the fix, no traceback, and no output file left behind."""
import os
import pickle

import pytest
import torch

from dfq.cli import main


class _Pwn:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture(scope="module")
def r20_weights():
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    return get_spec("resnet20").build().state_dict()


def _run(tmp_path, capsys, argv, out="out.onnx"):
    before = set(tmp_path.rglob("*"))
    code = main([*argv, "--out", str(tmp_path / out), "--method", "bns", "--no-progress"])
    err = capsys.readouterr().err
    created = set(tmp_path.rglob("*")) - before
    assert not created, f"files left behind: {created}"
    assert "Traceback" not in err
    return code, err


def _ckpt(tmp_path, obj, name="resnet20.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_missing_file(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, [str(tmp_path / "resnet20.pth")])
    assert code == 3 and "does not exist" in err and "Check the path" in err


def test_empty_file(tmp_path, capsys):
    (tmp_path / "resnet20.pth").write_bytes(b"")
    code, err = _run(tmp_path, capsys, [str(tmp_path / "resnet20.pth")])
    assert code == 3 and "empty" in err


def test_truncated_checkpoint(tmp_path, capsys, r20_weights):
    path = _ckpt(tmp_path, r20_weights)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    code, err = _run(tmp_path, capsys, [path])
    assert code == 3 and "truncated" in err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "resnet20.pth").write_text("hello, I am a text file\n")
    code, err = _run(tmp_path, capsys, [str(tmp_path / "resnet20.pth")])
    assert code == 3 and "checkpoint" in err


def test_code_executing_pickle_does_not_run(tmp_path, capsys, r20_weights):
    target = tmp_path / "pwned"
    path = tmp_path / "resnet20.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": dict(r20_weights), "x": _Pwn(str(target))}, f)
    code, err = _run(tmp_path, capsys, [str(path)])
    assert code == 3 and not target.exists()
    path2 = _ckpt(tmp_path, {"state_dict": dict(r20_weights), "x": _Pwn(str(target))}, "resnet20b.pth")
    code, err = _run(tmp_path, capsys, [path2, "--arch", "resnet20"])
    assert code == 3 and "refused for safety" in err and not target.exists()


def test_unknown_architecture(tmp_path, capsys, r20_weights):
    path = _ckpt(tmp_path, r20_weights)
    code, err = _run(tmp_path, capsys, [path, "--arch", "resnet9000"])
    assert code == 4 and "resnet20" in err          # lists the known names


def test_uninferable_architecture(tmp_path, capsys, r20_weights):
    path = _ckpt(tmp_path, r20_weights, "weights.pth")
    code, err = _run(tmp_path, capsys, [path])
    assert code == 4 and "--arch" in err


def test_state_dict_for_another_architecture(tmp_path, capsys, r20_weights):
    path = _ckpt(tmp_path, r20_weights, "resnet56.pth")
    code, err = _run(tmp_path, capsys, [path])
    assert code == 3 and "missing" in err.lower()


def test_non_finite_weights(tmp_path, capsys, r20_weights):
    bad = dict(r20_weights)
    bad["conv1.weight"] = bad["conv1.weight"].clone()
    bad["conv1.weight"][0, 0, 0, 0] = float("nan")
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, bad)])
    assert code == 5 and "NaN or Inf" in err and "conv1.weight" in err


def test_unsupported_bits(tmp_path, capsys, r20_weights):
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, r20_weights), "--bits", "3"])
    assert code == 2 and "--bits 3" in err


def test_created_output_directory_is_removed_when_the_run_fails(tmp_path, capsys):
    # dfq creates missing output directories; a run that fails before writing removes them again
    code, err = _run(tmp_path, capsys, [str(tmp_path / "nope.pth")], out="new/sub/out.onnx")
    assert code == 3 and "does not exist" in err


def test_output_parent_is_a_file(tmp_path, capsys, r20_weights):
    (tmp_path / "afile").write_text("x")
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, r20_weights)], out="afile/out.onnx")
    assert code == 6


def test_existing_output_without_force(tmp_path, capsys, r20_weights):
    (tmp_path / "out.onnx").write_bytes(b"precious")
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, r20_weights)])
    assert code == 6 and "--force" in err
    assert (tmp_path / "out.onnx").read_bytes() == b"precious"


def test_val_directory_empty(tmp_path, capsys, r20_weights):
    (tmp_path / "val").mkdir()
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, r20_weights), "--val", str(tmp_path / "val")])
    assert code == 7


def test_val_not_an_image_folder(tmp_path, capsys, r20_weights):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.txt").write_text("not images")
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, r20_weights), "--val", str(tmp_path / "val")])
    assert code == 7


def test_resume_without_checkpoint(tmp_path, capsys, r20_weights):
    code = main([_ckpt(tmp_path, r20_weights), "--out", str(tmp_path / "out.onnx"), "--resume",
                 "--method", "bns", "--no-progress"])
    assert code == 2 and "does not fine-tune" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))   # refused before anything is written


def test_checkpoint_without_batchnorm_statistics(tmp_path, capsys, r20_weights):
    # e.g. saved after BN folding: data-free synthesis has nothing to read
    folded = {k: v for k, v in r20_weights.items() if ".bn" not in k and not k.startswith("bn")}
    assert len(folded) < len(r20_weights)
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, folded)])
    assert code == 5 and "no BatchNorm statistics" in err and "real-data" in err


def test_corrupted_finetuning_checkpoint_is_reported(tmp_path, capsys, r20_weights):
    ckpt = tmp_path / "out.finetune.ckpt"
    ckpt.write_bytes(b"\x00" * 1000)
    before = set(tmp_path.rglob("*"))
    code = main([_ckpt(tmp_path, r20_weights), "--out", str(tmp_path / "out.onnx"), "--resume", "--method", "gdfq",
                 "--synth-images", "16", "--synth-steps", "1", "--steps", "2", "--batch", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3 and "corrupted or truncated" in err and "Traceback" not in err
    assert set(tmp_path.rglob("*")) - before == {tmp_path / "resnet20.pth"}
    assert ckpt.read_bytes() == b"\x00" * 1000  # not overwritten, not deleted


def test_too_few_synthetic_images(tmp_path, capsys, r20_weights):
    code, err = _run(tmp_path, capsys, [_ckpt(tmp_path, r20_weights), "--synth-images", "8"])
    assert code == 2 and "--synth-images 8 is too small" in err
