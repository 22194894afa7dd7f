"""Causal depthwise convolution over time: UltraMem's query convolution, a memory's query sees
the last few positions. Used on the FFN's input (``ffn_conv``) and on each routed block's query
input (``block_conv``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalConv(nn.Module):
    """y_t = x_t + sum_{j < W} w_j * x_(t-j), per channel (depthwise), x_(t<0) = 0.

    Zero at init, so a model starts as without it. Causal by construction: position t reads
    positions t - W + 1 .. t. Cached generation keeps the inputs it has seen in a buffer
    (B, W - 1 + seq_len, D), zeros before position 0 (``model.KVCache``).
    """

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(dim, 1, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor, seen: Tensor | None = None, pos: int = 0) -> Tensor:
        """x: (B, T, D) at positions pos..pos+T-1; ``seen``: the cache buffer, or None."""
        t, w = x.shape[1], self.width
        if seen is None:
            past = F.pad(x, (0, 0, w - 1, 0))
        else:  # positions pos - w + 1 .. pos + t - 1, stored at an offset of w - 1
            seen[:, w - 1 + pos:w - 1 + pos + t] = x
            past = seen[:, pos:w - 1 + pos + t]
        y = F.conv1d(past.transpose(1, 2), self.weight.to(x.dtype), groups=x.shape[-1])
        return x + y.transpose(1, 2)

    def flops_per_token(self) -> int:
        return 2 * self.weight.numel()

    def active_params_per_token(self) -> int:
        return self.weight.numel()
