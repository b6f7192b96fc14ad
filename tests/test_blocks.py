"""The graph's blocks: cut points read off the dataflow, every layer in exactly one block, and the
blocks run one after another reproduce the model."""
import torch

from dfq.pipeline.blocks import BlockRunner, cuts, partition
from dfq.pipeline.graph import layer_nodes
from dfq.pipeline.quantize import quantize
from tests.tiny import qconfig, tiny_images, tiny_resnet


def _qmodel():
    return quantize(tiny_resnet(2), qconfig(bits=8), tiny_images(2))


def test_no_cut_inside_a_residual_block():
    gm = _qmodel().module
    names = [n.name for n in cuts(gm)]
    # the block's input (the pool) stays live until the Add: nothing between them is a cut
    inside = names[names.index("pool") + 1:names.index("add")]
    assert inside == [] and "aq_block_relu2" in names


def test_blocks_cover_every_layer_once_and_reproduce_the_model():
    qm = _qmodel()
    blocks = partition(qm.module, max_layers=3)
    layers = [n for b in blocks for n in b.layers]
    assert layers == layer_nodes(qm.module) and all(1 <= len(b.layers) <= 3 for b in blocks)
    assert len(blocks) > 1
    x = tiny_images(8, seed=5)
    runner = BlockRunner(qm.module)
    with torch.no_grad():
        v = x
        for b in blocks:
            assert torch.equal(runner.prefix(b, x), v)
            v = runner(b, v)
        assert torch.equal(v, qm.module(x))


def test_a_residual_block_is_never_split():
    gm = _qmodel().module
    blocks = partition(gm, max_layers=1)
    sizes = {tuple(n.name for n in b.layers): len(b.layers) for b in blocks}
    # with at most one layer per merged block, only the residual block (two convs between the same
    # two cuts) holds more than one
    assert sizes[("block_conv1", "block_conv2")] == 2
    assert all(v == 1 for k, v in sizes.items() if k != ("block_conv1", "block_conv2"))
