"""Rewrite ``torch.matmul`` / ``@`` / ``torch.bmm`` calls of a traceable model into :class:`MatMul` modules, so that
quantizers attach to attention products of networks that were not written for condiquant."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn

from condiquant.archs.ops import MatMul
from condiquant.config import ConfigError

_MATMULS = (torch.matmul, operator.matmul, torch.bmm)


def rewrite_matmuls(model: nn.Module) -> nn.Module:
    """``torch.matmul`` / ``@`` / ``torch.bmm`` calls become :class:`MatMul` modules (so quantizers can attach to
    their inputs); returns a ``torch.fx.GraphModule``, or raises ConfigError if the model does not trace."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, Python ints from shapes, ...
        raise ConfigError(f"{type(model).__name__} does not trace with torch.fx ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}); its matmuls stay full precision: call "
                          f"condiquant.archs.ops.MatMul modules instead of '@' in its forward") from None
    count = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target in _MATMULS:
            name = f"matmul_{count}"
            graph_module.add_submodule(name, MatMul())
            with graph_module.graph.inserting_after(node):
                new = graph_module.graph.call_module(name, node.args, node.kwargs)
            node.replace_all_uses_with(new)
            graph_module.graph.erase_node(node)
            count += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
