"""One counter of host syncs for the tests (DESIGN.md, host-sync rule), seen on the CPU."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from fractalmoe import product_keys


class HostSyncs(TorchDispatchMode):
    """Counts what makes the host wait for a device: scalar reads (``_local_scalar_dense``: item,
    float, int, bool), ops whose output size depends on values (nonzero, bincount, unique,
    masked_select, boolean-mask indexing, repeat_interleave without output_size), value
    comparisons on the host (equal, allclose), copies between the host and a device (blocking
    either way), tensors made from host data (``lift_fresh``: ``torch.tensor(...)``, a blocking
    host-to-device copy on a device), and ``tolist``/``numpy`` (wrapped here: on CPU they read
    memory without any op).

    Copies between the host and a device appear only with a device: the meta device stands in
    for one on a CPU machine (``test_device.py``). The code is counted on the path a device takes:
    top-k's numpy selection, which reads CPU tensors only (no sync there), is off."""

    SIZE_FROM_VALUES = ("nonzero", "bincount", "masked_select", "equal", "allclose", "is_nonzero",
                        "_local_scalar_dense", "lift_fresh")

    def __init__(self) -> None:
        super().__init__()
        self.found: Counter = Counter()

    def __enter__(self) -> HostSyncs:
        self._select_on_host = product_keys._select_on_host
        product_keys._select_on_host = lambda scores, k: False
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, _name=name, **k):  # type: ignore[no-untyped-def]
                self.found[f"Tensor.{_name}"] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for name in ("tolist", "numpy"):
            delattr(torch.Tensor, name)  # back to the C implementation
        product_keys._select_on_host = self._select_on_host
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.found.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            self.found[str(func)] += 1
        return func(*args, **kwargs)

    def _syncs(self, func, args, kwargs) -> bool:  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in self.SIZE_FROM_VALUES or name.startswith(("unique", "_unique")):
            return True
        if name in ("index", "index_put", "index_put_"):
            return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1])
        if name == "repeat_interleave":
            return str(func) != "aten.repeat_interleave.self_int" and kwargs.get("output_size") is None
        if name == "_to_copy":  # between the host and a device, either way
            device = kwargs.get("device")
            return device is not None and (torch.device(device).type == "cpu") != (args[0].device.type == "cpu")
        if name == "copy_":
            return (args[0].device.type == "cpu") != (args[1].device.type == "cpu")
        return False
