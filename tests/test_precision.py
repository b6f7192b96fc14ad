"""Weight and activation precision set apart (W4A8), per-layer sensitivity, and mixed precision
under a budget of average bits."""
import itertools
import json

import onnx
import pytest
import torch

from dfq.cli import main
from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.graph import layer_nodes
from dfq.pipeline.mixed_precision import average_bits, check_budget, choose_precision, fixed_layers_bits
from dfq.pipeline.quantize import Precision, quantize
from dfq.pipeline.sensitivity import LayerSensitivity, layer_sensitivity
from tests.tiny import qconfig, tiny_images, tiny_resnet


def test_precision_parsing():
    assert Precision.parse("8") == Precision(8, 8) and Precision.parse(4) == Precision(4, 4)
    assert Precision.parse("W4A8") == Precision(4, 8) and Precision.parse("w8a4") == Precision(8, 4)
    assert str(Precision(4, 8)) == "W4A8"
    for bad in ("W3A8", "3", "W4", "eight"):
        with pytest.raises(ValueError, match="is not supported"):
            Precision.parse(bad)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_w4a8_quantizes_weights_at_4_and_layer_inputs_at_8(target):
    qm = quantize(tiny_resnet(1), qconfig(target, bits=4, act_bits=8), tiny_images(2))
    assert qm.config.name == "W4A8"
    assert qm.layer_precision["stem"] == qm.layer_precision["fc"] == Precision(8, 8)
    assert qm.layer_precision["block.conv1"] == qm.layer_precision["dw"] == Precision(4, 8)
    gm = qm.module
    for node in layer_nodes(gm):
        layer, aq = gm.get_submodule(str(node.target)), gm.get_submodule(str(input_quantizer_of(gm, node).target))
        assert (layer.weight_quantizer.bits, aq.bits) == (qm.layer_precision[str(node.target)].weights, 8)
        assert layer.weight_quantizer.grid.qmax == (7 if layer.weight_quantizer.bits == 4 else
                                                   layer.weight_quantizer.grid.qmax)


def test_layer_precision_overrides_the_policy():
    qm = quantize(tiny_resnet(1), qconfig(bits=4, layer_precision={"down": "W8A4", "fc": "W4A4"}), tiny_images(2))
    assert qm.layer_precision["down"] == Precision(8, 4) and qm.layer_precision["fc"] == Precision(4, 4)
    assert qm.config.name == "W4A4-mixed"
    with pytest.raises(ValueError, match="does not have"):
        quantize(tiny_resnet(1), qconfig(bits=4, layer_precision={"nope": "W8A8"}), tiny_images(2))


def _rows(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = (torch.randint(10, 1000, (n,), generator=g)).tolist()
    macs = (torch.randint(100, 10000, (n,), generator=g)).tolist()
    sens = torch.rand(n, 2, generator=g).tolist()
    # layers 2 and 3 read the same tensor: they share one activation precision
    inputs = [f"t{i}" if i != 3 else "t2" for i in range(n)]
    return [LayerSensitivity(f"l{i}", inputs[i], params[i], macs[i], i == 0, sens[i][0], sens[i][1],
                             sens[i][0] + sens[i][1]) for i in range(n)]


@pytest.mark.parametrize("budget", [(4.5, 5.0), (6.0, 4.6), (7.0, 7.0)])
def test_mixed_precision_is_the_best_choice_within_the_budget(budget):
    rows = _rows()
    low = Precision(4, 4)
    chosen = choose_precision(rows, low, avg_weight_bits=budget[0], avg_act_bits=budget[1], fixed_8bit={"l0"})
    costs = {r.name: (r.params, r.macs) for r in rows}
    w, a, _ = average_bits(chosen.layers, costs)
    assert w <= budget[0] + 1e-9 and a <= budget[1] + 1e-9
    assert chosen.layers["l0"] == Precision(8, 8)
    assert chosen.layers["l2"].activations == chosen.layers["l3"].activations
    # brute force over every assignment that keeps the shared input consistent
    best = None
    free = [r for r in rows if r.name != "l0"]
    inputs = sorted({r.input for r in free})
    for wbits in itertools.product((4, 8), repeat=len(free)):
        for abits in itertools.product((4, 8), repeat=len(inputs)):
            a_of = dict(zip(inputs, abits))
            layers = {"l0": Precision(8, 8), **{r.name: Precision(wb, a_of[r.input]) for r, wb in zip(free, wbits)}}
            ww, aa, _ = average_bits(layers, costs)
            if ww <= budget[0] + 1e-9 and aa <= budget[1] + 1e-9:
                cost = sum(r.weights * (layers[r.name].weights == 4) + r.activations * (layers[r.name].activations == 4)
                           for r in rows)
                best = cost if best is None else min(best, cost)
    # the knapsack rounds item sizes up to 1/2000 of the total: at worst a hair above the optimum
    assert chosen.lowered_sensitivity <= best + 0.05


def test_mixed_budget_below_the_fixed_layers_is_refused():
    rows = _rows()
    costs = {r.name: (r.params, r.macs) for r in rows}
    w, a = fixed_layers_bits(costs, {"l0", "l1"}, Precision(4, 4))
    assert 4.0 < w < 8.0 and 4.0 < a < 8.0
    with pytest.raises(ValueError, match=r"\(l0, l1\), with every other layer at W4A4, already average W"):
        choose_precision(rows, Precision(4, 4), avg_weight_bits=4.0, avg_act_bits=8.0, fixed_8bit={"l0", "l1"})
    with pytest.raises(ValueError, match="above the budget W8A4"):
        check_budget(costs, {"l0", "l1"}, Precision(4, 4), avg_weight_bits=8.0, avg_act_bits=4.0)
    check_budget(costs, {"l0", "l1"}, Precision(4, 4), avg_weight_bits=w, avg_act_bits=a)    # exactly enough


def test_layer_sensitivity_measures_each_layer_alone():
    model = tiny_resnet(3)
    calib, holdout = tiny_images(48, seed=1), tiny_images(16, seed=2)
    rows = layer_sensitivity(model, qconfig(bits=4), calib, holdout)
    assert [r.name for r in rows] == ["stem", "block.conv1", "block.conv2", "down", "dw", "fc"]
    assert {r.name for r in rows if r.kept_8bit} == {"stem", "fc"}
    assert all(r.weights > 0 and r.activations > 0 and r.both > 0 for r in rows)
    assert rows[1].params == 8 * 8 * 9 and rows[1].macs == 8 * 8 * 8 * 9 * 8   # 8x8 map after the pool
    # lowering one layer costs less than lowering all of them
    qm = quantize(model, qconfig(bits=4, keep_8bit=()), calib[:2])
    calibrate(qm, calib, holdout=holdout)
    from dfq.pipeline.calibrate import batched_logits, output_kl

    everything = output_kl(batched_logits(model, holdout, 64), batched_logits(qm.module, holdout, 64))
    assert max(r.both for r in rows) < everything


def _checkpoint(tmp_path):
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    path = tmp_path / "resnet20-mp.pth"
    torch.save(get_spec("resnet20").build().state_dict(), path)
    return path


def test_cli_mixed_budget_writes_what_every_layer_runs_at(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main([str(_checkpoint(tmp_path)), "--bits", "W4A4", "--mixed-budget", "W5A6", "--out", str(out),
                 "--method", "bns", "--synth-images", "32", "--synth-steps", "2", "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "m.report.json").read_text())
    q = report["quant"]
    assert q["avg_weight_bits"] <= 5.0 + 1e-9 and q["avg_act_bits"] <= 6.0 + 1e-9
    assert q["avg_weight_bits"] > 4.0 and q["name"] == "W4A4-mixed"
    assert report["sensitivity"]["mixed"]["layers"] == q["layer_precision"]
    assert q["layer_precision"]["conv1"] == q["layer_precision"]["linear"] == "W8A8"   # the policy holds
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["dfq.precision"]) == q["layer_precision"] and props["dfq.target"] == "onnxruntime"
    assert (tmp_path / "m.sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Layer sensitivity (W4A4" in (tmp_path / "m.report.md").read_text()


def test_cli_rejects_a_budget_outside_the_precisions(tmp_path, capsys):
    code = main([str(tmp_path / "m.pth"), "--bits", "8", "--mixed-budget", "W5A5", "--out", str(tmp_path / "x.onnx")])
    assert code == 2 and "--mixed-budget W5A5 must lie between" in capsys.readouterr().err
    code = main([str(tmp_path / "m.pth"), "--bits", "W4A8", "--out", str(tmp_path / "x.onnx"), "--mixed-budget", "5"])
    assert code == 2 and "WxAy" in capsys.readouterr().err


def test_cli_refuses_a_budget_the_kept_layers_exceed_before_synthesis(tmp_path, capsys):
    # ResNet-20 at W4A4 with conv1 and the linear layer at 8 bits averages about W4.016A4.044
    out = tmp_path / "m.onnx"
    code = main([str(_checkpoint(tmp_path)), "--bits", "4", "--mixed-budget", "W4.01A4.01", "--out", str(out),
                 "--threads", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "the layers kept at 8 bits (conv1, linear)" in captured.err
    assert "--keep-8bit none" in captured.err and "above the budget W4.01A4.01" in captured.err
    assert "synthesizing" not in captured.out                         # refused before the expensive stages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet20-mp.pth"]
