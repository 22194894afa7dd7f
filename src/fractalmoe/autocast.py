"""The routed layer's own autograd functions under ``torch.autocast``.

Autocast chooses a dtype per op for the ops it lists (matrix products in bfloat16 or float16,
reductions in float32). A custom autograd function's forward runs inside the autocast region, but
its backward runs wherever ``backward()`` is called, usually outside it: tensors it saved in
mixed dtypes then meet in plain products, which refuse them. So each of the layer's functions
fixes its dtypes itself: it casts its inputs once to what autocast would give their matrix
product (``autocast_dtype``), runs forward and backward with autocast off (``autocast_off``), and
returns every gradient in its input's dtype, as ``torch.amp.custom_fwd``/``custom_bwd`` do for
one device type fixed in advance.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast gives matrix products on t's device now; None where it is off (or the
    device has no autocast, e.g. meta)."""
    kind = t.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def training_autocast(name: str) -> torch.dtype | None:
    """The dtype of ``train.autocast`` ("none": None)."""
    return None if name == "none" else getattr(torch, name)


def autocast_region(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` in dtype on that kind of device; nothing where dtype is None."""
    return torch.autocast(device_type, dtype) if dtype is not None else contextlib.nullcontext()


def autocast_off(t: Tensor) -> contextlib.AbstractContextManager[object]:
    """A region where autocast leaves ops on t's device alone."""
    kind = t.device.type
    if not torch.amp.is_autocast_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)
