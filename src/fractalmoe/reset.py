"""In-place initialisation of a module tree, where its tensors already live.

A large model is built on the meta device (no memory), materialised with ``to_empty`` on its
device (memory, no values) and then initialised there (torchtitan's flow). PyTorch's modules
initialise their own parameters in ``reset_parameters``; this package's modules do the same for
theirs (expert tables, sub-keys, gates that start at zero, statistics of past batches).
``reset_tree`` calls them children first, so that a parent's own start for a child's weights (a
join gate at zero, a depth router at full depth) wins over the child's default.
"""

from __future__ import annotations

from torch import nn


def reset_tree(root: nn.Module) -> None:
    """``reset_parameters()`` of every module under ``root`` (included), each once, children
    before their parent."""
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for child in module.children():
            visit(child)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()

    visit(root)
