"""Questions about a traced ``torch.fx`` graph that quantization, export and the references share:
which module a node runs, which ops are ReLU-like, pass-through, residual Adds or sigmoid gates,
whether a tensor is provably non-negative or bounded, and which tensor a pass-through chain reads.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d, QuantLinear


def module_of(gm: fx.GraphModule, node) -> nn.Module | None:
    """The module a ``call_module`` node runs (None for other nodes and non-node arguments)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)


def is_clip_activation(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """Upper bound of a ReLU-like activation whose output is >= 0 (inf for ReLU, 6 for ReLU6),
    None if the node is not one."""
    m = module_of(gm, node)
    if isinstance(m, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu)):
        return float("inf")
    if isinstance(m, nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6):
        return 6.0
    if isinstance(m, nn.Hardtanh) and m.min_val == 0.0:
        return float(m.max_val)
    if node.op == "call_function" and node.target is F.hardtanh:
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return float(hi) if lo == 0.0 else None
    if node.op == "call_method" and node.target == "relu":
        return float("inf")
    return None


def clip_reader(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ReLU-like activation that is the node's only reader, None if there is none."""
    users = list(node.users)
    return users[0] if len(users) == 1 and is_clip_activation(gm, users[0]) is not None else None


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops whose output stays on the input's quantization grid with the same scale: max-pool,
    zero padding, slicing, flatten/reshape, dropout/identity."""
    m = module_of(gm, node)
    if m is not None:
        if isinstance(m, (nn.MaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)):
            return True
        return isinstance(m, nn.ZeroPad2d)
    if node.op == "call_function":
        if node.target in (torch.flatten, F.dropout, F.max_pool2d):
            return True
        if node.target is operator.getitem:
            return _is_tensor(node.args[0]) and _is_tensor(node)
        if node.target is F.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            return mode == "constant" and (value is None or value == 0.0)
    if node.op == "call_method":
        return node.target in ("flatten", "view", "reshape", "contiguous")
    return False


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add)
            and len(node.args) >= 2 and all(_is_tensor(a) for a in node.args[:2]))


def is_sigmoid(gm: fx.GraphModule, node) -> bool:
    """A sigmoid or hard sigmoid: output in [0, 1]."""
    return isinstance(node, fx.Node) and (isinstance(module_of(gm, node), (nn.Sigmoid, nn.Hardsigmoid)) or (
        node.op == "call_function" and node.target in (torch.sigmoid, F.sigmoid, F.hardsigmoid)))


def is_sigmoid_gate(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A product ``x * sigmoid(...)`` of two tensors (SiLU once decomposed, squeeze-excitation with a
    sigmoid or hard-sigmoid gate)."""
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) >= 2
            and all(_is_tensor(a) for a in node.args[:2])
            and any(is_sigmoid(gm, source_of(gm, a)) for a in node.args[:2]))


def is_nonnegative(gm: fx.GraphModule, node: fx.Node, _memo: dict | None = None) -> bool:
    """Whether a tensor is provably >= 0 (after ReLU-like ops, through pooling and pass-through
    ops, sums of non-negative tensors). Decides unsigned vs signed activation grids."""
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    if is_clip_activation(gm, node) is not None:
        result = True
    elif isinstance(module_of(gm, node), ActQuantizer):
        result = not module_of(gm, node).signed
    elif is_passthrough(gm, node) or is_pool(gm, node):
        result = is_nonnegative(gm, node.args[0], memo)
    elif is_add(node):
        result = all(is_nonnegative(gm, a, memo) for a in node.args[:2])
    else:
        result = is_sigmoid(gm, node)
    memo[node] = result
    return result


def is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = module_of(gm, node)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return True
    return node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.avg_pool2d)


def upper_bound(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """A finite upper bound of the tensor (6 for ReLU6, 1 for a sigmoid, and what passes them on),
    else None."""
    if is_sigmoid(gm, node):
        return 1.0
    b = is_clip_activation(gm, node)
    if b is not None:
        return b if b != float("inf") else None
    if is_passthrough(gm, node) or is_pool(gm, node):
        return upper_bound(gm, node.args[0])
    return None


def source_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back through pass-through ops to the tensor whose quantizer they share."""
    while is_passthrough(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted submodule path ``name`` of ``gm`` (the graph keeps calling it by name)."""
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(module_of(gm, n), (QuantConv2d, QuantLinear))]
