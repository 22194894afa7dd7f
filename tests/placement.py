"""Which tensors of a model and its optimizers are not on a device: the tests' placement check."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def off_device(model: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer], device_type: str,
               scalar_state: bool = True) -> list[str]:
    """Names of every parameter, gradient, buffer and optimizer state tensor whose device is not
    of ``device_type``; ``scalar_state`` False leaves out 0-d state (torch's own optimizers may
    keep step counts on the CPU)."""
    def off(t: torch.Tensor) -> bool:
        return t.device.type != device_type

    bad = [f"param {n}" for n, p in model.named_parameters() if off(p)]
    bad += [f"grad {n}" for n, p in model.named_parameters() if p.grad is not None and off(p.grad)]
    bad += [f"buffer {n}" for n, b in model.named_buffers() if off(b)]
    for opt in optimizers:
        bad += [f"state {k} {tuple(p.shape)}" for p, st in opt.state.items() for k, v in st.items()
                if isinstance(v, torch.Tensor) and (scalar_state or v.dim() > 0) and off(v)]
    return bad
