"""Requantization ties: a channel whose ratio s_in * s_w / s_out makes a reachable accumulator land
on a half-integer is found and its weight step moved until no tie remains; other channels, and
schemes without int32 biases, are left alone."""
import numpy as np
import torch

from dfq.pipeline import ties
from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.graph import layer_nodes, module_of
from dfq.pipeline.quantize import quantize
from dfq.pipeline.ties import (ATTEMPTS, NUDGE, _accumulator_step, _clear_ties, _step, _tied,
                              add_tied_channels, break_ties, nudge_directions, output_quantizer_of, residual_adds,
                              tied_channels)
from tests.tiny import qconfig, tiny_images, tiny_resnet


def test_tied_channels_needs_a_reachable_half_integer():
    r = np.array([5 / 148, 5 / 148, 0.0337, 1 / 3])
    reach = np.array([100.0, 50.0, 1e6, 1e6])
    # 74 * 5/148 = 2.5 (reachable only in the first); 0.0337 and 1/3 never give a half-integer
    assert tied_channels(r, reach, 0, 15).tolist() == [True, False, False, False]
    assert tied_channels(np.array([5 / 148]), np.array([100.0]), -8, 7).tolist() == [True]


def test_nudge_directions_keep_onnx_runtimes_codes_at_the_ties():
    """Step 0.5 on an output step of 1: accumulator +-1 gives +-0.5 (ONNX Runtime: 0, kept by a
    smaller step), +-3 gives +-1.5 (+-2, kept by a larger step), +-5 gives +-2.5 (+-2, smaller)."""
    step, s_out = np.array([0.5, 0.5, 0.5, 0.5]), np.float64(1.0)
    reach = np.array([1.0, 3.0, 5.0, 0.0])
    assert nudge_directions(step, s_out, reach, -8, 7).tolist() == [-1, 1, -1, 1]    # 1: 2 votes each way
    assert nudge_directions(step[1:2], s_out, reach[1:2], 0, 15).tolist() == [1]      # only +1 (down) and +3 (up)
    assert nudge_directions(np.array([0.5]), s_out, np.array([5.0]), 0, 15).tolist() == [-1]


def test_a_channel_the_first_direction_cannot_clear_is_tried_the_other_way(monkeypatch):
    """Stand-ins for the tie test and the vote: channel 0 is tied unless its step went down, and
    the vote says up."""
    layer = torch.nn.Module()
    layer.weight_quantizer = torch.nn.Module()
    layer.weight_quantizer.scale = torch.ones(3)
    monkeypatch.setattr(ties, "_tied", lambda layer, *_: np.array([float(layer.weight_quantizer.scale[0]) >= 1,
                                                                     False, False]))
    monkeypatch.setattr(ties, "_directions", lambda *_: torch.ones(3, dtype=torch.float64))
    moved, left = _clear_ties(layer, None, None, [])
    assert moved.tolist() == [True, False, False] and left == 0
    assert float(layer.weight_quantizer.scale[0]) == 1 - NUDGE
    assert layer.weight_quantizer.scale[1:].tolist() == [1.0, 1.0]


def _layer_ratio(layer, in_q, out_q):
    """(r per channel, reachable |accumulator| per channel), from the float32 steps as exported."""
    step, reach = _accumulator_step(layer, in_q)
    return step / _step(out_q), reach


def _requantized_layer(qm):
    gm = qm.module
    for node in layer_nodes(gm):
        out_q, in_node = output_quantizer_of(gm, node), input_quantizer_of(gm, node)
        if out_q is not None and in_node is not None and module_of(gm, node).weight_quantizer.bits == 4:
            return str(node.target), module_of(gm, node), module_of(gm, in_node), out_q
    raise AssertionError("no requantized 4-bit layer")


def test_a_forced_tie_is_moved_and_nothing_else():
    model = tiny_resnet(4)
    images = tiny_images(32, seed=3)
    qm = quantize(model, qconfig(bits=4), images[:2])
    calibrate(qm, images)
    break_ties(qm)                                  # whatever ties the calibration happened to make
    name, layer, in_q, out_q = _requantized_layer(qm)
    with torch.no_grad():                           # channel 0: r = 5/148, ties at accumulator 74
        layer.weight_quantizer.scale[0] = float(out_q.scale) * 5 / 148 / float(in_q.scale)
    before = layer.weight_quantizer.scale.detach().clone()
    r, reach = _layer_ratio(layer, in_q, out_q)
    assert reach[0] >= 74 and tied_channels(r, reach, out_q.grid.qmin, out_q.grid.qmax)[0]
    step, _ = _accumulator_step(layer, in_q)
    direction = nudge_directions(step, _step(out_q), reach, out_q.grid.qmin, out_q.grid.qmax)[0]
    report = break_ties(qm)
    assert report.channels == {name: [0]} and report.moved == 1
    after = layer.weight_quantizer.scale.detach()
    assert torch.equal(after[1:], before[1:])
    ratio = float(after[0] / before[0])
    assert (1 < ratio <= (1 + NUDGE) ** ATTEMPTS) if direction > 0 else ((1 - NUDGE) ** ATTEMPTS <= ratio < 1)
    r, reach = _layer_ratio(layer, in_q, out_q)
    assert not tied_channels(r, reach, out_q.grid.qmin, out_q.grid.qmax).any()
    assert report.to_dict()["moved"] == 1


def test_schemes_without_int32_biases_are_left_alone():
    model = tiny_resnet(4)
    images = tiny_images(32, seed=3)
    qm = quantize(model, qconfig("tensorrt", bits=4), images[:2])
    calibrate(qm, images)
    assert break_ties(qm).moved == 0


def test_8_bit_outputs_are_left_alone():
    model = tiny_resnet(4)
    images = tiny_images(32, seed=3)
    qm = quantize(model, qconfig(bits=8), images[:2])
    calibrate(qm, images)
    report = break_ties(qm)
    assert report.moved == 0 and not report.unresolved


def test_a_move_is_kept_only_where_it_clears_every_near_tie(monkeypatch):
    """8-bit outputs checked on purpose: many channels keep some float32-level near-tie whatever
    their step; those get their calibrated step back, the moved ones end tie-free."""
    monkeypatch.setattr(ties, "BELOW_BITS", 9)
    model = tiny_resnet(4)
    images = tiny_images(32, seed=3)
    qm = quantize(model, qconfig(bits=8), images[:2])
    calibrate(qm, images)
    gm = qm.module
    before = {str(n.target): module_of(gm, n).weight_quantizer.scale.detach().clone() for n in layer_nodes(gm)}
    report = break_ties(qm)
    assert report.moved + sum(report.unresolved.values()) > 0, "no 8-bit near-tie at all: the test shows nothing"
    for node in layer_nodes(gm):
        name, layer = str(node.target), module_of(gm, node)
        in_node, out_q = input_quantizer_of(gm, node), output_quantizer_of(gm, node)
        if in_node is None or out_q is None:
            continue
        after = layer.weight_quantizer.scale.detach()
        changed = torch.nonzero(after != before[name]).flatten().tolist()
        assert changed == report.channels.get(name, [])
        tied = _tied(layer, module_of(gm, in_node), out_q, residual_adds(gm, node))
        assert not tied[changed].any()
        assert int(tied.sum()) == report.unresolved.get(name, 0)


def test_add_tied_channels_needs_a_skip_code_and_a_reachable_accumulator_in_the_clamp():
    a, reach = np.array([0.25, 0.25, 0.37]), np.array([10.0, 10.0, 10.0])
    wide = (np.full(3, -100.0), np.full(3, 100.0))
    # 0.25 * 2 + j = 0.5 + j ties; 0.37 * acc + j (acc <= 10) is never within float error of a half-integer
    assert add_tied_channels(a, reach, wide, 1.0, np.array([0, 1]), 0, 15).tolist() == [True, True, False]
    narrow = (np.full(3, -0.1), np.full(3, 0.1))              # every nonzero accumulator is clamped
    assert not add_tied_channels(a, reach, narrow, 1.0, np.array([0, 1]), 0, 15).any()
    # 0.3 * acc + j * 0.2: 0.3 * 5 + 0 = 1.5 ties; only reachable when reach >= 5
    assert add_tied_channels(np.array([0.3, 0.3]), np.array([5.0, 4.0]), (np.full(2, -9.0), np.full(2, 9.0)),
                             0.2, np.array([0]), 0, 15).tolist() == [True, False]


def test_a_forced_residual_add_tie_is_moved():
    model = tiny_resnet(4)
    images = tiny_images(32, seed=3)
    qm = quantize(model, qconfig(bits=4), images[:2])
    calibrate(qm, images)
    break_ties(qm)
    gm = qm.module
    node = next(n for n in layer_nodes(gm) if residual_adds(gm, n) and input_quantizer_of(gm, n) is not None)
    layer, in_q = module_of(gm, node), module_of(gm, input_quantizer_of(gm, node))
    out_q = output_quantizer_of(gm, node)
    adds = residual_adds(gm, node)
    add_q = adds[0][1]
    with torch.no_grad():     # channel 0: a = s_in * s_w / s_add_out = 1/2, so accumulator 1 with skip code 0 gives 0.5
        layer.weight_quantizer.scale[0] = float(add_q.scale) * 0.5 / float(in_q.scale)
    assert _tied(layer, in_q, out_q, adds)[0]
    before = layer.weight_quantizer.scale.detach().clone()
    report = break_ties(qm)
    assert 0 in report.channels.get(str(node.target), [])
    assert not _tied(layer, in_q, out_q, adds)[0]
    assert torch.equal(layer.weight_quantizer.scale.detach()[1:], before[1:])
