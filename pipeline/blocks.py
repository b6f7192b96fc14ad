"""The blocks of a traced model: runs of layers between points where one tensor carries all the state.

Block-wise reconstruction (BRECQ, Li et al. 2021) optimises the rounding of a few consecutive
layers together against the FP output of the group, so that the layers of a residual block can
make up for each other's errors. What counts as a block is read off the graph, not off module
names: a *cut* is a node after which its own output is the only value any later node reads
(the output of a residual block, or of any layer in a plain chain). A block runs from one cut
(exclusive; the graph input for the first) to a later one (inclusive). Consecutive cut-to-cut
segments are merged while the merged block holds at most ``max_layers`` conv/linear layers, so a
plain chain (the expand -> depthwise -> project convs of an MBConv block without a residual)
becomes one block, while two residual blocks stay two.

:class:`BlockRunner` evaluates a block's nodes on a given input tensor with the model's current
modules (quantizers as they are set), which is all reconstruction needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dfq.pipeline.graph import layer_nodes


@dataclass
class Block:
    start: fx.Node            # the node whose value is the block's input (placeholder or a cut)
    nodes: list[fx.Node]      # the nodes the block runs, in graph order; the last one is its output
    layers: list[fx.Node]     # its conv/linear nodes

    @property
    def end(self) -> fx.Node:
        return self.nodes[-1]


def _value_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that compute activations (not parameters, not the output)."""
    return [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]


def cuts(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes after which only their own value is read later, in graph order."""
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    last_use = {n: max(index[u] for u in n.users) for n in _value_nodes(gm) if n.users}
    found, reach = [], -1          # reach: the latest use of any value made before the current node
    for n in order:
        if n not in last_use:
            continue
        if reach <= index[n]:
            found.append(n)
        reach = max(reach, last_use[n])
    return found


def partition(gm: fx.GraphModule, max_layers: int = 3) -> list[Block]:
    """The model's blocks (see the module docstring), covering every conv/linear layer once."""
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    is_layer = set(layer_nodes(gm))
    starts = [c for c in cuts(gm) if c.op != "output"]
    segments: list[Block] = []
    for a, b in zip(starts, starts[1:]):
        nodes = [n for n in order[index[a] + 1:index[b] + 1] if n.op != "get_attr"]
        segments.append(Block(a, nodes, [n for n in nodes if n in is_layer]))
    blocks: list[Block] = []
    for seg in segments:
        prev = blocks[-1] if blocks else None
        if prev is not None and (not prev.layers or len(prev.layers) + len(seg.layers) <= max_layers):
            prev.nodes += seg.nodes
            prev.layers += seg.layers
        else:
            blocks.append(seg)
    return [b for b in blocks if b.layers]


class BlockRunner(fx.Interpreter):
    """``runner(block, x)``: the block's output for input ``x`` (its start node's value).

    ``gm`` may be a copy of the graph the block was found in (nodes are matched by name)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self._by_name = {n.name: n for n in gm.graph.nodes}

    def _here(self, block: Block) -> Block:
        """The block with this runner's own nodes (the same names)."""
        if block.start.graph is self.module.graph:
            return block
        mine = [self._by_name[n.name] for n in block.nodes]
        return Block(self._by_name[block.start.name], mine, [self._by_name[n.name] for n in block.layers])

    def __call__(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        block = self._here(block)
        self.env = {block.start: x}
        for node in block.nodes:
            for arg in node.all_input_nodes:
                if arg not in self.env and arg.op == "get_attr":
                    self.env[arg] = super().run_node(arg)
            self.env[node] = self.run_node(node)
        out = self.env[block.end]
        self.env = {}
        return out

    def prefix(self, block: Block, images: torch.Tensor) -> torch.Tensor:
        """The value of the block's start node for ``images`` (the graph run up to it)."""
        block = self._here(block)
        self.env = {}
        try:
            for node in self.module.graph.nodes:
                self.env[node] = self.run_node(node) if node.op != "placeholder" else images
                if node is block.start:
                    return self.env[node]
        finally:
            self.env = {}
        raise ValueError(f"node {block.start.name} is not in the graph")
