"""The frontier chart's labels: nearby points at one average weight bits share a label."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from frontier import joined_label, keyed_groups, label_groups  # noqa: E402


def _pt(w, top1, options=None, seed=0):
    return {"bits": "W4A8", "method": "recon", "options": options, "avg_weight_bits": w, "top1_int": top1,
            "seed": seed}


def test_nearby_points_share_one_label_and_far_ones_do_not():
    pts = [_pt(5.1, 0.7954, "--recon-iters 300"), _pt(5.1, 0.7946, "--recon-iters 200"), _pt(5.1, 0.7862),
           _pt(4.9, 0.7950)]
    groups = label_groups(pts)
    assert sorted(len(v) for v in groups.values()) == [1, 1, 2]
    shared = next(v for v in groups.values() if len(v) == 2)
    assert shared == ["W4A8 recon --recon-iters 200", "W4A8 recon --recon-iters 300"]


def test_joined_label_keeps_the_common_words_once():
    assert joined_label(["W4A8 recon --recon-iters 200", "W4A8 recon --recon-iters 300"]) == \
        "W4A8 recon --recon-iters (200 / 300)"
    assert joined_label(["W8A8 bns", "W8A8 bns", "W8A8 acq"]) == "W8A8 (bns / acq)"
    assert joined_label(["W4A4 recon", "W4A4 recon --x"]) == "W4A4 recon (plain / --x)"
    assert joined_label(["W8A8 bns", "W8A8 bns"]) == "W8A8 bns"
    assert joined_label(["W4A8 recon --synth-images 256"]) == "W4A8 recon --synth-images 256"


def test_a_point_names_its_seed_unless_it_is_seed_0():
    groups = label_groups([_pt(5.1, 0.7962), _pt(5.1, 0.7950, seed=1), _pt(5.1, 0.7930, seed=2, options="--x")])
    (tags,) = groups.values()
    assert sorted(tags) == ["W4A8 recon", "W4A8 recon seed 1", "W4A8 recon seed 2 --x"]
    assert joined_label(["W4A8 recon", "W4A8 recon seed 1"]) == "W4A8 recon (plain / seed 1)"


def test_groups_are_numbered_from_the_top_of_the_chart_down():
    keyed = keyed_groups([_pt(5.1, 0.62), _pt(8.0, 0.83), _pt(5.1, 0.80, seed=1), _pt(5.1, 0.7962)])
    assert [n for n, _, _ in keyed] == [1, 2, 3]
    # each group sits at its lowest point's top-1
    assert [xy for _, xy, _ in keyed] == [(8.0, pytest.approx(83.0)), (5.1, pytest.approx(79.62)),
                                          (5.1, pytest.approx(62.0))]
    assert keyed[1][2] == "W4A8 recon (plain / seed 1)"
