"""The README's own-training-loop example runs as written and trains."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_under(heading: str) -> str:
    """The first fenced python block of the section that starts with ``heading``."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no python block under {heading!r}"
    return match.group(1)


# Inductor's C++ code generation costs minutes on a cold cache; AOT autograd's eager backend
# traces the same graphs (dynamo, functionalised mutations, backward) in seconds.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_own_training_loop_with_compile_collector_and_fold_trains(capsys, monkeypatch, backend: str) -> None:
    code = python_block_under("### Your own training loop")
    assert "torch.compile(model)" in code and "fold_statistics(model, stats)" in code
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    namespace: dict[str, object] = {}
    try:
        exec(compile(code, str(README), "exec"), namespace)
    finally:
        torch._dynamo.reset()
    printed = [float(line.rsplit(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("step ")]
    assert len(printed) == 4
    final = namespace["loss"].item()  # type: ignore[attr-defined]
    assert final < printed[0] - 1.0, (printed, final)
    biases = [m.expert_bias for m in namespace["model"].modules() if hasattr(m, "expert_bias")]  # type: ignore[attr-defined]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # the fold ran
